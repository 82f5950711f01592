"""Quantize-on-write, requantize and TritonKVOps against the torch reference (CPU: TRITON_INTERPRET=1,
small shapes; on a GPU with TRITON_INTERPRET=0 the same tests run at full size).

Pools come from ``kernels.testing.make_pool``: one arena whose frames are dealt out to the tiers in
turn (plus spare frames), poisoned with the same random bytes in every pool, so tiers share the
arena and pages sit scattered over frames. Comparisons are over the whole arena, byte for byte:
a kernel that writes the wrong frame, page or token shows up as a difference anywhere.

The reference always runs on the CPU: its IEEE float32 arithmetic is the contract (PyTorch's CUDA
division by a scalar multiplies by the reciprocal, so a CUDA-run reference can round differently).
"""

import pytest
import torch
import triton
import triton.language as tl

from sglang_kvc.codec import dequantize_groups, group_error_bound, pack_codes, quantize_groups
from sglang_kvc.kernels.decode_ref import meta_rows
from sglang_kvc.kernels.ops import TritonKVOps
from sglang_kvc.kernels.quant_jit import kept_codes
from sglang_kvc.kernels.quantize import quantize_write
from sglang_kvc.kernels.requantize import (DEFAULT_CONFIG, REQUANT_CONFIGS, SWEEP_CONFIGS, RequantConfig,
                                            launch_shape, requantize_pages)
from sglang_kvc.kernels.spec import KernelSupportError
from sglang_kvc.kernels.testing import (fill_tiers, frame_owner, full_size, kernel_test_device, make_pool,
                                        tier_page_ids, tier_slots)
from sglang_kvc.pool import ReferenceKVOps, TieredKVPool

DEVICE = kernel_test_device()
FULL = full_size()
HEAD_DIM = 128 if FULL else 64
HEADS = 8 if FULL else 2
TOKENS = 4096 if FULL else 64


class FakeLayer:
    """Stands in for RadixAttention: the pool only reads ``layer_id``."""

    def __init__(self, layer_id):
        self.layer_id = layer_id


def _pools(ladder, page_size, layers=2, head_dim=HEAD_DIM, frame_pages=4):
    """(reference pool on the CPU, Triton pool on the test device), equal arenas (poison)."""
    return [make_pool(ladder, head_dim, HEADS, page_size, TOKENS, layers=layers, device=device, ops=ops,
                      frame_pages=frame_pages)
            for device, ops in (("cpu", ReferenceKVOps()), (DEVICE, TritonKVOps()))]


def _on(pool, tensor):
    return tensor.to(pool.tier_of_page.device)


def _own_slots(pool, tier):
    """int64 local slots of every token of the tier's own frames."""
    return pool.local_slots(tier, tier_slots(pool.layout, tier))


def _own_pages(pool, tier):
    return pool.local_pages(tier, tier_page_ids(pool.layout, tier))


def _pick(values, count, gen):
    return values[torch.randperm(len(values), generator=gen)[:count]]


def _on_cpu(pool) -> TieredKVPool:
    """A CPU pool holding a copy of ``pool``'s arena (to read it with the torch views)."""
    copy = TieredKVPool(pool.layout, device="cpu")
    copy.arena.copy_(pool.arena.cpu())
    return copy


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


def _first_difference(ref_arena, arena, layout) -> str:
    layer, frame, byte = (int(i) for i in torch.nonzero(ref_arena != arena)[0])
    owner = int(frame_owner(layout)[frame])
    whose = layout.codecs[owner].name if owner < layout.num_tiers else "spare"
    return (f"{int((ref_arena != arena).sum())} bytes differ, first at layer {layer} frame {frame} "
            f"({whose}) byte {byte}")


def _slot_index(side, slots):
    """(frame, page in frame, token, meta row) of local slots in a side's views."""
    page = slots // side.codec.page_size
    frame, pin, tok = page // side.pages_per_frame, page % side.pages_per_frame, slots % side.codec.page_size
    return frame, pin, tok, torch.zeros_like(tok) if side.codec.per_channel else tok


