"""The compressed cache's scheduler (host) time on a real device, without a model (issue #11).

An e2e run says how much of the scheduler's time the cache took to make room
(``sglang:kvc_cache_host_phase_seconds_total``), not why. This replays the e2e's agentic trace as the
simulator does (``cache_sim.run_system``: SGLang's scheduler calls at the e2e's send times and
budget), but with the kvc system's arena at the model's real size on ``--device`` and the server's
kernels moving its pages, so that every device op the cache launches costs what it costs there.

Per ``--forward-ms`` value, one replay in which each call that makes room (``evict``, ``keep_watermark``)
finds a forward pass of that many milliseconds running on a separate forward stream (``torch.cuda._sleep``;
the host first waits for the previous one, as the overlap scheduler waits for the previous batch's
results): a device-to-host read inside the cache then waits for it, as on the server. Reported per
replay: the cache's host seconds by phase, the phase's calls, seconds per call and per moved token;
the CUDA syncs inside those calls and inside ``match_prefix``, ``insert`` and the lock calls
(``torch.cuda.set_sync_debug_mode``) by the source line that made them; and the heaviest functions (cProfile, by own time).

    python -m benchmarks.cache_host --e2e benchmarks/results/e2e-nvidia-h200-2026-12-02-saturated-gate.json \\
        --out benchmarks/results
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import datetime
import json
import os
import pstats
import sys
import time
import warnings
from typing import Dict, List

import torch

from benchmarks import cache_sim
from benchmarks.serving import versions

TOP_FUNCTIONS = 30


class ForwardEmulator:
    """A busy kernel of ``ms`` on a forward stream before each cache call (the host waits for the
    previous one first, outside the cache's timing), and CUDA syncs made inside the cache's calls
    counted by source line."""

    def __init__(self, ms: float, device: torch.device):
        self.ms = ms
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.cycles = self._cycles_per_ms() * ms if self.cuda and ms > 0 else 0
        self.syncs: collections.Counter = collections.Counter()
        self.calls = 0
        self.depth = 0

    @staticmethod
    def _cycles_per_ms() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 10_000_000
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / start.elapsed_time(end)

    def wrap(self, cache, name: str, forward: bool) -> None:
        """Count the CUDA syncs inside ``cache.<name>``; with ``forward``, run the emulated forward pass
        while it runs and count the call in ``calls``."""
        inner = getattr(cache, name)

        def call(*args, **kwargs):
            self.calls += forward
            if self.stream is not None and forward:
                self.stream.synchronize()
                if self.cycles:
                    with torch.cuda.stream(self.stream):
                        torch.cuda._sleep(int(self.cycles))
            if not self.cuda or self.depth:  # a wrapped call inside another is counted by the outer one
                return inner(*args, **kwargs)
            self.depth += 1
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return inner(*args, **kwargs)
                finally:
                    self.depth -= 1
                    torch.cuda.set_sync_debug_mode("default")
                    for w in caught:
                        if "synchroniz" in str(w.message):
                            self.syncs[f"{os.path.relpath(w.filename)}:{w.lineno}"] += 1

        setattr(cache, name, call)

    def attach(self, system) -> None:
        cache = system.cache
        if self.stream is not None:
            pool = cache.token_to_kv_pool_allocator.pool
            pool.forward_stream = self.stream
            from sglang_kvc.kernels.precompile import precompile

            precompile(pool)  # as the server does before serving: no compile inside a timed call
        for name in ("evict", "keep_watermark"):
            self.wrap(cache, name, forward=True)
        for name in ("match_prefix", "insert", "inc_lock_ref", "dec_lock_ref"):  # SGLang's other calls per step
            self.wrap(cache, name, forward=False)
        phase_calls = collections.Counter()
        timed = cache._timed

        def counted(phase, fn, *args):
            phase_calls[phase] += 1
            return timed(phase, fn, *args)

        cache._timed = counted
        system.phase_calls = phase_calls


def replay(e2e: Dict, e2e_name: str, device: str, forward_ms: float, profile: bool) -> Dict:
    """One replay of ``e2e``'s agentic trace (its budget and send times) through the cache of its kvc
    system ``e2e_name`` (as the simulator serves it, the server's settings included) on ``device``;
    the row ``main`` writes."""
    trace, bf16_tokens, specs, mapping, model = cache_sim.e2e_plan(e2e, "new")
    spec = next(s for s in specs if s.label == mapping[e2e_name])
    emulator = ForwardEmulator(forward_ms, torch.device(device))
    built = {}

    def on_built(system):
        emulator.attach(system)
        built["system"] = system

    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    row = cache_sim.run_system(trace, spec, bf16_tokens, page_size=e2e["settings"].get("page_size", 16),
                               model=model, sent_s=cache_sim.e2e_sent_times(e2e, e2e_name, trace),
                               device=device, on_built=on_built)
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - started
    cache = built["system"].cache
    counters = cache.counters
    moved = sum(counters.demoted_in) + sum(counters.dropped) + sum(counters.compacted)
    calls = dict(built["system"].phase_calls)
    phases = {phase: {"seconds": round(seconds, 4), "calls": calls.get(phase, 0),
                      "us_per_call": round(1e6 * seconds / calls[phase], 1) if calls.get(phase) else None}
              for phase, seconds in counters.host_phase_seconds.items()}
    demoted_out_of_write = counters.demoted_in[1] if len(counters.demoted_in) > 1 else 0
    result = {
        "forward_ms": forward_ms, "system": spec.label, "replay_wall_s": round(wall, 2),
        "cache_calls": emulator.calls,
        "host_seconds": round(counters.host_seconds, 4),
        "host_phases": phases,
        "demoted_tokens": list(counters.demoted_in), "dropped_tokens": list(counters.dropped),
        "compacted_tokens": list(counters.compacted),
        "host_us_per_moved_token": round(1e6 * counters.host_seconds / moved, 3) if moved else None,
        "demote_us_per_demoted_token": (round(1e6 * counters.host_phase_seconds["demote"] / demoted_out_of_write, 3)
                                        if demoted_out_of_write else None),
        "host_syncs_counted": cache.host_syncs(),
        "cuda_syncs_by_line": dict(emulator.syncs.most_common()),
        "cuda_syncs": sum(emulator.syncs.values()),
        "late_ttft_p50_s_simulated": row["late"]["ttft_p50_s"],
    }
    if profiler:
        stats = pstats.Stats(profiler)
        entries = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:TOP_FUNCTIONS]
        result["top_functions_by_own_time"] = [
            {"function": f"{os.path.relpath(f) if f.startswith('/') else f}:{line}({name})", "calls": nc,
             "own_s": round(tt, 4), "cumulative_s": round(ct, 4)}
            for (f, line, name), (cc, nc, tt, ct, _) in entries]
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--e2e", required=True, help="an e2e JSON whose agentic trace, budget and send times to replay")
    parser.add_argument("--system", default=None, help="its kvc system to replay (default: the first kvc one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--forward-ms", type=float, nargs="+", default=[0.0, 5.0],
                        help="a forward pass of this many ms runs while each cache call does (one replay each)")
    parser.add_argument("--no-profile", action="store_true", help="skip cProfile (it slows the replay)")
    parser.add_argument("--label", default="", help="appended to the output's name")
    parser.add_argument("--out", default="benchmarks/results", help="cache-host-<device>-<date>[-label].json goes here")
    return parser.parse_args(argv)


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device)).lower().replace(" ", "-")
    return "cpu"


def main(argv=None) -> Dict:
    args = parse_args(argv)
    with open(args.e2e) as f:
        e2e = json.load(f)
    name = args.system or next(n for n in e2e["systems"] if n.startswith("kvc="))
    runs: List[Dict] = []
    for forward_ms in args.forward_ms:
        run = replay(e2e, name, args.device, forward_ms, profile=not args.no_profile)
        print(json.dumps({k: v for k, v in run.items() if k != "top_functions_by_own_time"}, indent=1), flush=True)
        runs.append(run)
    date = datetime.date.today().isoformat()
    # serving.versions: the GPU scripts' versions (KVC_GIT_COMMIT names the code on a device's stale copy)
    result = {"device": device_name(args.device), "date": date, "versions": versions(),
              "command": " ".join([cache_sim.python_command(), "-m", "benchmarks.cache_host"]
                                  + (sys.argv[1:] if argv is None else list(argv))),
              "e2e": os.path.relpath(args.e2e), "e2e_system": name, "runs": runs}
    os.makedirs(args.out, exist_ok=True)
    label = f"-{args.label}" if args.label else ""
    path = os.path.join(args.out, f"cache-host-{result['device']}-{date}{label}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
