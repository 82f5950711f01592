"""Teacher-forced parity of server systems (issue #12): the same fixed prompts go to each system's
``/generate`` with ``return_logprob`` and ``top_logprobs_num=1``, and every system's input-token
log-probabilities and top-1 tokens are compared with stock SGLang's (triton attention).

Two phases per system, on one fresh server:

* ``fresh``: every prompt with ``logprob_start_len=0`` (SGLang then matches no cached prefix:
  the whole prompt is prefilled; chunked prefill reads earlier chunks back from the pool);
* ``cached``: the prompts that share a long prefix, sent again with ``logprob_start_len`` = the
  prefix length (page-aligned): the prefix, cached by the fresh phase, is read back from the cache
  (at the tier it is stored at) and the suffix's log-probabilities are computed over it.

Systems (``--systems``, comma-separated; a ladder's own commas stay with its ``kvc=``):

    stock-triton           stock SGLang, triton attention (the baseline every system is compared with)
    stock-flashinfer       stock SGLang, FlashInfer attention: the reference noise (two correct kernels)
    kvc-bf16               sglang-kvc with the bf16-only ladder
    kvc=LADDER@TIER        sglang-kvc serving LADDER with every cached prefix stored at TIER
                           (``--kvc-write-tier TIER``: the tiers above it are dropped, so every
                           prefix is written, and read back, at TIER)
    kvc=LADDER             sglang-kvc serving LADDER as configured (prefixes stay at the write tier
                           unless memory pressure demotes them)

``kvc-ladders=L1;L2`` expands to ``kvc=L@T`` for each tier T of each ladder that can be a write tier
(``-kc`` tiers cannot: they are skipped and listed), duplicates removed.

Summary (``summary`` in the JSON): per system ``max_abs_dlogprob``, ``mean_abs_dlogprob`` and
``top1_agreement`` against stock-triton over every compared token; the reference's figures
(stock-flashinfer); ``bf16_ladder_max_dlogprob_over_reference`` (kvc-bf16's max over the
reference's) and ``bf16_ladder_top1_agreement``, and the checks: the ratio <= 1.5 and kvc-bf16's
top-1 agreement >= the reference's.

    python benchmarks/parity.py --out benchmarks/results                       # launches each system
    python benchmarks/parity.py --connect stock-triton=http://127.0.0.1:30000,kvc-bf16=http://...  # running servers

Writes ``parity-<device>-<date>.json`` into --out (with --connect: ``parity-connect-<date>.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import time
import urllib.error
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.serving import post_json  # noqa: E402

BASELINE = "stock-triton"
REFERENCE = "stock-flashinfer"
BF16_LADDER = "kvc-bf16"
MAX_RATIO = 1.5
DEFAULT_LADDERS = "bf16,k8v8,k4v2;k8v8,k4v4,k2v2"
DEFAULT_SYSTEMS = f"{BASELINE},{REFERENCE},{BF16_LADDER},kvc-ladders"


# ---- prompts ---------------------------------------------------------------------------------------
def make_prompts(vocab: int, seed: int, shared_prefixes: int, prefix_tokens: int, suffixes: int,
                 suffix_tokens: int, standalone: Sequence[int]) -> List[Dict]:
    """Fixed token-id prompts: ``shared_prefixes`` prefixes of ``prefix_tokens`` tokens, each
    followed by ``suffixes`` suffixes of ``suffix_tokens`` tokens (these carry ``prefix_len``), and
    standalone prompts of the given lengths. Ids avoid 0..9 (special tokens)."""
    rng = random.Random(seed)

    def ids(n: int) -> List[int]:
        return [rng.randrange(10, vocab) for _ in range(n)]

    prompts = []
    for p in range(shared_prefixes):
        prefix = ids(prefix_tokens)
        for s in range(suffixes):
            prompts.append({"name": f"prefix{p}-suffix{s}", "input_ids": prefix + ids(suffix_tokens),
                            "prefix_len": prefix_tokens})
    for i, n in enumerate(standalone):
        prompts.append({"name": f"standalone{i}-{n}", "input_ids": ids(n), "prefix_len": 0})
    return prompts


# ---- one system ------------------------------------------------------------------------------------
def teacher_forced(url: str, input_ids: List[int], logprob_start_len: int) -> Dict:
    """One /generate request (one new token, greedy) -> {"logprobs": [...], "top1": [...],
    "cached_tokens"}: the input tokens' log-probabilities and the top-1 token at each of those
    positions, positions without a log-probability (the first token) left out, in prompt order."""
    reply = post_json(url + "/generate", {
        "input_ids": input_ids, "return_logprob": True, "logprob_start_len": logprob_start_len,
        "top_logprobs_num": 1, "sampling_params": {"temperature": 0, "max_new_tokens": 1}})
    meta = reply.get("meta_info", {})
    entries = meta.get("input_token_logprobs") or []
    tops = meta.get("input_top_logprobs") or [None] * len(entries)
    if len(tops) != len(entries):
        raise ValueError(f"{len(entries)} input_token_logprobs but {len(tops)} input_top_logprobs")
    logprobs, top1 = [], []
    for entry, top in zip(entries, tops):
        if entry is None or entry[0] is None:
            continue
        logprobs.append(float(entry[0]))
        top1.append(int(top[0][1]) if top else None)
    return {"logprobs": logprobs, "top1": top1, "cached_tokens": meta.get("cached_tokens")}


def collect(url: str, prompts: Sequence[Dict], page_size: int, log=print) -> Dict[str, List[Dict]]:
    """Both phases on one server -> {"fresh": [per prompt], "cached": [per prompt with a prefix]}."""
    out = {"fresh": [], "cached": []}
    for prompt in prompts:
        out["fresh"].append({"name": prompt["name"], **teacher_forced(url, prompt["input_ids"], 0)})
    for prompt in prompts:
        if prompt["prefix_len"] <= 0:
            continue
        start = prompt["prefix_len"] // page_size * page_size
        record = teacher_forced(url, prompt["input_ids"], start)
        out["cached"].append({"name": prompt["name"], "logprob_start_len": start, **record})
    hits = [r["cached_tokens"] for r in out["cached"] if r["cached_tokens"] is not None]
    log(f"  {len(out['fresh'])} fresh + {len(out['cached'])} cached-prefix requests; cached tokens in the "
        f"cached phase: {sum(hits)} of {sum(r['logprob_start_len'] for r in out['cached'])} asked")
    return out


def without_token_lists(record: Dict) -> Dict:
    """A system's record as saved: per prompt its compared-token count instead of the lists."""
    out = dict(record)
    for phase in ("fresh", "cached"):
        if phase in out:
            out[phase] = [{k: v for k, v in r.items() if k not in ("logprobs", "top1")} | {"tokens": len(r["logprobs"])}
                          for r in out[phase]]
    return out


