"""Hypothesis state machine over insert / match / lock / unlock / finish / evict of the compressed cache."""

import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from tests.cache_parts import build_cache, check_node_data, evict_everything

STATS = []  # (demoted, dropped, compacted) tokens per run, for the coverage test
token_lists = st.lists(st.integers(0, 3), min_size=2, max_size=24)


def path_nodes(cache, node):
    nodes = []
    while node is not cache.root_node:
        nodes.append(node)
        node = node.parent
    return nodes[::-1]


def path_values(cache, node):
    values = [n.value for n in path_nodes(cache, node)]
    return torch.cat(values) if values else torch.empty(0, dtype=torch.int64)


class Lock:
    """A lock held on a node: by a running request (``request``) or a bare inc_lock_ref (None)."""

    def __init__(self, node, values, request):
        self.node, self.values, self.request = node, values, request


class CacheMachine(RuleBasedStateMachine):
    ladder, frames, page_size, policy, floor = "bf16,k8v8,k4v2", 12, 1, "lru", 0.0

    def __init__(self):
        super().__init__()
        self.cache, self.driver = build_cache(self.ladder, self.frames, self.page_size, self.policy, self.floor)
        self.locks = []

    @rule(tokens=token_lists)
    def start(self, tokens):
        request = self.driver.start(tokens)
        if request is not None:
            self.locks.append(Lock(request.last_node, path_values(self.cache, request.last_node).clone(), request))

    @precondition(lambda self: any(lock.request is not None for lock in self.locks))
    @rule(data=st.data())
    def finish(self, data):
        running = [lock for lock in self.locks if lock.request is not None]
        entry = running[data.draw(st.integers(0, len(running) - 1))]
        self.locks.remove(entry)
        self.driver.finish(entry.request)

    @rule(tokens=token_lists)
    def match_and_check_data(self, tokens):
        match = self.driver.match(tokens)
        nodes = path_nodes(self.cache, match.last_device_node)
        assert torch.equal(match.device_indices, path_values(self.cache, match.last_device_node))
        for node in nodes:
            check_node_data(self.cache, self.driver.pool, node)

    @rule(tokens=token_lists)
    def lock(self, tokens):
        node = self.driver.match(tokens).last_device_node
        self.cache.inc_lock_ref(node)
        self.locks.append(Lock(node, path_values(self.cache, node).clone(), None))

    @precondition(lambda self: any(lock.request is None for lock in self.locks))
    @rule(data=st.data())
    def unlock(self, data):
        held = [lock for lock in self.locks if lock.request is None]
        entry = held[data.draw(st.integers(0, len(held) - 1))]
        self.locks.remove(entry)
        self.cache.dec_lock_ref(entry.node)

    @rule(num_tokens=st.integers(0, 40))
    def evict(self, num_tokens):
        before = self.driver.allocator.available_size()
        evictable = self.cache.evictable_size()
        self.cache.evict(EvictParams(num_tokens=num_tokens))
        assert self.driver.allocator.available_size() >= min(num_tokens, before + evictable)

    @rule(tier=st.integers(0, 1), num_tokens=st.integers(1, 24))
    def demote(self, tier, num_tokens):
        self.cache.demote(tier, num_tokens)

    @rule()
    def compact(self):
        self.cache._compact_write(2)
        self.cache._compact_lower()

    @invariant()
    def books_balance(self):
        self.cache.check_invariants(self.driver.in_use_per_tier())

    @invariant()
    def locked_paths_never_change(self):
        for lock in self.locks:
            node, values = lock.node, lock.values
            assert node is self.cache.root_node or node.parent is not None
            for n in path_nodes(self.cache, node):
                assert n.parent.children.get(n.key.child_key(self.cache.page_size)) is n, "locked node detached"
            assert torch.equal(path_values(self.cache, node), values), "a locked node's indices changed"

    def teardown(self):
        STATS.append((sum(self.cache.counters.demoted_in), sum(self.cache.counters.dropped),
                      sum(self.cache.counters.compacted)))
        for lock in list(self.locks):
            if lock.request is not None:
                self.driver.finish(lock.request)
            else:
                self.cache.dec_lock_ref(lock.node)
        self.cache.check_invariants()
        evict_everything(self.cache)
        allocator = self.driver.allocator
        allocator.release_empty_frames()
        allocator.refill_reserve()
        assert allocator.available_size() == allocator.size, "a page leaked"
        assert allocator.frames_per_tier() == [1, 0, 0] and allocator.borrowed_frames() == 0


class PagedFloorMachine(CacheMachine):
    ladder, frames, page_size, policy, floor = "bf16,k4v4,k2v2", 8, 2, "cost", 3.0


class LFUMachine(CacheMachine):
    ladder, frames, page_size, policy, floor = "k8v8,k4v2-rot,k2v2", 8, 1, "lfu", 0.0


# derandomized: the coverage test below needs the runs to reach compaction, which random draws missed once
# in about twenty suite runs
_settings = settings(max_examples=int(os.environ.get("KVC_HYPOTHESIS_EXAMPLES", 30)), stateful_step_count=30,
                     deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
CacheMachine.TestCase.settings = _settings
PagedFloorMachine.TestCase.settings = _settings
LFUMachine.TestCase.settings = _settings
TestCacheLRU = CacheMachine.TestCase
TestCachePagedFloorCost = PagedFloorMachine.TestCase
TestCacheLFURotated = LFUMachine.TestCase


def test_the_machines_reach_demotion_drop_and_compaction():
    assert STATS, "run with the machines above"
    assert any(d > 0 for d, _, _ in STATS) and any(x > 0 for _, x, _ in STATS) and any(c > 0 for _, _, c in STATS)
