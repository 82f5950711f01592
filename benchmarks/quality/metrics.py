"""Quality measurements over the tiered pool (``TieredLlama`` + ``KVRunner``).

Perplexity protocol (``perplexity``), per window of ``L`` held-out tokens ``x[0..L-1]`` with a
continuation of ``C`` tokens and a page-aligned prefix ``P = L - C``:

1. prefill: one extend of ``x[0..P-1]`` with no cached prefix; its K/V are written into the pool
   by ``set_kv_buffer`` at the write tier (quantized on write when the state's write tier is);
2. the state's demotion (``KVRunner.demote_prefix``): whole prefix pages requantized down the
   ladder by ``allocator.demote``;
3. scoring: one extend of ``x[P..L-1]`` over the cached prefix as the pool now stores it (the
   extend kernel reads each page at its tier; the continuation's own K/V are in flight, bf16, as
   in SGLang's prefill of a request that hit a cached prefix). The logits at positions
   ``P..L-2`` score the targets ``x[P+1..L-1]``: ``C - 1`` tokens per window, every one of
   which is predicted through the compressed prefix (the prediction of ``x[P]`` comes from the
   prefill and is left out).

Perplexity = ``exp(mean NLL)`` over all scored tokens of all windows of one length; the same
windows are used for every state, so differences between states are paired.

Passkey protocol (``passkey``): prefill the prompt minus its last token (extend), demote its
whole pages, then decode: the last prompt token, then the answer tokens teacher-forced, one
``TieredDecodeWrapper`` step each (each step writes its token's K/V at the write tier, then
attends over everything cached). A document counts as retrieved when the argmax at every answer
position is the answer token, which is exactly when greedy decoding would produce the key.

Attention error (``attention_errors``): the perplexity windows' prefill and continuation run
once through a bf16 main pool while every other state's pool (a probe) receives the same K/V; at
each layer the probes' attention outputs of the continuation tokens are compared with the main
one's: ``||o_state - o_bf16|| / ||o_bf16||`` per layer, the error of that layer alone (inputs
are identical, nothing propagates).
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch

from benchmarks.quality.passkey import PasskeyDoc
from benchmarks.quality.tiered_llama import AttentionErrors, KVRunner, TieredLlama, ragged_positions


def _prefill(model: TieredLlama, runners: Sequence[KVRunner], seqs: Sequence[Sequence[int]]) -> None:
    for runner in runners:
        runner.plan_extend([len(s) for s in seqs])
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64, device=model.device)
    model.forward(runners, ids, ragged_positions([0] * len(seqs), [len(s) for s in seqs], model.device))


def continuation_logits(model: TieredLlama, runner: KVRunner, windows: torch.Tensor, continuation: int,
                        probes: Sequence[KVRunner] = (), errors: AttentionErrors = None) -> torch.Tensor:
    """windows int64 ``[W, L]`` -> float32 logits ``[W, C-1, vocab]`` at positions ``P..L-2``
    (steps 1-3 of the module docstring)."""
    num, length = windows.shape
    prefix = length - continuation
    if prefix <= 0 or prefix % runner.page_size or continuation < 2:
        raise ValueError(f"window {length} - continuation {continuation} must be a positive multiple of the "
                         f"page size {runner.page_size}, and the continuation at least 2 tokens")
    runners = [runner, *probes]
    for r in runners:
        r.start(num)
    _prefill(model, runners, windows[:, :prefix].tolist())
    for r in runners:
        r.demote_prefix([prefix] * num)
        r.plan_extend([continuation] * num)
    ids = windows[:, prefix:].reshape(-1).to(model.device)
    positions = ragged_positions([prefix] * num, [continuation] * num, model.device)
    rows = torch.arange(num * continuation, device=model.device).view(num, continuation)[:, :-1].reshape(-1)
    logits = model.forward(runners, ids, positions, rows, errors)
    return logits.view(num, continuation - 1, -1)


def perplexity(model: TieredLlama, runner: KVRunner, windows: torch.Tensor, continuation: int,
               batch: int) -> Dict[str, float]:
    """windows int64 ``[W, L]`` -> {"ppl", "nll", "tokens"} pooled over all windows."""
    nll_sum, count = 0.0, 0
    for start in range(0, windows.shape[0], batch):
        chunk = windows[start:start + batch]
        logits = continuation_logits(model, runner, chunk, continuation)
        targets = chunk[:, -continuation + 1:].to(logits.device)
        logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        nll_sum += float(-logp.double().sum())
        count += targets.numel()
    nll = nll_sum / max(count, 1)
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count}


def passkey(model: TieredLlama, runner: KVRunner, docs: Sequence[PasskeyDoc], batch: int) -> List[Dict]:
    """Per document: {"correct": bool, "token_acc": float, "depth": float, "length": int}."""
    results = []
    for start in range(0, len(docs), batch):
        chunk = docs[start:start + batch]
        answer_len = len(chunk[0].answer_ids)
        if any(len(d.answer_ids) != answer_len for d in chunk):
            raise ValueError("documents of one batch must have answers of one length")
        runner.start(len(chunk))
        _prefill(model, [runner], [d.prompt_ids[:-1] for d in chunk])
        runner.demote_prefix([len(d.prompt_ids) - 1 for d in chunk])
        feed = [[d.prompt_ids[-1]] + d.answer_ids[:-1] for d in chunk]
        preds = []
        for step in range(answer_len):
            runner.plan_decode()
            ids = torch.tensor([f[step] for f in feed], dtype=torch.int64, device=model.device)
            positions = torch.tensor([len(d.prompt_ids) - 1 + step for d in chunk], device=model.device)
            logits = model.forward([runner], ids, positions, torch.arange(len(chunk), device=model.device))
            preds.append(logits.argmax(-1).cpu())
        preds = torch.stack(preds, 1)
        for doc, pred in zip(chunk, preds.tolist()):
            hits = [p == a for p, a in zip(pred, doc.answer_ids)]
            results.append({"correct": all(hits), "token_acc": sum(hits) / len(hits), "depth": round(doc.depth, 4),
                            "length": len(doc.ids)})
    return results


def attention_errors(model: TieredLlama, main: KVRunner, probes: Sequence[KVRunner], windows: torch.Tensor,
                     continuation: int) -> Dict[str, List[float]]:
    """state name -> per-layer relative attention-output error vs the bf16 main pool."""
    errors = AttentionErrors(model.config.num_hidden_layers)
    if probes:
        continuation_logits(model, main, windows, continuation, probes, errors)
    return errors.relative()
