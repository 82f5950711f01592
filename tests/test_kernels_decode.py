"""Decode attention over mixed-precision pages against the float64 reference.

Tolerances are derived, not tuned: versus attention on the same (dequantized) cache the kernel
may differ by ``decode_ref.rounding_bound``; versus attention on the unquantized K/V additionally
by ``decode_ref.quantization_bound`` (from the codec's error bound). CPU: TRITON_INTERPRET=1 and
small shapes; GPU (TRITON_INTERPRET=0): the same tests at full size (head_dim 128, 32/8 heads).
Pools are ``kernels.testing.make_pool``'s: one arena, frames dealt out to the tiers in turn (plus
spare, poisoned frames), so every sequence's pages lie scattered over frames shared with other
tiers, each tier packing its own number of pages per frame.
"""

import math

import pytest
import torch

from sglang_kvc.kernels.decode import TieredDecodeWrapper, decode_attention
from sglang_kvc.kernels.decode_ref import decode_reference, per_sequence, quantization_bound, rounding_bound
from sglang_kvc.kernels.testing import (batch_indices, fill_tiers, full_size, kernel_test_device, make_pool,
                                        tier_runs_sequence, tier_slots)

DEVICE = kernel_test_device()
FULL = full_size()
KV_HEADS = 8 if FULL else 2
TOKENS = 8192 if FULL else 256
SCALE_LEN = 64 if FULL else 1  # lengths are multiplied by this at full size (page-boundary offsets kept)


def _lengths(page_size):
    """Ragged lengths: 1, on and just past page boundaries."""
    p = max(page_size, 16)
    return [1, p * SCALE_LEN, p * SCALE_LEN + 1, 2 * p * SCALE_LEN - 1]


def _check(out, q, pool, layer, indptr, indices, sm_scale, logit_cap=0.0):
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    ref = decode_reference(q, pool, layer, indptr, indices, sm_scale, logit_cap)
    err = (out.double().cpu() - ref).abs()
    for b, slots in enumerate(per_sequence(indptr.cpu(), indices.cpu())):
        bound = rounding_bound(q[b:b + 1], pool, layer, slots, sm_scale, logit_cap)[0]
        worst = float((err[b] / bound).max())
        assert worst <= 1.0, f"sequence {b} (len {len(slots)}): error {float(err[b].max()):.3g} exceeds the bound by {worst:.2f}x"


def _run(ladder, page_size, group, head_dim, tiers_of_seq, lengths, splits=None, logit_cap=0.0, seed=0,
         frame_pages=4, variant=None):
    pool = make_pool(ladder, head_dim, KV_HEADS, page_size, TOKENS, frame_pages=frame_pages)
    fill_tiers(pool, seed)
    gen = torch.Generator().manual_seed(seed)
    seqs = [tier_runs_sequence(pool, n, tiers_of_seq(b), gen, run_pages=1 if page_size > 1 else 5)
            for b, n in enumerate(lengths)]
    indptr, indices = batch_indices(seqs, DEVICE)
    q = torch.randn(len(lengths), KV_HEADS * group, head_dim, generator=gen).bfloat16().to(DEVICE)
    sm_scale = 1 / math.sqrt(head_dim)
    kwargs = {} if splits is None else {"num_splits": splits, "min_split_tokens": 16, "block_n": 16}
    if variant is not None:
        kwargs["variant"] = variant
    out = decode_attention(q, pool, 1, indptr, indices, sm_scale, logit_cap, **kwargs)
    _check(out, q, pool, 1, indptr, indices, sm_scale, logit_cap)
    return pool


SINGLE_TIER = [  # (ladder, page size, GQA ratio, head_dim); sequences use the last tier
    ("bf16", 16, 4, 64), ("k8v8", 1, 8, 64), ("k4v4", 16, 1, 64), ("k4v2", 1, 4, 64), ("k2v2", 16, 8, 64),
    ("k4v4", 16, 4, 128), ("k4v2", 16, 8, 128), ("k4v4-rot", 16, 4, 64), ("k8v8,k4v2-kc", 16, 4, 64),
    ("k8v8-g32", 1, 1, 64),
]


