import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixCache

from sglang_kvc.allocator import RESERVE_FRAMES, TierFullError
from sglang_kvc.layout import FrameLayout, KVShape
from sglang_kvc.tiers import TierSpecError, parse_ladder
from tests.sglang_parts import SMALL_SHAPE, build_pool, cache_params, key, write_random


def test_page_ids_map_to_frames_and_slots():
    pool, allocator = build_pool(frames=8, page_size=4)
    layout = pool.layout
    assert layout.pages_per_frame == (2, 3, 8) and layout.num_frames == 8 + RESERVE_FRAMES
    assert layout.first_page == (0, 20, 50) and layout.total_pages == 50 + 80
    assert layout.frame_page_ids(1, [2, 5]).tolist() == [26, 27, 28, 35, 36, 37]
    assert layout.frame_of_pages(2, torch.tensor([50, 57, 58])).tolist() == [0, 0, 1]
    pages = torch.tensor([0, 19, 20, 49, 50, 129])
    assert layout.tier_of_pages(pages).tolist() == [0, 0, 1, 1, 2, 2]
    assert pool.tier_of_page.tolist() == layout.tier_of_pages(torch.arange(130)).tolist()
    # SGLang sees the regular frames' write pages but the padding page
    assert allocator.size == (8 * 2 - 1) * 4 == allocator.available_size()
    assert pool.arena.shape == (SMALL_SHAPE.num_layers, 10, layout.frame_bytes)


def test_tiers_alias_one_arena_by_frame():
    pool, _ = build_pool(frames=8, page_size=4)
    layout = pool.layout
    slots = pool.pages_to_slots(layout.frame_page_ids(2, [3]))  # tier 2's view of frame 3
    pool.tiers[2].k.write(0, pool.local_slots(2, slots), torch.randn(len(slots), 2, 32))
    touched = (pool.arena[0] != 0).any(-1).nonzero().flatten().tolist()
    assert touched == [3]
    assert bool((pool.arena[1] == 0).all())  # other layers untouched


@pytest.mark.parametrize("page_size", [1, 4])
def test_write_read_demote_and_copy_keep_data_within_bounds(page_size):
    pool, allocator = build_pool(page_size=page_size)
    slots = allocator.alloc(8)
    written = write_random(pool, slots, seed=3)
    for layer, (k, v) in written.items():
        rk, rv = pool.read_tokens(layer, slots)
        assert torch.equal(rk, k) and torch.equal(rv, v)  # bf16 write tier is exact
    mid, mid_pages = allocator.demote(slots, 0, 1)
    low, low_pages = allocator.demote(mid, 1, 2, mid_pages)
    assert pool.layout.tier_of_slots(low).eq(2).all()
    assert allocator.used_tokens(1) == 0 and allocator.used_tokens(2) == 8
    allocator.check_books()
    codec_mid, codec_low = pool.layout.codecs[1], pool.layout.codecs[2]
    for layer, (k, v) in written.items():
        rk, rv = pool.read_tokens(layer, low)
        k_mid, v_mid = codec_mid.k.dequantize(*codec_mid.k.quantize(k)), codec_mid.v.dequantize(*codec_mid.v.quantize(v))
        assert bool(((rk - k).abs() <= codec_mid.k.error_bound(k) + codec_low.k.error_bound(k_mid) + 1e-6).all())
        assert bool(((rv - v).abs() <= codec_mid.v.error_bound(v) + codec_low.v.error_bound(v_mid) + 1e-6).all())
    before = [pool.read_tokens(layer, low) for layer in range(2)]
    dst = allocator.alloc_lower(2, len(low_pages))
    pool.copy_pages(2, torch.as_tensor(low_pages), torch.as_tensor(dst))
    for layer in range(2):
        after = pool.read_tokens(layer, pool.pages_to_slots(torch.as_tensor(dst)))
        assert torch.equal(after[0], before[layer][0]) and torch.equal(after[1], before[layer][1])


def test_demote_refuses_when_no_frame_is_left_and_keeps_state():
    pool, allocator = build_pool(frames=2, page_size=4)
    slots = allocator.alloc(allocator.available_size())  # every visible frame is the write tier's
    assert allocator.take_frames(1, 1) == 1  # the reserve still lends
    assert allocator.take_frames(1, 5) == 1
    assert allocator.alloc_lower(1, 6) is not None
    with pytest.raises(TierFullError, match="no free frame"):
        allocator.demote(slots[:4], 0, 1)
    assert allocator.used_tokens(0) == len(slots)
    allocator.check_books()


def test_demote_rejects_bad_requests():
    pool, allocator = build_pool(page_size=4)
    slots = allocator.alloc(8)
    with pytest.raises(ValueError, match="whole pages"):
        allocator.demote(slots[:6], 0, 1)
    with pytest.raises(ValueError, match="cannot demote"):
        allocator.demote(slots, 1, 1)
    with pytest.raises(ValueError, match="host ids"):
        allocator.demote(slots, 1, 2)


def test_frames_move_between_tiers_and_back():
    pool, allocator = build_pool(frames=8, page_size=4)
    total = allocator.available_size()
    assert allocator.take_frames(2, 3) == 3
    # frame 0 holds SGLang's padding page: the write tier's for good
    assert allocator.frames_per_tier() == [1, 0, 3] and len(allocator.free_frames()) == 4
    assert allocator.available_size() == total - 3 * allocator.frame_tokens
    pages = allocator.alloc_lower(2, 20)  # fills 2.5 of its frames, fullest first
    assert len(pages) == 20 and allocator.free_tokens(2) == 4 * 4
    allocator.free_lower(2, pages)
    # emptied frames go back: to the write tier (the reserve is full)
    assert allocator.frames_per_tier() == [1, 0, 0] and allocator.available_size() == total
    allocator.check_books()


