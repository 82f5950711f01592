"""SGLang's RadixCache over the tiered pool: cold nodes are demoted down the bit ladder before dropping."""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import logging
import time
from typing import Dict, List, Optional

import numpy as np
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult, IncLockRefResult, DecLockRefResult
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

from sglang_kvc.demotion_gate import DemotionGate
from sglang_kvc.host_copy import HostCopyRing, HostPageIds, host_to_device
from sglang_kvc.policy import make_policy

logger = logging.getLogger(__name__)

# the parts of the cache's scheduler time (``TierCounters.host_phase_seconds``): returning empty frames, paying
# back the reserve, compacting lower tiers, demoting (room below included), dropping write-tier and lower-tier nodes
HOST_PHASES = ("release", "refill_reserve", "compact_lower", "demote", "drop_write", "drop_lower")


@dataclasses.dataclass
class TierCounters:
    """Event counters per tier (tokens), cumulative since the cache was built."""

    demoted_in: List[int]
    dropped: List[int]
    hits: List[int]
    compacted: List[int]  # tokens moved between frames of one tier
    refreshed: int = 0  # tokens of below-floor nodes replaced by freshly computed KV
    host_seconds: float = 0.0  # scheduler time in evict() and keep_watermark() (device syncs included)
    host_waits: int = 0  # write-tier page ids needed before their copy to the host had finished, or a full ring
    # host_seconds by what the scheduler was doing (HOST_PHASES; the rest is bookkeeping between them)
    host_phase_seconds: Dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(HOST_PHASES, 0.0))

    @classmethod
    def zeros(cls, num_tiers: int) -> "TierCounters":
        return cls([0] * num_tiers, [0] * num_tiers, [0] * num_tiers, [0] * num_tiers)


MIDDLE_TIER_SHARE = 0.25  # tiers between the write tier and the last grow to this share of the frames, then push down
PRESSURE_SHARE = 0.1  # memory is short when less than this share of the write tier's tokens is free
WRITE_CACHE_SHARE = 0.1  # under pressure, cached (unlocked) write-tier tokens beyond this share are demoted


