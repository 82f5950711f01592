"""Which regime the e2e's kvc cache ran in, and how far the simulator's replay of it is from the other one.

Why: on the H200 at 8b (``e2e-nvidia-h200-2026-12-01-8b-e9a7733.json``) the kvc server dropped 168.5K tokens in the
agentic run, 83K of them from its middle tier, and 24 requests found nothing of their session's history; the
simulator's replay (``cache_sim --check-e2e``) dropped 41.7K, 2.8K from the middle tier, and reset no session.
Both drive the same cache code. This script replays the e2e's kvc system through ``cache_sim.run_system``
under perturbations -- other trace seeds, step costs scaled, arrivals at the GPU client's send times
(``serve_trace``'s ``sent_s``), the cache code the e2e ran (``--kvc-code``, from git) with its host reads
charged -- and records, per replay, the drops per tier and the call path that made them, the sessions reset
and the late TTFT; beside them the server log's drop events (token usage, running requests, tier deltas).

    .venv/bin/python -m benchmarks.cache_sim_regime                      # the 8b e2e, every variant (~3 min)
    .venv/bin/python -m benchmarks.cache_sim_regime --variants baseline seed=5 scale=1.4 open
    # a variant: baseline | seed=N | scale=X (every kvc step cost x X) | open (GPU send times) |
    #   open,decode_base_s=0.006 | code=e9a7733,open,host_sync_s=0.003 (comma-joined; any CostModel field)

Left out: what cache_sim leaves out (overlap scheduling, ...). A replay with ``code=`` runs in a child process
with that commit's ``sglang_kvc/`` first on its path (``git archive``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

if os.environ.get("KVC_REGIME_CODE_DIR"):  # a child replaying another commit's cache code: it goes first
    sys.path.insert(0, os.environ["KVC_REGIME_CODE_DIR"])

E2E_8B = "benchmarks/results/e2e-nvidia-h200-2026-12-01-8b-e9a7733.json"
DEFAULT_VARIANTS = (["baseline"] + [f"seed={s}" for s in range(1, 7)] + [f"scale={x}" for x in (1.2, 1.3, 1.4)]
                    + ["open", "open,decode_base_s=0.0057", "open,decode_base_s=0.006"]
                    + [f"code=e9a7733,open,host_sync_s={x}" for x in (0.0, 0.0016, 0.003)] + ["code=e9a7733"])
# the cache's methods whose call chain names a drop path
PATH_FUNCTIONS = ("keep_watermark", "evict", "make_write_room", "_demote_write", "demote", "_room",
                  "_bootstrap_frame", "_drop_lower", "_drop_subtrees", "_drop_leaves")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One replay: ``seed`` (None: the e2e's), every kvc step cost x ``scale``, CostModel fields set by
    ``costs``, arrivals at the GPU's send times (``open``), the cache code of commit ``code``."""

    name: str
    seed: Optional[int] = None
    scale: float = 1.0
    costs: tuple = ()
    open: bool = False
    code: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "Variant":
        fields: Dict[str, object] = {"name": text}
        costs = []
        for part in text.split(","):
            key, _, value = part.partition("=")
            if key == "baseline":
                continue
            if key == "open":
                fields["open"] = True
            elif key == "seed":
                fields["seed"] = int(value)
            elif key == "scale":
                fields["scale"] = float(value)
            elif key == "code":
                fields["code"] = value
            elif value:
                costs.append((key, float(value)))
            else:
                raise ValueError(f"variant part {part!r}: expected baseline, open, seed=N, scale=X, code=COMMIT "
                                 f"or a CostModel field=value")
        fields["costs"] = tuple(costs)
        return cls(**fields)


@contextlib.contextmanager
def drop_paths(cache_cls):
    """Inside: every drop the cache makes is added to the yielded Counter under the chain of cache
    methods that led to it (``_drop_leaves<_drop_lower<make_write_room<evict``), per tier."""
    paths: Dict[str, List[int]] = collections.defaultdict(lambda: [0, 0, 0, 0])
    originals = {name: getattr(cache_cls, name) for name in ("_drop_leaves", "_drop_subtrees")}

    def wrap(name, original):
        def wrapper(self, *args, **kwargs):
            before = list(self.counters.dropped)
            out = original(self, *args, **kwargs)
            if self.counters.dropped != before:
                chain = [f.function for f in inspect.stack()[1:40] if f.function in PATH_FUNCTIONS]
                key = "<".join([name] + chain)
                for tier, (now, was) in enumerate(zip(self.counters.dropped, before)):
                    paths[key][tier] += now - was
            return out
        return wrapper

    for name, original in originals.items():
        setattr(cache_cls, name, wrap(name, original))
    try:
        yield paths
    finally:
        for name, original in originals.items():
            setattr(cache_cls, name, original)


