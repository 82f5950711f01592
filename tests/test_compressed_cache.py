import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams

from sglang_kvc.policy import CostAwarePolicy, make_policy

from tests.cache_parts import all_nodes, build_cache, check_node_data, evict_everything, sparse_middle_tier
from tests.sglang_parts import key, write_random


def session(prefix_len, turn_tokens, seed):
    return list(range(1000, 1000 + prefix_len)) + [seed * 100 + i for i in range(turn_tokens)]


def test_new_kv_enters_write_tier_and_evict_demotes_first():
    cache, driver = build_cache(frames=16, page_size=4)
    allocator = driver.allocator
    for seed in range(5):
        driver.run([seed * 50 + i for i in range(17)])
    assert cache.tier_cached == [80, 0, 0] and cache.evictable_size() == 80
    target = allocator.available_size() + 16
    cache.evict(EvictParams(num_tokens=target))
    assert allocator.available_size() >= target
    assert cache.tier_cached[1] >= 32 and sum(cache.tier_cached) == 80 and cache.counters.dropped == [0, 0, 0]
    cache.check_invariants()
    for node in all_nodes(cache):
        check_node_data(cache, driver.pool, node, layers=(0, 1))


def test_admission_sees_the_whole_arena():
    cache, driver = build_cache(frames=8, page_size=4)
    allocator = driver.allocator
    assert allocator.available_size() + cache.evictable_size() == allocator.size == 60
    request = driver.start(list(range(57)))  # one request may use every write page
    assert request is not None and allocator.available_size() == 0
    driver.finish(request)
    cache.check_invariants()


def test_demotion_cascade_drops_only_from_the_last_tier():
    cache, driver = build_cache(frames=8, page_size=4)
    for seed in range(12):  # far more history than the arena holds at bf16
        driver.run([seed * 50 + i for i in range(17)])
        cache.check_invariants()
    assert cache.tier_cached[1] > 0 and cache.tier_cached[2] > 0
    assert sum(cache.tier_cached) > driver.allocator.size  # more history than stock bf16 could keep
    assert cache.counters.dropped[1] == 0
    assert cache.counters.demoted_in[2] > 0
    for node in all_nodes(cache):
        check_node_data(cache, driver.pool, node)


def test_demotions_of_one_call_are_one_batch():
    cache, driver = build_cache(frames=16, page_size=4)
    for seed in range(4):
        driver.run([seed * 50 + i for i in range(9)])
    assert cache.tier_cached[0] == 32
    calls = []
    original = driver.allocator.demote
    driver.allocator.demote = lambda idx, *args: calls.append((len(idx), args[:2])) or original(idx, *args)
    cache.evict(EvictParams(num_tokens=driver.allocator.size))
    assert calls == [(32, (0, 1))]


def test_evict_more_than_exists_frees_what_it_can():
    cache, driver = build_cache(frames=8, page_size=4)
    driver.run(list(range(9)))
    holder = driver.start(list(range(33)))
    cache.evict(EvictParams(num_tokens=10_000))
    assert cache.tier_cached == [8, 0, 0]  # locked by the running request
    assert driver.allocator.available_size() == driver.allocator.size - 8 - len(holder.new_slots)
    cache.check_invariants(driver.in_use_per_tier())
    driver.finish(holder)


def test_locked_nodes_are_never_demoted_or_dropped():
    cache, driver = build_cache(frames=8, page_size=4)
    driver.run(list(range(17)))
    holder = driver.start(list(range(17)) + [99, 98, 97, 96])  # locks the 16 cached tokens
    values = holder.prefix_slots.clone()
    result = cache.evict(EvictParams(num_tokens=driver.allocator.size))
    assert result.num_tokens_evicted == 0
    assert torch.equal(driver.match(list(range(16)) + [5]).device_indices, values)
    assert cache.tier_cached[0] == 16 and cache.evictable_size() == 0
    cache.check_invariants(driver.in_use_per_tier())
    driver.finish(holder)
    assert cache.evictable_size() > 0
    cache.evict(EvictParams(num_tokens=driver.allocator.size))
    assert driver.allocator.available_size() == driver.allocator.size
    cache.check_invariants()


def test_split_of_a_demoted_node():
    cache, driver = build_cache(frames=8, page_size=4)
    driver.run(list(range(17)))
    cache.demote(0, 16)
    (node,) = all_nodes(cache)
    assert node.kvc_tier == 1
    match = driver.match(list(range(8)) + [500, 501, 502, 503])
    assert len(match.device_indices) == 8
    nodes = all_nodes(cache)
    assert len(nodes) == 2 and {n.kvc_tier for n in nodes} == {1}
    assert sorted(n.kvc_depth for n in nodes) == [0, 8]
    cache.check_invariants()
    for n in nodes:
        check_node_data(cache, driver.pool, n, layers=(0, 1))


