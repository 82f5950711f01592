"""DemotionGate: demote only while lower-tier hits come back per demoted token; a cache under churn
stops demoting (but for probes) and one with reuse keeps demoting."""

import logging
import math

import pytest

from sglang_kvc.demotion_gate import DemotionGate
from tests.cache_parts import build_cache


def test_open_until_a_window_has_passed_then_by_yield():
    gate = DemotionGate(100, min_yield=0.25, probe_every=4)
    gate.record_demoted(99)
    assert gate.is_open() and not gate.warm and math.isinf(DemotionGate(1).demotion_yield)
    gate.record_demoted(1)  # the window has passed: both counts halve, 50 demoted, 0 hits
    assert gate.warm and gate.demoted == 50 and not gate.is_open()
    gate.record_hits(12)
    assert not gate.is_open()
    gate.record_hits(1)  # 13 >= 0.25 * 50
    assert gate.is_open() and gate.demotion_yield == pytest.approx(13 / 50)


def test_drops_advance_the_window_and_halve_both_counts():
    gate = DemotionGate(100)
    gate.record_demoted(40)
    gate.record_hits(30)
    gate.record_dropped(260)  # 300 tokens left the write tier: three halvings
    assert gate.demoted == pytest.approx(5) and gate.hits == pytest.approx(3.75)


def test_a_closed_gate_lets_every_nth_decision_through_and_counts_the_refusals():
    gate = DemotionGate(10, min_yield=1.0, probe_every=3)
    gate.record_demoted(10)
    decisions = [gate.allow() for _ in range(7)]
    assert decisions == [False, False, True, False, False, True, False]
    assert gate.closed_decisions == 5


def test_zero_min_yield_never_closes_and_a_bad_window_is_refused():
    gate = DemotionGate(10, min_yield=0.0)
    gate.record_demoted(1000)
    assert all(gate.allow() for _ in range(20))
    with pytest.raises(ValueError, match="window_tokens"):
        DemotionGate(0)


def _churn(cache, driver, sessions, start):
    for seed in range(start, start + sessions):  # every request new: nothing demoted is read again
        driver.run([seed * 50 + i for i in range(17)])
        cache.check_invariants()


def test_a_cache_under_churn_stops_demoting_and_keeps_its_books(caplog):
    gated, gated_driver = build_cache(frames=8, page_size=4, min_demotion_yield=0.25)
    always, always_driver = build_cache(frames=8, page_size=4, min_demotion_yield=0.0)
    with caplog.at_level(logging.INFO, logger="sglang_kvc.compressed_cache"):
        _churn(gated, gated_driver, 60, 0)
    assert "sglang-kvc: demotion off:" in caplog.text and "--kvc-min-demotion-yield 0.25" in caplog.text
    _churn(always, always_driver, 60, 0)
    assert not gated.demotion_gate.is_open() and gated.demotion_gate.closed_decisions > 0
    assert sum(gated.counters.demoted_in) < 0.5 * sum(always.counters.demoted_in)
    stats = gated.kvc_stats()
    assert stats["demotion_open"] is False and stats["demotion_refusals"] == gated.demotion_gate.closed_decisions


def test_a_cache_whose_demoted_prefixes_are_hit_keeps_demoting():
    cache, driver = build_cache(frames=8, page_size=4, min_demotion_yield=0.25)
    for round_ in range(6):  # the same six sessions, growing: their demoted history is read back
        for seed in range(6):
            driver.run([seed * 50 + i for i in range(17 + 4 * round_)])
            cache.check_invariants()
    assert cache.demotion_gate.warm and cache.demotion_gate.is_open()
    assert cache.demotion_gate.closed_decisions == 0 and sum(cache.counters.demoted_in) > 0
    assert sum(cache.counters.hits[1:]) > 0
