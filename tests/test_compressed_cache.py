import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from sglang_kvc.policy import CostAwarePolicy, make_policy
from tests.cache_parts import all_nodes, build_cache, check_node_data, evict_everything


def session(prefix_len, turn_tokens, seed):
    return list(range(1000, 1000 + prefix_len)) + [seed * 100 + i for i in range(turn_tokens)]


def test_new_kv_enters_write_tier_and_evict_demotes_first():
    cache, driver = build_cache(tokens=(32, 32, 32), page_size=4)
    driver.run(list(range(16)))
    assert cache.tier_cached == [16, 0, 0] and cache.evictable_size() == 16
    result = cache.evict(EvictParams(num_tokens=8))
    assert result.num_tokens_evicted >= 8
    assert cache.tier_cached[0] + cache.tier_cached[1] == 16 and cache.tier_cached[1] >= 8
    assert cache.counters.dropped == [0, 0, 0]
    cache.check_invariants()
    for node in all_nodes(cache):
        check_node_data(cache, driver.pool, node, layers=(0, 1))


def test_demotion_cascade_when_every_lower_tier_is_full():
    cache, driver = build_cache(tokens=(16, 16, 16), page_size=4)
    for seed in range(3):  # fill: each run evicts the previous down one tier
        driver.run([seed * 50 + i for i in range(16)])
    cache.check_invariants()
    assert cache.tier_cached == [16, 16, 16]
    driver.run([777 + i for i in range(16)])  # forces tier0 -> 1 -> 2 -> drop
    assert cache.counters.dropped[2] == 16
    assert cache.counters.dropped[0] == cache.counters.dropped[1] == 0
    assert cache.counters.demoted_in[1] >= 32 and cache.counters.demoted_in[2] >= 32
    cache.check_invariants()
    for node in all_nodes(cache):
        check_node_data(cache, driver.pool, node)


def test_demotions_of_one_call_are_one_batch():
    cache, driver = build_cache(tokens=(64, 64, 64), page_size=4)
    for seed in range(4):
        driver.run([seed * 50 + i for i in range(9)])
    assert cache.tier_cached[0] == 32
    calls = []
    original = driver.allocator.demote
    driver.allocator.demote = lambda idx, tier: calls.append((len(idx), tier)) or original(idx, tier)
    cache.evict(EvictParams(num_tokens=32))
    assert calls == [(32, 1)]


def test_evict_more_than_exists_frees_what_it_can():
    cache, driver = build_cache(tokens=(16, 16, 16), page_size=4)
    driver.run(list(range(9)))
    result = cache.evict(EvictParams(num_tokens=1000))
    assert result.num_tokens_evicted == 8
    assert cache.tier_cached[0] == 0
    cache.check_invariants()


def test_locked_nodes_are_never_demoted_or_dropped():
    cache, driver = build_cache(tokens=(32, 16, 16), page_size=4)
    driver.run(list(range(17)))
    holder = driver.start(list(range(17)) + [99, 98, 97, 96])  # locks the 16 cached tokens
    values = holder.prefix_slots.clone()
    result = cache.evict(EvictParams(num_tokens=32))
    assert result.num_tokens_evicted == 0
    assert torch.equal(driver.match(list(range(16)) + [5]).device_indices, values)
    assert cache.tier_cached[0] == 16 and cache.evictable_size() == 0
    cache.check_invariants(driver.in_use_per_tier())
    driver.finish(holder)
    assert cache.evict(EvictParams(num_tokens=16)).num_tokens_evicted >= 16
    cache.check_invariants()


