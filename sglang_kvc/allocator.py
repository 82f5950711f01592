"""Frame allocator over the arena: SGLang's own allocator serves the write tier, host books the rest.

A frame is visible to SGLang (then free or used by the write tier), owned by one lower tier, or in
the reserve (DESIGN.md). The write tier's free pages are SGLang's ``free_pages`` + ``release_pages``
(so ``alloc``, ``alloc_extend`` and ``alloc_decode`` run unchanged on the device and
``available_size()`` counts every free frame); a visible frame is free exactly when all its
write-tier pages are free. A lower tier takes free frames (their write pages leave SGLang's free
list), and the reserve's when none is free; an emptied lower frame refills the reserve first, then
goes back to the write tier.

Reading SGLang's free lists from the device drains the overlap scheduler's queue (about 5.5 ms a
read at 8B on the H200), so the allocator keeps a host mirror of them (``free_mirror``, a subset
of the device lists, equal to them while ``complete``) and reads the device only when the mirror is
incomplete and short of the frames a caller needs.

The reserve: ``RESERVE_FRAMES`` frames past the budget (a few frames of memory SGLang never sees).
Demoting tier ``t`` into tier ``t+1`` needs a tier-``t+1`` frame before it frees tier-``t`` slots;
when the arena is full only the reserve breaks that circle: a frame borrowed from it is paid back
by the next frame that empties (compaction makes one).
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator

from sglang_kvc.free_mirror import FreeMirror
from sglang_kvc.host_copy import host_to_device
from sglang_kvc.pool import TieredKVPool

WRITE_TIER = 0
VISIBLE = -1  # owner of a frame SGLang's write-tier free list may hold
RESERVE = -2
RESERVE_FRAMES = 2


class TierFullError(RuntimeError):
    """A tier has fewer free slots (and no free frames) than a demotion needs; make room first."""


class LowerTierBooks:
    """Slots of one lower tier in the frames it owns.

    Invariant: ``used[f].sum() + free_slots(f) == r`` for every owned frame ``f``; frames not owned
    have no used slot; ``pinned[f]`` counts used slots of ``f`` that belong to locked tree nodes.
    """

    def __init__(self, tier: int, num_frames: int, pages_per_frame: int, first_page: int):
        self.tier = tier
        self.r = pages_per_frame
        self.first_page = first_page
        self.used = np.zeros((num_frames, pages_per_frame), dtype=bool)
        self.used_count = np.zeros(num_frames, dtype=np.int64)
        self.pinned = np.zeros(num_frames, dtype=np.int64)
        self.owned = np.zeros(num_frames, dtype=bool)

    def frames(self) -> np.ndarray:
        return np.flatnonzero(self.owned)

    def free_slots(self) -> int:
        return int(self.owned.sum()) * self.r - int(self.used_count.sum())

    def used_pages(self) -> int:
        return int(self.used_count.sum())

    def locate(self, pages: np.ndarray):
        local = pages - self.first_page
        return local // self.r, local % self.r

    def take_open_slots(self, count: int) -> np.ndarray:
        """Up to ``count`` free slots of owned frames, fullest frames first (best fit), as pages."""
        frames = self.frames()
        if count <= 0 or len(frames) == 0:
            return np.zeros(0, dtype=np.int64)
        frames = frames[np.argsort(-self.used_count[frames], kind="stable")]
        frames = frames[self.used_count[frames] < self.r]
        out = []
        for frame in frames:
            slots = np.flatnonzero(~self.used[frame])[: count - len(out)]
            out.extend(self.first_page + frame * self.r + slots)
            if len(out) >= count:
                break
        pages = np.asarray(out, dtype=np.int64)
        self.mark(pages, True)
        return pages

    def mark(self, pages: np.ndarray, used: bool) -> None:
        frame, slot = self.locate(pages)
        if used:
            assert not self.used[frame, slot].any(), "a lower-tier slot was handed out twice"
        else:
            assert self.used[frame, slot].all(), "a lower-tier slot was freed twice"
        self.used[frame, slot] = used
        np.add.at(self.used_count, frame, 1 if used else -1)


class FrameAllocatorMixin:
    """Frame and slot books for every tier of a TieredKVPool (``pool.layout`` is a FrameLayout).

    Invariants: free frames + frames owned by each tier == ``num_frames``; per tier, used + free
    slots == owned frames x pages per frame (tier 0's reserved pages -- the padding page and the
    slots past ``size`` -- count as used); no page is both free and used; ``free`` takes write-tier
    indices only (SGLang frees nothing else: the tree's lower-tier pages are freed through
    ``free_lower``); ``free_mirror`` holds a subset of SGLang's free pages (``FreeMirror``), all of
    them while ``free_mirror.complete``; without ``need_sort`` it is unused (always incomplete).
    """

    _kvcache: TieredKVPool

    def _init_frames(self, pool: TieredKVPool) -> None:
        layout = pool.layout
        self.layout = layout
        self.num_frames = layout.num_frames
        self.reserve_capacity = RESERVE_FRAMES
        self.regular_frames = layout.num_frames - RESERVE_FRAMES
        self.r_write = layout.pages_per_frame[WRITE_TIER]
        self.frame_tokens = self.r_write * self.page_size
        self.write_pages = self.size // self.page_size  # SGLang's page ids 1..write_pages
        self.lower: Dict[int, LowerTierBooks] = {
            t: LowerTierBooks(t, layout.num_frames, layout.pages_per_frame[t], layout.first_page[t])
            for t in range(1, layout.num_tiers)}
        self.owner = np.full(layout.num_frames, VISIBLE, dtype=np.int64)
        self._hidden_dev = torch.zeros(layout.num_frames, dtype=torch.bool, device=self.device)
        self.frames_taken = 0
        self.frames_returned = 0
        self.last_free_frames = 0
        self.host_syncs = 0  # device-to-host reads of the free lists, since construction
        self.host_sync_seconds = 0.0  # host time inside those reads (on a GPU: waiting for its queued work)
        self.free_mirror = FreeMirror()
        if self.write_pages >= self.regular_frames * self.r_write:
            raise ValueError(f"{self.write_pages} write pages do not fit {self.regular_frames} frames of "
                             f"{self.r_write} (page 0 is the padding page)")
        self.clear()

    @property
    def pool(self) -> TieredKVPool:
        return self._kvcache

    # ---- SGLang's allocator interface -------------------------------------------------------------
    def clear(self):
        super().clear()
        self._after_free_group = []
        if hasattr(self, "lower"):
            for books in self.lower.values():
                books.used[:] = False
                books.used_count[:] = 0
                books.pinned[:] = 0
                books.owned[:] = False
            self.owner[:] = VISIBLE
            self.owner[self.regular_frames:] = RESERVE
            self._hidden_dev.copy_(host_to_device(self.owner != VISIBLE, self.device))
            self.free_mirror = FreeMirror()
            if self.need_sort:
                self.free_mirror.reset(np.arange(1, self.write_pages + 1, dtype=np.int64), np.zeros(0, np.int64))

    def merge_and_sort_free(self):
        super().merge_and_sort_free()
        self.free_mirror.merge()

    def run_after_free_group(self, callback) -> None:
        """Call ``callback()`` once SGLang's current free group has ended (at once outside a group);
        registered again inside the same group, it still runs once."""
        if self.is_not_in_free_group:
            callback()
        elif callback not in self._after_free_group:
            self._after_free_group.append(callback)

    def free_group_end(self, run_deferred: bool = True):
        """SGLang's ``free_group_end``, then (``run_deferred``) what ``run_after_free_group`` held."""
        super().free_group_end()
        if run_deferred:
            due, self._after_free_group = self._after_free_group, []
            for callback in due:
                callback()

    def _free_list_length(self) -> int:
        return len(self.free_pages) + len(self.release_pages)

    def _mirrored_alloc(self, alloc, *args, **kwargs):
        """Run one of SGLang's allocs: it takes the first (smallest) pages of ``free_pages``, as
        many as the lists' host-known lengths lose, and the mirror drops as many."""
        before = self._free_list_length()
        out = alloc(*args, **kwargs)
        self.free_mirror.consume(before - self._free_list_length())
        return out

    def alloc(self, need_size: int):
        return self._mirrored_alloc(super().alloc, need_size)

    def alloc_extend(self, *args, **kwargs):
        return self._mirrored_alloc(super().alloc_extend, *args, **kwargs)

    def alloc_decode(self, *args, **kwargs):
        return self._mirrored_alloc(super().alloc_decode, *args, **kwargs)

    def free(self, free_index: torch.Tensor):
        """SGLang's free (device ids only): the mirror no longer has every free page."""
        if free_index.numel() and self.is_not_in_free_group:
            self.free_mirror.forget()
        super().free(free_index)

    def free_known(self, free_index: torch.Tensor, pages: np.ndarray) -> None:
        """``free`` of write-tier ``free_index`` whose page ids the host has (``pages``, host
        int64): the mirror keeps every free page (inside a free group, a plain ``free``). The ids
        join ``release_pages`` as SGLang's ``free`` adds them (sorted, unique, in front), but from the
        host: its ``torch.unique`` on the device would wait for the stream."""
        if not (self.need_sort and self.is_not_in_free_group):
            self.free(free_index)
        elif free_index.numel():
            unique = np.unique(pages)
            self.release_pages = torch.cat((host_to_device(unique, self.device), self.release_pages))
            self.free_mirror.add_release(unique)

    def backup_state(self):
        raise NotImplementedError("sglang-kvc does not support allocator state backup (speculative decoding)")

    def restore_state(self, state):
        raise NotImplementedError("sglang-kvc does not support allocator state backup (speculative decoding)")

    def resize(self, config) -> None:
        raise NotImplementedError("the frame arena is sized once from its byte budget; it cannot resize")

    # ---- write tier ---------------------------------------------------------------------------------
    def _write_free_page_ids(self) -> torch.Tensor:
        return torch.cat((self.free_pages, self.release_pages))  # page ids (slot ids at page size 1)

    def _frames_of(self, pages: np.ndarray) -> np.ndarray:
        """Visible frames all of whose write-tier pages are among ``pages`` (free page ids)."""
        counts = np.bincount(pages // self.r_write, minlength=self.num_frames)
        return np.flatnonzero((counts[: self.num_frames] == self.r_write) & (self.owner == VISIBLE))

    def read_free_lists(self) -> np.ndarray:
        """The write tier's free page ids read from the device (a host sync, counted); the mirror
        becomes complete."""
        free_count = len(self.free_pages)
        started = time.perf_counter()
        pages = self._write_free_page_ids().cpu().numpy()
        self.host_sync_seconds += time.perf_counter() - started
        self.host_syncs += 1
        if self.need_sort:
            self.free_mirror.reset(pages[:free_count], pages[free_count:])
        return pages

    def known_free_frames(self) -> np.ndarray:
        """Free frames the mirror knows (no sync): all of them while it is complete, else some."""
        if not self.need_sort:
            return self.free_frames()
        frames = self._frames_of(self.free_mirror.pages())
        self.last_free_frames = len(frames)
        return frames

    def free_frames(self) -> np.ndarray:
        """Frames that are free: visible to SGLang and every write-tier page free (a host sync
        unless the mirror is complete; ``last_free_frames`` keeps the count for metrics)."""
        if self.free_mirror.complete:
            return self.known_free_frames()
        frames = self._frames_of(self.read_free_lists())
        self.last_free_frames = len(frames)
        return frames

    def find_free_frames(self, count: int) -> np.ndarray:
        """Free frames, at least ``count`` if there are: the mirror's, read from the device only
        when the mirror is incomplete and knows fewer (so with a complete mirror, no sync and the
        same frames as an exact read)."""
        frames = self.known_free_frames()
        if len(frames) < count and not self.free_mirror.complete:
            frames = self.free_frames()
        return frames

    def reserve_frames(self) -> np.ndarray:
        return np.flatnonzero(self.owner == RESERVE)

    def _hide(self, frames: np.ndarray, owner: int) -> None:
        """Give visible or reserve frames to ``owner`` (a lower tier or RESERVE)."""
        was_visible = self.owner[frames] == VISIBLE
        self.owner[frames] = owner
        if was_visible.any():
            visible = frames[was_visible]
            self._hidden_dev.index_fill_(0, host_to_device(visible, self.device), True)  # no scalar copy: no sync
            hidden = self.owner != VISIBLE
            self._take_out_of_free_lists(lambda pages: hidden[pages // self.r_write],
                                         lambda pages: self._hidden_dev[pages // self.r_write],
                                         len(visible) * self.r_write)

    def _take_out_of_free_lists(self, host_out, device_out, count: int) -> None:
        """Remove ``count`` free pages from SGLang's lists (``host_out`` marks them in a host id
        array, ``device_out`` in a device one), order kept. When the mirror holds all of them (the
        frames and pages callers pass come from it), the lists' new lengths are known on the host
        and an order-preserving gather does it without a sync; else boolean indexing (a sync)."""
        mirror = self.free_mirror
        free_out, release_out = host_out(mirror.free), host_out(mirror.release)
        removed = (int(free_out.sum()), int(release_out.sum()))
        known = self.need_sort and sum(removed) == count
        if not known:
            self.host_syncs += 1
        mirror.remove(~free_out, ~release_out)
        started = time.perf_counter()
        for name, out_count in zip(("free_pages", "release_pages"), removed):
            pages = getattr(self, name)
            if len(pages) == 0:
                continue
            out = device_out(pages)
            if known:
                order = torch.argsort(out.to(torch.int8), stable=True)[: len(pages) - out_count]
                setattr(self, name, pages[order])
            else:
                setattr(self, name, pages[~out])
        if not known:
            self.host_sync_seconds += time.perf_counter() - started

    def _show(self, frames: np.ndarray) -> None:
        """Give empty regular frames back to the write tier (their pages join SGLang's free list)."""
        if len(frames) == 0:
            return
        self.owner[frames] = VISIBLE
        self._hidden_dev.index_fill_(0, host_to_device(frames, self.device), False)
        page_ids = self.layout.frame_page_ids(WRITE_TIER, frames)
        self.release_pages = torch.cat((self.release_pages, host_to_device(page_ids, self.device)))
        self.free_mirror.add_release(page_ids.numpy())
        self.frames_returned += len(frames)

    def claim_write_pages(self, pages: np.ndarray) -> None:
        """Take specific free write-tier pages (compaction targets) out of SGLang's free lists."""
        claimed = torch.zeros(self.num_frames * self.r_write, dtype=torch.bool, device=self.device)
        claimed.index_fill_(0, host_to_device(pages, self.device), True)  # a lookup: torch.isin would sync
        self._take_out_of_free_lists(lambda free: np.isin(free, pages), lambda free: claimed[free],
                                     len(np.unique(pages)))

    # ---- frames -------------------------------------------------------------------------------------
    def take_frames(self, tier: int, count: int, borrow: bool = True) -> int:
        """Give up to ``count`` frames to lower ``tier``: free ones (highest ids first: the write
        tier fills from the bottom), then (``borrow``) the reserve's. Returns how many it got."""
        if count <= 0:
            return 0
        frames = self.find_free_frames(count)[::-1][:count].copy()
        if borrow and len(frames) < count:
            frames = np.concatenate([frames, self.reserve_frames()[: count - len(frames)]])
        if len(frames) == 0:
            return 0
        self._hide(frames, tier)
        self.lower[tier].owned[frames] = True
        self.frames_taken += len(frames)
        return len(frames)

    def _return_empty_frames(self, tier: int, frames: np.ndarray) -> None:
        """Frames of ``tier`` left without a used slot leave it: into the reserve while it is
        short, else back to the write tier (an extra frame takes a regular one's reserve place)."""
        books = self.lower[tier]
        empty = np.unique(frames[(books.used_count[frames] == 0) & books.owned[frames]])
        if len(empty) == 0:
            return
        books.owned[empty] = False
        self.owner[empty] = RESERVE
        reserve = self.reserve_frames()
        surplus = len(reserve) - self.reserve_capacity
        if surplus > 0:
            regular = reserve[reserve < self.regular_frames]
            self._show(regular[::-1][:surplus].copy())

    def release_empty_frames(self) -> None:
        """Lower-tier frames taken but left without a used slot leave their tiers."""
        for tier, books in self.lower.items():
            self._return_empty_frames(tier, np.flatnonzero(books.owned & (books.used_count == 0)))

    def refill_reserve(self, free_frames: Optional[np.ndarray] = None) -> None:
        """Move free frames (``free_frames``, as ``find_free_frames()`` just returned them, or found
        here) into the reserve while it is short (SGLang's budget pays for them again, so
        ``available_size()`` drops and ``evictable_size()`` rises by as much)."""
        short = self.reserve_capacity - len(self.reserve_frames())
        if short > 0:
            free = self.find_free_frames(short) if free_frames is None else free_frames
            frames = free[::-1][:short].copy()
            if len(frames):
                self._hide(frames, RESERVE)

    def borrowed_frames(self) -> int:
        """Reserve frames lower tiers hold now (frames SGLang's budget does not pay for)."""
        return self.reserve_capacity - len(self.reserve_frames())

    # ---- lower tiers --------------------------------------------------------------------------------
    def alloc_lower(self, tier: int, num_pages: int) -> Optional[np.ndarray]:
        """Global page ids (host int64) of ``num_pages`` free slots of lower ``tier``: its open
        frames first (fullest first), then free frames; None (nothing taken) if it cannot."""
        books = self.lower[tier]
        short = num_pages - books.free_slots()
        if short > 0:
            self.take_frames(tier, -(-short // books.r))
        if books.free_slots() < num_pages:
            return None
        return books.take_open_slots(num_pages)

    def free_lower(self, tier: int, pages: np.ndarray) -> None:
        """Free host page ids of lower ``tier``; frames left empty go back to the free pool."""
        if len(pages) == 0:
            return
        books = self.lower[tier]
        books.mark(pages, False)
        self._return_empty_frames(tier, books.locate(pages)[0])

    def pin(self, tier: int, pages: np.ndarray, delta: int) -> None:
        """Count lower-tier pages of a node that became locked (+1) or unlocked (-1)."""
        if tier != WRITE_TIER and len(pages):
            np.add.at(self.lower[tier].pinned, self.lower[tier].locate(pages)[0], delta)

    def lower_frames(self) -> int:
        return sum(int(b.owned.sum()) for b in self.lower.values())

    def evictable_lower_frames(self) -> int:
        """Lower-tier frames eviction can give the write tier: those without a locked page, less
        the reserve frames they must pay back first."""
        unpinned = sum(int((b.owned & (b.pinned == 0)).sum()) for b in self.lower.values())
        return max(0, unpinned - self.borrowed_frames())

    def protected_lower_frames(self) -> int:
        """The rest of the lower tiers' frames, counted in the write tier's budget."""
        return self.lower_frames() - self.borrowed_frames() - self.evictable_lower_frames()

    def move(self, src_tier: int, src_pages: torch.Tensor, dst_tier: int, dst_pages: np.ndarray) -> None:
        """Requantize (or, within one tier, copy) whole pages; the caller frees the sources."""
        dst = host_to_device(dst_pages, self.pool.arena.device)
        if src_tier == dst_tier:
            self.pool.copy_pages(src_tier, src_pages, dst)
        else:
            self.pool.move_pages(src_tier, src_pages, dst_tier, dst)

    def demote(self, indices: torch.Tensor, from_tier: int, to_tier: int,
               src_pages: Optional[np.ndarray] = None) -> Tuple[torch.Tensor, np.ndarray]:
        """Move the whole pages holding ``indices`` (whole pages in order, as radix-tree values are;
        all of ``from_tier``, whose host page ids ``src_pages`` a lower tier must give, and the
        write tier may give, to keep the free mirror complete) to lower
        tier ``to_tier``, all layers in one batch, and free the sources. Returns (new indices,
        their host page ids). TierFullError (nothing changed) when ``to_tier`` lacks room."""
        page = self.page_size
        if len(indices) % page:
            raise ValueError(f"demote needs whole pages; got {len(indices)} indices at page size {page}")
        if not from_tier < to_tier < self.layout.num_tiers:
            raise ValueError(f"cannot demote from tier {from_tier} to tier {to_tier}")
        if from_tier != WRITE_TIER and src_pages is None:
            raise ValueError("demoting from a lower tier needs the pages' host ids")
        num_pages = len(indices) // page
        dst_pages = self.alloc_lower(to_tier, num_pages)
        if dst_pages is None:
            raise TierFullError(f"tier {self.layout.codecs[to_tier].name} has {self.free_tokens(to_tier)} free "
                                f"tokens and no free frame; demotion needs {len(indices)}")
        try:
            self.move(from_tier, indices[::page] // page, to_tier, dst_pages)
        except BaseException:  # nothing moved: give the destination back, keep the sources
            self.free_lower(to_tier, dst_pages)
            raise
        if from_tier == WRITE_TIER and src_pages is not None:
            self.free_known(indices, src_pages)
        elif from_tier == WRITE_TIER:
            self.free(indices)
        else:
            self.free_lower(from_tier, src_pages)
        return self.pool.pages_to_slots(host_to_device(dst_pages, indices.device)), dst_pages

    # ---- books --------------------------------------------------------------------------------------
    def frames_per_tier(self, exact: bool = True) -> List[int]:
        """Frames owned by each tier (tier 0: visible frames not free). ``exact`` counts free frames
        now (a host sync unless the mirror is complete); otherwise as of the last count (metrics
        and log lines, no sync)."""
        return self._frames_per_tier(len(self.free_frames()) if exact else self.last_free_frames)

    def _frames_per_tier(self, free_frames: int) -> List[int]:
        lower = [int(self.lower[t].owned.sum()) for t in range(1, self.layout.num_tiers)]
        return [self.num_frames - sum(lower) - free_frames - len(self.reserve_frames())] + lower

    def capacity_tokens(self, tier: int) -> int:
        """Tokens the tier's frames hold now (tier 0: the scheduler's ``size``, which counts free frames)."""
        if tier == WRITE_TIER:
            return self.size
        return int(self.lower[tier].owned.sum()) * self.lower[tier].r * self.page_size

    def free_tokens(self, tier: int) -> int:
        if tier == WRITE_TIER:
            return self.available_size()
        return self.lower[tier].free_slots() * self.page_size

    def used_tokens(self, tier: int) -> int:
        if tier == WRITE_TIER:
            budget_lower_frames = self.lower_frames() - self.borrowed_frames()
            return self.size - self.available_size() - budget_lower_frames * self.frame_tokens
        return self.lower[tier].used_pages() * self.page_size

    def check_books(self) -> None:
        """Raise AssertionError if frames or slots are double-booked (a double free or a leak)."""
        mirror = self.free_mirror
        for held, device in ((mirror.free, self.free_pages), (mirror.release, self.release_pages)):
            device = device.cpu().numpy()
            assert np.isin(held, device).all(), "the free mirror holds a page that is not free (or in the other list)"
            assert not mirror.complete or set(held.tolist()) == set(device.tolist()), \
                "a complete free mirror misses a free page"
        assert (np.diff(mirror.free) > 0).all(), "the free mirror is not sorted or has a page twice"
        if self.need_sort:
            assert (np.diff(self.free_pages.cpu().numpy()) > 0).all(), "SGLang's free_pages are not sorted"
        self.merge_and_sort_free()
        free = self.free_pages.cpu().numpy()
        assert len(np.unique(free)) == len(free), "a write-tier page is free twice (double free)"
        assert len(free) == 0 or (free.min() >= 1 and free.max() <= self.write_pages), "free page out of range"
        assert (self.owner[free // self.r_write] == VISIBLE).all(), "a hidden frame's page is in the write free list"
        owners = np.zeros(self.num_frames, dtype=np.int64)
        for t, books in self.lower.items():
            owners += books.owned
            assert (books.used_count == books.used.sum(1)).all(), f"tier {t}: used counts disagree"
            assert not books.used[~books.owned].any(), f"tier {t}: used slot in a frame it does not own"
            assert (books.pinned <= books.used_count).all(), f"tier {t}: more pinned than used pages"
            assert (books.owned == (self.owner == t)).all(), f"tier {t}: owner table disagrees"
        assert (owners <= 1).all(), "a frame is owned by two lower tiers"
        assert (self._hidden_dev.cpu().numpy() == (self.owner != VISIBLE)).all(), "device owner mirror disagrees"
        assert (self.owner[self.regular_frames:] != VISIBLE).all(), "an extra frame is visible to SGLang"
        assert len(self.reserve_frames()) <= self.reserve_capacity
        free_frames = len(self._frames_of(free))
        frames = self._frames_per_tier(free_frames)
        assert min(frames) >= 0 and sum(frames) + free_frames + len(self.reserve_frames()) == \
            self.num_frames, "frames per tier + free + reserve != total"


def write_tier_tokens(layout) -> int:
    """Tokens SGLang may allocate at the write tier: every write page of the regular frames (the
    reserve's are not SGLang's) but the padding page."""
    return ((layout.num_frames - RESERVE_FRAMES) * layout.pages_per_frame[WRITE_TIER] - 1) * layout.page_size


class FrameTokenAllocator(FrameAllocatorMixin, TokenToKVPoolAllocator):
    """Page size 1: SGLang's TokenToKVPoolAllocator for the write tier."""

    def __init__(self, pool: TieredKVPool, size: Optional[int] = None, device: str = "cpu", need_sort: bool = True):
        TokenToKVPoolAllocator.__init__(self, size or write_tier_tokens(pool.layout), pool.dtype, device, pool,
                                        need_sort)
        self._init_frames(pool)


class FramePagedAllocator(FrameAllocatorMixin, PagedTokenToKVPoolAllocator):
    """Page size > 1: SGLang's PagedTokenToKVPoolAllocator for the write tier."""

    def __init__(self, pool: TieredKVPool, size: Optional[int] = None, device: str = "cpu", need_sort: bool = True):
        PagedTokenToKVPoolAllocator.__init__(self, size or write_tier_tokens(pool.layout), pool.page_size,
                                             pool.dtype, device, pool, need_sort)
        self._init_frames(pool)


def make_tiered_allocator(pool: TieredKVPool, size: Optional[int] = None, device: str = "cpu",
                          need_sort: bool = True):
    """``size``: write-tier tokens SGLang may allocate (default: the whole arena at the write tier,
    padding page aside); pages past it stay reserved, so no lower tier takes their frames."""
    if size is not None and size > write_tier_tokens(pool.layout):
        raise ValueError(f"size {size} exceeds the arena's {write_tier_tokens(pool.layout)} write-tier tokens")
    cls = FrameTokenAllocator if pool.page_size == 1 else FramePagedAllocator
    return cls(pool, size, device, need_sort)
