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
from sglang_kvc.layout import KVShape
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


def build_tiered_pools(config: KVCConfig, kv_shape: KVShape, page_size: int, stock_bf16_tokens: int,
                       device="cpu", dtype=torch.bfloat16, start_layer: Optional[int] = None,
                       end_layer: Optional[int] = None, need_sort: bool = True,
                       enable_memory_saver: bool = False) -> Tuple[TieredKVPool, object]:
    """The arena holding stock bf16's KV bytes at ``stock_bf16_tokens`` and its allocator. With a
    bf16 write tier the scheduler's token count (``allocator.size``) equals stock bf16's exactly;
    with a quantized write tier it is every write-tier page of the arena."""
    layout = config.build_layout(kv_shape, page_size, stock_bf16_tokens)
    pool = TieredKVPool(layout, dtype=dtype, device=device, enable_memory_saver=enable_memory_saver,
                        start_layer=start_layer, end_layer=end_layer, ops=default_kv_ops(device))
    size = stock_bf16_tokens if not layout.codecs[0].spec.is_quantized else None
    allocator = make_tiered_allocator(pool, size=size, device=device, need_sort=need_sort)
    logger.info(
        f"sglang-kvc: max_total_num_tokens={allocator.size} (stock bf16 at this budget: {stock_bf16_tokens}); "
        f"arena: {layout.describe()}; {pool.mem_usage:.2f} GB")
    return pool, allocator


def build_tree_cache(params: CacheInitParams, config: KVCConfig) -> CompressedRadixCache:
    return CompressedRadixCache(params, policy=config.policy, min_hit_bits=config.min_hit_bits,
                                watermark=config.watermark, min_demotion_yield=config.min_demotion_yield)
