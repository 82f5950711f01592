"""The plugin through SGLang's real entry point, parser, configurator, cache registry and backend API."""

import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.sglang_server_parts import configure_pools, load_plugin_once, server_args, single_rank, tiny_llama_dir

PLUGIN_TARGETS = {
    "sglang.srt.server_args.ServerArgs.add_cli_args",
    "sglang.srt.server_args.ServerArgs.from_cli_args",
    "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.configure",
    "sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill",
    "sglang.srt.managers.scheduler.Scheduler.flush_cache",
    "sglang.srt.managers.scheduler.Scheduler.on_idle",
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
}


@pytest.fixture(scope="module")
def model_dir():
    return tiny_llama_dir()


def test_entry_point_registers_and_every_hook_applies():
    from importlib.metadata import entry_points

    from sglang.srt.plugins.hook_registry import HookRegistry

    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("kvc") == "sglang_kvc.patches.plugin:register"
    load_plugin_once()
    ours = {target for target, hooks in HookRegistry._hooks.items()
            if any(getattr(hook, "__module__", "").startswith("sglang_kvc") for _, hook, _ in hooks)}
    assert PLUGIN_TARGETS <= ours
    assert ours <= HookRegistry._patched, f"hooks not applied: {ours - HookRegistry._patched}"


def test_flags_reach_server_args_and_select_our_backends(model_dir):
    args = server_args(model_dir, "--kv-compression", "bf16,k8v8,k4v2", "--kvc-policy", "cost",
                       "--kvc-min-hit-bits", "3", "--kvc-frame-pages", "8", "--kvc-watermark", "0.05",
                       "--kvc-min-demotion-yield", "0.5")
    assert args.kvc_config.ladder_text == "bf16,k8v8,k4v2"
    assert args.kvc_config.policy == "cost" and args.kvc_config.min_hit_bits == 3
    assert args.kvc_config.frame_pages == 8 and args.kvc_config.watermark == 0.05
    assert args.kvc_config.min_demotion_yield == 0.5
    assert args.attention_backend == "kvc_triton" and args.radix_cache_backend == "kvc"
    # CUDA graphs resolve as they do for stock SGLang with the same flags
    stock = server_args(model_dir)
    assert args.cuda_graph_config.decode.backend == stock.cuda_graph_config.decode.backend
    assert args.cuda_graph_config.prefill.backend == stock.cuda_graph_config.prefill.backend
    from sglang_kvc.patches.plugin import graph_summary

    assert graph_summary(args) == (f"CUDA graphs: decode {stock.cuda_graph_config.decode.backend}, "
                                   f"prefill {stock.cuda_graph_config.prefill.backend}")


def test_off_by_default_changes_nothing(model_dir):
    args = server_args(model_dir)
    assert args.kvc_config is None and args.radix_cache_backend is None
    assert args.attention_backend != "kvc_triton"


@pytest.mark.parametrize("extra,fragment", [
    (["--kv-compression", "k3v2"], "K bits 3 are not supported"),
    (["--kv-compression", "k4v2,k8v8"], "must go down in bits"),
    (["--kv-compression", "bf16,k8v8", "--disable-radix-cache"], "drop --disable-radix-cache"),
    (["--kv-compression", "bf16,k8v8", "--kv-cache-dtype", "fp8_e4m3"], "drop --kv-cache-dtype"),
    (["--kv-compression", "bf16,k8v8", "--attention-backend", "flashinfer"], "--attention-backend=kvc_triton"),
    (["--kv-compression", "bf16,k8v8", "--page-size", "32"], "--page-size"),
    (["--kv-compression", "bf16,k8v8", "--enable-hierarchical-cache"], "hierarchical"),
    (["--kv-compression", "bf16,k8v8", "--kvc-frame-pages", "0"], "--kvc-frame-pages=0"),
    (["--kv-compression", "bf16,k8v8", "--kvc-watermark", "0.9"], "--kvc-watermark=0.9"),
    (["--kv-compression", "bf16,k8v8", "--kvc-min-demotion-yield", "-2"], "--kvc-min-demotion-yield=-2"),
    (["--kv-compression", "bf16,k8v8", "--cuda-graph-backend-prefill", "full"],
     "backends breakable, disabled for this phase; got --cuda-graph-backend-prefill=full"),
    (["--kv-compression", "bf16,k8v8", "--cuda-graph-backend-decode", "tc_piecewise"], "got --cuda-graph-backend-decode"),
])
def test_bad_settings_exit_with_a_clear_error(model_dir, capsys, extra, fragment):
    with pytest.raises(SystemExit) as exit_info:
        server_args(model_dir, *extra)
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("overrides,fragment", [
    ({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 64}, "hybrid"),
])
def test_unsupported_models_are_refused(capsys, overrides, fragment):
    with pytest.raises(SystemExit):
        server_args(tiny_llama_dir(**overrides), "--kv-compression", "bf16,k8v8")
    assert fragment in capsys.readouterr().err


