"""Compile, before serving, every Triton kernel a pool's ladder launches outside CUDA graphs.

Triton compiles a kernel on its first launch with each new specialization key, and a compile of
the requantize kernel takes seconds: inside a server it stalls the scheduler, so every queued
request waits (H200 e2e of 2026-12-01: a 6 s pause at the first demotion of a new page count,
late TTFT p90 of 7 s; ``e2e-nvidia-h200-2026-12-01-compile-stalls.json``, packed in
``benchmarks/results/e2e-superseded-2026-12-01.tgz``).
Two rules remove those stalls: the kernels do not specialize on what varies between launches
(page and token counts, offsets of index arrays: their ``do_not_specialize*`` lists, so one
compile serves every launch), and ``precompile`` compiles that one variant of each at start-up:
requantize for every step of the ladder, the prefix dequantize of extend, and quantize-on-write
into the write tier.
"""

from __future__ import annotations

import time
from typing import List

import torch

from sglang_kvc.allocator import WRITE_TIER

from .dequant import DequantPlan
from .quantize import quantize_write
from .requantize import requantize_pages


def precompile(pool) -> List[str]:
    """Compile the launches ``pool`` will make (no kernel runs, no pool byte changes); returns
    what was compiled, e.g. ``["requantize k8v8->k4v4", "dequantize", "write k8v8"]``. Under
    ``TRITON_INTERPRET=1`` nothing compiles and the list is the same."""
    device = torch.device(pool.device)
    names = []
    first_page = torch.zeros(1, dtype=torch.int64, device=device)
    for src in range(pool.layout.num_tiers - 1):
        requantize_pages(pool, src, first_page, src + 1, first_page, compile_only=True)
        names.append(f"requantize {pool.tiers[src].codec.name}->{pool.tiers[src + 1].codec.name}")
    plan = DequantPlan(pool)
    plan.plan(torch.zeros(1, dtype=torch.int64, device=device))
    out_k = torch.empty((1, pool.head_num, pool.head_dim), dtype=torch.bfloat16, device=device)
    out_v = torch.empty((1, pool.head_num, pool.v_head_dim), dtype=torch.bfloat16, device=device)
    plan.run(pool.start_layer, out_k, out_v, compile_only=True)
    names.append("dequantize")
    slot = torch.zeros(1, dtype=torch.int64, device=device)
    k = torch.empty((1, pool.head_num, pool.head_dim), dtype=pool.dtype, device=device)
    v = torch.empty((1, pool.head_num, pool.v_head_dim), dtype=pool.dtype, device=device)
    quantize_write(pool, WRITE_TIER, 0, slot, k, v, compile_only=True)
    names.append(f"write {pool.tiers[WRITE_TIER].codec.name}")
    return names


def precompile_logged(pool, logger) -> List[str]:
    """``precompile`` with one log line in SGLang's style saying what compiled and how long it took.
    A failure costs only the head start: it is logged as a warning naming the error, and each
    kernel compiles at its first launch instead."""
    start = time.perf_counter()
    try:
        names = precompile(pool)
    except Exception as err:  # noqa: BLE001 -- serving works without it, only slower to warm up
        logger.warning(f"sglang-kvc: compiling the kernels before serving failed ({err!r}); each "
                       f"compiles at its first launch instead (a stall of seconds then)")
        return []
    logger.info(f"sglang-kvc: compiled {len(names)} kernels before serving ({', '.join(names)}) "
                f"in {time.perf_counter() - start:.1f} s")
    return names
