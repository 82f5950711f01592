"""End-to-end benchmark runner (issue #6): every system on one GPU, one model, ONE KV byte budget.

In one process, one server at a time (same GPU, same random Llama from ``serving.py``: ``--model-size
1b``, head_dim 64, or ``8b``, Llama-3.1-8B's shape, head_dim 128, GQA 32/8, where prefill costs what it
costs in production), in priority order (``DEFAULT_SYSTEMS``: the headline pair first):
  kvc=<ladder>     sglang-kvc, ``--kv-compression <ladder>`` (the plugin sizes one frame arena from the
                   bf16 budget SGLang computes and admits against all of it; CUDA graphs as stock's)
  stock-fp8        stock SGLang, ``--kv-cache-dtype fp8_e4m3`` (twice the tokens at the same bytes)
  stock-bf16       stock SGLang, bf16 KV, CUDA graphs as SGLang defaults them
  nopressure:<s>   system <s> at the no-pressure budget (``--nopressure-fraction``, 1.25, of the working
                   set: nothing is evicted), agentic benchmark only (``--nopressure-shared-prefix`` adds
                   the other), optionally on a shorter trace (``--nopressure-sessions``, ``--nopressure-rounds``).
                   Every system runs at one CUDA-graph setting (``--graphs``; each record's ``cuda_graphs``;
                   the log's ``cuda graph: True/False`` batch counts in ``log_summary.cuda_graph_batches``)
  stock-hicache    stock SGLang bf16 + ``--enable-hierarchical-cache`` (reference: it adds host RAM,
                   ``--hicache-ratio`` x the device pool)
Each server gets a warm-up (``warm_up``: waves of distinct prompts worth 2x the bf16 budget until
kvc has demoted into its last tier, then re-reads of prefixes from the middle of what was sent, so
every kernel compiles, requantization into every tier and extends over lower tiers included),
a cache flush, the agentic multi-turn benchmark (``agentic_multiturn.py``), a flush, and the
shared-prefix benchmark (``shared_prefix.py``: SGLang's bench_serving; its builtin client if
bench_serving cannot be imported; none with ``--no-shared-prefix``).

Budget: the agentic trace's working set (distinct tokens, page-rounded, as cache_sim counts it)
times ``--budget-fraction`` (0.25: at bf16 the cache holds a quarter of it) gives the bf16 token
count B (page-aligned); budget bytes = B x bf16 bytes/token. ``--max-total-tokens`` is B for
stock-bf16, stock-hicache and kvc (the plugin converts it to bytes at bf16), 2B for stock-fp8.
No-pressure systems get the same rule with their own B (``settings.nopressure.budget``).

Output (``--out``): ``e2e-<device>-<date>.json`` (``-<size>`` before ``.json`` for sizes other than
1b) rewritten after every benchmark of every system, with a top-level ``summary``
(results_table.SUMMARY_KEYS: ``kvc_admitted_over_stock_bf16``, ``refused_requests``,
``ttft_late_p50_{bf16,fp8}_over_kvc``, ``throughput_kvc_over_fp8``, ``nopressure_throughput_kvc_over_bf16``,
``shared_prefix_kvc_over_fp8``; ``nopressure_cuda_graphs``, ``notes``), ``device``, ``date``,
``versions``, ``command``; plots ``<json stem>-ttft.png`` and ``-throughput.png``; server and
bench_serving logs under ``e2e-logs[-<size>]/<system>/`` (gpu_e2e.sh packs them into
``e2e-logs.tgz``: the device returns at most 8 files).

Time: each device call may run 10 minutes. Before starting a system the runner checks that its
estimated start-up + benchmarks fit in ``--time-budget-s`` (default 535 s; gpu_e2e.sh's set-up
takes ~30 s more) and otherwise leaves it ``pending`` for a later call with ``--resume``. The
estimates (``STARTUP_ESTIMATE_S``, ``BENCH_ESTIMATE_S``, per model size) were measured on an H200
(see the comment there) and are replaced by what this run measures. ``--graphs decode-only``
(skip SGLang's prefill CUDA graphs, keep decode graphs, for every system) saves ~5 s per start-up
at 1b, ~65 s at 8b, at a small cost to prefill speed.

``--profile-steps N`` adds, after each system's agentic benchmark, a torch-profiler sample of N forward
steps under one burst of requests (``benchmarks/step_profile.py``): GPU kernel time by group (attention,
kv_dequantize, kv_write, requantize, plan, gemm, other) per system, in the summary's ``gpu_time_by_group``
(~45 s a system, budgeted). E.g. the headline pair split, one call:
``bash benchmarks/gpu_e2e.sh --no-progress --no-shared-prefix --profile-steps 40``.

Three-call plan on an H200 (the device tool, repository root; the SGLang kit must travel), each
``run(kind="nvidia-h200", carry=[".gpukit"], timeout_s=600, command=...)``:
  call 1 (1b headline pair): command="bash benchmarks/gpu_e2e.sh --no-progress"
          model build + kvc=k8v8,k4v4-kc (~4.9 min estimated) + stock-fp8 (~2.6 min);
          the rest of DEFAULT_SYSTEMS stays in the JSON's ``pending`` list.
  between: cp <files_at>/e2e-*.json benchmarks/results/ && tar xzf <files_at>/e2e-logs.tgz -C benchmarks/results
  call 2 (1b stock-bf16 + no-pressure pair):
          command="bash benchmarks/gpu_e2e.sh --no-progress --resume benchmarks/results/e2e-<device>-<date>.json"
          stock-bf16 (~2.7 min) + nopressure:kvc=... (~3.9 min) + nopressure:stock-bf16 (~2.2 min):
          every summary key is set. Copy the JSON (same name), plots and logs back as above.
  call 3 (8b headline pair, agentic only, decode graphs only: prefill capture at 8b takes minutes):
          command="bash benchmarks/gpu_e2e.sh --no-progress --model-size 8b --no-shared-prefix
                   --graphs decode-only --time-budget-s 540 --systems kvc=k8v8,k4v4-kc stock-fp8"
          8b model build (~20 s) + kvc (~4.7 min, measured) + stock-fp8 (~2 min) into
          ``e2e-<device>-<date>-8b.json`` (kvc_admitted_over_stock_bf16 there uses the budget's bf16
          tokens stated in the kvc log: ``notes`` says so). Copy it and its plots and logs back as above.
  call 4 (optional): the call-2 command again runs kvc=k8v8,k4v4-kc,k4v2-g32-kc and stock-hicache.
  A saturating load (every round sent as the previous one returns; the simulator's predictions for it are in
  cache_sim-2026-12-02-back-to-back*.json and depend on how the cache's scheduler time scales):
          command="bash benchmarks/gpu_e2e.sh --no-progress --time-scale 0 --label saturated
                   --systems kvc=k8v8,k4v4-kc stock-fp8"
Prefix a command with ``KVC_GIT_COMMIT=<commit>`` (the device copy's git metadata may be stale) and add
``--fresh-triton-cache /tmp/triton`` where start-up times are to be compared.
The estimates adapt to what the run measures, so a call may pick another system than planned; the
``pending`` list says what is left (systems that failed or were cut short are pending again).
Then ``python benchmarks/results_table.py benchmarks/results/e2e-*.json --update-readme``.
All calls of one JSON must run on the same kind of GPU: a resume on another device is refused
(timings only compare on one device). A CPU dry run of this whole runner on fake servers:
``KVC_SLOW_TESTS=1 .venv/bin/python -m pytest -q tests/test_e2e_scripts.py``.
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
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import shared_prefix  # noqa: E402
from benchmarks.agentic_multiturn import (add_trace_args, fold_token, run_agentic, session_plans,  # noqa: E402
                                          summarize, trace_from_args)
from benchmarks.results_table import SUMMARY_KEYS, compute_summary, plot_results  # noqa: E402
from benchmarks.serving import (MODEL_SHAPES, Server, counter_deltas, device_name, flush_cache, host_probe,  # noqa: E402
                                parse_metrics, stream_generate, versions)
from benchmarks.traces import Trace  # noqa: E402

# the ladders of the presets (sglang_kvc/tiers.py), which the SmolLM2 quality runs chose: the headline is
# fp8-quality (stock fp8's quality there, the mission's bar), then aggressive (+3% perplexity); spelled out
# because the client scripts import nothing of the plugin (tests/test_e2e_scripts.py checks they match)
HEADLINE_KVC = "kvc=k8v8,k4v4-kc"
HEADLINE_SYSTEMS = [HEADLINE_KVC, "stock-fp8"]
NOPRESSURE_PREFIX = "nopressure:"
# kvc=<ladder>+<key>=<value>: server settings of one kvc system (the simulator's KVC_OPTIONS, same keys)
KVC_FLAGS = {"yield": "--kvc-min-demotion-yield", "frames": "--kvc-frame-pages"}
DEFAULT_SYSTEMS = HEADLINE_SYSTEMS + ["stock-bf16", NOPRESSURE_PREFIX + HEADLINE_KVC, "nopressure:stock-bf16",
                                      "kvc=k8v8,k4v4-kc,k4v2-g32-kc", "stock-hicache"]
KV_DTYPE_BYTES = {"bf16": 2, "fp8": 1}
# Estimates per model size, measured on an H200 on 2026-12-01. 1b: /work/shared/evidence/2026-12-01-h200/ (e2e
# JSON): start-up stock 65-73 s (CUDA graph capture 8-20 s of it), kvc 49-72 s; warm-up + both benchmarks stock
# 66-68 s, kvc 158-179 s; warm-up + agentic alone stock 31-32 s, kvc 67-83 s. 8b (stock only, the calibration
# run of the change that added it): model build 30 s; start-up stock-fp8 128 s (CUDA graph capture 74 s, 68 of it
# prefill), stock-bf16 without graphs 60 s; warm-up + both benchmarks stock-fp8 101 s (3 + 46 + 44); warm-up +
# agentic stock-fp8 49 s, stock-bf16 without graphs 60 s. Not measured (extrapolated, with a margin): hicache
# anywhere, kvc at 8b (start-up: stock without graphs + the 1b kvc margin; benchmarks: the 8b stock time x the
# 1b kvc / stock ratio). Bench keys: the kind, + "/agentic" for systems that skip the shared-prefix benchmark.
# kvc with CUDA graphs (e2e-nvidia-h200-2026-12-01-k2v2-ladder.json, same day, packed in
# benchmarks/results/e2e-superseded-2026-12-01.tgz): start-up
# 152-165 s (its breakable prefill graph capture takes 67 s against stock's 17 s), warm-up + agentic 45 s (stock
# 38 s); with its kernels compiled before serving (-b176138.json, packed there too) start-up 180 s (23 s of
# compiles), warm-up + agentic 43 s; kvc with the shared-prefix benchmark is extrapolated (stock's time x 1.3).
# kvc at 8b (e2e-nvidia-h200-2026-12-01-8b-e9a7733.json, --graphs decode-only): start-up 221 s (decode graph capture 69 s
# against stock-fp8's 16 s, kernel precompile 85 s), warm-up + agentic 62 s (stock-fp8: 72 s and 50 s).
STARTUP_ESTIMATE_S = {"1b": {"stock": 75.0, "hicache": 90.0, "kvc": 185.0},
                      "8b": {"stock": 130.0, "hicache": 145.0, "kvc": 290.0}}
BENCH_ESTIMATE_S = {"1b": {"stock": 70.0, "hicache": 80.0, "kvc": 95.0,
                           "stock/agentic": 45.0, "hicache/agentic": 50.0, "kvc/agentic": 50.0},
                    "8b": {"stock": 105.0, "hicache": 120.0, "kvc": 140.0,
                           "stock/agentic": 65.0, "hicache/agentic": 75.0, "kvc/agentic": 85.0}}
PREFILL_GRAPH_CAPTURE_S = {"1b": 5.0, "8b": 65.0}  # what --graphs decode-only saves per start-up
MODEL_BUILD_S = {"1b": 20.0, "8b": 30.0}  # the random Llama on a bare machine (8b measured; before the planner)
ESTIMATES_OF = {"tiny": "1b", "1b": "1b", "8b": "8b"}  # model size -> the size whose estimates it uses
STOP_MARGIN_S = 15.0
PROFILE_ESTIMATE_S = 20.0  # --profile-steps 40: one burst under the profiler and the trace written; measured 6.7-10.8 s
# a system at 1b (e2e-nvidia-h200-2026-12-01-80d382d.json, "profile_s"; 6.1-11.6 s in -607524e.json (packed) and
# -kc-profile.json), doubled for the 8b model (not measured there)
SHIM_DIR = os.path.join(tempfile.gettempdir(), "kvc-bench-serving")  # stub modules for bench_serving, not results
SHARED_PREFIX_RESERVE_S = 45.0
# settings that must match between the calls a --resume joins (the rest may differ freely)
RESUME_DEFAULTS = {"tp": 1}  # settings JSONs written before the setting existed ran with this
RESUME_SETTINGS = ("model_size", "tp", "page_size", "budget_fraction", "mem_fraction_static", "stock_attention_backend",
                   "graphs", "hicache_ratio", "warmup_tokens", "trace", "gsp", "gsp_request_rate",
                   "gsp_max_concurrency", "time_scale", "late_from", "nopressure")


# ---- systems and the budget -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SystemSpec:
    """One server configuration. Invariant: ``kind`` is stock, hicache or kvc; ``ladder`` is set
    exactly for kvc; ``kv_dtype`` is the device pool's storage dtype for stock (bf16 or fp8) and
    bf16 for hicache and kvc (whose budget SGLang computes at bf16). ``nopressure`` systems
    (``nopressure:<system>``) get the no-pressure budget (at least the working set) and trace. kvc's
    ``options`` (``kvc=<ladder>+<key>=<value>``, keys of KVC_FLAGS) become server flags."""

    name: str
    kind: str
    kv_dtype: str = "bf16"
    ladder: Optional[str] = None
    nopressure: bool = False
    options: Tuple[Tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, name: str) -> "SystemSpec":
        if name.startswith(NOPRESSURE_PREFIX):
            base = cls.parse(name[len(NOPRESSURE_PREFIX):])
            if base.nopressure:
                raise ValueError(f"unknown system {name!r}: one {NOPRESSURE_PREFIX} prefix at most")
            return dataclasses.replace(base, name=name, nopressure=True)
        if name == "stock-bf16":
            return cls(name, "stock", "bf16")
        if name == "stock-fp8":
            return cls(name, "stock", "fp8")
        if name == "stock-hicache":
            return cls(name, "hicache", "bf16")
        if name.startswith("kvc=") and len(name) > 4:
            ladder, *settings = name[4:].split("+")
            options = tuple(setting.partition("=")[::2] for setting in settings)
            for key, value in options:
                if key not in KVC_FLAGS or not value:
                    raise ValueError(f"unknown option {key!r} in {name!r}: kvc=<ladder>+<key>=<value>, key one of "
                                     f"{', '.join(KVC_FLAGS)}")
            return cls(name, "kvc", "bf16", ladder, options=options)
        raise ValueError(f"unknown system {name!r}; choose stock-bf16, stock-fp8, stock-hicache or kvc=<ladder> "
                         f"(e.g. kvc=bf16,k8v8,k4v2), each optionally prefixed {NOPRESSURE_PREFIX}")

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", self.name).strip("-")


def runs_shared_prefix(spec: SystemSpec, args) -> bool:
    """Whether ``spec`` runs the shared-prefix benchmark after the agentic one: not with
    ``--no-shared-prefix``, and no-pressure systems only with ``--nopressure-shared-prefix``."""
    return not args.no_shared_prefix and (not spec.nopressure or args.nopressure_shared_prefix)


def agentic_timeout_s(args, spec: SystemSpec, remaining_s: float) -> float:
    """The agentic benchmark's client timeout: what the call has left, less the stop margin and, when
    ``spec`` runs the shared-prefix benchmark next, that benchmark's reserve (at least 30 s)."""
    reserve = SHARED_PREFIX_RESERVE_S if runs_shared_prefix(spec, args) else 0.0
    return max(30.0, min(args.agentic_timeout_s, remaining_s - reserve - STOP_MARGIN_S))


