"""Which part of the served decode costs the time: the served batch (``extend_bench.served_plan``:
one pool of every tier of a ladder, each sequence's oldest pages in the last tier) timed per layer
over a grid of ladders x launch configurations x batch sizes, beside stock SGLang's Triton decode
over bf16 and fp8_e4m3 pools of the same shape. Ladders that differ in one feature (per-channel
keys ``-kc``, rotated keys ``-rot``, the number of tiers) isolate that feature's cost.

Shape: the agentic benchmark's 1b random Llama (32 query / 8 KV heads, head_dim 64, page 16).
Writes ``decode-matrix-<device>-<date>.json`` under ``--out``: ``rows`` (one per ladder, config,
batch: ``ms``, ``stock_fp8_over_ours``) and ``stock`` (per batch). GPU only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import benchmarks.kernels as kernel_bench  # noqa: E402
from benchmarks.extend_bench import median_ms, served_plan, stock_decode_ms  # noqa: E402
from benchmarks.serving import versions  # noqa: E402
from sglang_kvc.kernels.decode import MULTI_TIER_CONFIG, SINGLE_TIER_CONFIG, served_variant  # noqa: E402

LADDERS = ["k8v8,k4v4-kc", "k8v8,k4v4-kc-rot,k4v2-g32-kc-rot", "k8v8,k4v4,k4v2-g32", "k8v8,k4v4-rot,k4v2-g32-rot",
           "k8v8,k4v4-kc,k4v2-g32-kc", "k4v2-g32-kc-rot", "k4v2-g32", "k8v8"]
CONFIGS = {"server": {}, "single": SINGLE_TIER_CONFIG, "multi": MULTI_TIER_CONFIG,
           "w1-bn64": dict(SINGLE_TIER_CONFIG, block_n=64, maxnreg=None),
           "w2-bn32": dict(MULTI_TIER_CONFIG, block_n=32)}


def run(args) -> dict:
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    kernel_bench.HKV, kernel_bench.D, kernel_bench.PAGE = hkv, d, 16
    gen = torch.Generator().manual_seed(0)
    stock, rows, inputs = {}, [], {}
    for batch in args.batches:  # (queries, kv_indptr) of every batch size, shared by all timings
        inputs[batch] = (torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16),
                         torch.arange(0, batch * args.context + 1, args.context, device="cuda", dtype=torch.int32))
        stock[batch] = stock_decode_ms(*inputs[batch], hkv)
        print(f"stock B={batch} x {args.context}: {stock[batch]}", flush=True)
    for ladder in args.ladders:
        for config_name in args.configs:
            for batch in args.batches:
                q, kv_indptr = inputs[batch]
                row = {"ladder": ladder, "config": config_name, "batch": batch, "context": args.context}
                try:
                    pool, wrapper = served_plan(ladder, hq, batch, args.context, kv_indptr, gen, args.variant,
                                                **CONFIGS[config_name])
                    row["ms"] = round(median_ms(lambda: wrapper.run(q, pool, 0)), 4)
                    row["stock_fp8_over_ours"] = round(stock[batch]["fp8"] / row["ms"], 3)
                    del pool, wrapper
                except Exception as err:  # one cell must not cost the grid
                    row["error"] = repr(err)[:300]
                print(json.dumps(row), flush=True)
                rows.append(row)
    return {"rows": rows, "stock": {str(b): v for b, v in stock.items()},
            "shape": {"q_heads": hq, "kv_heads": hkv, "head_dim": d, "page_size": 16, "context": args.context},
            "variant": args.variant, "configs": {k: CONFIGS[k] for k in args.configs}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--ladders", nargs="*", default=LADDERS)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS),
                        help="launch configurations ('server': what the server picks for the ladder)")
    parser.add_argument("--batches", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--context", type=int, default=6144)
    parser.add_argument("--variant", default=None,
                        help="decode kernel variant (default: the server's at --head-dim, "
                             "kernels.decode.served_variant)")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--suffix", default="", help="appended to the file name, e.g. '-hd128'")
    args = parser.parse_args(argv)
    args.variant = args.variant or served_variant(args.head_dim)
    result = run(args)
    device = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    result.update(device=device, date=date, versions=versions(), command="python " + " ".join(sys.argv))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"decode-matrix-{device.lower().replace(' ', '-')}-{date}{args.suffix}.json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
