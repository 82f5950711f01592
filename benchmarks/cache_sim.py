"""Deterministic cache simulator (issue #4): replays traces through the real radix caches at one KV byte budget.

Stock SGLang 0.5.16 ``RadixCache`` over SGLang's own pool and allocator (at bf16 or fp8 bytes per
token) and our ``CompressedRadixCache`` over the tiered pool are driven exactly like SGLang's
scheduler drives them (match -> lock -> evict if short -> alloc -> insert/free/unlock on finish),
with several requests running at once. Tier capacities come from a real model's KV shape and the
byte budget; the pools are allocated with a one-layer, one-head shape of the same head_dim (byte
ratios are exact, memory is tiny) and no KV is written: the simulator counts cache hits, not values.

    .venv/bin/python -m benchmarks.cache_sim            # defaults: a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import heapq
import json
import os
import platform
import subprocess
import sys
import time
from collections import deque
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("SGLANG_KVC_QUIET", "1")

import torch  # noqa: E402
from sglang.srt.mem_cache import radix_cache as sglang_radix_cache  # noqa: E402
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import EvictParams  # noqa: E402
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache  # noqa: E402

from benchmarks.traces import TRACES, Trace, TraceRequest  # noqa: E402
from sglang_kvc import compressed_cache as kvc_compressed_cache  # noqa: E402
from sglang_kvc.allocator import make_tiered_allocator  # noqa: E402
from sglang_kvc.compressed_cache import CompressedRadixCache  # noqa: E402
from sglang_kvc.codec import TierCodec  # noqa: E402
from sglang_kvc.config import KVCConfig  # noqa: E402
from sglang_kvc.layout import KVShape, TierLayout  # noqa: E402
from sglang_kvc.policy import POLICIES  # noqa: E402
from sglang_kvc.pool import TieredKVPool  # noqa: E402
from sglang_kvc.replay import CacheDriver, RunningRequest  # noqa: E402
from sglang_kvc.tiers import TierSpecError, parse_ladder  # noqa: E402

MODEL_SHAPE = KVShape(num_layers=16, num_kv_heads=8, head_dim=64)  # Llama 3.2 1B
SIM_SHAPE = KVShape(num_layers=1, num_kv_heads=1, head_dim=64)
STOCK_DTYPES = {"bf16": (torch.bfloat16, 1.0), "fp8": (torch.float8_e4m3fn, 0.5)}
HEADLINE_BUDGET = 0.25
HEADLINE_TRACE = "agentic"
TARGET_RATIO = 2.0


# ---- simulated time -----------------------------------------------------------------------------
class SimClock:
    """Simulated seconds, standing in for ``time.monotonic`` inside the caches.

    Invariant: readings never decrease and two readings are never equal (each is at least one
    tick after the previous one), so LRU stamps order events as they happened, independent of how
    fast this machine runs.
    """

    TICK_S = 1e-7

    def __init__(self):
        self.now = 0.0
        self._last = -self.TICK_S

    def advance_to(self, when: float) -> None:
        self.now = max(self.now, when)

    def monotonic(self) -> float:
        self._last = max(self.now, self._last + self.TICK_S)
        return self._last

    perf_counter = staticmethod(time.perf_counter)  # eviction metrics time real work


@contextlib.contextmanager
def simulated_time(clock: SimClock):
    """Point the caches' ``time`` module at ``clock`` (access stamps, new nodes) while inside."""
    modules = (sglang_radix_cache, kvc_compressed_cache)
    saved = [module.time for module in modules]
    for module in modules:
        module.time = clock
    try:
        yield clock
    finally:
        for module, original in zip(modules, saved):
            module.time = original


# ---- systems ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SystemSpec:
    """One cache configuration under test. Invariant: exactly one of ``stock_dtype`` (stock
    RadixCache, a key of STOCK_DTYPES) and ``ladder`` (CompressedRadixCache) is set; ``fractions``
    only with a ladder, one per tier, or None for the plugin's default split. ``grow_write_tier``
    applies the plugin default's rule to an explicit split: the write tier grows to hold the
    longest request, the other tiers shrink in proportion (a candidate default, ``+grow``)."""

    stock_dtype: Optional[str] = None
    ladder: Optional[str] = None
    fractions: Optional[Tuple[float, ...]] = None
    grow_write_tier: bool = False

    @property
    def label(self) -> str:
        if self.stock_dtype:
            return f"stock-{self.stock_dtype}"
        return f"{self.ladder}@{self.split}"

    @property
    def split(self) -> Optional[str]:
        if self.ladder is None:
            return None
        if self.fractions is None:
            return "default"
        return ",".join(f"{f:g}" for f in self.fractions) + ("+grow" if self.grow_write_tier else "")

    @classmethod
    def parse_split(cls, ladder: str, text: str) -> "SystemSpec":
        """``default``, ``0.2,0.1,0.7`` or ``0.2,0.1,0.7+grow``."""
        if text == "default":
            return cls(ladder=ladder)
        shares, grow = (text[: -len("+grow")], True) if text.endswith("+grow") else (text, False)
        return cls(ladder=ladder, fractions=tuple(float(f) for f in shares.split(",")), grow_write_tier=grow)


