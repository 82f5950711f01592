"""benchmarks/extend_bench.py's served decode batch, built on the CPU (the timing itself is GPU-only)."""

import pytest
import torch

import benchmarks.kernels as kernel_bench
from benchmarks import extend_bench
from sglang_kvc.kernels.spec import KernelSupportError
from sglang_kvc.kernels.decode import served_variant
from sglang_kvc.tiers import LADDER_PRESETS


def test_served_plan_spreads_each_sequence_over_the_tiers_oldest_lowest(monkeypatch):
    monkeypatch.setattr(kernel_bench, "DEVICE", "cpu")
    monkeypatch.setattr(kernel_bench, "HKV", 2)
    monkeypatch.setattr(kernel_bench, "D", 64)
    batch, ctx = 2, 320  # 20 pages a sequence: 2 in the write tier, 6 in the middle, 12 in the last
    kv_indptr = torch.arange(0, batch * ctx + 1, ctx, dtype=torch.int32)
    pool, wrapper = extend_bench.served_plan(LADDER_PRESETS["aggressive"], 8, batch, ctx, kv_indptr,
                                             torch.Generator().manual_seed(0))
    assert wrapper.variant == served_variant(64) == "f16"  # the kernel the server runs at head_dim 64
    seg_len = wrapper.segments.seg_len[:batch]
    assert seg_len.tolist() == [[2 * 16, 6 * 16, 12 * 16]] * batch
    q = torch.randn(batch, 8, 64).bfloat16()
    out = wrapper.run(q, pool, 0).float()
    assert out.shape == (batch, 8, 64) and torch.isfinite(out).all()


def test_served_plan_times_the_named_variant_and_rows_refuses_per_channel_tiers(monkeypatch):
    monkeypatch.setattr(kernel_bench, "DEVICE", "cpu")
    monkeypatch.setattr(kernel_bench, "HKV", 2)
    monkeypatch.setattr(kernel_bench, "D", 64)
    batch, ctx = 1, 64
    kv_indptr = torch.arange(0, batch * ctx + 1, ctx, dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    _, dense = extend_bench.served_plan(LADDER_PRESETS["aggressive"], 8, batch, ctx, kv_indptr, gen, "dense")
    assert dense.variant == "dense"
    _, default = extend_bench.served_plan(LADDER_PRESETS["aggressive"], 8, batch, ctx, kv_indptr, gen, "default")
    assert default.variant is None
    _, configured = extend_bench.served_plan(LADDER_PRESETS["aggressive"], 8, batch, ctx, kv_indptr, gen,
                                             block_n=32, num_warps=4)
    assert (configured.block_n, configured.num_warps) == (32, 4)
    with pytest.raises(KernelSupportError, match="per-channel"):
        extend_bench.served_plan(LADDER_PRESETS["aggressive"], 8, batch, ctx, kv_indptr, gen, "rows")
