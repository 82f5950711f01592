"""Requantize: move a batch of whole pages from one tier to another (what demotion calls).

One launch covers every layer, head and side (K and V): grid ``[page blocks, heads, layers]``,
each program dequantizes ``BT`` rows (one or more whole pages) of the source tier, changes basis
if exactly one tier rotates keys, and quantizes them into the destination tier's layout
(``-kc`` destinations get one group per channel per page). Launcher ``requantize_pages``;
reference ``requantize_pages_reference`` (``ReferenceKVOps.requantize``). Bit-identical to the
reference when neither tier rotates keys; otherwise within one code step (see ``quantize.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant_jit import load_side, rotate, store_side
from .spec import KernelSupportError, check_tensor, hadamard_signs

MIN_ROWS = 16


@triton.jit
def _requant_kernel(SRC, DST, SRC_STRIDES, DST_STRIDES, SRC_PAGES, DST_PAGES, HSIGN, n_pages,
                    BT: tl.constexpr, PS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                    S_BK: tl.constexpr, S_GK: tl.constexpr, S_KC: tl.constexpr, S_BV: tl.constexpr,
                    S_GV: tl.constexpr, D_BK: tl.constexpr, D_GK: tl.constexpr, D_KC: tl.constexpr,
                    D_BV: tl.constexpr, D_GV: tl.constexpr, CHANGE_BASIS: tl.constexpr):
    head = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    r = tl.arange(0, BT)
    page_idx = tl.program_id(0) * (BT // PS) + r // PS
    rmask = page_idx < n_pages
    src_page = tl.load(SRC_PAGES + page_idx, mask=rmask, other=0).to(tl.int64)
    dst_page = tl.load(DST_PAGES + page_idx, mask=rmask, other=0).to(tl.int64)
    src_slot = src_page * PS + r % PS
    dst_slot = dst_page * PS + r % PS
    # strides per tensor: (layer, slot or page, head) for k data, k meta, v data, v meta
    ss = SRC_STRIDES
    ds = DST_STRIDES
    src_kmeta = src_page if S_KC else src_slot
    dst_kmeta = dst_page if D_KC else dst_slot
    k = load_side(SRC[0], SRC[1], layer * ss[0] + src_slot * ss[1] + head * ss[2],
                  layer * ss[3] + src_kmeta * ss[4] + head * ss[5], rmask, BT, PS, D, S_BK, S_GK, S_KC)
    if CHANGE_BASIS:
        k = rotate(k, HSIGN, D, 1.0 / (D ** 0.5))
    store_side(k, DST[0], DST[1], layer * ds[0] + dst_slot * ds[1] + head * ds[2],
               layer * ds[3] + dst_kmeta * ds[4] + head * ds[5], rmask, BT, PS, D, D_BK, D_GK, D_KC)
    v = load_side(SRC[2], SRC[3], layer * ss[6] + src_slot * ss[7] + head * ss[8],
                  layer * ss[9] + src_slot * ss[10] + head * ss[11], rmask, BT, PS, DV, S_BV, S_GV, False)
    store_side(v, DST[2], DST[3], layer * ds[6] + dst_slot * ds[7] + head * ds[8],
               layer * ds[9] + dst_slot * ds[10] + head * ds[11], rmask, BT, PS, DV, D_BV, D_GV, False)


def _tier_tensors(buffers):
    tensors, strides = [], []
    for side in (buffers.k, buffers.v):
        data = side.data
        meta = data if side.meta is None else side.meta.view(torch.int32).squeeze(-1)
        tensors += [data, meta]
        strides += [data.stride(0), data.stride(1), data.stride(2), meta.stride(0), meta.stride(1), meta.stride(2)]
    return tuple(tensors), tuple(strides)


def requantize_pages(pool, src_tier: int, src_local_pages: torch.Tensor, dst_tier: int,
                     dst_local_pages: torch.Tensor) -> None:
    """Move pages ``src_local_pages`` (int64 ``[P]``, local to the source tier's buffers) to
    ``dst_local_pages`` (int64 ``[P]``, local to the destination's), all layers, K and V."""
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
    if n_pages == 0:
        return
    src, dst = pool.tiers[src_tier], pool.tiers[dst_tier]
    src_tensors, src_strides = _tier_tensors(src)
    dst_tensors, dst_strides = _tier_tensors(dst)
    change_basis = src.codec.k.rotate != dst.codec.k.rotate
    signs = hadamard_signs(pool.head_dim, device).float() if change_basis else src_tensors[0]
    rows = max(MIN_ROWS, page)
    grid = (triton.cdiv(n_pages, rows // page), pool.head_num, pool.layer_num)
    ck, cv, dk, dv = src.codec.k, src.codec.v, dst.codec.k, dst.codec.v
    _requant_kernel[grid](
        src_tensors, dst_tensors, src_strides, dst_strides, src_local_pages, dst_local_pages, signs, n_pages,
        BT=rows, PS=page, D=pool.head_dim, DV=pool.v_head_dim,
        S_BK=ck.bits, S_GK=ck.group_size, S_KC=ck.per_channel, S_BV=cv.bits, S_GV=cv.group_size,
        D_BK=dk.bits, D_GK=dk.group_size, D_KC=dk.per_channel, D_BV=dv.bits, D_GV=dv.group_size,
        CHANGE_BASIS=change_basis, num_warps=4, enable_fp_fusion=False)


def requantize_pages_reference(pool, src_tier, src_local_pages, dst_tier, dst_local_pages) -> None:
    """Plain torch: dequantize, change basis, quantize, layer by layer (``ReferenceKVOps``)."""
    from sglang_kvc.pool import ReferenceKVOps

    ReferenceKVOps().requantize(pool, src_tier, src_local_pages, dst_tier, dst_local_pages)


def requantize_bytes(pool, src_tier: int, dst_tier: int, n_pages: int) -> int:
    """Bytes a requantize of ``n_pages`` reads plus writes (data and meta, all layers, K and V)."""
    tokens = n_pages * pool.page_size
    return int(tokens * (pool.layout.bytes_per_token(src_tier) + pool.layout.bytes_per_token(dst_tier)))