@pytest.mark.parametrize("ladder,page_size,group,head_dim", SINGLE_TIER)
def test_single_tier(ladder, page_size, group, head_dim):
    last = len(ladder.split(",")) - 1  # -kc cannot be a write tier: it sits below one
    _run(ladder, page_size, group, head_dim, lambda b: [last], _lengths(page_size))


VARIANT_CASES = [  # (variant, ladder, page size, GQA ratio, head_dim): every quantized width, -g32, -kc, rot
    ("f16", "k8v8", 1, 8, 64), ("f16", "k8v8", 16, 4, 128), ("f16", "k4v4", 16, 1, 64), ("f16", "k4v2", 1, 4, 64),
    ("f16", "k2v2", 16, 8, 64), ("f16", "k4v4-rot", 16, 4, 64), ("f16", "k8v8,k4v2-kc", 16, 4, 64),
    ("f16", "k8v8-g32", 1, 1, 64),
    ("dense", "k8v8", 1, 8, 64), ("dense", "k8v8", 16, 4, 128), ("dense", "k4v4", 16, 1, 64),
    ("dense", "k4v4", 16, 4, 128), ("dense", "k4v2", 1, 4, 64), ("dense", "k4v2", 16, 8, 128),
    ("dense", "k2v2", 16, 8, 64), ("dense", "k2v2", 1, 4, 128), ("dense", "k4v4-rot", 16, 4, 64),
    ("dense", "k8v8,k4v2-kc", 16, 4, 64), ("dense", "k4v4-g32", 1, 1, 64), ("dense", "k4v2-g128", 16, 4, 128),
    ("rows", "bf16", 16, 4, 64), ("rows", "k8v8", 1, 8, 64), ("rows", "k8v8", 16, 4, 128), ("rows", "k4v4", 16, 1, 64),
    ("rows", "k4v4", 16, 4, 128), ("rows", "k4v4", 1, 2, 64), ("rows", "k4v2", 1, 4, 64), ("rows", "k4v2", 16, 8, 128),
    ("rows", "k2v2", 16, 8, 64), ("rows", "k2v2", 1, 4, 128), ("rows", "k4v4-rot", 16, 4, 64),
    ("rows", "k4v4-g32", 1, 1, 64), ("rows", "k4v2-g128", 16, 4, 128), ("rows", "bf16", 1, 16, 64),
]


@pytest.mark.parametrize("variant,ladder,page_size,group,head_dim", VARIANT_CASES)
def test_variant_single_tier(variant, ladder, page_size, group, head_dim):
    """Opt-in kernel variants (``decode.VARIANTS``) against the same reference and bound."""
    last = len(ladder.split(",")) - 1
    _run(ladder, page_size, group, head_dim, lambda b: [last], _lengths(page_size), variant=variant)


@pytest.mark.parametrize("variant", ["f16", "dense", "rows"])
def test_variant_mixed_tiers_splits_and_logit_cap(variant):
    _run("bf16,k8v8,k4v4,k4v2,k2v2", 16, 4, 64, lambda b: [(b + i) % 5 for i in range(5)],
         _lengths(16) + [3 * 16 * SCALE_LEN + 5], variant=variant)
    _run("bf16,k8v8,k4v2", 1, 4, 64, lambda b: [2, 0, 1], [70, 33, 1], splits=3, logit_cap=5.0, variant=variant)


