"""benchmarks/cache_sim_regime.py: replays of an e2e's kvc system under perturbations, with drops attributed
to the cache's call paths, and the server log's drop events; CPU, a few seconds."""

import pytest

from benchmarks import cache_sim
from benchmarks.cache_sim_regime import Variant, drop_paths, log_drop_events, replay
from sglang_kvc.compressed_cache import CompressedRadixCache
from tests.cache_parts import build_cache
from tests.test_cache_sim import PAGE, fake_e2e, tiny_agentic


def test_variants_parse_from_their_names():
    assert Variant.parse("baseline") == Variant("baseline")
    open_slow = Variant.parse("open,decode_base_s=0.006")
    assert open_slow.open and open_slow.costs == (("decode_base_s", 0.006),) and open_slow.code is None
    old = Variant.parse("code=e9a7733,open,host_sync_s=0.003")
    assert old.code == "e9a7733" and old.open and old.costs == (("host_sync_s", 0.003),)
    assert Variant.parse("seed=5").seed == 5 and Variant.parse("scale=1.4").scale == 1.4
    with pytest.raises(ValueError):
        Variant.parse("sideways")


def test_drops_are_attributed_to_the_path_that_made_them():
    cache, driver = build_cache(frames=8, page_size=4)
    for seed in range(12):  # more history than the arena holds
        driver.run([seed * 50 + i for i in range(17)])
    with drop_paths(CompressedRadixCache) as paths:
        before = list(cache.counters.dropped)
        cache._drop(2, 1 << 20)
    assert paths and all(key.startswith("_drop_leaves") or key.startswith("_drop_subtrees") for key in paths)
    assert [sum(v[t] for v in paths.values()) for t in range(3)] == \
        [now - was for now, was in zip(cache.counters.dropped, before)]
    assert CompressedRadixCache._drop_leaves.__name__ == "_drop_leaves"  # put back


def test_the_server_logs_drop_events_carry_usage_and_tier_deltas(tmp_path):
    def line(sec, usage, k8, k4, k2, fr, dropped, running=3):
        return (f"[2026-12-01 18:00:{sec:02d}] Prefill batch, #new-seq: 1, #new-token: 816, #cached-token: 16, "
                f"token usage: {usage}, kvc: k8v8 {k8} tok/{fr[0]} fr, k4v4 {k4} tok/{fr[1]} fr, k2v2 {k2} tok/{fr[2]} "
                f"fr, free 0/30 fr, demoted 1.0K, dropped {dropped}, #running-req: {running}, #queue-req: 0")
    log = tmp_path / "server.log"
    log.write_text("\n".join([
        line(1, 0.5, "9.0K", "0", "0", (10, 0, 0), "7.0K"),  # warm-up
        "[2026-12-01 18:00:02] Cache flushed successfully!",
        line(3, 0.80, "5.0K", "4.0K", "2.0K", (10, 10, 8), "7.0K"),
        line(5, 0.95, "5.5K", "2.0K", "2.0K", (12, 8, 8), "9.0K", running=9),  # middle tier only
        line(6, 0.60, "5.5K", "1.0K", "1.5K", (14, 7, 7), "10.5K"),
        "[2026-12-01 18:00:08] Cache flushed successfully!",
        line(9, 0.1, "0", "0", "0", (1, 0, 0), "99.0K")]))
    events = log_drop_events(str(log))
    assert events["tiers"] == ["k8v8", "k4v4", "k2v2"] and events["dropped"] == 3500.0
    first, second = events["events"]
    assert first["t_s"] == 2.0 and first["usage_before"] == 0.8 and first["usage"] == 0.95 and first["running"] == 9
    assert first["tokens_delta"] == [500.0, -2000.0, 0.0] and first["frames_delta"] == [2, -2, 0]
    assert second["tokens_delta"] == [0.0, -1000.0, -500.0] and second["new_tokens"] == 816
    # the usage on the line or the one before it: an event at 0.60 right after one at 0.95 counts
    assert events["events_at_usage_0.9"] == 2 and events["dropped_at_usage_0.9"] == 3500.0
    assert events["events_middle_tier_shrank"] == 2 and events["events_middle_shrank_last_unchanged"] == 1


def test_a_replay_of_an_e2e_records_drops_paths_and_sessions_reset():
    trace = tiny_agentic(sessions=6, rounds=3)
    tokens = cache_sim.budget_bf16_tokens(trace, 0.25, PAGE)
    name = "kvc=k8v8,k4v4,k2v2"
    e2e = fake_e2e(dict(trace.params), tokens, {name: 0.2})
    e2e["settings"]["page_size"] = PAGE
    e2e["systems"][name]["log_summary"] = {"max_total_num_tokens": [2 * tokens], "arena_frames": 9}
    e2e["systems"][name]["agentic"]["requests"] = [
        {"session": r.session, "round": r.round, "sent_s": 0.1 * i} for i, r in enumerate(trace)]
    closed = replay(e2e, Variant.parse("baseline"))
    # a record without the demotion gate's series comes from a server that always demoted
    assert closed["system"] == name + "+yield=0" and closed["tiers"] == ["k8v8", "k4v4", "k2v2"]
    assert [sum(v[t] for v in closed["drop_paths"].values()) for t in range(3)] == closed["dropped_tokens"]
    assert isinstance(closed["sessions_reset"], int) and closed["in_flight"][0][0] == 14.0
    opened = replay(e2e, Variant.parse("open,decode_base_s=0.01"))
    assert opened["costs"]["decode_base_s"] == 0.01
    assert cache_sim.MODEL_COSTS["1b"]["kvc"].decode_base_s != 0.01  # the profile is put back