def test_quality_floor_stops_match_and_fresh_kv_replaces_low_copy():
    cache, driver = build_cache(frames=8, page_size=4, min_hit_bits=4)
    driver.run(list(range(17)))
    cache.demote(0, 16)
    cache.demote(1, 16)  # now k4v2 (3 bits on average) is below the 4-bit floor
    (node,) = all_nodes(cache)
    assert node.kvc_tier == 2
    assert len(driver.match(list(range(17))).device_indices) == 0
    hit = driver.run(list(range(17)) + [900])
    assert hit == 0
    assert cache.counters.refreshed == 16
    (node,) = all_nodes(cache)
    assert node.kvc_tier == 0 and cache.tier_cached == [16, 0, 0]
    assert len(driver.match(list(range(17))).device_indices) == 16
    cache.check_invariants()
    check_node_data(cache, driver.pool, node)


def test_hits_are_counted_per_tier():
    cache, driver = build_cache(frames=8, page_size=4)
    driver.run(list(range(17)))
    cache.demote(0, 16)
    assert driver.run(list(range(17)) + [1, 2, 3, 4]) == 16
    assert cache.counters.hits == [0, 16, 0]
    stats = cache.kvc_stats()
    assert stats["hit_tokens"] == [0, 16, 0] and stats["bytes_saved_vs_bf16"] > 0
    assert sum(stats["frames"]) + stats["free_frames"] + 2 == stats["total_frames"]


@pytest.mark.parametrize("page_size", [1, 4])
def test_no_leak_after_everything_is_dropped(page_size):
    cache, driver = build_cache(frames=16, page_size=page_size)
    for seed in range(12):
        driver.run([seed % 3] + [seed * 40 + i for i in range(7 * page_size)])
    cache.check_invariants()
    evict_everything(cache)
    driver.allocator.release_empty_frames()
    driver.allocator.refill_reserve()
    assert cache.tier_cached == [0, 0, 0]
    assert driver.allocator.available_size() == driver.allocator.size
    assert driver.allocator.frames_per_tier() == [1, 0, 0]
    cache.check_invariants()


def test_write_compaction_frees_whole_frames_and_keeps_data():
    cache, driver = build_cache(frames=8, page_size=4)
    allocator = driver.allocator
    slots = allocator.alloc(allocator.available_size())  # pages 1..15: frame f holds pages 2f, 2f+1
    write_random(driver.pool, slots, seed=1)
    for frame in range(1, 8):  # every frame: one cached page, one free page
        cached, free = slots[(2 * frame - 1) * 4:(2 * frame) * 4], slots[(2 * frame) * 4:(2 * frame + 1) * 4]
        cache.insert(InsertParams(key=key([frame * 10 + i for i in range(4)]), value=cached))
        allocator.free(free)
    allocator.free(slots[:4])  # page 1 (frame 0 keeps the padding page)
    assert len(allocator.free_frames()) == 0
    available = allocator.available_size()
    before = {n: driver.pool.read_tokens(0, n.value) for n in all_nodes(cache)}
    assert cache._compact_write(3) == 3
    assert len(allocator.free_frames()) == 3 and allocator.available_size() == available
    for node, (k, v) in before.items():
        rk, rv = driver.pool.read_tokens(0, node.value)
        assert torch.equal(rk, k) and torch.equal(rv, v)
    assert cache.counters.compacted[0] == 3 * 4
    cache.check_invariants()


def test_lower_compaction_gives_frames_back():
    cache, driver, frames_before = sparse_middle_tier()
    allocator = driver.allocator
    assert cache._compact_lower()
    assert allocator.frames_per_tier()[1] < frames_before
    cache.check_invariants()
    for node in all_nodes(cache):
        check_node_data(cache, driver.pool, node)


def test_watermark_demotes_ahead_of_need():
    cache, driver = build_cache(frames=8, page_size=4, watermark=0.4)
    driver.run(list(range(41)))
    assert driver.allocator.available_size() < cache.watermark_tokens
    cache.keep_watermark()
    assert driver.allocator.available_size() >= cache.watermark_tokens
    assert cache.tier_cached[1] > 0 and cache.counters.dropped[0] == 0
    cache.check_invariants()


@pytest.mark.parametrize("name", ["lru", "lfu", "cost"])
def test_policies_pick_the_expected_victim(name):
    cache, driver = build_cache(frames=16, page_size=4, policy=name)
    hot = list(range(100, 117))
    driver.run(hot)
    for _ in range(3):
        driver.run(hot + [1, 2, 3, 4])  # many hits on the hot node
    cold = list(range(300, 317))
    driver.run(cold)  # most recent, never hit again
    cache.demote(0, 4)
    demoted = [n.key.token_ids[0] for n in all_nodes(cache) if n.kvc_tier == 1]
    assert len(demoted) == 1
    if name == "lru":
        assert demoted[0] in (100, 116)  # the hot session was used before the cold one
    else:
        assert demoted[0] == 300