def cuda_graphs(spec: SystemSpec, args) -> str:
    """The CUDA-graph setting every system runs with (``--graphs``): ``default`` (SGLang's prefill
    + decode graphs; sglang-kvc keeps them) or ``decode-only``."""
    return args.graphs


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
    def from_working_set(cls, working_set_tokens: int, fraction: float, page_size: int, shape: dict,
                         tp: int = 1) -> "KVBudget":
        """``tp`` > 1: the budget of one tensor-parallel rank, which holds 1/tp of the KV heads
        (token counts are every rank's; bytes are one rank's, as each server log reports them)."""
        tokens = int(fraction * working_set_tokens) // page_size * page_size
        if tokens < page_size:
            raise ValueError(f"--budget-fraction {fraction} of {working_set_tokens} tokens holds no page")
        head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
        if shape["num_key_value_heads"] % tp:
            raise ValueError(f"--tp {tp} does not divide the model's {shape['num_key_value_heads']} KV heads")
        return cls(tokens, page_size, shape["num_hidden_layers"], shape["num_key_value_heads"] // tp, head_dim)


def server_flags(spec: SystemSpec, budget: KVBudget, args) -> List[str]:
    """The ``sglang.launch_server`` flags of ``spec`` at ``budget`` (its own: the no-pressure one for
    no-pressure systems); host and port are added by ``Server``."""
    flags = ["--model-path", args.model, "--page-size", str(budget.page_size), "--mem-fraction-static",
             str(args.mem_fraction_static), "--max-total-tokens", str(budget.max_total_tokens(spec)),
             "--enable-metrics", "--skip-server-warmup", "--random-seed", "0", "--log-level", "info"]
    if cuda_graphs(spec, args) == "decode-only":
        flags += ["--cuda-graph-backend-prefill", "disabled"]
    if args.tp > 1:
        flags += ["--tp", str(args.tp)]
    if spec.kind == "kvc":
        policy = ["--kvc-policy", args.kvc_policy] if args.kvc_policy else []
        options = [part for key, value in spec.options for part in (KVC_FLAGS[key], value)]
        return flags + ["--kv-compression", spec.ladder] + policy + options
    flags += ["--attention-backend", args.stock_attention_backend]
    if spec.kv_dtype == "fp8":
        flags += ["--kv-cache-dtype", "fp8_e4m3"]
    if spec.kind == "hicache":
        flags += ["--enable-hierarchical-cache", "--hicache-ratio", str(args.hicache_ratio)]
    return flags


def nopressure_trace_args(args) -> argparse.Namespace:
    """``args`` with the no-pressure trace's sessions and rounds (the main trace's unless given)."""
    return argparse.Namespace(**dict(vars(args), sessions=args.nopressure_sessions or args.sessions,
                                     rounds=args.nopressure_rounds or args.rounds))


def run_traces(args) -> Dict[bool, Trace]:
    """The agentic trace of each pressure setting, keyed by ``SystemSpec.nopressure``."""
    return {False: trace_from_args(args), True: trace_from_args(nopressure_trace_args(args))}


def run_budgets(args, traces: Dict[bool, Trace]) -> Dict[bool, KVBudget]:
    """The KV budget of each pressure setting, keyed by ``SystemSpec.nopressure``. Invariant: the
    no-pressure budget is ``--nopressure-fraction`` (>= 1) of the largest working set the no-pressure
    systems replay (the agentic trace's; the shared-prefix one's too with --nopressure-shared-prefix)."""
    shape = MODEL_SHAPES[args.model_size]
    pressure = KVBudget.from_working_set(traces[False].working_set_tokens(args.page_size), args.budget_fraction,
                                         args.page_size, shape, args.tp)
    working_set = traces[True].working_set_tokens(args.page_size)
    if args.nopressure_shared_prefix:
        working_set = max(working_set, gsp_working_set(args))
    nopressure = KVBudget.from_working_set(working_set, args.nopressure_fraction, args.page_size, shape, args.tp)
    return {False: pressure, True: nopressure}


def gsp_working_set(args) -> int:
    return shared_prefix.working_set_tokens(shared_prefix.gsp_settings(args), args.page_size, args.gsp_seed)


# ---- time ------------------------------------------------------------------------------------------
class TimePlanner:
    """Decides whether a system still fits in this call. Invariant: start-up estimates per kind and
    benchmark estimates per ``bench_key`` are ``--model-size``'s defaults until this run measures
    that key, then the largest measurement (a slow first kvc server does not change the stock
    estimates). ``shared_prefix(spec)`` says whether ``spec`` runs the shared-prefix benchmark."""

    def __init__(self, budget_s: float, graphs: str = "default", clock=time.monotonic, model_size: str = "1b",
                 shared_prefix=lambda spec: not spec.nopressure, profile: bool = False):
        self.clock, self.shared_prefix, self.profile_s = clock, shared_prefix, PROFILE_ESTIMATE_S if profile else 0.0
        self.deadline = clock() + budget_s
        size = ESTIMATES_OF[model_size]
        self.startup_s = dict(STARTUP_ESTIMATE_S[size])
        if graphs == "decode-only":
            for kind in ("stock", "hicache", "kvc"):
                self.startup_s[kind] -= PREFILL_GRAPH_CAPTURE_S[size]
        self.bench_s = dict(BENCH_ESTIMATE_S[size])
        self._measured: Dict[tuple, float] = {}

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def bench_key(self, spec: SystemSpec) -> str:
        return spec.kind + ("" if self.shared_prefix(spec) else "/agentic")

    def estimate(self, spec: SystemSpec) -> float:
        return self.startup_s[spec.kind] + self.bench_s[self.bench_key(spec)] + self.profile_s + STOP_MARGIN_S

    def fits(self, spec: SystemSpec) -> bool:
        return self.estimate(spec) <= self.remaining()

    def observe(self, spec: SystemSpec, startup_s: Optional[float], bench_s: Optional[float]) -> None:
        for name, table, key, value in (("startup", self.startup_s, spec.kind, startup_s),
                                        ("bench", self.bench_s, self.bench_key(spec), bench_s)):
            if value is not None:
                self._measured[name, key] = table[key] = max(value, self._measured.get((name, key), 0.0))


# ---- per-server steps --------------------------------------------------------------------------------
def last_tier_demoted(url: str) -> Optional[float]:
    """Tokens demoted into the last tier so far (``sglang:kvc_demoted_tokens_total`` of the tier that
    comes last on /metrics), None for a server without the kvc series."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
            metrics = parse_metrics(resp.read().decode())
    except (OSError, ValueError):
        return None
    demoted = [v for k, v in metrics.items() if k.startswith("sglang:kvc_demoted_tokens_total")]
    return demoted[-1] if demoted else None


def warm_up(url: str, vocab_size: int, total_tokens: int, prompt_len: int = 2048, concurrency: int = 4,
            reread: int = 4, seed: int = 987654321, max_waves: int = 6) -> dict:
    """Compile every kernel before the timed part: send waves of distinct prompts worth
    ``total_tokens`` each (8-token replies) until the cache has demoted into its last tier (one wave
    for stock), then re-send the first halves + 64 new tokens of ``reread`` prompts spread over the
    middle of what was sent (the oldest are dropped, the newest still in the write tier), so extends
    read prefixes from the lower tiers. Token ids come from their own seed: no overlap with the
    benchmarks. ``reread_cached_tokens`` shows whether the re-reads hit."""
    import random

    rng = random.Random(seed)
    per_wave = max(1, -(-total_tokens // prompt_len))
    params = {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True}
    started = time.perf_counter()
    prompts, results, waves = [], [], 0
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        while waves < max_waves:
            wave = [[fold_token(rng.randrange(1000, 1 << 30), vocab_size) for _ in range(prompt_len)]
                    for _ in range(per_wave)]
            prompts += wave
            results += list(pool.map(lambda p: stream_generate(url, p, params, timeout=300), wave))
            waves += 1
            demoted = last_tier_demoted(url)
            if not demoted:  # stock (no kvc series) stops after one wave; kvc once the last tier filled
                if demoted is None:
                    break
                continue
            break
        picks = [prompts[int(len(prompts) * (0.5 + 0.4 * i / max(1, reread - 1)))] for i in range(reread)]
        rereads = [p[: prompt_len // 2] + [fold_token(rng.randrange(1000, 1 << 30), vocab_size) for _ in range(64)]
                   for p in picks]
        reread_results = list(pool.map(lambda p: stream_generate(url, p, params, timeout=300), rereads))
    errors = [r.error for r in results + reread_results if r.error]
    return {"requests": len(results) + len(reread_results), "tokens": len(prompts) * prompt_len, "waves": waves,
            "errors": len(errors), "first_error": errors[0] if errors else None,
            "wall_s": round(time.perf_counter() - started, 1), "last_tier_demoted_tokens": last_tier_demoted(url),
            "reread_cached_tokens": [r.meta_info.get("cached_tokens") for r in reread_results]}


LOG_PATTERNS = {
    "max_total_num_tokens": re.compile(r"(?<!sglang-kvc: )max_total_num_tokens=(\d+)"),
    "kv_allocated": re.compile(r"KV Cache is allocated\. dtype: (\S+), #tokens: (\d+), K size: ([\d.]+) GB, "
                               r"V size: ([\d.]+) GB"),
    # patches/build.py: "sglang-kvc: max_total_num_tokens=<N> (stock <dtype> at this budget: <M>); arena: <F>
    # frames of <k> bf16 pages; <tier> <r> pages/frame (...), ...[; <pool> GB]"
    "kvc_arena": re.compile(r"sglang-kvc: max_total_num_tokens=(\d+) \(stock (\S+) at this budget: (\d+)\); "
                            r"arena: (\d+) frames of (\d+) bf16 pages; (.*)$"),
    "kvc_tier_pages": re.compile(r"([\w.-]+) (\d+) pages/frame"),
    "kvc_pool_gb": re.compile(r"; ([\d.]+) GB\s*$"),
    "kvc_summary": re.compile(r"(?<!sglang-)(kvc: .*)$"),
    "graph_capture": re.compile(r"Capture .*CUDA graph end\. elapsed=([\d.]+) s"),
    "kvc_precompile": re.compile(r"sglang-kvc: compiled \d+ kernels before serving .* in ([\d.]+) s"),
    "graph_batch": re.compile(r"(Prefill|Decode) batch.*cuda graph: (True|False)"),
}


def parse_kvc_arena(line_match: "re.Match", budget: KVBudget) -> dict:
    """The sglang-kvc start-up line as numbers. Invariant: ``kv_gb`` is the arena's bytes (frames x
    bf16 pages per frame x page_size x bf16 bytes/token), comparable with the budget's;
    ``kvc_pool_gb`` is what the pool reports (None when the line does not end in it)."""
    total, stock_dtype, stock_tokens, frames, frame_pages, tiers = line_match.groups()
    pool_gb = LOG_PATTERNS["kvc_pool_gb"].search(tiers)
    arena_bytes = int(frames) * int(frame_pages) * budget.page_size * budget.bytes_per_token("bf16")
    return {"kvc_max_total_num_tokens": int(total), "kvc_stock_dtype": stock_dtype,
            "kvc_stock_tokens": int(stock_tokens), "arena_frames": int(frames), "frame_bf16_pages": int(frame_pages),
            "tier_pages_per_frame": {t: int(r) for t, r in LOG_PATTERNS["kvc_tier_pages"].findall(tiers)},
            "kv_gb": round(arena_bytes / (1 << 30), 3), "kvc_pool_gb": pool_gb and float(pool_gb.group(1))}


def summarize_log(path: str, budget: KVBudget) -> dict:
    """What a server log says about its pool: ``admitted_tokens`` (SGLang's own max_total_num_tokens,
    what the scheduler admits against; sglang-kvc's line when SGLang's is missing), KV GB (checked
    against the budget), sglang-kvc's arena and last tier summary, CUDA graph capture time and how
    many batches ran on a graph, first errors."""
    try:
        with open(path, errors="replace") as handle:
            text = handle.read()
    except OSError as err:
        return {"error": repr(err)}
    lines = text.splitlines()
    totals = [int(x) for x in LOG_PATTERNS["max_total_num_tokens"].findall(text)]
    out: Dict[str, object] = {"max_total_num_tokens": totals}
    allocated = LOG_PATTERNS["kv_allocated"].search(text)
    if allocated:
        out["kv_dtype"] = allocated.group(1)
        out["kv_tokens"] = int(allocated.group(2))
        out["kv_gb"] = round(float(allocated.group(3)) + float(allocated.group(4)), 3)
    arena = next(filter(None, map(LOG_PATTERNS["kvc_arena"].search, lines)), None)
    if arena:
        out.update(parse_kvc_arena(arena, budget))
    admitted = totals[-1:] or ([out["kvc_max_total_num_tokens"]] if arena else [])
    out["admitted_tokens"] = admitted[0] if admitted else None
    summaries = [m.group(1) for m in map(LOG_PATTERNS["kvc_summary"].search, lines) if m]
    out["kvc_last_summary"] = summaries[-1] if summaries else None
    out["cuda_graph_capture_s"] = round(sum(float(x) for x in LOG_PATTERNS["graph_capture"].findall(text)), 1)
    precompiled = LOG_PATTERNS["kvc_precompile"].findall(text)
    out["kvc_precompile_s"] = round(sum(float(x) for x in precompiled), 1) if precompiled else None
    graph_batches = LOG_PATTERNS["graph_batch"].findall(text)
    out["cuda_graph_batches"] = {"on": sum(on == "True" for _, on in graph_batches),
                                 "off": sum(on == "False" for _, on in graph_batches),
                                 "decode_on": sum(kind == "Decode" and on == "True" for kind, on in graph_batches)}
    if "kv_gb" in out:
        expected = budget.budget_bytes / (1 << 30)
        out["budget_gb"] = round(expected, 3)
        out["budget_matches"] = abs(out["kv_gb"] - expected) <= max(0.02, 0.03 * expected)
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
    and the server being benchmarked (stopped on SIGTERM). ``budgets`` and ``traces`` are keyed by
    ``SystemSpec.nopressure`` (``run_budgets``, ``run_traces``)."""

    def __init__(self, args, budgets: Dict[bool, KVBudget], traces: Dict[bool, Trace], result: dict, json_path: str):
        self.args, self.budgets, self.traces, self.result, self.json_path = args, budgets, traces, result, json_path
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
        budget = self.budgets[spec.nopressure]
        log_dir = os.path.join(out, logs_dir_name(args.model_size, args.tp, args.label), spec.slug)
        os.makedirs(log_dir, exist_ok=True)
        log_path = os.path.join(log_dir, "server.log")
        flags = server_flags(spec, budget, args)
        record = {"name": spec.name, "kind": spec.kind, "kv_dtype": spec.kv_dtype, "ladder": spec.ladder,
                  "nopressure": spec.nopressure, "cuda_graphs": cuda_graphs(spec, args),
                  "flags": flags, "max_total_tokens": budget.max_total_tokens(spec),
                  "kv_budget_bytes": budget.max_total_tokens(spec) * budget.bytes_per_token(spec.kv_dtype),
                  "status": "running", "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "log": os.path.relpath(log_path, out), "call": len(self.result["calls"]) - 1,
                  "triton_cache_entries_at_start": triton_cache_entries(server_env(spec, args))}
        if spec.kind == "hicache":
            record["host_kv_bytes"] = int(args.hicache_ratio * record["kv_budget_bytes"])
        self.result["systems"][spec.name] = record
        self.save()
        self.server = server = Server(flags, port, log_path, env=server_env(spec, args), module=args.server_module)
        bench_started = None
        try:
            record["startup_s"] = round(server.start(timeout_s=min(420.0, max(60.0, planner.remaining()))), 1)
            print(f"[{spec.name}] healthy after {record['startup_s']} s", flush=True)
            bench_started = time.perf_counter()
            record["warmup"] = warm_up(server.url, args.vocab_size, args.warmup_tokens)
            print(f"[{spec.name}] warm-up {record['warmup']}", flush=True)
            record["agentic"] = self.run_agentic_step(server, spec, planner)
            self.save()
            if args.profile_steps:
                from benchmarks.step_profile import profile_server

                profile_started = time.perf_counter()
                record["profile"] = profile_server(server.url, os.path.join(log_dir, "profile"), args.vocab_size,
                                                   num_steps=args.profile_steps)
                record["profile_s"] = round(time.perf_counter() - profile_started, 1)
                print(f"[{spec.name}] profile: {record['profile'].get('groups_share') or record['profile']}",
                      flush=True)
                self.save()
            if not runs_shared_prefix(spec, args):
                record["shared_prefix"] = {"skipped": "--no-shared-prefix" if args.no_shared_prefix else
                                           "no-pressure systems run the agentic benchmark only "
                                           "(--nopressure-shared-prefix runs it too)"}
            elif planner.remaining() < SHARED_PREFIX_RESERVE_S:
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
            record["log_summary"] = summarize_log(log_path, budget)
            record["bench_s"] = (round(time.perf_counter() - bench_started - record.get("profile_s", 0.0), 1)
                                 if bench_started else None)  # the planner adds the profile's own estimate
            planner.observe(spec, record.get("startup_s"), record["bench_s"] if record["status"] == "done" else None)
            self.save()
        return record

    def run_agentic_step(self, server: Server, spec: SystemSpec, planner: TimePlanner) -> dict:
        args = self.args
        flush_cache(server.url)
        before = metrics_snapshot(server)
        timeout = agentic_timeout_s(args, spec, planner.remaining())
        trace = self.traces[spec.nopressure]
        started = time.perf_counter()
        records = run_agentic(server.url, session_plans(trace, args.vocab_size), args.time_scale, timeout,
                              progress=not args.no_progress, label=f"{spec.name} agentic")
        step = {"wall_s": round(time.perf_counter() - started, 1),
                "summary": summarize(records, trace.num_rounds, args.late_from), "requests": records,
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
    old, new = dict(RESUME_DEFAULTS, **previous.get("settings", {})), dict(RESUME_DEFAULTS, **settings)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in RESUME_SETTINGS
            if json.dumps(old.get(key), sort_keys=True) != json.dumps(new.get(key), sort_keys=True)]


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


