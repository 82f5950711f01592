"""The ``--kv-compression`` family of flags: added to SGLang's parser, validated once, carried on ServerArgs."""

from __future__ import annotations

import argparse
from typing import Optional

from sglang_kvc.config import DEFAULT_WATERMARK, KVCConfig
from sglang_kvc.demotion_gate import MIN_YIELD
from sglang_kvc.layout import DEFAULT_FRAME_PAGES
from sglang_kvc.policy import POLICIES
from sglang_kvc.tiers import LADDER_PRESETS, TierSpecError

ATTENTION_BACKEND = "kvc_triton"
RADIX_CACHE_BACKEND = "kvc"
SUPPORTED_PAGE_SIZES = (1, 16)
FLAG_DESTS = ("kv_compression", "kvc_write_tier", "kvc_policy", "kvc_min_hit_bits", "kvc_rotate_keys",
              "kvc_frame_pages", "kvc_watermark", "kvc_min_demotion_yield")


class KVCFlagError(ValueError):
    """A flag value or flag combination sglang-kvc cannot serve; the message names the fix."""


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the flags to a parser (no-op when the plugin's hook already added them)."""
    if "--kv-compression" in parser._option_string_actions:
        return
    group = parser.add_argument_group("sglang-kvc (mixed-precision KV cache)")
    presets = ", ".join(f"{k}={v}" for k, v in LADDER_PRESETS.items())
    group.add_argument(
        "--kv-compression", type=str, default=None, metavar="LADDER",
        help="Store the radix cache at mixed precision and demote cold prefixes down this ladder "
             "before dropping them, e.g. bf16,k8v8,k4v2 (tiers: bf16, k8v8, k4v4, k4v2, k2v2, with "
             f"optional -g<N>, -kc, -rot), or a preset ({presets}). Off by default.")
    group.add_argument(
        "--kvc-write-tier", type=str, default=None, metavar="TIER",
        help="Tier new KV is written at; tiers above it in the ladder are dropped. Default: the "
             "ladder's first tier.")
    group.add_argument(
        "--kvc-frame-pages", type=int, default=DEFAULT_FRAME_PAGES, metavar="N",
        help="Frame size in bf16 pages. All tiers share one arena of frames sized from the KV budget "
             "and grow or shrink by whole frames; larger frames waste less when packing compressed "
             f"pages but free up less often. Default {DEFAULT_FRAME_PAGES}.")
    group.add_argument(
        "--kvc-watermark", type=float, default=DEFAULT_WATERMARK, metavar="SHARE",
        help="Keep this share of the write tier's tokens free by demoting cold prefixes when requests "
             f"finish, so admission rarely waits on requantization. Default {DEFAULT_WATERMARK}; 0 = "
             "only on demand.")
    group.add_argument(
        "--kvc-min-demotion-yield", type=float, default=MIN_YIELD, metavar="RATIO",
        help="Demote only while it pays: when fewer lower-tier hit tokens than this come back per "
             "demoted token (over the last write tier's worth of evictions), evict as stock SGLang does "
             "(coldest first) and demote a probe share only. Default "
             f"{MIN_YIELD}; 0 = always demote.")
    group.add_argument(
        "--kvc-policy", type=str, default="lru", choices=list(POLICIES),
        help="Which cached prefix is demoted first: lru, lfu, or cost (recency, hits, length and "
             "depth).")
    group.add_argument(
        "--kvc-min-hit-bits", type=float, default=0.0, metavar="BITS",
        help="Quality floor: a prefix match stops before the first node stored below this many bits "
             "per element (mean of K and V); those tokens are recomputed. Default 0 (off).")
    group.add_argument(
        "--kvc-rotate-keys", action="store_true",
        help="Rotate keys with a Hadamard matrix before quantizing them (all quantized tiers).")


def config_from_args(args) -> Optional[KVCConfig]:
    """Validate the flags on ``args`` (a Namespace or ServerArgs); None when compression is off."""
    if not getattr(args, "kv_compression", None):
        return None
    try:
        config = KVCConfig.parse(args.kv_compression, args.kvc_write_tier, args.kvc_policy, args.kvc_min_hit_bits,
                                 args.kvc_rotate_keys, args.kvc_frame_pages, args.kvc_watermark,
                                 args.kvc_min_demotion_yield)
    except TierSpecError as err:
        raise KVCFlagError(str(err)) from None
    check_compatible(args)
    return config


def check_compatible(args) -> None:
    """Refuse settings the compressed cache cannot serve, never falling back to plain KV."""
    flag = f"--kv-compression={args.kv_compression}"
    if getattr(args, "disable_radix_cache", False):
        raise KVCFlagError(f"{flag} compresses the radix cache; drop --disable-radix-cache")
    kv_dtype = getattr(args, "kv_cache_dtype", "auto")
    if kv_dtype not in (None, "auto"):
        raise KVCFlagError(
            f"{flag} sets the KV precision per tier; drop --kv-cache-dtype={kv_dtype} "
            f"(use a ladder such as k8v8,k4v4-kc,k4v2-g32-kc, the aggressive preset, for 8-bit writes)")
    for name in ("attention_backend", "prefill_attention_backend", "decode_attention_backend"):
        backend = getattr(args, name, None)
        if backend not in (None, ATTENTION_BACKEND):
            raise KVCFlagError(
                f"{flag} needs --{name.replace('_', '-')}={ATTENTION_BACKEND} (mixed-precision pages "
                f"are only read by its kernels), got {backend}")
    page_size = getattr(args, "page_size", None) or 1
    if page_size not in SUPPORTED_PAGE_SIZES:
        raise KVCFlagError(
            f"{flag} supports --page-size in {SUPPORTED_PAGE_SIZES}, got {page_size}")
    if getattr(args, "enable_hierarchical_cache", False):
        raise KVCFlagError(f"{flag} cannot be combined with --enable-hierarchical-cache")
    if getattr(args, "speculative_algorithm", None):
        raise KVCFlagError(f"{flag} does not support speculative decoding yet; drop --speculative-algorithm")
    if (getattr(args, "pp_size", 1) or 1) > 1:
        raise KVCFlagError(f"{flag} does not support pipeline parallelism yet; use --pp-size 1")
    if getattr(args, "radix_cache_backend", None) not in (None, RADIX_CACHE_BACKEND):
        raise KVCFlagError(f"{flag} brings its own radix cache; drop --radix-cache-backend={args.radix_cache_backend}")
    if getattr(args, "disaggregation_mode", "null") not in (None, "null"):
        raise KVCFlagError(f"{flag} does not support prefill/decode disaggregation yet")


def check_model(hf_config, args) -> None:
    """Refuse model families whose KV layout the tiered pool does not hold (MLA, hybrid)."""
    flag = f"--kv-compression={args.kv_compression}"
    text_config = getattr(hf_config, "text_config", None) or hf_config
    arch = (getattr(hf_config, "architectures", None) or ["unknown"])[0]
    if getattr(text_config, "kv_lora_rank", None):
        raise KVCFlagError(f"{flag} supports standard multi-head / grouped-query attention; {arch} uses MLA")
    layer_types = set(getattr(text_config, "layer_types", None) or [])
    hybrid = (layer_types - {"full_attention"}) or getattr(text_config, "sliding_window_pattern", None) \
        or any(hasattr(text_config, a) for a in ("mamba_d_state", "ssm_state_size", "linear_attn_config"))
    if hybrid:
        raise KVCFlagError(
            f"{flag} supports models whose every layer uses full attention; {arch} is a hybrid "
            f"(sliding-window, linear or state-space layers)")
