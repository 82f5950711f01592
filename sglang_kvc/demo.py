"""CPU demo: multi-turn sessions through SGLang's radix cache over the tiered pool, under memory pressure.

Flags go through SGLang's real argument parser plus the plugin's flags, the pool and cache are built
by the plugin's builders (as the scheduler hooks build them), and every new token's K/V is really
quantized on write and requantized on demotion (torch reference). The same trace then runs through
stock SGLang (RadixCache over MHATokenToKVPool) at the same KV byte budget for comparison.

    python -m sglang_kvc.demo [--kv-compression bf16,k8v8,k4v2] [--sessions 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from typing import List, Tuple

import torch


def build_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    from sglang_kvc.patches import flags

    parser = argparse.ArgumentParser(prog="python -m sglang_kvc.demo", description=__doc__.splitlines()[0])
    ServerArgs.add_cli_args(parser)
    flags.add_cli_args(parser)
    demo = parser.add_argument_group("demo")
    demo.add_argument("--sessions", type=int, default=16)
    demo.add_argument("--rounds", type=int, default=5)
    demo.add_argument("--system-tokens", type=int, default=256)
    demo.add_argument("--turn-tokens", type=int, default=64, help="tool output + user turn per round")
    demo.add_argument("--output-tokens", type=int, default=32)
    demo.add_argument("--budget-fraction", type=float, default=0.25,
                      help="KV byte budget as a fraction of the trace's working set at bf16")
    demo.add_argument("--seed", type=int, default=0)
    parser.set_defaults(kv_compression="balanced", page_size=16)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not {"--model-path", "--model"} & set(argv):
        argv = ["--model-path", "demo-tiny-llama"] + argv  # SGLang's parser requires one; no model is loaded
    return build_parser().parse_args(argv)


def make_trace(sessions: int, rounds: int, system_tokens: int, turn_tokens: int, output_tokens: int,
               seed: int) -> List[Tuple[List[int], List[int]]]:
    """Round-major (prompt, output) pairs; each prompt is the session's whole context so far."""
    rng = random.Random(seed)
    system = [rng.randrange(1, 30000) for _ in range(system_tokens)]
    contexts = [list(system) for _ in range(sessions)]
    requests = []
    for _ in range(rounds):
        for s in range(sessions):
            contexts[s] += [rng.randrange(1, 30000) for _ in range(turn_tokens)]
            output = [rng.randrange(1, 30000) for _ in range(output_tokens)]
            requests.append((list(contexts[s]), output))
            contexts[s] += output
    return requests


def working_set_tokens(requests, sessions: int, system_tokens: int) -> int:
    """Distinct tokens the trace ever holds: the shared system prompt plus each session's last context."""
    last = requests[-sessions:]
    return system_tokens + sum(len(prompt) + len(output) - system_tokens for prompt, output in last)


def run_demo(argv=None) -> dict:
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.mem_cache.radix_cache import RadixCache

    from sglang_kvc.layout import KVShape
    from sglang_kvc.patches import build, flags
    from sglang_kvc.replay import CacheDriver, SyntheticKV

    args = parse_args(argv)
    try:
        config = flags.config_from_args(args)
    except flags.KVCFlagError as err:
        raise SystemExit(f"sglang-kvc demo: {err}")
    if config is None:
        raise SystemExit("sglang-kvc demo: give --kv-compression (e.g. bf16,k8v8,k4v2)")
    shape = KVShape(num_layers=4, num_kv_heads=2, head_dim=64)
    page = args.page_size
    requests = make_trace(args.sessions, args.rounds, args.system_tokens, args.turn_tokens,
                          args.output_tokens, args.seed)
    working_set = working_set_tokens(requests, args.sessions, args.system_tokens)
    bf16_bpt = 2 * shape.num_layers * shape.num_kv_heads * 2 * shape.head_dim
    budget = args.budget_fraction * working_set * bf16_bpt

    stock_tokens = int(budget // bf16_bpt) // page * page
    pool, allocator = build.build_tiered_pools(config, shape, page, stock_tokens)
    params = _cache_params(allocator, page)
    cache = build.build_tree_cache(params, config)
    kvc = CacheDriver(cache, allocator, pool, SyntheticKV(shape.num_kv_heads, shape.head_dim))

    stock_pool = MHATokenToKVPool(stock_tokens, page, torch.bfloat16, shape.num_kv_heads, shape.head_dim,
                                  shape.num_layers, "cpu", False, enable_alt_stream=False)
    stock_alloc = (TokenToKVPoolAllocator(stock_tokens, torch.bfloat16, "cpu", stock_pool, False) if page == 1
                   else PagedTokenToKVPoolAllocator(stock_tokens, page, torch.bfloat16, "cpu", stock_pool, False))
    stock = CacheDriver(RadixCache(_cache_params(stock_alloc, page)), stock_alloc)

    names = [c.name for c in pool.layout.codecs]
    print(f"sglang-kvc demo: {args.sessions} sessions x {args.rounds} rounds, working set {working_set} "
          f"tokens, KV budget {budget / 2**20:.2f} MiB ({args.budget_fraction:.0%} of it at bf16)")
    print(f"  ladder {config.ladder_text}: admits {allocator.size} tokens (stock bf16: {stock_tokens}); "
          f"{pool.layout.describe()}")
    header = f"{'round':>5} {'hit kvc':>8} {'hit stock':>9}  " + " ".join(f"{n:>7}" for n in names) + \
        f" {'demoted':>8} {'dropped':>8}"
    print(header)
    start = time.perf_counter()
    per_round = []
    for r in range(args.rounds):
        batch = requests[r * args.sessions:(r + 1) * args.sessions]
        hits_kvc = sum(kvc.run(prompt + output) or 0 for prompt, output in batch)
        hits_stock = sum(stock.run(prompt + output) or 0 for prompt, output in batch)
        cache.check_invariants()
        stats = cache.kvc_stats()
        per_round.append({"round": r + 1, "hit_kvc": hits_kvc, "hit_stock": hits_stock,
                          "cached": stats["cached_tokens"]})
        print(f"{r + 1:>5} {hits_kvc:>8} {hits_stock:>9}  "
              + " ".join(f"{n:>7}" for n in stats["cached_tokens"])
              + f" {sum(stats['demoted_tokens']):>8} {sum(stats['dropped_tokens']):>8}")
    stats = cache.kvc_stats()
    total_kvc = sum(r["hit_kvc"] for r in per_round)
    total_stock = sum(r["hit_stock"] for r in per_round)
    print(f"requests refused for lack of KV room: sglang-kvc {kvc.rejected + kvc.failed_allocs}, "
          f"stock {stock.rejected + stock.failed_allocs}")
    print(f"cache-hit tokens: sglang-kvc {total_kvc}, stock bf16 {total_stock} "
          f"({total_kvc / max(total_stock, 1):.2f}x); hits per tier "
          + ", ".join(f"{n} {h}" for n, h in zip(names, stats["hit_tokens"]))
          + f"; {stats['bytes_saved_vs_bf16'] / 2**20:.2f} MiB saved vs bf16; "
          f"{time.perf_counter() - start:.1f} s")
    return {"per_round": per_round, "stats": stats, "total_hit_kvc": total_kvc, "total_hit_stock": total_stock}


def _cache_params(allocator, page_size):
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    return CacheInitParams(disable=False, req_to_token_pool=ReqToTokenPool(
        size=8, max_context_len=8192, device="cpu", enable_memory_saver=False),
        token_to_kv_pool_allocator=allocator, page_size=page_size)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(message)s")
    run_demo(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