def test_reserve_lends_when_nothing_is_free_and_is_paid_back_first():
    pool, allocator = build_pool(frames=4, page_size=4)
    slots = allocator.alloc(allocator.available_size())
    assert len(allocator.free_frames()) == 0
    assert allocator.take_frames(1, 1) == 1 and allocator.borrowed_frames() == 1
    pages = allocator.alloc_lower(1, 3)
    allocator.free(slots[4:12])  # pages 2 and 3: frame 1 frees (frame 0 keeps the padding page)
    allocator.refill_reserve()
    assert allocator.borrowed_frames() == 0 and len(allocator.free_frames()) == 0
    allocator.free_lower(1, pages)
    assert allocator.available_size() == 8  # the emptied frame went back to the write tier
    allocator.check_books()


def test_quantized_write_tier_is_quantized_on_write():
    pool, allocator = build_pool(ladder="k8v8,k4v2", page_size=1)
    slots = allocator.alloc(8)
    written = write_random(pool, slots, seed=5)
    codec = pool.layout.codecs[0]
    k, v = written[1]
    rk, rv = pool.read_tokens(1, slots)
    assert bool(((rk - k).abs() <= codec.k.error_bound(k)).all())
    assert not torch.equal(rk, k)


def test_arena_matches_stock_bytes_and_reports_waste():
    shape = KVShape(num_layers=4, num_kv_heads=2, head_dim=64)
    layout = FrameLayout.for_bf16_pages(parse_ladder("bf16,k8v8,k4v4,k4v2,k2v2"), shape, 16, bf16_pages=1000,
                                        frame_pages=4, extra_frames=2)
    assert layout.num_frames == 251 + 2  # ceil((1000 + padding) / 4) + reserve
    rows = layout.report()
    assert [r["pages_per_frame"] for r in rows] == [4, 7, 14, 18, 25]
    assert rows[0]["packing_waste"] == 0 and rows[3]["tokens_per_gib_vs_bf16"] == pytest.approx(4.5)
    budget = FrameLayout.from_budget(parse_ladder("bf16"), shape, 16, budget_bytes=64 << 20)
    assert budget.total_bytes() <= 64 << 20 < budget.total_bytes() + budget.frame_bytes * shape.num_layers


def test_bad_budgets_name_the_fix():
    with pytest.raises(TierSpecError, match="smaller than one frame"):
        FrameLayout.from_budget(parse_ladder("bf16,k8v8,k4v2"), SMALL_SHAPE, 4, budget_bytes=1000)


def test_channel_grouped_write_tier_is_refused():
    with pytest.raises(TierSpecError, match="write tier"):
        build_pool(ladder="k8v8-kc,k4v2", page_size=8)


def test_plain_buffer_reads_point_to_the_backend():
    pool, _ = build_pool()
    with pytest.raises(NotImplementedError, match="kvc_triton"):
        pool.get_key_buffer(0)


@pytest.mark.parametrize("page_size", [1, 4])
def test_real_radix_cache_over_the_arena(page_size):
    pool, allocator = build_pool(frames=32, page_size=page_size)
    total = allocator.available_size()
    cache = RadixCache(cache_params(allocator, page_size))
    first = allocator.alloc(16)
    cache.insert(InsertParams(key=key(range(16)), value=first))
    second = allocator.alloc(8)
    cache.insert(InsertParams(key=key(list(range(8)) + list(range(100, 108))), value=torch.cat([first[:8], second])))
    match = cache.match_prefix(MatchPrefixParams(key=key(list(range(12)) + [999] * 4)))
    assert match.device_indices.tolist() == first[:12].tolist()
    assert cache.evictable_size() == 24
    assert allocator.available_size() == total - 24
    cache.evict(EvictParams(num_tokens=24))
    assert cache.evictable_size() == 0
    assert allocator.available_size() == total
    allocator.check_books()


def test_demotion_may_skip_a_tier_in_one_batch():
    pool, allocator = build_pool(page_size=4)
    slots = allocator.alloc(8)
    written = write_random(pool, slots, seed=9)
    low, pages = allocator.demote(slots, 0, 2)  # bf16 -> k4v2 directly, all layers at once
    assert pool.layout.tier_of_slots(low).eq(2).all() and allocator.used_tokens(0) == 0
    codec = pool.layout.codecs[2]
    for layer, (k, v) in written.items():
        rk, rv = pool.read_tokens(layer, low)
        assert bool(((rk - k).abs() <= codec.k.error_bound(k) + 1e-6).all())
        assert bool(((rv - v).abs() <= codec.v.error_bound(v) + 1e-6).all())
    allocator.check_books()


def test_page_moves_are_ordered_on_the_device_without_a_host_sync(monkeypatch):
    """A move waits (on the device) for the forward passes already launched on SGLang's forward
    stream and makes the next forward wait for it; it never syncs with the host."""
    pool, allocator = build_pool(page_size=4)
    slots = allocator.alloc(8)
    write_random(pool, slots, seed=1)
    pages = slots[::4] // 4
    dst = torch.as_tensor(allocator.alloc_lower(1, len(pages)))
    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

    forward, schedule = Stream("forward"), Stream("schedule")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: schedule)

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync on the move path")

    for name in ("cpu", "item", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    pool.forward_stream = forward
    pool.move_pages(0, pages, 1, dst)
    assert events == ["schedule waits for forward", "forward waits for schedule"]
    pool.copy_pages(1, dst, dst.flip(0))
    assert events[2:] == ["schedule waits for forward", "forward waits for schedule"]
