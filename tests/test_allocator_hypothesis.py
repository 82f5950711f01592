"""Random alloc / free / demote / take-frame / compact sequences over the frame arena keep every
frame and every tier's slots booked exactly once, and the data within its codec bounds."""

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sglang_kvc.allocator import TierFullError
from tests.sglang_parts import build_pool, write_random


class Block:
    """Pages held by the test: ``slots`` of ``tier`` (host ``pages`` for lower tiers), the values
    written and the error bound accumulated so far, per layer."""

    def __init__(self, slots, tier, pages, written, bounds):
        self.slots, self.tier, self.pages, self.written, self.bounds = slots, tier, pages, written, bounds


class ArenaMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.page_size = 2
        self.pool, self.allocator = build_pool(ladder="bf16,k8v8,k2v2", frames=6, page_size=self.page_size)
        self.blocks = []
        self.seed = 0

    def _pick(self, data, tiers=None):
        choices = [b for b in self.blocks if tiers is None or b.tier in tiers]
        return choices[data.draw(st.integers(0, len(choices) - 1))] if choices else None

    @rule(pages=st.integers(1, 5))
    def alloc(self, pages):
        slots = self.allocator.alloc(pages * self.page_size)
        if slots is None:
            assert self.allocator.available_size() < pages * self.page_size
            return
        self.seed += 1
        written = write_random(self.pool, slots, self.seed)
        bounds = {layer: (torch.zeros_like(k), torch.zeros_like(v)) for layer, (k, v) in written.items()}
        self.blocks.append(Block(slots, 0, None, written, bounds))

    @precondition(lambda self: self.blocks)
    @rule(data=st.data())
    def free(self, data):
        block = self._pick(data)
        self.blocks.remove(block)
        if block.tier == 0:
            self.allocator.free(block.slots)
        else:
            self.allocator.free_lower(block.tier, block.pages)

    @precondition(lambda self: any(b.tier < 2 for b in self.blocks))
    @rule(data=st.data())
    def demote(self, data):
        block = self._pick(data, tiers=(0, 1))
        to_tier = block.tier + 1
        books = self.allocator.lower[to_tier]
        room = books.free_slots() + books.r * (len(self.allocator.free_frames()) + len(self.allocator.reserve_frames()))
        codec = self.pool.layout.codecs[to_tier]
        before = {layer: self.pool.read_tokens(layer, block.slots) for layer in block.written}
        used_before = [self.allocator.used_tokens(t) for t in range(3)]
        try:
            slots, pages = self.allocator.demote(block.slots, block.tier, to_tier, block.pages)
        except TierFullError:
            assert room < len(block.slots) // self.page_size
            assert [self.allocator.used_tokens(t) for t in range(3)] == used_before
            return
        block.bounds = {layer: (bk + codec.k.error_bound(before[layer][0]), bv + codec.v.error_bound(before[layer][1]))
                        for layer, (bk, bv) in block.bounds.items()}
        block.slots, block.tier, block.pages = slots, to_tier, pages

    @precondition(lambda self: any(b.tier > 0 for b in self.blocks))
    @rule(data=st.data())
    def compact(self, data):
        """Copy a lower block to other slots of its tier, as compaction does, and free the old ones."""
        block = self._pick(data, tiers=(1, 2))
        dst = self.allocator.alloc_lower(block.tier, len(block.pages))
        if dst is None:
            return
        before = [self.pool.read_tokens(layer, block.slots) for layer in range(2)]
        self.allocator.move(block.tier, torch.as_tensor(block.pages), block.tier, dst)
        self.allocator.free_lower(block.tier, block.pages)
        block.pages = dst
        block.slots = self.pool.pages_to_slots(torch.as_tensor(dst))
        for layer in range(2):
            after = self.pool.read_tokens(layer, block.slots)
            assert torch.equal(after[0], before[layer][0]) and torch.equal(after[1], before[layer][1])

    @rule(tier=st.integers(1, 2), count=st.integers(1, 3))
    def take_frames(self, tier, count):
        free, reserve = len(self.allocator.free_frames()), len(self.allocator.reserve_frames())
        got = self.allocator.take_frames(tier, count)
        assert got == min(count, free + reserve)

    @rule()
    def refill_reserve(self):
        self.allocator.refill_reserve()

    @rule()
    def release_empty_frames(self):
        self.allocator.release_empty_frames()
        for books in self.allocator.lower.values():
            assert (books.used_count[books.owned] > 0).all()

    @invariant()
    def frames_and_slots_are_booked_once(self):
        self.allocator.check_books()
        frames = self.allocator.frames_per_tier()
        assert sum(frames) + len(self.allocator.free_frames()) + len(self.allocator.reserve_frames()) == \
            self.allocator.num_frames
        for t in range(3):
            held = sum(len(b.slots) for b in self.blocks if b.tier == t)
            assert self.allocator.used_tokens(t) == held
            if t:
                books = self.allocator.lower[t]
                assert books.free_slots() + books.used_pages() == books.owned.sum() * books.r

    @invariant()
    def no_id_is_both_free_and_used(self):
        if not self.blocks:
            return
        held = torch.cat([b.slots for b in self.blocks])
        assert len(torch.unique(held)) == len(held)
        assert torch.equal(self.pool.layout.tier_of_slots(held),
                           torch.cat([torch.full((len(b.slots),), b.tier) for b in self.blocks]))
        free_pages = set(self.allocator._write_free_page_ids().tolist())
        assert not free_pages & set((held[:: self.page_size] // self.page_size).tolist())
        for t in (1, 2):
            books = self.allocator.lower[t]
            marked = np.flatnonzero(books.used.reshape(-1)) + books.first_page
            mine = np.concatenate([b.pages for b in self.blocks if b.tier == t] or [np.zeros(0, dtype=np.int64)])
            assert sorted(marked.tolist()) == sorted(mine.tolist())

    @invariant()
    def data_within_bounds(self):
        for block in self.blocks:
            for layer, (k, v) in block.written.items():
                rk, rv = self.pool.read_tokens(layer, block.slots)
                bk, bv = block.bounds[layer]
                assert bool(((rk - k).abs() <= bk + 1e-6).all())
                assert bool(((rv - v).abs() <= bv + 1e-6).all())

    def teardown(self):
        for block in list(self.blocks):
            if block.tier == 0:
                self.allocator.free(block.slots)
            else:
                self.allocator.free_lower(block.tier, block.pages)
        self.allocator.release_empty_frames()
        self.allocator.refill_reserve()
        assert self.allocator.available_size() == self.allocator.size, "a page leaked"
        assert self.allocator.frames_per_tier() == [1, 0, 0] and self.allocator.borrowed_frames() == 0


ArenaMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestArena = ArenaMachine.TestCase
