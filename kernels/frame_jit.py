"""Triton helpers that turn a tier's local slot or page ids into element offsets in the frame arena
(``sglang_kvc.layout.FrameLayout``), shared by every kernel.

Every region of the arena is aligned to ``ALIGN = 16`` bytes, so offsets are counted in *units* of
16 bytes up to the page and in elements below it. Local page ``p`` of a tier lies in frame
``p // PPF`` at page-in-frame ``p % PPF``, so its first byte in a layer's arena row is unit

    (p // PPF) * FRAME_UNITS + (p % PPF) * PAGE_UNITS = p * PAGE_UNITS + (p // PPF) * WASTE_UNITS

with ``WASTE_UNITS = FRAME_UNITS - PPF * PAGE_UNITS`` (the frame's packing waste): one division by
a compile-time constant, none when the tier fills frames exactly. Local slot ``s`` is token
``s % PAGE`` of local page ``s // PAGE``. A side tensor (codes or meta, any dtype) is a view whose
frame and page strides are those byte sizes (``spec.row_strides`` checks it) and whose base
pointer already holds the region's offset inside the page slot; it adds ``token * S[0] + head *
S[1]`` for its strides ``S = (token, head)`` in its own elements. Ids stay plain integers (no
lookup table); the id arithmetic is unsigned 32-bit (ids < 2^31), the unit offset 64-bit.
"""

import triton
import triton.language as tl

ALIGN_BYTES = tl.constexpr(16)


@triton.jit
def page_unit(page, PPF: tl.constexpr, PAGE_UNITS: tl.constexpr, WASTE_UNITS: tl.constexpr):
    """int64 offset (16-byte units) of local pages ``page`` (int32/uint32 >= 0) in a layer row."""
    unit = page.to(tl.int64) * PAGE_UNITS
    if WASTE_UNITS > 0:
        unit += (page.to(tl.uint32) // PPF).to(tl.int64) * WASTE_UNITS
    return unit


@triton.jit
def slot_unit(slot, PAGE: tl.constexpr, PPF: tl.constexpr, PAGE_UNITS: tl.constexpr,
              WASTE_UNITS: tl.constexpr):
    """Local slots (int32 >= 0) -> (int64 unit offset of their page, int32 token in the page)."""
    s = slot.to(tl.uint32)
    return page_unit(s // PAGE, PPF, PAGE_UNITS, WASTE_UNITS), (s % PAGE).to(tl.int32)


@triton.jit
def token_offset(unit, tok, head, S, ITEM_BYTES: tl.constexpr):
    """Element offset of token ``tok``, head ``head`` of the page at ``unit`` in a view of
    ``ITEM_BYTES``-byte elements with (token, head) strides ``S``."""
    return unit * (ALIGN_BYTES // ITEM_BYTES) + (tok * S[0] + head * S[1])


@triton.jit
def page_row_offset(unit, head, S, ITEM_BYTES: tl.constexpr):
    """Element offset of a page's single ``head`` row (per-channel ``-kc`` meta: one row per page)."""
    return unit * (ALIGN_BYTES // ITEM_BYTES) + head * S[1]
