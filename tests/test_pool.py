import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixCache

from sglang_kvc.allocator import TierFullError
from sglang_kvc.layout import KVShape, TierLayout
from sglang_kvc.tiers import TierSpecError, parse_ladder
from tests.sglang_parts import SMALL_SHAPE, build_pool, cache_params, key, write_random


def test_index_space_is_split_into_page_aligned_ranges():
    pool, allocator = build_pool(tokens=(64, 32, 128), page_size=4)
    layout = pool.layout
    assert layout.first_page == (1, 17, 25) and layout.total_pages == 57
    assert [layout.capacity_tokens(t) for t in range(3)] == [64, 32, 128]
    pages = torch.tensor([0, 1, 16, 17, 24, 25, 56])
    assert layout.tier_of_pages(pages).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert pool.tier_of_page.tolist() == layout.tier_of_pages(torch.arange(57)).tolist()
    assert allocator.available_size() == 64
    assert pool.size == 64 + 32 + 128


def test_alloc_serves_write_tier_and_free_routes_by_range():
    pool, allocator = build_pool(page_size=4)
    slots = allocator.alloc(16)
    assert pool.layout.tier_of_slots(slots).eq(0).all()
    lower = allocator.alloc_pages(2, 3)
    assert pool.layout.tier_of_pages(lower).eq(2).all()
    assert allocator.free_tokens(2) == 64 - 12
    allocator.free(torch.cat([slots, pool.pages_to_slots(lower)]))
    assert [allocator.free_tokens(t) for t in range(3)] == [64, 64, 64]
    allocator.check_free_lists()


def test_free_group_defers_and_routes():
    pool, allocator = build_pool(page_size=1)
    slots = allocator.alloc(5)
    lower = allocator.alloc_pages(1, 4)
    allocator.free_group_begin()
    allocator.free(slots)
    allocator.free(lower)
    assert allocator.free_tokens(1) == 60
    allocator.free_group_end()
    assert allocator.free_tokens(0) == 64 and allocator.free_tokens(1) == 64


@pytest.mark.parametrize("page_size", [1, 4])
def test_write_read_and_demote_keep_data_within_bounds(page_size):
    pool, allocator = build_pool(page_size=page_size)
    slots = allocator.alloc(16)
    written = write_random(pool, slots, seed=3)
    for layer, (k, v) in written.items():
        rk, rv = pool.read_tokens(layer, slots)
        assert torch.equal(rk, k) and torch.equal(rv, v)  # bf16 write tier is exact
    mid = allocator.demote(slots, 1)
    low = allocator.demote(mid, 2)
    assert pool.layout.tier_of_slots(low).eq(2).all()
    assert [allocator.used_tokens(t) for t in range(3)] == [0, 0, 16]
    for layer, (k, v) in written.items():
        codec_mid, codec_low = pool.layout.codecs[1], pool.layout.codecs[2]
        rk, rv = pool.read_tokens(layer, low)
        k_mid, v_mid = codec_mid.k.dequantize(*codec_mid.k.quantize(k)), codec_mid.v.dequantize(*codec_mid.v.quantize(v))
        assert bool(((rk - k).abs() <= codec_mid.k.error_bound(k) + codec_low.k.error_bound(k_mid) + 1e-6).all())
        assert bool(((rv - v).abs() <= codec_mid.v.error_bound(v) + codec_low.v.error_bound(v_mid) + 1e-6).all())


def test_demote_refuses_when_target_is_full_and_keeps_state():
    pool, allocator = build_pool(tokens=(64, 8, 8), page_size=4)
    slots = allocator.alloc(16)
    with pytest.raises(TierFullError, match="free tokens"):
        allocator.demote(slots, 1)
    assert allocator.free_tokens(1) == 8 and allocator.used_tokens(0) == 16


def test_demote_rejects_bad_requests():
    pool, allocator = build_pool(page_size=4)
    slots = allocator.alloc(8)
    with pytest.raises(ValueError, match="whole pages"):
        allocator.demote(slots[:6], 1)
    with pytest.raises(ValueError, match="cannot demote"):
        allocator.demote(allocator.demote(slots, 2), 1)


def test_quantized_write_tier_is_quantized_on_write():
    pool, allocator = build_pool(ladder="k8v8,k4v2", tokens=(32, 32), page_size=1)
    slots = allocator.alloc(8)
    written = write_random(pool, slots, seed=5)
    codec = pool.layout.codecs[0]
    k, v = written[1]
    rk, rv = pool.read_tokens(1, slots)
    assert bool(((rk - k).abs() <= codec.k.error_bound(k)).all())
    assert not torch.equal(rk, k)


def test_budget_sizing_and_report():
    shape = KVShape(num_layers=4, num_kv_heads=2, head_dim=64)
    specs = parse_ladder("bf16,k8v8,k4v2")
    layout = TierLayout.from_budget(specs, shape, 16, budget_bytes=64 << 20, fractions=(0.5, 0.25, 0.25))
    assert layout.total_bytes() <= 64 << 20
    rows = layout.report()
    assert rows[0]["tokens_per_gib_vs_bf16"] == pytest.approx(1.0)
    assert rows[2]["tokens_per_gib_vs_bf16"] > 3.5
    bf16_only = TierLayout.from_budget(parse_ladder("bf16"), shape, 16, budget_bytes=64 << 20)
    assert layout.total_capacity_tokens > 1.8 * bf16_only.total_capacity_tokens


@pytest.mark.parametrize("kwargs,fragment", [
    ({"budget_bytes": 1000}, "too small for one page per tier"),
    ({"budget_bytes": 1 << 30, "fractions": (0.5, 0.5)}, "one per tier"),
    ({"budget_bytes": 1 << 30, "fractions": (0.5, 0.6, -0.1)}, "positive and sum to 1"),
])
def test_bad_budgets_name_the_fix(kwargs, fragment):
    with pytest.raises(TierSpecError, match=fragment):
        TierLayout.from_budget(parse_ladder("bf16,k8v8,k4v2"), SMALL_SHAPE, 4, **kwargs)


def test_channel_grouped_write_tier_is_refused():
    with pytest.raises(TierSpecError, match="write tier"):
        build_pool(ladder="k8v8-kc,k4v2", tokens=(64, 64), page_size=8)


def test_plain_buffer_reads_point_to_the_backend():
    pool, _ = build_pool()
    with pytest.raises(NotImplementedError, match="kvc_triton"):
        pool.get_key_buffer(0)


@pytest.mark.parametrize("page_size", [1, 4])
def test_real_radix_cache_over_tiered_pool(page_size):
    pool, allocator = build_pool(page_size=page_size)
    cache = RadixCache(cache_params(allocator, page_size))
    first = allocator.alloc(16)
    cache.insert(InsertParams(key=key(range(16)), value=first))
    second = allocator.alloc(8)
    cache.insert(InsertParams(key=key(list(range(8)) + list(range(100, 108))), value=torch.cat([first[:8], second])))
    match = cache.match_prefix(MatchPrefixParams(key=key(list(range(12)) + [999] * 4)))
    assert match.device_indices.tolist() == first[:12].tolist()
    assert cache.evictable_size() == 24
    assert allocator.available_size() == 64 - 24
    cache.evict(EvictParams(num_tokens=24))
    assert cache.evictable_size() == 0
    assert allocator.available_size() == 64
    allocator.check_free_lists()
