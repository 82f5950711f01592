"""GPU benchmark of the tiered-KV kernels (not a unit test).

In one process: device-to-device copy bandwidth; our decode attention for each tier and for a
batch mixing tiers; FlashInfer's BatchDecodeWithPagedKVCacheWrapper with bf16 and fp8_e4m3 KV
(tensor-core and CUDA-core variants, the faster one is the baseline); SGLang's Triton decode
kernel (bf16); all at B=64, context 4096, 32 query / 8 KV heads, head_dim 128, page 16, then
sweeps over context and batch; requantize throughput for each step down the ladder.
Times are medians of ``triton.testing.do_bench``. Writes ``kernels-<device>-<date>.json``
(top-level ``summary``) and ``kernels-<device>-<date>.png`` (time vs context) to ``--out``.

  PYTHONUNBUFFERED=1 python benchmarks/kernels.py --out benchmarks/results [--quick]

``--shape-sweep`` (issue 13) adds the summary's four ratios over a grid of shapes: head_dim 64 and
128 x GQA group 1/4/8 (8 KV heads) x page 1 and 16 x (batch 1, context 32768) and (64, 4096), at the
default launch configuration, against FlashInfer's tensor-core decode only. Every kernel of the
grid compiles first, in parallel processes; the JSON gets ``sweep`` (one row per shape, written
after each row) and the plot ``kernels-<device>-<date>-sweep.png``. In one GPU call (10 minutes):

  PYTHONUNBUFFERED=1 python benchmarks/kernels.py --quick --no-tune --shape-sweep --out benchmarks/results
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sglang_kvc.kernels.decode import VARIANTS, TieredDecodeWrapper, served_variant  # noqa: E402
from sglang_kvc.kernels.decode_ref import decode_reference  # noqa: E402
from sglang_kvc.kernels.ops import TritonKVOps  # noqa: E402
from sglang_kvc.kernels.requantize import (REQUANT_CONFIGS, SWEEP_CONFIGS, RequantConfig,  # noqa: E402
                                            requant_config, requantize_bytes, requantize_pages, step_key)
from sglang_kvc.kernels.spec import side_tensors  # noqa: E402
from sglang_kvc.kernels.testing import interleaved_layout, tier_frames, tier_page_ids  # noqa: E402
from sglang_kvc.layout import KVShape  # noqa: E402
from sglang_kvc.pool import TieredKVPool  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
MAIN_B, MAIN_CTX = 64, 4096
DEVICE = "cuda"
TIERS = ["bf16", "k8v8", "k4v4", "k4v2", "k2v2"]
VARIANT_TIERS = ["k8v8", "k4v4", "k4v2"]  # opt-in decode variants get a row each on these, at the tier's config
# the summary ratio each tier's variant rows are judged by (the default's target)
VARIANT_TARGETS = {"k8v8": ("fi_fp8", 0.85), "k4v4": ("fi_bf16", 0.30), "k4v2": ("fi_bf16", 0.23)}
MIXED_LADDER = "bf16,k8v8,k4v4,k4v2,k2v2"
MIXED_RUN_TOKENS = 256  # a mixed batch's sequences change tier every 256 tokens (radix-node-like runs)
# the summary's ratios: name -> (numerator, denominator, target), times of one batch shape
RATIOS = {"k8v8_over_fi_fp8": ("ours_k8v8", "flashinfer_fp8", 0.85),
          "k4v4_over_fi_bf16": ("ours_k4v4", "flashinfer_bf16", 0.30),
          "k4v2_over_fi_bf16": ("ours_k4v2", "flashinfer_bf16", 0.23),
          "mixed_over_ideal": ("ours_mixed", "mixed_ideal", 1.10)}
REQUANT_TARGET_TBPS = 1.5  # issue #11 item 3: every ladder step, bytes read + written
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def bench(fn) -> float:
    """Median milliseconds."""
    if DEVICE == "cpu":  # --smoke: the interpreter, one call
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return float(triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median"))


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ---- pools and index layouts ---------------------------------------------------------------
def random_pool(ladder: str, tokens_per_tier: int, layers: int = 1, seed: int = 0) -> TieredKVPool:
    """A pool over a frame arena dealt out to the tiers in turn (``kernels.testing``, no spare
    frames), each tier owning frames for at least ``tokens_per_tier`` tokens besides the padding
    page; each tier's own frames hold random codes and plausible fp16 (scale, zero): timing needs
    realistic bytes, not quantization (never zeros)."""
    layout = interleaved_layout(ladder, KVShape(layers, HKV, D), PAGE, tokens_per_tier + PAGE, spare=False)
    pool = TieredKVPool(layout, device=DEVICE, ops=TritonKVOps())
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    for t, buffers in enumerate(pool.tiers):
        frames = tier_frames(layout, t, spare=False).to(DEVICE)
        for side in (buffers.k, buffers.v):
            data = side.data[:, frames]
            if data.dtype == torch.uint8:
                data.copy_(torch.randint(0, 256, data.shape, device=DEVICE, dtype=torch.uint8, generator=gen))
            else:
                data.normal_(generator=gen)
            side.data[:, frames] = data
            if side.meta is not None:
                meta = side.meta[:, frames]
                meta[..., 0].uniform_(0.01, 0.05, generator=gen)
                meta[..., 1].uniform_(-2.0, -1.0, generator=gen)
                side.meta[:, frames] = meta
    return pool


def own_pages(pool, tier: int) -> torch.Tensor:
    """Global page ids of the tier's own frames, SGLang's padding page 0 left out."""
    pages = tier_page_ids(pool.layout, tier, spare=False)
    return pages[pages != 0]


def tier_row(ctx, tiers, run_pages=None):
    """The tier of each page of a sequence of ``ctx`` tokens: ``tiers`` in turn, ``run_pages`` pages
    each (default: MIXED_RUN_TOKENS)."""
    run_pages = run_pages or max(1, MIXED_RUN_TOKENS // PAGE)
    return [tiers[(p // run_pages) % len(tiers)] for p in range(ctx // PAGE)]


def sequence_pages(pool, batch, ctx, tiers, run_pages=None, seed=0):
    """Global page ids ``[B, ctx / PAGE]``: each sequence's pages cycle through ``tiers`` as
    ``tier_row`` says, pages drawn at random without reuse from each tier's own frames (so a
    sequence's pages are scattered over the arena)."""
    gen = torch.Generator().manual_seed(seed)
    row = tier_row(ctx, tiers, run_pages)
    pools = {}
    for t in tiers:
        n = batch * row.count(t)
        owned = own_pages(pool, t)
        if n > len(owned):
            raise ValueError(f"tier {t} owns {len(owned)} pages, the layout needs {n}")
        pools[t] = owned[torch.randperm(len(owned), generator=gen)[:n]].tolist()
    pages = [[pools[t].pop() for t in row] for _ in range(batch)]
    return torch.tensor(pages, dtype=torch.int64)


