"""Does the bf16 tier of the tiered pipeline reproduce Hugging Face transformers' own logits?

On the same windows and positions as the perplexity protocol (prefill ``x[0..P-1]``, then the
continuation extend), compare the pipeline's logits with ``LlamaForCausalLM`` run over the whole
window: in bf16 (what a server runs) and in float32 (the reference). bf16 tolerance is measured,
not assumed: the pipeline passes when its relative distance to the float32 logits is at most
``factor`` times that of transformers' own bf16 run (+ a small floor), and its top-1 predictions
agree with transformers' bf16 ones on at least ``min_top1`` of the tokens.
"""

from __future__ import annotations

import copy
import math
from typing import Dict

import torch

from benchmarks.quality.metrics import continuation_logits
from benchmarks.quality.tiered_llama import KVRunner, TieredLlama

DEFAULT_FACTOR = 2.0
DEFAULT_FLOOR = 2e-3
DEFAULT_MIN_TOP1 = 0.95


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def _ppl(logits: torch.Tensor, targets: torch.Tensor) -> float:
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    return math.exp(float(-logp.double().mean()))


@torch.no_grad()
def hf_logits_check(model: TieredLlama, runner: KVRunner, windows: torch.Tensor, continuation: int,
                    factor: float = DEFAULT_FACTOR, floor: float = DEFAULT_FLOOR,
                    min_top1: float = DEFAULT_MIN_TOP1) -> Dict:
    """windows int64 ``[W, L]``; runner: a bf16 state's. Returns distances, agreement, perplexities
    of the scored tokens and ``passed``."""
    if runner.state.name != "bf16":
        raise ValueError(f"the transformers check compares the bf16 state, got {runner.state.name}")
    length = windows.shape[1]
    prefix = length - continuation
    ours = continuation_logits(model, runner, windows, continuation)
    ids = windows.to(model.device)
    hf_bf16 = model.hf_model(input_ids=ids, use_cache=False).logits[:, prefix:length - 1].float()
    hf_fp32_model = copy.deepcopy(model.hf_model).float()
    reference = hf_fp32_model(input_ids=ids, use_cache=False).logits[:, prefix:length - 1].float()
    del hf_fp32_model
    targets = ids[:, prefix + 1:]
    out = {
        "windows": int(windows.shape[0]), "length": int(length), "scored_tokens": int(targets.numel()),
        "rel_err_ours_vs_hf_fp32": _rel(ours, reference),
        "rel_err_hf_bf16_vs_hf_fp32": _rel(hf_bf16, reference),
        "rel_err_ours_vs_hf_bf16": _rel(ours, hf_bf16),
        "max_abs_ours_vs_hf_bf16": float((ours - hf_bf16).abs().max()),
        "top1_agree_ours_vs_hf_bf16": float((ours.argmax(-1) == hf_bf16.argmax(-1)).float().mean()),
        "ppl_ours": _ppl(ours, targets), "ppl_hf_bf16": _ppl(hf_bf16, targets), "ppl_hf_fp32": _ppl(reference, targets),
        "criterion": f"rel_err_ours_vs_hf_fp32 <= {factor} * rel_err_hf_bf16_vs_hf_fp32 + {floor} and "
                     f"top1_agree_ours_vs_hf_bf16 >= {min_top1}",
    }
    out["passed"] = bool(out["rel_err_ours_vs_hf_fp32"] <= factor * out["rel_err_hf_bf16_vs_hf_fp32"] + floor
                         and out["top1_agree_ours_vs_hf_bf16"] >= min_top1)
    return out
