"""One arena of frames shared by every tier: how page ids map to frames and bytes, and how a byte
budget sizes the arena (DESIGN.md, "one frame arena, elastic tiers")."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch

from sglang_kvc.codec import SideCodec, TierCodec
from sglang_kvc.tiers import TierSpec, TierSpecError, parse_tier

GIB = 1 << 30
ALIGN = 16  # bytes; every region of a page slot starts on this boundary (vector loads, int32/bf16 views)
DEFAULT_FRAME_PAGES = 4  # bf16 pages per frame: README "Frame size" (benchmarks/frame_waste.py)


@dataclasses.dataclass(frozen=True)
class KVShape:
    """The part of a model's shape the KV cache depends on (per tensor-parallel rank)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: Optional[int] = None

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim or self.head_dim


def _align(n: float) -> int:
    return int(-(-int(n) // ALIGN) * ALIGN)


@dataclasses.dataclass(frozen=True)
class SideRegions:
    """Byte offsets (within one page slot of one layer) of a side's codes and meta."""

    data_offset: int
    data_bytes: int
    meta_offset: int
    meta_bytes: int


def side_bytes(codec: SideCodec, page_size: int, heads: int) -> Tuple[int, int]:
    """(codes, meta) bytes of one page of one side in one layer, each aligned to ALIGN."""
    elems = codec.data_shape(page_size, heads)
    data = elems[0] * elems[1] * elems[2] * codec.data_dtype.itemsize
    meta_shape = codec.meta_shape(page_size, heads)
    meta = 0
    if meta_shape is not None:
        meta = 2 * 2  # (scale, zero) float16
        for dim in meta_shape[:-1]:
            meta *= dim
    return _align(data), _align(meta)


def page_regions(codec: TierCodec, page_size: int, heads: int) -> Tuple[SideRegions, SideRegions, int]:
    """(K regions, V regions, page bytes) of one tier's page slot in one layer: K codes, K meta,
    V codes, V meta, back to back."""
    offset = 0
    sides = []
    for side in (codec.k, codec.v):
        data, meta = side_bytes(side, page_size, heads)
        sides.append(SideRegions(offset, data, offset + data, meta))
        offset += data + meta
    return sides[0], sides[1], offset


class FrameLayout:
    """The page-id space of an arena of ``num_frames`` frames, each ``frame_bytes`` bytes per layer.

    Invariants: tier ``t`` packs ``pages_per_frame[t] = frame_bytes // page_bytes[t]`` of its pages
    into a frame and owns the global page ids ``[first_page[t], first_page[t] + num_frames *
    pages_per_frame[t])``; its page ``p`` lives in frame ``(p - first_page[t]) // r_t`` at slot
    ``(p - first_page[t]) % r_t``, byte ``frame * frame_bytes + slot * page_bytes[t]`` of every
    layer's arena row. Which tier owns a frame at a given moment is the allocator's business.
    Page 0 is SGLang's padding page (tier 0, frame 0); global slot ``s`` lies on page
    ``s // page_size``.
    """

    def __init__(self, codecs: Sequence[TierCodec], num_frames: int, page_size: int, kv_shape: KVShape,
                 frame_pages: int = DEFAULT_FRAME_PAGES):
        if num_frames < 1:
            raise TierSpecError(
                "the KV byte budget is smaller than one frame; raise --mem-fraction-static or "
                "--max-total-tokens, or lower --kvc-frame-pages")
        if codecs[0].k.per_channel:
            raise TierSpecError(
                f"the write tier {codecs[0].name} cannot group keys per channel (-kc): tokens are "
                f"written one at a time; use -kc on lower tiers only")
        self.codecs = tuple(codecs)
        self.page_size = page_size
        self.kv_shape = kv_shape
        self.num_frames = int(num_frames)
        self.frame_pages = int(frame_pages)
        heads = kv_shape.num_kv_heads
        self.bf16_page_bytes = page_size * heads * (kv_shape.head_dim + kv_shape.value_head_dim) * 2
        self.frame_bytes = self.frame_pages * self.bf16_page_bytes
        self.regions = [page_regions(c, page_size, heads) for c in self.codecs]
        self.page_bytes = tuple(r[2] for r in self.regions)
        self.pages_per_frame = tuple(self.frame_bytes // pb for pb in self.page_bytes)
        for codec, r in zip(self.codecs, self.pages_per_frame):
            if r < 1:
                raise TierSpecError(f"a page of tier {codec.name} does not fit a frame of "
                                    f"{self.frame_pages} bf16 pages; raise --kvc-frame-pages")
        firsts, first = [], 0
        for r in self.pages_per_frame:
            firsts.append(first)
            first += self.num_frames * r
        self.first_page = tuple(firsts)
        self.total_pages = first
        self._page_bounds_cpu = torch.tensor(self.first_page[1:] + (first,), dtype=torch.int64)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_budget(cls, specs: Sequence[TierSpec], kv_shape: KVShape, page_size: int, budget_bytes: float,
                    frame_pages: int = DEFAULT_FRAME_PAGES) -> "FrameLayout":
        """As many frames as ``budget_bytes`` (all layers) holds."""
        codecs = [TierCodec(s, kv_shape.head_dim, page_size, kv_shape.v_head_dim) for s in specs]
        bf16_page = page_size * kv_shape.num_kv_heads * (kv_shape.head_dim + kv_shape.value_head_dim) * 2
        frame_all_layers = frame_pages * bf16_page * kv_shape.num_layers
        return cls(codecs, int(budget_bytes // frame_all_layers), page_size, kv_shape, frame_pages)

    @classmethod
    def for_bf16_pages(cls, specs: Sequence[TierSpec], kv_shape: KVShape, page_size: int, bf16_pages: int,
                       frame_pages: int = DEFAULT_FRAME_PAGES, extra_frames: int = 0) -> "FrameLayout":
        """The fewest frames that hold the bytes of ``bf16_pages`` bf16 pages plus the padding page
        (stock SGLang's KV bytes at the same budget, rounded up to a whole frame), plus
        ``extra_frames`` (the allocator's reserve)."""
        specs = [parse_tier(s) if isinstance(s, str) else s for s in specs]
        codecs = [TierCodec(s, kv_shape.head_dim, page_size, kv_shape.v_head_dim) for s in specs]
        return cls(codecs, -(-(bf16_pages + 1) // frame_pages) + extra_frames, page_size, kv_shape, frame_pages)

    @classmethod
    def from_frames(cls, specs: Sequence[TierSpec | str], kv_shape: KVShape, page_size: int, num_frames: int,
                    frame_pages: int = DEFAULT_FRAME_PAGES) -> "FrameLayout":
        """A fixed number of frames (tests, simulator)."""
        specs = [parse_tier(s) if isinstance(s, str) else s for s in specs]
        codecs = [TierCodec(s, kv_shape.head_dim, page_size, kv_shape.v_head_dim) for s in specs]
        return cls(codecs, num_frames, page_size, kv_shape, frame_pages)

    # ---- queries ------------------------------------------------------------------------
    @property
    def num_tiers(self) -> int:
        return len(self.codecs)

    @property
    def write_tier(self) -> int:
        return 0

    def tier_pages(self, tier: int) -> Tuple[int, int]:
        """Global page range ``[start, end)`` of a tier (every frame, whoever owns it now)."""
        return self.first_page[tier], self.first_page[tier] + self.num_frames * self.pages_per_frame[tier]

    def frame_page_ids(self, tier: int, frames) -> torch.Tensor:
        """int64 global page ids of ``tier``'s slots in ``frames`` (frame-major order)."""
        frames = torch.as_tensor(frames, dtype=torch.int64).reshape(-1)
        r = self.pages_per_frame[tier]
        return (self.first_page[tier] + frames[:, None] * r + torch.arange(r)).reshape(-1)

    def frame_of_pages(self, tier: int, pages: torch.Tensor) -> torch.Tensor:
        return (pages - self.first_page[tier]) // self.pages_per_frame[tier]

    def tier_of_pages(self, pages: torch.Tensor) -> torch.Tensor:
        """Tier id (int64) of each global page."""
        bounds = self._page_bounds_cpu.to(pages.device)
        return torch.bucketize(pages, bounds, right=True)

    def tier_of_slots(self, slots: torch.Tensor) -> torch.Tensor:
        return self.tier_of_pages(slots // self.page_size)

    def tier_of_page_table(self, device) -> torch.Tensor:
        """int8 ``[total_pages]``: the tier of every global page, for kernels."""
        pages = torch.arange(self.total_pages, dtype=torch.int64)
        return self.tier_of_pages(pages).to(torch.int8).to(device)

    def max_tokens(self, tier: int) -> int:
        """Tokens the tier would hold if it owned every frame."""
        return self.num_frames * self.pages_per_frame[tier] * self.page_size

    def bytes_per_token(self, tier: int) -> float:
        """Bytes per token of the tier's codec, metadata included, all layers (no packing waste)."""
        return self.codecs[tier].bytes_per_token(self.kv_shape.num_kv_heads, self.kv_shape.num_layers)

    def frame_bytes_per_token(self, tier: int) -> float:
        """Arena bytes one token of the tier takes, packing waste included, all layers."""
        return self.frame_bytes * self.kv_shape.num_layers / (self.pages_per_frame[tier] * self.page_size)

    def bf16_bytes_per_token(self) -> int:
        shape = self.kv_shape
        return 2 * shape.num_layers * shape.num_kv_heads * (shape.head_dim + shape.value_head_dim)

    def total_bytes(self) -> int:
        return self.num_frames * self.frame_bytes * self.kv_shape.num_layers

    def packing_waste(self, tier: int) -> float:
        """Share of a frame the tier leaves unused."""
        return 1 - self.pages_per_frame[tier] * self.page_bytes[tier] / self.frame_bytes

    def report(self) -> List[dict]:
        """Per tier: pages per frame, packing waste, bytes per token and tokens per GiB vs bf16."""
        bf16_bpt = self.bf16_bytes_per_token()
        rows = []
        for t, codec in enumerate(self.codecs):
            bpt = self.frame_bytes_per_token(t)
            rows.append({
                "tier": codec.name,
                "pages_per_frame": self.pages_per_frame[t],
                "packing_waste": round(self.packing_waste(t), 4),
                "max_tokens": self.max_tokens(t),
                "bytes_per_token": bpt,
                "tokens_per_gib_vs_bf16": bf16_bpt / bpt,
            })
        return rows

    def describe(self) -> str:
        return f"{self.num_frames} frames of {self.frame_pages} bf16 pages; " + ", ".join(
            f"{row['tier']} {row['pages_per_frame']} pages/frame ({row['tokens_per_gib_vs_bf16']:.2f}x bf16/GiB)"
            for row in self.report())