def token_indices(pages):
    batch, per_seq = pages.shape
    slots = (pages[:, :, None] * PAGE + torch.arange(PAGE)).reshape(batch, -1)
    indptr = torch.arange(batch + 1, dtype=torch.int32) * slots.shape[1]
    return indptr.to(DEVICE), slots.reshape(-1).to(DEVICE)


def mixed_ideal(pool, pages, tier_ms) -> float:
    """Bytes-weighted ideal time of the mixed batch ``pages``: each tier's share of its pages at
    that tier's own time (``tier_ms``: the whole batch in one tier, per tier of the ladder)."""
    tiers = pool.layout.tier_of_pages(pages.reshape(-1))
    shares = torch.bincount(tiers, minlength=len(tier_ms)).double() / tiers.numel()
    return sum(float(share) * ms for share, ms in zip(shares, tier_ms))


def ratio_targets() -> dict:
    return {name: target for name, (_, _, target) in RATIOS.items()}


def ratios(ms: dict) -> dict:
    """RATIOS of the times ``ms`` (``ours_<tier>``, ``flashinfer_<dtype>``, ``mixed_ideal``); NaN
    where a time is missing."""
    return {name: ms.get(num, math.nan) / ms.get(den, math.nan) for name, (num, den, _) in RATIOS.items()}


def kv_bytes(pool, pages) -> float:
    tiers = pool.layout.tier_of_pages(pages.reshape(-1))
    per_tier = torch.bincount(tiers, minlength=pool.layout.num_tiers).tolist()
    return sum(n * PAGE * pool.layout.bytes_per_token(t) for t, n in enumerate(per_tier))


# ---- our decode --------------------------------------------------------------------------------
def time_ours(pool, pages, q, config, check=False, check_seqs=2):
    indptr, indices = token_indices(pages)
    wrapper = TieredDecodeWrapper(pool, HQ, **config)
    sync()
    t = time.perf_counter()
    wrapper.plan(indptr, indices)
    sync()
    plan_ms = (time.perf_counter() - t) * 1e3
    out = torch.empty(q.shape[0], HQ, D, dtype=torch.bfloat16, device=DEVICE)
    run = lambda: wrapper.run(q, pool, 0, out=out)  # noqa: E731
    if DEVICE == "cuda":  # compile outside the timing (--smoke: bench's one call)
        run()
    ms = bench(run)
    result = {"ms": ms, "plan_ms_first": plan_ms, "num_splits": wrapper.num_splits,
              "tbps": kv_bytes(pool, pages) / ms / 1e9}
    if check:  # guard against timing a broken kernel: the first sequences vs the float64 reference
        n = min(check_seqs, q.shape[0])
        ref = decode_reference(q[:n], pool, 0, indptr[: n + 1], indices[: int(indptr[n])], wrapper.sm_scale)
        result["max_abs_err_vs_ref"] = float((out[:n].double().cpu() - ref).abs().max())
    return result


KERNEL_VARIANTS = ("served", "default") + tuple(VARIANTS)  # --kernel-variant's choices


def kernel_variant(choice, head_dim: int):
    """The ``TieredDecodeWrapper`` variant of ``--kernel-variant`` at ``head_dim``: ``served``, the
    kernel the server runs there (``decode.served_variant``); ``default`` (or None), the plain one."""
    if choice == "served":
        return served_variant(head_dim)
    return None if choice in (None, "default") else choice


# variants with a launch configuration of their own (decode.ROWS_CONFIG, knobs unset: {}) are timed
# at it and at these neighbours, not at the default kernel's tuned one (stages 3-4 spill "rows")
VARIANT_CONFIGS = {"rows": [{}, {"num_stages": 2}, {"block_n": 128}, {"programs_per_sm": 4},
                            {"programs_per_sm": 16}]}


def time_variant_configs(pool, pages, q, variant):
    """The fastest of VARIANT_CONFIGS[variant] (checked against the reference), with every try."""
    tries = []
    for config in VARIANT_CONFIGS[variant]:
        try:
            tries.append((config, time_ours(pool, pages, q, {**config, "variant": variant}, check=True)))
        except Exception as err:  # a configuration that does not compile is skipped
            log(f"variant {variant} {config}: {err!r}")
    if not tries:
        raise RuntimeError(f"no configuration of variant {variant} ran")
    config, best = min(tries, key=lambda t: t[1]["ms"])
    return {**best, "config": config, "tries": [{"config": c, "ms": r["ms"]} for c, r in tries]}


# kernel shapes (each compiles once per ladder), then the split count for the best shape
TUNE_SHAPES = ([dict(num_warps=1, block_n=bn, num_stages=st, maxnreg=mr, programs_per_sm=16)
                for bn in (32, 64) for st in (3, 4) for mr in (None, 168)]
               + [dict(num_warps=nw, block_n=64, num_stages=st, maxnreg=None, programs_per_sm=pp)
                  for nw, pp in ((2, 8), (4, 4)) for st in (3,)])
TUNE_SPLITS = (0.5, 2.0)


def tune(pool, pages, q, label):
    best, rows = None, []

    def attempt(config):
        nonlocal best
        try:
            r = time_ours(pool, pages, q, config)
        except Exception as err:  # a config that does not compile (registers/smem) is skipped
            rows.append({"config": config, "error": repr(err)[:200]})
            return
        rows.append({"config": config, "ms": r["ms"]})
        if best is None or r["ms"] < best[1]:
            best = (config, r["ms"])

    for config in TUNE_SHAPES:
        attempt(dict(config))
    if best is None:
        raise RuntimeError(f"no decode configuration ran for {label}: {rows[0]}")
    shape = best[0]
    for factor in TUNE_SPLITS:
        attempt(dict(shape, programs_per_sm=max(1, int(shape["programs_per_sm"] * factor))))
    log(f"tune {label}: best {best[0]} {best[1]:.4f} ms")
    return best[0], rows


