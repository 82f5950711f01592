"""Host-side description of a pool's tiers as the compile-time constants the Triton kernels take.

The packed layout is the one of ``sglang_kvc.codec`` (split planes, fp16 ``(scale, zero)`` meta).
A kernel reads a quantized side in *chunks* of ``C`` consecutive elements of the head vector; a
chunk lies inside one bit plane (``C`` divides the plane length) and, for per-token groups, inside
one group (``C`` divides ``G``), so one bf16 dot product per chunk plus one scale/zero per group
reproduces the dequantized dot product exactly (see ``attend_jit``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Tuple

import torch

from sglang_kvc.codec import SideCodec, TierCodec, hadamard
from sglang_kvc.layout import ALIGN

MAX_CHUNK = 64
MIN_CHUNK = 16


class KernelSupportError(ValueError):
    """A tier spec or shape the Triton kernels do not handle; the message says what would."""


def _pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def plane_len(bits: int, dim: int) -> int:
    """Elements per bit plane (= bytes per head for bits < 16)."""
    return dim * bits // 8 if bits < 8 else dim


def side_chunk(codec: SideCodec) -> int:
    """Largest chunk (<= 64 elements, power of two) that stays inside one plane and one group."""
    dim = codec.head_dim
    if codec.bits == 16:
        return min(dim, MAX_CHUNK)
    limit = plane_len(codec.bits, dim)
    if not codec.per_channel:
        limit = min(limit, codec.group_size)
    chunk = 1
    while chunk * 2 <= min(limit, MAX_CHUNK) and limit % (chunk * 2) == 0:
        chunk *= 2
    return chunk


def check_side(codec: SideCodec, what: str) -> None:
    dim = codec.head_dim
    if not _pow2(dim) or dim < 32 or dim > 256:
        raise KernelSupportError(f"{what}: head_dim {dim} is not supported by the Triton kernels; "
                                 f"use a power of two in [32, 256] (64 and 128 are tested)")
    chunk = side_chunk(codec)
    if chunk < MIN_CHUNK:
        raise KernelSupportError(
            f"{what}: {codec.bits}-bit codes with group size {codec.group_size} give chunks of {chunk} "
            f"elements, below the {MIN_CHUNK} a tensor-core dot needs; use a group size that is a "
            f"multiple of {MIN_CHUNK} (e.g. the default -g64)")


@dataclasses.dataclass(frozen=True)
class TierConsts:
    """Compile-time constants of one tier, as passed to the kernels (a tuple, see ``as_tuple``).

    The last three place the tier's pages in the frame arena (``frame_jit``): ``pages_per_frame``
    (``FrameLayout.pages_per_frame``), ``page_units`` (page bytes / ALIGN) and ``waste_units``
    (frame bytes / ALIGN - pages_per_frame * page_units). 0 pages per frame: the constants only
    validate a codec and cannot be passed to a kernel."""

    bits_k: int
    group_k: int
    per_channel_k: int
    rotate_k: int
    chunk_k: int
    bits_v: int
    group_v: int
    chunk_v: int
    pages_per_frame: int = 0
    page_units: int = 0
    waste_units: int = 0

    def as_tuple(self) -> Tuple[int, ...]:
        if self.pages_per_frame < 1:
            raise ValueError("TierConsts without a frame layout cannot be passed to a kernel; "
                             "use layout_consts(layout)")
        return dataclasses.astuple(self)


def tier_consts(codec: TierCodec, pages_per_frame: int = 0, page_units: int = 0, waste_units: int = 0
                ) -> TierConsts:
    """Validate a tier for the kernels (KernelSupportError says why not) and give its constants."""
    check_side(codec.k, f"tier {codec.name} keys")
    check_side(codec.v, f"tier {codec.name} values")
    return TierConsts(codec.k.bits, codec.k.group_size, int(codec.k.per_channel), int(codec.k.rotate),
                      side_chunk(codec.k), codec.v.bits, codec.v.group_size, side_chunk(codec.v),
                      int(pages_per_frame), int(page_units), int(waste_units))


def frame_units(layout, tier: int) -> Tuple[int, int, int]:
    """(pages per frame, page units, waste units) of a tier (``frame_jit``; units of ALIGN bytes)."""
    if layout.frame_bytes % ALIGN or layout.page_bytes[tier] % ALIGN:
        raise ValueError(f"frame ({layout.frame_bytes} B) and page ({layout.page_bytes[tier]} B) sizes "
                         f"must be multiples of {ALIGN} bytes")
    r, page = layout.pages_per_frame[tier], layout.page_bytes[tier] // ALIGN
    return r, page, layout.frame_bytes // ALIGN - r * page


def layout_consts(layout) -> Tuple[Tuple[int, ...], ...]:
    """Per tier of a ``FrameLayout``: the ``TierConsts`` tuple the attention kernels take as SPECS."""
    return tuple(tier_consts(c, *frame_units(layout, t)).as_tuple() for t, c in enumerate(layout.codecs))


def value_chunk(codecs) -> int:
    """One value-chunk size shared by every tier, so the output accumulator has one shape."""
    return min(side_chunk(c.v) for c in codecs)


def use_inline_asm(device: torch.device) -> bool:
    """Inline PTX unpacking on CUDA; plain Triton ops under TRITON_INTERPRET (no asm there)."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"


