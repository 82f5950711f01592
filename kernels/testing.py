"""Builders shared by the kernel tests and the benchmark: pools filled with known data, and
sequences whose tokens sit in chosen tiers."""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import torch

from sglang_kvc.layout import KVShape, TierLayout
from sglang_kvc.pool import TieredKVPool
from sglang_kvc.tiers import parse_ladder


def kernel_test_device() -> torch.device:
    """CUDA when a GPU is there and the interpreter is off, else CPU (TRITON_INTERPRET=1)."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return torch.device("cuda")
    return torch.device("cpu")


def full_size() -> bool:
    return kernel_test_device().type == "cuda"


def make_pool(ladder: str, head_dim: int, kv_heads: int, page_size: int, tokens_per_tier: int,
              layers: int = 2, device=None, ops=None) -> TieredKVPool:
    specs = parse_ladder(ladder) if isinstance(ladder, str) else ladder
    layout = TierLayout.from_tokens(specs, KVShape(layers, kv_heads, head_dim), page_size,
                                    [tokens_per_tier] * len(specs))
    return TieredKVPool(layout, device=str(device or kernel_test_device()), ops=ops)


def fill_tiers(pool: TieredKVPool, seed: int = 0, scale: float = 1.0) -> Dict[Tuple[int, int], Tuple]:
    """Quantize random K/V (bf16-representable) into every slot of every tier, directly with the
    codec (one quantization each); returns {(tier, layer): (global slots, k, v)} as written."""
    gen = torch.Generator().manual_seed(seed)
    written = {}
    layout, ps = pool.layout, pool.page_size
    for t in range(layout.num_tiers):
        start, end = layout.tier_pages(t)
        slots = torch.arange(start * ps, end * ps)
        for layer in range(pool.layer_num):
            k = (torch.randn(len(slots), pool.head_num, pool.head_dim, generator=gen) * scale).bfloat16().float()
            v = (torch.randn(len(slots), pool.head_num, pool.v_head_dim, generator=gen) * scale).bfloat16().float()
            dev = pool.tier_of_page.device
            local = pool.local_slots(t, slots).to(dev)
            pool.tiers[t].k.write(layer, local, k.to(dev))
            pool.tiers[t].v.write(layer, local, v.to(dev))
            written[(t, layer)] = (slots, k, v)
    return written


def tier_runs_sequence(pool: TieredKVPool, length: int, tiers: Sequence[int], gen: torch.Generator,
                       run_pages: int = 1) -> torch.Tensor:
    """Global slots of ``length`` tokens laid out as pages (whole pages in order, like radix-tree
    values) whose tiers cycle through ``tiers`` every ``run_pages`` pages; random distinct pages."""
    layout, ps = pool.layout, pool.page_size
    pages_needed = -(-length // ps)
    chosen: Dict[int, List[int]] = {}
    slots = []
    for p in range(pages_needed):
        t = tiers[(p // run_pages) % len(tiers)]
        start, end = layout.tier_pages(t)
        if t not in chosen:
            chosen[t] = (torch.randperm(end - start, generator=gen) + start).tolist()
        page = chosen[t].pop()
        slots.extend(range(page * ps, page * ps + ps))
    return torch.tensor(slots[:length], dtype=torch.int64)


def batch_indices(sequences: Sequence[torch.Tensor], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kv_indptr int32 ``[B+1]``, kv_indices int64) in SGLang's Triton-backend convention."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    indptr = torch.zeros(len(sequences) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(lengths, 0)
    indices = torch.cat(list(sequences)) if sequences else torch.zeros(0, dtype=torch.int64)
    return indptr.to(device), indices.to(device)