# ---- baselines ---------------------------------------------------------------------------------
class FlashInferDecode:
    def __init__(self, max_pages, kv_dtype):
        import flashinfer

        self.flashinfer = flashinfer
        self.cache = torch.empty(max_pages, 2, PAGE, HKV, D, dtype=torch.bfloat16, device=DEVICE)
        self.cache.normal_()
        if kv_dtype != torch.bfloat16:
            self.cache = self.cache.to(kv_dtype)
        self.kv_dtype = kv_dtype
        self.workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=DEVICE)

    def time(self, pages, q, tensor_cores):
        batch, per_seq = pages.shape
        wrapper = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD",
                                                                     use_tensor_cores=tensor_cores)
        indptr = (torch.arange(batch + 1, dtype=torch.int32) * per_seq).to(DEVICE)
        last = torch.full((batch,), PAGE, dtype=torch.int32, device=DEVICE)
        wrapper.plan(indptr, pages.reshape(-1).to(torch.int32).to(DEVICE), last, HQ, HKV, D, PAGE,
                     q_data_type=torch.bfloat16, kv_data_type=self.kv_dtype)
        run = lambda: wrapper.run(q, self.cache)  # noqa: E731
        run()
        ms = bench(run)
        per_token = 2 * HKV * D * self.cache.element_size()
        return {"ms": ms, "tbps": batch * per_seq * PAGE * per_token / ms / 1e9}


class SGLangTritonDecode:
    def __init__(self, cache_bf16):
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

        self.fwd = decode_attention_fwd
        self.k = cache_bf16[:, 0]  # [pages, page, heads, dim] views (SGLang's 4-D buffer form)
        self.v = cache_bf16[:, 1]

    def time(self, pages, q, splits=8):
        indptr, indices = token_indices(pages)
        batch = q.shape[0]
        out = torch.empty(batch, HQ, D, dtype=torch.bfloat16, device=DEVICE)
        logits = torch.empty(batch, HQ, splits, D, dtype=torch.float32, device=DEVICE)
        lse = torch.empty(batch, HQ, splits, dtype=torch.float32, device=DEVICE)
        num_splits = torch.full((batch,), splits, dtype=torch.int32, device=DEVICE)
        run = lambda: self.fwd(q, self.k, self.v, out, indptr, indices, logits, lse, num_splits,  # noqa: E731
                               splits, 1 / math.sqrt(D), 1.0, 1.0, page_size=PAGE)
        run()
        ms = bench(run)
        return {"ms": ms, "tbps": indices.numel() * 2 * HKV * D * 2 / ms / 1e9, "splits": splits}


def copy_bandwidth():
    size = 1 << 32 if DEVICE == "cuda" else 1 << 20
    src = torch.empty(size, dtype=torch.uint8, device=DEVICE).random_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    del src, dst
    return {"bytes": 2 * size, "ms": ms, "tbps": 2 * size / ms / 1e9}


# ---- requantize --------------------------------------------------------------------------------
def parse_requant_config(text: str) -> RequantConfig:
    """``"rows,heads,warps[,maxnreg[,prefetch]]"`` (maxnreg 0: none; prefetch 0/1) -> RequantConfig."""
    fields = [int(x) for x in text.split(",")]
    if len(fields) not in (3, 4, 5):
        raise ValueError(f"requantize config {text!r}: expected rows,heads,warps[,maxnreg[,prefetch]]")
    maxnreg = (fields[3] or None) if len(fields) > 3 else None
    return RequantConfig(*fields[:3], maxnreg=maxnreg, prefetch=bool(fields[4]) if len(fields) > 4 else True)


def requant_steps(pool, pages):
    """Per step down the ladder: (name, src, dst, src local pages, dst local pages), pages drawn at
    random from each tier's own frames."""
    for src in range(pool.layout.num_tiers - 1):
        dst = src + 1
        src_own, dst_own = own_pages(pool, src), own_pages(pool, dst)
        src_pages = pool.local_pages(src, src_own[torch.randperm(len(src_own))[:pages]]).to(DEVICE)
        dst_pages = pool.local_pages(dst, dst_own[torch.randperm(len(dst_own))[:pages]]).to(DEVICE)
        yield f"{pool.layout.codecs[src].name}->{pool.layout.codecs[dst].name}", src, dst, src_pages, dst_pages


def requant_pool(layers, pages):
    if DEVICE == "cpu":
        layers, pages = 2, 8
    return random_pool(MIXED_LADDER, pages * PAGE * 2, layers=layers, seed=3), layers, pages


def shape_label(config: dict) -> str:
    label = f"{config['rows']}r/{config['heads']}h/{config['warps']}w"
    label += f"/{config['maxnreg']}reg" if config.get("maxnreg") else ""
    return label + ("" if config.get("prefetch", True) else "/no-prefetch")


def arena_checksum(pool) -> int:
    """Wrapping int64 sum of the whole arena: equal after two launch shapes iff (barring a
    collision) they wrote the same bytes."""
    return int(pool.arena.view(torch.int64).sum())


def poison_pages(pool, tier, local_pages):
    """Overwrite the tier's pages (codes and meta, all layers) with a fixed pattern, so a launch that
    writes nothing or too little changes the checksum."""
    buffers = pool.tiers[tier]
    r = pool.layout.pages_per_frame[tier]
    frames, slots = local_pages // r, local_pages % r
    for side in (buffers.k, buffers.v):
        for t in side_tensors(side):
            t[:, frames, slots] = 0x5A if t.dtype == torch.uint8 else (0x5A5A5A5A if t.dtype == torch.int32 else 1.5)


def time_requant(pool, name, src, dst, src_pages, dst_pages, layers, config=None):
    run = lambda: requantize_pages(pool, src, src_pages, dst, dst_pages, config=config)  # noqa: E731
    poison_pages(pool, dst, dst_pages)
    run()
    checksum = arena_checksum(pool)
    ms = bench(run)
    pages = len(src_pages)
    nbytes = requantize_bytes(pool, src, dst, pages)
    used = config or requant_config(pool, src, dst)
    return {"step": name, "src": pool.layout.codecs[src].name, "dst": pool.layout.codecs[dst].name,
            "key": step_key(pool.tiers[src].codec, pool.tiers[dst].codec), "config": dataclasses.asdict(used),
            "pages": pages, "layers": layers, "bytes": nbytes, "ms": ms, "tbps": nbytes / ms / 1e9,
            "arena_checksum": checksum}


def requant_throughput(layers=8, pages=4096, configs=None):
    """One launch per ladder step (all layers, K and V), at the launch shape of ``configs`` (step
    key -> RequantConfig) or else the kernel's table (``REQUANT_CONFIGS``)."""
    pool, layers, pages = requant_pool(layers, pages)
    rows = []
    for name, src, dst, src_pages, dst_pages in requant_steps(pool, pages):
        key = step_key(pool.tiers[src].codec, pool.tiers[dst].codec)
        rows.append(time_requant(pool, name, src, dst, src_pages, dst_pages, layers, (configs or {}).get(key)))
        log(f"requantize {name}: {rows[-1]['ms']:.3f} ms, {rows[-1]['tbps']:.2f} TB/s "
            f"({shape_label(rows[-1]['config'])})")
    del pool
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rows