def _assert_arenas_match(ref_pool, pool, rotated_tier=None, slots=None, key_inputs=None):
    """Whole arenas bit-equal, except the keys of ``slots`` (local) of ``rotated_tier``, which went
    through a Hadamard rotation (into or out of a ``-rot`` tier): there, decoded values within both
    group bounds plus the rotation's rounding (key_inputs: per layer the keys that were rotated,
    one basis or a tuple of both, in ``slots`` order)."""
    kernel = _on_cpu(pool)
    if rotated_tier is not None:
        ref_side, side = ref_pool.tiers[rotated_tier].k, kernel.tiers[rotated_tier].k
        codec, slots = side.codec, slots.cpu()
        frame, pin, tok, row = _slot_index(side, slots)
        for layer in range(pool.layer_num):
            ref_vals = ref_side.read(layer, slots, stored_basis=True)
            vals = side.read(layer, slots, stored_basis=True)
            # both quantized the same rotated values up to float32 summation order, each within
            # its own group bound: |kernel - ref| <= bound(ref meta) + bound(kernel meta)
            # + twice the rotation's rounding bound
            bounds = [group_error_bound(meta_rows(buf, layer, slots), codec.bits)
                      .repeat_interleave(codec.group_size, -1) for buf in (ref_side, side)]
            rotated = key_inputs[layer] if isinstance(key_inputs[layer], tuple) else (key_inputs[layer],)
            limit = bounds[0] + bounds[1] + 2 * sum(_rotation_slack(x) for x in rotated)
            assert bool(((vals - ref_vals).abs() <= limit).all())
            # every other byte must be the reference's: take its codes and meta for these keys
            side.data[layer, frame, pin, tok] = ref_side.data[layer, frame, pin, tok]
            side.meta[layer, frame, pin, row] = ref_side.meta[layer, frame, pin, row]
    assert torch.equal(ref_pool.arena, kernel.arena), _first_difference(ref_pool.arena, kernel.arena, pool.layout)


WRITE_CASES = [("bf16", 1), ("k8v8", 1), ("k4v4", 16), ("k4v2", 1), ("k2v2", 1), ("k8v8-g32", 1),
               ("k4v4-rot", 1), ("k2v2-g16-rot", 16),
               ("k8v4-g32", 16)]