VARIANT_MIXED = [  # (variant, ladder, page size, GQA ratio, head_dim): mixed tiers inside each sequence
    ("f16", "k8v8,k4v4-kc,k4v2-g32-kc", 16, 4, 64),  # served at head_dim 64 (decode.served_variant)
    ("f16fma", "k8v8,k4v4-kc-rot,k4v2-g32-kc-rot", 16, 4, 64),
    ("f16fma", "bf16,k8v8,k4v2-g32-kc", 16, 8, 128),
    ("f16fma", "k8v8,k4v4-kc,k4v2-g32-kc", 16, 4, 128),  # served at head_dim 128 (decode.served_variant)
    ("f16fma", "k8v4-g32,k4v4-g32-kc", 16, 4, 128), ("f16", "k8v4-g32,k4v4-g32-kc", 16, 8, 64),  # 8/4-bit g32
    ("dense", "k8v8,k4v4-rot,k2v2-kc", 16, 4, 64), ("dense", "bf16,k8v8,k4v2", 1, 8, 128),
    ("rows", "bf16,k8v8,k4v4,k4v2,k2v2", 1, 8, 64), ("rows", "bf16,k8v8,k4v2", 16, 1, 128),
    ("rows", "k8v8,k4v4-rot,k2v2", 16, 4, 64), ("rows", "bf16,k4v4,k2v2", 1, 2, 128),
]


@pytest.mark.parametrize("variant,ladder,page_size,group,head_dim", VARIANT_MIXED)
def test_variant_mixed_ladders(variant, ladder, page_size, group, head_dim):
    num_tiers = len(ladder.split(","))
    orders = lambda b: [(b + i) % num_tiers for i in range(num_tiers)]  # noqa: E731
    _run(ladder, page_size, group, head_dim, orders, _lengths(page_size) + [3 * 16 * SCALE_LEN + 5], variant=variant)


@pytest.mark.parametrize("variant", [None, "f16", "f16fma"])
def test_per_channel_keys_adversarial(variant):
    """-kc keys (dequantized, then rounded: bf16, or fp16 with one fused multiply-add in ``f16``)
    on channels whose page holds one outlier token (zero far from most keys, so ``code * scale``
    and ``zero`` nearly cancel), channels of one repeated value (scale 0), zero channels and keys
    below fp16's normal range."""
    pool = make_pool("k8v8,k4v4-kc", 64, KV_HEADS, 16, TOKENS)
    fill_tiers(pool, 7)
    gen = torch.Generator().manual_seed(7)
    layer, tier = 1, 1
    slots = tier_slots(pool.layout, tier)
    k = torch.randn(len(slots), KV_HEADS, 64, generator=gen)
    pages = k.view(-1, 16, KV_HEADS, 64)
    pages[:, 3, :, 0:8] = -300.0  # one outlier token per page on channels 0-7
    pages[:, 5, :, 8:16] = 250.0
    pages[:, :, :, 16:24] = 1.5  # all-equal channels
    pages[:, :, :, 24:32] = 0.0
    pages[:, :, :, 32:40] *= 1e-6  # below 2^-14: fp16 subnormals
    dev = pool.tier_of_page.device
    pool.tiers[tier].k.write(layer, pool.local_slots(tier, slots).to(dev), k.bfloat16().float().to(dev))
    seqs = [tier_runs_sequence(pool, n, [tier, 0], gen) for n in (16, 40, 16 * 5 + 3)]
    indptr, indices = batch_indices(seqs, DEVICE)
    q = torch.randn(len(seqs), KV_HEADS * 4, 64, generator=gen).bfloat16().to(DEVICE)
    out = decode_attention(q, pool, layer, indptr, indices, 1 / 8, variant=variant)
    _check(out, q, pool, layer, indptr, indices, 1 / 8)


def test_rows_variant_refuses_per_channel_keys():
    pool = make_pool("k8v8,k4v2-kc", 64, KV_HEADS, 16, TOKENS)
    with pytest.raises(ValueError, match=r"variant='rows' does not read per-channel \(-kc\) tiers \(k4v2-kc\)"):
        TieredDecodeWrapper(pool, KV_HEADS * 4, variant="rows")


MIXED = [("bf16,k8v8,k4v4,k4v2,k2v2", 16, 4, 64), ("bf16,k8v8,k4v4,k4v2,k2v2", 1, 8, 64),
         ("bf16,k8v8,k4v2", 16, 1, 128), ("k8v8,k4v4-rot,k2v2-kc", 16, 4, 64)]


