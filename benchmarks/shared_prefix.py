"""Shared-prefix benchmark (issue #6): SGLang's own bench_serving, ``generated-shared-prefix`` dataset.

``python -m sglang.bench_serving --backend sglang --dataset-name generated-shared-prefix`` sends
``groups x prompts_per_group`` prompts, each ``system prompt of its group + "\\n\\n" + question``,
shuffled (fcfs on the server), at ``--request-rate`` (default all at once) under
``--max-concurrency``; outputs are ``--output-len`` tokens (ignore_eos). The defaults put the cache
under pressure: 64 groups x 2048 system tokens = 131k reusable tokens, more than stock fp8 holds
at the e2e budget (~99k tokens) and less than the sglang-kvc ladders hold (184k-280k tokens).

bench_serving sends text, so the server must load a tokenizer (no ``--skip-tokenizer-init``) and
bench_serving needs ``--tokenizer``: ``benchmarks/serving.py make_tokenizer`` saves a word-level
tokenizer beside the random Llama whose decode/encode round trip is exact, so a prompt built from
N random tokens is N tokens on the server. bench_serving caches the generated prompts under
``~/.cache/sglang/benchmark``: every system of one run gets the same prompts.

bench_serving imports HF ``datasets`` at start-up (for datasets not used here); when it is
missing, a stub module on the subprocess's PYTHONPATH stands in (``SHIMMED_MODULES``).

``--engine builtin`` runs the same workload (``benchmarks/traces.py shared_prefix_trace``) with
this repository's token-id streaming client instead: no tokenizer, no bench_serving dependencies
(aiohttp, requests); e2e.py falls back to it when bench_serving cannot be imported.

    python benchmarks/shared_prefix.py --url http://127.0.0.1:31000 --model /tmp/kvc-random-llama --out /tmp/sp.json

On the GPU machine ``benchmarks/e2e.py`` (``bash benchmarks/gpu_e2e.sh``) runs it for each server;
by hand there, against a server started with ``--model-path /tmp/kvc-random-llama`` (no
``--skip-tokenizer-init``): ``PYTHONPATH=/tmp/site python3 benchmarks/shared_prefix.py --url
http://127.0.0.1:31000 --model /tmp/kvc-random-llama --work-dir $OUT/sp --out $OUT/sp.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.serving import flush_cache, stream_generate  # noqa: E402
from benchmarks.traces import shared_prefix_trace  # noqa: E402

GSP_DEFAULTS = dict(groups=64, prompts_per_group=4, system_len=2048, question_len=128, output_len=128)
BENCH_MODULE = "sglang.bench_serving"
METRIC_KEYS = ("duration", "completed", "total_input_tokens", "total_output_tokens", "request_throughput",
               "input_throughput", "output_throughput", "total_throughput", "mean_e2e_latency_ms",
               "median_e2e_latency_ms", "p90_e2e_latency_ms", "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms",
               "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p90_tpot_ms", "mean_itl_ms", "median_itl_ms",
               "concurrency", "max_concurrent_requests")


def working_set_tokens(settings: Dict[str, int], page_size: int, seed: int = 0) -> int:
    """KV slots a never-evicting cache needs for the workload (as the cache simulator counts them)."""
    trace = shared_prefix_trace(settings["groups"], settings["prompts_per_group"], settings["system_len"],
                                settings["question_len"], settings["output_len"], seed=seed)
    return trace.working_set_tokens(page_size)


# ---- bench_serving ---------------------------------------------------------------------------------
def bench_serving_command(url: str, model: str, tokenizer: str, settings: Dict[str, int], output_file: str,
                          request_rate: float = math.inf, max_concurrency: Optional[int] = 32, seed: int = 0,
                          python: str = sys.executable, module: str = BENCH_MODULE) -> List[str]:
    """The bench_serving command line (SGLang 0.5.16 flags). ``--flush-cache`` empties the radix
    cache after bench_serving's one warm-up request; ``--cache-report`` collects cached tokens."""
    command = [python, "-m", module, "--backend", "sglang", "--base-url", url, "--model", model,
               "--tokenizer", tokenizer, "--dataset-name", "generated-shared-prefix",
               "--gsp-num-groups", str(settings["groups"]),
               "--gsp-prompts-per-group", str(settings["prompts_per_group"]),
               "--gsp-system-prompt-len", str(settings["system_len"]),
               "--gsp-question-len", str(settings["question_len"]),
               "--gsp-output-len", str(settings["output_len"]),
               "--num-prompts", str(settings["groups"] * settings["prompts_per_group"]),
               "--request-rate", "inf" if math.isinf(request_rate) else str(request_rate),
               "--seed", str(seed), "--output-file", output_file, "--cache-report", "--flush-cache",
               "--warmup-requests", "1", "--ready-check-timeout-sec", "30", "--disable-tqdm"]
    if max_concurrency:
        command += ["--max-concurrency", str(max_concurrency)]
    return command


