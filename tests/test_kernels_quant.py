"""Quantize-on-write, requantize and TritonKVOps against the torch reference (CPU: TRITON_INTERPRET=1,
small shapes; on a GPU with TRITON_INTERPRET=0 the same tests run at full size).

The reference always runs on the CPU: its IEEE float32 arithmetic is the contract (PyTorch's CUDA
division by a scalar multiplies by the reciprocal, so a CUDA-run reference can round differently).
"""

import pytest
import torch

from sglang_kvc.codec import group_error_bound
from sglang_kvc.kernels.ops import TritonKVOps
from sglang_kvc.kernels.quantize import quantize_write
from sglang_kvc.kernels.requantize import requantize_pages
from sglang_kvc.kernels.spec import KernelSupportError
from sglang_kvc.kernels.testing import full_size, kernel_test_device, make_pool
from sglang_kvc.pool import ReferenceKVOps
from tests.sglang_parts import FakeLayer

DEVICE = kernel_test_device()
FULL = full_size()
HEAD_DIM = 128 if FULL else 64
HEADS = 8 if FULL else 2
TOKENS = 4096 if FULL else 64


def _pools(ladder, page_size, layers=2, head_dim=HEAD_DIM):
    """(reference pool on the CPU, Triton pool on the test device)."""
    return [make_pool(ladder, head_dim, HEADS, page_size, TOKENS, layers=layers, device=device, ops=ops)
            for device, ops in (("cpu", ReferenceKVOps()), (DEVICE, TritonKVOps()))]


def _on(pool, tensor):
    return tensor.to(pool.tier_of_page.device)


def _adversarial(tokens, dim, gen):
    """Random rows plus outliers, all-equal rows, zero rows and a tiny-range row."""
    x = torch.randn(tokens, HEADS, dim, generator=gen) * 2
    x[0] = 0.0
    x[1] = 3.25
    x[2, :, 5] = 900.0
    x[3] = 1.0 + torch.arange(dim) * 1e-3
    x[4, 0] = -7.0
    return x.bfloat16()


def _rotation_slack(x):
    """Bound on the float32 rounding of ``x @ hadamard(D)`` per row, for any summation order:
    ``(D + 2) * 2^-24 * sum_d |x_d| |R_dj| = (D + 2) * 2^-24 * ||x||_1 / sqrt(D)``, as ``[N, H, 1]``."""
    x = x.double().cpu()
    dim = x.shape[-1]
    return ((dim + 2) * 2.0 ** -24 * x.abs().sum(-1, keepdim=True) / dim ** 0.5).float()


def _assert_sides_match(ref_pool, pool, tier, exact, slots=None, key_inputs=None):
    """Bit equality, or (rotated keys) decoded values within both group bounds plus the rotation's
    rounding; key_inputs: the keys (original basis) that were rotated, in ``slots`` order."""
    for side_name in ("k", "v"):
        ref_side, side = getattr(ref_pool.tiers[tier], side_name), getattr(pool.tiers[tier], side_name)
        side = type(side)(side.codec, side.data.cpu(), None if side.meta is None else side.meta.cpu())
        slots = None if slots is None else slots.cpu()
        if exact or not side.codec.rotate:
            assert torch.equal(ref_side.data, side.data), f"tier {tier} {side_name} data differs"
            if ref_side.meta is not None:
                assert torch.equal(ref_side.meta, side.meta), f"tier {tier} {side_name} meta differs"
            continue
        codec = side.codec
        for layer in range(pool.layer_num):
            ref_vals = ref_side.read(layer, slots, stored_basis=True)
            vals = side.read(layer, slots, stored_basis=True)
            # both quantized the same rotated values up to float32 summation order, each within
            # its own group bound: |kernel - ref| <= bound(ref meta) + bound(kernel meta)
            # + twice the rotation's rounding bound
            bounds = [group_error_bound(buf.meta[layer, buf.meta_rows(slots)], codec.bits)
                      .repeat_interleave(codec.group_size, -1) for buf in (ref_side, side)]
            rotated = key_inputs[layer] if isinstance(key_inputs[layer], tuple) else (key_inputs[layer],)
            limit = bounds[0] + bounds[1] + 2 * sum(_rotation_slack(x) for x in rotated)
            assert bool(((vals - ref_vals).abs() <= limit).all())


