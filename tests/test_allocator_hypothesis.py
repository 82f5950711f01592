"""Random alloc / free / demote sequences keep every tier's books balanced and data within bounds."""

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sglang_kvc.allocator import TierFullError
from tests.sglang_parts import build_pool, write_random


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.page_size = 2
        self.pool, self.allocator = build_pool(ladder="bf16,k8v8,k2v2", tokens=(32, 24, 16),
                                               page_size=self.page_size)
        self.blocks = []  # (indices, tier, written {layer: (k, v)}, error bound so far {layer: (bk, bv)})
        self.seed = 0

    @rule(pages=st.integers(1, 5))
    def alloc(self, pages):
        slots = self.allocator.alloc(pages * self.page_size)
        if slots is None:
            assert self.allocator.free_tokens(0) < pages * self.page_size
            return
        self.seed += 1
        written = write_random(self.pool, slots, self.seed)
        bounds = {layer: (torch.zeros_like(k), torch.zeros_like(v)) for layer, (k, v) in written.items()}
        self.blocks.append((slots, 0, written, bounds))

    @precondition(lambda self: self.blocks)
    @rule(data=st.data())
    def free(self, data):
        slots, _, _, _ = self.blocks.pop(data.draw(st.integers(0, len(self.blocks) - 1)))
        self.allocator.free(slots)

    @precondition(lambda self: self.blocks)
    @rule(data=st.data())
    def demote(self, data):
        i = data.draw(st.integers(0, len(self.blocks) - 1))
        slots, tier, written, bounds = self.blocks[i]
        if tier == self.pool.layout.num_tiers - 1:
            return
        free_before = [self.allocator.free_tokens(t) for t in range(3)]
        codec = self.pool.layout.codecs[tier + 1]
        before = {layer: self.pool.read_tokens(layer, slots) for layer in written}
        try:
            new_slots = self.allocator.demote(slots, tier + 1)
        except TierFullError:
            assert free_before[tier + 1] < len(slots)
            assert [self.allocator.free_tokens(t) for t in range(3)] == free_before
            return
        new_bounds = {layer: (bk + codec.k.error_bound(before[layer][0]), bv + codec.v.error_bound(before[layer][1]))
                      for layer, (bk, bv) in bounds.items()}
        self.blocks[i] = (new_slots, tier + 1, written, new_bounds)

    @invariant()
    def books_balance_per_tier(self):
        for t in range(self.pool.layout.num_tiers):
            held = sum(len(slots) for slots, tier, _, _ in self.blocks if tier == t)
            assert self.allocator.free_tokens(t) + held == self.allocator.capacity_tokens(t)

    @invariant()
    def no_slot_handed_out_twice(self):
        if self.blocks:
            held = torch.cat([slots for slots, _, _, _ in self.blocks])
            assert len(torch.unique(held)) == len(held)
            tiers = self.pool.layout.tier_of_slots(held)
            expected = torch.cat([torch.full((len(s),), t) for s, t, _, _ in self.blocks])
            assert torch.equal(tiers, expected)
        self.allocator.check_free_lists()

    @invariant()
    def data_within_bounds(self):
        for slots, tier, written, bounds in self.blocks:
            for layer, (k, v) in written.items():
                rk, rv = self.pool.read_tokens(layer, slots)
                bk, bv = bounds[layer]
                assert bool(((rk - k).abs() <= bk + 1e-6).all())
                assert bool(((rv - v).abs() <= bv + 1e-6).all())


AllocatorMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
TestAllocator = AllocatorMachine.TestCase