# ---- comparison ------------------------------------------------------------------------------------
def compare(system: Dict[str, List[Dict]], baseline: Dict[str, List[Dict]]) -> Dict:
    """Token-wise |delta logprob| and top-1 agreement of ``system`` against ``baseline``, per phase
    and over both. Each prompt's lists are aligned from their ends (the last input token is last in
    both) and compared over the common length."""
    phases = {}
    all_d, all_agree = [], []
    for phase in ("fresh", "cached"):
        base_by_name = {r["name"]: r for r in baseline.get(phase, [])}
        deltas, agree = [], []
        for rec in system.get(phase, []):
            base = base_by_name.get(rec["name"])
            if base is None:
                continue
            n = min(len(rec["logprobs"]), len(base["logprobs"]))
            if n == 0:
                continue
            deltas += [abs(a - b) for a, b in zip(rec["logprobs"][-n:], base["logprobs"][-n:])]
            agree += [a == b for a, b in zip(rec["top1"][-n:], base["top1"][-n:]) if a is not None and b is not None]
        phases[phase] = _stats(deltas, agree)
        all_d += deltas
        all_agree += agree
    return {**_stats(all_d, all_agree), "by_phase": phases}


def _stats(deltas: List[float], agree: List[bool]) -> Dict:
    return {"tokens": len(deltas), "max_abs_dlogprob": max(deltas) if deltas else None,
            "mean_abs_dlogprob": sum(deltas) / len(deltas) if deltas else None,
            "top1_agreement": sum(agree) / len(agree) if agree else None}


