"""Quantize-on-write: new K/V rows written at given slots of one tier, in its packed layout.

Kernel + launcher ``quantize_write`` + reference ``quantize_write_reference`` (the codec path of
``ReferenceKVOps.write``). Slots are local to the tier and addressed in the frame arena
(``frame_jit``): only the bytes of the given slots' tokens (codes and meta) are written. Codes and
meta are bit-identical to the reference for tiers without key rotation; for ``-rot`` tiers the
fp32 Hadamard product is summed in another order, so a code may differ by one step from the
reference (both within ``SideCodec.error_bound``).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Tuple

import torch
import triton
import triton.language as tl

from .frame_jit import slot_unit, token_offset
from .quant_jit import rotate, store_side
from .spec import KernelSupportError, check_tensor, frame_units, hadamard_signs, row_strides, side_tensors

BLOCK_TOKENS = 16


# counts and index-array offsets vary per launch: one compile serves them all (precompile.py)
@triton.jit(do_not_specialize=["n_tokens"], do_not_specialize_on_alignment=["SLOTS"])
def _write_kernel(K_IN, V_IN, SLOTS, KD, KM, VD, VM, HSIGN, n_tokens,
                  s_kt, s_kh, s_vt, s_vh, KDS, KMS, VDS, VMS,
                  BT: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, PAGE: tl.constexpr, PPF: tl.constexpr,
                  PAGE_UNITS: tl.constexpr, WASTE_UNITS: tl.constexpr,
                  BK: tl.constexpr, GK: tl.constexpr, ROT: tl.constexpr, BV: tl.constexpr, GV: tl.constexpr):
    """Grid ``[token blocks, heads]``: ``BT`` tokens of one head quantized at local slots ``SLOTS``
    of one tier; KD/KM/VD/VM: the layer's arena views, KDS/..: their (token, head) strides."""
    K_ITEM: tl.constexpr = 2 if BK == 16 else 1
    V_ITEM: tl.constexpr = 2 if BV == 16 else 1
    head = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < n_tokens
    unit, tok = slot_unit(tl.load(SLOTS + rows, mask=rmask, other=0).to(tl.int32), PAGE, PPF, PAGE_UNITS,
                          WASTE_UNITS)
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, D)
    k = tl.load(K_IN + rows64[:, None] * s_kt + head * s_kh + offs_d[None, :], mask=rmask[:, None], other=0.0)
    k = k.to(tl.float32)
    if ROT:
        k = rotate(k, HSIGN, D, 1.0 / (D ** 0.5))
    store_side(k, KD, KM, token_offset(unit, tok, head, KDS, K_ITEM), token_offset(unit, tok, head, KMS, 4),
               rmask, BT, 1, D, BK, GK, False)
    offs_v = tl.arange(0, DV)
    v = tl.load(V_IN + rows64[:, None] * s_vt + head * s_vh + offs_v[None, :], mask=rmask[:, None], other=0.0)
    store_side(v.to(tl.float32), VD, VM, token_offset(unit, tok, head, VDS, V_ITEM),
               token_offset(unit, tok, head, VMS, 4), rmask, BT, 1, DV, BV, GV, False)


class _LayerWrite(NamedTuple):
    """What every write into one (tier, layer) passes the kernel besides the tokens (built once)."""
    views: Tuple[torch.Tensor, ...]  # k data, k meta, v data, v meta; then the Hadamard signs
    strides: Tuple[Tuple[int, int], ...]
    constants: Dict[str, object]


