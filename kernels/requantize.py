"""Requantize: move a batch of whole pages from one tier to another (what demotion calls).

One launch covers every layer, head and side (K and V): grid ``[row blocks, head blocks, layers]``.
A *row* is one token of one head (a head vector); the rows of a batch are ordered (page, token,
head), so a program that takes every head of a page (``RequantConfig.heads``) reads and writes each
page region as one contiguous chunk. Each program dequantizes ``RequantConfig.rows`` rows of the
source tier, changes basis if exactly one tier rotates keys, and quantizes them into the destination
tier's layout (``-kc`` destinations get one group per channel per page, so a program then holds
whole pages). Each thread holds whole rows, as 16-element units of 32-bit words in the destination's
packing order (``quant_jit``): packing is elementwise, a group's reductions and meta stay in one
thread, a division is one reciprocal per group plus an exact correction. A side whose codec does not
change (V of k4v2 -> k2v2) keeps its codes when that is provably what requantizing gives (copied;
meta recomputed).

Launcher ``requantize_pages`` (launch shape from ``REQUANT_CONFIGS``, chosen per ladder step by
``benchmarks/kernels.py --requant-sweep``); reference ``requantize_pages_reference``
(``ReferenceKVOps.requantize``). Bit-identical to the reference when neither tier rotates keys;
otherwise within one code step (see ``quantize.py``). Pages are local to their tier and addressed in
the frame arena (``frame_jit``); only the destination pages' bytes are written (the caller gives each
tier its own frames).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from .frame_jit import page_row_offset, page_unit, token_offset
from .quant_jit import load_units, requantize_units
from .spec import KernelSupportError, check_tensor, frame_units, hadamard_signs, row_strides, side_tensors
from sglang_kvc.layout import ALIGN

MIN_ROWS = 16  # tl.dot (key rotation) needs 16 rows; tl.arange a power of two


@dataclasses.dataclass(frozen=True)
class RequantConfig:
    """Launch shape of the requantize kernel: ``rows`` head vectors per program (power of two >=
    16), at most ``heads`` heads of a page per row block (a power of two; the largest power of two
    that divides the pool's KV heads and is <= ``heads`` is used, so ``heads=8`` with 8 KV heads
    makes each program's bytes contiguous within a page), ``warps`` warps per program, ``maxnreg``
    a register cap per thread (None: the compiler's choice), ``prefetch``: issue V's loads before
    K's arithmetic (hides their latency, holds more registers). A thread holds whole rows: ``rows``
    below ``32 * warps`` leaves threads idle."""

    rows: int = 64
    heads: int = 8
    warps: int = 2
    maxnreg: Optional[int] = None
    prefetch: bool = True

    def __post_init__(self):
        for name in ("rows", "heads", "warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"RequantConfig.{name} must be a power of two, got {value}")
        if self.rows < MIN_ROWS:
            raise ValueError(f"RequantConfig.rows must be >= {MIN_ROWS}, got {self.rows}")
        if self.warps > 16:
            raise ValueError(f"RequantConfig.warps must be <= 16, got {self.warps}")


def step_key(src_codec, dst_codec) -> str:
    """Table key of a ladder step from its tiers' bits: ``"k16v16->k8v8"`` (bf16 -> k8v8)."""
    return (f"k{src_codec.k.bits}v{src_codec.v.bits}->k{dst_codec.k.bits}v{dst_codec.v.bits}")


# Launch shapes ``benchmarks/kernels.py --requant-sweep`` tries on every ladder step (each compiles
# once per step, seconds of CPU, so the list stays short); the tests run every one of them.
SWEEP_CONFIGS = (RequantConfig(64, 8, 2), RequantConfig(32, 8, 1), RequantConfig(128, 8, 4),
                 RequantConfig(64, 8, 2, prefetch=False), RequantConfig(64, 8, 2, maxnreg=128))

# Launch shape per ladder step (keys: ``step_key``); steps not listed use DEFAULT_CONFIG. The best
# of SWEEP_CONFIGS per step on an H200 (benchmarks/results/kernels-nvidia-h200-2026-12-01-requant.json,
# head_dim 128, 8 KV heads; the bf16 step's former 128-register cap ran at 0.70 TB/s there).
DEFAULT_CONFIG = RequantConfig()
REQUANT_CONFIGS: Dict[str, RequantConfig] = {
    "k16v16->k8v8": RequantConfig(rows=64, heads=8, warps=2, prefetch=False),  # 2.33 TB/s
    "k8v8->k4v4": RequantConfig(rows=64, heads=8, warps=2, prefetch=False),  # 2.27 TB/s
    "k4v4->k4v2": RequantConfig(rows=128, heads=8, warps=4),  # 1.37 TB/s
    "k4v2->k2v2": RequantConfig(rows=64, heads=8, warps=2, prefetch=False),  # 2.08 TB/s
}


# counts and index-array offsets vary per launch: one compile serves them all (precompile.py)
@triton.jit(do_not_specialize=["n_pages"], do_not_specialize_on_alignment=["SRC_PAGES", "DST_PAGES"])
def _requant_kernel(SRC, DST, SRC_STRIDES, DST_STRIDES, SRC_PAGES, DST_PAGES, HSIGN, n_pages, layer_units,
                    RB: tl.constexpr, HB: tl.constexpr, PS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                    S_BK: tl.constexpr, S_GK: tl.constexpr, S_KC: tl.constexpr, S_BV: tl.constexpr,
                    S_GV: tl.constexpr, S_PPF: tl.constexpr, S_PAGE_UNITS: tl.constexpr, S_WASTE_UNITS: tl.constexpr,
                    D_BK: tl.constexpr, D_GK: tl.constexpr, D_KC: tl.constexpr, D_BV: tl.constexpr,
                    D_GV: tl.constexpr, D_PPF: tl.constexpr, D_PAGE_UNITS: tl.constexpr, D_WASTE_UNITS: tl.constexpr,
                    CHANGE_BASIS: tl.constexpr, PREFETCH: tl.constexpr):
    """SRC/DST: the tiers' (k data, k meta, v data, v meta) arena views ``[layers, frames, R, T,
    heads, X]``, *_STRIDES their (token, head) strides; layer_units: a layer's arena row in ALIGN
    units (``frame_jit``), which places layer ``l``'s page at unit ``l * layer_units + page unit``.
    Program ``(b, h, l)`` takes rows ``b * RB ..`` of head block ``h`` in layer ``l``; row ``r`` is
    head ``h * HB + r % HB`` of token ``(r // HB) % PS`` of page ``r // (HB * PS)`` of the batch."""
    S_K: tl.constexpr = 2 if S_BK == 16 else 1
    S_V: tl.constexpr = 2 if S_BV == 16 else 1
    D_K: tl.constexpr = 2 if D_BK == 16 else 1
    D_V: tl.constexpr = 2 if D_BV == 16 else 1
    r = tl.program_id(0) * RB + tl.arange(0, RB)
    head = tl.program_id(1) * HB + r % HB
    tok = (r // HB) % PS
    page_idx = r // (HB * PS)
    rmask = page_idx < n_pages
    layer_unit = tl.program_id(2).to(tl.int64) * layer_units
    src = layer_unit + page_unit(tl.load(SRC_PAGES + page_idx, mask=rmask, other=0).to(tl.int32), S_PPF,
                                 S_PAGE_UNITS, S_WASTE_UNITS)
    dst = layer_unit + page_unit(tl.load(DST_PAGES + page_idx, mask=rmask, other=0).to(tl.int32), D_PPF,
                                 D_PAGE_UNITS, D_WASTE_UNITS)
    ss = SRC_STRIDES
    ds = DST_STRIDES
    k_data, k_meta = load_units(SRC[0], SRC[1], token_offset(src, tok, head, ss[0], S_K),
                                _meta_at(src, tok, head, ss[1], S_KC), rmask, RB, D, S_BK, S_GK, S_KC)
    if PREFETCH:  # V's loads first too, so their latency hides behind K's arithmetic (more registers)
        v_data, v_meta = load_units(SRC[2], SRC[3], token_offset(src, tok, head, ss[2], S_V),
                                    token_offset(src, tok, head, ss[3], 4), rmask, RB, DV, S_BV, S_GV, False)
    requantize_units(k_data, k_meta, DST[0], DST[1], token_offset(dst, tok, head, ds[0], D_K),
                     _meta_at(dst, tok, head, ds[1], D_KC), rmask, HSIGN, CHANGE_BASIS, RB, PS, HB, D,
                     S_BK, S_GK, S_KC, D_BK, D_GK, D_KC)
    if not PREFETCH:
        v_data, v_meta = load_units(SRC[2], SRC[3], token_offset(src, tok, head, ss[2], S_V),
                                    token_offset(src, tok, head, ss[3], 4), rmask, RB, DV, S_BV, S_GV, False)
    requantize_units(v_data, v_meta, DST[2], DST[3], token_offset(dst, tok, head, ds[2], D_V),
                     token_offset(dst, tok, head, ds[3], 4), rmask, HSIGN, False, RB, PS, HB, DV,
                     S_BV, S_GV, False, D_BV, D_GV, False)


@triton.jit
def _meta_at(unit, tok, head, S, KC: tl.constexpr):
    """Offset of a token's int32 meta row: its own, or for -kc its page's single row (every token
    of a page addresses it)."""
    if KC:
        return page_row_offset(unit, head, S, 4)
    else:
        return token_offset(unit, tok, head, S, 4)


def _tier_tensors(pool, tier: int):
    """The tier's (k data, k meta, v data, v meta) views, all layers, and their (token, head) strides."""
    buffers = pool.tiers[tier]
    tensors = tuple(x for side in (buffers.k, buffers.v) for x in side_tensors(side))
    return tensors, tuple(row_strides(pool.layout, tier, x) for x in tensors)


def requant_config(pool, src_tier: int, dst_tier: int) -> RequantConfig:
    """The table's launch shape for this step (``REQUANT_CONFIGS``, else ``DEFAULT_CONFIG``)."""
    return REQUANT_CONFIGS.get(step_key(pool.tiers[src_tier].codec, pool.tiers[dst_tier].codec), DEFAULT_CONFIG)


def launch_shape(config: RequantConfig, heads: int, page: int, per_channel: bool):
    """(rows per program, heads per row block) actually used: heads is the largest power of two that
    divides ``heads`` and is <= ``config.heads``; a ``-kc`` side needs whole pages per program."""
    head_block = 1
    while head_block * 2 <= config.heads and heads % (head_block * 2) == 0:
        head_block *= 2
    rows = config.rows
    if per_channel:
        rows = max(rows, page * head_block)
    return rows, head_block


def requantize_pages(pool, src_tier: int, src_local_pages: torch.Tensor, dst_tier: int,
                     dst_local_pages: torch.Tensor, config: Optional[RequantConfig] = None,
                     compile_only: bool = False) -> None:
    """Move pages ``src_local_pages`` (int64 ``[P]``, local to the source tier's buffers) to
    ``dst_local_pages`` (int64 ``[P]``, local to the destination's), all layers, K and V.
    ``config``: launch shape (default: ``requant_config``); ``compile_only``: compile, launch nothing
    (``benchmarks/kernels.py`` compiles its sweep's shapes in parallel processes)."""
    device = torch.device(pool.device)
    check_tensor("src_local_pages", src_local_pages, (torch.int32, torch.int64), 1, device)
    check_tensor("dst_local_pages", dst_local_pages, (torch.int32, torch.int64), 1, device)
    if src_local_pages.numel() != dst_local_pages.numel():
        raise ValueError(f"{src_local_pages.numel()} source pages for {dst_local_pages.numel()} destination pages")
    if src_tier == dst_tier:
        raise ValueError(f"requantize moves pages between two tiers; got tier {src_tier} twice")
    page = pool.page_size
    if page & (page - 1):
        raise KernelSupportError(f"the Triton requantize kernel needs a power-of-two page size, got {page}")
    n_pages = src_local_pages.numel()
    if n_pages == 0 and not compile_only:
        return
    src, dst = pool.tiers[src_tier], pool.tiers[dst_tier]
    src_tensors, src_strides = _tier_tensors(pool, src_tier)
    dst_tensors, dst_strides = _tier_tensors(pool, dst_tier)
    layout = pool.layout
    s_ppf, s_units, s_waste = frame_units(layout, src_tier)
    d_ppf, d_units, d_waste = frame_units(layout, dst_tier)
    change_basis = src.codec.k.rotate != dst.codec.k.rotate
    signs = hadamard_signs(pool.head_dim, device).float() if change_basis else src_tensors[0]
    config = config or requant_config(pool, src_tier, dst_tier)
    rows, head_block = launch_shape(config, pool.head_num, page, src.codec.k.per_channel or dst.codec.k.per_channel)
    grid = (max(1, triton.cdiv(n_pages * page * head_block, rows)), pool.head_num // head_block, pool.layer_num)
    ck, cv, dk, dv = src.codec.k, src.codec.v, dst.codec.k, dst.codec.v
    args = (src_tensors, dst_tensors, src_strides, dst_strides, src_local_pages, dst_local_pages, signs, n_pages,
            layout.num_frames * layout.frame_bytes // ALIGN)
    constants = dict(
        RB=rows, HB=head_block, PS=page, D=pool.head_dim, DV=pool.v_head_dim,
        S_BK=ck.bits, S_GK=ck.group_size, S_KC=ck.per_channel, S_BV=cv.bits, S_GV=cv.group_size,
        S_PPF=s_ppf, S_PAGE_UNITS=s_units, S_WASTE_UNITS=s_waste,
        D_BK=dk.bits, D_GK=dk.group_size, D_KC=dk.per_channel, D_BV=dv.bits, D_GV=dv.group_size,
        D_PPF=d_ppf, D_PAGE_UNITS=d_units, D_WASTE_UNITS=d_waste,
        CHANGE_BASIS=change_basis, PREFETCH=config.prefetch, num_warps=config.warps, maxnreg=config.maxnreg,
        enable_fp_fusion=False)
    if compile_only:
        _requant_kernel.warmup(*args, grid=grid, **constants)
    else:
        _requant_kernel[grid](*args, **constants)


def requantize_pages_reference(pool, src_tier, src_local_pages, dst_tier, dst_local_pages) -> None:
    """Plain torch: dequantize, change basis, quantize, layer by layer (``ReferenceKVOps``)."""
    from sglang_kvc.pool import ReferenceKVOps

    ReferenceKVOps().requantize(pool, src_tier, src_local_pages, dst_tier, dst_local_pages)


def requantize_bytes(pool, src_tier: int, dst_tier: int, n_pages: int) -> int:
    """Bytes a requantize of ``n_pages`` reads plus writes (data and meta, all layers, K and V)."""
    tokens = n_pages * pool.page_size
    return int(tokens * (pool.layout.bytes_per_token(src_tier) + pool.layout.bytes_per_token(dst_tier)))
