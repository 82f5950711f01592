"""Token allocator over the tiered pool: SGLang's allocators for the write tier, free lists below it."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator

from sglang_kvc.pool import TieredKVPool


class TierFullError(RuntimeError):
    """A tier has fewer free pages than a demotion needs; the caller must make room first."""


class TieredAllocatorMixin:
    """Free-page bookkeeping for every tier of a TieredKVPool.

    Invariant, per tier ``t``: ``free_tokens(t) + used_tokens(t) == capacity_tokens(t)``, where
    the write tier's free pages are SGLang's own ``free_pages`` + ``release_pages`` (so SGLang's
    ``alloc``, ``alloc_extend`` and ``alloc_decode`` serve the write tier unchanged) and each lower
    tier's are ``lower_free_pages[t]``. A page is in at most one free list; ``free`` routes every
    index to its tier's list by page range.
    """

    _kvcache: TieredKVPool

    def _init_tiers(self, pool: TieredKVPool) -> None:
        self.layout = pool.layout
        self.lower_free_pages: Dict[int, torch.Tensor] = {}
        self.demoted_pages = [0] * pool.layout.num_tiers
        self.clear()

    @property
    def pool(self) -> TieredKVPool:
        return self._kvcache

    # ---- SGLang's allocator interface -----------------------------------------------------
    def clear(self):
        super().clear()
        start, end = self.layout.tier_pages(0)
        self.free_pages = torch.arange(start, end, dtype=torch.int64, device=self.device)
        for t in range(1, self.layout.num_tiers):
            start, end = self.layout.tier_pages(t)
            self.lower_free_pages[t] = torch.arange(start, end, dtype=torch.int64, device=self.device)

    def free(self, free_index: torch.Tensor):
        if free_index.numel() == 0:
            return
        if not self.is_not_in_free_group:
            self.free_group.append(free_index)
            return
        write_end_slot = self.layout.tier_pages(0)[1] * self.page_size
        if int(free_index.max()) < write_end_slot:
            super().free(free_index)
            return
        pages = torch.unique(free_index // self.page_size)
        tiers = self.layout.tier_of_pages(pages)
        write_pages = pages[tiers == 0]
        if len(write_pages):
            super().free(write_pages * self.page_size)
        for t in range(1, self.layout.num_tiers):
            tier_pages = pages[tiers == t]
            if len(tier_pages):
                self.lower_free_pages[t] = torch.cat((self.lower_free_pages[t], tier_pages))

    def backup_state(self):
        return (super().backup_state(), {t: p for t, p in self.lower_free_pages.items()})

    def restore_state(self, state):
        write_state, lower = state
        super().restore_state(write_state)
        self.lower_free_pages = dict(lower)

    def resize(self, config) -> None:
        raise NotImplementedError("the tiered KV pool is sized once from its byte budget; it cannot resize")

    # ---- tiers ------------------------------------------------------------------------------
    def capacity_tokens(self, tier: int) -> int:
        return self.layout.capacity_tokens(tier)

    def free_tokens(self, tier: int) -> int:
        if tier == 0:
            return (len(self.free_pages) + len(self.release_pages)) * self.page_size
        return len(self.lower_free_pages[tier]) * self.page_size

    def used_tokens(self, tier: int) -> int:
        return self.capacity_tokens(tier) - self.free_tokens(tier)

    def alloc_pages(self, tier: int, num_pages: int) -> Optional[torch.Tensor]:
        """Global page ids of ``num_pages`` free pages of ``tier``, or None if it has too few."""
        if tier == 0:
            slots = self.alloc(num_pages * self.page_size)
            return None if slots is None else slots[:: self.page_size] // self.page_size
        free = self.lower_free_pages[tier]
        if num_pages > len(free):
            return None
        self.lower_free_pages[tier] = free[num_pages:]
        return free[:num_pages]

    def demote(self, indices: torch.Tensor, to_tier: int) -> torch.Tensor:
        """Move the whole pages holding ``indices`` to ``to_tier`` and return their new indices.

        ``indices`` (int64, a multiple of page_size long, whole pages in order, as radix-tree
        values are) must all sit in one tier above ``to_tier``. The destination pages are taken
        from ``to_tier``'s free list (TierFullError if too few: make room first), every layer is
        requantized in one batch, and the source pages are freed.
        """
        if len(indices) == 0:
            return indices
        if len(indices) % self.page_size:
            raise ValueError(f"demote needs whole pages; got {len(indices)} indices at page size {self.page_size}")
        src_pages = indices[:: self.page_size] // self.page_size
        src_tiers = self.layout.tier_of_pages(src_pages)
        from_tier = int(src_tiers[0])
        if not bool((src_tiers == from_tier).all()):
            raise ValueError("demote takes indices of one tier per call")
        if not from_tier < to_tier < self.layout.num_tiers:
            raise ValueError(f"cannot demote from tier {from_tier} to tier {to_tier}")
        dst_pages = self.alloc_pages(to_tier, len(src_pages))
        if dst_pages is None:
            raise TierFullError(
                f"tier {self.layout.codecs[to_tier].name} has {self.free_tokens(to_tier)} free tokens, "
                f"demotion needs {len(indices)}")
        self.pool.move_pages(from_tier, src_pages, to_tier, dst_pages)
        self.free(src_pages * self.page_size)
        self.demoted_pages[to_tier] += len(src_pages)
        offsets = indices - src_pages.repeat_interleave(self.page_size) * self.page_size
        return dst_pages.repeat_interleave(self.page_size) * self.page_size + offsets

    def check_free_lists(self) -> None:
        """Raise if a free page is listed twice or lies outside its tier (a double free or leak)."""
        self.merge_and_sort_free()
        lists = {0: self.free_pages}
        lists.update(self.lower_free_pages)
        for t, pages in lists.items():
            start, end = self.layout.tier_pages(t)
            if len(pages) and (int(pages.min()) < start or int(pages.max()) >= end):
                raise AssertionError(f"tier {t} free list holds a page outside [{start}, {end})")
            if len(torch.unique(pages)) != len(pages):
                raise AssertionError(f"tier {t} free list holds a page twice (double free)")

    def tier_summary(self) -> List[dict]:
        return [{"tier": self.layout.codecs[t].name, "capacity": self.capacity_tokens(t),
                 "free": self.free_tokens(t), "used": self.used_tokens(t)}
                for t in range(self.layout.num_tiers)]


class TieredTokenAllocator(TieredAllocatorMixin, TokenToKVPoolAllocator):
    """Page size 1: SGLang's TokenToKVPoolAllocator for the write tier."""

    def __init__(self, pool: TieredKVPool, device: str = "cpu", need_sort: bool = False):
        self.layout = pool.layout
        self.lower_free_pages = {}
        TokenToKVPoolAllocator.__init__(self, pool.layout.capacity_tokens(0), pool.dtype, device, pool, need_sort)
        self._init_tiers(pool)


class TieredPagedAllocator(TieredAllocatorMixin, PagedTokenToKVPoolAllocator):
    """Page size > 1: SGLang's PagedTokenToKVPoolAllocator for the write tier."""

    def __init__(self, pool: TieredKVPool, device: str = "cpu", need_sort: bool = False):
        self.layout = pool.layout
        self.lower_free_pages = {}
        PagedTokenToKVPoolAllocator.__init__(self, pool.layout.capacity_tokens(0), pool.page_size,
                                             pool.dtype, device, pool, need_sort)
        self._init_tiers(pool)


def make_tiered_allocator(pool: TieredKVPool, device: str = "cpu", need_sort: bool = False):
    cls = TieredTokenAllocator if pool.page_size == 1 else TieredPagedAllocator
    return cls(pool, device, need_sort)
