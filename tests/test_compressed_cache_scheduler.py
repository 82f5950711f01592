"""CompressedRadixCache under the scheduler's conditions: decisions that must not depend on the order of
Python sets (every run and every TP rank makes the same)."""

from sglang.srt.mem_cache.base_prefix_cache import InsertParams

from tests.cache_parts import all_nodes, build_cache
from tests.sglang_parts import key, write_random


class ReversedSet(set):
    """A set that iterates its nodes newest first (CPython's own order follows object addresses)."""

    def __iter__(self):
        return iter(sorted(set.__iter__(self), key=lambda node: -node.id))


def compacted_placement(reverse_sets: bool):
    """Every write frame holds one cached page and one free page; compaction empties three of them.
    Returns {tokens of a node: its slots}."""
    cache, driver = build_cache(frames=8, page_size=4)
    if reverse_sets:
        cache.tier_nodes = [ReversedSet(nodes) for nodes in cache.tier_nodes]
    allocator = driver.allocator
    slots = allocator.alloc(allocator.available_size())
    write_random(driver.pool, slots, seed=1)
    for frame in range(1, 8):
        cached, free = slots[(2 * frame - 1) * 4:(2 * frame) * 4], slots[(2 * frame) * 4:(2 * frame + 1) * 4]
        cache.insert(InsertParams(key=key([frame * 10 + i for i in range(4)]), value=cached))
        allocator.free(free)
    allocator.free(slots[:4])
    assert cache._compact_write(3) == 3
    cache.check_invariants()
    return {tuple(node.key.token_ids): node.value.tolist() for node in all_nodes(cache)}


def test_compaction_places_pages_independently_of_set_order():
    assert compacted_placement(reverse_sets=False) == compacted_placement(reverse_sets=True)
