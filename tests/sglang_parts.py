"""Builds real SGLang objects over the tiered pool the way SGLang's scheduler does (shared by tests)."""

from array import array

import torch
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey

from sglang_kvc.allocator import RESERVE_FRAMES, make_tiered_allocator
from sglang_kvc.layout import FrameLayout, KVShape
from sglang_kvc.pool import TieredKVPool
from sglang_kvc.tiers import parse_ladder

SMALL_SHAPE = KVShape(num_layers=2, num_kv_heads=2, head_dim=32)


class FakeLayer:
    """Stands in for RadixAttention: the pool only reads ``layer_id``."""

    def __init__(self, layer_id):
        self.layer_id = layer_id


def build_pool(ladder="bf16,k8v8,k4v2", frames=8, page_size=4, shape=SMALL_SHAPE, frame_pages=2, size=None):
    """A pool of ``frames`` regular frames (+ the allocator's reserve) and its allocator."""
    layout = FrameLayout.from_frames(parse_ladder(ladder), shape, page_size, frames + RESERVE_FRAMES, frame_pages)
    pool = TieredKVPool(layout, device="cpu")
    allocator = make_tiered_allocator(pool, size=size, device="cpu")
    return pool, allocator


def cache_params(allocator, page_size, **extra):
    req_to_token = ReqToTokenPool(size=16, max_context_len=1024, device="cpu", enable_memory_saver=False)
    return CacheInitParams(disable=False, req_to_token_pool=req_to_token,
                           token_to_kv_pool_allocator=allocator, page_size=page_size, **extra)


def key(tokens):
    return RadixKey(array("q", tokens))


def write_random(pool, slots, seed):
    """Write random K/V for every layer at ``slots``; returns {layer: (k, v)} as written."""
    gen = torch.Generator().manual_seed(seed)
    written = {}
    shape = pool.layout.kv_shape
    for layer in range(shape.num_layers):
        k = torch.randn(len(slots), shape.num_kv_heads, shape.head_dim, generator=gen).to(torch.bfloat16)
        v = torch.randn(len(slots), shape.num_kv_heads, shape.head_dim, generator=gen).to(torch.bfloat16)
        pool.set_kv_buffer(FakeLayer(layer), slots, k, v)
        written[layer] = (k.float(), v.float())
    return written
