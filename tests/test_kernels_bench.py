"""benchmarks/kernels.py's shape sweep (issue 13) on the CPU under the interpreter: the grid, one JSON
row per shape with the summary's ratios, and the plot (the timing itself means something on a GPU)."""

import json
import math

import torch

import benchmarks.kernels as kernel_bench

ROW_KEYS = {"head_dim", "group", "page_size", "batch", "context", "label", "q_heads", "kv_heads", "ms",
            "ms_rounds", "max_abs_err_vs_ref", "errors", "mixed_ideal_ms", *kernel_bench.RATIOS}


def test_the_grid_is_issue_13s_24_shapes_with_distinct_labels():
    shapes = kernel_bench.sweep_shapes(smoke=False)
    assert len(shapes) == 24 and len({s.label for s in shapes}) == 24
    assert {(s.batch, s.context) for s in shapes} == {(1, 32768), (64, 4096)}
    assert {s.group for s in shapes} == {1, 4, 8} and {s.page_size for s in shapes} == {1, 16}
    assert shapes[0].label == "d64 g1 p1 1x32K"


def test_smoke_sweep_writes_one_row_per_shape_with_the_summary_ratios(monkeypatch, tmp_path):
    monkeypatch.setattr(kernel_bench, "DEVICE", "cpu")
    monkeypatch.setattr(kernel_bench, "HKV", 2)
    monkeypatch.setattr(kernel_bench, "MIXED_RUN_TOKENS", 16)  # contexts of 64 tokens still mix every tier
    shapes = kernel_bench.sweep_shapes(smoke=True)
    saved = []
    sweep = kernel_bench.shape_sweep(shapes, "served", lambda s: saved.append(len(s["shapes"])))
    assert saved == list(range(1, len(shapes) + 1))  # written after every row
    sweep = json.loads(json.dumps(sweep))  # what the JSON holds
    assert sweep["targets"] == {"k8v8_over_fi_fp8": 0.85, "k4v4_over_fi_bf16": 0.30, "k4v2_over_fi_bf16": 0.23,
                                "mixed_over_ideal": 1.10}
    assert [r["label"] for r in sweep["shapes"]] == [s.label for s in shapes]
    for row, shape in zip(sweep["shapes"], shapes):
        assert set(row) == ROW_KEYS and row["errors"] == {}
        assert row["q_heads"] == shape.group * 2
        assert set(row["ms"]) == {f"ours_{name}" for name in kernel_bench.TIERS + ["mixed"]}  # no baselines
        assert all(err < 0.1 for err in row["max_abs_err_vs_ref"].values())
        assert row["k8v8_over_fi_fp8"] is None and row["k4v2_over_fi_bf16"] is None
        assert math.isfinite(row["mixed_over_ideal"]) and row["mixed_ideal_ms"] > 0
    assert (kernel_bench.HQ, kernel_bench.D, kernel_bench.PAGE) == (32, 128, 16)  # the main shape is back
    path = tmp_path / "sweep.png"
    kernel_bench.plot_sweep({"device": "cpu", "sweep": sweep}, str(path))
    assert path.stat().st_size > 0


def test_kernel_variant_served_is_the_servers_kernel_at_each_head_dim(monkeypatch):
    from sglang_kvc.kernels.decode import served_variant

    assert kernel_bench.kernel_variant("served", 64) == served_variant(64) == "f16"
    assert kernel_bench.kernel_variant("served", 128) == served_variant(128) == "f16fma"
    assert kernel_bench.kernel_variant("default", 128) is None and kernel_bench.kernel_variant(None, 64) is None
    assert kernel_bench.kernel_variant("rows", 128) == "rows"
    seen = []
    monkeypatch.setattr(kernel_bench, "DEVICE", "cpu")
    monkeypatch.setattr(kernel_bench, "time_ours", lambda pool, pages, q, config, **k: seen.append(config) or
                        {"ms": 1.0})
    shape = kernel_bench.sweep_shapes(smoke=True)[0]
    with kernel_bench.sweep_globals(shape):
        pools, _ = kernel_bench.sweep_pools([shape])
        kernel_bench.time_shape(shape, pools, {}, "served")
    assert seen and all(config == {"variant": served_variant(shape.head_dim)} for config in seen)