def size_suffix(model_size: str, tp: int = 1, label: str = "") -> str:
    """File-name suffix of a model size and TP degree: none for 1b on one GPU (the names of the first
    runs), ``-<size>`` for other sizes, then ``-tp<N>`` for N > 1, then ``-<label>`` (``--label``)."""
    return (("" if model_size == "1b" else f"-{model_size}") + (f"-tp{tp}" if tp > 1 else "")
            + (f"-{label}" if label else ""))


def result_json_name(device: str, date: str, model_size: str, tp: int = 1, label: str = "") -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    return f"e2e-{slug}-{date}{size_suffix(model_size, tp, label)}.json"


def triton_cache_entries(env=None) -> int:
    """Compiled kernels in Triton's on-disk cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``): a
    server that starts with kernels already there (an earlier server of the same call compiled them, or an
    earlier call on the same machine) skips those compiles, so start-up and graph-capture times depend on
    the order the systems ran in."""
    env = os.environ if env is None else env
    root = env.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    try:
        return sum(1 for entry in os.scandir(root) if entry.is_dir())
    except OSError:
        return 0


def server_env(spec: SystemSpec, args) -> Dict[str, str]:
    """Environment a system's server gets on top of this process's: unbuffered output and, with
    ``--fresh-triton-cache``, a Triton cache directory of its own (empty at its start, so every system's
    start-up pays its own compiles and none depends on the order the systems ran in)."""
    env = {"PYTHONUNBUFFERED": "1"}
    if args.fresh_triton_cache:
        env["TRITON_CACHE_DIR"] = os.path.join(args.fresh_triton_cache, spec.slug)
    return env