@pytest.mark.parametrize("ladder,page_size,group,head_dim", MIXED)
def test_mixed_tiers_inside_one_sequence(ladder, page_size, group, head_dim):
    num_tiers = len(ladder.split(","))
    orders = lambda b: [(b + i) % num_tiers for i in range(num_tiers)]  # noqa: E731
    _run(ladder, page_size, group, head_dim, orders, _lengths(page_size) + [3 * 16 * SCALE_LEN + 5])


@pytest.mark.parametrize("ladder,page_size,frame_pages", [("bf16,k4v4,k2v2-kc", 16, 1), ("bf16,k4v4,k2v2", 1, 3),
                                                          ("k8v8,k4v4-rot,k2v2", 16, 5)])
def test_other_frame_sizes(ladder, page_size, frame_pages):
    """Frames of 1, 3 and 5 bf16 pages: one page per frame for bf16, odd pages-per-frame counts."""
    orders = lambda b: [(b + i) % 3 for i in range(3)]  # noqa: E731
    pool = _run(ladder, page_size, 4, 64, orders, [16 * SCALE_LEN + 3, 2 * 16 * SCALE_LEN], frame_pages=frame_pages)
    assert len(set(pool.layout.pages_per_frame)) == 3


def test_splits_crossing_tier_boundaries_and_logit_cap():
    _run("bf16,k8v8,k4v2", 1, 4, 64, lambda b: [2, 0, 1], [70, 33, 1], splits=3, logit_cap=5.0)


def test_more_fixed_splits_than_planned_ones():
    """A fixed split count above MAX_SPLITS: the reduce merges every split that holds tokens."""
    from sglang_kvc.kernels.decode import MAX_SPLITS

    splits = MAX_SPLITS + 16
    pool = make_pool("k8v8", 64, KV_HEADS, 16, 16 * (splits + 8))
    fill_tiers(pool, 9)
    gen = torch.Generator().manual_seed(9)
    seqs = [tier_runs_sequence(pool, 16 * splits - 5, [0], gen)]
    indptr, indices = batch_indices(seqs, DEVICE)
    q = torch.randn(1, KV_HEADS * 4, 64, generator=gen).bfloat16().to(DEVICE)
    out = decode_attention(q, pool, 1, indptr, indices, 1 / 8, num_splits=splits, min_split_tokens=16, block_n=16)
    _check(out, q, pool, 1, indptr, indices, 1 / 8)


def _plan_addresses(wrapper):
    return [t.data_ptr() for t in (wrapper.segments.local_slots, wrapper.segments.seg_start,
                                   wrapper.segments.seg_len, *wrapper._mid)]


