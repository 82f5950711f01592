"""End-to-end benchmark runner (issue #6): every system on one GPU, one model, ONE KV byte budget.

In one process, one server at a time (same GPU, same random ~1B Llama from ``serving.py``):
  stock-bf16       stock SGLang, bf16 KV, CUDA graphs as SGLang defaults them
  stock-fp8        stock SGLang, ``--kv-cache-dtype fp8_e4m3`` (twice the tokens at the same bytes)
  stock-hicache    stock SGLang bf16 + ``--enable-hierarchical-cache`` (reference: it adds host RAM,
                   ``--hicache-ratio`` x the device pool)
  kvc=<ladder>     sglang-kvc, ``--kv-compression <ladder>`` (no CUDA graphs; the plugin sizes its
                   tiers from the bf16 budget SGLang computes, patches/plugin.py ``_configure_around``)
Each server gets a warm-up (distinct prompts worth 2x the bf16 budget, which fills every tier
below the last, then re-reads demoted prefixes: every kernel compiles, requantization included),
a cache flush, the agentic multi-turn benchmark (``agentic_multiturn.py``), a flush, and the
shared-prefix benchmark (``shared_prefix.py``: SGLang's bench_serving; its builtin client if
bench_serving cannot be imported).

Budget: the agentic trace's working set (distinct tokens, page-rounded, as cache_sim counts it)
times ``--budget-fraction`` (0.25: at bf16 the cache holds a quarter of it) gives the bf16 token
count B (page-aligned); budget bytes = B x bf16 bytes/token. ``--max-total-tokens`` is B for
stock-bf16, stock-hicache and kvc (the plugin converts it to bytes at bf16), 2B for stock-fp8.

Output (``--out``): ``e2e-<device>-<date>.json`` rewritten after every benchmark of every system,
with a top-level ``summary`` (``ttft_late_p50_bf16_over_kvc``, ``ttft_late_p50_fp8_over_kvc``,
``throughput_kvc_over_fp8``, ``shared_prefix_kvc_over_fp8`` for the best ladder), ``device``,
``date``, ``versions``, ``command``; plots ``e2e-<device>-<date>-ttft.png`` and
``-throughput.png``; server and bench_serving logs under ``e2e-logs/<system>/``.

Time: each device call may run 10 minutes. Before starting a system the runner checks that its
estimated start-up + benchmarks fit in ``--time-budget-s`` (estimates are replaced by what this run
measures) and otherwise leaves it ``pending`` for a later call with ``--resume``. Estimates on an
H100 (first GPU attempt, benchmarks/results/attempts/: stock start-up 175 s, 92 s of it CUDA
graph capture): stock start-up ~190 s, kvc ~75 s (no graphs); warm-up + both benchmarks ~75 s
stock, ~120 s kvc (eager decode, Triton JIT). ``--stock-graphs decode-only`` (skip SGLang's prefill CUDA graphs,
keep decode graphs) saves ~90 s per stock server at a small cost to stock's prefill speed.

Two-call plan (the device tool, repository root; the SGLang kit must travel):
  call 1: run(kind="nvidia-h100-x1", carry=[".gpukit"], timeout_s=600,
              command="bash benchmarks/gpu_e2e.sh")
          ~35 s set-up + ~30 s model build, then kvc=bf16,k8v8,k4v2 (~3.5 min) and stock-fp8
          (~4.5 min): ~9.2 min; the systems that do not fit stay in the JSON's ``pending`` list.
  between: cp <files_at>/e2e-*.json benchmarks/results/ && cp -r <files_at>/e2e-logs benchmarks/results/
  call 2: the same run(...) with
              command="bash benchmarks/gpu_e2e.sh --resume benchmarks/results/e2e-<device>-<date>.json"
          -> stock-bf16 and kvc=k8v8,k4v4,k2v2 (~9.2 min): the summary is complete. Copy the JSON (same
          name), plots and e2e-logs/ back into benchmarks/results/ again.
  call 3 (optional): the same --resume command runs stock-hicache (HiCache reference).
The estimates adapt to what the run measures, so a call may pick another system than planned; the
``pending`` list says what is left (systems that failed or were cut short are pending again).
Then ``python benchmarks/results_table.py benchmarks/results/e2e-*.json --update-readme``.
All calls must run on the same kind of GPU: a resume on another device is refused (timings only
compare on one device; on an H200 SGLang also picks a larger prefill chunk, which grows kvc's write
tier). A CPU dry run of this whole runner on fake servers: ``KVC_SLOW_TESTS=1 .venv/bin/python -m
pytest -q tests/test_e2e_scripts.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import shared_prefix  # noqa: E402
from benchmarks.agentic_multiturn import (add_trace_args, fold_token, run_agentic, session_plans,  # noqa: E402
                                          summarize, trace_from_args)
from benchmarks.results_table import SUMMARY_KEYS, compute_summary, plot_results  # noqa: E402
from benchmarks.serving import (MODEL_SHAPES, Server, counter_deltas, flush_cache, parse_metrics,  # noqa: E402
                                stream_generate, versions)

DEFAULT_SYSTEMS = ["kvc=bf16,k8v8,k4v2", "stock-fp8", "stock-bf16", "kvc=k8v8,k4v4,k2v2", "stock-hicache"]
KV_DTYPE_BYTES = {"bf16": 2, "fp8": 1}
STARTUP_ESTIMATE_S = {"stock": 190.0, "hicache": 200.0, "kvc": 75.0}
PREFILL_GRAPH_CAPTURE_S = 90.0  # what --stock-graphs decode-only saves per stock start-up (H100)
BENCH_ESTIMATE_S = {"stock": 75.0, "hicache": 85.0, "kvc": 120.0}  # warm-up + both benchmarks (kvc: + JIT)
STOP_MARGIN_S = 15.0
SHIM_DIR = os.path.join(tempfile.gettempdir(), "kvc-bench-serving")  # stub modules for bench_serving, not results
SHARED_PREFIX_RESERVE_S = 45.0
# settings that must match between the calls a --resume joins (the rest may differ freely)
RESUME_SETTINGS = ("model_size", "page_size", "budget_fraction", "mem_fraction_static", "stock_attention_backend",
                   "stock_graphs", "hicache_ratio", "warmup_tokens", "trace", "gsp", "gsp_request_rate",
                   "gsp_max_concurrency", "time_scale", "late_from")


# ---- systems and the budget -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SystemSpec:
    """One server configuration. Invariant: ``kind`` is stock, hicache or kvc; ``ladder`` is set
    exactly for kvc; ``kv_dtype`` is the device pool's storage dtype for stock (bf16 or fp8) and
    bf16 for hicache and kvc (whose budget SGLang computes at bf16)."""

    name: str
    kind: str
    kv_dtype: str = "bf16"
    ladder: Optional[str] = None

    @classmethod
    def parse(cls, name: str) -> "SystemSpec":
        if name == "stock-bf16":
            return cls(name, "stock", "bf16")
        if name == "stock-fp8":
            return cls(name, "stock", "fp8")
        if name == "stock-hicache":
            return cls(name, "hicache", "bf16")
        if name.startswith("kvc=") and len(name) > 4:
            return cls(name, "kvc", "bf16", name[4:])
        raise ValueError(f"unknown system {name!r}; choose stock-bf16, stock-fp8, stock-hicache or kvc=<ladder> "
                         f"(e.g. kvc=bf16,k8v8,k4v2)")

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", self.name).strip("-")


@dataclasses.dataclass(frozen=True)
class KVBudget:
    """The one KV byte budget of a run. Invariant: ``bf16_tokens`` is a multiple of ``page_size``
    and ``tokens_for(d) * bytes_per_token(d) == budget_bytes`` for every dtype in KV_DTYPE_BYTES."""

    bf16_tokens: int
    page_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: str) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * KV_DTYPE_BYTES[dtype]

    @property
    def budget_bytes(self) -> int:
        return self.bf16_tokens * self.bytes_per_token("bf16")

    def tokens_for(self, dtype: str) -> int:
        return self.budget_bytes // self.bytes_per_token(dtype)

    def max_total_tokens(self, spec: SystemSpec) -> int:
        """``--max-total-tokens`` for ``spec``: the budget's tokens at its device pool's dtype."""
        return self.tokens_for(spec.kv_dtype)

    @classmethod
    def from_working_set(cls, working_set_tokens: int, fraction: float, page_size: int, shape: dict) -> "KVBudget":
        tokens = int(fraction * working_set_tokens) // page_size * page_size
        if tokens < page_size:
            raise ValueError(f"--budget-fraction {fraction} of {working_set_tokens} tokens holds no page")
        head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
        return cls(tokens, page_size, shape["num_hidden_layers"], shape["num_key_value_heads"], head_dim)


def server_flags(spec: SystemSpec, budget: KVBudget, args) -> List[str]:
    """The ``sglang.launch_server`` flags of ``spec`` (host and port are added by ``Server``)."""
    flags = ["--model-path", args.model, "--page-size", str(budget.page_size), "--mem-fraction-static",
             str(args.mem_fraction_static), "--max-total-tokens", str(budget.max_total_tokens(spec)),
             "--enable-metrics", "--skip-server-warmup", "--random-seed", "0", "--log-level", "info"]
    if spec.kind == "kvc":
        policy = ["--kvc-policy", args.kvc_policy] if args.kvc_policy else []
        return flags + ["--kv-compression", spec.ladder] + policy
    flags += ["--attention-backend", args.stock_attention_backend]
    if args.stock_graphs == "decode-only":
        flags += ["--cuda-graph-backend-prefill", "disabled"]
    if spec.kv_dtype == "fp8":
        flags += ["--kv-cache-dtype", "fp8_e4m3"]
    if spec.kind == "hicache":
        flags += ["--enable-hierarchical-cache", "--hicache-ratio", str(args.hicache_ratio)]
    return flags


# ---- time ------------------------------------------------------------------------------------------
class TimePlanner:
    """Decides whether a system still fits in this call. Invariant: per kind of system, the
    start-up and benchmark estimates are the defaults until this run measures that kind, then the
    largest measurement (a slow first kvc server does not change the stock estimates)."""

    def __init__(self, budget_s: float, stock_graphs: str = "default", clock=time.monotonic):
        self.clock = clock
        self.deadline = clock() + budget_s
        self.startup_s = dict(STARTUP_ESTIMATE_S)
        if stock_graphs == "decode-only":
            for kind in ("stock", "hicache"):
                self.startup_s[kind] -= PREFILL_GRAPH_CAPTURE_S
        self.bench_s = dict(BENCH_ESTIMATE_S)
        self._measured: Dict[tuple, float] = {}

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def estimate(self, spec: SystemSpec) -> float:
        return self.startup_s[spec.kind] + self.bench_s[spec.kind] + STOP_MARGIN_S

    def fits(self, spec: SystemSpec) -> bool:
        return self.estimate(spec) <= self.remaining()

    def observe(self, spec: SystemSpec, startup_s: Optional[float], bench_s: Optional[float]) -> None:
        for table, name, value in ((self.startup_s, "startup", startup_s), (self.bench_s, "bench", bench_s)):
            if value is not None:
                key = (name, spec.kind)
                self._measured[key] = table[spec.kind] = max(value, self._measured.get(key, 0.0))


# ---- per-server steps --------------------------------------------------------------------------------
def warm_up(url: str, vocab_size: int, total_tokens: int, prompt_len: int = 2048, concurrency: int = 4,
            reread: int = 4, seed: int = 987654321) -> dict:
    """Send distinct prompts worth ``total_tokens`` (8-token replies), then re-send the first
    ``reread`` prompts' first halves + 64 new tokens: under the run's budget this fills every
    tier, demotes and drops, then extends from demoted prefixes, so every kernel is compiled
    before the timed part. Token ids come from their own seed: no overlap with the benchmarks."""
    import random

    rng = random.Random(seed)
    count = max(1, -(-total_tokens // prompt_len))
    prompts = [[fold_token(rng.randrange(1000, 1 << 30), vocab_size) for _ in range(prompt_len)] for _ in range(count)]
    rereads = [p[: prompt_len // 2] + [fold_token(rng.randrange(1000, 1 << 30), vocab_size) for _ in range(64)]
               for p in prompts[:reread]]
    started = time.perf_counter()
    params = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda p: stream_generate(url, p, params, timeout=300), prompts))
        results += list(pool.map(lambda p: stream_generate(url, p, params, timeout=300), rereads))
    errors = [r.error for r in results if r.error]
    return {"requests": len(results), "tokens": count * prompt_len, "errors": len(errors),
            "first_error": errors[0] if errors else None, "wall_s": round(time.perf_counter() - started, 1),
            "reread_cached_tokens": [r.meta_info.get("cached_tokens") for r in results[count:]]}


LOG_PATTERNS = {
    "max_total_num_tokens": re.compile(r"(?<!sglang-kvc: )max_total_num_tokens=(\d+)"),
    "kv_allocated": re.compile(r"KV Cache is allocated\. dtype: (\S+), #tokens: (\d+), K size: ([\d.]+) GB, "
                               r"V size: ([\d.]+) GB"),
    "kvc_budget": re.compile(r"sglang-kvc: KV budget ([\d.]+) GB holds (\d+) tokens over tiers"),
    "kvc_capacity": re.compile(r"sglang-kvc: max_total_num_tokens=(\d+) over tiers"),
    "kvc_summary": re.compile(r"(kvc: .*)$"),
    "graph_capture": re.compile(r"Capture .*CUDA graph end\. elapsed=([\d.]+) s"),
}


def summarize_log(path: str, budget: KVBudget) -> dict:
    """What a server log says about its pool: tokens, KV GB (checked against the budget),
    sglang-kvc's tier capacity and last tier summary, CUDA graph capture time, first errors."""
    try:
        with open(path, errors="replace") as handle:
            text = handle.read()
    except OSError as err:
        return {"error": repr(err)}
    totals = [int(x) for x in LOG_PATTERNS["max_total_num_tokens"].findall(text)]
    out: Dict[str, object] = {"max_total_num_tokens": totals}
    allocated = LOG_PATTERNS["kv_allocated"].search(text)
    if allocated:
        out["kv_dtype"] = allocated.group(1)
        out["kv_tokens"] = int(allocated.group(2))
        out["kv_gb"] = round(float(allocated.group(3)) + float(allocated.group(4)), 3)
    kvc_budget = LOG_PATTERNS["kvc_budget"].search(text)
    if kvc_budget:
        out["kv_gb"] = float(kvc_budget.group(1))
        out["kvc_capacity_tokens"] = int(kvc_budget.group(2))
    summaries = [m.group(1) for m in map(LOG_PATTERNS["kvc_summary"].search, text.splitlines()) if m]
    out["kvc_last_summary"] = summaries[-1] if summaries else None
    out["cuda_graph_capture_s"] = round(sum(float(x) for x in LOG_PATTERNS["graph_capture"].findall(text)), 1)
    if "kv_gb" in out:
        expected = budget.budget_bytes / (1 << 30)
        out["budget_gb"] = round(expected, 3)
        out["budget_matches"] = abs(out["kv_gb"] - expected) <= max(0.02, 0.03 * expected)
    lines = text.splitlines()
    errors = [i for i, line in enumerate(lines) if "Traceback" in line or " Error" in line or "error:" in line]
    out["errors"] = [lines[i][:300] for i in errors[:5]]
    if errors:
        out["first_traceback_tail"] = lines[errors[0]: errors[0] + 40][-12:]
    return out