def test_a_failed_cell_is_recorded_and_the_row_goes_on(monkeypatch):
    monkeypatch.setattr(kernel_bench, "DEVICE", "cpu")
    monkeypatch.setattr(kernel_bench, "HKV", 2)

    def time_ours(pool, pages, q, config, **check):
        if pool.layout.codecs[0].name == "k4v4":
            raise RuntimeError("out of registers")
        return {"ms": 1.0, "max_abs_err_vs_ref": 0.0}

    class FlashInfer:
        def __init__(self, fails):
            self.fails, self.cache = fails, torch.empty(64)

        def time(self, pages, q, tensor_cores):
            if self.fails:
                raise RuntimeError("JIT failed")
            return {"ms": 2.0}

    monkeypatch.setattr(kernel_bench, "time_ours", time_ours)
    shape = kernel_bench.SweepShape(64, 4, 16, 1, 64)
    with kernel_bench.sweep_globals(shape):
        pools, _ = kernel_bench.sweep_pools([shape])
        row = kernel_bench.time_shape(shape, pools, {"bf16": FlashInfer(False), "fp8": FlashInfer(True)}, None)
    assert set(row["errors"]) == {"ours_k4v4", "flashinfer_fp8"} and "out of registers" in row["errors"]["ours_k4v4"]
    assert row["ms"]["ours_k4v2"] == 1.0 and row["ms"]["flashinfer_bf16"] == 2.0
    assert row["k4v2_over_fi_bf16"] == 0.5
    assert row["k4v4_over_fi_bf16"] is None and row["k8v8_over_fi_fp8"] is None
    assert row["mixed_over_ideal"] is None  # its ideal needs every tier's time


def test_a_compile_job_launches_our_decode_once_on_a_small_pool_of_the_shape(monkeypatch):
    monkeypatch.setattr(kernel_bench, "DEVICE", "cpu")
    monkeypatch.setattr(kernel_bench, "HKV", 2)
    shape = kernel_bench.SweepShape(64, 4, 16, 2, 4096)  # the context does not matter, the batch does
    assert kernel_bench._compile_sweep_job((shape, "k4v4", None)) is None
    assert "k9v9" in kernel_bench._compile_sweep_job((shape, "k9v9", None))  # reported, not raised


def test_rounds_interleave_every_kernel_and_report_the_median(monkeypatch):
    monkeypatch.setattr(kernel_bench, "DEVICE", "cpu")
    monkeypatch.setattr(kernel_bench, "HKV", 2)
    monkeypatch.setattr(kernel_bench, "MIXED_RUN_TOKENS", 16)
    calls = []

    def fake_time_ours(pool, pages, q, config, check=False, check_seqs=2):
        calls.append(check)
        # the second pass is the slow one (a transient), whichever kernel it hits
        return {"ms": 9.0 if len(calls) in range(1 + len(kernel_bench.TIERS) + 1, 2 * (len(kernel_bench.TIERS) + 1) + 1)
                else 1.0 + 0.01 * len(calls), **({"max_abs_err_vs_ref": 0.0} if check else {})}

    monkeypatch.setattr(kernel_bench, "time_ours", fake_time_ours)
    shape = kernel_bench.sweep_shapes(smoke=True)[0]
    with kernel_bench.sweep_globals(shape):
        pools, _ = kernel_bench.sweep_pools([shape])
        row = kernel_bench.time_shape(shape, pools, {}, "served", rounds=3)
    cells = len(kernel_bench.TIERS) + 1
    assert len(calls) == 3 * cells and calls[:cells] == [True] * cells and not any(calls[cells:])  # checked once
    assert all(len(times) == 3 and max(times) == 9.0 for times in row["ms_rounds"].values())
    assert all(ms < 2.0 for ms in row["ms"].values())  # the median leaves the slow pass out
    assert kernel_bench.round_spread(row) > 4.0 and set(row["max_abs_err_vs_ref"]) == set(row["ms"])
