"""CompressedRadixCache under the scheduler's conditions: eviction inside SGLang's decode free group, and
decisions that must not depend on the order of Python sets (every run and every TP rank makes the same)."""

from sglang.srt.mem_cache.base_prefix_cache import InsertParams

from tests.cache_parts import all_nodes, build_cache
from tests.sglang_parts import key, write_random


def finish_then_keep_watermark(in_free_group: bool):
    """A request finishes and the cache keeps its watermark, as ``cache_finished_req`` does; with
    ``in_free_group``, between ``free_group_begin()`` and ``free_group_end()`` as SGLang's
    ``process_batch_result_decode`` runs it."""
    cache, driver = build_cache(frames=8, page_size=4, watermark=0.4)
    allocator = driver.allocator
    request = driver.start(list(range(41)))
    if in_free_group:
        allocator.free_group_begin()
    driver.finish(request)
    cache.keep_watermark()
    if in_free_group:
        allocator.free_group_end()
    return cache, allocator


def test_the_watermark_inside_a_decode_free_group_demotes_as_outside_it():
    outside, outside_allocator = finish_then_keep_watermark(False)
    inside, inside_allocator = finish_then_keep_watermark(True)
    assert outside.tier_cached[1] > 0 and outside.counters.dropped == [0, 0, 0]
    # the pages freed while the group is open are not on the free lists until it closes; eviction that
    # cannot see them dropped the whole cache looking for room that was there
    assert inside.tier_cached == outside.tier_cached and inside.counters.dropped == [0, 0, 0]
    assert inside_allocator.available_size() == outside_allocator.available_size()
    assert not inside_allocator.free_group  # nothing left pending; the group is open again until its end
    inside.check_invariants()


def test_requests_finishing_in_one_decode_step_keep_the_watermark_once_after_the_step():
    """``cache_finished_req`` inside SGLang's decode free group defers ``keep_watermark`` to the group's
    end, once for the step (each run inside the group would free the group's pages through SGLang's
    ``free``: a device ``torch.unique``); the tiers end as when each request kept it outside a group."""
    def run(in_free_group: bool):
        cache, driver = build_cache(frames=8, page_size=4, watermark=0.4)
        allocator = driver.allocator
        kept = []
        watermark = cache.keep_watermark
        cache.keep_watermark = lambda: kept.append(allocator.is_not_in_free_group) or watermark()
        requests = [driver.start([seed * 100 + i for i in range(21)]) for seed in range(2)]
        if in_free_group:
            allocator.free_group_begin()
        for request in requests:
            driver.finish(request)
            cache.watermark_after_frees()
        held = list(kept)
        if in_free_group:
            allocator.free_group_end()
        return cache, allocator, held, kept

    outside, outside_allocator, _, outside_kept = run(False)
    inside, inside_allocator, held, inside_kept = run(True)
    assert outside_kept == [True, True]
    assert held == [] and inside_kept == [True]  # nothing inside the group; once, after it
    assert outside.tier_cached[1] > 0
    assert inside.tier_cached == outside.tier_cached and inside.counters.dropped == outside.counters.dropped
    assert inside_allocator.available_size() == outside_allocator.available_size()
    inside.check_invariants()


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
