"""How one kv-index space is split into page-aligned tier ranges, and how a byte budget sizes them."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch

from sglang_kvc.codec import TierCodec
from sglang_kvc.tiers import TierSpec, TierSpecError, parse_tier

GIB = 1 << 30


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


def default_fractions(num_tiers: int) -> Tuple[float, ...]:
    """Byte shares when none are given: 10% for the write tier and for each middle tier, the rest
    for the last tier. Total token capacity is what keeps multi-turn history cached
    (benchmarks/results/cache_sim-2026-11-23.json: this split saved 1.9x the prefill tokens of
    0.4/0.3/0.3 at a quarter of the working set); ``min_write_tokens`` grows the write tier."""
    if num_tiers == 1:
        return (1.0,)
    upper = (0.1,) * (num_tiers - 1)
    return upper + (1.0 - sum(upper),)


class TierLayout:
    """Page-aligned partition of the kv-index space.

    Invariant: tier ``t`` owns the global pages ``[first_page[t], first_page[t] + num_pages[t])``;
    the ranges are contiguous and increasing, and page 0 (SGLang's padding page, the target of
    dummy writes from padded tokens) belongs to no tier but is stored in tier 0's buffers. A
    global slot ``s`` lives on page ``s // page_size``.
    """

    def __init__(self, codecs: Sequence[TierCodec], num_pages: Sequence[int], page_size: int,
                 kv_shape: KVShape):
        if len(codecs) != len(num_pages):
            raise ValueError("one page count per tier is needed")
        for codec, pages in zip(codecs, num_pages):
            if pages < 1:
                raise TierSpecError(
                    f"tier {codec.name} gets {pages} pages; the KV byte budget is too small for one "
                    f"page per tier: raise --mem-fraction-static or use fewer tiers"
                )
        if codecs[0].k.per_channel:
            raise TierSpecError(
                f"the write tier {codecs[0].name} cannot group keys per channel (-kc): tokens are "
                f"written one at a time; use -kc on lower tiers only"
            )
        self.codecs = tuple(codecs)
        self.num_pages = tuple(int(p) for p in num_pages)
        self.page_size = page_size
        self.kv_shape = kv_shape
        firsts, first = [], 1
        for pages in self.num_pages:
            firsts.append(first)
            first += pages
        self.first_page = tuple(firsts)
        self.total_pages = first  # padding page included
        self._page_bounds_cpu = torch.tensor(self.first_page[1:] + (first,), dtype=torch.int64)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_budget(cls, specs: Sequence[TierSpec], kv_shape: KVShape, page_size: int,
                    budget_bytes: float, fractions: Optional[Sequence[float]] = None,
                    min_write_tokens: int = 0) -> "TierLayout":
        """Size each tier from its share of ``budget_bytes`` (the padding page is paid first).

        Without ``fractions`` the default split is used, but the write tier grows to hold at least
        ``min_write_tokens`` (the longest request the scheduler must admit) when the budget allows.
        """
        codecs = [TierCodec(s, kv_shape.head_dim, page_size, kv_shape.v_head_dim) for s in specs]
        if fractions is None:
            fractions = default_fractions(len(specs))
            write_bpt = codecs[0].bytes_per_token(kv_shape.num_kv_heads, kv_shape.num_layers)
            wanted = min(0.9, (min_write_tokens + 2 * page_size) * write_bpt / budget_bytes)
            if len(specs) > 1 and wanted > fractions[0]:
                scale = (1 - wanted) / sum(fractions[1:])
                fractions = (wanted,) + tuple(f * scale for f in fractions[1:])
        fractions = tuple(fractions)
        if len(fractions) != len(specs):
            raise TierSpecError(
                f"{len(fractions)} tier fractions given for {len(specs)} tiers; give one per tier"
            )
        if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise TierSpecError(f"tier fractions {fractions} must be positive and sum to 1")
        page_bytes = [c.bytes_per_token(kv_shape.num_kv_heads, kv_shape.num_layers) * page_size
                      for c in codecs]
        usable = budget_bytes - page_bytes[0]
        num_pages = [int(usable * f // pb) if usable > 0 else 0 for f, pb in zip(fractions, page_bytes)]
        return cls(codecs, num_pages, page_size, kv_shape)

    @classmethod
    def from_tokens(cls, specs: Sequence[TierSpec | str], kv_shape: KVShape, page_size: int,
                    tokens_per_tier: Sequence[int]) -> "TierLayout":
        """Size tiers by token counts (rounded down to pages); for tests and the simulator."""
        specs = [parse_tier(s) if isinstance(s, str) else s for s in specs]
        codecs = [TierCodec(s, kv_shape.head_dim, page_size, kv_shape.v_head_dim) for s in specs]
        return cls(codecs, [t // page_size for t in tokens_per_tier], page_size, kv_shape)

    # ---- queries ------------------------------------------------------------------------
    @property
    def num_tiers(self) -> int:
        return len(self.codecs)

    @property
    def write_tier(self) -> int:
        return 0

    def capacity_tokens(self, tier: int) -> int:
        return self.num_pages[tier] * self.page_size

    @property
    def total_capacity_tokens(self) -> int:
        return sum(self.capacity_tokens(t) for t in range(self.num_tiers))

    def tier_pages(self, tier: int) -> Tuple[int, int]:
        """Global page range ``[start, end)`` of a tier."""
        return self.first_page[tier], self.first_page[tier] + self.num_pages[tier]

    def storage_first_page(self, tier: int) -> int:
        """Global page stored at local page 0 of the tier's buffers (tier 0 stores the padding page)."""
        return 0 if tier == 0 else self.first_page[tier]

    def storage_slots(self, tier: int) -> int:
        return (self.first_page[tier] + self.num_pages[tier] - self.storage_first_page(tier)) * self.page_size

    def tier_of_pages(self, pages: torch.Tensor) -> torch.Tensor:
        """Tier id (int64) of each global page; the padding page maps to tier 0."""
        bounds = self._page_bounds_cpu.to(pages.device)
        return torch.bucketize(pages, bounds, right=True)

    def tier_of_slots(self, slots: torch.Tensor) -> torch.Tensor:
        return self.tier_of_pages(slots // self.page_size)

    def tier_of_page_table(self, device) -> torch.Tensor:
        """int8 ``[total_pages]``: the tier of every global page, for kernels."""
        pages = torch.arange(self.total_pages, dtype=torch.int64)
        return self.tier_of_pages(pages).to(torch.int8).to(device)

    def bytes_per_token(self, tier: int) -> float:
        return self.codecs[tier].bytes_per_token(self.kv_shape.num_kv_heads, self.kv_shape.num_layers)

    def bf16_bytes_per_token(self) -> int:
        shape = self.kv_shape
        return 2 * shape.num_layers * shape.num_kv_heads * (shape.head_dim + shape.value_head_dim)

    def total_bytes(self) -> float:
        pages = list(self.num_pages)
        pages[0] += 1  # padding page
        return sum(p * self.page_size * self.bytes_per_token(t) for t, p in enumerate(pages))

    def report(self) -> List[dict]:
        """Per tier: capacity, bytes per token, tokens per GiB and that relative to bf16."""
        bf16_bpt = self.bf16_bytes_per_token()
        rows = []
        for t, codec in enumerate(self.codecs):
            bpt = self.bytes_per_token(t)
            rows.append({
                "tier": codec.name,
                "pages": self.num_pages[t],
                "tokens": self.capacity_tokens(t),
                "bytes_per_token": bpt,
                "tokens_per_gib": GIB / bpt,
                "tokens_per_gib_vs_bf16": bf16_bpt / bpt,
            })
        return rows

    def describe(self) -> str:
        return ", ".join(
            f"{row['tier']}: {row['tokens']} tokens ({row['tokens_per_gib_vs_bf16']:.2f}x bf16/GiB)"
            for row in self.report())