class CompressedRadixCache(RadixCache):
    """A RadixCache whose node values live in the tiers of a TieredKVPool's frame arena.

    Invariants (checked by ``check_invariants``):
    * every non-root node has ``kvc_tier`` and its value's slots all lie in that tier; a node of
      a lower tier also keeps its page ids on the host (``kvc_pages``), a write-tier node a
      ``HostPageIds`` copy of them begun when it entered the tier (or host ids, after compaction);
    * ``tier_cached[t]`` is the number of tree tokens in tier ``t`` and ``tier_evictable[t]`` the
      number of those in nodes with ``lock_ref == 0``; the allocator's ``pinned`` counts per frame
      are the pages of locked lower-tier nodes;
    * a node with ``lock_ref > 0`` is never demoted, moved, dropped or given new indices, so a
      running request's indices never change under it;
    * in write-tier tokens, ``available_size() + evictable_size() + protected_size()`` + tokens
      of running requests == the allocator's ``size``: ``evictable_size()`` is every unlocked
      write-tier token plus a frame's worth for every lower-tier frame without a locked page (all
      of which ``evict`` can free), ``protected_size()`` the rest of the tree's share.
    """

    def __init__(self, params: CacheInitParams, policy: str = "lru", min_hit_bits: float = 0.0,
                 watermark: float = 0.0, min_demotion_yield: float = 0.0):
        allocator = params.token_to_kv_pool_allocator
        self.layout = allocator.layout
        self.num_tiers = self.layout.num_tiers
        self.kvc_policy = make_policy(policy)
        self.min_hit_bits = float(min_hit_bits)
        self.min_demotion_yield = float(min_demotion_yield)  # DemotionGate; 0: always demote
        self.watermark_tokens = int(watermark * allocator.size)
        self._tier_bits = [codec.spec.mean_bits for codec in self.layout.codecs]
        self.counters = TierCounters.zeros(self.num_tiers)
        # 2 x the write tier's pages: see HostCopyRing's sizing rule
        self.host_copies = HostCopyRing(2 * allocator.write_pages, allocator.device)
        super().__init__(params)

    @property
    def frame_tokens(self) -> int:
        """Write-tier tokens per frame."""
        return self.token_to_kv_pool_allocator.frame_tokens

    # ---- bookkeeping ------------------------------------------------------------------------
    def reset(self):
        super().reset()
        self.root_node.kvc_tier = None
        self.root_node.kvc_depth = 0
        self.root_node.kvc_pages = None
        self.tier_nodes: List[set] = [set() for _ in range(self.num_tiers)]
        self.tier_cached = [0] * self.num_tiers
        self.tier_evictable = [0] * self.num_tiers
        # a flush starts the evidence afresh. One window: as many tokens as the whole arena holds at the
        # last tier, the longest a demoted token can wait there for its hit
        window = self.layout.max_tokens(self.num_tiers - 1)
        self.demotion_gate = DemotionGate(window, self.min_demotion_yield)
        self._gate_was_open = True

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

    def _nodes_in_order(self, tier: int) -> List[TreeNode]:
        """The nodes of ``tier`` in creation order (``TreeNode.id``). A set's order follows object
        addresses, which differ between processes: a decision that walks ``tier_nodes`` (which node's
        pages go where in a compaction) must walk this list, so that every run, and every TP rank's
        scheduler, places pages the same way."""
        return sorted(self.tier_nodes[tier], key=lambda node: node.id)

    def _below_floor(self, node: TreeNode) -> bool:
        return self._tier_bits[node.kvc_tier] < self.min_hit_bits

    def _free_node_pages(self, node: TreeNode) -> None:
        if node.kvc_tier == 0:
            self.token_to_kv_pool_allocator.free_known(node.value, self._write_pages([node])[0])
        else:
            self.token_to_kv_pool_allocator.free_lower(node.kvc_tier, node.kvc_pages)

    # ---- SGLang's cache interface ---------------------------------------------------------------
    def evictable_size(self):
        return self.tier_evictable[0] + self.frame_tokens * self.token_to_kv_pool_allocator.evictable_lower_frames()

    def protected_size(self):
        locked_write = self.tier_cached[0] - self.tier_evictable[0]
        return locked_write + self.frame_tokens * self.token_to_kv_pool_allocator.protected_lower_frames()

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
                self.token_to_kv_pool_allocator.pin(node.kvc_tier, node.kvc_pages, +1)
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
                self.token_to_kv_pool_allocator.pin(node.kvc_tier, node.kvc_pages, -1)
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
            if node.kvc_tier > 0:
                self.demotion_gate.record_hits(len(node.key))
            node = node.parent

    def evict(self, params: EvictParams) -> EvictResult:
        """Make ``available_size() >= params.num_tokens`` (as far as ``evictable_size`` allows):
        demote before dropping; returns the write-tier tokens gained."""
        if self.disable:
            return EvictResult()
        start_time = time.perf_counter()
        allocator = self.token_to_kv_pool_allocator
        with self._frees_applied():
            before = allocator.available_size()
            self.make_write_room(params.num_tokens)
            freed = max(0, allocator.available_size() - before)
        self.update_eviction_metrics(freed, start_time)
        self.counters.host_seconds += time.perf_counter() - start_time
        return EvictResult(num_tokens_evicted=freed)

    def cache_finished_req(self, req, is_insert: bool = True, **kwargs):
        super().cache_finished_req(req, is_insert=is_insert, **kwargs)
        self.watermark_after_frees()

    def watermark_after_frees(self) -> None:
        """``keep_watermark`` once a finished request's frees are applied: at once, or inside SGLang's
        decode free group once when the group ends, however many requests finished in the step. Run
        inside the group, it would free the group's pages through SGLang's ``free`` once per finished
        request (a ``torch.unique``: the host waits for the stream, which after a page move waits for
        the running forward pass) instead of once per step."""
        self.token_to_kv_pool_allocator.run_after_free_group(self.keep_watermark)

    def keep_watermark(self) -> None:
        """Demote ahead of need, when a request finishes, so that admission rarely waits on
        requantization: keeps ``available_size()`` at or above the watermark while it can; and
        while memory is short (less than PRESSURE_SHARE of it free), moves the write tier's cached
        tokens beyond WRITE_CACHE_SHARE down a tier, so that cold history is kept compressed
        (frames it frees go to the lower tiers) instead of being dropped later.

        Nothing is dropped here: ahead of need, only what the lower tiers can take (their free
        slots, free frames, the reserve) moves; dropping is ``evict``'s, when room is needed. A
        demotion makes room below before it frees anything above, so with no free frame a lower
        tier could only take the whole excess by dropping as much of its own (or of the write
        tier, for a first frame): on the H200 e2e of 2026-12-01 (k8v8,k4v4-kc-rot,k4v2-g32-kc-rot,
        agentic run) the cache dropped 135K tokens while its last tier held under 1K and 0 of 774
        frames were free, 292K in all, and hit 0.66 of prompt tokens against stock fp8's 0.73;
        the simulator replays that run at 0.68 and at 0.85 (every token it could ever hit) with
        this rule, since the frames the demotions free reach the lower tiers on the next calls."""
        allocator = self.token_to_kv_pool_allocator
        start_time = time.perf_counter()
        with self._frees_applied():
            if self.watermark_tokens and allocator.available_size() < self.watermark_tokens:
                self.make_write_room(self.watermark_tokens, may_drop=False)
            if (self.num_tiers > 1 and self.demotion_gate.is_open()
                    and allocator.available_size() < PRESSURE_SHARE * allocator.size):
                excess = self.tier_evictable[0] - int(WRITE_CACHE_SHARE * allocator.size)
                if excess >= self.layout.pages_per_frame[1] * self.page_size:
                    self._timed("demote", self.demote, 0, excess, False)
                    self._timed("refill_reserve", self._refill_reserve)
        self.counters.host_seconds += time.perf_counter() - start_time

    @contextlib.contextmanager
    def _frees_applied(self):
        """Inside: pages freed so far, and any freed here, are on the allocator's free lists.

        SGLang releases the requests that finish in a decode step between the allocator's
        ``free_group_begin()`` and ``free_group_end()`` (``process_batch_result_decode``), which hold
        every freed page back until the step ends; ``cache_finished_req`` runs in between (its
        ``keep_watermark`` waits for the group's end, ``watermark_after_frees``; eviction called inside
        a group still meets it). Eviction measures its progress by ``available_size()`` and by whole
        free frames, so inside a group it saw none of it: lower tiers got no frames (a demotion became a
        drop) and ``make_write_room`` dropped on until nothing was left to drop (H200 e2e of
        2026-12-01: as 26 requests finished, the write tier's cache went from 70.7K tokens to 9.5K,
        free frames read 0 with 660 write frames holding 13.4K tokens, and 558 frames were free once
        the step had ended; the last tier dropped every token demoted into it). The group is closed
        here and reopened after: its pending pages are freed now rather than at the end of the
        step, before anything can allocate them (moves are ordered after the forward passes already
        launched)."""
        allocator = self.token_to_kv_pool_allocator
        in_group = not getattr(allocator, "is_not_in_free_group", True)
        if in_group:
            allocator.free_group_end(run_deferred=False)
        try:
            yield
        finally:
            if in_group:
                allocator.free_group_begin()

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
        new_node.last_access_time = child.last_access_time  # a split is no access
        new_node.kvc_depth = child.kvc_depth
        child.kvc_depth += split_len
        new_node.kvc_pages = None
        if child.kvc_pages is not None:
            split_pages = split_len // self.page_size
            new_node.kvc_pages, child.kvc_pages = child.kvc_pages[:split_pages], child.kvc_pages[split_pages:]
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
            node.kvc_pages = self._start_host_copy(node.value)
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
        self._free_node_pages(node)
        node.value = fresh_value.clone()
        node.kvc_pages = self._start_host_copy(node.value)
        self._track(node, 0)
        self.counters.refreshed += len(node.value)

    def _delete_leaf(self, node: TreeNode):
        self._untrack(node)
        super()._delete_leaf(node)

    # ---- demote before drop ---------------------------------------------------------------------
    def make_write_room(self, target_available: int, may_drop: bool = True) -> None:
        """Raise the allocator's ``available_size()`` to ``target_available`` write tokens, or as
        far as ``evictable_size`` allows. In order, each round: compact sparse lower-tier frames
        (lossless: frames go back to the write tier), demote the coldest unlocked write-tier nodes
        one tier down (room is made there first by demoting or, in the last tier, dropping its own
        coldest), drop the coldest write-tier nodes, drop the coldest lower-tier nodes. While the
        demotion gate is closed (``DemotionGate``: demoted tokens are rarely hit), only its probes
        demote; the lower tiers keep what is there, so that their hits stay measured. Unless
        ``may_drop``, nothing is dropped: only compaction and the demotions that fit."""
        allocator = self.token_to_kv_pool_allocator
        timed = self._timed
        for _ in range(1024):
            timed("release", allocator.release_empty_frames)
            timed("refill_reserve", self._refill_reserve)
            need = target_available - allocator.available_size()
            if need <= 0:
                return
            if timed("compact_lower", self._compact_lower):
                continue
            self._log_gate_change()
            demote = self.num_tiers > 1 and self.demotion_gate.allow()
            if ((demote and timed("demote", self._demote_write, need, may_drop))
                    or (may_drop and (timed("drop_write", self._drop, 0, need)
                                      or timed("drop_lower", self._drop_lower, need)))):
                continue
            return

    def _timed(self, phase: str, fn, *args):
        """``fn(*args)``, its host time added to ``host_phase_seconds[phase]``."""
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.counters.host_phase_seconds[phase] += time.perf_counter() - start

    def _log_gate_change(self) -> None:
        """One log line each time the demotion gate opens or closes."""
        now = self.demotion_gate.is_open()
        if now != self._gate_was_open:
            self._gate_was_open = now
            logger.info(f"sglang-kvc: demotion {'on' if now else 'off'}: "
                        f"{self.demotion_gate.demotion_yield:.2f} lower-tier hit tokens per demoted token "
                        f"({'>=' if now else '<'} --kvc-min-demotion-yield {self.min_demotion_yield:g})"
                        + ("" if now else "; dropping as stock SGLang does, demoting a probe share"))

    def _demote_write(self, need_tokens: int, may_drop: bool = True) -> bool:
        """Demote the coldest unlocked write-tier nodes worth ``need_tokens`` (at least a frame of
        tier 1, so that a new frame pays off) into tier 1; False if none could move."""
        r1_tokens = self.layout.pages_per_frame[1] * self.page_size
        return self.demote(0, max(need_tokens, r1_tokens), may_drop) > 0

    def demote(self, tier: int, num_tokens: int, may_drop: bool = True) -> int:
        """Move the coldest unlocked nodes of ``tier`` worth about ``num_tokens`` one tier down,
        making room there first (its own coldest go further down; the last tier drops, unless
        ``may_drop`` is False: then only what fits without dropping anything moves). Returns the
        tokens moved; nodes that do not fit stay."""
        lower = tier + 1
        if lower >= self.num_tiers or num_tokens <= 0:
            return 0
        victims = self._coldest(tier, num_tokens)
        if not victims:
            return 0
        room = self._room(lower, sum(len(n.value) for n in victims) // self.page_size, may_drop)
        if room == 0 and tier == 0 and may_drop and self._bootstrap_frame():
            victims = self._coldest(tier, num_tokens)
            room = self._room(lower, sum(len(n.value) for n in victims) // self.page_size)
        fitting, used = [], 0
        for node in victims:
            if node not in self.tier_nodes[tier]:  # making room may have dropped it with a subtree
                continue
            pages = len(node.value) // self.page_size
            if used + pages <= room:
                fitting.append(node)
                used += pages
                continue
            if room > used:  # the head of a node larger than the room left goes; its tail stays
                fitting.append(self._split_node(node.key, node, (room - used) * self.page_size))
            break
        return self._move_nodes(fitting, lower)

    def _refill_reserve(self) -> None:
        """Pay back reserve frames on loan from free frames, compacting the write tier's holes into
        whole frames when too few are free."""
        allocator = self.token_to_kv_pool_allocator
        short = allocator.reserve_capacity - len(allocator.reserve_frames())
        if short > 0:
            free = allocator.find_free_frames(short)
            if len(free) < short and self._compact_write(short):
                free = allocator.find_free_frames(short)
            allocator.refill_reserve(free)

    def _bootstrap_frame(self) -> bool:
        """No lower tier can take a frame and none is free: drop the coldest write-tier nodes until
        a whole frame frees up (the write tier fills frames from the bottom, so a cold node usually
        covers whole frames). True if a frame is free now."""
        allocator = self.token_to_kv_pool_allocator
        for _ in range(16):
            if len(allocator.find_free_frames(1)):
                return True
            if not self._drop(0, self.frame_tokens):
                return False
        return len(allocator.find_free_frames(1)) > 0

    def _room(self, tier: int, pages: int, may_drop: bool = True) -> int:
        """Free slots of lower ``tier`` (at most ``pages`` needed): free frames first (a middle tier
        only up to MIDDLE_TIER_SHARE of the arena; compacting the write tier if none is free), then
        its own coldest nodes moved one tier down; the last tier drops its coldest (a middle tier
        its own, when they could not move), unless ``may_drop`` is False. Returns the free slots."""
        allocator = self.token_to_kv_pool_allocator
        books = allocator.lower[tier]
        middle = tier < self.num_tiers - 1
        if pages > books.free_slots():
            self._refill_reserve()
        for _ in range(8):
            short = pages - books.free_slots()
            if short <= 0:
                break
            if not (middle and books.owned.sum() >= MIDDLE_TIER_SHARE * allocator.num_frames):
                frames = -(-short // books.r)
                # only the last tier borrows from the reserve: it can always pay back by dropping
                if allocator.take_frames(tier, frames, borrow=not middle) < frames:
                    self._compact_write(frames)
                    allocator.take_frames(tier, frames, borrow=not middle)
                if books.free_slots() >= pages:
                    break
            if not middle or self.demote(tier, (pages - books.free_slots()) * self.page_size, may_drop) == 0:
                break
        if may_drop and books.free_slots() < pages:
            self._drop(tier, (pages - books.free_slots()) * self.page_size)
        return books.free_slots()

    def _move_nodes(self, nodes: List[TreeNode], to_tier: int) -> int:
        """Demote unlocked nodes of one tier into ``to_tier``: one batched requantize, all layers.
        Returns the tokens moved."""
        if not nodes:
            return 0
        from_tier = nodes[0].kvc_tier
        lengths = [len(n.value) for n in nodes]
        src_pages = np.concatenate(self._write_pages(nodes) if from_tier == 0 else [n.kvc_pages for n in nodes])
        new_values, new_pages = self.token_to_kv_pool_allocator.demote(
            torch.cat([n.value for n in nodes]), from_tier, to_tier, src_pages)
        start = 0
        for node, length in zip(nodes, lengths):
            self._untrack(node)
            node.value = new_values[start: start + length]
            node.kvc_pages = new_pages[start // self.page_size: (start + length) // self.page_size]
            start += length
            self._track(node, to_tier)
        moved = sum(lengths)
        self.counters.demoted_in[to_tier] += moved
        if from_tier == 0:
            self.demotion_gate.record_demoted(moved)
        return moved

    def _start_host_copy(self, value: torch.Tensor) -> HostPageIds:
        """Begin copying the page ids of a value entering the write tier to the host (waits only
        when the ring is full: counted in ``host_waits``)."""
        waits = self.host_copies.full_waits
        ids = self.host_copies.copy(value[:: self.page_size] // self.page_size)
        self.counters.host_waits += self.host_copies.full_waits - waits
        return ids

    def _write_pages(self, nodes) -> List[np.ndarray]:
        """Host page ids of write-tier ``nodes`` (each node keeps them as ``kvc_pages``, begun when
        it entered the tier): a copy still in flight is waited for (``host_waits``)."""
        for node in nodes:
            if isinstance(node.kvc_pages, HostPageIds):
                if not node.kvc_pages.ready():
                    self.counters.host_waits += 1
                node.kvc_pages = node.kvc_pages.resolve()
        return [node.kvc_pages for node in nodes]

    def _compact_write(self, frames_wanted: int) -> int:
        """Free up to ``frames_wanted`` whole write-tier frames, losslessly, by copying the unlocked
        tree pages of the sparsest frames into free write pages of other frames (frames holding a
        running request's or a locked node's page stay). Returns the frames freed."""
        if frames_wanted <= 0:
            return 0
        allocator = self.token_to_kv_pool_allocator
        r = allocator.r_write
        nodes = [n for n in self._nodes_in_order(0) if n.lock_ref == 0]
        self._write_pages(nodes)
        if not allocator.free_mirror.complete:
            allocator.read_free_lists()
        free_pages = allocator.free_mirror.pages()
        num_frames = allocator.num_frames
        free_count = np.bincount(free_pages // r, minlength=num_frames)[:num_frames]
        movable = np.concatenate([n.kvc_pages for n in nodes]) if nodes else np.zeros(0, dtype=np.int64)
        movable_count = np.bincount(movable // r, minlength=num_frames)[:num_frames]
        write_owned = allocator.owner == -1
        evacuable = write_owned & (free_count + movable_count == r) & (movable_count > 0)
        candidates = np.flatnonzero(evacuable)
        candidates = candidates[np.argsort(movable_count[candidates], kind="stable")]
        partial = write_owned & (free_count > 0) & (free_count < r)
        room = int(free_count[partial].sum())
        chosen, moving = [], 0
        for frame in candidates[: 4 * frames_wanted + 4]:
            room_left = room - (free_count[frame] if partial[frame] else 0)
            if moving + movable_count[frame] > room_left:
                continue
            chosen.append(frame)
            room, moving = room_left, moving + int(movable_count[frame])
            if len(chosen) == frames_wanted:
                break
        if not chosen:
            return 0
        chosen = np.asarray(chosen)
        inside = np.zeros(num_frames, dtype=bool)
        inside[chosen] = True
        targets = partial & ~inside
        dest_frames = np.flatnonzero(targets)
        dest_frames = dest_frames[np.argsort(free_count[dest_frames], kind="stable")]  # fullest first
        rank = np.zeros(num_frames, dtype=np.int64)
        rank[dest_frames] = np.arange(len(dest_frames))
        dst = np.sort(free_pages)
        dst = dst[targets[dst // r]]
        dst = dst[np.argsort(rank[dst // r], kind="stable")][:moving]
        device = nodes[0].value.device
        moves, start = [], 0  # (node, mask of its pages that move, their new pages)
        for node in nodes:
            mask = inside[node.kvc_pages // r]
            count = int(mask.sum())
            if count:
                moves.append((node, mask, dst[start: start + count]))
                start += count
        src = np.concatenate([node.kvc_pages[mask] for node, mask, _ in moves])
        allocator.claim_write_pages(dst)
        try:
            allocator.move(0, host_to_device(src, device), 0, dst)
        except BaseException:  # nothing moved: the claimed pages go back, the nodes keep theirs
            allocator.free_known(host_to_device(dst, device) * self.page_size, dst)
            raise
        self._repoint(moves, 0, device)
        allocator.free_known(host_to_device(src, device) * self.page_size, src)
        return len(chosen)

    def _compact_lower(self) -> bool:
        """Move the pages of the sparsest unpinned frames of each lower tier into free slots of its
        other frames, so that whole frames go back to the write tier; True if any went back."""
        allocator = self.token_to_kv_pool_allocator
        returned_before = allocator.frames_returned
        for tier in range(1, self.num_tiers):
            books = allocator.lower[tier]
            if books.free_slots() < books.r:
                continue
            frames = books.frames()
            frames = frames[books.pinned[frames] == 0]
            frames = frames[np.argsort(books.used_count[frames], kind="stable")]
            free_elsewhere = books.free_slots()
            evacuate, moving = [], 0
            for frame in frames:
                free_elsewhere -= books.r - books.used_count[frame]
                if moving + books.used_count[frame] > free_elsewhere:
                    break
                evacuate.append(frame)
                moving += books.used_count[frame]
            if evacuate:
                self._evacuate(tier, np.asarray(evacuate))
        return allocator.frames_returned > returned_before

    def _evacuate(self, tier: int, frames: np.ndarray) -> None:
        """Copy the pages held in ``frames`` (unpinned) to other frames of the tier, node by node."""
        allocator = self.token_to_kv_pool_allocator
        books = allocator.lower[tier]
        inside = np.zeros(books.used.shape[0], dtype=bool)
        inside[frames] = True
        moving = [n for n in self._nodes_in_order(tier) if inside[books.locate(n.kvc_pages)[0]].any()]
        if not moving:
            allocator._return_empty_frames(tier, frames)
            return
        books.owned[frames] = False  # keep the destination slots out of these frames
        try:
            dst_total = sum(int(inside[books.locate(n.kvc_pages)[0]].sum()) for n in moving)
            dst = books.take_open_slots(dst_total)
        finally:
            books.owned[frames] = True
        if len(dst) < dst_total:
            books.mark(dst, False)
            return
        device = next(iter(moving)).value.device
        moves, start = [], 0
        for node in moving:
            mask = inside[books.locate(node.kvc_pages)[0]]
            count = int(mask.sum())
            moves.append((node, mask, dst[start: start + count]))
            start += count
        src = np.concatenate([node.kvc_pages[mask] for node, mask, _ in moves])
        try:
            allocator.move(tier, host_to_device(src, device), tier, dst)
        except BaseException:  # nothing moved: the destination slots go back, the nodes keep theirs
            allocator.free_lower(tier, dst)
            raise
        self._repoint(moves, tier, device)
        allocator.free_lower(tier, src)

    def _repoint(self, moves, tier: int, device) -> None:
        """After a compaction copied them: each (node, mask of its pages, new pages) points the
        masked pages of the node at their new places."""
        for node, mask, new in moves:
            new_pages = node.kvc_pages.copy()
            new_pages[mask] = new
            node.kvc_pages = new_pages
            node.value = self.token_to_kv_pool_allocator.pool.pages_to_slots(host_to_device(new_pages, device))
            self.counters.compacted[tier] += len(new) * self.page_size

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

    def _drop(self, tier: int, num_tokens: int) -> bool:
        """Drop at least ``num_tokens`` of ``tier`` held by unlocked nodes (leaves first, then
        cold subtrees); True if anything was dropped."""
        freed = self._drop_leaves(tier, num_tokens)
        if freed < num_tokens:
            freed += self._drop_subtrees(tier, num_tokens - freed)
        return freed > 0

    def _drop_lower(self, need_tokens: int) -> bool:
        """Give frames back to the write tier by dropping the coldest nodes of the lowest tiers
        first (a frame's worth per missing frame), then compacting."""
        allocator = self.token_to_kv_pool_allocator
        frames_needed = -(-need_tokens // self.frame_tokens)
        before = allocator.frames_returned
        for tier in range(self.num_tiers - 1, 0, -1):
            if allocator.lower[tier].used_pages() == 0:
                continue
            if self._drop(tier, frames_needed * allocator.lower[tier].r * self.page_size):
                self._compact_lower()
                if allocator.frames_returned > before:
                    return True
        return allocator.frames_returned > before

    def _drop_leaves(self, tier: int, num_tokens: int) -> int:
        priority = self.kvc_policy.priority
        heap = [(priority(n), n.id, n) for n in self.tier_nodes[tier]
                if n.lock_ref == 0 and not n.children]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            self._free_node_pages(node)
            freed += len(node.value)
            self._count_drop(node, tier)
            parent = node.parent
            self._delete_leaf(node)
            self._record_remove_event(node)
            if (parent is not self.root_node and not parent.children and parent.lock_ref == 0
                    and parent.kvc_tier == tier):
                heapq.heappush(heap, (priority(parent), parent.id, parent))
        return freed

    def _count_drop(self, node: TreeNode, tier: int) -> None:
        self.counters.dropped[tier] += len(node.value)
        if tier == 0:
            self.demotion_gate.record_dropped(len(node.value))

    def _drop_subtrees(self, tier: int, num_tokens: int) -> int:
        """Drop the coldest unlocked nodes of ``tier`` with all their descendants (unlocked too,
        since a lock covers the whole path to the root); returns the ``tier`` tokens freed."""
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
                self._free_node_pages(node)
                self._count_drop(node, node.kvc_tier)
                self._delete_leaf(node)
                self._record_remove_event(node)
        return freed

    # ---- statistics and checks ------------------------------------------------------------------
    def host_syncs(self) -> int:
        """Device-to-host reads on the scheduler's path so far (all of them the allocator's reads of
        SGLang's free lists: the cache's own page ids come from asynchronous copies)."""
        return self.token_to_kv_pool_allocator.host_syncs

    def kvc_stats(self, exact: bool = False) -> Dict[str, object]:
        """Per-tier tokens and frames, demotions, drops, hits, and bytes saved against bf16 (the
        metrics' source). Free frames are as of the last count unless ``exact`` (a host sync)."""
        bf16_bpt = self.layout.bf16_bytes_per_token()
        names = [c.name for c in self.layout.codecs]
        saved = sum(self.tier_cached[t] * (bf16_bpt - self.layout.bytes_per_token(t)) for t in range(self.num_tiers))
        allocator = self.token_to_kv_pool_allocator
        return {
            "tiers": names,
            "cached_tokens": list(self.tier_cached),
            "evictable_tokens": list(self.tier_evictable),
            "frames": allocator.frames_per_tier(exact),
            "free_frames": allocator.last_free_frames,
            "total_frames": allocator.num_frames,
            "demoted_tokens": list(self.counters.demoted_in),
            "dropped_tokens": list(self.counters.dropped),
            "compacted_tokens": list(self.counters.compacted),
            "hit_tokens": list(self.counters.hits),
            "refreshed_tokens": self.counters.refreshed,
            "host_seconds": self.counters.host_seconds,
            "host_phase_seconds": dict(self.counters.host_phase_seconds),
            "host_syncs": self.host_syncs(),
            "host_sync_seconds": allocator.host_sync_seconds,
            "host_waits": self.counters.host_waits,
            "move_gpu_seconds": allocator.pool.move_timer.poll(),
            "bytes_saved_vs_bf16": saved,
            "demotion_yield": self.demotion_gate.demotion_yield,
            "demotion_open": self.demotion_gate.is_open(),
            "demotion_refusals": self.demotion_gate.closed_decisions,
        }

    def check_invariants(self, in_use_per_tier: Optional[List[int]] = None) -> None:
        """Raise AssertionError if the tree and the allocator's books disagree.

        ``in_use_per_tier``: write-tier slots held by running requests outside the tree (default
        none). Checks per lower tier ``free + cached == capacity`` (its frames' slots); for the
        write tier ``available + cached + in_use + (lower frames x frame tokens) == size``; and
        SGLang's own identity ``available + evictable + protected + in_use == size``.
        """
        cached, evictable = [0] * self.num_tiers, [0] * self.num_tiers
        allocator = self.token_to_kv_pool_allocator
        pinned = {t: np.zeros(allocator.num_frames, dtype=np.int64) for t in allocator.lower}
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
            pages = node.kvc_pages
            assert pages is not None, "a node without host page ids"
            pages = torch.as_tensor(pages.resolve() if isinstance(pages, HostPageIds) else pages)
            assert torch.equal(pages, node.value[:: self.page_size].cpu() // self.page_size), \
                "a node's host page ids disagree with its value"
            if tier > 0:
                if node.lock_ref > 0:
                    np.add.at(pinned[tier], allocator.lower[tier].locate(node.kvc_pages)[0], 1)
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
        allocator.check_books()
        for t, books in allocator.lower.items():
            assert (pinned[t] == books.pinned).all(), f"tier {t}: pinned counts disagree with locked nodes"
            total = allocator.free_tokens(t) + cached[t]
            assert total == allocator.capacity_tokens(t), (
                f"tier {t}: free {allocator.free_tokens(t)} + cached {cached[t]} != capacity "
                f"{allocator.capacity_tokens(t)}")
        in_use = (in_use_per_tier or [0])[0]
        budget_frames = allocator.lower_frames() - allocator.borrowed_frames()
        reserved = allocator.regular_frames * self.frame_tokens - allocator.size  # padding page, pages past size
        write_total = allocator.available_size() + cached[0] + in_use + budget_frames * self.frame_tokens + reserved
        assert write_total == allocator.regular_frames * self.frame_tokens, (
            f"write tier: available {allocator.available_size()} + cached {cached[0]} + in use {in_use} + "
            f"{budget_frames} lower frames x {self.frame_tokens} + reserved {reserved} != regular frames' tokens")
        sglang_total = allocator.available_size() + self.evictable_size() + self.protected_size() + in_use
        assert sglang_total == allocator.size, f"available + evictable + protected + in use {sglang_total} != size"