def result_label(text: str) -> str:
    """``--label``: lower-case letters, digits and dashes (it goes into file names)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", text or "x"):
        raise argparse.ArgumentTypeError(f"--label {text!r}: use lower-case letters, digits and dashes")
    return text


def logs_dir_name(model_size: str, tp: int = 1, label: str = "") -> str:
    """Server and bench_serving logs of this size's systems go under ``--out``/<this>/<system slug>/."""
    return "e2e-logs" + size_suffix(model_size, tp, label)


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
                        help="in priority order: stock-bf16, stock-fp8, stock-hicache, kvc=<ladder>, each optionally "
                             "prefixed nopressure: (the no-pressure budget and trace)")
    parser.add_argument("--resume", default=None, help="an e2e JSON of an earlier call: run only what it lacks")
    parser.add_argument("--label", default="", type=result_label,
                        help="appended to the JSON's and the logs' names (e.g. 'saturated' for a --time-scale 0 run "
                             "beside the day's headline)")
    parser.add_argument("--rerun", nargs="*", default=[], help="with --resume: run these again even if done")
    parser.add_argument("--allow-device-mismatch", action="store_true", help="resume on another GPU model")
    parser.add_argument("--time-budget-s", type=float, default=535,
                        help="start no system whose estimate would end after this many seconds")
    parser.add_argument("--model", default=None,
                        help="where the random Llama is built (default /tmp/kvc-random-llama, + -<size> but for 1b)")
    parser.add_argument("--model-size", default="1b", choices=sorted(MODEL_SHAPES),
                        help="random Llama shape (benchmarks/serving.py MODEL_SHAPES); results of a size other "
                             "than 1b go to e2e-<device>-<date>-<size>.json and e2e-logs-<size>/")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel GPUs per server (--tp of every system; results go to "
                             "e2e-<device>-<date>[-<size>]-tp<N>.json, budgets are per rank)")
    parser.add_argument("--budget-fraction", type=float, default=0.25,
                        help="KV budget as a fraction of the agentic trace's bf16 working set")
    parser.add_argument("--nopressure-fraction", type=float, default=1.25,
                        help="no-pressure systems' KV budget as a fraction (>= 1) of their working set")
    parser.add_argument("--nopressure-sessions", type=int, default=None,
                        help="no-pressure agentic trace's sessions (default: --sessions)")
    parser.add_argument("--nopressure-rounds", type=int, default=None,
                        help="no-pressure agentic trace's rounds (default: --rounds)")
    parser.add_argument("--no-shared-prefix", action="store_true",
                        help="run the agentic benchmark only, for every system (fits the 8b headline pair in a call)")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="after each system's agentic benchmark, profile this many forward steps under one "
                             "burst of requests (torch profiler; benchmarks/step_profile.py) and record GPU kernel "
                             "time by group (summary gpu_time_by_group); 0: off")
    parser.add_argument("--nopressure-shared-prefix", action="store_true",
                        help="no-pressure systems run the shared-prefix benchmark too (default: agentic only)")
    parser.add_argument("--mem-fraction-static", type=float, default=0.80)
    parser.add_argument("--stock-attention-backend", default="triton", choices=["triton", "flashinfer"],
                        help="stock systems' attention backend (the kit has no fa3)")
    parser.add_argument("--graphs", default="default", choices=["default", "decode-only"],
                        help="CUDA graphs of every system: SGLang's defaults (prefill + decode) or decode only")
    parser.add_argument("--hicache-ratio", type=float, default=4.0, help="host pool / device pool (HiCache)")
    parser.add_argument("--kvc-policy", default=None, help="--kvc-policy for kvc systems (default: the plugin's)")
    parser.add_argument("--warmup-tokens", type=int, default=None, help="default: 2x the bf16 budget tokens")
    parser.add_argument("--agentic-timeout-s", type=float, default=300)
    parser.add_argument("--shared-prefix-timeout-s", type=float, default=180)
    parser.add_argument("--shared-prefix-engine", default="auto", choices=["auto", "bench_serving", "builtin"],
                        help="auto: bench_serving when it imports, else the builtin client")
    parser.add_argument("--port", type=int, default=31000, help="first server's port (+1 per system)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--fresh-triton-cache", default=None, metavar="DIR",
                        help="give each system's server an empty Triton cache under DIR (fair start-up times; "
                             "default: the shared on-disk cache, so later servers reuse earlier compiles)")
    parser.add_argument("--server-module", default="sglang.launch_server",
                        help="module run as the server (tests use a fake SGLang server on the CPU)")
    add_trace_args(parser)
    shared_prefix.add_gsp_args(parser)
    args = parser.parse_args(argv)
    args.vocab_size = MODEL_SHAPES[args.model_size]["vocab_size"]
    args.model = args.model or "/tmp/kvc-random-llama" + size_suffix(args.model_size)
    if args.nopressure_fraction < 1.0:
        parser.error("--nopressure-fraction must be >= 1 (the budget holds the working set)")
    for name in args.systems + args.rerun:
        SystemSpec.parse(name)
    return args