def bf16_bytes_per_token(shape: KVShape) -> int:
    return 2 * shape.num_layers * shape.num_kv_heads * (shape.head_dim + shape.value_head_dim)


@dataclasses.dataclass
class SimSystem:
    spec: SystemSpec
    cache: RadixCache
    driver: "ServingDriver"
    tier_names: List[str]
    tier_tokens: List[int]
    tier_fractions: List[float]  # share of the byte budget each tier got (padding page and rounding aside)


def build_system(spec: SystemSpec, budget_bytes: float, page_size: int, policy: str,
                 longest_request: int, model_shape: KVShape = MODEL_SHAPE) -> SimSystem:
    """The cache, allocator and pool of ``spec`` sized for ``budget_bytes`` of ``model_shape`` KV.

    Ladders are sized by the plugin's own rule (``KVCConfig.build_layout``; with the default
    split the write tier grows to hold ``longest_request``, as the demo asks) and then allocated
    with SIM_SHAPE at the same token capacities."""
    if spec.stock_dtype:
        dtype, cost = STOCK_DTYPES[spec.stock_dtype]
        page_bytes = bf16_bytes_per_token(model_shape) * cost * page_size
        tokens = (int(budget_bytes // page_bytes) - 1) * page_size  # the padding page is paid first
        if tokens < page_size:
            raise ValueError(f"a budget of {budget_bytes:.0f} bytes holds no page of {spec.label}")
        pool = MHATokenToKVPool(tokens, page_size, dtype, SIM_SHAPE.num_kv_heads, SIM_SHAPE.head_dim,
                                SIM_SHAPE.num_layers, "cpu", False)
        if page_size == 1:
            allocator = TokenToKVPoolAllocator(tokens, dtype, "cpu", pool, False)
        else:
            allocator = PagedTokenToKVPoolAllocator(tokens, page_size, dtype, "cpu", pool, False)
        stock_policy = policy if policy in ("lru", "lfu") else "lru"
        cache = RadixCache(CacheInitParams(disable=False, req_to_token_pool=None,
                                           token_to_kv_pool_allocator=allocator, page_size=page_size,
                                           eviction_policy=stock_policy))
        return SimSystem(spec, cache, ServingDriver(cache, allocator), [spec.stock_dtype], [tokens], [1.0])
    fractions = spec.fractions
    if fractions is not None and spec.grow_write_tier:
        fractions = grown_write_share(parse_ladder(spec.ladder), fractions, model_shape, page_size,
                                      budget_bytes, longest_request)
    config = KVCConfig.parse(spec.ladder, tier_fractions=None if fractions is None else ",".join(map(str, fractions)),
                             policy=policy)
    sized = config.build_layout(model_shape, page_size, budget_bytes, min_write_tokens=longest_request)
    tier_tokens = [sized.capacity_tokens(t) for t in range(sized.num_tiers)]
    tier_fractions = [tokens * sized.bytes_per_token(t) / budget_bytes for t, tokens in enumerate(tier_tokens)]
    layout = TierLayout.from_tokens(config.ladder, SIM_SHAPE, page_size, tier_tokens)
    pool = TieredKVPool(layout, device="cpu", ops=IndexOnlyKVOps())
    allocator = make_tiered_allocator(pool, device="cpu")
    cache = CompressedRadixCache(CacheInitParams(disable=False, req_to_token_pool=None,
                                                 token_to_kv_pool_allocator=allocator, page_size=page_size),
                                 policy=config.policy, min_hit_bits=config.min_hit_bits)
    return SimSystem(spec, cache, ServingDriver(cache, allocator, pool), [c.name for c in layout.codecs],
                     tier_tokens, tier_fractions)


def grown_write_share(specs, fractions: Sequence[float], model_shape: KVShape, page_size: int,
                      budget_bytes: float, min_write_tokens: int) -> Tuple[float, ...]:
    """``fractions`` with the write tier's share raised (as ``TierLayout.from_budget`` does for
    the default split) to hold ``min_write_tokens``, the other shares scaled down in proportion."""
    write = TierCodec(specs[0], model_shape.head_dim, page_size, model_shape.v_head_dim)
    write_bpt = write.bytes_per_token(model_shape.num_kv_heads, model_shape.num_layers)
    wanted = min(0.9, (min_write_tokens + 2 * page_size) * write_bpt / budget_bytes)
    if wanted <= fractions[0]:
        return tuple(fractions)
    scale = (1 - wanted) / (1 - fractions[0])
    return (wanted,) + tuple(f * scale for f in fractions[1:])


class IndexOnlyKVOps:
    """Pool ops that move no data: the simulator tracks which slots hold what, not the values."""

    name = "index-only"

    def write(self, pool, tier, layer, local_slots, cache_k, cache_v) -> None:
        pass

    def requantize(self, pool, src_tier, src_local_pages, dst_tier, dst_local_pages) -> None:
        pass


class ServingDriver(CacheDriver):
    """``CacheDriver.start`` for a request with a prompt and an output, as SGLang's scheduler
    admits it: match the prompt but its last token; refuse before locking when free + evictable
    write-tier slots are too few (PrefillAdder); lock; evict if short; allocate the rest of the
    prompt and the whole output. SGLang allocates output slots one decode step at a time;
    reserving them at admission is what its admission control budgets for. ``finish`` inserts
    the prompt and the output, as ``cache_finished_req`` does."""

    def __init__(self, cache, allocator, pool=None):
        super().__init__(cache, allocator, pool, kv_source=None)

    def admit(self, request: TraceRequest) -> Optional[RunningRequest]:
        return self.start(request.sequence, prompt_len=len(request.prompt))


# ---- the scheduler loop ---------------------------------------------------------------------------
@dataclasses.dataclass
class RequestOutcome:
    session: int
    round: int
    prompt_tokens: int
    hit_tokens: int = 0
    queued_s: float = 0.0
    admitted: bool = False


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """How requests share the server: at most ``max_running`` at once, first come first served
    (a request that does not fit waits at the head of the queue until a running one finishes);
    a request runs ``output tokens * decode_step_s`` seconds."""

    max_running: int = 8
    decode_step_s: float = 0.03


_FINISH, _ARRIVE = 0, 1  # at equal times, finishes free memory before arrivals are admitted


def replay_trace(trace: Trace, system: SimSystem, config: SchedulerConfig, clock: SimClock) -> Dict:
    """Run every request of ``trace`` through ``system``; returns outcomes and scheduler counters.

    A request that cannot be admitted even with nothing else running is a failed admission: it
    is skipped (its prompt counts as computed, nothing is cached) and its session goes on.
    """
    driver = system.driver
    followers: Dict[int, List[int]] = {}
    events: List[Tuple[float, int, int, int]] = []
    order = 0
    for idx, request in enumerate(trace):
        if request.follows is None:
            events.append((request.delay_s, _ARRIVE, order, idx))
            order += 1
        else:
            followers.setdefault(request.follows, []).append(idx)
    heapq.heapify(events)
    outcomes = [RequestOutcome(r.session, r.round, len(r.prompt)) for r in trace]
    arrived_at: Dict[int, float] = {}
    waiting: deque = deque()
    running: Dict[int, RunningRequest] = {}
    failed, memory_waits, busy_request_s, last_t = 0, 0, 0.0, 0.0

    def schedule_followers(idx: int, when: float) -> None:
        nonlocal order
        for follower in followers.get(idx, ()):
            heapq.heappush(events, (when + trace.requests[follower].delay_s, _ARRIVE, order, follower))
            order += 1

    while events:
        now, kind, _, idx = heapq.heappop(events)
        busy_request_s += len(running) * (now - last_t)
        last_t = now
        clock.advance_to(now)
        if kind == _FINISH:
            driver.finish(running.pop(idx))
            schedule_followers(idx, now)
        else:
            arrived_at[idx] = now
            waiting.append(idx)
        while waiting and len(running) < config.max_running:
            head = waiting[0]
            request = trace.requests[head]
            admitted = driver.admit(request)
            if admitted is None:
                if running:
                    memory_waits += 1
                    break
                waiting.popleft()
                failed += 1
                schedule_followers(head, now)
                continue
            waiting.popleft()
            running[head] = admitted
            outcome = outcomes[head]
            outcome.admitted = True
            outcome.hit_tokens = len(admitted.prefix_slots)
            outcome.queued_s = now - arrived_at[head]
            finish_at = now + len(request.output) * config.decode_step_s
            heapq.heappush(events, (finish_at, _FINISH, order, head))
            order += 1
    assert not running and not waiting, "the replay ended with requests still queued"
    return {"outcomes": outcomes, "failed_admissions": failed, "memory_waits": memory_waits,
            "makespan_s": last_t, "mean_running": busy_request_s / last_t if last_t else 0.0}


# ---- one run and its report ----------------------------------------------------------------------
def run_system(trace: Trace, spec: SystemSpec, budget_fraction: float, page_size: int, policy: str,
               config: SchedulerConfig, model_shape: KVShape = MODEL_SHAPE, check: bool = False) -> Dict:
    """Simulate one system at ``budget_fraction`` of the trace's bf16 working set; a JSON-able row."""
    working_set = trace.working_set_tokens(page_size)
    budget_bytes = budget_fraction * working_set * bf16_bytes_per_token(model_shape)
    started = time.perf_counter()
    clock = SimClock()
    with simulated_time(clock):
        longest = max(len(r.prompt) + len(r.output) for r in trace)
        try:
            system = build_system(spec, budget_bytes, page_size, policy, longest, model_shape)
        except (TierSpecError, ValueError) as err:
            return unbuildable_row(trace, spec, budget_fraction, budget_bytes, str(err))
        if isinstance(system.cache, CompressedRadixCache):
            system.cache.kvc_policy.clock = lambda: clock.now
        scheduled = replay_trace(trace, system, config, clock)
        if check and isinstance(system.cache, CompressedRadixCache):
            system.cache.check_invariants()
    outcomes = scheduled["outcomes"]
    rounds = trace.num_rounds
    saved_by_round, computed_by_round = [0] * rounds, [0] * rounds
    for outcome in outcomes:
        saved_by_round[outcome.round] += outcome.hit_tokens
        computed_by_round[outcome.round] += outcome.prompt_tokens - outcome.hit_tokens
    row = {
        "trace": trace.name,
        "system": spec.label,
        "kind": "stock" if spec.stock_dtype else "ladder",
        "ladder": spec.ladder or spec.stock_dtype,
        "fractions": [round(f, 4) for f in system.tier_fractions] if spec.ladder else None,
        "default_fractions": spec.ladder is not None and spec.fractions is None,
        "split": spec.split,
        "budget_fraction": budget_fraction,
        "budget_bytes": budget_bytes,
        "tiers": system.tier_names,
        "tier_capacity_tokens": system.tier_tokens,
        "capacity_tokens": sum(system.tier_tokens),
        "capacity_vs_working_set": sum(system.tier_tokens) / working_set,
        "saved_tokens": sum(saved_by_round),
        "computed_tokens": sum(computed_by_round),
        "saved_by_round": saved_by_round,
        "computed_by_round": computed_by_round,
        "failed_admissions": scheduled["failed_admissions"],
        "memory_waits": scheduled["memory_waits"],
        "rejected_admissions": system.driver.rejected,
        "failed_allocs": system.driver.failed_allocs,
        "mean_running": scheduled["mean_running"],
        "mean_queue_s": sum(o.queued_s for o in outcomes if o.admitted) / max(1, len(outcomes)),
        "makespan_s": scheduled["makespan_s"],
        "wall_s": time.perf_counter() - started,
    }
    if isinstance(system.cache, CompressedRadixCache):
        stats = system.cache.kvc_stats()
        row.update(demoted_tokens=stats["demoted_tokens"], dropped_tokens=stats["dropped_tokens"],
                   hit_tokens_per_tier=stats["hit_tokens"])
    else:
        row.update(demoted_tokens=[0], dropped_tokens=[system.driver.evicted_tokens],
                   hit_tokens_per_tier=[row["saved_tokens"]])
    return row


def unbuildable_row(trace: Trace, spec: SystemSpec, budget_fraction: float, budget_bytes: float,
                    error: str) -> Dict:
    """The row of a system the budget cannot build (e.g. a tier gets no page): nothing is admitted."""
    prompts_by_round = [0] * trace.num_rounds
    for request in trace:
        prompts_by_round[request.round] += len(request.prompt)
    return {"trace": trace.name, "system": spec.label, "kind": "stock" if spec.stock_dtype else "ladder",
            "ladder": spec.ladder or spec.stock_dtype, "fractions": None, "default_fractions": spec.fractions is None,
            "split": spec.split, "budget_fraction": budget_fraction, "budget_bytes": budget_bytes, "error": error,
            "tiers": [], "tier_capacity_tokens": [], "capacity_tokens": 0, "capacity_vs_working_set": 0.0,
            "saved_tokens": 0, "computed_tokens": sum(prompts_by_round), "saved_by_round": [0] * trace.num_rounds,
            "computed_by_round": prompts_by_round, "failed_admissions": len(trace), "memory_waits": 0,
            "rejected_admissions": 0, "failed_allocs": 0, "mean_running": 0.0, "mean_queue_s": 0.0,
            "makespan_s": 0.0, "wall_s": 0.0, "demoted_tokens": [], "dropped_tokens": [], "hit_tokens_per_tier": []}


# ---- sweep, summary, plot ----------------------------------------------------------------------------
def system_specs(ladders: Sequence[str], fraction_sets: Sequence[str]) -> List[SystemSpec]:
    specs = [SystemSpec(stock_dtype="bf16"), SystemSpec(stock_dtype="fp8")]
    for ladder in ladders:
        num_tiers = len(parse_ladder(ladder))
        for text in dict.fromkeys(fraction_sets):
            spec = SystemSpec.parse_split(ladder, text)
            if spec.fractions is None or len(spec.fractions) == num_tiers:
                specs.append(spec)
    return specs


def _at(rows: List[Dict], trace: str, budget: float) -> List[Dict]:
    return [r for r in rows if r["trace"] == trace and abs(r["budget_fraction"] - budget) < 1e-9]


def _serves_like(row: Dict, reference: Dict) -> bool:
    """No failed admission and at least 90% of the reference's mean running requests: the ladder
    did not buy its hits with lost concurrency (a smaller write tier can make requests wait)."""
    return row["failed_admissions"] == 0 and row["mean_running"] >= 0.9 * reference["mean_running"]


def _best(rows: List[Dict]) -> Optional[Dict]:
    return max(rows, key=lambda r: (r["saved_tokens"], r["mean_running"]), default=None)


def summarize(rows: List[Dict], budgets: Sequence[float]) -> Dict:
    """The headline: the best ladder (among those that serve like stock fp8) vs stock fp8 on the
    agentic trace at 25% budget, the saved tokens of every system there, and the split verdict."""
    summary: Dict[str, object] = {"trace": HEADLINE_TRACE, "budget_fraction": HEADLINE_BUDGET,
                                  "target_ratio": TARGET_RATIO}
    headline = _at(rows, HEADLINE_TRACE, HEADLINE_BUDGET)
    if not headline:
        summary["ladder_over_fp8_saved_tokens"] = None
        summary["missing"] = "the headline trace/budget was not part of this run"
        return summary
    by_system = {r["system"]: r for r in headline}
    fp8, bf16 = by_system["stock-fp8"], by_system["stock-bf16"]
    ladders = [r for r in headline if r["kind"] == "ladder"]
    serving = [r for r in ladders if _serves_like(r, fp8)]
    best = _best(serving) or _best([r for r in ladders if r["failed_admissions"] == 0])
    best_any = _best(ladders)
    ceiling = max(r["saved_tokens"] for r in rows if r["trace"] == HEADLINE_TRACE)
    summary.update(
        ladder_over_fp8_saved_tokens=round(best["saved_tokens"] / max(1, fp8["saved_tokens"]), 4) if best else None,
        best_ladder=best["ladder"] if best else None,
        best_fractions=best["fractions"] if best else None,
        best_system=best["system"] if best else None,
        best_selection="most saved tokens among ladders with no failed admission and mean running requests "
                       ">= 90% of stock fp8's" if serving else
                       "no ladder kept 90% of stock fp8's concurrency: most saved tokens without failed admissions",
        target_met=bool(best) and best["saved_tokens"] >= TARGET_RATIO * fp8["saved_tokens"],
        best_hit_tokens_per_tier=dict(zip(best["tiers"], best["hit_tokens_per_tier"])) if best else None,
        best_any_system=best_any["system"],
        best_any_over_fp8_saved_tokens=round(best_any["saved_tokens"] / max(1, fp8["saved_tokens"]), 4),
        stock_fp8_over_bf16_saved_tokens=round(fp8["saved_tokens"] / max(1, bf16["saved_tokens"]), 4),
        ceiling_saved_tokens=ceiling,
        ceiling_over_fp8=round(ceiling / max(1, fp8["saved_tokens"]), 4),
        saved_tokens={r["system"]: r["saved_tokens"] for r in headline},
        mean_running={r["system"]: round(r["mean_running"], 2) for r in headline},
    )
    default_rows = [r for r in ladders if r["default_fractions"]]
    if default_rows:
        best_default = _best(default_rows)
        summary["best_default_split_system"] = best_default["system"]
        summary["default_split_over_fp8_saved_tokens"] = round(
            best_default["saved_tokens"] / max(1, fp8["saved_tokens"]), 4)
    verdict = fraction_verdict(rows, budgets)
    summary["fractions_verdict"] = verdict
    summary["recommended_split"] = recommended_split(rows, verdict)
    return summary


def recommended_split(rows: List[Dict], verdict: Dict) -> Optional[Dict]:
    """The split that wins (fraction_verdict) for every ladder, with the most saved tokens summed
    over ladders and budgets of the agentic trace; None when no split wins for every ladder."""
    common = None
    for ladder_verdict in verdict.values():
        wins = set(ladder_verdict["wins_at_every_budget"])
        common = wins if common is None else common & wins
    if not common:
        return None
    agentic = [r for r in rows if r["trace"] == HEADLINE_TRACE and r["kind"] == "ladder"]
    totals = {split: sum(r["saved_tokens"] for r in agentic if r["split"] == split) for split in common}
    failures = {split: sum(r["failed_admissions"] for r in agentic if r["split"] == split) for split in common}
    split = max(sorted(common), key=lambda name: (failures[name] == 0, totals[name]))
    return {"split": split, "saved_tokens_all_ladders_and_budgets": totals[split],
            "failed_admissions": failures[split],
            "rule": "within 1% of the most saved tokens, at every budget where some split keeps 90% of stock "
                    "fp8's concurrency, for every ladder; ties go to the most saved tokens over all budgets"}


def fraction_verdict(rows: List[Dict], budgets: Sequence[float]) -> Dict:
    """Per ladder, on the agentic trace: at each budget the split that saves the most among those
    that serve like stock fp8, and the splits within 1% of that at every such budget (a clear
    winner). Where no split serves like stock fp8, the best split without failed admissions is
    shown instead and that budget does not vote."""
    verdict = {}
    for ladder in dict.fromkeys(r["ladder"] for r in rows if r["kind"] == "ladder"):
        per_budget, winners, no_vote = {}, None, []
        for budget in budgets:
            at = _at(rows, HEADLINE_TRACE, budget)
            fp8 = next((r for r in at if r["system"] == "stock-fp8"), None)
            mine = [r for r in at if r["ladder"] == ladder]
            serving = [r for r in mine if fp8 and _serves_like(r, fp8)]
            best = _best(serving) or _best([r for r in mine if r["failed_admissions"] == 0])
            if best is None:
                continue
            near = sorted(r["split"] for r in (serving or mine)
                          if r["saved_tokens"] >= 0.99 * best["saved_tokens"] and r["failed_admissions"] == 0)
            per_budget[str(budget)] = {"split": best["split"], "fractions": best["fractions"],
                                       "saved_tokens": best["saved_tokens"], "within_1pct": near,
                                       "serves_like_fp8": bool(serving)}
            if serving:
                winners = set(near) if winners is None else winners & set(near)
            else:
                no_vote.append(budget)
        verdict[ladder] = {"best_per_budget": per_budget, "wins_at_every_budget": sorted(winners or ()),
                           "budgets_where_no_split_serves_like_fp8": no_vote}
    return verdict


def plotted_systems(rows: List[Dict]) -> List[str]:
    """Stock bf16 and fp8, and per ladder its default split and its best split on the agentic trace
    at 25% budget (every split is in the JSON; the plot keeps the few that tell the story)."""
    labels = ["stock-bf16", "stock-fp8"]
    headline = _at(rows, HEADLINE_TRACE, HEADLINE_BUDGET)
    fp8 = next((r for r in headline if r["system"] == "stock-fp8"), None)
    for ladder in dict.fromkeys(r["ladder"] for r in rows if r["kind"] == "ladder"):
        mine = [r for r in headline if r["ladder"] == ladder]
        best = _best([r for r in mine if fp8 and _serves_like(r, fp8)]) or _best(mine)
        labels += [f"{ladder}@default"] + ([best["system"]] if best else [])
    return list(dict.fromkeys(labels))


def plot(rows: List[Dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = plotted_systems(rows)
    colors = dict(zip(labels, plt.get_cmap("tab10").colors))
    style = {label: ("--" if label.startswith("stock") else "-") for label in labels}
    traces = sorted({r["trace"] for r in rows}, key=lambda name: name != HEADLINE_TRACE)
    fig, axes = plt.subplots(1, 1 + len(traces), figsize=(6.5 * (1 + len(traces)), 5))
    ax = axes[0]
    for r in _at(rows, HEADLINE_TRACE, HEADLINE_BUDGET):
        if r["system"] in colors:
            ax.plot(range(len(r["saved_by_round"])), r["saved_by_round"], marker="o", markersize=3,
                    color=colors[r["system"]], linestyle=style[r["system"]], label=r["system"])
    ax.set(title=f"{HEADLINE_TRACE}: saved prefill tokens per round, {HEADLINE_BUDGET:.0%} budget",
           xlabel="round", ylabel="cache-hit tokens")
    ax.legend(fontsize=7)
    for ax, trace in zip(axes[1:], traces):
        for label in labels:
            series = sorted((r["budget_fraction"], r["saved_tokens"]) for r in rows
                            if r["trace"] == trace and r["system"] == label)
            if series:
                ax.plot([b for b, _ in series], [t for _, t in series], marker="o", markersize=3,
                        color=colors[label], linestyle=style[label], label=label)
        ax.set_xscale("log", base=2)
        ax.set(title=f"{trace}: total saved prefill tokens vs KV budget", xlabel="budget / bf16 working set",
               ylabel="cache-hit tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> Dict[str, str]:
    import sglang

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "sglang_kvc",
                                "benchmarks"], cwd=repo,
                               capture_output=True, text=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__, "sglang": sglang.__version__,
            "sglang_kvc": commit}


def python_command() -> str:
    """The interpreter as typed from the repository root (``.venv/bin/python``) when it is a venv's."""
    parts = sys.executable.split(os.sep)
    return os.path.join(*parts[parts.index(".venv"):]) if ".venv" in parts else sys.executable


def machine() -> Dict[str, object]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}


def build_traces(args) -> List[Trace]:
    traces = []
    for name in args.traces:
        if name == "agentic":
            traces.append(TRACES[name](sessions=args.sessions, rounds=args.rounds, seed=args.seed))
        elif name == "shared_prefix":
            traces.append(TRACES[name](groups=args.groups, questions_per_group=args.questions, seed=args.seed))
    return traces


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--traces", nargs="+", default=["agentic", "shared_prefix"], choices=sorted(TRACES))
    parser.add_argument("--sessions", type=int, default=32, help="agentic: concurrent agent sessions")
    parser.add_argument("--rounds", type=int, default=8, help="agentic: rounds per session")
    parser.add_argument("--groups", type=int, default=16, help="shared_prefix: system prompts")
    parser.add_argument("--questions", type=int, default=16, help="shared_prefix: questions per system prompt")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0],
                        help="KV byte budgets as fractions of the trace's bf16 working set")
    parser.add_argument("--ladders", nargs="+", default=["bf16,k8v8,k4v2", "k8v8,k4v4,k2v2"])
    parser.add_argument("--fractions", nargs="+",
                        default=["default", "0.4,0.1,0.5", "0.3,0.1,0.6", "0.2,0.1,0.7", "0.1,0.1,0.8",
                                 "0.2,0.1,0.7+grow", "0.1,0.1,0.8+grow"],
                        help="tier byte fractions tried on every ladder with that many tiers: 'default' is the "
                             "plugin's split, '+grow' grows the write tier to hold the longest request as the "
                             "default split does")
    parser.add_argument("--policy", default="lru", choices=POLICIES,
                        help="coldness policy of the ladders (stock uses it too when it is lru or lfu)")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-running", type=int, default=8, help="requests running at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="check the compressed cache's invariants after each run")
    parser.add_argument("--output", default=None,
                        help="results JSON (default benchmarks/results/cache_sim-<date>.json; the PNG goes next to it)")
    return parser.parse_args(argv)


