"""Extend (prefill over a cached prefix) and per-step planning costs of kvc_triton against stock
SGLang's Triton extend kernel, on the GPU (issue #11, item 4 and "where the time goes").

Shapes of the agentic benchmark's late rounds on the 1b random Llama (32 query / 8 KV heads,
head_dim 64, page 16): B sequences of ``--new`` extend tokens over ``--prefix`` cached tokens.
Per tier (the whole prefix in that tier), per layer:
  ours          TieredExtendWrapper.run (dequantizes the packed prefix once, then the stock kernel)
  stock         sglang.kernels.ops.attention.extend_attention.extend_attention_fwd over a bf16 pool
  ratio         stock / ours (>= 0.9 is the target: ours within 10% of stock)
Host wall time per layer call (``*_host_ms``, the device drained first; above the GPU time, the
layer is bound by the host): our extend ``run`` against the stock kernel's launch, and our
quantize-on-write (``pool.set_kv_buffer`` of the batch's new tokens, ``ours_write_ms`` its GPU time).
Planning, once per batch: our extend and decode plans (tier sort on the device) and SGLang's
ragged kv indices, host wall time per call (what the scheduler thread pays each step).
Decode at the agentic benchmark's shape (``--decode-batches`` x ``--prefix`` tokens of context, per
layer): ours per tier against stock SGLang's Triton decode kernel over bf16 and fp8_e4m3 pools
(``decode`` rows; ``stock_*_over_ours``: above 1, ours is faster), so the E2E's TPOT gap can be
split into attention and the rest.
Writes ``extend-<device>-<date>.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from types import SimpleNamespace

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.kernels import own_pages, random_pool  # noqa: E402
from benchmarks.serving import versions  # noqa: E402
from sglang_kvc.kernels.decode import TieredDecodeWrapper, served_variant  # noqa: E402
from sglang_kvc.kernels.extend import TieredExtendWrapper  # noqa: E402
from sglang_kvc.kernels.spec import KernelSupportError  # noqa: E402
from sglang_kvc.patches.attention_backend import ragged_kv_indices  # noqa: E402
from sglang_kvc.tiers import LADDER_PRESETS  # noqa: E402
import benchmarks.kernels as kernel_bench  # noqa: E402

TIERS = ["bf16", "k8v8", "k4v4", "k4v2", "k2v2"]
SERVED_SHARES = [0.1, 0.3, 0.6]  # of a served sequence's pages by tier: write tier (newest) .. last (oldest)


def median_ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def host_ms(fn, repeat: int = 30) -> float:
    """Host wall milliseconds per call, the device drained before and after."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    host = (time.perf_counter() - start) * 1e3 / repeat
    torch.cuda.synchronize()
    return host


def prefix_indices(pool, tier: int, batch: int, prefix: int, gen) -> torch.Tensor:
    pages = own_pages(pool, tier)
    need = batch * prefix // pool.page_size
    picked = pages[torch.randperm(len(pages), generator=gen)[:need]].to("cuda")
    return pool.pages_to_slots(picked)


