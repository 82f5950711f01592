"""Extend attention (in-flight bf16 tokens, causal, over a mixed-tier cached prefix) against the
float64 reference, within ``decode_ref.rounding_bound`` (CPU interpreter small / GPU full size)."""

import math

import pytest
import torch

from sglang_kvc.kernels.decode_ref import rounding_bound
from sglang_kvc.kernels.extend import TieredExtendWrapper, extend_attention_fwd, extend_mask, extend_reference
from sglang_kvc.kernels.testing import (batch_indices, fill_tiers, full_size, kernel_test_device, make_pool,
                                        tier_runs_sequence)

DEVICE = kernel_test_device()
FULL = full_size()
KV_HEADS = 8 if FULL else 2
TOKENS = 8192 if FULL else 256
SCALE = 16 if FULL else 1

CASES = [  # ladder, page size, GQA ratio, head_dim, prefix lengths, extend lengths
    ("bf16,k8v8,k4v4,k4v2,k2v2", 16, 4, 64, [0, 20, 33], [5, 1, 19]),
    ("bf16,k8v8,k4v2", 1, 8, 64, [17, 1], [16, 17]),
    ("k8v8,k4v4-rot,k2v2-kc", 16, 1, 64, [48], [33]),
    ("bf16,k4v4", 16, 4, 128, [16, 0], [1, 2]),
]


@pytest.mark.parametrize("ladder,page_size,group,head_dim,prefixes,extends", CASES)
def test_extend_over_mixed_prefix(ladder, page_size, group, head_dim, prefixes, extends):
    pool = make_pool(ladder, head_dim, KV_HEADS, page_size, TOKENS)
    fill_tiers(pool, 7)
    gen = torch.Generator().manual_seed(7)
    num_tiers = pool.layout.num_tiers
    prefixes = [n * SCALE for n in prefixes]
    extends = [n * SCALE if n > 1 else n for n in extends]
    seqs = [tier_runs_sequence(pool, n, [(b + i) % num_tiers for i in range(num_tiers)], gen,
                               run_pages=1 if page_size > 1 else 4) for b, n in enumerate(prefixes)]
    kv_indptr, kv_indices = batch_indices(seqs, DEVICE)
    qo_indptr = torch.tensor([0] + torch.tensor(extends).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    n = sum(extends)
    hq = KV_HEADS * group
    q = torch.randn(n, hq, head_dim, generator=gen).bfloat16().to(DEVICE)
    k = torch.randn(n, KV_HEADS, head_dim, generator=gen).bfloat16().to(DEVICE)
    v = torch.randn(n, KV_HEADS, head_dim, generator=gen).bfloat16().to(DEVICE)
    sm_scale = 1 / math.sqrt(head_dim)
    out = torch.full((n, hq, head_dim), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    extend_attention_fwd(q, k, v, out, pool, 1, qo_indptr, kv_indptr, kv_indices, max(extends), sm_scale)
    assert torch.isfinite(out).all()
    ref = extend_reference(q, k, v, pool, 1, qo_indptr.cpu(), kv_indptr.cpu(), kv_indices.cpu(), sm_scale)
    for b in range(len(extends)):
        q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        bound = rounding_bound(q[q0:q1], pool, 1, seqs[b], sm_scale, mask=extend_mask(len(seqs[b]), q1 - q0),
                               extra_k=k[q0:q1], extra_v=v[q0:q1])
        err = (out[q0:q1].double().cpu() - ref[q0:q1]).abs()
        assert bool((err <= bound).all()), f"sequence {b}: {float((err / bound).max()):.2f}x the bound"


def test_extend_errors_name_the_fix():
    pool = make_pool("bf16,k4v4", 64, KV_HEADS, 16, TOKENS)
    wrapper = TieredExtendWrapper(pool, KV_HEADS * 2)
    q = torch.zeros(3, KV_HEADS * 2, 64, dtype=torch.bfloat16, device=DEVICE)
    k = torch.zeros(3, KV_HEADS, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(RuntimeError, match="call plan"):
        wrapper.run(q, k, k, pool, 0)
    qo = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)
    kv_indptr, kv_indices = batch_indices([torch.arange(16, 20)], DEVICE)
    with pytest.raises(ValueError, match="both must be"):
        wrapper.plan(qo[:1], kv_indptr, kv_indices)
    wrapper.plan(qo, kv_indptr, kv_indices, 3)
    with pytest.raises(ValueError, match="k_extend has shape"):
        wrapper.run(q, k[:, :1], k, pool, 0)
