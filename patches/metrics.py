"""Per-tier Prometheus metrics and the compact summary appended to SGLang's batch log lines."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple


def _short(count: float) -> str:
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(int(count))


def tier_summary(cache) -> str:
    """``kvc: bf16 1.2K tok/40 fr, k8v8 3.1K/12, k4v2 9.9K/30, free 18/100 fr, demoted 12.0K, dropped 1.0K``:
    cached tokens and frames owned per tier, free frames of the arena."""
    stats = cache.kvc_stats()
    tiers = ", ".join(f"{name} {_short(cached)} tok/{frames} fr" for name, cached, frames in
                      zip(stats["tiers"], stats["cached_tokens"], stats["frames"]))
    return (f"kvc: {tiers}, free {stats['free_frames']}/{stats['total_frames']} fr, "
            f"demoted {_short(sum(stats['demoted_tokens']))}, dropped {_short(sum(stats['dropped_tokens']))}")


class KVCMetrics:
    """Prometheus series for the compressed cache, labelled like SGLang's scheduler metrics plus
    ``tier``. Gauges hold current per-tier tokens; counters advance by the cache's cumulative
    counts since the last update, so they never go backwards."""

    COUNTERS = (("demoted_tokens", "sglang:kvc_demoted_tokens", "Tokens demoted into the tier."),
                ("dropped_tokens", "sglang:kvc_dropped_tokens", "Tokens dropped from the tier."),
                ("hit_tokens", "sglang:kvc_hit_tokens", "Prefix-cache hit tokens served from the tier."),
                ("compacted_tokens", "sglang:kvc_compacted_tokens", "Tokens moved between frames of the tier."))

    def __init__(self, labels: Dict[str, str], registry=None):
        from prometheus_client import REGISTRY, Counter, Gauge

        registry = registry or REGISTRY
        names = list(labels.keys()) + ["tier"]
        self.labels = dict(labels)
        self.tokens = Gauge("sglang:kvc_tier_tokens", "Cached tokens held in the tier.", names,
                            multiprocess_mode="mostrecent", registry=registry)
        self.capacity = Gauge("sglang:kvc_tier_capacity_tokens", "Tokens the tier's frames hold now.", names,
                              multiprocess_mode="mostrecent", registry=registry)
        self.frames = Gauge("sglang:kvc_tier_frames", "Arena frames the tier owns now.", names,
                            multiprocess_mode="mostrecent", registry=registry)
        self.free_frames = Gauge("sglang:kvc_free_frames", "Arena frames no tier owns.", list(labels.keys()),
                                 multiprocess_mode="mostrecent", registry=registry)
        self.bytes_saved = Gauge("sglang:kvc_bytes_saved", "Bytes the cached tokens would take more at bf16.",
                                 list(labels.keys()), multiprocess_mode="mostrecent", registry=registry)
        self.counters = {key: Counter(name, doc, names, registry=registry) for key, name, doc in self.COUNTERS}
        self.move_seconds = Counter("sglang:kvc_move_gpu_seconds", "GPU seconds spent moving pages (kind: "
                                    "requantize = demotion, compaction).", list(labels.keys()) + ["kind"],
                                    registry=registry)
        self.host_seconds = Counter("sglang:kvc_cache_host_seconds", "Scheduler seconds spent making room "
                                    "(eviction, demotion, compaction; device syncs included).",
                                    list(labels.keys()), registry=registry)
        self.host_phase_seconds = Counter("sglang:kvc_cache_host_phase_seconds", "Scheduler seconds making room, by "
                                          "phase (release, refill_reserve, compact_lower, demote, drop_write, "
                                          "drop_lower); part of kvc_cache_host_seconds.",
                                          list(labels.keys()) + ["phase"], registry=registry)
        self.host_syncs = Counter("sglang:kvc_cache_host_syncs", "Device-to-host reads the cache made on the "
                                  "scheduler's thread (each waits for the GPU's queued work).",
                                  list(labels.keys()), registry=registry)
        self.host_sync_seconds = Counter("sglang:kvc_cache_host_sync_seconds", "Scheduler seconds inside those "
                                         "device-to-host reads (waiting for the GPU's queued work); part of "
                                         "kvc_cache_host_seconds.", list(labels.keys()), registry=registry)
        self.host_waits = Counter("sglang:kvc_cache_host_waits", "Write-tier page ids the cache needed on the "
                                  "host before their copy from the device had finished, and copies it started "
                                  "while its host ring was full (each waits for a copy).",
                                  list(labels.keys()), registry=registry)
        self.demotion_yield = Gauge("sglang:kvc_demotion_yield", "Lower-tier hit tokens per token demoted out of "
                                    "the write tier, over the demotion gate's window (+Inf before any demotion).",
                                    list(labels.keys()), multiprocess_mode="mostrecent", registry=registry)
        self.demotion_open = Gauge("sglang:kvc_demotion_open", "1 while demotion pays (yield at or above "
                                   "--kvc-min-demotion-yield), 0 while the cache drops as stock SGLang does.",
                                   list(labels.keys()), multiprocess_mode="mostrecent", registry=registry)
        self._last: Dict[str, List[int]] = {}
        self._last_seconds: Dict[str, float] = {}

    def update(self, cache, exact: bool = False) -> None:
        """``exact``: count free frames now (a host sync; after a flush or when idle), else as of
        the last count."""
        stats = cache.kvc_stats(exact=exact)
        allocator = cache.token_to_kv_pool_allocator
        for t, name in enumerate(stats["tiers"]):
            labels = dict(self.labels, tier=name)
            self.tokens.labels(**labels).set(stats["cached_tokens"][t])
            self.capacity.labels(**labels).set(allocator.capacity_tokens(t))
            self.frames.labels(**labels).set(stats["frames"][t])
            for key, counter in self.counters.items():
                last = self._last.setdefault(key, [0] * len(stats["tiers"]))
                delta = stats[key][t] - last[t]
                if delta > 0:
                    counter.labels(**labels).inc(delta)
                last[t] = stats[key][t]
        for kind, seconds in stats["move_gpu_seconds"].items():
            self._advance(self.move_seconds.labels(**self.labels, kind=kind), kind, seconds)
        self._advance(self.host_seconds.labels(**self.labels), "host", stats["host_seconds"])
        for phase, seconds in stats["host_phase_seconds"].items():
            self._advance(self.host_phase_seconds.labels(**self.labels, phase=phase), f"phase:{phase}", seconds)
        self._advance(self.host_syncs.labels(**self.labels), "host_syncs", stats["host_syncs"])
        self._advance(self.host_sync_seconds.labels(**self.labels), "host_sync_seconds", stats["host_sync_seconds"])
        self._advance(self.host_waits.labels(**self.labels), "host_waits", stats["host_waits"])
        self.bytes_saved.labels(**self.labels).set(stats["bytes_saved_vs_bf16"])
        self.free_frames.labels(**self.labels).set(stats["free_frames"])
        self.demotion_yield.labels(**self.labels).set(stats["demotion_yield"])
        self.demotion_open.labels(**self.labels).set(1 if stats["demotion_open"] else 0)


    def _advance(self, counter, key: str, total: float) -> None:
        delta = total - self._last_seconds.get(key, 0.0)
        if delta > 0:
            counter.inc(delta)
            self._last_seconds[key] = total


_metrics: Optional[KVCMetrics] = None
_last_state: Optional[Tuple] = None  # cache_state() at the last exact refresh


def update_from_reporter(reporter, exact: bool = False) -> bool:
    """Refresh the series from a SchedulerMetricsReporter's scheduler (when --enable-metrics is on).
    True if they were refreshed."""
    global _metrics, _last_state
    cache = getattr(reporter.scheduler, "tree_cache", None)
    enabled = getattr(reporter, "current_scheduler_metrics_enabled", False)
    if not enabled or not hasattr(cache, "kvc_stats"):
        return False
    if _metrics is None:
        collector = getattr(reporter, "metrics_collector", None)
        _metrics = KVCMetrics(dict(getattr(collector, "labels", None) or {}))
    _metrics.update(cache, exact=exact)
    _last_state = cache_state(cache) if exact else None  # a batch's refresh shows free frames as last counted
    return True


def cache_state(cache) -> Tuple:
    """What the series show, cheaply (host-side counts, no device sync): changes whenever a
    refresh would show something new."""
    allocator = cache.token_to_kv_pool_allocator
    counters = cache.counters
    return (tuple(cache.tier_cached), allocator.available_size(), allocator.frames_taken,
            allocator.frames_returned, len(allocator.reserve_frames()), sum(counters.demoted_in),
            sum(counters.dropped), sum(counters.hits), sum(counters.compacted))


def refresh_if_changed(reporter) -> bool:
    """On an idle scheduler: refresh the series exactly once after anything changed since the
    last refresh (SGLang's own gauges refresh only when a batch runs). True if refreshed."""
    cache = getattr(reporter.scheduler, "tree_cache", None)
    if not hasattr(cache, "kvc_stats") or not getattr(reporter, "current_scheduler_metrics_enabled", False):
        return False
    if _metrics is not None and _last_state == cache_state(cache):
        return False
    return update_from_reporter(reporter, exact=True)


def flush_summary(cache) -> str:
    """``sglang-kvc: flushed; tiers bf16 0 tok/1 fr, k8v8 0 tok/0 fr; free 770/774 fr; demoted 12000,
    dropped 3000 tokens so far`` (exact counts; every tensor-parallel rank logs its own)."""
    stats = cache.kvc_stats(exact=True)
    tiers = ", ".join(f"{name} {_short(cached)} tok/{frames} fr" for name, cached, frames in
                      zip(stats["tiers"], stats["cached_tokens"], stats["frames"]))
    return (f"sglang-kvc: flushed; tiers {tiers}; free {stats['free_frames']}/{stats['total_frames']} fr; "
            f"demoted {sum(stats['demoted_tokens'])}, dropped {sum(stats['dropped_tokens'])} tokens so far")
