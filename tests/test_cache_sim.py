"""The cache simulator on tiny traces: deterministic, exact where the answer is known, ladders >= stock bf16."""

import json

import pytest

from benchmarks import cache_sim
from benchmarks.cache_sim import SchedulerConfig, SystemSpec, run_system
from benchmarks.traces import agentic_trace, shared_prefix_trace

PAGE = 16
SYSTEM_LEN = 64  # a whole number of pages, so a hit on the system prompt is exactly this long
BUDGETS = (0.125, 0.25, 0.5, 1.0)


def tiny_agentic(seed=0):
    return agentic_trace(sessions=16, rounds=3, system_len=SYSTEM_LEN, tool_len=48, user_len=16,
                         output_len=16, seed=seed)


def tiny_shared_prefix(seed=0):
    return shared_prefix_trace(groups=3, questions_per_group=4, system_len=SYSTEM_LEN, question_len=16,
                               output_len=16, seed=seed)


def simulate(trace, spec, budget, max_running=4):
    row = run_system(trace, spec, budget, PAGE, "lru", SchedulerConfig(max_running=max_running), check=True)
    row.pop("wall_s")
    return row


def test_traces_are_seeded():
    assert [r.sequence for r in tiny_agentic(1)] == [r.sequence for r in tiny_agentic(1)]
    assert [r.sequence for r in tiny_agentic(1)] != [r.sequence for r in tiny_agentic(2)]
    trace = tiny_agentic()
    for request in trace:
        if request.follows is not None:
            previous = trace.requests[request.follows]
            assert request.prompt[: len(previous.sequence)] == previous.sequence


@pytest.mark.parametrize("spec", [SystemSpec(stock_dtype="fp8"), SystemSpec(ladder="bf16,k8v8,k4v2"),
                                  SystemSpec(ladder="k8v8,k4v4,k2v2", fractions=(0.2, 0.1, 0.7))])
def test_same_seed_same_numbers(spec):
    first = simulate(tiny_agentic(), spec, 0.25)
    assert first == simulate(tiny_agentic(), spec, 0.25)
    assert first["saved_tokens"] > 0 and sum(first["dropped_tokens"]) + sum(first["demoted_tokens"]) > 0


def test_stock_bf16_with_the_whole_working_set_saves_every_reusable_token():
    gsp = tiny_shared_prefix()
    row = simulate(gsp, SystemSpec(stock_dtype="bf16"), 1.0, max_running=1)
    assert row["saved_tokens"] == 3 * (4 - 1) * SYSTEM_LEN  # every question but each group's first
    assert row["dropped_tokens"] == [0]

    agentic = tiny_agentic()
    expected = (16 - 1) * SYSTEM_LEN  # every session but the first finds the system prompt ...
    for request in agentic:  # ... and every later round the page-aligned previous round
        if request.follows is not None:
            expected += len(agentic.requests[request.follows].sequence) // PAGE * PAGE
    row = simulate(agentic, SystemSpec(stock_dtype="bf16"), 1.0, max_running=1)
    assert row["saved_tokens"] == expected and row["dropped_tokens"] == [0]


@pytest.mark.parametrize("ladder", ["bf16,k8v8,k4v2", "k8v8,k4v4,k2v2"])
def test_ladder_with_default_split_saves_at_least_stock_bf16(ladder):
    trace = tiny_agentic()
    for budget in BUDGETS:
        stock = simulate(trace, SystemSpec(stock_dtype="bf16"), budget)
        ours = simulate(trace, SystemSpec(ladder=ladder), budget)
        assert ours["failed_admissions"] == 0
        assert ours["saved_tokens"] >= stock["saved_tokens"], f"budget {budget}"


def test_cli_writes_the_summary_and_the_plot(tmp_path):
    output = tmp_path / "cache_sim-test.json"
    cache_sim.main(["--traces", "agentic", "--sessions", "16", "--rounds", "2", "--budgets", "0.25",
                    "--ladders", "k8v8,k4v4,k2v2", "--fractions", "default", "--output", str(output)])
    result = json.loads(output.read_text())
    assert {"summary", "date", "versions", "command", "machine", "notes", "runs"} <= set(result)
    assert result["summary"]["ladder_over_fp8_saved_tokens"] is not None
    assert {"python", "torch", "sglang", "sglang_kvc"} <= set(result["versions"])
    assert (tmp_path / "cache_sim-test.png").stat().st_size > 0
