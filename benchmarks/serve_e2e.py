"""End-to-end check of the plugin on the GPU machine: real ``sglang.launch_server`` with
``--kv-compression``, a multi-turn client, memory pressure, /metrics, clean shutdown.

Systems, in one process, one after another on the same GPU and model:
  stock-triton      stock SGLang (triton attention, bf16 KV)
  stock-flashinfer  stock SGLang (FlashInfer attention): the reference noise between two correct kernels
  kvc-bf16          sglang-kvc with a bf16-only ladder
  kvc               sglang-kvc with a real ladder under a small KV budget: demotions must happen

On each fresh server, before the multi-turn client, ``benchmarks/parity.py``'s teacher-forced
prompts collect input-token log-probabilities (fresh prefill and a cached shared prefix read
back). The check on the bf16 ladder is parity's: its max |delta logprob| against stock-triton at
most 1.5x stock-flashinfer's, and its top-1 agreement with stock-triton at least stock-flashinfer's.
(Exact greedy equality is not a sound check: two correct kernels differ in rounding, and one flipped
argmax changes the whole rest of a greedy output.)

    python benchmarks/serve_e2e.py --out benchmarks/results [--model-size 1b] [--systems stock-triton,kvc-bf16,kvc]

Writes ``serve_e2e-<device>-<date>[-tp<N>].json`` and one server log per system into --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import parity  # noqa: E402
from benchmarks.serving import Server, device_name, flush_cache, make_random_llama, multi_turn, versions  # noqa: E402

KVC_LINE = re.compile(r"kvc: (.*)$")
# the plugin's line after /flush_cache, on every tensor-parallel rank (SGLang prefixes " TP<rank>")
FLUSH_LINE = re.compile(r"\[([^\]]*)\] sglang-kvc: flushed;.* demoted (\d+), dropped (\d+) tokens so far")
TP_RANK = re.compile(r" TP(\d+)")


def system_flags(name: str, args) -> list:
    common = ["--model-path", args.model, "--skip-tokenizer-init", "--skip-server-warmup", "--page-size",
              str(args.page_size), "--mem-fraction-static", "0.80", "--max-total-tokens", str(args.max_total_tokens),
              "--enable-metrics", "--decode-log-interval", "20", "--log-level", "info"]
    if args.tp > 1:  # every rank holds its share of the KV heads; the log lines are rank 0's
        common += ["--tp", str(args.tp)]
    if name in ("stock-triton", "stock-flashinfer"):
        # CUDA graphs off as for sglang-kvc: this run compares outputs, not speed
        return common + ["--attention-backend", name.split("-")[1], "--disable-cuda-graph"]
    if name == "kvc-bf16":
        return common + ["--kv-compression", "bf16"]
    if name == "kvc":
        return common + ["--kv-compression", args.ladder]
    raise ValueError(name)


def summarize_log(path: str) -> dict:
    text = open(path).read()
    kvc_lines = [m.group(1) for m in (KVC_LINE.search(line) for line in text.splitlines()) if m]
    max_total = re.findall(r"max_total_num_tokens=(\d+)", text)
    demoted_by_rank = {}
    for prefix, demoted, _ in FLUSH_LINE.findall(text):
        rank = TP_RANK.search(prefix)
        demoted_by_rank[int(rank.group(1)) if rank else 0] = int(demoted)
    return {"kvc_log_lines": len(kvc_lines), "last_kvc_line": kvc_lines[-1] if kvc_lines else None,
            "demoted_tokens_by_rank": demoted_by_rank,
            "max_total_num_tokens": [int(x) for x in max_total],
            "errors": [line for line in text.splitlines() if "Traceback" in line or "Error" in line][:10]}


def run_system(name: str, args, out_dir: str) -> dict:
    log_path = os.path.join(out_dir, f"server-{name}.log")
    server = Server(system_flags(name, args), args.port, log_path)
    record = {"flags": system_flags(name, args)}
    try:
        record["startup_s"] = round(server.start(), 1)
        print(f"[{name}] healthy after {record['startup_s']} s", flush=True)
        record["parity"] = parity.collect(server.url, parity_prompts(args), args.page_size,
                                          lambda msg: print(f"[{name}] parity:{msg}", flush=True))
        start = time.perf_counter()
        requests = multi_turn(server, args.sessions, args.rounds, args.system_tokens, args.turn_tokens,
                              args.output_tokens, seed=args.seed,
                              progress=lambda r, res: print(f"[{name}] round {r}/{args.rounds} done, cached tokens "
                                                            f"{sum(x['cached_tokens'] or 0 for x in res)}", flush=True))
        record["client_s"] = round(time.perf_counter() - start, 2)
        record["requests"] = requests
        flush_cache(server.url)  # every rank logs its books (demoted and dropped so far)
        metrics = server.get_text("/metrics")
        record["metrics_kvc"] = [line for line in metrics.splitlines() if line.startswith("sglang:kvc_")]
        record["metrics_cache_hit_rate"] = [line for line in metrics.splitlines()
                                            if line.startswith("sglang:cache_hit_rate")]
    except Exception as err:  # keep what we have; the log says the rest
        record["error"] = repr(err)
        print(f"[{name}] FAILED: {err!r}", flush=True)
    finally:
        record["exit_code"] = server.stop()
        record["log"] = summarize_log(log_path)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--model", default="/tmp/kvc-random-llama")
    parser.add_argument("--model-size", default="1b", choices=["1b", "tiny"])
    parser.add_argument("--systems", default="stock-triton,stock-flashinfer,kvc-bf16,kvc")
    parser.add_argument("--ladder", default="bf16,k8v8,k4v2")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs per server (--tp)")
    parser.add_argument("--max-total-tokens", type=int, default=24000,
                        help="caps the KV budget (stock tokens at bf16) so the cache is under pressure")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=1024)
    parser.add_argument("--turn-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=31000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    make_random_llama(args.model, args.model_size)
    print(f"model ready in {time.time() - t0:.1f} s", flush=True)
    device = device_name()
    date = datetime.date.today().isoformat()
    result = {"device": device, "date": date, "versions": versions(),
              "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "systems": {}}
    tp = f"-tp{args.tp}" if args.tp > 1 else ""
    path = os.path.join(args.out, f"serve_e2e-{device.replace(' ', '_')}-{date}{tp}.json")
    for name in args.systems.split(","):
        result["systems"][name] = run_system(name, args, args.out)
        json.dump(result, open(path, "w"), indent=1)
    result["checks"] = checks(result["systems"], args.tp)
    json.dump(result, open(path, "w"), indent=1)
    print(json.dumps(result["checks"], indent=1))
    return 0 if all(v in (True, None) for k, v in result["checks"].items() if k != "parity") else 1


def parity_prompts(args):
    """Two 1024-token shared prefixes with two 128-token suffixes each, and two standalone prompts."""
    return parity.make_prompts(32000, args.seed, 2, 1024, 2, 128, [300, 1500])


def checks(systems: dict, tp: int = 1) -> dict:
    out = {}
    if "stock-triton" in systems and "kvc-bf16" in systems:
        summary = parity.summarize({name: rec["parity"] for name, rec in systems.items() if "parity" in rec})
        out.update(summary.get("checks", {}))
        out["parity"] = {k: v for k, v in summary.items() if k != "checks"}
    kvc = systems.get("kvc")
    if kvc is not None:
        out["kvc_served_all"] = "error" not in kvc and len(kvc.get("requests", [])) > 0
        demoted = [line for line in kvc.get("metrics_kvc", []) if line.startswith("sglang:kvc_demoted_tokens_total")]
        out["kvc_demotions_in_metrics"] = any(float(line.rsplit(" ", 1)[1]) > 0 for line in demoted)
        out["kvc_metrics_show_tiers"] = any('tier="' in line for line in kvc.get("metrics_kvc", []))
        out["kvc_log_summary_lines"] = kvc["log"]["kvc_log_lines"] > 0
        out["kvc_clean_exit"] = kvc.get("exit_code") is not None
        by_rank = kvc["log"].get("demoted_tokens_by_rank", {})
        out["kvc_demotions_every_rank"] = (len(by_rank) == tp and all(v > 0 for v in by_rank.values())
                                           and len(set(by_rank.values())) == 1)  # and the ranks agree
    return out


if __name__ == "__main__":
    sys.exit(main())