def test_split_of_a_demoted_node():
    cache, driver = build_cache(tokens=(32, 32, 32), page_size=4)
    driver.run(list(range(17)))
    cache.evict(EvictParams(num_tokens=16))
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
    cache, driver = build_cache(tokens=(32, 32, 32), page_size=4, min_hit_bits=4)
    driver.run(list(range(17)))
    cache.evict(EvictParams(num_tokens=16))
    cache.evict(EvictParams(num_tokens=0))
    cache._free_tier(1, 16)  # now k4v2 (3 bits on average) is below the 4-bit floor
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
    cache, driver = build_cache(tokens=(32, 32, 32), page_size=4)
    driver.run(list(range(17)))
    cache.evict(EvictParams(num_tokens=16))
    assert driver.run(list(range(17)) + [1, 2, 3, 4]) == 16
    assert cache.counters.hits == [0, 16, 0]
    stats = cache.kvc_stats()
    assert stats["hit_tokens"] == [0, 16, 0] and stats["bytes_saved_vs_bf16"] > 0


def test_no_leak_after_everything_is_dropped():
    cache, driver = build_cache(tokens=(16, 16, 16), page_size=1)
    for seed in range(12):
        driver.run([seed % 3] + [seed * 40 + i for i in range(7)])
    cache.check_invariants()
    evict_everything(cache)
    assert cache.tier_cached == [0, 0, 0]
    assert [driver.allocator.free_tokens(t) for t in range(3)] == [16, 16, 16]


@pytest.mark.parametrize("name", ["lru", "lfu", "cost"])
def test_policies_pick_the_expected_victim(name):
    cache, driver = build_cache(tokens=(64, 64, 64), page_size=4, policy=name)
    hot = list(range(100, 117))
    driver.run(hot)
    for _ in range(3):
        driver.run(hot + [1, 2, 3, 4])  # many hits on the hot node
    cold = list(range(300, 317))
    driver.run(cold)  # most recent, never hit again
    cache.evict(EvictParams(num_tokens=4))
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
        cache, driver = build_cache(tokens=(64, 64, 64), page_size=4, write_kv=False)
        shared = [1000 + trial * 100 + i for i in range(16)]
        driver.run(shared + [1])
        driver.run(shared + list(range(16)) + [2])
        driver.match(shared + list(range(16)) + [3])  # both nodes now share one access time
        cache.evict(EvictParams(num_tokens=4))
        tiers = {n.key.token_ids[0]: n.kvc_tier for n in all_nodes(cache)}
        assert tiers == {shared[0]: 0, 0: 1}, f"trial {trial}: {tiers}"
        cache.check_invariants()


def test_a_cold_parent_with_a_hot_child_can_still_be_freed():
    """A demoted prefix whose new turn sits in the write tier is not a leaf; when its tier must
    give up room and no leaf is left, it goes with its subtree, so evictable tokens are freeable."""
    cache, driver = build_cache(tokens=(32, 16, 16), page_size=4)
    driver.run(list(range(17)))
    cache._free_tier(0, 16)
    cache._free_tier(1, 16)
    (parent,) = all_nodes(cache)
    assert parent.kvc_tier == 2
    driver.run(list(range(16)) + [500 + i for i in range(9)])
    assert {n.kvc_tier for n in all_nodes(cache)} == {0, 2}
    assert cache._free_tier(2, 16) == 16
    assert all_nodes(cache) == [] and cache.counters.dropped == [8, 0, 16]
    cache.check_invariants()


def test_evict_frees_an_unlocked_parent_whose_child_was_demoted():
    """Found by the cache simulator: a parent larger than the next tier cannot be demoted and,
    with its child already demoted, is no leaf; it must still be freeable."""
    cache, driver = build_cache(tokens=(32, 8, 64), page_size=4, write_kv=False)
    shared = list(range(100, 116))
    driver.run(shared + [1])
    driver.run(shared + list(range(8)) + [2])
    driver.match(shared + list(range(8)) + [3])
    cache.evict(EvictParams(num_tokens=8))
    assert sorted((len(n.value), n.kvc_tier) for n in all_nodes(cache)) == [(8, 1), (16, 0)]
    assert cache.evictable_size() == 16
    assert cache.evict(EvictParams(num_tokens=16)).num_tokens_evicted >= 16
    cache.check_invariants()
