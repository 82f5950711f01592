"""Which Triton kernels a server compiles while it starts, and in which start-up phase (issue #11).

On the H200 (e2e-nvidia-h200-2026-12-01.json, 1b) kvc started in 138 s against stock fp8's 75 s: its
prefill CUDA-graph capture took 59.6 s, 55 of them on the first size, although its own kernels are compiled
before the capture. This script says what compiles when. For each system it launches
``python -m sglang.launch_server`` with the e2e's flags (``benchmarks/e2e.py: server_flags``, the same
budget and model) against empty Triton and TorchInductor cache directories, waits until the server is
healthy, stops it, and records every compiled kernel: its name and launch configuration (the cache entry's
metadata), the second its entry was written (from the server's start) and the start-up phase then running
(from the server log's lines: weights, kvc's precompile, prefill capture, decode capture). Writes
``startup-compiles-<device>-<date><suffix>.json`` under ``--out``, rewritten after each system.

On the GPU (repository root): ``source benchmarks/gpu_setup.sh; python3 benchmarks/startup_compiles.py
--out $OUT`` (the e2e's headline pair; ``--systems`` for others).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import sys
import tempfile
import time
from typing import Dict, List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import e2e  # noqa: E402
from benchmarks.serving import Server, device_name, versions  # noqa: E402

# (phase, pattern of the log line that begins it); a phase lasts until the next one begins
PHASES = (
    ("load weights", re.compile(r"Load weight begin")),
    ("pool, backend, kvc precompile", re.compile(r"Load weight end")),
    ("after kvc precompile", re.compile(r"sglang-kvc: compiled \d+ kernels before serving")),
    ("prefill graph capture", re.compile(r"Capture target prefill CUDA graph begin")),
    ("after prefill capture", re.compile(r"Capture target prefill CUDA graph end")),
    ("decode graph capture", re.compile(r"Capture target decode CUDA graph begin")),
    ("after decode capture", re.compile(r"Capture target decode CUDA graph end")),
)
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\]")


def log_phases(log_text: str) -> List[Dict[str, object]]:
    """The start-up phases a server log shows, in order: ``{"phase", "at"}`` with ``at`` the epoch second
    of the line that began it (SGLang logs whole seconds, local time)."""
    phases = []
    for line in log_text.splitlines():
        stamp = LOG_TIME.match(line)
        if not stamp:
            continue
        for name, pattern in PHASES:
            if pattern.search(line):
                at = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S"))
                phases.append({"phase": name, "at": at})
    return phases


def phase_at(phases: List[Dict[str, object]], when: float) -> str:
    """The phase running at epoch second ``when`` (a compile finishing within a logged second counts
    in the phase begun in that second or before it)."""
    current = "start"
    for phase in phases:
        if phase["at"] <= when:
            current = phase["phase"]
    return current


def cache_compiles(cache_dirs: List[str]) -> List[Dict[str, object]]:
    """Every kernel compiled into ``cache_dirs`` (Triton's layout: one directory per compile holding
    ``<kernel>.json`` metadata beside its binaries), oldest first: name, warps, stages, when written."""
    found = []
    for root in cache_dirs:
        for path in glob.glob(os.path.join(root, "**", "*.json"), recursive=True):
            if os.path.basename(path).startswith("__grp__"):
                continue
            try:
                with open(path) as handle:
                    meta = json.load(handle)
            except (OSError, ValueError):
                continue
            if not isinstance(meta, dict) or "name" not in meta:
                continue
            found.append({"kernel": meta["name"], "num_warps": meta.get("num_warps"),
                          "num_stages": meta.get("num_stages"), "written": os.path.getmtime(path)})
    return sorted(found, key=lambda c: c["written"])


def attribute(compiles: List[Dict[str, object]], phases: List[Dict[str, object]], started: float) -> dict:
    """Compiles with their phase and second since the server's start, and the count per phase."""
    rows, per_phase = [], {}
    for compile_ in compiles:
        phase = phase_at(phases, compile_["written"])
        rows.append(dict(compile_, written=round(compile_["written"] - started, 1), phase=phase))
        per_phase[phase] = per_phase.get(phase, 0) + 1
    return {"compiles": rows, "per_phase": per_phase,
            "phases": [{"phase": p["phase"], "at_s": round(p["at"] - started, 1)} for p in phases]}


def run_system(name: str, args, budget) -> dict:
    """One server started on empty caches (``args.fresh_triton_cache``: e2e's per-system Triton cache,
    with TorchInductor's beside it), stopped once healthy; its compiles by phase."""
    spec = e2e.SystemSpec.parse(name)
    env = e2e.server_env(spec, args)
    env["TORCHINDUCTOR_CACHE_DIR"] = env["TRITON_CACHE_DIR"] + "-inductor"
    caches = [env["TRITON_CACHE_DIR"], env["TORCHINDUCTOR_CACHE_DIR"]]
    for path in caches:
        os.makedirs(path, exist_ok=True)
    log_path = os.path.join(args.out, f"startup-{spec.slug}.log")
    server = Server(e2e.server_flags(spec, budget, args), args.port, log_path, env=env)
    started = time.time()
    record: Dict[str, object] = {"flags": server.args, "log": os.path.basename(log_path)}
    try:
        record["startup_s"] = round(server.start(timeout_s=args.timeout_s), 1)
    except (RuntimeError, TimeoutError) as err:
        record["error"] = repr(err)[:300]
    finally:
        server.stop()
    with open(log_path, errors="replace") as handle:
        text = handle.read()
    record.update(attribute(cache_compiles(caches), log_phases(text), started))
    record["log_summary"] = {k: v for k, v in e2e.summarize_log(log_path, budget).items()
                             if k in ("cuda_graph_capture_s", "kvc_precompile_s", "errors")}
    return record


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--systems", nargs="+", default=list(e2e.HEADLINE_SYSTEMS))
    parser.add_argument("--model-size", default="1b", choices=sorted(e2e.MODEL_SHAPES))
    parser.add_argument("--graphs", default="default", choices=["default", "decode-only"])
    parser.add_argument("--timeout-s", type=float, default=300)
    parser.add_argument("--port", type=int, default=31100)
    parser.add_argument("--suffix", default="", help="appended to the file name")
    own = parser.parse_args(argv)
    args = e2e.parse_args(["--out", own.out, "--model-size", own.model_size, "--graphs", own.graphs,
                           "--systems", *own.systems])
    args.port = own.port
    args.timeout_s = own.timeout_s
    os.makedirs(own.out, exist_ok=True)
    budget = e2e.run_budgets(args, e2e.run_traces(args))[False]
    device = device_name()
    date = datetime.date.today().isoformat()
    path = os.path.join(own.out, f"startup-compiles-{device.lower().replace(' ', '-')}-{date}{own.suffix}.json")
    result = {"device": device, "date": date, "versions": versions(), "command": "python " + " ".join(sys.argv),
              "model_build_s": e2e.build_model(args.model, args.model_size), "systems": {}}
    with tempfile.TemporaryDirectory(prefix="kvc-compiles-") as work:
        args.fresh_triton_cache = work
        for name in own.systems:
            result["systems"][name] = record = run_system(name, args, budget)
            print(f"[{name}] start-up {record.get('startup_s')} s, {len(record['compiles'])} compiles: "
                  f"{record['per_phase']}", flush=True)
            with open(path, "w") as handle:
                json.dump(result, handle, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
