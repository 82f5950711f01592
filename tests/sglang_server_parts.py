"""Real SGLang server-side objects on the CPU, built with the plugin loaded through its entry point:
ServerArgs from the real parser, KVCacheConfigurator (only its GPU-memory probe is replaced by a
fixed budget), a tiny random Llama config on disk."""

import contextlib
import os
import tempfile

import torch

_SINGLE_RANK = dict(world_size=1, world_rank=0, tp_size=1, tp_rank=0, pp_size=1, pp_rank=0, attn_tp_size=1,
                    attn_tp_rank=0, attn_cp_size=1, attn_cp_rank=0, attn_dp_size=1, attn_dp_rank=0,
                    dcp_enabled=False, dcp_size=1, dcp_rank=0, attn_dcp_size=1, attn_dcp_rank=0, moe_ep_size=1,
                    moe_ep_rank=0, moe_dp_size=1, moe_dp_rank=0, moe_tp_size=1, moe_tp_rank=0)


def tiny_llama_dir(**overrides) -> str:
    import transformers

    path = tempfile.mkdtemp(prefix="kvc-tiny-llama-")
    fields = dict(vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    fields.update(overrides)
    config = transformers.LlamaConfig(**fields)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    return path


def load_plugin_once():
    from sglang.srt.plugins import load_plugins

    load_plugins()


def server_args(model_dir, *extra):
    from sglang.srt.server_args import prepare_server_args

    load_plugin_once()
    return prepare_server_args(["--model-path", model_dir, "--skip-tokenizer-init", "--device", "cpu", *extra])


@contextlib.contextmanager
def single_rank(tp_size: int = 1, tp_rank: int = 0):
    """SGLang's parallel context of one process: rank ``tp_rank`` of ``tp_size`` tensor-parallel
    ranks (attention TP the same), nothing else parallel."""
    from sglang.srt.runtime_context import get_parallel

    ranks = dict(_SINGLE_RANK, world_size=tp_size, world_rank=tp_rank, tp_size=tp_size, tp_rank=tp_rank,
                 attn_tp_size=tp_size, attn_tp_rank=tp_rank)
    with get_parallel().override(**ranks):
        yield


def configure_pools(args, budget_bytes=16 << 20, tp_size=1, tp_rank=0):
    """Run KVCacheConfigurator.configure as ModelRunner.alloc_memory_pool does."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.model_executor.model_runner_components.layer_setup import ModelLayerInfo
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    class FixedBudgetConfigurator(KVCacheConfigurator):
        __slots__ = ()

        def _profile_available_bytes(self, pre_model_load_memory):
            return budget_bytes

    model_config = ModelConfig.from_server_args(args)
    layers = model_config.num_hidden_layers
    configurator = FixedBudgetConfigurator(
        device="cpu", gpu_id=0, ps=None, pp_group=None, model=None, model_config=model_config, server_args=args,
        kv_cache_dtype=torch.bfloat16, model_dtype=torch.bfloat16, page_size=args.page_size,
        sliding_window_size=None, spec_algorithm=SpeculativeAlgorithm.NONE, is_draft_worker=False,
        post_capture_kv_active=False, spec_aux_config=None, is_hybrid_swa=False, is_hybrid_swa_compress=False,
        use_mla_backend=False, layer_info=ModelLayerInfo(start_layer=0, end_layer=layers, num_effective_layers=layers),
        forward_stream=None, req_to_token_pool=None, token_to_kv_pool_allocator=None, memory_pool_config=None)
    with single_rank(tp_size, tp_rank):
        from sglang.srt.runtime_context import get_parallel

        configurator.ps = get_parallel()
        return configurator.configure(pre_model_load_memory=1), model_config