def _layer_write(pool, tier: int, layer: int) -> _LayerWrite:
    """The (tier, layer)'s launch arguments, memoized on the pool (its arena never moves): the
    write runs once per layer per forward, and rebuilding them took most of its host time."""
    cache = pool.__dict__.setdefault("_kvc_layer_writes", {})
    found = cache.get((tier, layer))
    if found is None:
        buffers, device = pool.tiers[tier], torch.device(pool.device)
        codec = buffers.codec
        kd, km = (t[layer] for t in side_tensors(buffers.k))
        vd, vm = (t[layer] for t in side_tensors(buffers.v))
        signs = hadamard_signs(pool.head_dim, device).float() if codec.k.rotate else kd
        ppf, page_units, waste_units = frame_units(pool.layout, tier)
        constants = dict(
            BT=BLOCK_TOKENS, D=pool.head_dim, DV=pool.v_head_dim, PAGE=pool.page_size,
            PPF=ppf, PAGE_UNITS=page_units, WASTE_UNITS=waste_units, BK=codec.k.bits, GK=codec.k.group_size,
            ROT=codec.k.rotate, BV=codec.v.bits, GV=codec.v.group_size, num_warps=4, enable_fp_fusion=False)
        found = cache[(tier, layer)] = _LayerWrite(
            (kd, km, vd, vm, signs), tuple(row_strides(pool.layout, tier, t) for t in (kd, km, vd, vm)), constants)
    return found


def quantize_write(pool, tier: int, layer: int, local_slots: torch.Tensor, cache_k: torch.Tensor,
                   cache_v: torch.Tensor, compile_only: bool = False) -> None:
    """Write cache_k ``[T, H, D]`` / cache_v ``[T, H, Dv]`` (bf16, fp16 or fp32) at int32/int64
    ``local_slots [T]`` of ``pool.tiers[tier]``, layer index ``layer`` (0-based in the pool).
    ``compile_only``: compile the kernel these arguments launch, launch nothing (``precompile``)."""
    device = torch.device(pool.device)
    codec = pool.tiers[tier].codec
    if codec.k.per_channel:
        raise KernelSupportError(f"tier {codec.name} groups keys per channel over a page; such tiers are "
                                 f"filled by requantize (whole pages), not by token writes")
    floats = (torch.bfloat16, torch.float16, torch.float32)
    check_tensor("cache_k", cache_k, floats, 3, device)
    check_tensor("cache_v", cache_v, floats, 3, device)
    check_tensor("local_slots", local_slots, (torch.int32, torch.int64), 1, device)
    tokens, heads = local_slots.numel(), pool.head_num
    if tuple(cache_k.shape) != (tokens, heads, pool.head_dim):
        raise ValueError(f"cache_k has shape {tuple(cache_k.shape)}, expected {(tokens, heads, pool.head_dim)}")
    if tuple(cache_v.shape) != (tokens, heads, pool.v_head_dim):
        raise ValueError(f"cache_v has shape {tuple(cache_v.shape)}, expected {(tokens, heads, pool.v_head_dim)}")
    if cache_k.stride(-1) != 1 or cache_v.stride(-1) != 1:
        raise ValueError("cache_k and cache_v must be contiguous in their last dimension")
    if not 0 <= layer < pool.layer_num:
        raise ValueError(f"layer {layer} is outside the pool's {pool.layer_num} layers")
    if tokens == 0 and not compile_only:
        return
    launch = _layer_write(pool, tier, layer)
    grid = (max(1, triton.cdiv(tokens, BLOCK_TOKENS)), heads)
    args = (cache_k, cache_v, local_slots, *launch.views, tokens,
            cache_k.stride(0), cache_k.stride(1), cache_v.stride(0), cache_v.stride(1), *launch.strides)
    if compile_only:
        _write_kernel.warmup(*args, grid=grid, **launch.constants)
    else:
        _write_kernel[grid](*args, **launch.constants)


def quantize_write_reference(pool, tier: int, layer: int, local_slots, cache_k, cache_v) -> None:
    """Plain torch: the codec's quantize + scatter (what ``ReferenceKVOps.write`` does)."""
    buffers = pool.tiers[tier]
    buffers.k.write(layer, local_slots, cache_k)
    buffers.v.write(layer, local_slots, cache_v)