def replay(e2e: Dict, variant: Variant) -> Dict:
    """One replay of the e2e's kvc system (this process's cache code)."""
    from benchmarks import cache_sim
    from benchmarks.traces import TRACES
    from sglang_kvc.compressed_cache import CompressedRadixCache

    if not hasattr(CompressedRadixCache, "host_syncs"):  # code before the free mirror counted reads in two places
        CompressedRadixCache.host_syncs = lambda self: (self.counters.host_syncs
                                                        + self.token_to_kv_pool_allocator.host_syncs)
    trace, bf16_tokens, specs, mapping, model = cache_sim.e2e_plan(e2e, "auto")
    name = next(n for n in mapping if n.startswith("kvc="))
    spec = cache_sim.SystemSpec.parse(mapping[name])
    if variant.seed is not None:
        params = dict(e2e["settings"]["trace"], seed=variant.seed)
        params["tool_delay_s"] = tuple(params["tool_delay_s"])
        trace = TRACES["agentic"](**params)
    sent = cache_sim.e2e_sent_times(e2e, name, trace) if variant.open else None
    profile = cache_sim.MODEL_COSTS[model][spec.costs]
    scaled = {f: getattr(profile, f) * variant.scale for f in ("prefill_base_s", "decode_base_s", "decode_ctx_s")}
    costs = dataclasses.replace(profile, **{**scaled, **dict(variant.costs)})
    cache_sim.MODEL_COSTS[model][spec.costs] = costs
    started = time.perf_counter()
    try:
        with drop_paths(CompressedRadixCache) as paths:
            row = cache_sim.run_system(trace, spec, bf16_tokens, e2e["settings"].get("page_size", 16), "lru",
                                       cache_sim.SchedulerConfig(), None, model=model, keep_records=True, sent_s=sent)
    finally:
        cache_sim.MODEL_COSTS[model][spec.costs] = profile
    records = row["records"]
    tiers = row["tiers"]
    return {"variant": variant.name, "system": spec.label, "seed": trace.params["seed"],
            "costs": {k: v for k, v in dataclasses.asdict(costs).items() if isinstance(v, float)},
            "late_ttft_p50_s": row["late"]["ttft_p50_s"], "hit_ratio": row["overall"]["hit_ratio"],
            "tpot_p50_s": row["overall"]["tpot_p50_s"], "mean_running": row["mean_running"],
            "tiers": tiers, "dropped_tokens": row["kvc_stats"]["dropped_tokens"],
            "demoted_tokens": row["kvc_stats"]["demoted_tokens"], "sessions_reset": row["sessions_reset"],
            "host_syncs": row["kvc_stats"]["host_syncs"], "host_sync_s": row["counters"]["host_sync_s"],
            "span_s": row["overall"]["duration_s"],
            "drop_paths": {k: v[: len(tiers)] for k, v in sorted(paths.items(), key=lambda kv: -sum(kv[1]))},
            "in_flight": in_flight([(r.arrival_s, r.finished_s, r.prompt_tokens) for r in records]),
            "wall_s": round(time.perf_counter() - started, 1)}


def in_flight(spans, start: float = 14.0, stop: float = 30.0, step: float = 0.5) -> List[List[float]]:
    """[t, requests in flight, their prompt tokens] every ``step`` s: ``spans`` are (arrival, finish,
    prompt tokens)."""
    out, t = [], start
    while t <= stop + 1e-9:
        live = [p for a, b, p in spans if a is not None and b is not None and a <= t < b]
        out.append([round(t, 2), len(live), sum(live)])
        t += step
    return out