@pytest.mark.parametrize("ladder", ["bf16", "k8v8", "k4v4", "k4v2", "k2v2", "k8v8-g32", "k4v4-rot", "k2v2-g16-rot"])
def test_write_matches_reference(ladder):
    gen = torch.Generator().manual_seed(1)
    pools = _pools(ladder, page_size=1)
    slots = torch.randperm(TOKENS, generator=gen)[: TOKENS // 2 + 3]
    keys = []
    for layer in range(2):
        k = _adversarial(len(slots), HEAD_DIM, gen)
        v = _adversarial(len(slots), HEAD_DIM, gen)
        keys.append(k)
        for pool in pools:
            pool.set_kv_buffer(FakeLayer(layer), _on(pool, slots), _on(pool, k), _on(pool, v))
    _assert_sides_match(*pools, tier=0, exact=False, slots=slots, key_inputs=keys)


def test_write_accepts_fp32_and_strided_inputs():
    pools = _pools("k4v2", page_size=1)
    slots = torch.arange(1, 9)
    k = torch.randn(8, HEADS, 2 * HEAD_DIM)[..., :HEAD_DIM]  # strided view, fp32
    v = torch.randn(8, HEADS, HEAD_DIM)
    for pool in pools:
        pool.ops.write(pool, 0, 1, _on(pool, slots), _on(pool, k), _on(pool, v))
    _assert_sides_match(*pools, tier=0, exact=True)


REQUANT_CASES = [
    ("bf16,k8v8", 16, 0, 1), ("k8v8,k4v4", 1, 0, 1), ("k4v4,k2v2", 16, 0, 1), ("bf16,k8v8,k4v2", 1, 0, 2),
    ("k8v8,k4v2-kc", 16, 0, 1), ("k8v8,k4v4-kc,k2v2", 16, 1, 2), ("k8v8-rot,k4v4", 16, 0, 1),
    ("bf16,k4v4-rot", 1, 0, 1), ("k8v8-rot,k4v2-rot", 16, 0, 1),
]


@pytest.mark.parametrize("ladder,page_size,src,dst", REQUANT_CASES)
def test_requantize_matches_reference(ladder, page_size, src, dst):
    gen = torch.Generator().manual_seed(2)
    pools = _pools(ladder, page_size)
    n_pages = TOKENS // page_size
    ref_pool, pool = pools
    for t in range(ref_pool.layout.num_tiers):  # reference quantization on the CPU, copied over
        gen_t = torch.Generator().manual_seed(10 + t)
        slots = torch.arange(n_pages * page_size)
        for layer in range(ref_pool.layer_num):
            k = _adversarial(len(slots), HEAD_DIM, gen_t).float()
            v = _adversarial(len(slots), HEAD_DIM, gen_t).float()
            ReferenceKVOps().write(ref_pool, t, layer, slots, k, v)
        for side_name in ("k", "v"):
            ref_side, side = getattr(ref_pool.tiers[t], side_name), getattr(pool.tiers[t], side_name)
            side.data.copy_(ref_side.data)
            if side.meta is not None:
                side.meta.copy_(ref_side.meta)
    moved = max(1, n_pages // 3)
    src_pages = torch.randperm(n_pages, generator=gen)[:moved]
    dst_pages = torch.randperm(n_pages, generator=gen)[:moved]
    src_slots = ref_pool.pages_to_slots(src_pages)
    # what a move may rotate (either direction): the source keys in both bases
    src_keys = [(ref_pool.tiers[src].k.read(layer, src_slots),
                 ref_pool.tiers[src].k.read(layer, src_slots, stored_basis=True))
                for layer in range(ref_pool.layer_num)]
    for p in pools:
        p.ops.requantize(p, src, _on(p, src_pages), dst, _on(p, dst_pages))
    dst_slots = ref_pool.pages_to_slots(dst_pages)
    _assert_sides_match(*pools, tier=dst, exact=False, slots=dst_slots, key_inputs=src_keys)
    _assert_sides_match(*pools, tier=src, exact=True)  # the source is untouched


@pytest.mark.parametrize("page_size", [1, 4])
def test_pool_with_triton_ops_equals_reference_through_demotion(page_size):
    from sglang_kvc.allocator import make_tiered_allocator

    pools = _pools("bf16,k8v8,k4v2", page_size)
    allocators = [make_tiered_allocator(pool, device=str(pool.tier_of_page.device)) for pool in pools]
    gen = torch.Generator().manual_seed(3)
    results = []
    for pool, allocator in zip(pools, allocators):
        slots = allocator.alloc(8 * page_size)
        for layer in range(2):
            gen.manual_seed(layer)
            k = torch.randn(len(slots), HEADS, HEAD_DIM, generator=gen).bfloat16()
            v = torch.randn(len(slots), HEADS, HEAD_DIM, generator=gen).bfloat16()
            pool.set_kv_buffer(FakeLayer(layer), slots, _on(pool, k), _on(pool, v))
        low = allocator.demote(allocator.demote(slots, 1), 2)
        results.append([[x.cpu() for x in pool.read_tokens(layer, low)] for layer in range(2)])
    for t in range(3):
        _assert_sides_match(*pools, tier=t, exact=True)
    for (rk, rv), (tk, tv) in zip(*results):
        assert torch.equal(rk, tk) and torch.equal(rv, tv)


def test_launchers_name_the_problem():
    pool = _pools("k4v4,k2v2-kc", page_size=16)[1]
    slots = torch.arange(4, device=DEVICE)
    k = torch.randn(4, HEADS, HEAD_DIM, device=DEVICE)
    with pytest.raises(TypeError, match="cache_k must have dtype"):
        quantize_write(pool, 0, 0, slots, k.to(torch.int32), k)
    with pytest.raises(ValueError, match="cache_v has shape"):
        quantize_write(pool, 0, 0, slots, k, k[:3])
    with pytest.raises(ValueError, match="is on meta"):
        quantize_write(pool, 0, 0, slots, k.to("meta"), k)
    with pytest.raises(KernelSupportError, match="filled by requantize"):
        quantize_write(pool, 1, 0, slots, k, k)
    with pytest.raises(ValueError, match="3 source pages for 2"):
        requantize_pages(pool, 0, slots[:3], 1, slots[:2])
    with pytest.raises(ValueError, match="twice"):
        requantize_pages(pool, 1, slots[:2], 1, slots[:2])