def metrics_snapshot(server: Server) -> Dict[str, float]:
    try:
        return parse_metrics(server.get_text("/metrics"))
    except Exception:
        return {}


def kvc_metric_lines(metrics: Dict[str, float]) -> Dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("sglang:kvc_")}


class Run:
    """One call of the runner: its settings, result JSON (rewritten atomically after every step)
    and the server being benchmarked (stopped on SIGTERM)."""

    def __init__(self, args, budget: KVBudget, result: dict, json_path: str):
        self.args, self.budget, self.result, self.json_path = args, budget, result, json_path
        self.trace = trace_from_args(args)
        self.server: Optional[Server] = None
        self.lock = threading.Lock()

    def save(self) -> None:
        with self.lock:
            self.result["summary"] = compute_summary(self.result["systems"])
            self.result["pending"] = [n for n in self.result.get("requested", []) if
                                      self.result["systems"].get(n, {}).get("status") != "done"]
            tmp = self.json_path + ".tmp"
            with open(tmp, "w") as handle:
                json.dump(self.result, handle, indent=1)
            os.replace(tmp, self.json_path)

    def run_system(self, spec: SystemSpec, planner: TimePlanner, port: int) -> dict:
        args, out = self.args, self.args.out
        log_dir = os.path.join(out, "e2e-logs", spec.slug)
        os.makedirs(log_dir, exist_ok=True)
        log_path = os.path.join(log_dir, "server.log")
        flags = server_flags(spec, self.budget, args)
        record = {"name": spec.name, "kind": spec.kind, "kv_dtype": spec.kv_dtype, "ladder": spec.ladder,
                  "flags": flags, "max_total_tokens": self.budget.max_total_tokens(spec),
                  "kv_budget_bytes": self.budget.max_total_tokens(spec) * self.budget.bytes_per_token(spec.kv_dtype),
                  "status": "running", "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "log": os.path.relpath(log_path, out), "call": len(self.result["calls"]) - 1}
        if spec.kind == "hicache":
            record["host_kv_bytes"] = int(args.hicache_ratio * record["kv_budget_bytes"])
        self.result["systems"][spec.name] = record
        self.save()
        self.server = server = Server(flags, port, log_path, env={"PYTHONUNBUFFERED": "1"}, module=args.server_module)
        bench_started = None
        try:
            record["startup_s"] = round(server.start(timeout_s=min(420.0, max(60.0, planner.remaining()))), 1)
            print(f"[{spec.name}] healthy after {record['startup_s']} s", flush=True)
            bench_started = time.perf_counter()
            record["warmup"] = warm_up(server.url, args.vocab_size, args.warmup_tokens)
            print(f"[{spec.name}] warm-up {record['warmup']}", flush=True)
            record["agentic"] = self.run_agentic_step(server, spec, planner)
            self.save()
            if planner.remaining() < SHARED_PREFIX_RESERVE_S:
                record["shared_prefix"] = {"error": "skipped: time budget", "cut_short": True}
            else:
                record["shared_prefix"] = self.run_shared_prefix_step(server, spec, planner, log_dir)
            # "partial" (run again on --resume) only when time cut a benchmark short; failed requests
            # are results: they stay in the record (and keep a ladder out of the summary's best)
            cut = record["agentic"].get("cut_short") or record["shared_prefix"].get("cut_short")
            record["status"] = "partial" if cut else "done"
        except Exception as err:  # keep what we have; the server log says the rest
            record["status"] = "failed"
            record["error"] = repr(err)[:500]
            print(f"[{spec.name}] FAILED: {err!r}", flush=True)
        finally:
            record["kvc_metrics_end"] = kvc_metric_lines(metrics_snapshot(server)) if spec.kind == "kvc" else None
            record["exit_code"] = stop_server(server)
            self.server = None
            record["log_summary"] = summarize_log(log_path, self.budget)
            record["bench_s"] = round(time.perf_counter() - bench_started, 1) if bench_started else None
            planner.observe(spec, record.get("startup_s"), record["bench_s"] if record["status"] == "done" else None)
            self.save()
        return record

    def run_agentic_step(self, server: Server, spec: SystemSpec, planner: TimePlanner) -> dict:
        args = self.args
        flush_cache(server.url)
        before = metrics_snapshot(server)
        timeout = max(30.0, min(args.agentic_timeout_s, planner.remaining() - SHARED_PREFIX_RESERVE_S - STOP_MARGIN_S))
        started = time.perf_counter()
        records = run_agentic(server.url, session_plans(self.trace, args.vocab_size), args.time_scale, timeout,
                              progress=not args.no_progress, label=f"{spec.name} agentic")
        step = {"wall_s": round(time.perf_counter() - started, 1),
                "summary": summarize(records, self.trace.num_rounds, args.late_from), "requests": records,
                "metrics_delta": counter_deltas(before, metrics_snapshot(server))}
        overall = step["summary"]["overall"]
        if overall["errors"]:
            step["error"] = f"{overall['errors']} of {overall['requests']} requests failed"
            step["cut_short"] = any((r.get("error") or "").startswith("skipped") for r in records)
        late = step["summary"]["late"]
        print(f"[{spec.name}] agentic: late TTFT p50 {fmt_ms(late['ttft_p50_s'])}, p90 {fmt_ms(late['ttft_p90_s'])}, "
              f"output {overall['output_throughput_tok_s'] or 0:.0f} tok/s, hit ratio {overall['hit_ratio'] or 0:.2f}",
              flush=True)
        return step

    def run_shared_prefix_step(self, server: Server, spec: SystemSpec, planner: TimePlanner, log_dir: str) -> dict:
        args = self.args
        flush_cache(server.url)
        before = metrics_snapshot(server)
        timeout = max(30.0, min(args.shared_prefix_timeout_s, planner.remaining() - STOP_MARGIN_S))
        concurrency = args.gsp_max_concurrency or None
        settings = shared_prefix.gsp_settings(args)
        if args.shared_prefix_engine == "bench_serving":
            step = shared_prefix.run_bench_serving(server.url, args.model, args.model, settings, log_dir,
                                                   args.gsp_request_rate, concurrency, args.gsp_seed, timeout,
                                                   env=args.bench_serving_env)
        else:
            step = shared_prefix.run_builtin(server.url, settings, args.vocab_size, concurrency, args.gsp_seed, timeout,
                                             progress=not args.no_progress, label=f"{spec.name} shared-prefix")
        step["metrics_delta"] = counter_deltas(before, metrics_snapshot(server))
        step["cut_short"] = "ran past" in (step.get("error") or "") or bool(step.get("requests_not_sent"))
        if "log" in step:
            step["log"] = os.path.relpath(step["log"], args.out)
        metrics = step.get("metrics") or {}
        print(f"[{spec.name}] shared-prefix ({step['engine']}): "
              f"output {metrics.get('output_throughput') or 0:.0f} tok/s, "
              f"TTFT p50 {metrics.get('median_ttft_ms') or 0:.0f} ms, hit ratio {metrics.get('hit_ratio') or 0:.2f}"
              + (f", error: {step['error']}" if step.get("error") else ""), flush=True)
        return step


def stop_server(server: Server, grace_s: float = 30.0) -> Optional[int]:
    """Stop ``server`` and wait until its whole process group is gone (its scheduler processes
    hold GPU memory the next server needs)."""
    if server.proc is None:
        return None
    code = server.stop()
    deadline = time.time() + grace_s
    while time.time() < deadline:
        try:
            os.killpg(server.proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return code
        time.sleep(0.5)
    try:
        os.killpg(server.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return code


def fmt_ms(seconds: Optional[float]) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


# ---- resume -----------------------------------------------------------------------------------------
def resume_mismatches(previous: dict, settings: dict) -> List[str]:
    """Settings (of RESUME_SETTINGS) whose value differs between the resumed JSON and this call."""
    old = previous.get("settings", {})
    return [f"{key}: {old.get(key)!r} -> {settings.get(key)!r}" for key in RESUME_SETTINGS
            if json.dumps(old.get(key), sort_keys=True) != json.dumps(settings.get(key), sort_keys=True)]


def systems_to_run(requested: List[str], previous_systems: Dict[str, dict], rerun: List[str]) -> List[str]:
    """``requested`` in order, minus those already ``done`` in the resumed JSON (unless in ``rerun``)."""
    return [name for name in requested
            if previous_systems.get(name, {}).get("status") != "done" or name in rerun]


def model_fingerprint(path: str, head_bytes: int = 16 << 20) -> Optional[str]:
    """sha256 of config.json and the first ``head_bytes`` of each weight file (cheap identity check)."""
    digest = hashlib.sha256()
    try:
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors")) + ["config.json"]
        for name in names:
            with open(os.path.join(path, name), "rb") as handle:
                digest.update(handle.read(head_bytes))
    except OSError:
        return None
    return digest.hexdigest()[:16]


def device_name() -> str:
    """The GPU's name from nvidia-smi (this process never touches CUDA: the servers need it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
        if out:
            return out[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def build_model(path: str, size: str) -> float:
    """Build the random Llama + tokenizer in a subprocess (it may use CUDA; this process must not)."""
    started = time.time()
    code = ("import sys; sys.path.insert(0, %r); from benchmarks.serving import make_random_llama; "
            "make_random_llama(%r, %r)" % (ROOT, path, size))
    subprocess.run([sys.executable, "-c", code], check=True)
    return round(time.time() - started, 1)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="JSON, plots and e2e-logs/ go here")
    parser.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS,
                        help="in priority order: stock-bf16, stock-fp8, stock-hicache, kvc=<ladder>")
    parser.add_argument("--resume", default=None, help="an e2e JSON of an earlier call: run only what it lacks")
    parser.add_argument("--rerun", nargs="*", default=[], help="with --resume: run these again even if done")
    parser.add_argument("--allow-device-mismatch", action="store_true", help="resume on another GPU model")
    parser.add_argument("--time-budget-s", type=float, default=535,
                        help="start no system whose estimate would end after this many seconds")
    parser.add_argument("--model", default="/tmp/kvc-random-llama")
    parser.add_argument("--model-size", default="1b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--budget-fraction", type=float, default=0.25,
                        help="KV budget as a fraction of the agentic trace's bf16 working set")
    parser.add_argument("--mem-fraction-static", type=float, default=0.80)
    parser.add_argument("--stock-attention-backend", default="triton", choices=["triton", "flashinfer"],
                        help="stock systems' attention backend (the kit has no fa3)")
    parser.add_argument("--stock-graphs", default="default", choices=["default", "decode-only"],
                        help="stock CUDA graphs: SGLang's defaults (prefill + decode) or decode only")
    parser.add_argument("--hicache-ratio", type=float, default=4.0, help="host pool / device pool (HiCache)")
    parser.add_argument("--kvc-policy", default=None, help="--kvc-policy for kvc systems (default: the plugin's)")
    parser.add_argument("--warmup-tokens", type=int, default=None, help="default: 2x the bf16 budget tokens")
    parser.add_argument("--agentic-timeout-s", type=float, default=300)
    parser.add_argument("--shared-prefix-timeout-s", type=float, default=180)
    parser.add_argument("--shared-prefix-engine", default="auto", choices=["auto", "bench_serving", "builtin"],
                        help="auto: bench_serving when it imports, else the builtin client")
    parser.add_argument("--port", type=int, default=31000, help="first server's port (+1 per system)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--server-module", default="sglang.launch_server",
                        help="module run as the server (tests use a fake SGLang server on the CPU)")
    add_trace_args(parser)
    shared_prefix.add_gsp_args(parser)
    args = parser.parse_args(argv)
    args.vocab_size = MODEL_SHAPES[args.model_size]["vocab_size"]
    for name in args.systems + args.rerun:
        SystemSpec.parse(name)
    return args


def run_settings(args, budget: KVBudget, working_set: int) -> dict:
    trace = trace_from_args(args)
    return {"model": args.model, "model_size": args.model_size, "page_size": args.page_size,
            "budget_fraction": args.budget_fraction, "mem_fraction_static": args.mem_fraction_static,
            "stock_attention_backend": args.stock_attention_backend, "stock_graphs": args.stock_graphs,
            "hicache_ratio": args.hicache_ratio, "kvc_policy": args.kvc_policy, "warmup_tokens": args.warmup_tokens,
            "trace": dict(trace.params), "time_scale": args.time_scale, "late_from": args.late_from,
            "gsp": shared_prefix.gsp_settings(args), "gsp_request_rate": str(args.gsp_request_rate),
            "gsp_max_concurrency": args.gsp_max_concurrency, "gsp_seed": args.gsp_seed,
            "budget": {"bf16_tokens": budget.bf16_tokens, "budget_bytes": budget.budget_bytes,
                       "bf16_bytes_per_token": budget.bytes_per_token("bf16"),
                       "fp8_tokens": budget.tokens_for("fp8"), "agentic_working_set_tokens": working_set,
                       "shared_prefix_working_set_tokens": shared_prefix.working_set_tokens(
                           shared_prefix.gsp_settings(args), args.page_size, args.gsp_seed)}}


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    planner = TimePlanner(args.time_budget_s, args.stock_graphs)
    os.makedirs(args.out, exist_ok=True)
    trace = trace_from_args(args)
    working_set = trace.working_set_tokens(args.page_size)
    budget = KVBudget.from_working_set(working_set, args.budget_fraction, args.page_size, MODEL_SHAPES[args.model_size])
    args.warmup_tokens = args.warmup_tokens or 2 * budget.bf16_tokens
    settings = run_settings(args, budget, working_set)
    device = device_name()
    command = "python " + " ".join([os.path.relpath(os.path.abspath(__file__), ROOT)] + list(argv or sys.argv[1:]))
    call = {"command": command, "started": datetime.datetime.now().isoformat(timespec="seconds"), "device": device}
    if args.resume:
        with open(args.resume) as handle:
            result = json.load(handle)
        mismatches = resume_mismatches(result, settings)
        if mismatches:
            print("error: --resume joins runs with the same settings; these differ:\n  " + "\n  ".join(mismatches),
                  file=sys.stderr)
            return 2
        if result.get("device") != device and not args.allow_device_mismatch:
            print(f"error: {args.resume} was measured on {result.get('device')!r}, this is {device!r}; timings "
                  f"compare only on one device (--allow-device-mismatch to override)", file=sys.stderr)
            return 2
        json_path = os.path.join(args.out, os.path.basename(args.resume))
        todo = systems_to_run(args.systems, result["systems"], args.rerun)
        result["requested"] = list(dict.fromkeys(result.get("requested", []) + args.systems))
    else:
        date = datetime.date.today().isoformat()
        slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
        json_path = os.path.join(args.out, f"e2e-{slug}-{date}.json")
        result = {"device": device, "date": date, "versions": versions(), "command": command,
                  "settings": settings, "requested": list(args.systems), "systems": {}, "calls": []}
        todo = list(args.systems)
    result["command"] = command
    result["versions"] = versions()
    result["calls"].append(call)
    run = Run(args, budget, result, json_path)

    def on_sigterm(signum, frame):  # the device call ran out: leave no server behind
        if run.server is not None:
            stop_server(run.server, grace_s=5)
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    with ThreadPoolExecutor(max_workers=2) as pool:  # both are subprocesses: overlap them
        probe = pool.submit(shared_prefix.bench_serving_available, SHIM_DIR) \
            if args.shared_prefix_engine == "auto" else None
        call["model_build_s"] = build_model(args.model, args.model_size)
        problem = probe.result() if probe else None
    if args.shared_prefix_engine == "auto":
        args.shared_prefix_engine = "builtin" if problem else "bench_serving"
    args.bench_serving_env = shared_prefix.bench_serving_env(SHIM_DIR)
    call["shared_prefix_engine"] = args.shared_prefix_engine + (f" (bench_serving: {problem})" if problem else "")
    fingerprint = model_fingerprint(args.model)
    if result.get("model_fingerprint") not in (None, fingerprint):
        call["warning"] = (f"model fingerprint {fingerprint} differs from the resumed run's "
                           f"{result['model_fingerprint']}")
    result.setdefault("model_fingerprint", fingerprint)
    print(f"budget: {budget.bf16_tokens} bf16 tokens = {budget.budget_bytes / (1 << 30):.2f} GiB "
          f"({args.budget_fraction:g} of the agentic working set {working_set}); systems to run: {todo}", flush=True)
    run.save()
    stem = os.path.splitext(json_path)[0]
    for index, name in enumerate(todo):
        spec = SystemSpec.parse(name)
        if not planner.fits(spec):
            print(f"[{name}] pending: needs ~{planner.estimate(spec):.0f} s, {planner.remaining():.0f} s left "
                  f"(run again with --resume {json_path})", flush=True)
            continue
        run.run_system(spec, planner, args.port + index)
        result["plots"] = [os.path.basename(p) for p in plot_results(result, stem)]
        run.save()
    call["wall_s"] = round(time.monotonic() - started, 1)
    run.save()
    print(json.dumps({k: result["summary"].get(k) for k in SUMMARY_KEYS + ("best_kvc_system", "missing")}, indent=1))
    print(f"pending: {result['pending']}" if result["pending"] else "all requested systems done")
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