def summarize(records: Dict[str, Dict]) -> Dict:
    """records: system -> collect() output (or {"error": ...}). -> the JSON's summary."""
    ok = {name: r for name, r in records.items() if "fresh" in r}
    summary: Dict = {"baseline": BASELINE, "reference": f"{REFERENCE} vs {BASELINE}", "systems": {},
                     "failed_systems": sorted(set(records) - set(ok))}
    if BASELINE not in ok:
        summary["note"] = f"{BASELINE} did not run: nothing to compare with"
        return summary
    for name, rec in ok.items():
        if name != BASELINE:
            summary["systems"][name] = compare(rec, ok[BASELINE])
    ref = summary["systems"].get(REFERENCE)
    bf16 = summary["systems"].get(BF16_LADDER)
    summary["reference_max_dlogprob"] = ref["max_abs_dlogprob"] if ref else None
    summary["reference_mean_dlogprob"] = ref["mean_abs_dlogprob"] if ref else None
    summary["reference_top1_agreement"] = ref["top1_agreement"] if ref else None
    summary["bf16_ladder_max_dlogprob"] = bf16["max_abs_dlogprob"] if bf16 else None
    summary["bf16_ladder_mean_dlogprob"] = bf16["mean_abs_dlogprob"] if bf16 else None
    summary["bf16_ladder_top1_agreement"] = bf16["top1_agreement"] if bf16 else None
    ratio = None
    if ref and bf16 and ref["max_abs_dlogprob"] is not None and bf16["max_abs_dlogprob"] is not None:
        if ref["max_abs_dlogprob"] > 0:
            ratio = bf16["max_abs_dlogprob"] / ref["max_abs_dlogprob"]
        elif bf16["max_abs_dlogprob"] == 0:
            ratio = 0.0  # both bit-identical to the baseline
        else:
            summary["note"] = f"{REFERENCE} is bit-identical to {BASELINE}: the ratio is undefined"
    summary["bf16_ladder_max_dlogprob_over_reference"] = ratio
    checks = {f"bf16_ladder_max_dlogprob_over_reference <= {MAX_RATIO}": None if ratio is None else ratio <= MAX_RATIO}
    ref_top1, bf16_top1 = summary["reference_top1_agreement"], summary["bf16_ladder_top1_agreement"]
    checks["bf16_ladder_top1_agreement >= reference_top1_agreement"] = (
        None if ref_top1 is None or bf16_top1 is None else bf16_top1 >= ref_top1)
    summary["checks"] = checks
    return summary


# ---- systems and servers ---------------------------------------------------------------------------
def expand_systems(text: str, ladders: str) -> Tuple[List[str], List[str]]:
    """``--systems`` -> (system names in order, notes on skipped tiers)."""
    from sglang_kvc.tiers import parse_ladder

    names, notes, items = [], [], []
    for piece in [s.strip() for s in text.split(",") if s.strip()]:
        if items and items[-1].startswith("kvc=") and not piece.startswith(("stock-", "kvc-", "kvc=")):
            items[-1] += "," + piece  # a ladder's own commas: kvc=bf16,k8v8,k4v2@k4v2
        else:
            items.append(piece)
    for item in items:
        if item != "kvc-ladders":
            names.append(item)
            continue
        for ladder in [x for x in ladders.split(";") if x.strip()]:
            tiers = parse_ladder(ladder)
            for tier in tiers:
                if tier.key_grouping == "channel":
                    notes.append(f"{ladder}: {tier.name} cannot be a write tier (keys grouped over a page); "
                                 "the CPU quality benchmark covers it through demotion")
                    continue
                if not tier.is_quantized:
                    continue  # a bf16 write tier is kvc-bf16
                names.append(f"kvc={','.join(t.name for t in tiers)}@{tier.name}")
    seen, unique = set(), []
    for name in names:
        key = name.split("@")[-1] if name.startswith("kvc=") and "@" in name else name
        if key not in seen:  # every cached prefix at one tier: the same storage whatever ladder names it
            seen.add(key)
            unique.append(name)
    return unique, notes


