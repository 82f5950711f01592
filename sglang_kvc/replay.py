"""Drives a radix cache the way SGLang's scheduler does, without a model: for tests, the demo and the simulator.

A request's life: ``match_prefix`` -> ``inc_lock_ref`` on the matched node -> allocate the new
tokens' pages (evicting first when the write tier is short, as ``alloc_for_extend`` does) -> write
their KV -> on finish, ``insert`` the page-aligned sequence, free the duplicates the tree already
held and the unaligned tail, ``dec_lock_ref`` (as ``RadixCache.cache_finished_req`` does).
"""

from __future__ import annotations

import dataclasses
from array import array
from typing import List, Optional, Sequence

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey


class SyntheticKV:
    """Deterministic K/V for token ``t`` at position ``p``: the same tokens at the same positions
    always get the same KV, as a real model's prefix would."""

    def __init__(self, num_heads: int, head_dim: int, vocab: int = 97, max_pos: int = 131, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.token_table = torch.randn(vocab, 2, num_heads, head_dim, generator=gen)
        self.pos_table = 0.5 * torch.randn(max_pos, 2, num_heads, head_dim, generator=gen)
        self.layer_table = torch.randn(64, 1, 1, 1, generator=gen).abs() + 0.5

    def kv(self, tokens: Sequence[int], start_pos: int, layer: int):
        ids = torch.as_tensor(list(tokens), dtype=torch.int64)
        pos = torch.arange(start_pos, start_pos + len(ids))
        both = (self.token_table[ids % len(self.token_table)] + self.pos_table[pos % len(self.pos_table)])
        both = (both * self.layer_table[layer]).to(torch.bfloat16).float()
        return both[:, 0], both[:, 1]


@dataclasses.dataclass(eq=False)
class RunningRequest:
    """A request between admission and finish: it holds a lock on ``last_node`` and owns ``new_slots``."""

    tokens: List[int]
    prefix_slots: torch.Tensor
    new_slots: torch.Tensor  # whole pages; the first ``len(tokens) - len(prefix_slots)`` are used
    last_node: object

    @property
    def kv_slots(self) -> torch.Tensor:
        return torch.cat([self.prefix_slots, self.new_slots[: len(self.tokens) - len(self.prefix_slots)]])


class CacheDriver:
    """Replays requests through a real SGLang radix cache and its allocator (CPU)."""

    def __init__(self, cache, allocator, pool=None, kv_source: Optional[SyntheticKV] = None):
        self.cache = cache
        self.allocator = allocator
        self.pool = pool
        self.kv_source = kv_source
        self.page_size = allocator.page_size
        self.running: List[RunningRequest] = []
        self.rejected = 0
        self.evicted_tokens = 0
        self.failed_allocs = 0

    def match(self, tokens: Sequence[int]):
        return self.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))

    def start(self, tokens: Sequence[int], prompt_len: Optional[int] = None) -> Optional[RunningRequest]:
        """Admit a request: lock its cached prefix and allocate pages for the rest.

        Returns None, holding nothing, when the write tier cannot make room: before locking when
        free + evictable is too small (as SGLang's PrefillAdder), after it when eviction fell short.
        ``tokens`` are all the request will hold (prompt and output); only the first ``prompt_len``
        (default: all) are matched against the cache.
        """
        tokens = list(tokens)
        prompt_len = len(tokens) if prompt_len is None else prompt_len
        match = self.match(tokens[:prompt_len - 1])  # SGLang always computes at least the last token
        prefix = match.device_indices
        num_new = len(tokens) - len(prefix)
        need = -(-num_new // self.page_size) * self.page_size
        if need > self.allocator.available_size() + self.cache.evictable_size():
            self.rejected += 1  # PrefillAdder refuses it before locking anything
            return None
        self.cache.inc_lock_ref(match.last_device_node)
        if self.allocator.available_size() < need:
            self.evicted_tokens += self.cache.evict(EvictParams(num_tokens=need)).num_tokens_evicted
        new_slots = self.allocator.alloc(need)
        if new_slots is None:
            self.cache.dec_lock_ref(match.last_device_node)
            self.failed_allocs += 1
            return None
        if hasattr(self.cache, "record_hits"):
            self.cache.record_hits(match.last_device_node)
        request = RunningRequest(tokens, prefix, new_slots, match.last_device_node)
        if self.pool is not None and self.kv_source is not None:
            for layer in range(self.pool.layer_num):
                k, v = self.kv_source.kv(tokens[len(prefix):], len(prefix), layer)
                self.pool.set_kv_buffer(_Layer(layer), new_slots[:num_new], k, v)
        self.running.append(request)
        return request

    def finish(self, request: RunningRequest) -> int:
        """Insert the request's KV into the tree and release it; returns its prefix-hit length."""
        self.running.remove(request)
        aligned = len(request.tokens) // self.page_size * self.page_size
        kv_slots = request.kv_slots
        result = self.cache.insert(InsertParams(key=RadixKey(array("q", request.tokens[:aligned])),
                                                value=kv_slots[:aligned]))
        self.allocator.free(kv_slots[len(request.prefix_slots):result.prefix_len])
        self.allocator.free(request.new_slots[aligned - len(request.prefix_slots):])
        self.cache.dec_lock_ref(request.last_node)
        return len(request.prefix_slots)

    def run(self, tokens: Sequence[int]) -> Optional[int]:
        """Start and finish one request; returns its cache-hit tokens (None if it could not run)."""
        request = self.start(tokens)
        return None if request is None else self.finish(request)

    def in_use_per_tier(self) -> List[int]:
        in_use = [0] * self.allocator.layout.num_tiers
        in_use[0] = sum(len(r.new_slots) for r in self.running)
        return in_use


class _Layer:
    def __init__(self, layer_id: int):
        self.layer_id = layer_id


# ---- step-level driving (the cache simulator's scheduler) --------------------------------------------
@dataclasses.dataclass(eq=False)
class ServedRequest:
    """A request as SGLang's scheduler holds it, between its first admission and its finish.

    ``slots[i]`` is the KV slot of token ``i``. Invariants: ``slots[:protected]`` belong to the
    tree (the matched or re-matched prefix; ``last_node`` is locked and covers exactly them), the
    rest are the request's own, allocated in whole pages; ``computed <= len(slots)`` tokens have
    KV. ``protected`` is a multiple of the page size."""

    tokens: List[int]  # prompt + output: everything it will ever hold
    prompt_len: int
    fill_len: int  # tokens to prefill: the prompt, plus the outputs sampled before a retraction
    slots: torch.Tensor
    protected: int
    last_node: object
    computed: int
    decoded: int = 0  # output tokens sampled so far (the first one by the prefill's last chunk)
    hit_tokens: int = 0  # prefix matched at admission (SGLang's cached_tokens)

    @property
    def output_len(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def prefill_left(self) -> int:
        return max(0, self.fill_len - self.computed)

    @property
    def context_len(self) -> int:
        """Tokens whose KV the next decode step reads (and writes one more)."""
        return self.prompt_len + self.decoded

    @property
    def own_tokens(self) -> int:
        """Slots this request allocated itself (what the write tier holds for it)."""
        return len(self.slots) - self.protected


class StepDriver(CacheDriver):
    """SGLang's per-step cache calls for one request at a time, as ``scheduler.py``,
    ``schedule_batch.py`` and ``RadixCache.cache_{unfinished,finished}_req`` make them:

    * ``match``: ``match_prefix`` of the prompt but its last token (SGLang always computes one);
    * ``admit``: ``inc_lock_ref`` on the matched node (what ``PrefillAdder.add_one_req`` does);
    * ``extend``: allocate the pages of the next ``n`` prompt tokens, evicting first when the
      allocator is short (``alloc_for_extend``); the caller decides ``n`` (chunked prefill);
    * ``cache_unfinished``: after a non-final chunk, insert the computed page-aligned prefix, free
      the slots the tree already held, re-match and move the lock to the new node;
    * ``grow_for_decode``: a new page when the next decode token does not fit (``alloc_for_decode``);
    * ``finish``: insert prompt + output (but the last sampled token, whose KV is never computed),
      free duplicates and the unaligned tail, unlock (``cache_finished_req``);
    * ``retract``: free everything the request owns and unlock (its progress is lost).

    Each returns without holding anything new when memory is short (None / False)."""

    def match_request(self, tokens: Sequence[int], fill_len: int):
        """The cached prefix of ``tokens[:fill_len - 1]``: (slots, last node)."""
        match = self.match(list(tokens[: fill_len - 1]))
        return match.device_indices, match.last_device_node

    def admit(self, tokens: Sequence[int], prompt_len: int, prefix_slots: torch.Tensor, last_node,
              fill_len: Optional[int] = None, decoded: int = 0, locked: bool = False) -> ServedRequest:
        """The admitted request, holding a lock on ``last_node`` (taken here unless ``locked``)."""
        if not locked:
            self.cache.inc_lock_ref(last_node)
        if hasattr(self.cache, "record_hits"):
            self.cache.record_hits(last_node)
        prefix = len(prefix_slots)
        return ServedRequest(list(tokens), prompt_len, prompt_len if fill_len is None else fill_len,
                             prefix_slots.clone(), prefix, last_node, prefix, decoded=decoded, hit_tokens=prefix)

    def ensure_available(self, num_tokens: int) -> bool:
        """``evict_from_tree_cache``: evict when the allocator has fewer than ``num_tokens`` free
        (SGLang passes a batch's extend tokens + a page per request, or a page per decoding
        request); True if that many are free afterwards."""
        if self.allocator.available_size() < num_tokens:
            self.evicted_tokens += self.cache.evict(EvictParams(num_tokens=num_tokens)).num_tokens_evicted
        return self.allocator.available_size() >= num_tokens

    def _alloc_pages(self, tokens_needed: int) -> Optional[torch.Tensor]:
        need = -(-tokens_needed // self.page_size) * self.page_size
        if need <= 0:
            return torch.empty(0, dtype=torch.int64)
        self.ensure_available(need)
        slots = self.allocator.alloc(need)
        if slots is None:
            self.failed_allocs += 1
        return slots

    def extend(self, request: ServedRequest, num_tokens: int) -> bool:
        """Allocate for prompt tokens ``computed .. computed + num_tokens`` (not yet marked computed)."""
        short = request.computed + num_tokens - len(request.slots)
        if short > 0:
            slots = self._alloc_pages(short)
            if slots is None:
                return False
            request.slots = torch.cat([request.slots, slots.to(request.slots.dtype)])
        return True

    def cache_unfinished(self, request: ServedRequest) -> None:
        aligned = request.computed // self.page_size * self.page_size
        if aligned <= request.protected:
            return
        key = array("q", request.tokens[:aligned])
        result = self.cache.insert(InsertParams(key=RadixKey(key), value=request.slots[:aligned].clone()))
        self.allocator.free(request.slots[request.protected:result.prefix_len])
        match = self.cache.match_prefix(MatchPrefixParams(key=RadixKey(key)))
        new_slots = match.device_indices
        assert len(new_slots) == aligned, "the tree lost a prefix it was just given"
        self.cache.inc_lock_ref(match.last_device_node)
        self.cache.dec_lock_ref(request.last_node)
        request.slots = torch.cat([new_slots.to(request.slots.dtype), request.slots[aligned:]])
        request.protected, request.last_node = aligned, match.last_device_node

    def decode_pages_needed(self, request: ServedRequest) -> int:
        """Tokens (whole pages) the next decode step must allocate for ``request``: 0 or a page."""
        return self.page_size if request.context_len > len(request.slots) else 0

    def grow_for_decode(self, request: ServedRequest) -> bool:
        """Room for the KV of the token fed to the next decode step (the last sampled one)."""
        if not self.decode_pages_needed(request):
            return True
        slots = self._alloc_pages(request.context_len - len(request.slots))
        if slots is None:
            return False
        request.slots = torch.cat([request.slots, slots.to(request.slots.dtype)])
        return True

    def finish_served(self, request: ServedRequest) -> None:
        kv_len = request.prompt_len + max(request.decoded - 1, 0)
        aligned = kv_len // self.page_size * self.page_size
        if aligned > request.protected:
            result = self.cache.insert(InsertParams(key=RadixKey(array("q", request.tokens[:aligned])),
                                                    value=request.slots[:aligned].clone()))
            self.allocator.free(request.slots[request.protected:result.prefix_len])
        else:
            aligned = request.protected
        self.allocator.free(request.slots[aligned:])
        self.cache.dec_lock_ref(request.last_node)
        if hasattr(self.cache, "watermark_after_frees"):  # what CompressedRadixCache.cache_finished_req adds
            self.cache.watermark_after_frees()

    def retract(self, request: ServedRequest) -> None:
        self.allocator.free(request.slots[request.protected:])
        self.cache.dec_lock_ref(request.last_node)