def main(argv=None) -> Dict:
    from tqdm import tqdm

    args = parse_args(argv)
    date = datetime.date.today().isoformat()
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                         f"cache_sim-{date}.json")
    config = SchedulerConfig(max_running=args.max_running)
    traces = build_traces(args)
    specs = system_specs(args.ladders, args.fractions)
    rows, trace_info = [], {}
    started = time.perf_counter()
    with tqdm(total=len(traces) * len(args.budgets) * len(specs), unit="run") as bar:
        for trace in traces:
            trace_info[trace.name] = {
                "params": trace.params, "requests": len(trace),
                "prompt_tokens": sum(len(r.prompt) for r in trace),
                "distinct_tokens": trace.distinct_tokens,
                "working_set_tokens": trace.working_set_tokens(args.page_size)}
            for budget in args.budgets:
                for spec in specs:
                    bar.set_description(f"{trace.name} {budget:g} {spec.label}")
                    rows.append(run_system(trace, spec, budget, args.page_size, args.policy, config,
                                           check=args.check))
                    bar.update()
    summary = summarize(rows, args.budgets)
    result = {
        "summary": summary,
        "date": date,
        "versions": versions(),
        "command": " ".join([python_command(), "-m", "benchmarks.cache_sim"]
                            + (sys.argv[1:] if argv is None else list(argv))),
        "machine": machine(),
        "wall_s": time.perf_counter() - started,
        "config": {"model_kv_shape": dataclasses.asdict(MODEL_SHAPE), "sim_kv_shape": dataclasses.asdict(SIM_SHAPE),
                   "bf16_bytes_per_token": bf16_bytes_per_token(MODEL_SHAPE), "page_size": args.page_size,
                   "policy": args.policy, "scheduler": dataclasses.asdict(config), "budgets": args.budgets},
        "traces": trace_info,
        "notes": notes(summary),
        "runs": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, os.path.splitext(output)[0] + ".png")
    print(json.dumps(summary, indent=1))
    print(f"wrote {output} and its .png in {result['wall_s']:.0f} s")
    return result