def budget_settings(budget: KVBudget, working_set: int) -> dict:
    return {"bf16_tokens": budget.bf16_tokens, "budget_bytes": budget.budget_bytes,
            "bf16_bytes_per_token": budget.bytes_per_token("bf16"), "fp8_tokens": budget.tokens_for("fp8"),
            "agentic_working_set_tokens": working_set}


def run_settings(args, budgets: Dict[bool, KVBudget], traces: Dict[bool, Trace]) -> dict:
    """What the JSON records of this run's settings (RESUME_SETTINGS of them must match on --resume)."""
    budget = budget_settings(budgets[False], traces[False].working_set_tokens(args.page_size))
    budget["shared_prefix_working_set_tokens"] = gsp_working_set(args)
    nopressure_budget = budget_settings(budgets[True], traces[True].working_set_tokens(args.page_size))
    return {"model": args.model, "model_size": args.model_size, "tp": args.tp,
            "model_shape": MODEL_SHAPES[args.model_size],
            "page_size": args.page_size, "budget_fraction": args.budget_fraction,
            "mem_fraction_static": args.mem_fraction_static,
            "stock_attention_backend": args.stock_attention_backend, "graphs": args.graphs,
            "hicache_ratio": args.hicache_ratio, "kvc_policy": args.kvc_policy, "warmup_tokens": args.warmup_tokens,
            "trace": dict(traces[False].params), "time_scale": args.time_scale, "late_from": args.late_from,
            "gsp": shared_prefix.gsp_settings(args), "gsp_request_rate": str(args.gsp_request_rate),
            "gsp_max_concurrency": args.gsp_max_concurrency, "gsp_seed": args.gsp_seed, "budget": budget,
            "nopressure": {"fraction": args.nopressure_fraction, "trace": dict(traces[True].params),
                           "shared_prefix": args.nopressure_shared_prefix, "budget": nopressure_budget}}


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    planner = TimePlanner(args.time_budget_s, args.graphs, model_size=args.model_size,
                          shared_prefix=lambda spec: runs_shared_prefix(spec, args), profile=args.profile_steps > 0)
    os.makedirs(args.out, exist_ok=True)
    traces = run_traces(args)
    budgets = run_budgets(args, traces)
    budget = budgets[False]
    args.warmup_tokens = args.warmup_tokens or 2 * budget.bf16_tokens
    settings = run_settings(args, budgets, traces)
    device = device_name()
    command = "python " + " ".join([os.path.relpath(os.path.abspath(__file__), ROOT)] + list(argv or sys.argv[1:]))
    call = {"command": command, "started": datetime.datetime.now().isoformat(timespec="seconds"), "device": device,
            "shared_prefix": "off (--no-shared-prefix)" if args.no_shared_prefix else "on", "host": host_probe()}
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
        json_path = os.path.join(args.out, result_json_name(device, date, args.model_size, args.tp, args.label))
        result = {"device": device, "date": date, "versions": versions(), "command": command,
                  "settings": settings, "requested": list(args.systems), "systems": {}, "calls": []}
        todo = list(args.systems)
    result["command"] = command
    result["versions"] = versions()
    result["calls"].append(call)
    run = Run(args, budgets, traces, result, json_path)

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
          f"({args.budget_fraction:g} of the agentic working set {traces[False].working_set_tokens(args.page_size)}); "
          f"no-pressure: {budgets[True].bf16_tokens} bf16 tokens; systems to run: {todo}", flush=True)
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
    shown = SUMMARY_KEYS + ("best_kvc_system", "nopressure_cuda_graphs", "missing", "notes")
    print(json.dumps({key: result["summary"].get(key) for key in shown}, indent=1))
    print(f"pending: {result['pending']}" if result["pending"] else "all requested systems done")
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
