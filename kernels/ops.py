"""``TritonKVOps``: the pool's write / requantize operations through the Triton kernels.

Drop-in for ``sglang_kvc.pool.ReferenceKVOps``: ``TieredKVPool(layout, ops=TritonKVOps())``.
Results equal the reference bit for bit except on tiers that rotate keys, where a code may differ
by one step (see ``quantize.py``); both stay within the codec's error bound.
"""

from __future__ import annotations

import torch

from .quantize import quantize_write
from .requantize import requantize_pages


class TritonKVOps:
    """Stateless; every call is one kernel launch (write: K and V of one layer; requantize: all
    layers, K and V, of a batch of pages)."""

    name = "triton"

    def write(self, pool, tier: int, layer: int, local_slots, cache_k: torch.Tensor, cache_v: torch.Tensor) -> None:
        quantize_write(pool, tier, layer, local_slots, cache_k, cache_v)

    def requantize(self, pool, src_tier: int, src_local_pages: torch.Tensor, dst_tier: int,
                   dst_local_pages: torch.Tensor) -> None:
        requantize_pages(pool, src_tier, src_local_pages, dst_tier, dst_local_pages)