def notes(summary: Dict) -> List[str]:
    """Plain-language findings computed from the summary (the report explains the mechanisms)."""
    ratio = summary.get("ladder_over_fp8_saved_tokens")
    if ratio is None:
        return []
    out = []
    if summary["target_met"]:
        out.append(f"target met: {summary['best_system']} saves {ratio:.2f}x the prefill tokens of stock fp8 "
                   f"at {HEADLINE_BUDGET:.0%} budget ({summary['best_selection']})")
    else:
        why = (f"no cache can reach it on this trace: the most any system saves is {summary['ceiling_over_fp8']:.2f}x "
               f"what stock fp8 saves" if summary["ceiling_over_fp8"] < TARGET_RATIO else
               "the ladders do not hold enough of the reusable working set at this budget")
        out.append(f"target missed: the best ladder saves {ratio:.2f}x stock fp8, "
                   f"{TARGET_RATIO - ratio:.2f}x short of {TARGET_RATIO}x; {why}")
    out.append(f"ceiling: no system saves more than {summary['ceiling_saved_tokens']} tokens on this trace "
               f"({summary['ceiling_over_fp8']:.2f}x stock fp8 at {HEADLINE_BUDGET:.0%}); a ratio near it means the "
               f"ladder holds the whole reusable working set")
    if "default_split_over_fp8_saved_tokens" in summary:
        out.append(f"with the plugin's default split the best ladder ({summary['best_default_split_system']}) "
                   f"saves {summary['default_split_over_fp8_saved_tokens']:.2f}x stock fp8")
    running = summary.get("mean_running", {})
    for system, mean in running.items():
        if system.endswith("@default") and mean < 0.9 * running.get("stock-fp8", 0):
            out.append(f"{system} runs {mean:.2f} requests at a time on average against stock fp8's "
                       f"{running['stock-fp8']:.2f}: its write tier, holding the new KV of running requests and "
                       f"the prefixes they locked there, makes requests wait")
    hits = summary.get("best_hit_tokens_per_tier") or {}
    if hits:
        low = sum(v for k, v in hits.items() if parse_ladder(k)[0].mean_bits <= 4)
        out.append(f"{low / max(1, sum(hits.values())):.0%} of the best ladder's hit tokens are read from tiers of "
                   f"<= 4 bits on average ({hits}); --kvc-min-hit-bits would recompute them instead")
    recommended = summary.get("recommended_split")
    if recommended:
        out.append(f"split {recommended['split']} wins for every ladder ({recommended['rule']}); it saves the most "
                   f"hit tokens, not the best quality: most of its hits are read at the lowest tier's bits")
    for ladder, verdict in summary.get("fractions_verdict", {}).items():
        winners, no_vote = verdict["wins_at_every_budget"], verdict["budgets_where_no_split_serves_like_fp8"]
        text = (f"split(s) {winners} are within 1% of the most saved tokens at every budget" if winners
                else "no single split is within 1% of the most saved tokens at every budget")
        if no_vote:
            text += f" (budgets {no_vote} left out: no split kept 90% of stock fp8's concurrency there)"
        out.append(f"{ladder}: {text}")
    return out


if __name__ == "__main__":
    main()