@pytest.mark.parametrize("ladder,page_size", WRITE_CASES)
def test_write_matches_reference(ladder, page_size):
    gen = torch.Generator().manual_seed(1)
    pools = _pools(ladder, page_size)
    own = _own_slots(pools[0], 0)
    slots = _pick(own, len(own) // 2 + 3, gen)  # scattered over the tier's frames, partial pages too
    keys = []
    for layer in range(2):
        k = _adversarial(len(slots), HEAD_DIM, gen)
        v = _adversarial(len(slots), HEAD_DIM, gen)
        keys.append(k)
        for pool in pools:
            pool.set_kv_buffer(FakeLayer(layer), _on(pool, slots), _on(pool, k), _on(pool, v))
    rotated = 0 if pools[0].layout.codecs[0].k.rotate else None
    _assert_arenas_match(*pools, rotated_tier=rotated, slots=slots, key_inputs=keys)


def test_write_accepts_fp32_and_strided_inputs():
    pools = _pools("k4v2", page_size=1)
    slots = _own_slots(pools[0], 0)[1:9]
    k = torch.randn(8, HEADS, 2 * HEAD_DIM)[..., :HEAD_DIM]  # strided view, fp32
    v = torch.randn(8, HEADS, HEAD_DIM)
    for pool in pools:
        pool.ops.write(pool, 0, 1, _on(pool, slots), _on(pool, k), _on(pool, v))
    _assert_arenas_match(*pools)


REQUANT_CASES = [
    ("bf16,k8v8", 16, 0, 1), ("k8v8,k4v4", 1, 0, 1), ("k4v4,k2v2", 16, 0, 1), ("bf16,k8v8,k4v2", 1, 0, 2),
    ("k8v8,k4v2-kc", 16, 0, 1), ("k8v8,k4v4-kc,k2v2", 16, 1, 2), ("k8v8-rot,k4v4", 16, 0, 1),
    ("bf16,k4v4-rot", 1, 0, 1), ("k8v8-rot,k4v2-rot", 16, 0, 1), ("k8v4-g32,k4v4-g32-kc", 16, 0, 1),
]


def _reference_filled(ladder, page_size, seed, layers=2):
    """(reference pool, Triton pool) with equal arenas: every tier's own frames quantized by the
    reference codec."""
    ref_pool, pool = _pools(ladder, page_size, layers=layers)
    for t in range(ref_pool.layout.num_tiers):
        gen_t = torch.Generator().manual_seed(seed + t)
        slots = _own_slots(ref_pool, t)
        for layer in range(ref_pool.layer_num):
            k = _adversarial(len(slots), HEAD_DIM, gen_t).float()
            v = _adversarial(len(slots), HEAD_DIM, gen_t).float()
            ReferenceKVOps().write(ref_pool, t, layer, slots, k, v)
    pool.arena.copy_(ref_pool.arena)
    return ref_pool, pool


def _pick_move(ref_pool, src: int, dst: int, moved: int, gen):
    """(source pages, destination pages, the source keys per layer in both bases): a move of
    ``moved`` random pages, with what it may rotate (either direction) for the comparison."""
    src_pages = _pick(_own_pages(ref_pool, src), moved, gen)
    dst_pages = _pick(_own_pages(ref_pool, dst), moved, gen)
    src_slots = ref_pool.pages_to_slots(src_pages)
    src_keys = [(ref_pool.tiers[src].k.read(layer, src_slots),
                 ref_pool.tiers[src].k.read(layer, src_slots, stored_basis=True))
                for layer in range(ref_pool.layer_num)]
    return src_pages, dst_pages, src_keys


@pytest.mark.parametrize("ladder,page_size,src,dst", REQUANT_CASES)
def test_requantize_matches_reference(ladder, page_size, src, dst):
    gen = torch.Generator().manual_seed(2)
    ref_pool, pool = pools = _reference_filled(ladder, page_size, 10)  # reference codes, copied over
    src_pages, dst_pages, src_keys = _pick_move(ref_pool, src, dst, max(1, TOKENS // page_size // 3), gen)
    for p in pools:
        p.ops.requantize(p, src, _on(p, src_pages), dst, _on(p, dst_pages))
    codecs = ref_pool.layout.codecs
    rotated = dst if codecs[src].k.rotate or codecs[dst].k.rotate else None  # a basis change either way
    _assert_arenas_match(*pools, rotated_tier=rotated, slots=ref_pool.pages_to_slots(dst_pages), key_inputs=src_keys)


def _launch_shapes():
    """Every launch shape the kernel may run (the sweep's candidates, the table, the default); under
    the interpreter, which ignores warps and register caps, one per (rows, heads per block,
    prefetch). On a GPU (each shape compiles per step, seconds each) one shape besides the default
    the other tests use; the sweep compares every shape's bytes (benchmarks/kernels.py)."""
    shapes = sorted(set(SWEEP_CONFIGS) | set(REQUANT_CONFIGS.values()) | {DEFAULT_CONFIG},
                    key=lambda c: (c.rows, c.heads, c.warps, c.maxnreg or 0, c.prefetch))
    if FULL:
        return [RequantConfig(128, 8, 4, prefetch=False)]
    distinct = {}
    for c in shapes:
        distinct.setdefault((launch_shape(c, HEADS, 16, False), c.prefetch), c)
    return list(distinct.values())


LAUNCH_SHAPES = _launch_shapes()
# (ladder, page size, steps): every step of the default ladder; -kc into and out of a tier with
# groups smaller than a plane (-g16/-g32); a basis change
SHAPE_LADDERS = [("bf16,k8v8,k4v4,k4v2,k2v2", 16, ((0, 1), (1, 2), (2, 3), (3, 4))),
                 ("k8v8-g32,k4v4-kc,k2v2-g16", 16, ((0, 1), (1, 2))),
                 ("k8v8-rot,k4v2", 4, ((0, 1),))][:1 if FULL else None]


@pytest.mark.parametrize("config", LAUNCH_SHAPES, ids=lambda c: f"{c.rows}r{c.heads}h{c.warps}w"
                         + ("" if c.prefetch else "-noprefetch") + (f"-{c.maxnreg}reg" if c.maxnreg else ""))
def test_requantize_every_launch_shape_matches_reference(config):
    """Each launch shape (rows, heads per block, warps) gives the reference's bytes on every step,
    with page counts that leave programs partly masked; arenas compared whole, so a shape that
    writes outside the destination pages fails too."""
    gen = torch.Generator().manual_seed(7)
    for ladder, page_size, steps in SHAPE_LADDERS:
        ref_pool, pool = _reference_filled(ladder, page_size, 20, layers=2 if FULL else 1)
        codecs = ref_pool.layout.codecs
        for src, dst in steps:
            src_pages, dst_pages, src_keys = _pick_move(ref_pool, src, dst, 5 if FULL else 2, gen)
            ReferenceKVOps().requantize(ref_pool, src, src_pages, dst, dst_pages)
            requantize_pages(pool, src, _on(pool, src_pages), dst, _on(pool, dst_pages), config=config)
            rotated = dst if codecs[src].k.rotate != codecs[dst].k.rotate else None
            _assert_arenas_match(ref_pool, pool, rotated_tier=rotated, slots=ref_pool.pages_to_slots(dst_pages),
                                 key_inputs=src_keys)
            pool.arena.copy_(ref_pool.arena.to(pool.arena.device))  # the next step starts equal


@triton.jit
def _kept_codes_kernel(WORDS, META, OK, NEW_META, RB: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                       G: tl.constexpr):
    """kept_codes over rows of packed codes ``WORDS [RB, P / 4]`` and meta words ``META [RB, D / G]``."""
    P: tl.constexpr = D * BITS // 8
    r = tl.arange(0, RB)
    datas = ()
    metas = ()
    for u in tl.static_range(D // 16):
        datas = datas + (tl.load(WORDS + r[:, None] * (P // 4) + ((16 * u) % P // 4 + tl.arange(0, 4))[None, :])
                         .to(tl.uint32, bitcast=True),)
        metas = metas + (tl.load(META + r * (D // G) + (16 * u) // G),)
    ok, words = kept_codes(datas, metas, RB, D, BITS, G)
    tl.store(OK + r, ok)
    for g in tl.static_range(D // G):
        tl.store(NEW_META + r * (D // G) + g, words[g])


def _crafted_groups(rows, dim, bits, group, gen):
    """uint8 codes ``[rows, dim]`` and float16 meta ``[rows, dim / group, 2]``: random groups whose
    codes span [0, levels] and whose zero is up to 2^22 scales from 0, plus groups missing code 0
    or the top code, zero -0.0, scale 0, a huge zero, and a scale the requantization bumps."""
    levels = (1 << bits) - 1
    ng = dim // group
    codes = torch.randint(0, levels + 1, (rows, ng, group), generator=gen)
    codes[..., 0], codes[..., 1] = 0, levels
    scale = torch.exp2(torch.empty(rows, ng).uniform_(-14, 4, generator=gen)).half()
    zero = (torch.randn(rows, ng, generator=gen) * scale.float()
            * torch.exp2(torch.empty(rows, ng).uniform_(0, 22, generator=gen))).clamp(-6e4, 6e4).half()
    codes[1] = codes[1].clamp(min=1)  # no code 0
    codes[2] = codes[2].clamp(max=levels - 1)  # no top code
    zero[3] = -0.0
    scale[4] = 0.0
    zero[5], scale[5] = 1000.0, 2.0 ** -14
    zero[6], scale[6] = -1.5, 0.0123  # x_L - zero rounds up: the scale goes up one step
    return codes.to(torch.uint8).reshape(rows, dim), torch.stack([scale, zero], -1)


@pytest.mark.parametrize("bits,group", [(2, 64), (4, 64), (8, 64), (4, 16), (2, 32)])
def test_kept_codes_only_when_requantizing_keeps_them(bits, group):
    """kept_codes (the same-codec copy path of requantize) says 1 only where the reference's
    requantization gives back the codes, and then its meta words are the reference's."""
    rows, dim = 64, 64
    codes, meta = _crafted_groups(rows, dim, bits, group, torch.Generator().manual_seed(bits * 100 + group))
    words = pack_codes(codes, bits).contiguous().view(torch.int32)
    meta_words = meta.contiguous().view(torch.int32).squeeze(-1)
    x = dequantize_groups(codes.reshape(rows, -1, group), meta)
    ref_codes, ref_meta = quantize_groups(x, bits)
    same = (ref_codes.reshape(rows, dim) == codes).all(-1)
    ok = torch.zeros(rows, dtype=torch.int32, device=DEVICE)
    new_meta = torch.zeros_like(meta_words, device=DEVICE)
    _kept_codes_kernel[(1,)](words.to(DEVICE), meta_words.to(DEVICE), ok, new_meta, RB=rows, D=dim, BITS=bits,
                             G=group)
    kept, new_meta = ok.cpu().bool(), new_meta.cpu()
    assert not bool((kept & ~same).any()), f"rows {torch.nonzero(kept & ~same).flatten().tolist()} lose codes"
    assert torch.equal(new_meta[kept], ref_meta.contiguous().view(torch.int32).squeeze(-1)[kept])
    assert not bool(kept[[1, 2, 4]].any())
    assert int(kept.sum()) >= rows // 2, "the copy path should cover ordinary groups"


def test_requantize_same_codec_side_matches_reference():
    """V of k4v2 -> k2v2 keeps its codec: programs whose groups keep their codes take the copy path,
    the others requantize; both give the reference's bytes (crafted groups in some pages only)."""
    ref_pool, pool = _reference_filled("k4v2,k2v2", 16, 30, layers=1)
    gen = torch.Generator().manual_seed(31)
    own = _own_pages(ref_pool, 0)
    src_pages, dst_pages = own[:6], _pick(_own_pages(ref_pool, 1), 6, gen)
    side = ref_pool.tiers[0].v
    slots = ref_pool.pages_to_slots(src_pages[3:4])  # one page of crafted groups; the others ordinary
    codes, meta = _crafted_groups(len(slots) * HEADS, HEAD_DIM, 2, 64, gen)
    frame, pin, tok, _ = _slot_index(side, slots)
    side.data[0, frame, pin, tok] = pack_codes(codes, 2).reshape(len(slots), HEADS, -1)
    side.meta[0, frame, pin, tok] = meta.reshape(len(slots), HEADS, -1, 2)
    pool.arena.copy_(ref_pool.arena.to(pool.arena.device))
    ReferenceKVOps().requantize(ref_pool, 0, src_pages, 1, dst_pages)
    requantize_pages(pool, 0, _on(pool, src_pages), 1, _on(pool, dst_pages), config=RequantConfig(32, 8, 1))
    _assert_arenas_match(ref_pool, pool)


def test_launch_shape_rules():
    assert launch_shape(RequantConfig(64, 8, 4), heads=8, page=16, per_channel=False) == (64, 8)
    assert launch_shape(RequantConfig(64, 8, 4), heads=6, page=16, per_channel=False) == (64, 2)
    assert launch_shape(RequantConfig(16, 8, 1), heads=8, page=16, per_channel=True) == (128, 8)
    with pytest.raises(ValueError, match="power of two"):
        RequantConfig(48, 8, 4)
    with pytest.raises(ValueError, match=">= 16"):
        RequantConfig(8, 8, 4)


@pytest.mark.parametrize("page_size", [1, 4])
def test_pool_with_triton_ops_equals_reference_through_demotion(page_size):
    """Write at the write tier, then demote tier 0 -> 1 -> 2 (pool.move_pages), pages drawn at
    random from each tier's own frames."""
    pools = _pools("bf16,k8v8,k4v2", page_size)
    gen = torch.Generator().manual_seed(3)
    chain = [_pick(tier_page_ids(pools[0].layout, t), 8, gen) for t in range(3)]
    results = []
    for pool in pools:
        slots = pool.pages_to_slots(chain[0])
        for layer in range(2):
            gen.manual_seed(layer)
            k = torch.randn(len(slots), HEADS, HEAD_DIM, generator=gen).bfloat16()
            v = torch.randn(len(slots), HEADS, HEAD_DIM, generator=gen).bfloat16()
            pool.set_kv_buffer(FakeLayer(layer), _on(pool, slots), _on(pool, k), _on(pool, v))
        pool.move_pages(0, _on(pool, chain[0]), 1, _on(pool, chain[1]))
        pool.move_pages(1, _on(pool, chain[1]), 2, _on(pool, chain[2]))
        low = _on(pool, pool.pages_to_slots(chain[2]))
        results.append([[x.cpu() for x in pool.read_tokens(layer, low)] for layer in range(2)])
    _assert_arenas_match(*pools)
    for (rk, rv), (tk, tv) in zip(*results):
        assert torch.equal(rk, tk) and torch.equal(rv, tv)


ISOLATION_CASES = [("bf16,k8v8,k4v2", 1, 4), ("k8v8,k4v4,k2v2-kc", 16, 4), ("bf16,k4v4-rot,k2v2", 16, 3)]


def _assert_changed_only(before, pool, tier, local_pages, layers):
    """Bytes of the arena that differ from ``before`` all lie in the given pages of ``tier`` (their
    page-slot byte ranges in ``layers``), and some do."""
    after = pool.arena.cpu()
    allowed = torch.zeros(after.shape, dtype=torch.bool)
    layout = pool.layout
    r, page_bytes = layout.pages_per_frame[tier], layout.page_bytes[tier]
    num_layers, frames, frame_bytes = after.shape
    slots = torch.as_strided(allowed, (num_layers, frames, r, page_bytes), (frames * frame_bytes, frame_bytes,
                                                                            page_bytes, 1))
    local_pages = local_pages.cpu()
    slots[torch.tensor(layers)[:, None], (local_pages // r)[None, :], (local_pages % r)[None, :]] = True
    changed = after != before
    assert bool(changed.any()), "nothing was written"
    stray = changed & ~allowed
    assert not bool(stray.any()), _first_difference(before * ~allowed, after * ~allowed, layout)


@pytest.mark.parametrize("ladder,page_size,frame_pages", ISOLATION_CASES)
def test_kernels_write_only_their_own_pages(ladder, page_size, frame_pages):
    """Poisoned arena, frames dealt out to tiers: quantize_write to some of tier 0's slots and
    requantize 0 -> 1 -> 2 change bytes of the destination pages only (not of other pages in the
    same frames, of other tiers' frames, or of spare frames)."""
    pool = make_pool(ladder, HEAD_DIM, HEADS, page_size, TOKENS, device=DEVICE, ops=TritonKVOps(),
                     frame_pages=frame_pages)
    ppf = pool.layout.pages_per_frame
    assert min(ppf) > 1 and len(set(ppf)) == len(ppf), f"pages per frame {ppf} should differ per tier"
    fill_tiers(pool, 6)
    gen = torch.Generator().manual_seed(6)
    own = _own_slots(pool, 0)
    slots = _pick(own, len(own) // 3 + 1, gen)
    k = torch.randn(len(slots), HEADS, HEAD_DIM, generator=gen)
    before = pool.arena.cpu().clone()
    quantize_write(pool, 0, 1, _on(pool, slots), _on(pool, k), _on(pool, -k))
    _assert_changed_only(before, pool, 0, torch.unique(slots // page_size), [1])
    # the table's shape; every launch shape on the first case (each is also compared whole with the
    # reference in test_requantize_every_launch_shape_matches_reference)
    shapes = (None,) + (tuple(LAUNCH_SHAPES) if (ladder, page_size, frame_pages) == ISOLATION_CASES[0] else ())
    for config in shapes:
        for src, dst in ((0, 1), (1, 2)):
            moved = max(1, TOKENS // page_size // 4)
            src_pages = _pick(_own_pages(pool, src), moved, gen)
            dst_pages = _pick(_own_pages(pool, dst), moved, gen)
            before = pool.arena.cpu().clone()
            requantize_pages(pool, src, _on(pool, src_pages), dst, _on(pool, dst_pages), config=config)
            _assert_changed_only(before, pool, dst, dst_pages, list(range(pool.layer_num)))


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