def _precompile(jobs):
    """Run in a spawned process: compile ``(src tier, dst tier, RequantConfig)`` jobs on a small pool
    of the sweep's shape (same argument specializations), into Triton's on-disk cache where the
    sweep's own launches find them."""
    torch.cuda.init()
    pool, _, _ = requant_pool(8, 16)
    steps = {(src, dst): (sp, dp) for _, src, dst, sp, dp in requant_steps(pool, 16)}
    for src, dst, config in jobs:
        try:
            requantize_pages(pool, src, steps[src, dst][0], dst, steps[src, dst][1], config=config, compile_only=True)
        except Exception:  # reported (and skipped) when the sweep launches it
            pass
    return len(jobs)


def precompile(jobs):
    """Compile the sweep's kernels in parallel processes (Triton's compile is mostly Python and
    single-threaded: seconds per shape); any that fail here compile again on first launch."""
    workers = min(len(jobs), 8, max(1, (os.cpu_count() or 2) // 2))
    t = time.time()
    try:
        import multiprocessing

        chunks = [jobs[i::workers] for i in range(workers)]
        with multiprocessing.get_context("spawn").Pool(workers) as procs:
            procs.map(_precompile, chunks)
    except Exception as err:
        log(f"parallel compile failed ({err!r}); compiling on first launch"[:200])
    log(f"requantize sweep: {len(jobs)} kernels compiled in {workers} processes in {time.time() - t:.1f} s")


def requant_sweep(candidates, layers=8, pages=4096):
    """Every candidate launch shape on every ladder step: (all timings, best row per step). The
    shapes compile first, in parallel processes. Every shape must write the same bytes (the kernel
    is bit-exact; the destination pages are poisoned before each shape's first launch): one whose
    arena checksum differs from the other shapes' is marked ``"mismatch"`` and never chosen."""
    if DEVICE == "cuda":
        precompile([(src, src + 1, config) for src in range(len(MIXED_LADDER.split(",")) - 1)
                    for config in candidates])
    pool, layers, pages = requant_pool(layers, pages)
    steps = list(requant_steps(pool, pages))
    rows, best = [], []
    for name, src, dst, src_pages, dst_pages in steps:
        timed = []
        for config in candidates:
            try:
                row = time_requant(pool, name, src, dst, src_pages, dst_pages, layers, config)
            except Exception as err:  # a shape that does not compile (registers) is skipped
                rows.append({"step": name, "config": dataclasses.asdict(config), "error": repr(err)[:200]})
                continue
            rows.append(row)
            timed.append(row)
        if not timed:
            raise RuntimeError(f"no requantize launch shape ran for {name}: {rows[-1]}")
        sums = [r["arena_checksum"] for r in timed]
        consensus = max(set(sums), key=sums.count)
        for r in timed:
            r["mismatch"] = r["arena_checksum"] != consensus
        good = [r for r in timed if not r["mismatch"]]
        best.append(max(good, key=lambda r: r["tbps"]))
        log(f"requantize {name}: " + ", ".join(f"{shape_label(r['config'])} {r['tbps']:.2f}"
                                                 + (" MISMATCH" if r["mismatch"] else "") for r in timed)
            + f" TB/s; best {shape_label(best[-1]['config'])}")
    del pool
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rows, best


def requant_table(best) -> str:
    """The best shape per step as ``REQUANT_CONFIGS`` (kernels/requantize.py), ready to paste."""
    lines = ["REQUANT_CONFIGS: Dict[str, RequantConfig] = {"]
    for r in best:
        c = r["config"]
        extra = f", maxnreg={c['maxnreg']}" if c.get("maxnreg") else ""
        extra += "" if c.get("prefetch", True) else ", prefetch=False"
        shape = f'rows={c["rows"]}, heads={c["heads"]}, warps={c["warps"]}{extra}'
        lines.append(f'    "{r["key"]}": RequantConfig({shape}),  # {r["step"]}: {r["tbps"]:.2f} TB/s')
    lines.append("}")
    return "\n".join(lines)


def requant_summary(summary, rows):
    summary["requant_tbps"] = min(r["tbps"] for r in rows)
    summary["requant_tbps_by_step"] = {r["step"]: r["tbps"] for r in rows}


def requant_only(args, results, stem):
    """--requant-sweep: copy bandwidth, then every candidate shape per ladder step; writes
    ``<stem>-requant.json`` (``requant_tuning``: every timing; ``requantize``: the best per step;
    ``requant_configs``: the best as a table; ``summary.requant_tbps``: the minimum over steps)."""
    results["copy"] = copy_bandwidth()
    log(f"device-to-device copy: {results['copy']['tbps']:.2f} TB/s (read + write)")
    if args.requant_candidates:
        candidates = [parse_requant_config(c) for c in args.requant_candidates.split(";")]
    else:  # the sweep's shapes and the table's
        candidates = list(dict.fromkeys(SWEEP_CONFIGS + tuple(REQUANT_CONFIGS.values())))
    if DEVICE == "cpu":
        candidates = candidates[:2]
    results["requant_tuning"], results["requantize"] = requant_sweep(candidates)
    results["requant_configs"] = {r["key"]: r["config"] for r in results["requantize"]}
    summary = {"targets": {"requant_tbps": REQUANT_TARGET_TBPS}, "copy_tbps": results["copy"]["tbps"]}
    requant_summary(summary, results["requantize"])
    results["summary"] = summary
    os.makedirs(args.out, exist_ok=True)
    with open(stem + "-requant.json", "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {stem}-requant.json")
    print("\nbest launch shape per step, for kernels/requantize.py:\n" + requant_table(results["requantize"]))
    print(f"\nrequant_tbps (minimum over steps) {summary['requant_tbps']:.3f} (>= {REQUANT_TARGET_TBPS})")


# ---- shape sweep (issue 13) ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SweepShape:
    head_dim: int
    group: int  # query heads per KV head (HKV KV heads)
    page_size: int
    batch: int
    context: int

    @property
    def label(self) -> str:
        ctx = f"{self.context // 1024}K" if self.context % 1024 == 0 else str(self.context)
        return f"d{self.head_dim} g{self.group} p{self.page_size} {self.batch}x{ctx}"


def sweep_shapes(smoke: bool) -> list:
    """The grid, ordered so shapes sharing (head_dim, page) are adjacent (they share pools)."""
    if smoke:  # every code path: page 1 and 16, group 1 and 4, batch 1 and 2, pools shared by two shapes
        return [SweepShape(64, 1, 1, 1, 64), SweepShape(64, 4, 1, 2, 32), SweepShape(64, 4, 16, 2, 32)]
    head_dims, groups, pages, batches = (64, 128), (1, 4, 8), (1, 16), ((1, 32768), (64, 4096))
    return [SweepShape(d, g, p, b, c) for d in head_dims for p in pages for b, c in batches for g in groups]


@contextlib.contextmanager
def sweep_globals(shape: SweepShape):
    """The module's shape globals (HQ, D, PAGE: the pool, page and FlashInfer helpers read them) set to
    ``shape``'s, restored on exit; HKV stays."""
    global HQ, D, PAGE
    saved = HQ, D, PAGE
    HQ, D, PAGE = shape.group * HKV, shape.head_dim, shape.page_size
    try:
        yield
    finally:
        HQ, D, PAGE = saved


FI_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def _compile_sweep_job(job):
    """Run in a spawned process: ``(shape, ladder, variant)`` launches our decode once on a small
    pool of that shape and batch size (so the same split count and argument specializations), which
    leaves the kernels in Triton's on-disk cache; ``(shape, "flashinfer", dtype)`` JIT-compiles
    FlashInfer's tensor-core decode into its cache. Returns an error line, or None."""
    shape, what, arg = job
    try:
        with sweep_globals(shape):
            q = torch.randn(shape.batch, HQ, D, device=DEVICE).to(torch.bfloat16)
            if what == "flashinfer":
                runner = FlashInferDecode(shape.batch * 4, FI_DTYPES[arg])
                runner.time(sequence_pages_plain(shape.batch, 4 * PAGE, shape.batch * 4), q, tensor_cores=True)
                return None
            pool = random_pool(what, 16 * len(TIERS) * shape.batch)
            tiers = list(range(pool.layout.num_tiers))
            indptr, indices = token_indices(sequence_pages(pool, shape.batch, 16 * len(tiers), tiers, run_pages=1))
            wrapper = TieredDecodeWrapper(pool, HQ, variant=arg)
            wrapper.plan(indptr, indices)
            wrapper.run(q, pool, 0)
            sync()
    except Exception as err:  # compiles again on first launch, where a real error is recorded
        return f"{shape.label} {what} {arg}: {err!r}"[:200]
    return None


def compile_sweep(shapes, variant):
    """Compile every kernel the sweep launches, in parallel processes: our decode per shape and ladder
    (it specializes on head_dim, group and page; the batch sets the split count), FlashInfer's
    tensor-core decode per (kv dtype, head_dim) (the longest jobs, so first). Any that fails here
    compiles on its first launch."""
    by_dim = {s.head_dim: s for s in shapes}
    jobs = [(s, "flashinfer", dtype) for s in by_dim.values() for dtype in FI_DTYPES]
    jobs += [(s, ladder, kernel_variant(variant, s.head_dim)) for ladder in [MIXED_LADDER] + TIERS for s in shapes]
    workers = min(len(jobs), 12, max(1, len(os.sched_getaffinity(0)) - 2))
    # rough costs seen on H100/H200: 30 s a FlashInfer module, 9 s a five-tier kernel, 1.5 s a tier
    estimate = (30 * len(by_dim) * len(FI_DTYPES) + (9 + 1.5 * len(TIERS)) * len(shapes)) / workers + 15
    log(f"shape sweep: compiling {len(jobs)} kernels in {workers} processes (estimate {estimate:.0f} s)")
    t = time.time()
    try:  # an executor, not a Pool: a worker that dies fails the map instead of hanging it
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as procs:
            errors = [e for e in procs.map(_compile_sweep_job, jobs) if e]
    except Exception as err:
        errors = [f"parallel compile failed ({err!r}); compiling on first launch"[:200]]
    for line in errors[:5]:
        log(f"  compile failed (again at first launch): {line}")
    log(f"shape sweep: compiled in {time.time() - t:.1f} s, {len(errors)} of {len(jobs)} failed")


def sweep_pools(shapes):
    """Pools for shapes of one (head_dim, page): one per tier holding the largest batch, and the
    five-tier ladder holding the largest mixed batch."""
    tokens = max(s.batch * s.context for s in shapes)
    tiers = list(range(len(TIERS)))
    mixed_tokens = max(s.batch * max(tier_row(s.context, tiers).count(t) for t in tiers) * PAGE for s in shapes)
    pools = {name: random_pool(name, tokens, seed=i) for i, name in enumerate(TIERS)}
    pools["mixed"] = random_pool(MIXED_LADDER, mixed_tokens, seed=9)
    return pools, tokens


def time_shape(shape, pools, fi, variant, rounds=1):
    """One row of the sweep: our decode on every tier and the mixed batch, FlashInfer (tensor cores)
    on bf16 and fp8, and the ratios (None where a time is missing; ``errors`` says why). ``rounds``
    passes over all of the shape's kernels in turn, so a transient slows one pass rather than one
    kernel; a cell's time is its median over the passes (``ms_rounds`` holds every pass). Contexts of
    up to 4096 tokens check their first sequence against the float64 reference in the first pass
    (on the host: the 32K ones would take seconds each)."""
    row = {**dataclasses.asdict(shape), "label": shape.label, "q_heads": HQ, "kv_heads": HKV,
           "ms": {}, "ms_rounds": {}, "max_abs_err_vs_ref": {}, "errors": {}}
    q = torch.randn(shape.batch, HQ, D, device=DEVICE).to(torch.bfloat16)
    tiers = list(range(len(TIERS)))
    timers, mixed_pages = {}, None
    config = {"variant": kernel_variant(variant, shape.head_dim)}
    for name in TIERS + ["mixed"]:
        try:
            pages = sequence_pages(pools[name], shape.batch, shape.context, tiers if name == "mixed" else [0])
        except Exception as err:  # one failed cell must not cost the grid
            row["errors"][f"ours_{name}"] = repr(err)[:200]
            continue
        timers[f"ours_{name}"] = (lambda first, pool=pools[name], pages=pages: time_ours(
            pool, pages, q, config, check=first and shape.context <= 4096, check_seqs=1))
        if name == "mixed":
            mixed_pages = pages
    for dtype_name, runner in fi.items():
        try:
            pages = sequence_pages_plain(shape.batch, shape.context, runner.cache.shape[0])
        except Exception as err:
            row["errors"][f"flashinfer_{dtype_name}"] = repr(err)[:200]
            continue
        timers[f"flashinfer_{dtype_name}"] = (lambda first, runner=runner, pages=pages:
                                              runner.time(pages, q, tensor_cores=True))
    for index in range(rounds):
        for key, timer in timers.items():
            if key in row["errors"]:
                continue
            try:
                result = timer(index == 0)
            except Exception as err:
                row["errors"][key] = repr(err)[:200]
                row["ms_rounds"].pop(key, None)
                continue
            row["ms_rounds"].setdefault(key, []).append(result["ms"])
            if "max_abs_err_vs_ref" in result:
                row["max_abs_err_vs_ref"][key] = result["max_abs_err_vs_ref"]
    row["ms"] = {key: statistics.median(times) for key, times in row["ms_rounds"].items()}
    ideal = math.nan
    if mixed_pages is not None and "ours_mixed" in row["ms"]:
        ideal = mixed_ideal(pools["mixed"], mixed_pages, [row["ms"].get(f"ours_{n}", math.nan) for n in TIERS])
    row["mixed_ideal_ms"] = None if math.isnan(ideal) else ideal
    row.update({k: None if math.isnan(v) else v for k, v in ratios({**row["ms"], "mixed_ideal": ideal}).items()})
    return row


def round_spread(row) -> float:
    """The largest slowest-over-fastest pass ratio over a sweep row's cells (1.0 with one pass)."""
    spreads = [max(times) / min(times) for times in row["ms_rounds"].values() if times and min(times) > 0]
    return max(spreads, default=1.0)


def shape_sweep(shapes, variant, save, rounds=1):
    """``results["sweep"]``: one row per shape (``time_shape``, ``rounds`` passes), ``save(sweep)``
    after each row. Pools and FlashInfer caches are built per (head_dim, page) and freed before the
    next. ``variant``: a ``--kernel-variant`` choice, resolved per shape's head_dim."""
    baselines = DEVICE == "cuda"
    sweep = {"shapes": [], "targets": ratio_targets(), "kv_heads": HKV, "variant": variant,
             "flashinfer": ("BatchDecodeWithPagedKVCacheWrapper, use_tensor_cores=True only (CUDA-core variant "
                            "not timed: JIT time); fp8 is fp8_e4m3" if baselines else "skipped (--smoke)"),
             "max_abs_err_vs_ref": "the first sequence vs the float64 reference, contexts <= 4096 only",
             "rounds": rounds, "ms": "median over the rounds (passes over every kernel of a shape in turn)"}
    if baselines:
        compile_sweep(shapes, variant)
    log(f"shape sweep: timing {len(shapes)} shapes, {rounds} round(s) each (estimate {2 * rounds} s a shape on a GPU)")
    t = time.time()
    groups = {}
    for s in shapes:
        groups.setdefault((s.head_dim, s.page_size), []).append(s)
    for group_shapes in groups.values():
        with sweep_globals(group_shapes[0]):
            pools, tokens = sweep_pools(group_shapes)
            fi = {name: FlashInferDecode(tokens // PAGE, dtype) for name, dtype in FI_DTYPES.items()
                  if baselines}
        for shape in group_shapes:
            with sweep_globals(shape):
                row = time_shape(shape, pools, fi, variant, rounds)
            sweep["shapes"].append(row)
            k = len(sweep["shapes"])
            log(f"[{k}/{len(shapes)}] {shape.label}: " + ", ".join(
                f"{name} {row[name]:.3f}" if row[name] is not None else f"{name} -" for name in RATIOS)
                + (f", rounds' spread {round_spread(row):.2f}x" if rounds > 1 else "")
                + f" ({(time.time() - t) / k * (len(shapes) - k):.0f} s left)"
                + (f"; errors: {row['errors']}"[:300] if row["errors"] else ""))
            save(sweep)
        del pools, fi
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    log(f"shape sweep: {len(shapes)} shapes timed in {time.time() - t:.1f} s")
    return sweep


def plot_sweep(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from benchmarks.plots import save_figure

    rows = results["sweep"]["shapes"]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(rows) + 2), 5.5))
    xs = range(len(rows))
    for (name, (_, _, target)), color, marker in zip(RATIOS.items(), ("C0", "C1", "C2", "C3"), "oDsv"):
        points = [(x, r[name]) for x, r in zip(xs, rows) if r[name] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker, color=color, linestyle="none", label=name)
        ax.axhline(target, color=color, linestyle="--", linewidth=1)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["label"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("ratio (dashed: target, lower is better)")
    ax.set_title(f"{results['device']}: decode ratios per shape ({results['sweep']['kv_heads']} KV heads)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


# ---- main ----------------------------------------------------------------------------------------
def versions():
    out = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda}
    for name in ("flashinfer", "sglang"):
        try:
            out[name] = __import__(name).__version__
        except Exception as err:  # pragma: no cover - reported, not fatal
            out[name] = f"unavailable: {err!r}"[:120]
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    out["git_commit"] = os.environ.get("KVC_GIT_COMMIT", "")
    if not out["git_commit"]:
        try:
            out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                               cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except OSError:
            pass
    return out


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from benchmarks.plots import save_figure

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, points in results["sweep_context"].items():
        xs = [p["ctx"] for p in points if "ms" in p]
        ys = [p["ms"] for p in points if "ms" in p]
        style = "--" if name.startswith(("flashinfer", "sglang")) else "-"
        ax.plot(xs, ys, style, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens), batch 64")
    ax.set_ylabel("decode attention time per layer (ms)")
    ax.set_title(f"{results['device']}: 32 q / 8 kv heads, head_dim 128, page 16")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--quick", action="store_true", help="main configuration only (no sweeps)")
    parser.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--batches", default="1,4,16,64,128,256")
    parser.add_argument("--no-tune", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes, no baselines")
    parser.add_argument("--configs", help="take the decode configurations from this earlier results JSON")
    parser.add_argument("--profile", help="only launch our decode for this variant a few times (for ncu)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="opt-in decode kernel variants (TieredDecodeWrapper(variant=...)) timed as extra rows "
                             f"ours_<tier>_<variant> on {', '.join(VARIANT_TIERS)} ('' for none)")
    parser.add_argument("--requant-sweep", action="store_true",
                        help="only the requantize launch shapes per ladder step (writes <stem>-requant.json and "
                             "prints the best as REQUANT_CONFIGS for kernels/requantize.py)")
    parser.add_argument("--requant-candidates",
                        help="shapes for --requant-sweep: 'rows,heads,warps[,maxnreg[,prefetch]];...'")
    parser.add_argument("--requant-configs", help="requantize at the best shapes of this earlier results JSON "
                                                  "(its requant_configs) instead of the kernel's table")
    parser.add_argument("--sweep-rounds", type=int, default=3,
                        help="--shape-sweep: passes over every kernel of a shape in turn; each cell reports its "
                             "median (one with --smoke)")
    parser.add_argument("--shape-sweep", action="store_true",
                        help="after the main configuration, the summary's ratios per shape: head_dim 64/128 x "
                             "group 1/4/8 x page 1/16 x (1 x 32768, 64 x 4096), FlashInfer tensor-core only "
                             "(JSON 'sweep', <stem>-sweep.png; use with --quick --no-tune). With --smoke: tiny "
                             "shapes, and the main configuration as --quick --no-tune --variants '' without "
                             "requantize")
    parser.add_argument("--kernel-variant", default="served", choices=KERNEL_VARIANTS,
                        help="decode kernel variant of the main rows (ours_<tier>, the summary's ratios) and the "
                             "shape sweep: 'served' is the server's at each head_dim (kernels.decode.served_variant), "
                             "'default' the plain kernel (the summaries before 2026-12-01's last run)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.smoke:
        global DEVICE, HQ, HKV, D, MAIN_B, MAIN_CTX, MIXED_RUN_TOKENS
        DEVICE, HQ, HKV, D, MAIN_B, MAIN_CTX = "cpu", 8, 2, 64, 2, 64
        TUNE_SHAPES[:] = TUNE_SHAPES[:2]
        args.contexts, args.batches = "32,64", "1,2"
        if args.shape_sweep:  # the sweep's code path in seconds; the main one has its own smoke run
            args.quick, args.no_tune, args.variants, MIXED_RUN_TOKENS = True, True, "", 16
    requantize = not (args.smoke and args.shape_sweep)
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu-interpreter"
    date = datetime.date.today().isoformat()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    results = {"device": device, "date": date, "versions": versions(),
               "command": "python " + " ".join(sys.argv),
               "shape": {"batch": MAIN_B, "context": MAIN_CTX, "q_heads": HQ, "kv_heads": HKV, "head_dim": D,
                         "page_size": PAGE}}
    log(f"{device}, {results['versions']}")
    stem = os.path.join(args.out, f"kernels-{slug}-{date}")
    if args.requant_sweep:
        requant_only(args, results, stem)
        return
    results["copy"] = copy_bandwidth()
    copy_tbps = results["copy"]["tbps"]
    log(f"device-to-device copy: {copy_tbps:.2f} TB/s (read + write)")

    contexts = [int(c) for c in args.contexts.split(",")] if not args.quick else [MAIN_CTX]
    batches = [int(b) for b in args.batches.split(",")] if not args.quick else [MAIN_B]
    max_tokens = max(max(contexts) * MAIN_B, max(batches) * MAIN_CTX)
    q_all = torch.randn(max(batches + [MAIN_B]), HQ, D, device=DEVICE).to(torch.bfloat16)

    # pools: one per tier (every token of a batch in that tier) and one five-tier ladder for mixes
    pools = {name: random_pool(name, max_tokens, seed=i) for i, name in enumerate(TIERS)}
    mixed_pool = random_pool(MIXED_LADDER, int(max_tokens / len(TIERS) * 1.1) + 2 * MAIN_B * PAGE * 16, seed=9)
    log("pools filled")
    main_pages = {name: sequence_pages(pools[name], MAIN_B, MAIN_CTX, [0]) for name in TIERS}
    mixed_pages = sequence_pages(mixed_pool, MAIN_B, MAIN_CTX, list(range(len(TIERS))))
    q = q_all[:MAIN_B]

    configs, tuning = {}, {}
    earlier = {}
    if args.configs:
        with open(args.configs) as f:
            earlier = json.load(f)["configs"]
        log(f"configurations from {args.configs}: {earlier}")
    if args.profile:  # a few plain launches of one variant, for `ncu -k regex:_decode_stage1`
        name = args.profile
        pool, pages = (mixed_pool, mixed_pages) if name == "mixed" else (pools[name], main_pages[name])
        indptr, indices = token_indices(pages)
        wrapper = TieredDecodeWrapper(pool, HQ, **earlier.get(name, {}))
        wrapper.plan(indptr, indices)
        for _ in range(3):
            wrapper.run(q, pool, 0)
        sync()
        log(f"profiled {name} with {earlier.get(name, {})}")
        return
    for name in TIERS + ["mixed"]:
        pool, pages = (mixed_pool, mixed_pages) if name == "mixed" else (pools[name], main_pages[name])
        if name in earlier:
            configs[name] = earlier[name]
        elif args.no_tune:
            configs[name] = {}
        else:
            configs[name], tuning[name] = tune(pool, pages, q, name)
    results["tuning"] = tuning
    results["configs"] = configs

    main = {}
    main_variant = kernel_variant(args.kernel_variant, D)
    results["kernel_variant"] = main_variant or "default"
    for name in TIERS:
        main[f"ours_{name}"] = time_ours(pools[name], main_pages[name], q,
                                         {**configs[name], "variant": main_variant}, check=True)
    main["ours_mixed"] = time_ours(mixed_pool, mixed_pages, q, {**configs["mixed"], "variant": main_variant},
                                   check=True)
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        for name in VARIANT_TIERS:
            try:
                if variant in VARIANT_CONFIGS:
                    main[f"ours_{name}_{variant}"] = time_variant_configs(pools[name], main_pages[name], q, variant)
                else:
                    main[f"ours_{name}_{variant}"] = time_ours(pools[name], main_pages[name], q,
                                                               {**configs[name], "variant": variant}, check=True)
            except Exception as err:  # a variant must not cost the run its other rows
                log(f"variant {variant} on {name} failed: {err!r}")
                results.setdefault("variant_errors", {})[f"{name}_{variant}"] = repr(err)
    for key, r in main.items():
        log(f"{key}: {r['ms']:.4f} ms, {r['tbps']:.2f} TB/s ({r['tbps'] / copy_tbps:.0%} of copy), "
            f"err {r.get('max_abs_err_vs_ref', float('nan')):.2e}")

    fi = {}
    baselines = DEVICE == "cuda"
    try:
        if not baselines:
            raise RuntimeError("--smoke: baselines skipped")
        fi_pages = max_tokens // PAGE
        for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp8_e4m3", torch.float8_e4m3fn)):
            fi[dtype_name] = FlashInferDecode(fi_pages, dtype)
            for tc in (True, False):
                log(f"flashinfer {dtype_name} tensor_cores={tc} (JIT compile on first use)")
                pages = sequence_pages_plain(MAIN_B, MAIN_CTX, fi_pages)
                r = fi[dtype_name].time(pages, q, tc)
                main[f"flashinfer_{dtype_name}_{'tc' if tc else 'cc'}"] = r
                log(f"  {r['ms']:.4f} ms, {r['tbps']:.2f} TB/s")
    except Exception as err:
        log(f"FlashInfer unavailable: {err!r}")
        results["flashinfer_error"] = repr(err)
    sgl = None
    try:
        if not baselines:
            raise RuntimeError("--smoke: baselines skipped")
        cache = fi["bf16"].cache if "bf16" in fi else torch.randn(max_tokens // PAGE, 2, PAGE, HKV, D,
                                                                  device=DEVICE, dtype=torch.bfloat16)
        sgl = SGLangTritonDecode(cache)
        pages = sequence_pages_plain(MAIN_B, MAIN_CTX, cache.shape[0])
        for splits in (8, 16):
            main[f"sglang_triton_bf16_s{splits}"] = sgl.time(pages, q, splits)
            log(f"sglang triton bf16 splits={splits}: {main[f'sglang_triton_bf16_s{splits}']['ms']:.4f} ms")
    except Exception as err:
        log(f"SGLang Triton decode unavailable: {err!r}")
        results["sglang_error"] = repr(err)
    results["main"] = main

    def best(prefix):
        times = [r["ms"] for k, r in main.items() if k.startswith(prefix)]
        return min(times) if times else float("nan")

    fi_bf16, fi_fp8 = best("flashinfer_bf16"), best("flashinfer_fp8")
    if not baselines:
        fi_bf16 = fi_fp8 = float("nan")
    ideal = mixed_ideal(mixed_pool, mixed_pages, [main[f"ours_{name}"]["ms"] for name in TIERS])
    summary = {
        **ratios({**{k: r["ms"] for k, r in main.items()}, "flashinfer_fp8": fi_fp8, "flashinfer_bf16": fi_bf16,
                  "mixed_ideal": ideal}),
        "targets": {**ratio_targets(), "requant_tbps": REQUANT_TARGET_TBPS},
        "fi_bf16_ms": fi_bf16, "fi_fp8_ms": fi_fp8, "mixed_ideal_ms": ideal,
        "copy_tbps": copy_tbps, "kernel_variant": main_variant or "default",
    }
    baseline_ms = {"fi_fp8": fi_fp8, "fi_bf16": fi_bf16}
    summary["variants"] = {f"{name}_{variant}_over_{VARIANT_TARGETS[name][0]}":
                           main[f"ours_{name}_{variant}"]["ms"] / baseline_ms[VARIANT_TARGETS[name][0]]
                           for variant in variants for name in VARIANT_TIERS if f"ours_{name}_{variant}" in main}
    results["summary"] = summary

    requant_configs = None
    if args.requant_configs:
        with open(args.requant_configs) as f:
            requant_configs = {k: RequantConfig(**v) for k, v in json.load(f)["requant_configs"].items()}
        log(f"requantize shapes from {args.requant_configs}: {requant_configs}")
    if requantize:
        results["requantize"] = requant_throughput(configs=requant_configs)
        requant_summary(summary, results["requantize"])
    log("summary: " + json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))

    if not args.quick:
        results["sweep_context"] = sweep(pools, mixed_pool, fi, sgl, configs, q_all, [(MAIN_B, c) for c in contexts])
        results["sweep_batch"] = sweep(pools, mixed_pool, fi, sgl, configs, q_all, [(b, MAIN_CTX) for b in batches])

    def save():
        os.makedirs(args.out, exist_ok=True)
        with open(stem + ".json", "w") as f:
            json.dump(results, f, indent=1)

    save()
    log(f"wrote {stem}.json")
    if not args.quick:
        plot(results, stem + ".png")
        log(f"wrote {stem}.png")
    if args.shape_sweep:
        pools.clear()  # the main configuration's memory goes first
        fi.clear()
        mixed_pool = sgl = cache = None  # noqa: F841
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        results["sweep"] = shape_sweep(sweep_shapes(args.smoke), args.kernel_variant,
                                       lambda sweep: (results.update(sweep=sweep), save()),
                                       rounds=1 if args.smoke else args.sweep_rounds)
        save()
        plot_sweep(results, stem + "-sweep.png")
        log(f"wrote {stem}.json (sweep) and {stem}-sweep.png")
    print_table(results)


def sequence_pages_plain(batch, ctx, total_pages, seed=1):
    gen = torch.Generator().manual_seed(seed)
    need = batch * ctx // PAGE
    return torch.randperm(total_pages, generator=gen)[:need].reshape(batch, ctx // PAGE)


def sweep(pools, mixed_pool, fi, sgl, configs, q_all, points):
    series = {}
    for batch, ctx in points:
        q = q_all[:batch]
        log(f"sweep B={batch} ctx={ctx}")
        for name in TIERS:
            pages = sequence_pages(pools[name], batch, ctx, [0])
            series.setdefault(f"ours_{name}", []).append({"batch": batch, "ctx": ctx,
                                                          **time_ours(pools[name], pages, q, configs[name])})
        try:
            pages = sequence_pages(mixed_pool, batch, ctx, list(range(len(TIERS))))
            series.setdefault("ours_mixed", []).append({"batch": batch, "ctx": ctx,
                                                        **time_ours(mixed_pool, pages, q, configs["mixed"])})
        except ValueError as err:  # the mixed pool is sized for the main sweep points
            series.setdefault("ours_mixed", []).append({"batch": batch, "ctx": ctx, "skipped": str(err)})
        for dtype_name, runner in fi.items():
            pages = sequence_pages_plain(batch, ctx, runner.cache.shape[0])
            r = min((runner.time(pages, q, tc) for tc in (True, False)), key=lambda x: x["ms"])
            series.setdefault(f"flashinfer_{dtype_name}", []).append({"batch": batch, "ctx": ctx, **r})
        if sgl is not None:
            pages = sequence_pages_plain(batch, ctx, sgl.k.shape[0])
            series.setdefault("sglang_triton_bf16", []).append({"batch": batch, "ctx": ctx,
                                                                **sgl.time(pages, q, 8)})
    return series


def print_table(results):
    copy = results["copy"]["tbps"]
    print(f"\n{'variant':32s} {'ms':>9s} {'TB/s':>7s} {'% copy':>7s}")
    for key, r in results["main"].items():
        print(f"{key:32s} {r['ms']:9.4f} {r['tbps']:7.2f} {r['tbps'] / copy:7.0%}")
    s = results["summary"]
    print("\nsummary (target):")
    for key, target in s["targets"].items():
        if key not in s:  # requant_tbps under --smoke --shape-sweep
            continue
        print(f"  {key:20s} {s[key]:.3f} ({'<=' if key != 'requant_tbps' else '>='} {target})")
    for key, value in s.get("variants", {}).items():
        print(f"  {key:20s} {value:.3f} (<= {VARIANT_TARGETS[key.split('_')[0]][1]}; opt-in variant)")
    if "sweep" in results:
        targets = results["sweep"]["targets"]
        print(f"\nshape sweep ({', '.join(f'{k} <= {v}' for k, v in targets.items())}):")
        print(f"{'shape':22s} " + " ".join(f"{k:>18s}" for k in targets))
        for row in results["sweep"]["shapes"]:
            print(f"{row['label']:22s} " + " ".join(f"{row[k]:18.3f}" if row[k] is not None else f"{'-':>18s}"
                                                    for k in targets))


if __name__ == "__main__":
    main()