def test_tiers_the_kernels_cannot_read_are_refused_before_allocation():
    from sglang_kvc.config import KVCConfig
    from sglang_kvc.patches import flags, plugin

    model_config = SimpleNamespace(head_dim=32, v_head_dim=32)
    with pytest.raises(flags.KVCFlagError, match="group size"):
        plugin._check_kernels_support(KVCConfig.parse("bf16,k4v2"), model_config, 16)
    plugin._check_kernels_support(KVCConfig.parse("bf16,k8v8"), model_config, 16)


def test_mla_models_are_refused():
    from sglang_kvc.patches import flags

    hf_config = SimpleNamespace(architectures=["DeepseekV3ForCausalLM"], kv_lora_rank=512)
    with pytest.raises(flags.KVCFlagError, match="MLA"):
        flags.check_model(hf_config, SimpleNamespace(kv_compression="bf16,k8v8"))


@pytest.fixture(scope="module")
def served(model_dir):
    args = server_args(model_dir, "--kv-compression", "bf16,k8v8,k4v2", "--page-size", "16")
    result, model_config = configure_pools(args, budget_bytes=8 << 20)
    return args, result, model_config


def test_configurator_builds_the_arena_from_sglang_budget(served):
    args, result, model_config = served
    from sglang_kvc.allocator import FramePagedAllocator
    from sglang_kvc.pool import TieredKVPool

    pool, allocator = result.token_to_kv_pool, result.token_to_kv_pool_allocator
    assert isinstance(pool, TieredKVPool) and isinstance(allocator, FramePagedAllocator)
    assert result.max_total_num_tokens == allocator.size == allocator.available_size()
    assert result.req_to_token_pool.req_to_token.shape[0] >= result.max_running_requests


@pytest.mark.parametrize("page_size", ["1", "16"])
def test_admission_parity_with_stock_sglang(model_dir, page_size):
    """With a bf16 write tier the scheduler admits exactly what stock bf16 admits at the same
    budget (SGLang's own max_total_num_tokens computation); with an 8-bit write tier, most of what
    stock fp8 admits; the arena's bytes exceed stock's by less than a frame plus the reserve."""
    budget = 8 << 20
    stock, _ = configure_pools(server_args(model_dir, "--page-size", page_size, "--attention-backend", "triton"),
                               budget_bytes=budget)
    kvc, _ = configure_pools(server_args(model_dir, "--page-size", page_size, "--kv-compression", "bf16,k8v8,k4v2"),
                             budget_bytes=budget)
    assert kvc.max_total_num_tokens == stock.max_total_num_tokens
    assert kvc.max_running_requests == stock.max_running_requests
    pool = kvc.token_to_kv_pool
    stock_bytes = sum(stock.token_to_kv_pool.get_kv_size_bytes())
    extra = pool.arena.nbytes - stock_bytes
    assert 0 <= extra <= 3 * pool.layout.frame_bytes * pool.layout.kv_shape.num_layers
    eight_bit, _ = configure_pools(server_args(model_dir, "--page-size", page_size, "--kv-compression",
                                               "k8v8,k4v2"), budget_bytes=budget)
    assert 0.8 * 2 * stock.max_total_num_tokens <= eight_bit.max_total_num_tokens < 2 * stock.max_total_num_tokens


def test_radix_cache_backend_builds_the_compressed_cache(served):
    args, result, model_config = served
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext, create_tree_cache

    from sglang_kvc.compressed_cache import CompressedRadixCache

    params = CacheInitParams(disable=False, req_to_token_pool=result.req_to_token_pool,
                             token_to_kv_pool_allocator=result.token_to_kv_pool_allocator, page_size=16)
    ctx = TreeCacheBuildContext(server_args=args, params=params, is_hybrid_swa=False, is_hybrid_ssm=False,
                                enable_hierarchical_cache=False, disable_radix_cache=False,
                                effective_chunked_prefill_size=None, tp_worker=None, model_config=model_config,
                                tp_size=1, tp_rank=0, tp_group=None)
    cache = create_tree_cache(ctx)
    assert isinstance(cache, CompressedRadixCache)
    assert cache.layout is result.token_to_kv_pool.layout