def run(args) -> dict:
    hq, hkv, d, page = args.q_heads, args.kv_heads, args.head_dim, 16
    kernel_bench.HKV, kernel_bench.D, kernel_bench.PAGE = hkv, d, page
    batch, new, prefix = args.batch, args.new, args.prefix
    gen = torch.Generator().manual_seed(0)
    n = batch * new
    q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16)
    qo_indptr = torch.arange(0, n + 1, new, device="cuda", dtype=torch.int32)
    kv_indptr = torch.arange(0, batch * prefix + 1, prefix, device="cuda", dtype=torch.int32)
    rows = []
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    for tier_name in TIERS:
        pool = random_pool(tier_name, batch * prefix + 4 * page)
        slots = prefix_indices(pool, 0, batch, prefix, gen)
        indices = torch.cat([slots, slots.new_zeros(1)])
        wrapper = TieredExtendWrapper(pool, hq)
        wrapper.plan(qo_indptr, kv_indptr, indices, max_len_extend=new, prefix_total=batch * prefix)
        ours = median_ms(lambda: wrapper.run(q, k, v, pool, 0))
        row = {"tier": tier_name, "ours_ms": round(ours, 4),
               "ours_run_host_ms": round(host_ms(lambda: wrapper.run(q, k, v, pool, 0)), 4)}
        layer, loc = SimpleNamespace(layer_id=0), slots.repeat(-(-n // slots.numel()))[:n]
        row["ours_write_ms"] = round(median_ms(lambda: pool.set_kv_buffer(layer, loc, k, v)), 4)
        row["ours_write_host_ms"] = round(host_ms(lambda: pool.set_kv_buffer(layer, loc, k, v)), 4)
        if tier_name == "bf16":
            k_buf = torch.randn(batch * prefix + 1, hkv, d, device="cuda", dtype=torch.bfloat16)
            v_buf = torch.randn_like(k_buf)
            stock_idx = torch.arange(batch * prefix, device="cuda", dtype=torch.int64)
            out = torch.empty(n, hq, d, device="cuda", dtype=torch.bfloat16)
            stock = median_ms(lambda: extend_attention_fwd(
                q, k, v, out, k_buf, v_buf, qo_indptr, kv_indptr, stock_idx, None, True, None, new, 1.0, 1.0,
                sm_scale=d ** -0.5))
            stock_ms = round(stock, 4)
            stock_host_ms = round(host_ms(lambda: extend_attention_fwd(
                q, k, v, out, k_buf, v_buf, qo_indptr, kv_indptr, stock_idx, None, True, None, new, 1.0, 1.0,
                sm_scale=d ** -0.5)), 4)
        rows.append(row)
        row["plan_extend_host_ms"] = round(host_ms(lambda: wrapper.plan(qo_indptr, kv_indptr, indices,
                                                                         max_len_extend=new,
                                                                         prefix_total=batch * prefix)), 4)
        decode = TieredDecodeWrapper(pool, hq)
        decode.reserve(max(8, batch), batch * (prefix + new) + 1)
        row["plan_decode_host_ms"] = round(host_ms(lambda: decode.plan(kv_indptr, indices, num_seqs=batch)), 4)
        rows_of = slots.view(batch, prefix).to(torch.int32)
        req_idx = torch.arange(batch, device="cuda")
        lens = torch.full((batch,), prefix, device="cuda")
        row["plan_requests_host_ms"] = round(host_ms(lambda: decode.plan_requests(rows_of, req_idx, lens,
                                                                                  batch * prefix, batch)), 4)
        print(f"{tier_name}: ours {ours:.3f} ms, plans: extend {row['plan_extend_host_ms']:.3f} ms, "
              f"decode {row['plan_decode_host_ms']:.3f} ms, from request rows {row['plan_requests_host_ms']:.3f} ms "
              f"(host)", flush=True)
        del pool
    for row in rows:
        row["stock_bf16_ms"] = stock_ms
        row["stock_run_host_ms"] = stock_host_ms
        row["stock_over_ours"] = round(stock_ms / row["ours_ms"], 3)
    req_to_token = torch.arange(batch * (prefix + new), device="cuda", dtype=torch.int32).view(batch, -1)
    lens = torch.full((batch,), prefix, device="cuda", dtype=torch.int64)
    ragged = host_ms(lambda: ragged_kv_indices(req_to_token, torch.arange(batch, device="cuda"), lens,
                                               batch * prefix))
    decode_rows = decode_times(args, gen)
    return {"decode": decode_rows,
            "shape": {"batch": batch, "new": new, "prefix": prefix, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
                      "page_size": page},
            "rows": rows, "ragged_kv_indices_host_ms": round(ragged, 4), "stock_bf16_ms": stock_ms,
            "summary": {"extend_stock_over_ours_min": min(r["stock_over_ours"] for r in rows),
                        "extend_stock_over_ours_by_tier": {r["tier"]: r["stock_over_ours"] for r in rows}}}


def stock_decode_ms(q, kv_indptr, kv_heads: int, splits: int = 8) -> dict:
    """Per layer ms of stock SGLang's Triton decode (``splits`` KV splits, as its backend) for queries
    q ``[B, Hq, D]`` over ``kv_indptr``'s sequences, by pool dtype: ``{"bf16": ms, "fp8": ms}``."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    batch, hq, d = q.shape
    tokens = int(kv_indptr[-1])
    out_ms = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        k_buf = torch.randn(tokens + 1, kv_heads, d, device="cuda").to(dtype)
        v_buf = torch.randn(tokens + 1, kv_heads, d, device="cuda").to(dtype)
        indices = torch.randperm(tokens, device="cuda").to(torch.int64)
        out = torch.empty(batch, hq, d, device="cuda", dtype=torch.bfloat16)
        logits = torch.empty(batch, hq, splits, d, device="cuda", dtype=torch.float32)
        lse = torch.empty(batch, hq, splits, device="cuda", dtype=torch.float32)
        num_splits = torch.full((batch,), splits, device="cuda", dtype=torch.int32)
        out_ms[name] = round(median_ms(lambda: decode_attention_fwd(
            q, k_buf, v_buf, out, kv_indptr, indices, logits, lse, num_splits, splits, d ** -0.5, 1.0, 1.0)), 4)
    return out_ms


def decode_times(args, gen) -> list:
    """Per layer decode ms: ours per tier, stock Triton over bf16 and fp8 pools, same B x context."""
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    rows = []
    for batch in args.decode_batches:
        ctx = args.prefix
        q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
        kv_indptr = torch.arange(0, batch * ctx + 1, ctx, device="cuda", dtype=torch.int32)
        row = {"batch": batch, "context": ctx}
        for dtype_name, ms in stock_decode_ms(q, kv_indptr, hkv).items():
            row[f"stock_{dtype_name}_ms"] = ms
        for tier_name in TIERS:
            pool = random_pool(tier_name, batch * ctx + 4 * 16)
            slots = prefix_indices(pool, 0, batch, ctx, gen)
            for variant in args.decode_variants:
                name = tier_name if variant == "default" else f"{tier_name}_{variant}"
                wrapper = TieredDecodeWrapper(pool, hq, variant=None if variant == "default" else variant)
                wrapper.plan(kv_indptr, torch.cat([slots, slots.new_zeros(1)]), num_seqs=batch)
                ours = median_ms(lambda: wrapper.run(q, pool, 0))
                row[f"ours_{name}_ms"] = round(ours, 4)
                row[f"stock_bf16_over_ours_{name}"] = round(row["stock_bf16_ms"] / ours, 3)
                row[f"stock_fp8_over_ours_{name}"] = round(row["stock_fp8_ms"] / ours, 3)
            del pool
        for variant in (args.served_variants if args.served_ladder else []):
            variant = variant or served_variant(args.head_dim)
            name = "served" if variant == served_variant(args.head_dim) else f"served_{variant}"
            try:
                ours = served_decode_ms(args, batch, ctx, q, kv_indptr, gen, variant)
            except KernelSupportError as exc:
                row[f"ours_{name}_error"] = str(exc)
                continue
            row[f"ours_{name}_ms"] = round(ours, 4)
            row[f"stock_bf16_over_ours_{name}"] = round(row["stock_bf16_ms"] / ours, 3)
            row[f"stock_fp8_over_ours_{name}"] = round(row["stock_fp8_ms"] / ours, 3)
        print(f"decode B={batch} x {ctx}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k.endswith("_ms")),
              flush=True)
        rows.append(row)
    return rows


def served_plan(ladder: str, q_heads: int, batch: int, ctx: int, kv_indptr, gen, variant=None, **config):
    """(pool, planned wrapper) of a decode batch as the server reads ``ladder``: one pool holding
    every tier, each sequence's oldest pages in the last tier, then each tier up (SERVED_SHARES;
    the newest in the write tier), in kernel ``variant`` (the server's by default) with the server's
    launch configuration, or ``config`` (``TieredDecodeWrapper`` knobs) where given."""
    pool = random_pool(ladder, batch * ctx + 4 * 16)
    variant = variant or served_variant(pool.head_dim)
    tiers = pool.layout.num_tiers
    shares = SERVED_SHARES if tiers == len(SERVED_SHARES) else [1.0] * tiers
    pages_per_seq = ctx // pool.page_size
    counts = [int(pages_per_seq * share / sum(shares)) for share in shares]
    counts[0] += pages_per_seq - sum(counts)
    owned = []
    for t in range(tiers):
        pages = own_pages(pool, t)
        owned.append(pages[torch.randperm(len(pages), generator=gen)])
    taken, pages = [0] * tiers, []
    for _ in range(batch):
        for t in reversed(range(tiers)):  # oldest first: the last tier, then up to the write tier
            pages.append(owned[t][taken[t]: taken[t] + counts[t]])
            taken[t] += counts[t]
    slots = pool.pages_to_slots(torch.cat(pages).to(pool.device))
    wrapper = TieredDecodeWrapper(pool, q_heads, variant=None if variant == "default" else variant, **config)
    wrapper.plan(kv_indptr, torch.cat([slots, slots.new_zeros(1)]), num_seqs=batch)
    return pool, wrapper


def served_decode_ms(args, batch: int, ctx: int, q, kv_indptr, gen, variant=None) -> float:
    """Per layer decode ms of ``served_plan`` for ``--served-ladder`` in kernel ``variant``."""
    pool, wrapper = served_plan(args.served_ladder, args.q_heads, batch, ctx, kv_indptr, gen, variant)
    return median_ms(lambda: wrapper.run(q, pool, 0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new", type=int, default=640)
    parser.add_argument("--prefix", type=int, default=6144)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--decode-batches", type=int, nargs="*", default=[1, 4, 8, 32],
                        help="decode batch sizes (context: --prefix); none to skip the decode rows")
    parser.add_argument("--served-ladder", default=LADDER_PRESETS["fp8-quality"],
                        help="decode rows 'ours_served': this ladder in one pool, as the server reads it "
                             "(its kernel variant and config); '' to skip")
    parser.add_argument("--served-variants", nargs="*", default=[None],
                        help="kernel variants timed on --served-ladder (rows 'ours_served' for the server's, "
                             "'ours_served_<variant>' for the others; a variant that cannot read the ladder "
                             "records its error)")
    parser.add_argument("--decode-variants", nargs="*", default=["default", "f16"],
                        help="decode kernel variants timed per tier (default: the bf16-operand kernel; the "
                             "server runs kernels.decode.served_variant(head_dim))")
    args = parser.parse_args(argv)
    result = run(args)
    device = torch.cuda.get_device_name().lower().replace(" ", "-")
    date = datetime.date.today().isoformat()
    result.update(device=torch.cuda.get_device_name(), date=date, versions=versions(),
                  command="python " + " ".join(sys.argv))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"extend-{device}-{date}.json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