def test_plan_once_run_every_layer_and_reuse_output():
    pool = make_pool("bf16,k4v2", 64, KV_HEADS, 16, TOKENS)
    fill_tiers(pool, 4)
    gen = torch.Generator().manual_seed(4)
    seqs = [tier_runs_sequence(pool, n, [0, 1], gen) for n in (17, 40)]
    indptr, indices = batch_indices(seqs, DEVICE)
    q = torch.randn(2, KV_HEADS * 4, 64, generator=gen).bfloat16().to(DEVICE)
    wrapper = TieredDecodeWrapper(pool, KV_HEADS * 4)
    wrapper.reserve(max_batch=4, max_tokens=128)
    wrapper.plan(indptr, indices)
    out = torch.full((2, KV_HEADS * 4, 64), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    for layer in (0, 1):
        assert wrapper.run(q, pool, layer, out=out) is out
        _check(out, q, pool, layer, indptr, indices, 1 / 8)
    addresses = _plan_addresses(wrapper)
    # a plan of another batch size in between, then one of a larger (eager) batch than reserved
    wrapper.plan(*batch_indices([tier_runs_sequence(pool, 5, [0], gen)] * 3, DEVICE))
    big = [tier_runs_sequence(pool, 30, [1, 0], gen) for _ in range(6)]
    wrapper.plan(*batch_indices(big, DEVICE))
    assert not set(_plan_addresses(wrapper)) & set(addresses)
    # a new plan for the same batch size, other tier mix: every buffer address is the one a CUDA
    # graph would have captured, and the kernels read the new plan
    seqs = [tier_runs_sequence(pool, n, [1, 0], gen) for n in (33, 9)]
    indptr, indices = batch_indices(seqs, DEVICE)
    wrapper.plan(indptr, indices)
    assert addresses == _plan_addresses(wrapper)
    _check(wrapper.run(q, pool, 1, out=out), q, pool, 1, indptr, indices, 1 / 8)


@pytest.mark.parametrize("tier,variant", [(t, None) for t in ("bf16", "k8v8", "k4v4", "k4v2", "k2v2", "k4v4-rot")]
                         + [("k8v8", "f16"), ("k4v2", "f16"), ("k4v4", "dense"), ("k2v2", "dense"), ("k4v4", "rows"),
                            ("k4v2", "rows"), ("k8v8", "rows")])
def test_error_vs_unquantized_attention_per_tier(tier, variant):
    """Attention on the quantized cache stays within the documented error of attention on the
    original bf16 K/V (quantization bound + rounding bound)."""
    pool = make_pool(tier, 128 if FULL else 64, KV_HEADS, 16, TOKENS)
    written = fill_tiers(pool, 5)
    codec = pool.layout.codecs[0]
    gen = torch.Generator().manual_seed(5)
    length = 48 * SCALE_LEN
    slots, k_true, v_true = written[(0, 1)]
    picked = torch.randperm(len(slots), generator=gen)[:length]
    seq, k_true, v_true = slots[picked], k_true[picked], v_true[picked]
    indptr, indices = batch_indices([seq], DEVICE)
    q = torch.randn(1, KV_HEADS * 4, pool.head_dim, generator=gen).bfloat16().to(DEVICE)
    sm_scale = 1 / math.sqrt(pool.head_dim)
    out = decode_attention(q, pool, 1, indptr, indices, sm_scale, variant=variant)
    exact = decode_reference_on(q, k_true, v_true, sm_scale)
    k_err = codec.k.error_bound(k_true) if codec.k.bits < 16 else torch.zeros_like(k_true)
    v_err = codec.v.error_bound(v_true) if codec.v.bits < 16 else torch.zeros_like(v_true)
    rotated = torch.full((length,), codec.k.rotate)
    bound = quantization_bound(q, k_true, v_true, k_err, v_err, rotated, sm_scale)[0]
    bound = bound + rounding_bound(q, pool, 1, seq, sm_scale)[0]
    err = (out[0].double().cpu() - exact).abs()
    assert bool((err <= bound).all()), f"tier {codec.name}: {float((err / bound).max()):.2f}x the bound"


def decode_reference_on(q, k, v, sm_scale):
    from sglang_kvc.kernels.decode_ref import _attend

    return _attend(q.double().cpu(), k.double(), v.double(), sm_scale, 0.0)[0][0]


def test_wrapper_errors_name_the_fix():
    pool = make_pool("bf16,k4v4", 64, KV_HEADS, 16, TOKENS)
    wrapper = TieredDecodeWrapper(pool, KV_HEADS * 4)
    q = torch.zeros(1, KV_HEADS * 4, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(RuntimeError, match="call plan"):
        wrapper.run(q, pool, 0)
    indptr, indices = batch_indices([torch.arange(16, 32)], DEVICE)
    with pytest.raises(TypeError, match="kv_indices must have dtype"):
        wrapper.plan(indptr, indices.float())
    wrapper.plan(indptr, indices)
    with pytest.raises(ValueError, match=r"the plan expects \(1, %d, 64\)" % (KV_HEADS * 4)):
        wrapper.run(q[:, :4], pool, 0)
    with pytest.raises(TypeError, match="q must have dtype"):
        wrapper.run(q.to(torch.int32), pool, 0)
    with pytest.raises(ValueError, match="outside this pool's layers"):
        wrapper.run(q, pool, 7)
    with pytest.raises(ValueError, match="not a multiple"):
        TieredDecodeWrapper(pool, KV_HEADS * 4 + 1)
    with pytest.raises(ValueError, match="choose None or one of f16, f16fma, dense, rows"):
        TieredDecodeWrapper(pool, KV_HEADS * 4, variant="fp8")


def test_planning_from_request_rows_equals_the_index_list_plan():
    """``plan_requests`` (one kernel over SGLang's req_to_token rows) gives the tier-sorted plan
    that ``plan`` builds from a kv index list, token for token, and the same attention."""
    pool = make_pool("bf16,k8v8,k4v2", 64, KV_HEADS, 16, TOKENS)
    fill_tiers(pool, 6)
    gen = torch.Generator().manual_seed(6)
    lengths = [37, 300, 1] if not FULL else [37, 3000, 1, 700]
    seqs = [tier_runs_sequence(pool, n, [2, 0, 1], gen) for n in lengths]
    req_to_token = torch.zeros(len(seqs) + 2, max(lengths) + 5, dtype=torch.int32)
    rows = [len(seqs) + 1 - b for b in range(len(seqs))]  # rows out of order
    for row, seq in zip(rows, seqs):
        req_to_token[row, : len(seq)] = seq
    req_to_token = req_to_token.to(DEVICE)
    req_idx = torch.tensor(rows, device=DEVICE)
    seq_lens = torch.tensor(lengths, device=DEVICE)
    indptr, indices = batch_indices(seqs, DEVICE)
    listed = TieredDecodeWrapper(pool, KV_HEADS * 4)
    listed.plan(indptr, indices)
    direct = TieredDecodeWrapper(pool, KV_HEADS * 4)
    direct.reserve(max_batch=8, max_tokens=sum(lengths) + 64)
    direct.plan_requests(req_to_token, req_idx, seq_lens, sum(lengths), len(seqs))
    total = sum(lengths)
    assert torch.equal(direct.segments.local_slots[:total].cpu(), listed.segments.local_slots[:total].cpu())
    assert torch.equal(direct.segments.seg_start.cpu(), listed.segments.seg_start.cpu())
    assert torch.equal(direct.segments.seg_len.cpu(), listed.segments.seg_len.cpu())
    q = torch.randn(len(seqs), KV_HEADS * 4, 64, generator=gen).bfloat16().to(DEVICE)
    _check(direct.run(q, pool, 0), q, pool, 0, indptr, indices, 1 / 8)


def test_served_variant_by_head_dim():
    """The server reads -kc keys by fp16 FMA from head_dim 128 on, where the H200 timed it faster at
    B=8 and B=32; at head_dim 64 it was slower at B=8 (decode.served_variant)."""
    from sglang_kvc.kernels.decode import VARIANTS, served_variant

    assert served_variant(64) == "f16" and served_variant(128) == served_variant(256) == "f16fma"
    assert {served_variant(64), served_variant(128)} <= set(VARIANTS)


def test_launch_config_by_tier_count_and_head_dim():
    """Several tiers take the two-warp configuration only from head_dim 128 (H200 decode matrix)."""
    from sglang_kvc.kernels.decode import MULTI_TIER_CONFIG, SINGLE_TIER_CONFIG, config_for

    assert config_for(1, 128) == SINGLE_TIER_CONFIG and config_for(3, 64) == SINGLE_TIER_CONFIG
    assert config_for(3, 128) == MULTI_TIER_CONFIG
    pool = make_pool("k8v8,k4v4-kc-rot,k4v2-g32-kc-rot", 64, KV_HEADS, 16, TOKENS)
    wrapper = TieredDecodeWrapper(pool, KV_HEADS * 4)
    assert (wrapper.num_warps, wrapper.block_n) == (SINGLE_TIER_CONFIG["num_warps"], SINGLE_TIER_CONFIG["block_n"])