_HADAMARD_SIGNS = {}


def hadamard_signs(dim: int, device) -> torch.Tensor:
    """``sqrt(dim) * hadamard(dim)`` as bf16 ``[dim, dim]`` (entries +-1, exact)."""
    key = (dim, str(device))
    if key not in _HADAMARD_SIGNS:
        _HADAMARD_SIGNS[key] = (hadamard(dim) * dim ** 0.5).round().to(torch.bfloat16).to(device)
    return _HADAMARD_SIGNS[key]


def side_tensors(side):
    """(data, meta) of a ``SideBuffers``, all layers: meta viewed as int32 (scale, zero) words
    ``[layers, frames, R, T, heads, groups]``, a bf16 side's missing meta replaced by its data
    (never read). Both are strided views of the pool's arena."""
    meta = side.data if side.meta is None else side.meta.view(torch.int32).squeeze(-1)
    return side.data, meta


def row_strides(layout, tier: int, tensor: torch.Tensor) -> Tuple[int, int]:
    """(token, head) strides of a tier's ``[(layers,) frames, R, T, heads, X]`` arena view
    (``frame_jit``'s ``S``), after checking the invariant the kernels rely on: its layer, frame and
    page strides are the arena's layer row, frame and page sizes, and its base is ALIGN-aligned."""
    item = tensor.element_size()
    frame, page, token, head = tensor.stride()[-5:-1]
    if tensor.dim() == 6 and tensor.stride(0) * item != layout.num_frames * layout.frame_bytes:
        raise ValueError(f"a tier-{tier} side view's layer stride is not the arena's layer row")
    if frame * item != layout.frame_bytes or page * item != layout.page_bytes[tier] or tensor.data_ptr() % ALIGN:
        raise ValueError(f"a tier-{tier} side view {tuple(tensor.shape)} is not a frame view of the arena: "
                         f"frame/page strides {frame * item}/{page * item} B, layout "
                         f"{layout.frame_bytes}/{layout.page_bytes[tier]} B, base {tensor.data_ptr() % ALIGN} "
                         f"bytes off alignment")
    return token, head


def tier_strides(pool) -> Tuple[Tuple[Tuple[int, int], ...], ...]:
    """Per tier: the ``row_strides`` of (k_data, k_meta, v_data, v_meta); the same for every layer."""
    return tuple(tuple(row_strides(pool.layout, t, x) for side in (b.k, b.v) for x in side_tensors(side))
                 for t, b in enumerate(pool.tiers))


def layer_buffers(pool, layer: int):
    """Per tier: (k_data, k_meta, v_data, v_meta) of one layer (``side_tensors``), views of the arena."""
    return tuple(tuple(x[layer] for side in (b.k, b.v) for x in side_tensors(side)) for b in pool.tiers)


class FrameViews:
    """What the attention kernels take of a pool as BUFS / STRIDES: per tier the layer's four views
    (memoized per layer: the same tensors, hence addresses, on every call) and their (token, head)
    strides (checked once; equal for every layer)."""

    def __init__(self, pool):
        self.pool = pool
        self.strides = tier_strides(pool)
        self._layers = {}

    def layer(self, layer: int):
        if layer not in self._layers:
            self._layers[layer] = layer_buffers(self.pool, layer)
        return self._layers[layer]


def gqa_group(pool, num_qo_heads: int) -> int:
    """Query heads per KV head of the pool; raises if they do not divide evenly."""
    if num_qo_heads % pool.head_num:
        raise ValueError(f"{num_qo_heads} query heads are not a multiple of {pool.head_num} KV heads")
    return num_qo_heads // pool.head_num


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:<current>`` are the same device."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if not same_device(tensor.device, device):
        raise ValueError(f"{name} is on {tensor.device}, the KV pool on {device}; move it to {device}")


def check_tensor(name: str, tensor: torch.Tensor, dtypes, ndim: int, device: torch.device) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {tensor.dtype}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    check_device(name, tensor, device)
