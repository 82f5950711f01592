"""The ``sglang.srt.plugins`` entry point: registers every hook sglang-kvc needs. No SGLang file is edited.

SGLang calls ``register`` through ``load_plugins()`` in every process it starts that runs model or
scheduler code (the launcher before parsing flags, the engine, each scheduler/TP-worker process),
then applies the hooks. With ``--kv-compression`` unset every hook passes through unchanged.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_kvc.config import KVCConfig
from sglang_kvc.patches import flags

logger = logging.getLogger(__name__)

SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
POOL_STATS = "sglang.srt.managers.scheduler_components.pool_stats_observer"
REPORTER = "sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter"
TOKENIZER_MANAGER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"

_registered = False
# kvc_triton plans decode into persistent buffers (full graphs); prefill attention runs eagerly
# between the segments of a breakable graph.
GRAPH_BACKENDS = {"cuda_graph_backend_decode": ("full", "breakable", "disabled"),
                  "cuda_graph_backend_prefill": ("breakable", "disabled")}


def kvc_config_of(server_args) -> Optional[KVCConfig]:
    return getattr(server_args, "kvc_config", None)


# ---- flags -------------------------------------------------------------------------------------
def _add_cli_args(result, parser):
    flags.add_cli_args(parser)


def _before_from_cli_args(cls, args):
    """Validate on the raw flags (what the user typed) and select our backends before
    ServerArgs.__post_init__ resolves defaults, so it resolves around them."""
    try:
        config = flags.config_from_args(args)
    except flags.KVCFlagError as err:
        print(f"sglang-kvc: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if config is None:
        return None
    for name, allowed in GRAPH_BACKENDS.items():
        if getattr(args, name, None) not in (None, *allowed):
            print(f"sglang-kvc: error: --kv-compression captures CUDA graphs with backends "
                  f"{', '.join(allowed)} for this phase; got --{name.replace('_', '-')}={getattr(args, name)}",
                  file=sys.stderr)
            raise SystemExit(2)
    args.attention_backend = flags.ATTENTION_BACKEND
    args.radix_cache_backend = flags.RADIX_CACHE_BACKEND
    args._kvc_config = config
    return None


def _after_from_cli_args(result, cls, args):
    config = getattr(args, "_kvc_config", None)
    for dest in flags.FLAG_DESTS:
        setattr(result, dest, getattr(args, dest, None))
    result.kvc_config = config
    if config is not None:
        _check_model_early(result)
        logger.info(f"sglang-kvc: KV compression on: ladder {config.ladder_text}, policy {config.policy}, "
                    f"attention backend {flags.ATTENTION_BACKEND}, {graph_summary(result)}")
    return result


def graph_summary(server_args) -> str:
    """``CUDA graphs: decode full, prefill breakable`` as SGLang resolved them."""
    config = getattr(server_args, "cuda_graph_config", None)
    if config is None:
        return "CUDA graphs: unresolved"
    return f"CUDA graphs: decode {config.decode.backend}, prefill {config.prefill.backend}"


def _check_model_early(server_args) -> None:
    """Refuse MLA / hybrid models in the launcher, before any process starts (when the config is
    readable here; the scheduler checks again when it builds the pool)."""
    try:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(server_args.model_path,
                                               trust_remote_code=server_args.trust_remote_code)
    except Exception:  # unreadable here (remote repo, custom code): the scheduler-side check runs
        return
    try:
        flags.check_model(hf_config, server_args)
    except flags.KVCFlagError as err:
        print(f"sglang-kvc: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


# ---- pool, cache, backend ----------------------------------------------------------------------
def _configure_around(original, self, *, pre_model_load_memory):
    config = kvc_config_of(self.server_args)
    if config is None:
        return original(self, pre_model_load_memory=pre_model_load_memory)
    from sglang.srt.mem_cache import kv_cache_configurator as kcc

    from sglang_kvc.layout import KVShape
    from sglang_kvc.patches.build import build_tiered_pools

    if self.use_mla_backend or self.is_hybrid_swa or self.mambaish_config is not None or self.is_draft_worker:
        raise flags.KVCFlagError(
            f"--kv-compression={self.server_args.kv_compression} supports full-attention MHA/GQA "
            f"models without speculative decoding; this model is MLA, hybrid or a draft model")
    flags.check_model(self.model_config.hf_config, self.server_args)
    _check_kernels_support(config, self.model_config, self.server_args.page_size)
    pool_config = self._resolve_memory_pool_config(pre_model_load_memory)
    sizes = self._derive_pool_sizes(config=pool_config)
    kv_shape = KVShape(num_layers=self.layer_info.num_effective_layers,
                       num_kv_heads=self.model_config.get_num_kv_heads(kcc.get_parallel().attn_tp_size),
                       head_dim=self.model_config.head_dim, v_head_dim=self.model_config.v_head_dim)
    pool, allocator = build_tiered_pools(
        config, kv_shape, self.server_args.page_size, sizes.max_total_num_tokens, device=self.device,
        dtype=self.model_dtype, start_layer=self.layer_info.start_layer, end_layer=self.layer_info.end_layer,
        enable_memory_saver=self.server_args.enable_memory_saver)
    max_running = sizes.max_running_requests
    req_to_token_pool = self._build_req_to_token_pool(max_num_reqs=max_running)
    return kcc.KVCacheConfigResult(
        max_total_num_tokens=allocator.size, max_running_requests=max_running,
        full_max_total_num_tokens=None, swa_max_total_num_tokens=None,
        req_to_token_pool=req_to_token_pool, token_to_kv_pool=pool, token_to_kv_pool_allocator=allocator,
        memory_pool_config=pool_config)


def _check_kernels_support(config: KVCConfig, model_config, page_size: int) -> None:
    """Refuse, before any KV memory is taken, tiers the Triton kernels cannot read at this head_dim."""
    from sglang_kvc.codec import TierCodec
    from sglang_kvc.kernels.spec import KernelSupportError, tier_consts

    for spec in config.ladder:
        try:
            tier_consts(TierCodec(spec, model_config.head_dim, page_size, model_config.v_head_dim))
        except KernelSupportError as err:
            raise flags.KVCFlagError(f"--kv-compression={config.ladder_text}: {err}") from None


def _radix_cache_factory(ctx):
    from sglang_kvc.patches.build import build_tree_cache

    config = kvc_config_of(ctx.server_args)
    if config is None:
        raise flags.KVCFlagError("--radix-cache-backend kvc is selected by --kv-compression; give that flag")
    return build_tree_cache(ctx.params, config)


def _create_backend(model_runner):
    from sglang_kvc.patches.attention_backend import create_kvc_triton_backend

    return create_kvc_triton_backend(model_runner)


# ---- observability -----------------------------------------------------------------------------
def _observability(fn):
    """Metrics and log extras must never take the scheduler down: log the first failure, go on."""
    failed = []

    def guarded(result, *args, **kwargs):
        try:
            return fn(result, *args, **kwargs)
        except Exception:
            if not failed:
                failed.append(True)
                logger.exception(f"sglang-kvc: {fn.__name__} failed; continuing without it")
            return result

    guarded.__name__ = fn.__name__
    guarded.__module__ = fn.__module__
    return guarded


@_observability
def _record_hits(result, self, running_batch):
    cache = self.tree_cache
    batch = getattr(result, "batch_to_run", None)
    if batch is None or not hasattr(cache, "record_hits"):
        return result
    for req in batch.reqs:
        if not getattr(req, "_kvc_hits_recorded", False) and req.last_node is not None:
            cache.record_hits(req.last_node)
            req._kvc_hits_recorded = True
    return result


@_observability
def _attach_summary(result, self):
    cache = getattr(self, "tree_cache", None)
    if hasattr(cache, "kvc_stats"):
        from sglang_kvc.patches.metrics import tier_summary

        result.kvc_summary = tier_summary(cache)
    return result


@_observability
def _append_summary(result, self):
    summary = getattr(self, "kvc_summary", None)
    return result + [summary] if summary else result


@_observability
def _update_metrics(result, self, *args, **kwargs):
    from sglang_kvc.patches.metrics import update_from_reporter

    update_from_reporter(self)
    return result


@_observability
def _after_flush(result, self, *args, **kwargs):
    """``Scheduler.flush_cache`` emptied the tree and the allocator: show it on ``/metrics`` now
    (SGLang's gauges wait for the next batch) and log the per-tier state once."""
    cache = getattr(self, "tree_cache", None)
    if not result or not hasattr(cache, "kvc_stats"):
        return result
    from sglang_kvc.patches.metrics import flush_summary, update_from_reporter

    reporter = getattr(self, "metrics_reporter", None)
    if reporter is not None:
        update_from_reporter(reporter, exact=True)
    logger.info(flush_summary(cache))  # on every rank: under --tp each shows its own books
    return result


@_observability
def _refresh_when_idle(result, self, *args, **kwargs):
    """``Scheduler.on_idle``: refresh the kvc series once after anything changed (a finished
    batch, a flush), so an idle server's ``/metrics`` shows the cache as it is."""
    cache = getattr(self, "tree_cache", None)
    reporter = getattr(self, "metrics_reporter", None)
    if (not hasattr(cache, "kvc_stats") or reporter is None
            or not getattr(reporter, "current_scheduler_metrics_enabled", False) or not self.is_fully_idle()):
        return result
    from sglang_kvc.patches.metrics import refresh_if_changed

    refresh_if_changed(reporter)
    return result


# ---- request guards ----------------------------------------------------------------------------
def _check_token_ids(result, self, obj=None, input_ids=None, *args, **kwargs):
    """After ``TokenizerManager._validate_one_request`` (every tokenized request, single or batch,
    text or ids): with --kv-compression, ids outside the vocabulary are refused with a ValueError,
    which ``/generate`` (and the other HTTP routes) answer with a 400; the server keeps serving."""
    if kvc_config_of(getattr(self, "server_args", None)) is None or input_ids is None:
        return result
    vocab_size = getattr(getattr(self, "model_config", None), "vocab_size", None)
    if not vocab_size:
        return result
    from sglang_kvc.patches.guards import check_input_ids

    check_input_ids(input_ids, vocab_size)
    return result


def _check_sampling_params(self, obj=None, *args, **kwargs):
    """Before ``TokenizerManager._validate_one_request``: with --kv-compression, a numeric sampling
    parameter of another type (``"max_new_tokens": "16"``) is refused with a ValueError (a 400
    naming the field); SGLang would raise a TypeError on it, which its HTTP server answers with a
    500 and a traceback in the log."""
    if kvc_config_of(getattr(self, "server_args", None)) is None or obj is None:
        return
    from sglang_kvc.patches.guards import check_sampling_params

    params = getattr(obj, "sampling_params", None)
    for one in params if isinstance(params, list) else [params]:
        check_sampling_params(one)


def register() -> None:
    """Entry point of group ``sglang.srt.plugins`` (name ``kvc``). Idempotent."""
    global _registered
    if _registered:
        return
    _registered = True
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.mem_cache.registry import register_radix_cache_backend, registered_radix_cache_backends
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if flags.ATTENTION_BACKEND not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([flags.ATTENTION_BACKEND])
    register_attention_backend(flags.ATTENTION_BACKEND)(_create_backend)
    if flags.RADIX_CACHE_BACKEND not in registered_radix_cache_backends():
        register_radix_cache_backend(flags.RADIX_CACHE_BACKEND, _radix_cache_factory)
    hooks = [
        (f"{SERVER_ARGS}.add_cli_args", _add_cli_args, HookType.AFTER),
        (f"{SERVER_ARGS}.from_cli_args", _before_from_cli_args, HookType.BEFORE),
        (f"{SERVER_ARGS}.from_cli_args", _after_from_cli_args, HookType.AFTER),
        (f"{CONFIGURATOR}.configure", _configure_around, HookType.AROUND),
        (f"{SCHEDULER}.get_new_batch_prefill", _record_hits, HookType.AFTER),
        (f"{POOL_STATS}.SchedulerPoolStatsObserver.get_pool_stats", _attach_summary, HookType.AFTER),
        (f"{POOL_STATS}.PoolStats.get_decode_usage_msg_parts", _append_summary, HookType.AFTER),
        (f"{POOL_STATS}.PoolStats.get_prefill_usage_msg_parts", _append_summary, HookType.AFTER),
        (f"{REPORTER}.report_decode_stats", _update_metrics, HookType.AFTER),
        (f"{REPORTER}.report_prefill_stats", _update_metrics, HookType.AFTER),
        (f"{SCHEDULER}.flush_cache", _after_flush, HookType.AFTER),
        (f"{SCHEDULER}.on_idle", _refresh_when_idle, HookType.AFTER),
        (f"{TOKENIZER_MANAGER}._validate_one_request", _check_token_ids, HookType.AFTER),
        (f"{TOKENIZER_MANAGER}._validate_one_request", _check_sampling_params, HookType.BEFORE),
    ]
    for target, hook, kind in hooks:
        HookRegistry.register(target, hook, kind)