def extract_metrics(result: dict) -> dict:
    """The metrics this project reports from one bench_serving result (its JSONL line)."""
    metrics = {key: result.get(key) for key in METRIC_KEYS}
    report = result.get("cache_report") or {}
    metrics["cached_tokens"] = report.get("total_cached_tokens")
    metrics["hit_ratio"] = None if report.get("cache_hit_rate_pct") is None else report["cache_hit_rate_pct"] / 100
    return metrics


def parse_output_file(path: str) -> dict:
    """The last JSON line of bench_serving's ``--output-file`` (it appends one line per run)."""
    with open(path) as handle:
        lines = [line for line in handle.read().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no result line")
    return json.loads(lines[-1])


# bench_serving (0.5.16) imports these at start-up for datasets this benchmark never loads
# (``sglang/benchmark/datasets/mmmu.py``: ``from datasets import load_dataset``); neither the CPU
# venv nor the GPU kit has HF ``datasets``. A stub that fails only when called stands in for it.
SHIMMED_MODULES = {"datasets": "def load_dataset(*args, **kwargs):\n"
                               "    raise ImportError('HF datasets is not installed (sglang-kvc shim)')\n"}


def bench_serving_env(work_dir: str, python: str = sys.executable) -> Dict[str, str]:
    """Environment additions for the bench_serving subprocess: PYTHONPATH gains a folder of stubs
    for the SHIMMED_MODULES that ``python`` cannot import (none when all import)."""
    missing = [name for name in SHIMMED_MODULES
               if subprocess.run([python, "-c", f"import {name}"], capture_output=True, timeout=120).returncode]
    if not missing:
        return {}
    shim_dir = os.path.join(work_dir, "shims")
    for name in missing:
        os.makedirs(os.path.join(shim_dir, name), exist_ok=True)
        with open(os.path.join(shim_dir, name, "__init__.py"), "w") as handle:
            handle.write(SHIMMED_MODULES[name])
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": shim_dir + (os.pathsep + path if path else ""), "KVC_SHIMMED_MODULES": ",".join(missing)}


def bench_serving_available(work_dir: str, python: str = sys.executable, module: str = BENCH_MODULE) -> Optional[str]:
    """None when ``module`` imports in ``python`` (with the stubs of ``bench_serving_env``);
    else the error's last line."""
    env = dict(os.environ, **bench_serving_env(work_dir, python))
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=300, env=env)
    if probe.returncode == 0:
        return None
    return (probe.stderr.strip().splitlines() or ["import failed"])[-1]


def run_bench_serving(url: str, model: str, tokenizer: str, settings: Dict[str, int], work_dir: str,
                      request_rate: float = math.inf, max_concurrency: Optional[int] = 32, seed: int = 0,
                      timeout_s: float = 600, label: str = "shared-prefix", env: Optional[dict] = None) -> dict:
    """Run bench_serving once; its whole output goes to ``<work_dir>/<label>-bench_serving.log``.
    Returns ``{"engine", "command", "log", "returncode", "metrics", "wall_s"}`` (+ ``error``).
    ``env`` defaults to ``bench_serving_env(work_dir)``."""
    os.makedirs(work_dir, exist_ok=True)
    env = bench_serving_env(work_dir) if env is None else env
    output_file = os.path.join(work_dir, f"{label}-bench_serving.jsonl")
    log_path = os.path.join(work_dir, f"{label}-bench_serving.log")
    if os.path.exists(output_file):
        os.remove(output_file)
    command = bench_serving_command(url, model, tokenizer, settings, output_file, request_rate, max_concurrency, seed)
    record = {"engine": "bench_serving", "command": command, "log": log_path,
              "shimmed_modules": env.get("KVC_SHIMMED_MODULES", "")}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        try:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  env=dict(os.environ, **env))
            record["returncode"] = done.returncode
        except subprocess.TimeoutExpired:
            record["returncode"] = None
            record["error"] = f"bench_serving ran past {timeout_s:.0f} s"
    record["wall_s"] = round(time.perf_counter() - started, 2)
    try:
        result = parse_output_file(output_file)
        record["metrics"] = extract_metrics(result)
        errors = [e for e in (result.get("errors") or []) if e]
        if errors:
            record["request_errors"] = errors[:5]
    except (OSError, ValueError) as err:
        record.setdefault("error", f"no bench_serving result ({err}); see {log_path}")
    return record