def system_flags(name: str, model: str, page_size: int, max_total_tokens: int) -> List[str]:
    common = ["--model-path", model, "--skip-tokenizer-init", "--skip-server-warmup", "--page-size", str(page_size),
              "--mem-fraction-static", "0.80", "--max-total-tokens", str(max_total_tokens), "--random-seed", "0",
              "--log-level", "info"]
    if name == BASELINE:
        return common + ["--attention-backend", "triton", "--disable-cuda-graph"]
    if name == REFERENCE:
        return common + ["--attention-backend", "flashinfer", "--disable-cuda-graph"]
    if name == BF16_LADDER:
        return common + ["--kv-compression", "bf16"]
    if name.startswith("kvc="):
        ladder, _, tier = name[len("kvc="):].partition("@")
        return common + ["--kv-compression", ladder] + (["--kvc-write-tier", tier] if tier else [])
    raise ValueError(f"unknown system {name!r}: use {BASELINE}, {REFERENCE}, {BF16_LADDER}, kvc=LADDER[@TIER] "
                     "or kvc-ladders")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def run_system(name: str, args, prompts, log) -> Dict:
    """Start the system's server, collect both phases, stop it. Failures are recorded, not raised."""
    from benchmarks.serving import Server

    log_path = os.path.join(args.logs or args.out, f"parity-server-{slug(name)}.log")
    flags = system_flags(name, args.model, args.page_size, args.max_total_tokens)
    server = Server(flags, args.port, log_path)
    record: Dict = {"flags": flags}
    try:
        record["startup_s"] = round(server.start(), 1)
        log(f"[{name}] healthy after {record['startup_s']} s")
        t0 = time.time()
        record.update(collect(server.url, prompts, args.page_size, log))
        record["client_s"] = round(time.time() - t0, 1)
    except Exception as err:  # keep the other systems going; the log says the rest
        record["error"] = repr(err)[:500]
        log(f"[{name}] FAILED: {err!r}")
    finally:
        record["exit_code"] = server.stop()
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--logs", default=None, help="folder of the server logs (default: --out)")
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS)
    parser.add_argument("--ladders", default=DEFAULT_LADDERS, help="';'-separated, for kvc-ladders")
    parser.add_argument("--connect", default=None,
                        help="name=URL,...: compare servers that are already running instead of launching")
    parser.add_argument("--model", default="/tmp/kvc-random-llama")
    parser.add_argument("--model-size", default="1b", choices=["1b", "tiny"])
    parser.add_argument("--vocab", type=int, default=32000, help="prompt ids are drawn below this")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-total-tokens", type=int, default=65536,
                        help="KV budget: holds every prompt, so the cached phase finds its prefixes")
    parser.add_argument("--shared-prefixes", type=int, default=2)
    parser.add_argument("--prefix-tokens", type=int, default=2048)
    parser.add_argument("--suffixes", type=int, default=3)
    parser.add_argument("--suffix-tokens", type=int, default=256)
    parser.add_argument("--standalone", default="200,1000,3000", help="lengths of prompts without a shared prefix")
    parser.add_argument("--port", type=int, default=31100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=0,
                        help="seconds; a system is skipped when the longest one so far would not end within "
                             "them (0: no limit)")
    args = parser.parse_args(argv)
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {msg}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    from benchmarks.serving import device_name, make_random_llama, versions

    prompts = make_prompts(args.vocab, args.seed, args.shared_prefixes, args.prefix_tokens, args.suffixes,
                           args.suffix_tokens, [int(x) for x in args.standalone.split(",") if x.strip()])
    date = datetime.date.today().isoformat()
    records: Dict[str, Dict] = {}
    notes: List[str] = []
    if args.connect:
        targets = dict(item.split("=", 1) for item in args.connect.split(",") if item.strip())
        device = "connected servers"
        path = os.path.join(args.out, f"parity-connect-{date}.json")
        for name, url in targets.items():
            log(f"[{name}] {url}")
            try:
                records[name] = collect(url.rstrip("/"), prompts, args.page_size, log)
            except (urllib.error.URLError, OSError, ValueError, KeyError) as err:
                records[name] = {"error": repr(err)[:500]}
                log(f"[{name}] FAILED: {err!r}")
    else:
        make_random_llama(args.model, args.model_size)
        device = device_name()
        path = os.path.join(args.out, f"parity-{device.replace(' ', '_')}-{date}.json")
        names, notes = expand_systems(args.systems, args.ladders)
        log(f"systems: {', '.join(names)}")
        longest = 0.0
        for name in names:
            if args.time_budget and time.time() - started + longest > args.time_budget:
                records[name] = {"error": f"skipped: time budget {args.time_budget:.0f} s"}
                log(f"[{name}] skipped: {time.time() - started:.0f} s spent, a system takes up to {longest:.0f} s")
                continue
            t0 = time.time()
            records[name] = run_system(name, args, prompts, log)
            longest = max(longest, time.time() - t0)
    summary = summarize(records)
    result = {"summary": summary, "device": device, "date": date, "versions": versions(),
              "command": "python " + " ".join([os.path.relpath(__file__)] + list(argv if argv is not None
                                                                                   else sys.argv[1:])),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "notes": notes,
              "prompts": [{"name": p["name"], "tokens": len(p["input_ids"]), "prefix_len": p["prefix_len"]}
                          for p in prompts],
              "systems": {name: without_token_lists(rec) for name, rec in records.items()},
              "wall_s": round(time.time() - started, 1)}
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    log(f"wrote {path}")
    for name, row in summary["systems"].items():
        log(f"{name}: max |dlogprob| {row['max_abs_dlogprob']}, mean {row['mean_abs_dlogprob']}, "
            f"top-1 agreement {row['top1_agreement']} over {row['tokens']} tokens")
    for check, met in summary.get("checks", {}).items():
        log(f"check {check}: {met}")
    return 0 if all(v in (True, None) for v in summary.get("checks", {}).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
