"""Dequantize-to-bf16 (what extend reads) against the pool's reference reads, every tier kind."""

import pytest
import torch

from sglang_kvc.kernels.dequant import DequantPlan
from sglang_kvc.kernels.testing import fill_tiers, full_size, kernel_test_device, make_pool, tier_runs_sequence

DEVICE = kernel_test_device()
FULL = full_size()
KV_HEADS = 8 if FULL else 2
TOKENS = 8192 if FULL else 256


@pytest.mark.parametrize("ladder,page_size,head_dim", [
    ("bf16,k8v8,k4v4,k4v2,k2v2", 16, 64),
    ("k8v8,k4v4-rot,k2v2-kc", 16, 64),
    ("bf16,k8v8,k4v2", 1, 128),
])
def test_dequantized_tokens_match_the_reference_in_any_order(ladder, page_size, head_dim):
    pool = make_pool(ladder, head_dim, KV_HEADS, page_size, TOKENS)
    fill_tiers(pool, 3)
    gen = torch.Generator().manual_seed(3)
    tiers = list(range(pool.layout.num_tiers))
    slots = tier_runs_sequence(pool, 48 * (16 if FULL else 1), tiers[::-1] + tiers, gen)
    slots = torch.cat([slots, slots[:16]])  # a prefix shared by two sequences is read twice
    plan = DequantPlan(pool)
    plan.plan(slots.to(DEVICE))
    k, v = plan.run(1)
    ref_k, ref_v = pool.read_tokens(1, slots.to(DEVICE))
    assert k.dtype == torch.bfloat16 and k.shape == ref_k.shape and v.shape == ref_v.shape
    # bf16 rounding of the reference value (plus the basis change's fp32 summation order)
    for got, ref in ((k, ref_k), (v, ref_v)):
        err = (got.float().cpu() - ref.cpu()).abs()
        assert bool((err <= ref.abs().cpu() * 2 ** -8 + 1e-3).all()), float(err.max())


def test_plan_is_required_and_empty_batches_are_fine():
    pool = make_pool("bf16,k4v4", 64, KV_HEADS, 16, TOKENS)
    plan = DequantPlan(pool)
    with pytest.raises(RuntimeError, match="plan"):
        plan.run(0)
    plan.plan(torch.zeros(0, dtype=torch.int64, device=DEVICE))
    k, v = plan.run(0)
    assert k.shape == (0, KV_HEADS, 64)