@pytest.mark.parametrize("use_kernels", [False, True], ids=["torch-reference", "triton-interpreter"])
def test_attention_backend_serves_extend_then_decode_over_mixed_tiers(served, use_kernels, caplog):
    """Prefill a prefix, demote it to k4v2, then extend + decode over it through the backend the
    model runner creates; outputs match attention over the pool's dequantized KV. With kernels,
    the backend compiles them before serving and says so."""
    args, result, model_config = served
    caplog.set_level(logging.INFO)
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    pool, allocator = result.token_to_kv_pool, result.token_to_kv_pool_allocator
    runner = SimpleNamespace(token_to_kv_pool=pool, req_to_token_pool=result.req_to_token_pool, device="cpu",
                             model_config=model_config)
    with single_rank():
        backend = ATTENTION_BACKENDS["kvc_triton"](runner)
        if use_kernels:  # the same wrappers the GPU runs, through Triton's interpreter
            from sglang_kvc.patches.attention_backend import KVCTritonAttnBackend

            from sglang_kvc.kernels.decode import served_variant

            backend = KVCTritonAttnBackend(runner, use_kernels=True)
            assert "sglang-kvc: compiled 4 kernels before serving (requantize bf16->k8v8, " in caplog.text
            assert backend.decode_wrapper.variant == served_variant(model_config.head_dim)
    dim = model_config.head_dim
    layer = RadixAttention(num_heads=4, head_dim=dim, scaling=dim ** -0.5, num_kv_heads=2, layer_id=1)
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(torch.bfloat16)

    prefix = allocator.alloc(32)
    pool.set_kv_buffer(layer, prefix, rand(32, 2, dim), rand(32, 2, dim))
    prefix, _ = allocator.demote(prefix, 0, 2)
    new = allocator.alloc(16)[:5]
    req_to_token = result.req_to_token_pool.req_to_token
    req_to_token[0, :32] = prefix
    req_to_token[0, 32:37] = new
    batch = SimpleNamespace(forward_mode=ForwardMode.EXTEND, batch_size=1, req_pool_indices=torch.tensor([0]),
                            extend_prefix_lens=torch.tensor([32]), extend_prefix_lens_cpu=[32],
                            extend_seq_lens=torch.tensor([5]), extend_seq_lens_cpu=[5], out_cache_loc=new)
    q, k, v = rand(5, 4 * dim), rand(5, 2 * dim), rand(5, 2 * dim)
    backend.init_forward_metadata(batch)
    out = backend.forward_extend(q, k, v, layer, batch).float().view(5, 4, dim)

    keys, values = pool.read_tokens(1, torch.cat([prefix, new]))
    assert torch.equal(keys[32:], k.float().view(5, 2, dim))  # saved at the bf16 write tier
    expected = []
    for i in range(5):
        qi = q[i].float().view(2, 2, dim)  # [kv head, group, dim]
        scores = torch.einsum("hgd,nhd->hgn", qi, keys[: 33 + i]) * dim ** -0.5
        expected.append(torch.einsum("hgn,nhd->hgd", scores.softmax(-1), values[: 33 + i]).reshape(4, dim))
    assert torch.allclose(out, torch.stack(expected), atol=2e-2, rtol=2e-2)

    decode_loc = new[4:5] + 1
    req_to_token[0, 37] = decode_loc
    batch = SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=1, req_pool_indices=torch.tensor([0]),
                            seq_lens=torch.tensor([38]), seq_lens_sum=38, out_cache_loc=decode_loc)
    q1, k1, v1 = rand(1, 4 * dim), rand(1, 2 * dim), rand(1, 2 * dim)
    backend.init_forward_metadata(batch)
    out1 = backend.forward_decode(q1, k1, v1, layer, batch).float().view(4, dim)
    keys, values = pool.read_tokens(1, req_to_token[0, :38])
    scores = torch.einsum("hgd,nhd->hgn", q1.float().view(2, 2, dim), keys) * dim ** -0.5
    ref = torch.einsum("hgn,nhd->hgd", scores.softmax(-1), values).reshape(4, dim)
    assert torch.allclose(out1, ref, atol=2e-2, rtol=2e-2)


