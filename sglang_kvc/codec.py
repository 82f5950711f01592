"""Plain-torch quantize / dequantize / requantize for one tier: the references the Triton kernels match.

Packed layout of one side (K or V) of one tier, for ``N`` token slots, ``H`` KV heads, head_dim ``D``:

* 16 bits: ``data`` is bf16 ``[N, H, D]``; there is no ``meta``.
* ``b`` in {2, 4, 8} bits: ``data`` is uint8 ``[N, H, D * b // 8]`` holding unsigned codes in
  "split planes": with ``n = 8 // b`` codes per byte and ``P = D // n`` bytes per head, byte ``i``
  holds the code of element ``i + m * P`` in bits ``[m * b, (m + 1) * b)`` for ``m = 0 .. n-1``. A
  kernel that loads the ``P`` bytes of a head and shifts by ``m * b`` gets the ``m``-th contiguous
  chunk of the head vector, so a dot product splits into ``n`` contiguous partial dot products.
* ``meta`` is float16 ``[..., 2]`` holding ``(scale, zero)``; an element dequantizes to
  ``code * scale + zero``. Per-token grouping (V always; K by default): ``meta`` is
  ``[N, H, D // G, 2]`` and element ``d`` uses group ``d // G``. Per-channel key grouping (``-kc``,
  as in KIVI): ``N`` is a multiple of ``page_size``, ``meta`` is ``[N // page_size, H, D, 2]`` and
  the ``page_size`` tokens of one page share the group of each channel.
* ``-rot`` keys are stored in the rotated basis ``x @ R`` with ``R = hadamard(D)`` (symmetric,
  orthonormal); attention may use ``(q @ R) . k_stored`` instead of un-rotating keys.

Error bound: zero is rounded down and scale up to float16 so every element of a group lies in
``[zero, zero + (2^b - 1) * scale]`` and no code is clamped; then
``|x - dequant(quant(x))| <= scale / 2`` per element in the stored basis, up to float32 rounding
(``error_bound`` adds that slack). For rotated keys the bound holds in the rotated basis, so in the
original basis the L2 error of each head vector is at most the L2 norm of the bound.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

from sglang_kvc.tiers import TierSpec, TierSpecError

FP16_SAFE_MAX = 60000.0  # scale/zero live in float16; inputs beyond this would overflow them
KVC_META_DTYPE = torch.float16
CHANNEL_GROUPING_MIN_PAGE = 8


class CodecInputError(ValueError):
    """Input the codec refuses: NaN/inf, or magnitudes its float16 scales cannot hold."""


def codes_per_byte(bits: int) -> int:
    return 8 // bits


@functools.lru_cache(maxsize=None)
def _hadamard_cpu(dim: int) -> torch.Tensor:
    if dim < 1 or dim & (dim - 1):
        raise TierSpecError(f"key rotation needs a power-of-two head_dim, got {dim}")
    mat = torch.ones(1, 1, dtype=torch.float64)
    while mat.shape[0] < dim:
        mat = torch.cat([torch.cat([mat, mat], 1), torch.cat([mat, -mat], 1)], 0)
    return (mat / math.sqrt(dim)).to(torch.float32)


def hadamard(dim: int, device="cpu") -> torch.Tensor:
    """Normalized Sylvester-Hadamard matrix ``[dim, dim]`` float32: symmetric, ``R @ R == I``."""
    return _hadamard_cpu(dim).to(device)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., D]`` (each < 2^bits) -> split-plane bytes ``[..., D * bits // 8]``."""
    per_byte = codes_per_byte(bits)
    if per_byte == 1:
        return codes.to(torch.uint8)
    planes = codes.to(torch.int32).unflatten(-1, (per_byte, codes.shape[-1] // per_byte))
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (planes << shifts[:, None]).sum(-2).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Split-plane bytes ``[..., P]`` -> uint8 codes ``[..., P * 8 // bits]``."""
    per_byte = codes_per_byte(bits)
    if per_byte == 1:
        return packed
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * bits
    planes = (packed.to(torch.int32)[..., None, :] >> shifts[:, None]) & ((1 << bits) - 1)
    return planes.flatten(-2).to(torch.uint8)


def _fp16_round(values: torch.Tensor, direction: float) -> torch.Tensor:
    """Round float32 values to float16, towards ``direction`` (-inf or +inf)."""
    half = values.to(torch.float16)
    wrong_side = (half.float() > values) if direction < 0 else (half.float() < values)
    target = torch.full_like(half, direction)
    return torch.where(wrong_side, torch.nextafter(half, target), half)


def quantize_groups(grouped: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization over the last axis.

    grouped: float ``[..., G]`` -> (codes uint8 ``[..., G]``, meta float16 ``[..., 2]``).
    """
    values = grouped.float()
    zero = _fp16_round(values.amin(-1), -math.inf)
    levels = (1 << bits) - 1
    scale = _fp16_round((values.amax(-1) - zero.float()) / levels, math.inf)
    safe_scale = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = torch.round((values - zero.float()[..., None]) / safe_scale[..., None])
    codes = codes.clamp_(0, levels).to(torch.uint8)
    return codes, torch.stack([scale, zero], -1)


def dequantize_groups(codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(codes ``[..., G]``, meta ``[..., 2]``) -> float32 ``[..., G]``."""
    scale, zero = meta.float().unbind(-1)
    return codes.float() * scale[..., None] + zero[..., None]


def group_error_bound(meta: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-group bound on |x - dequant(quant(x))| from the stored meta (float32 ``[...]``)."""
    scale, zero = meta.float().unbind(-1)
    return 0.5 * scale + 2.0**-20 * (zero.abs() + ((1 << bits) - 1) * scale)


def check_finite_and_in_range(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise CodecInputError(f"{what} contains NaN or inf; the KV codec only accepts finite values")
    peak = x.abs().max().item() if x.numel() else 0.0
    if peak > FP16_SAFE_MAX:
        raise CodecInputError(
            f"{what} has magnitude {peak:.3g} > {FP16_SAFE_MAX:g}, beyond the float16 scales of the "
            f"quantized tiers; keep such a model on bf16 tiers (--kv-compression bf16)"
        )


class SideCodec:
    """Quantizes one side (K or V) of a tier for a fixed head_dim.

    Invariant: ``dequantize(*quantize(x))`` is within ``error_bound(x)`` of ``x`` (in the stored
    basis) for every finite x with |x| <= FP16_SAFE_MAX.
    """

    def __init__(self, bits: int, head_dim: int, group_size: int, per_channel: bool,
                 rotate: bool, page_size: int):
        self.bits = bits
        self.head_dim = head_dim
        self.group_size = group_size
        self.per_channel = per_channel
        self.rotate = rotate
        self.page_size = page_size
        if bits < 16:
            if not per_channel and head_dim % group_size:
                raise TierSpecError(
                    f"group size {group_size} does not divide head_dim {head_dim}; pick a divisor "
                    f"of {head_dim} with -g<N>"
                )
            if head_dim % codes_per_byte(bits):
                raise TierSpecError(f"head_dim {head_dim} is not a multiple of {codes_per_byte(bits)}")
        if per_channel and page_size < CHANNEL_GROUPING_MIN_PAGE:
            raise TierSpecError(
                f"per-channel key grouping (-kc) groups the tokens of a page; it needs "
                f"--page-size >= {CHANNEL_GROUPING_MIN_PAGE}, got {page_size}"
            )
        if rotate:
            hadamard(head_dim)  # validates power of two

    @property
    def data_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bits == 16 else torch.uint8

    @property
    def bytes_per_head_data(self) -> int:
        return self.head_dim * 2 if self.bits == 16 else self.head_dim * self.bits // 8

    def data_shape(self, num_slots: int, num_heads: int) -> Tuple[int, ...]:
        return (num_slots, num_heads, self.head_dim if self.bits == 16 else self.bytes_per_head_data)

    def meta_shape(self, num_slots: int, num_heads: int) -> Optional[Tuple[int, ...]]:
        if self.bits == 16:
            return None
        if self.per_channel:
            return (num_slots // self.page_size, num_heads, self.head_dim, 2)
        return (num_slots, num_heads, self.head_dim // self.group_size, 2)

    def bytes_per_token_head(self) -> float:
        """Storage bytes per token per KV head, metadata included."""
        if self.bits == 16:
            return float(self.head_dim * 2)
        meta_elems = (self.head_dim / self.page_size if self.per_channel
                      else self.head_dim // self.group_size)
        return self.bytes_per_head_data + meta_elems * 2 * KVC_META_DTYPE.itemsize

    def to_stored_basis(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x @ hadamard(self.head_dim, x.device) if self.rotate else x

    def from_stored_basis(self, x: torch.Tensor) -> torch.Tensor:
        return x @ hadamard(self.head_dim, x.device) if self.rotate else x

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        tokens, heads, dim = x.shape
        if self.per_channel:
            if tokens % self.page_size:
                raise ValueError(f"per-channel grouping needs whole pages; got {tokens} tokens")
            return x.view(tokens // self.page_size, self.page_size, heads, dim).permute(0, 2, 3, 1)
        return x.view(tokens, heads, dim // self.group_size, self.group_size)

    def _ungrouped(self, grouped: torch.Tensor, tokens: int, heads: int) -> torch.Tensor:
        if self.per_channel:
            return grouped.permute(0, 3, 1, 2).reshape(tokens, heads, self.head_dim)
        return grouped.reshape(tokens, heads, self.head_dim)

    def quantize(self, x: torch.Tensor, checked: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x ``[N, H, D]`` float -> (data, meta) in the layout of the module docstring."""
        if checked:
            check_finite_and_in_range(x, "KV input")
        if self.bits == 16:
            return x.to(torch.bfloat16), None
        tokens, heads, _ = x.shape
        codes, meta = quantize_groups(self._grouped(self.to_stored_basis(x)), self.bits)
        return pack_codes(self._ungrouped(codes, tokens, heads), self.bits), meta

    def dequantize_stored(self, data: torch.Tensor, meta: Optional[torch.Tensor]) -> torch.Tensor:
        """(data, meta) -> float32 ``[N, H, D]`` in the stored (possibly rotated) basis."""
        if self.bits == 16:
            return data.float()
        tokens, heads, _ = data.shape
        codes = self._grouped(unpack_codes(data, self.bits))
        return self._ungrouped(dequantize_groups(codes, meta), tokens, heads)

    def dequantize(self, data: torch.Tensor, meta: Optional[torch.Tensor]) -> torch.Tensor:
        """(data, meta) -> float32 ``[N, H, D]`` in the original basis."""
        return self.from_stored_basis(self.dequantize_stored(data, meta))

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Per-element bound ``[N, H, D]`` (stored basis) on the error of quantizing x."""
        stored = self.to_stored_basis(x)
        if self.bits == 16:
            return stored.abs() * 2.0**-8
        tokens, heads, _ = x.shape
        _, meta = quantize_groups(self._grouped(stored), self.bits)
        bound = group_error_bound(meta, self.bits)[..., None].expand(*meta.shape[:-1], self._group_len())
        return self._ungrouped(bound, tokens, heads)

    def _group_len(self) -> int:
        return self.page_size if self.per_channel else self.group_size


class TierCodec:
    """A TierSpec bound to a model's head_dim and the pool's page size: K and V side codecs."""

    def __init__(self, spec: TierSpec, head_dim: int, page_size: int, v_head_dim: Optional[int] = None):
        self.spec = spec
        self.head_dim = head_dim
        self.page_size = page_size
        try:
            self.k = SideCodec(spec.bits_k, head_dim, spec.effective_group_size(head_dim),
                               spec.key_grouping == "channel", spec.rotate_keys, page_size)
            v_dim = v_head_dim or head_dim
            self.v = SideCodec(spec.bits_v, v_dim, spec.effective_group_size(v_dim), False, False, page_size)
        except TierSpecError as err:
            raise TierSpecError(f"tier {spec.name}: {err}") from None

    @property
    def name(self) -> str:
        return self.spec.name

    def bytes_per_token(self, num_kv_heads: int, num_layers: int) -> float:
        """Bytes one token occupies in this tier over all layers and KV heads, metadata included."""
        per_head = self.k.bytes_per_token_head() + self.v.bytes_per_token_head()
        return per_head * num_kv_heads * num_layers


def requantize(src: TierCodec, dst: TierCodec, k_data, k_meta, v_data, v_meta):
    """Move one batch of whole pages from tier ``src`` to tier ``dst`` (the demotion reference).

    Inputs and outputs use each tier's packed layout for the same tokens, in the same order.
    """
    k = src.k.dequantize(k_data, k_meta)
    v = src.v.dequantize(v_data, v_meta)
    new_k = dst.k.quantize(k, checked=False)
    new_v = dst.v.quantize(v, checked=False)
    return new_k + new_v
