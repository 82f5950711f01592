"""Builds the tiered pool, its allocator and the compressed radix cache from a KVCConfig.

The scheduler hooks and the CPU demo both call these, so the demo exercises the serving path.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
from sglang.srt.mem_cache.cache_init_params import CacheInitParams

from sglang_kvc.allocator import make_tiered_allocator
from sglang_kvc.compressed_cache import CompressedRadixCache
from sglang_kvc.config import KVCConfig
from sglang_kvc.layout import GIB, KVShape
from sglang_kvc.pool import TieredKVPool

logger = logging.getLogger(__name__)


def kernel_ops_class():
    from sglang_kvc.kernels.ops import TritonKVOps

    return TritonKVOps


def default_kv_ops(device) -> Optional[object]:
    """Triton kernels on the GPU, the torch reference (None) on the CPU."""
    if torch.device(device).type != "cuda":
        return None
    return kernel_ops_class()()


def build_tiered_pools(config: KVCConfig, kv_shape: KVShape, page_size: int, budget_bytes: float,
                       device="cpu", dtype=torch.bfloat16, start_layer: Optional[int] = None,
                       end_layer: Optional[int] = None, need_sort: bool = False,
                       enable_memory_saver: bool = False, min_write_tokens: int = 0
                       ) -> Tuple[TieredKVPool, object]:
    layout = config.build_layout(kv_shape, page_size, budget_bytes, min_write_tokens)
    pool = TieredKVPool(layout, dtype=dtype, device=device, enable_memory_saver=enable_memory_saver,
                        start_layer=start_layer, end_layer=end_layer, ops=default_kv_ops(device))
    allocator = make_tiered_allocator(pool, device=device, need_sort=need_sort)
    bf16_tokens = int(budget_bytes // layout.bf16_bytes_per_token())
    logger.info(
        f"sglang-kvc: KV budget {budget_bytes / GIB:.2f} GB holds {layout.total_capacity_tokens} tokens "
        f"over tiers ({layout.total_capacity_tokens / max(bf16_tokens, 1):.2f}x the {bf16_tokens} of "
        f"bf16); write tier {layout.codecs[0].name}: {layout.capacity_tokens(0)} tokens")
    return pool, allocator


def build_tree_cache(params: CacheInitParams, config: KVCConfig) -> CompressedRadixCache:
    return CompressedRadixCache(params, policy=config.policy, min_hit_bits=config.min_hit_bits)