def replay_elsewhere(e2e_path: str, variant: Variant) -> Dict:
    """``replay`` in a child process whose ``sglang_kvc`` is commit ``variant.code``'s (``git archive``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tree:
        archive = subprocess.run(["git", "-C", root, "archive", variant.code, "sglang_kvc"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        env = dict(os.environ, KVC_REGIME_CODE_DIR=tree)
        child = subprocess.run([sys.executable, "-m", "benchmarks.cache_sim_regime", "--e2e", e2e_path,
                                "--worker", variant.name], cwd=root, env=env, capture_output=True, text=True)
        if child.returncode:
            raise RuntimeError(f"replay of {variant.name} failed:\n{child.stderr[-4000:]}")
        return json.loads(child.stdout.strip().splitlines()[-1])


# ---- the server log ---------------------------------------------------------------------------------
LOG_LINE = re.compile(r"\[(\d+-\d+-\d+ [\d:]+)\] (Prefill|Decode) batch.*?token usage: ([\d.]+), kvc: (.*?), "
                      r"free (\d+)/\d+ fr, demoted ([\d.]+[KM]?), dropped ([\d.]+[KM]?)")
TIER_PART = re.compile(r"(\S+) ([\d.]+[KM]?) tok/(\d+) fr")


def _number(text: str) -> float:
    scale = {"K": 1e3, "M": 1e6}.get(text[-1:], 1.0)
    return float(text[:-1] if scale != 1.0 else text) * scale


def log_drop_events(path: str) -> Dict:
    """The agentic run's part of a kvc server log (after the first "Cache flushed", to the second): every
    batch line whose dropped counter rose, with the seconds since the run's first batch line, the token
    usage before and after, #running-req, and per tier the change of cached tokens and frames."""
    lines = open(path, errors="replace").read().splitlines()
    flushes = [i for i, line in enumerate(lines) if "Cache flushed" in line]
    part = lines[flushes[0] + 1: flushes[1] if len(flushes) > 1 else len(lines)] if flushes else lines
    rows = []
    for line in part:
        match = LOG_LINE.search(line)
        if not match:
            continue
        stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
        tiers = TIER_PART.findall(match.group(4))
        running = re.search(r"#running-req: (\d+)", line)
        new = re.search(r"#new-token: (\d+)", line)
        rows.append({"stamp": stamp, "kind": match.group(2), "usage": float(match.group(3)),
                     "names": [t[0] for t in tiers], "tokens": [_number(t[1]) for t in tiers],
                     "frames": [int(t[2]) for t in tiers], "dropped": _number(match.group(7)),
                     "running": int(running.group(1)) if running else None,
                     "new_tokens": int(new.group(1)) if new else None})
    if not rows:
        return {"events": []}
    start = rows[0]["stamp"]
    events = []
    for before, row in zip(rows, rows[1:]):
        if row["dropped"] > before["dropped"]:
            events.append({"t_s": (row["stamp"] - start).total_seconds(), "kind": row["kind"],
                           "dropped": row["dropped"] - before["dropped"],
                           "usage_before": before["usage"], "usage": row["usage"], "running": row["running"],
                           "new_tokens": row["new_tokens"],
                           "tokens_delta": [a - b for a, b in zip(row["tokens"], before["tokens"])],
                           "frames_delta": [a - b for a, b in zip(row["frames"], before["frames"])],
                           "tokens": row["tokens"], "frames": row["frames"]})
    total = sum(e["dropped"] for e in events)
    saturated = [e for e in events if max(e["usage"], e["usage_before"]) >= 0.9]
    middle = [e for e in events if e["tokens_delta"][1] < 0]
    return {"tiers": rows[0]["names"], "events": events, "dropped": total,
            "first_s": events[0]["t_s"] if events else None, "last_s": events[-1]["t_s"] if events else None,
            "dropped_at_usage_0.9": sum(e["dropped"] for e in saturated), "events_at_usage_0.9": len(saturated),
            "events_middle_tier_shrank": len(middle), "dropped_in_those": sum(e["dropped"] for e in middle),
            "events_middle_shrank_last_unchanged": sum(1 for e in middle if abs(e["tokens_delta"][-1]) < 50),
            "median_running_at_events": sorted(e["running"] for e in events)[len(events) // 2] if events else None}


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--e2e", default=E2E_8B)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--output", default=None,
                        help="JSON (default benchmarks/results/cache_sim-<e2e date>-<model>-regime.json)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one variant, JSON on stdout
    args = parser.parse_args(argv)
    with open(args.e2e) as handle:
        e2e = json.load(handle)
    if args.worker:
        print(json.dumps(replay(e2e, Variant.parse(args.worker))))
        return {}
    from benchmarks import cache_sim

    started = time.perf_counter()
    runs = []
    for text in args.variants:
        variant = Variant.parse(text)
        run = replay_elsewhere(args.e2e, variant) if variant.code else replay(e2e, variant)
        runs.append(run)
        print(f"{run['variant']}: late TTFT p50 {run['late_ttft_p50_s'] * 1000:.0f} ms, hit {run['hit_ratio']:.3f}, "
              f"dropped {run['dropped_tokens']}, sessions reset {run['sessions_reset']}, "
              f"host reads {run['host_syncs']} ({run['host_sync_s']:.1f} s)", flush=True)
    name = next(n for n in e2e["systems"] if n.startswith("kvc="))
    record = e2e["systems"][name]
    measured = cache_sim.e2e_measurements(e2e)[name]
    requests = record["agentic"]["requests"]
    log = os.path.join(os.path.dirname(os.path.abspath(args.e2e)), record["log"])
    result = {
        "date": datetime.date.today().isoformat(), "versions": cache_sim.versions(),
        "command": " ".join([cache_sim.python_command(), "-m", "benchmarks.cache_sim_regime"]
                            + (sys.argv[1:] if argv is None else list(argv))),
        "e2e": args.e2e, "e2e_system": name,
        "gpu": {"late_ttft_p50_s": measured["ttft_late_p50_s"], "hit_ratio": measured["hit_ratio"],
                "dropped_tokens_by_tier": measured["dropped_tokens_by_tier"],
                "sessions_reset": measured["sessions_reset"], "code": e2e["versions"].get("sglang_kvc_commit"),
                "in_flight": in_flight([(r["sent_s"], r["finished_s"], r["prompt_tokens"]) for r in requests]),
                "log_drop_events": log_drop_events(log) if os.path.exists(log) else None},
        "runs": runs, "wall_s": round(time.perf_counter() - started, 1)}
    output = args.output or os.path.join(
        os.path.dirname(os.path.abspath(args.e2e)),
        f"cache_sim-{e2e.get('date', 'e2e')}-{e2e['settings'].get('model_size', '1b')}-regime.json")
    with open(output, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {output} in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