# ---- the same workload with our own client ------------------------------------------------------------
def run_builtin(url: str, settings: Dict[str, int], vocab_size: int, max_concurrency: Optional[int] = 32,
                seed: int = 0, timeout_s: float = 600, progress: bool = True, label: str = "shared-prefix") -> dict:
    """The generated-shared-prefix workload in token ids, all requests queued at once, at most
    ``max_concurrency`` in flight; metrics under bench_serving's names."""
    from tqdm import tqdm

    from benchmarks.agentic_multiturn import fold_token, percentile

    trace = shared_prefix_trace(settings["groups"], settings["prompts_per_group"], settings["system_len"],
                                settings["question_len"], settings["output_len"], seed=seed)
    prompts = [([fold_token(t, vocab_size) for t in r.prompt], len(r.output)) for r in trace.requests]
    flush_cache(url)
    started = time.perf_counter()
    deadline = started + timeout_s
    bar = tqdm(total=len(prompts), desc=label, unit="req", disable=not progress,
               mininterval=1.0 if sys.stderr.isatty() else 10.0)

    def send(item):
        prompt, output_len = item
        if time.perf_counter() > deadline:
            return None
        result = stream_generate(url, prompt, {"temperature": 0.0, "max_new_tokens": output_len, "ignore_eos": True},
                                 timeout=max(1.0, deadline - time.perf_counter()))
        bar.update(1)
        return result, len(prompt)

    with ThreadPoolExecutor(max_workers=max_concurrency or len(prompts)) as pool:
        results = [r for r in pool.map(send, prompts) if r is not None]
    bar.close()
    ok = [(r, n) for r, n in results if not r.error]
    duration = (max(r.finished_at for r, _ in ok) - started) if ok else None
    ttft = [r.ttft_s * 1000 for r, _ in ok]
    tpot = [r.tpot_s * 1000 for r, _ in ok if r.tpot_s is not None]
    e2e = [r.latency_s * 1000 for r, _ in ok]
    inputs = sum(n for _, n in ok)
    outputs = sum(len(r.output_ids) for r, _ in ok)
    cached = sum(r.meta_info.get("cached_tokens") or 0 for r, _ in ok)
    metrics = dict.fromkeys(METRIC_KEYS)
    metrics.update(duration=duration, completed=len(ok), total_input_tokens=inputs, total_output_tokens=outputs,
                   request_throughput=len(ok) / duration if duration else None,
                   input_throughput=inputs / duration if duration else None,
                   output_throughput=outputs / duration if duration else None,
                   total_throughput=(inputs + outputs) / duration if duration else None,
                   mean_e2e_latency_ms=sum(e2e) / len(e2e) if e2e else None, median_e2e_latency_ms=percentile(e2e, 50),
                   p90_e2e_latency_ms=percentile(e2e, 90), mean_ttft_ms=sum(ttft) / len(ttft) if ttft else None,
                   median_ttft_ms=percentile(ttft, 50), p90_ttft_ms=percentile(ttft, 90),
                   p99_ttft_ms=percentile(ttft, 99), mean_tpot_ms=sum(tpot) / len(tpot) if tpot else None,
                   median_tpot_ms=percentile(tpot, 50), p90_tpot_ms=percentile(tpot, 90), cached_tokens=cached,
                   hit_ratio=cached / inputs if inputs else None)
    record = {"engine": "builtin", "metrics": metrics, "wall_s": round(time.perf_counter() - started, 2),
              "requests_failed": len(results) - len(ok), "requests_not_sent": len(prompts) - len(results)}
    errors = [r.error for r, _ in results if r.error]
    if errors:
        record["request_errors"] = errors[:5]
    if not ok:
        record["error"] = "no request succeeded"
    return record


def add_gsp_args(parser: argparse.ArgumentParser) -> None:
    """The workload's parameters (shared with e2e.py)."""
    d = GSP_DEFAULTS
    group = parser.add_argument_group("generated-shared-prefix workload")
    group.add_argument("--gsp-groups", type=int, default=d["groups"], help="system prompts")
    group.add_argument("--gsp-prompts-per-group", type=int, default=d["prompts_per_group"])
    group.add_argument("--gsp-system-len", type=int, default=d["system_len"])
    group.add_argument("--gsp-question-len", type=int, default=d["question_len"])
    group.add_argument("--gsp-output-len", type=int, default=d["output_len"])
    group.add_argument("--gsp-request-rate", type=float, default=math.inf, help="requests/s (inf: all at once)")
    group.add_argument("--gsp-max-concurrency", type=int, default=32, help="requests in flight (0: no limit)")
    group.add_argument("--gsp-seed", type=int, default=0)


def gsp_settings(args) -> Dict[str, int]:
    return dict(groups=args.gsp_groups, prompts_per_group=args.gsp_prompts_per_group, system_len=args.gsp_system_len,
                question_len=args.gsp_question_len, output_len=args.gsp_output_len)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:31000", help="SGLang server base URL")
    parser.add_argument("--model", default="/tmp/kvc-random-llama", help="model path (as the server was given)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path for bench_serving (default: --model)")
    parser.add_argument("--engine", choices=["bench_serving", "builtin"], default="bench_serving")
    parser.add_argument("--vocab-size", type=int, default=32000, help="builtin engine: the model's vocabulary")
    parser.add_argument("--work-dir", default="/tmp/kvc-shared-prefix", help="bench_serving's JSONL and log")
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--out", default=None, help="write the record to this JSON file")
    add_gsp_args(parser)
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    settings = gsp_settings(args)
    concurrency = args.gsp_max_concurrency or None
    if args.engine == "bench_serving":
        record = run_bench_serving(url, args.model, args.tokenizer or args.model, settings, args.work_dir,
                                   args.gsp_request_rate, concurrency, args.gsp_seed, args.timeout_s)
    else:
        record = run_builtin(url, settings, args.vocab_size, concurrency, args.gsp_seed, args.timeout_s)
    record["settings"] = settings
    print(json.dumps(record.get("metrics"), indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=1)
    if record.get("error"):
        print(f"error: {record['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
