"""Tensor parallelism (``--tp N``): each rank sizes its arena from its own share of the KV heads and
budget, and ranks fed the same requests make the same cache decisions (their trees stay equal)."""

import pytest
import torch

from sglang_kvc.compressed_cache import CompressedRadixCache
from sglang_kvc.layout import KVShape
from sglang_kvc.replay import CacheDriver, SyntheticKV
from tests.cache_parts import all_nodes
from tests.sglang_parts import build_pool, cache_params
from tests.sglang_server_parts import configure_pools, server_args, tiny_llama_dir


@pytest.fixture(scope="module")
def model_dir():
    return tiny_llama_dir(num_key_value_heads=4, num_attention_heads=8, hidden_size=512)


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_each_rank_sizes_its_arena_from_its_heads_and_budget(model_dir, tp_rank):
    budget = 8 << 20  # one rank's KV bytes
    stock, _ = configure_pools(server_args(model_dir, "--page-size", "16", "--attention-backend", "triton",
                                           "--tp", "2"), budget_bytes=budget, tp_size=2, tp_rank=tp_rank)
    kvc, _ = configure_pools(server_args(model_dir, "--page-size", "16", "--tp", "2", "--kv-compression",
                                         "bf16,k8v8,k4v2"), budget_bytes=budget, tp_size=2, tp_rank=tp_rank)
    pool = kvc.token_to_kv_pool
    assert pool.head_num == 2 == stock.token_to_kv_pool.head_num  # 4 KV heads over 2 ranks
    assert kvc.max_total_num_tokens == stock.max_total_num_tokens  # admission parity per rank
    whole, _ = configure_pools(server_args(model_dir, "--page-size", "16", "--kv-compression", "bf16,k8v8,k4v2"),
                               budget_bytes=budget)
    assert whole.token_to_kv_pool.head_num == 4
    # the same bytes hold twice the tokens when a rank stores half the heads
    assert kvc.max_total_num_tokens >= 2 * whole.max_total_num_tokens - 2 * 16 * 4


def _shard(seed: int):
    """One rank's cache: its own KV (other heads, other values), the same frames and budget."""
    shape = KVShape(num_layers=2, num_kv_heads=1, head_dim=32)
    pool, allocator = build_pool(ladder="bf16,k8v8,k4v2", frames=10, page_size=4, shape=shape)
    cache = CompressedRadixCache(cache_params(allocator, 4), policy="lru")
    return cache, CacheDriver(cache, allocator, pool, SyntheticKV(1, 32, seed=seed))


def _tree(cache):
    return sorted((tuple(n.key.token_ids), n.kvc_tier, tuple(n.value.tolist()), n.lock_ref)
                  for n in all_nodes(cache))


def test_ranks_fed_the_same_requests_make_the_same_demotions_and_drops():
    """As SGLang's schedulers do under TP, each rank runs the same request stream (interleaved
    here, as concurrent ranks would): demotions, drops, compaction and the trees are identical,
    though each rank stores different KV."""
    ranks = [_shard(seed) for seed in (1, 2)]
    gen = torch.Generator().manual_seed(0)
    sessions = [[s * 100 + i for i in range(12)] for s in range(6)]
    for _ in range(40):
        s = int(torch.randint(len(sessions), (1,), generator=gen))
        sessions[s] = sessions[s] + [int(t) for t in torch.randint(97, (int(torch.randint(3, 14, (1,),
                                                                                          generator=gen)),),
                                                                   generator=gen)]
        for cache, driver in ranks:
            driver.run(sessions[s])
    (a, driver_a), (b, driver_b) = ranks
    assert sum(a.counters.demoted_in) > 0 and sum(a.counters.dropped) > 0  # the stream reaches both
    for field in ("demoted_in", "dropped", "hits", "compacted"):
        assert getattr(a.counters, field) == getattr(b.counters, field), field
    assert _tree(a) == _tree(b)
    assert driver_a.allocator.frames_per_tier() == driver_b.allocator.frames_per_tier()
    for cache, driver in ranks:
        cache.check_invariants()
    k_a, _ = driver_a.pool.read_tokens(0, all_nodes(a)[0].value)
    k_b, _ = driver_b.pool.read_tokens(0, all_nodes(b)[0].value)
    assert not torch.equal(k_a, k_b)  # different KV, same decisions


def test_serve_e2e_reads_every_ranks_demotions_from_the_flush_lines(tmp_path):
    """Each rank logs its own books after /flush_cache (SGLang prefixes ' TP<rank>'); serve_e2e's
    check wants demotions on every rank, and the same count on each."""
    from benchmarks import serve_e2e

    log = tmp_path / "server.log"
    line = "[2026-12-01 11:03:20 DP0 TP{r} EP{r}] sglang-kvc: flushed; tiers k8v8 0 tok/1 fr; free 9/10 fr; " \
           "demoted {d}, dropped 3 tokens so far\n"
    log.write_text(line.format(r=1, d=500) + line.format(r=0, d=500))
    summary = serve_e2e.summarize_log(str(log))
    assert summary["demoted_tokens_by_rank"] == {0: 500, 1: 500}
    kvc = {"requests": [{}], "metrics_kvc": [], "log": summary, "exit_code": 0}
    assert serve_e2e.checks({"kvc": kvc}, tp=2)["kvc_demotions_every_rank"] is True
    log.write_text(line.format(r=1, d=400) + line.format(r=0, d=500))  # ranks disagree
    kvc["log"] = serve_e2e.summarize_log(str(log))
    assert serve_e2e.checks({"kvc": kvc}, tp=2)["kvc_demotions_every_rank"] is False
    assert serve_e2e.checks({"kvc": kvc}, tp=3)["kvc_demotions_every_rank"] is False  # a rank is missing
