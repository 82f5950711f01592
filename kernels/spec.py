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
    """Compile-time constants of one tier, as passed to the kernels (a tuple, see ``as_tuple``)."""

    bits_k: int
    group_k: int
    per_channel_k: int
    rotate_k: int
    chunk_k: int
    bits_v: int
    group_v: int
    chunk_v: int

    def as_tuple(self) -> Tuple[int, ...]:
        return dataclasses.astuple(self)


def tier_consts(codec: TierCodec) -> TierConsts:
    check_side(codec.k, f"tier {codec.name} keys")
    check_side(codec.v, f"tier {codec.name} values")
    return TierConsts(codec.k.bits, codec.k.group_size, int(codec.k.per_channel), int(codec.k.rotate),
                      side_chunk(codec.k), codec.v.bits, codec.v.group_size, side_chunk(codec.v))


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


def layer_buffers(pool, layer: int):
    """Per tier: (k_data, k_meta, v_data, v_meta) of one layer; meta viewed as int32 (scale, zero)
    words, and a bf16 side's missing meta replaced by its data tensor (never read)."""
    out = []
    for buffers in pool.tiers:
        sides = []
        for side in (buffers.k, buffers.v):
            data = side.data[layer]
            meta = data if side.meta is None else side.meta[layer].view(torch.int32).squeeze(-1)
            sides += [data, meta]
        out.append(tuple(sides))
    return out


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