def test_decode_graph_replay_reads_the_current_tier_mix(served):
    """What a decode CUDA graph relies on: a plan before each replay (a batch padded as SGLang's
    runner pads it) writes into the buffers the capture saw, and the kernels read the batch's
    current tiers; here the prefix is demoted between capture and replay (Triton interpreter)."""
    args, result, model_config = served
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_kvc.patches.attention_backend import KVCTritonAttnBackend

    pool, allocator = result.token_to_kv_pool, result.token_to_kv_pool_allocator
    runner = SimpleNamespace(token_to_kv_pool=pool, req_to_token_pool=result.req_to_token_pool, device="cpu",
                             model_config=model_config)
    with single_rank():
        backend = KVCTritonAttnBackend(runner, use_kernels=True)
    assert backend.get_cuda_graph_seq_len_fill_value() == 1
    backend.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
    dim = model_config.head_dim
    layer = RadixAttention(num_heads=4, head_dim=dim, scaling=dim ** -0.5, num_kv_heads=2, layer_id=0)
    gen = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(torch.bfloat16)
    slots = allocator.alloc(48)
    pool.set_kv_buffer(layer, slots, rand(48, 2, dim), rand(48, 2, dim))
    req_to_token = result.req_to_token_pool.req_to_token
    req_to_token[1, :48] = slots
    loc = allocator.alloc(16)[:1]
    req_to_token[1, 48] = loc

    def padded_batch():  # one real request (slot 1), three padding rows (slot 0, seq_len 1)
        return SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=4,
                               req_pool_indices=torch.tensor([1, 0, 0, 0]), seq_lens=torch.tensor([49, 1, 1, 1]),
                               seq_lens_sum=52, out_cache_loc=torch.cat([loc, torch.zeros(3, dtype=loc.dtype)]))

    def decode_and_check(batch):
        q, k, v = rand(4, 4 * dim), rand(4, 2 * dim), rand(4, 2 * dim)
        out = backend.forward_decode(q, k, v, layer, batch).float().view(4, 4, dim)[0]
        keys, values = pool.read_tokens(0, req_to_token[1, :49])
        scores = torch.einsum("hgd,nhd->hgn", q[0].float().view(2, 2, dim), keys) * dim ** -0.5
        ref = torch.einsum("hgn,nhd->hgd", scores.softmax(-1), values).reshape(4, dim)
        assert torch.allclose(out, ref, atol=2e-2, rtol=2e-2)

    backend.init_forward_metadata_out_graph(padded_batch(), in_capture=True)
    wrapper = backend.decode_wrapper
    captured = [t.data_ptr() for t in (wrapper.segments.local_slots, wrapper.segments.seg_start,
                                       wrapper.segments.seg_len, *wrapper._mid)]
    decode_and_check(padded_batch())
    demoted, _ = allocator.demote(slots[:32], 0, 2)
    req_to_token[1, :32] = demoted
    backend.init_forward_metadata_out_graph(padded_batch())
    assert captured == [t.data_ptr() for t in (wrapper.segments.local_slots, wrapper.segments.seg_start,
                                               wrapper.segments.seg_len, *wrapper._mid)]
    assert wrapper.segments.seg_len[0].tolist() == [17, 0, 32]
    decode_and_check(padded_batch())
    with pytest.raises(NotImplementedError, match="decode CUDA graphs only"):
        backend.init_forward_metadata_out_graph(SimpleNamespace(forward_mode=ForwardMode.EXTEND))


def test_ragged_indices_pad_one_slot_past_the_sequences():
    from sglang_kvc.patches.attention_backend import ragged_kv_indices

    req_to_token = torch.arange(40).view(4, 10)
    indptr, indices = ragged_kv_indices(req_to_token, torch.tensor([2, 0]), torch.tensor([3, 2]))
    assert indptr.tolist() == [0, 3, 5] and indices.tolist() == [20, 21, 22, 0, 1, 0]
    indptr, indices = ragged_kv_indices(req_to_token, torch.tensor([1]), torch.tensor([0]), total=0)
    assert indptr.tolist() == [0, 0] and indices.tolist() == [0]


def test_gpu_pools_get_the_triton_ops():
    from sglang_kvc.patches.build import default_kv_ops, kernel_ops_class

    assert default_kv_ops("cpu") is None
    assert kernel_ops_class().__name__ == "TritonKVOps"


def test_backend_refuses_a_plain_pool():
    from sglang_kvc.patches.attention_backend import KVCTritonAttnBackend

    with pytest.raises(RuntimeError, match="--kv-compression"):
        KVCTritonAttnBackend(SimpleNamespace(token_to_kv_pool=object()))


