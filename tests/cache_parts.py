"""A CompressedRadixCache over a small tiered pool, with a driver and synthetic KV (shared by tests)."""

import torch

from sglang_kvc.compressed_cache import CompressedRadixCache
from sglang_kvc.replay import CacheDriver, SyntheticKV
from tests.sglang_parts import SMALL_SHAPE, build_pool, cache_params


def build_cache(ladder="bf16,k8v8,k4v2", frames=8, page_size=4, policy="lru", min_hit_bits=0.0, write_kv=True,
                watermark=0.0, frame_pages=2, min_demotion_yield=0.0):
    pool, allocator = build_pool(ladder=ladder, frames=frames, page_size=page_size, frame_pages=frame_pages)
    cache = CompressedRadixCache(cache_params(allocator, page_size), policy=policy, min_hit_bits=min_hit_bits,
                                 watermark=watermark, min_demotion_yield=min_demotion_yield)
    kv_source = SyntheticKV(SMALL_SHAPE.num_kv_heads, SMALL_SHAPE.head_dim) if write_kv else None
    return cache, CacheDriver(cache, allocator, pool, kv_source)


def expected_stored(cache, tokens, start_pos, tier, layer):
    """The KV written for ``tokens`` at ``start_pos`` and the error bounds of each codec step of the
    chain write tier -> ... -> ``tier`` (demotion goes one tier at a time): ``[(bound_k, bound_v)]``,
    each in its tier's stored basis."""
    k, v = SyntheticKV(SMALL_SHAPE.num_kv_heads, SMALL_SHAPE.head_dim).kv(tokens, start_pos, layer)
    cur_k, cur_v, steps = k, v, []
    for codec in cache.layout.codecs[: tier + 1]:
        if codec.spec.is_quantized:
            steps.append((codec.k.error_bound(cur_k), codec.v.error_bound(cur_v), codec.k.rotate))
        cur_k = codec.k.dequantize(*codec.k.quantize(cur_k))
        cur_v = codec.v.dequantize(*codec.v.quantize(cur_v))
    return (k, v), steps


def node_start_pos(node):
    return node.kvc_depth


def node_tokens(node):
    return list(node.key.token_ids)


def check_node_data(cache, pool, node, layers=(0,)):
    """A node's KV reads back within the summed bounds of its codec chain: elementwise when no
    step rotates keys, else per head vector in L2 (rotation preserves L2 norms)."""
    for layer in layers:
        (k, v), steps = expected_stored(cache, node_tokens(node), node_start_pos(node), node.kvc_tier, layer)
        rk, rv = pool.read_tokens(layer, node.value)
        bound_v = sum((bv for _, bv, _ in steps), torch.zeros_like(v))
        assert bool(((rv - v).abs() <= bound_v + 1e-6).all()), f"V of tier {node.kvc_tier} beyond bound"
        if any(rotated for _, _, rotated in steps):
            bound_k = sum((bk.norm(dim=-1) for bk, _, _ in steps), torch.zeros(k.shape[:-1]))
            ok = (rk - k).norm(dim=-1) <= bound_k * (1 + 1e-4) + 1e-5
        else:
            ok = (rk - k).abs() <= sum((bk for bk, _, _ in steps), torch.zeros_like(k)) + 1e-6
        assert bool(ok.all()), f"K of tier {node.kvc_tier} beyond bound"


def all_nodes(cache):
    stack, out = list(cache.root_node.children.values()), []
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


def evict_everything(cache):
    """Drop every unlocked node of every tier (used to check for leaks)."""
    for _ in range(cache.num_tiers * 4):
        for tier in range(cache.num_tiers):
            cache._drop(tier, 1 << 40)


def sparse_middle_tier():
    """A cache whose tier-1 frames each have holes: six short sessions demoted, every other tier-1
    node then dropped. Returns (cache, driver, tier-1 frames before compaction)."""
    cache, driver = build_cache(frames=16, page_size=4)
    for seed in range(6):
        driver.run([seed * 50 + i for i in range(9)])
    cache.demote(0, 48)
    frames_before = driver.allocator.frames_per_tier()[1]
    for node in sorted(cache.tier_nodes[1], key=lambda n: n.id)[::2]:
        cache._free_node_pages(node)
        cache._delete_leaf(node)
    return cache, driver, frames_before