def test_cost_policy_prefers_deep_shared_prefixes():
    policy = CostAwarePolicy(clock=lambda: 100.0)

    class Node:
        def __init__(self, depth, length):
            self.kvc_depth, self.key, self.hit_count, self.last_access_time = depth, [0] * length, 0, 100.0

    assert policy.priority(Node(8000, 64)) > policy.priority(Node(0, 64))


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="lru, lfu, cost"):
        make_policy("random")


def test_equally_cold_nodes_demote_deepest_first():
    """Nodes of one matched path share an access time; the tie must not fall to set iteration
    order (which varies run to run): the deeper node goes first, as RadixCache evicts leaves first."""
    for trial in range(16):
        cache, driver = build_cache(frames=16, page_size=4, write_kv=False)
        shared = [1000 + trial * 100 + i for i in range(16)]
        driver.run(shared + [1])
        driver.run(shared + list(range(16)) + [2])
        driver.match(shared + list(range(16)) + [3])  # both nodes now share one access time
        cache.demote(0, 4)
        tiers = {n.key.token_ids[0]: n.kvc_tier for n in all_nodes(cache)}
        assert tiers == {shared[0]: 0, 0: 1}, f"trial {trial}: {tiers}"
        cache.check_invariants()


def test_a_cold_parent_with_a_hot_child_can_still_be_freed():
    """A demoted prefix whose new turn sits in the write tier is not a leaf; when its tier must
    give up room and no leaf is left, it goes with its subtree, so evictable tokens are freeable."""
    cache, driver = build_cache(frames=8, page_size=4)
    driver.run(list(range(17)))
    cache.demote(0, 16)
    cache.demote(1, 16)
    (parent,) = all_nodes(cache)
    assert parent.kvc_tier == 2
    driver.run(list(range(16)) + [500 + i for i in range(9)])
    assert {n.kvc_tier for n in all_nodes(cache)} == {0, 2}
    assert cache._drop(2, 16)
    assert all_nodes(cache) == [] and cache.counters.dropped == [8, 0, 16]
    cache.check_invariants()


def fill_past_pressure(ladder, frames, extra_sessions, watermark=0.0):
    """Sessions of 17 tokens (16 cached) until less than PRESSURE_SHARE of the write tier is free,
    then ``extra_sessions`` more (each admission evicts on demand: demotes, and drops in the last tier)."""
    from sglang_kvc.compressed_cache import PRESSURE_SHARE

    cache, driver = build_cache(ladder=ladder, frames=frames, page_size=4, write_kv=False, watermark=watermark)
    allocator, seed = driver.allocator, 0
    while allocator.available_size() >= PRESSURE_SHARE * allocator.size or extra_sessions > 0:
        if allocator.available_size() < PRESSURE_SHARE * allocator.size:
            extra_sessions -= 1
        driver.run([seed * 1000 + i for i in range(17)])
        seed += 1
    return cache, driver


@pytest.mark.parametrize("ladder, frames, extra_sessions, watermark", [
    ("k8v8,k4v4,k2v2", 8, 0, 0.0), ("k8v8,k4v4,k2v2", 16, 3, 0.0), ("bf16,k4v2", 16, 3, 0.0), ("bf16,k4v2", 32, 3, 0.0),
    ("bf16,k8v8,k4v2", 8, 3, 0.4), ("k8v8,k4v4,k2v2", 8, 3, 0.4)])
def test_demotion_ahead_of_need_drops_nothing(ladder, frames, extra_sessions, watermark):
    """``keep_watermark`` under pressure moves the write tier's cold cache down, ahead of need: a
    full lower tier must not take it by dropping its own tokens (nor the write tier's, to free a
    frame): that dropped as much as it demoted, with no request asking for room. Before the fix the
    H200 e2e of 2026-12-01 (k8v8,k4v4-kc-rot,k4v2-g32-kc-rot) dropped 292K tokens in its agentic
    run with the last tier empty for the first half, hit ratio 0.66 against stock fp8's 0.73. The
    watermark (``--kvc-watermark``) is kept the same way: by what moves, never by drops."""
    cache, driver = fill_past_pressure(ladder, frames, extra_sessions, watermark)
    cached, dropped = sum(cache.tier_cached), list(cache.counters.dropped)
    demoted = sum(cache.counters.demoted_in)
    cache.keep_watermark()
    assert cache.counters.dropped == dropped and sum(cache.tier_cached) == cached
    assert sum(cache.counters.demoted_in) > demoted  # it still moved what the lower tiers could take
    cache.check_invariants()


def test_eviction_on_demand_still_drops_when_nothing_else_frees_room():
    cache, driver = fill_past_pressure("k8v8,k4v4,k2v2", 16, 3)
    allocator = driver.allocator
    cache.evict(EvictParams(num_tokens=allocator.size))
    assert allocator.available_size() == allocator.size and sum(cache.counters.dropped) > 0
    cache.check_invariants()