def test_log_summary_and_metrics(served):
    from prometheus_client import CollectorRegistry, generate_latest

    from sglang_kvc.patches.metrics import KVCMetrics, tier_summary
    from tests.cache_parts import build_cache

    cache, driver = build_cache(frames=8, page_size=4)
    for seed in range(6):
        driver.run([seed * 50 + i for i in range(17)])
    line = tier_summary(cache)
    assert line.startswith("kvc: bf16 ") and "k4v2" in line and "demoted" in line and " fr" in line
    registry = CollectorRegistry()
    metrics = KVCMetrics({"model_name": "tiny"}, registry=registry)
    metrics.update(cache)
    metrics.update(cache)  # counters advance by deltas only
    text = generate_latest(registry).decode()
    assert 'sglang:kvc_tier_tokens{model_name="tiny",tier="k8v8"}' in text
    assert 'sglang:kvc_tier_frames{model_name="tiny",tier="k4v2"}' in text and "sglang:kvc_free_frames" in text
    demoted = sum(cache.counters.demoted_in)
    assert f'sglang:kvc_demoted_tokens_total{{model_name="tiny",tier="k8v8"}} {float(cache.counters.demoted_in[1])}' in text
    assert demoted > 0
    assert 'sglang:kvc_demotion_open{model_name="tiny"} 1.0' in text  # build_cache always demotes
    assert 'sglang:kvc_demotion_yield{model_name="tiny"}' in text
    phases = cache.counters.host_phase_seconds
    assert phases["demote"] > 0 and sum(phases.values()) <= cache.counters.host_seconds
    assert f'sglang:kvc_cache_host_phase_seconds_total{{model_name="tiny",phase="demote"}} {phases["demote"]}' in text
    # time making room: scheduler seconds (once, not per update) and GPU seconds of moves (0 on the CPU)
    host = cache.counters.host_seconds
    assert host > 0 and f'sglang:kvc_cache_host_seconds_total{{model_name="tiny"}} {host}' in text
    syncs = cache.host_syncs()
    assert syncs > 0 and f'sglang:kvc_cache_host_syncs_total{{model_name="tiny"}} {float(syncs)}' in text
    assert 'sglang:kvc_cache_host_waits_total{model_name="tiny"} 0.0' in text  # CPU copies never wait
    sync_seconds = cache.kvc_stats()["host_sync_seconds"]
    assert 0 < sync_seconds <= host and f'sglang:kvc_cache_host_sync_seconds_total{{model_name="tiny"}} {sync_seconds}' in text
    assert 'sglang:kvc_move_gpu_seconds_total{kind="requantize",model_name="tiny"} 0.0' in text


def test_batch_log_lines_carry_the_tier_summary():
    load_plugin_once()
    from sglang.srt.managers.scheduler_components.pool_stats_observer import PoolStats

    from tests.cache_parts import build_cache

    cache, driver = build_cache(frames=8, page_size=4)
    driver.run(list(range(17)))
    driver.allocator.free_frames()  # log lines show free frames as of the last count (no sync of their own)
    observer = SimpleNamespace(tree_cache=cache)
    stats = PoolStats(full_num_used=0, full_token_usage=0.0, full_available_size=16, full_evictable_size=16)
    from sglang_kvc.patches import plugin

    plugin._attach_summary(stats, observer)
    assert stats.get_decode_usage_msg_parts()[-1].startswith("kvc: bf16 16 tok/3 fr, k8v8 0 tok/0 fr, k4v2 0 tok/0 fr, "
                                                             "free 5/10 fr")
    assert stats.get_prefill_usage_msg_parts()[-1].startswith("kvc: ")


def _launch(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "sglang.launch_server", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_launch_server_help_lists_the_flags():
    proc = _launch("--help")
    assert proc.returncode == 0
    for flag in ("--kv-compression", "--kvc-frame-pages", "--kvc-watermark", "--kvc-policy", "--kvc-min-hit-bits",
                 "--kvc-min-demotion-yield", "kvc_triton"):
        assert flag in proc.stdout


def test_launch_server_exits_non_zero_on_a_bad_ladder(model_dir):
    proc = _launch("--model-path", model_dir, "--device", "cpu", "--kv-compression", "bf16,k3v3")
    assert proc.returncode == 2
    assert "sglang-kvc: error:" in proc.stderr and "K bits 3" in proc.stderr
