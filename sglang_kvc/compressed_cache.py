"""SGLang's RadixCache over the tiered pool: cold nodes are demoted down the bit ladder before dropping."""

from __future__ import annotations

import dataclasses
import heapq
import time
from typing import Dict, List, Optional

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult, IncLockRefResult, DecLockRefResult
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

from sglang_kvc.policy import make_policy


@dataclasses.dataclass
class TierCounters:
    """Event counters per tier (tokens), cumulative since the cache was built."""

    demoted_in: List[int]
    dropped: List[int]
    hits: List[int]
    refreshed: int = 0  # tokens of below-floor nodes replaced by freshly computed KV

    @classmethod
    def zeros(cls, num_tiers: int) -> "TierCounters":
        return cls([0] * num_tiers, [0] * num_tiers, [0] * num_tiers)


class CompressedRadixCache(RadixCache):
    """A RadixCache whose node values live in the tiers of a TieredKVPool.

    Invariants (checked by ``check_invariants``):
    * every non-root node has ``kvc_tier`` and its value's slots all lie in that tier;
    * ``tier_cached[t]`` is the number of tree tokens in tier ``t`` and ``tier_evictable[t]`` the
      number of those in nodes with ``lock_ref == 0``;
    * a node with ``lock_ref > 0`` is never demoted, dropped or given new indices, so a running
      request's indices never change under it;
    * ``evictable_size()`` and ``protected_size()`` count write-tier tokens only: they are what
      SGLang's scheduler may reclaim for, or sees held in, the tier it allocates from.
    """

    def __init__(self, params: CacheInitParams, policy: str = "lru", min_hit_bits: float = 0.0):
        allocator = params.token_to_kv_pool_allocator
        self.layout = allocator.layout
        self.num_tiers = self.layout.num_tiers
        self.kvc_policy = make_policy(policy)
        self.min_hit_bits = float(min_hit_bits)
        self._tier_bits = [codec.spec.mean_bits for codec in self.layout.codecs]
        self.counters = TierCounters.zeros(self.num_tiers)
        super().__init__(params)

    # ---- bookkeeping ------------------------------------------------------------------------
    def reset(self):
        super().reset()
        self.root_node.kvc_tier = None
        self.root_node.kvc_depth = 0
        self.tier_nodes: List[set] = [set() for _ in range(self.num_tiers)]
        self.tier_cached = [0] * self.num_tiers
        self.tier_evictable = [0] * self.num_tiers

    def _track(self, node: TreeNode, tier: int) -> None:
        node.kvc_tier = tier
        self.tier_nodes[tier].add(node)
        self.tier_cached[tier] += len(node.value)
        if node.lock_ref == 0:
            self.tier_evictable[tier] += len(node.value)

    def _untrack(self, node: TreeNode) -> None:
        tier = node.kvc_tier
        self.tier_nodes[tier].discard(node)
        self.tier_cached[tier] -= len(node.value)
        if node.lock_ref == 0:
            self.tier_evictable[tier] -= len(node.value)

    def _below_floor(self, node: TreeNode) -> bool:
        return self._tier_bits[node.kvc_tier] < self.min_hit_bits

    # ---- SGLang's cache interface ---------------------------------------------------------------
    def evictable_size(self):
        return self.tier_evictable[0]

    def protected_size(self):
        return self.tier_cached[0] - self.tier_evictable[0]

    def inc_lock_ref(self, node: TreeNode) -> IncLockRefResult:
        if self.disable:
            return IncLockRefResult(delta=0)
        delta = 0
        while node != self.root_node:
            tokens = len(node.key)
            if node.lock_ref == 0:
                self.evictable_size_ -= tokens
                self.protected_size_ += tokens
                self.tier_evictable[node.kvc_tier] -= tokens
                if node.kvc_tier == 0:
                    delta -= tokens
            node.lock_ref += 1
            self._update_leaf_status(node)
            node = node.parent
        return IncLockRefResult(delta=delta)

    def dec_lock_ref(self, node: TreeNode, params=None) -> DecLockRefResult:
        if self.disable:
            return DecLockRefResult(delta=0)
        delta = 0
        while node != self.root_node:
            tokens = len(node.key)
            if node.lock_ref == 1:
                self.evictable_size_ += tokens
                self.protected_size_ -= tokens
                self.tier_evictable[node.kvc_tier] += tokens
                if node.kvc_tier == 0:
                    delta += tokens
            node.lock_ref -= 1
            self._update_leaf_status(node)
            node = node.parent
        return DecLockRefResult(delta=delta)

    def record_hits(self, node: TreeNode) -> None:
        """Count the cached prefix ending at ``node`` as hits, per tier. Called once per admitted
        request (by the scheduler hook, or the replay driver) with the node it locked."""
        while node is not self.root_node:
            self.counters.hits[node.kvc_tier] += len(node.key)
            node = node.parent

    def evict(self, params: EvictParams) -> EvictResult:
        if self.disable:
            return EvictResult()
        start_time = time.perf_counter()
        freed = self._free_tier(0, params.num_tokens)
        self.update_eviction_metrics(freed, start_time)
        return EvictResult(num_tokens_evicted=freed)

    # ---- tree internals (hooks of RadixCache) ----------------------------------------------------
    def _match_prefix_helper(self, node: TreeNode, key):
        access_time = time.monotonic()
        node.last_access_time = access_time
        value = []
        while len(key) > 0:
            child = node.children.get(key.child_key(self.page_size))
            if child is None or self._below_floor(child):
                break
            child.last_access_time = access_time
            prefix_len = child.key.match(key, page_size=self.page_size)
            if prefix_len < len(child.key):
                node = self._split_node(child.key, child, prefix_len)
                value.append(node.value)
                break
            value.append(child.value)
            node = child
            key = key[prefix_len:]
        return value, node

    def _split_node(self, key, child: TreeNode, split_len: int):
        self._untrack(child)
        new_node = super()._split_node(key, child, split_len)
        new_node.kvc_depth = child.kvc_depth
        child.kvc_depth += split_len
        self._track(new_node, child.kvc_tier)
        self._track(child, child.kvc_tier)
        return new_node

    def _insert_helper(self, node: TreeNode, key, value, priority: int = 0, chunked: bool = False):
        """RadixCache's insert walk, plus: from the first unlocked node below the quality floor on,
        existing nodes take the freshly computed KV (their old slots are freed) and do not count
        as prefix, so the caller keeps ownership rules unchanged."""
        priority = priority or 0
        access_time = time.monotonic()
        node.last_access_time = access_time
        node.priority = max(node.priority, priority)
        prefix_len_total = 0
        refreshing = False
        while len(key) > 0:
            child_key = key.child_key(self.page_size)
            if child_key not in node.children:
                break
            node = node.children[child_key]
            node.last_access_time = access_time
            prefix_len = node.key.match(key, page_size=self.page_size)
            if prefix_len < len(node.key):
                node = self._split_node(node.key, node, prefix_len)
            refreshing = refreshing or (self._below_floor(node) and node.lock_ref == 0)
            if refreshing:
                self._refresh(node, value[:prefix_len])
            else:
                prefix_len_total += prefix_len
            node.priority = max(node.priority, priority)
            self._inc_hit_count(node, chunked)
            key = key[prefix_len:]
            value = value[prefix_len:]
        if len(key):
            parent = node
            node = TreeNode(priority=priority)
            node.parent = parent
            node.key = key
            node.value = value.clone()
            node.kvc_depth = parent.kvc_depth + len(parent.key)
            self._inc_hit_count(node, chunked)
            parent.children[key.child_key(self.page_size)] = node
            self.evictable_size_ += len(key)
            self._track(node, 0)
            self._update_leaf_status(parent)
            self._update_leaf_status(node)
            self._record_store_event(node)
        return prefix_len_total, node

    def _refresh(self, node: TreeNode, fresh_value: torch.Tensor) -> None:
        assert node.lock_ref == 0, "a locked node cannot take new indices"
        self._untrack(node)
        self.token_to_kv_pool_allocator.free(node.value)
        node.value = fresh_value.clone()
        self._track(node, 0)
        self.counters.refreshed += len(node.value)

    def _delete_leaf(self, node: TreeNode):
        self._untrack(node)
        super()._delete_leaf(node)

    # ---- demote before drop ---------------------------------------------------------------------
    def _free_tier(self, tier: int, num_tokens: int, drop_subtrees: bool = True) -> int:
        """Free at least ``num_tokens`` slots of ``tier`` held by unlocked nodes, if that many exist.

        Above the last tier, the coldest nodes move one tier down (room is made there first,
        recursively, without dropping subtrees) in one batched demotion; a node larger than the
        whole lower tier is never demoted. What is still missing is dropped: the coldest leaves
        of the tier, then (``drop_subtrees``) the coldest unlocked nodes together with their
        descendants, so every unlocked token of the tier can be freed, as ``evictable_size``
        promises the scheduler. Returns the number of ``tier`` slots freed.
        """
        if num_tokens <= 0:
            return 0
        freed = 0
        if tier < self.num_tiers - 1:
            freed = self._demote_coldest(tier, num_tokens)
        if freed < num_tokens:
            freed += self._drop_leaves(tier, num_tokens - freed)
        if freed < num_tokens and drop_subtrees:
            freed += self._drop_subtrees(tier, num_tokens - freed)
        return freed

    def _demote_coldest(self, tier: int, num_tokens: int) -> int:
        lower = tier + 1
        allocator = self.token_to_kv_pool_allocator
        lower_capacity = allocator.capacity_tokens(lower)
        victims = [n for n in self._coldest(tier, num_tokens) if len(n.value) <= lower_capacity]
        wanted = min(sum(len(n.value) for n in victims), lower_capacity)
        shortfall = wanted - allocator.free_tokens(lower)
        if shortfall > 0:
            self._free_tier(lower, shortfall, drop_subtrees=False)
        room = allocator.free_tokens(lower)
        fitting, used = [], 0
        for node in victims:
            if used + len(node.value) <= room:
                fitting.append(node)
                used += len(node.value)
        return self._demote_nodes(fitting, lower)

    def _coldest(self, tier: int, num_tokens: int) -> List[TreeNode]:
        """Unlocked nodes of ``tier``, coldest first, until they hold ``num_tokens``. The nodes of
        one matched path share an access time: among equals the deeper node goes first (as
        RadixCache evicts leaves before their parents), then the older one, never set order."""
        priority = self.kvc_policy.priority
        candidates = [n for n in self.tier_nodes[tier] if n.lock_ref == 0]
        candidates.sort(key=lambda n: (priority(n), -n.kvc_depth, n.id))
        chosen, total = [], 0
        for node in candidates:
            if total >= num_tokens:
                break
            chosen.append(node)
            total += len(node.value)
        return chosen

    def _demote_nodes(self, nodes: List[TreeNode], to_tier: int) -> int:
        if not nodes:
            return 0
        lengths = [len(n.value) for n in nodes]
        new_values = self.token_to_kv_pool_allocator.demote(torch.cat([n.value for n in nodes]), to_tier)
        for node, value in zip(nodes, torch.split(new_values, lengths)):
            self._untrack(node)
            node.value = value
            self._track(node, to_tier)
        moved = sum(lengths)
        self.counters.demoted_in[to_tier] += moved
        return moved

    def _drop_leaves(self, tier: int, num_tokens: int) -> int:
        priority = self.kvc_policy.priority
        heap = [(priority(n), n.id, n) for n in self.tier_nodes[tier]
                if n.lock_ref == 0 and not n.children]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            self.token_to_kv_pool_allocator.free(node.value)
            freed += len(node.value)
            self.counters.dropped[tier] += len(node.value)
            parent = node.parent
            self._delete_leaf(node)
            self._record_remove_event(node)
            if (parent is not self.root_node and not parent.children and parent.lock_ref == 0
                    and parent.kvc_tier == tier):
                heapq.heappush(heap, (priority(parent), parent.id, parent))
        return freed

    def _drop_subtrees(self, tier: int, num_tokens: int) -> int:
        """Drop the coldest unlocked nodes of ``tier`` with all their descendants (unlocked too,
        since a lock covers the whole path to the root); returns the ``tier`` slots freed."""
        freed = 0
        for root in self._coldest(tier, num_tokens):
            if freed >= num_tokens:
                break
            if root not in self.tier_nodes[tier]:  # already dropped with an earlier subtree
                continue
            stack, order = [root], []
            while stack:
                node = stack.pop()
                order.append(node)
                stack.extend(node.children.values())
            for node in reversed(order):  # children before parents
                if node.kvc_tier == tier:
                    freed += len(node.value)
                self.token_to_kv_pool_allocator.free(node.value)
                self.counters.dropped[node.kvc_tier] += len(node.value)
                self._delete_leaf(node)
                self._record_remove_event(node)
        return freed

    # ---- statistics and checks ------------------------------------------------------------------
    def kvc_stats(self) -> Dict[str, object]:
        """Per-tier tokens, demotions, drops, hits, and bytes saved against bf16 (the metrics' source)."""
        bf16_bpt = self.layout.bf16_bytes_per_token()
        names = [c.name for c in self.layout.codecs]
        saved = sum(self.tier_cached[t] * (bf16_bpt - self.layout.bytes_per_token(t)) for t in range(self.num_tiers))
        return {
            "tiers": names,
            "cached_tokens": list(self.tier_cached),
            "evictable_tokens": list(self.tier_evictable),
            "demoted_tokens": list(self.counters.demoted_in),
            "dropped_tokens": list(self.counters.dropped),
            "hit_tokens": list(self.counters.hits),
            "refreshed_tokens": self.counters.refreshed,
            "bytes_saved_vs_bf16": saved,
        }

    def check_invariants(self, in_use_per_tier: Optional[List[int]] = None) -> None:
        """Raise AssertionError if the tree and the allocator's books disagree.

        ``in_use_per_tier``: slots held by running requests outside the tree (default none);
        then for every tier ``free + cached + in_use == capacity``.
        """
        cached, evictable = [0] * self.num_tiers, [0] * self.num_tiers
        stack = list(self.root_node.children.values())
        seen = []
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            tier = node.kvc_tier
            assert node in self.tier_nodes[tier], "node missing from its tier set"
            tiers = self.layout.tier_of_slots(node.value)
            assert bool((tiers == tier).all()), f"node of tier {tier} holds slots of other tiers"
            assert len(node.value) == len(node.key)
            cached[tier] += len(node.value)
            if node.lock_ref == 0:
                evictable[tier] += len(node.value)
            seen.append(node.value)
        assert cached == self.tier_cached, f"cached {cached} != books {self.tier_cached}"
        assert evictable == self.tier_evictable, f"evictable {evictable} != books {self.tier_evictable}"
        assert sum(len(s) for s in self.tier_nodes) == len(seen)
        if seen:
            values = torch.cat(seen)
            assert len(torch.unique(values)) == len(values), "a slot is held by two nodes"
        allocator = self.token_to_kv_pool_allocator
        allocator.check_free_lists()
        in_use = in_use_per_tier or [0] * self.num_tiers
        for t in range(self.num_tiers):
            total = allocator.free_tokens(t) + cached[t] + in_use[t]
            assert total == allocator.capacity_tokens(t), (
                f"tier {t}: free {allocator.free_tokens(t)} + cached {cached[t]} + in use {in_use[t]} "
                f"!= capacity {allocator.capacity_tokens(t)}")
