"""What each tier and the demotion ladder cost in quality (issue #7), measured through the project's
own pool and kernels: perplexity on held-out stdlib files, passkey retrieval at several context
lengths and needle depths, per-layer attention-output error, and a check that the bf16 pipeline
reproduces transformers' logits.

The model is the one ``train_tiny_lm`` saved. Its attention layers run through ``TieredKVPool``
(``set_kv_buffer`` quantize-on-write, ``allocator.demote`` for lower tiers) and
``TieredExtendWrapper`` / ``TieredDecodeWrapper`` on the GPU, or the kernels' torch references on
the CPU (``tiered_llama``). Protocols (precisely in ``metrics``' docstring): perplexity = prefill
``L - C`` held-out tokens at the write tier, demote them as the state says, score the last ``C - 1``
tokens with one extend over that compressed prefix; passkey = prefill the prompt, demote, decode
the answer teacher-forced (exact match = greedy retrieval); attention error = each layer's output
over a state's pool vs a bf16 pool given identical inputs. ``hf_check``: the bf16 state against
transformers' own logits. States: ``tier_states``.

    python -m benchmarks.quality.eval_quality --model /tmp/kvc-quality/model        # full grid
    python -m benchmarks.quality.eval_quality --model DIR --quick                     # smaller grid

On the GPU the states are spread over ``--workers`` processes sharing the GPU (each compiles its
own kernel variants, which dominates the run time); the parent merges their results, writes the
JSON (top-level ``summary``: ``ppl_increase_pct`` and ``passkey_4k_over_bf16`` per state) and a
plot beside it. ``python -m benchmarks.quality.report`` renders the README table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality.summary import summarize  # noqa: E402
from benchmarks.quality.tier_states import DEFAULT_LADDERS, DEFAULT_TIERS, TierState, make_states  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICK = dict(ppl_lengths="1024,4096", ppl_windows=8, passkey_lengths="1024,4096", passkey_depths="0.1,0.5,0.9",
             passkey_trials=8, tiers="k8v8,k4v4,k4v2,k4v2-rot,k4v2-kc,k2v2,k2v2-rot,k2v2-kc-rot",
             ladders="bf16,k8v8,k4v2")
def csv_ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def csv_floats(text: str) -> List[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by train_tiny_lm")
    p.add_argument("--out", default=None, help="results JSON (default <out-dir>/quality-<device>-<date>.json)")
    p.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"), help="folder of the default --out")
    p.add_argument("--tiers", default=",".join(DEFAULT_TIERS[1:]), help="single-tier states (bf16 is always added)")
    p.add_argument("--ladders", default=";".join(DEFAULT_LADDERS),
                   help="demoted-ladder states, ';'-separated ('' = none)")
    p.add_argument("--write-path", choices=("quantize", "demote"), default="quantize",
                   help="quantize: quantize-on-write where a tier can be the write tier; demote: always via demotion")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--ppl-lengths", default="1024,2048,4096")
    p.add_argument("--ppl-windows", type=int, default=16, help="held-out windows per length")
    p.add_argument("--ppl-continuation", type=int, default=256, help="scored tokens per window (+1)")
    p.add_argument("--passkey-lengths", default="1024,2048,4096")
    p.add_argument("--passkey-depths", default="0.05,0.2,0.35,0.5,0.65,0.8,0.95")
    p.add_argument("--passkey-trials", type=int, default=8, help="documents per (length, depth)")
    p.add_argument("--attn-windows", type=int, default=2,
                   help="windows of the longest length for attention error (0: skip)")
    p.add_argument("--hf-check-windows", type=int, default=2, help="windows for the transformers check (0: skip)")
    p.add_argument("--crosscheck-len", type=int, default=512,
                   help="kernels only: per state, logits of one window this long via the kernels vs via the torch "
                        "references (0: skip)")
    p.add_argument("--batch-tokens", type=int, default=131072, help="tokens per batched forward")
    p.add_argument("--quick", action="store_true",
                   help="a smaller grid: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--backend", choices=("auto", "kernels", "reference"), default="auto",
                   help="kernels: Triton (GPU); reference: the kernels' torch references (CPU, small inputs)")
    p.add_argument("--workers", type=int, default=0, help="processes (0: 10 on the GPU, 1 on the CPU)")
    p.add_argument("--time-limit", type=float, default=0, help="seconds the parent waits for workers (0: no limit)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--worker-states", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-tag", default="main", help=argparse.SUPPRESS)
    return p


def resolve(args) -> argparse.Namespace:
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.backend == "auto":
        args.backend = "kernels" if args.device.startswith("cuda") else "reference"
    if args.workers <= 0:
        args.workers = 10 if args.device.startswith("cuda") else 1
    for n in csv_ints(args.ppl_lengths):
        if n <= args.ppl_continuation or (n - args.ppl_continuation) % args.page_size:
            raise SystemExit(f"--ppl-lengths {n} minus --ppl-continuation {args.ppl_continuation} must be a positive "
                             f"multiple of --page-size {args.page_size} (the prefix is demoted in whole pages)")
    if args.crosscheck_len and (args.crosscheck_len < 64 or (args.crosscheck_len - min(64, args.crosscheck_len // 4))
                                % args.page_size):
        raise SystemExit(f"--crosscheck-len {args.crosscheck_len}: use a multiple of 64, at least 64 (or 0 to skip)")
    return args


def all_states(args) -> List[TierState]:
    tiers = [t for t in args.tiers.split(",") if t.strip()]
    ladders = [ladder for ladder in args.ladders.split(";") if ladder.strip()]
    return make_states(tiers, ladders, args.write_path)


# ---- data ------------------------------------------------------------------------------------------
def load_model(model_dir: str, device: str):
    """-> (TieredLlama over the bf16 LlamaForCausalLM, FastEncoder)."""
    import torch
    from transformers import LlamaForCausalLM

    from benchmarks.quality.bpe_tokenizer import FastEncoder
    from benchmarks.quality.tiered_llama import TieredLlama

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").to(device)
    hf.eval()
    return TieredLlama(hf), FastEncoder.from_dir(model_dir)


def heldout_stream(model_dir: str, encoder):
    """int64 ``[T]``: the held-out files named in ``corpus_split.json``, packed ``<s> file </s>``."""
    import torch

    from benchmarks.quality import corpus

    split = json.loads((Path(model_dir) / "corpus_split.json").read_text())
    root = Path(split["stdlib_root"])
    if not root.is_dir():
        root = corpus.stdlib_root()
    texts = corpus.read_texts(root, split["heldout_files"])
    ids = []
    for encoded in encoder.encode_batch(texts):
        ids += [encoder.bos_id, *encoded, encoder.eos_id]
    return torch.tensor(ids, dtype=torch.int64)


def windows_of(stream, length: int, count: int):
    """int64 ``[W, length]``: the first ``W <= count`` non-overlapping windows of the stream."""
    usable = min(count, stream.numel() // length)
    if usable == 0:
        raise SystemExit(f"the held-out text has {stream.numel()} tokens, less than one {length}-token window")
    return stream[: usable * length].view(usable, length)


# ---- one worker: a list of states ------------------------------------------------------------------
def error_text(err: BaseException) -> str:
    import traceback

    lines = traceback.format_exception(type(err), err, err.__traceback__)
    return "".join(lines[-6:])[-3000:]


def kernels_vs_references(args, model, state: TierState, window) -> Dict:
    """Continuation logits of one window ``[1, L]`` through the Triton kernels and through their
    torch references (same state, fresh pools): how far the GPU path is from the reference path."""
    from benchmarks.quality.metrics import continuation_logits

    cont = min(64, window.shape[1] // 4)
    logits = {}
    for use_kernels in (True, False):
        runner = model.runner(state, args.page_size, 1, window.shape[1], use_kernels)
        logits[use_kernels] = continuation_logits(model, runner, window, cont).double()
    diff = (logits[True] - logits[False]).norm() / logits[False].norm()
    agree = (logits[True].argmax(-1) == logits[False].argmax(-1)).double().mean()
    return {"length": int(window.shape[1]), "scored_tokens": cont - 1, "rel_err_logits": float(diff),
            "top1_agree": float(agree)}


def evaluate_state(args, model, state: TierState, windows, ppl_batch, docs, grid, pk_batch, max_seqs: int,
                   max_len: int, crosscheck_window=None) -> Dict:
    """Perplexity per length, passkey accuracy per length (and depth), and the kernels-vs-references
    crosscheck of one state."""
    from benchmarks.quality import metrics

    runner = model.runner(state, args.page_size, max_seqs, max_len, args.backend == "kernels")
    row = {"ladder": [s.name for s in state.ladder], "runs": list(state.runs),
           "filled_by": ("demotion" if state.demotes else
                         "quantize-on-write" if state.ladder[0].is_quantized else "bf16"),
           "bits_per_element": state.bits_per_element(model.head_dim, args.page_size), "ppl": {}, "passkey": {}}
    for n, win in windows.items():
        row["ppl"][str(n)] = metrics.perplexity(model, runner, win, args.ppl_continuation, ppl_batch[n])
    nll_sum = sum(r["nll"] * r["tokens"] for r in row["ppl"].values())
    row["nll_all"] = nll_sum / max(1, sum(r["tokens"] for r in row["ppl"].values()))
    results = metrics.passkey(model, runner, docs, pk_batch) if docs else []
    depths = sorted({d for _, d in grid})
    for n in sorted({n for n, _ in grid}):
        picked = [(d, r) for (length, d), r in zip(grid, results) if length == n]
        by_depth = {str(d): sum(r["correct"] for dd, r in picked if dd == d) / max(1, sum(dd == d for dd, _ in picked))
                    for d in depths}
        row["passkey"][str(n)] = {"acc": sum(r["correct"] for _, r in picked) / max(1, len(picked)),
                                  "token_acc": sum(r["token_acc"] for _, r in picked) / max(1, len(picked)),
                                  "docs": len(picked), "by_depth": by_depth}
    del runner
    if crosscheck_window is not None and args.backend == "kernels":
        row["kernels_vs_references"] = kernels_vs_references(args, model, state, crosscheck_window)
    return row


def evaluate_states(args, names: Sequence[str], log, save: Callable[[Dict], None] = lambda part: None) -> Dict:
    """Every measurement for the named states (of ``all_states``) -> {"states", "attn", "hf_check",
    "errors"}. Order: each state (the transformers check right after bf16), then attention errors;
    ``save(part)`` after each, so a worker stopped at the time limit keeps what it finished. A step
    that raises is recorded under "errors" and the rest goes on."""
    import torch

    from benchmarks.quality import metrics
    from benchmarks.quality.hf_check import hf_logits_check
    from benchmarks.quality.passkey import PasskeyBuilder

    by_name = {s.name: s for s in all_states(args)}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"states {unknown} are not in the grid of --tiers/--ladders")
    states = [by_name[n] for n in names]  # in the given order (workers get headline states first)
    model, encoder = load_model(args.model, args.device)
    stream = heldout_stream(args.model, encoder)
    use_kernels = args.backend == "kernels"
    ppl_lengths, pk_lengths = csv_ints(args.ppl_lengths), csv_ints(args.passkey_lengths)
    depths = csv_floats(args.passkey_depths)
    windows = {n: windows_of(stream, n, args.ppl_windows) for n in ppl_lengths}
    builder = PasskeyBuilder(encoder, encoder.bos_id)
    docs = builder.grid(pk_lengths, depths, args.passkey_trials, args.seed)
    grid = [(n, d) for n in pk_lengths for d in depths for _ in range(args.passkey_trials)]
    max_len = max(ppl_lengths + pk_lengths)
    ppl_batch = {n: max(1, min(args.ppl_windows, args.batch_tokens // n)) for n in ppl_lengths}
    pk_batch = max(1, args.batch_tokens // max(pk_lengths)) if pk_lengths else 1
    max_seqs = max(list(ppl_batch.values()) + [pk_batch])
    longest = max(ppl_lengths)
    crosscheck = stream[-args.crosscheck_len:][None] if args.crosscheck_len > 0 else None
    log(f"{len(states)} states, held-out stream {stream.numel():,} tokens, backend {args.backend}")
    out: Dict = {"states": {}, "attn": {}, "hf_check": None, "errors": {}}

    def attempt(what: str, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as err:  # one failing step (e.g. a kernel variant) must not lose the others
            out["errors"][what] = error_text(err)
            log(f"{what}: FAILED: {out['errors'][what]}")
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            save(out)

    def one_state(state: TierState) -> None:
        t0 = time.time()
        row = evaluate_state(args, model, state, windows, ppl_batch, docs, grid, pk_batch, max_seqs, max_len,
                             crosscheck)
        row["wall_s"] = round(time.time() - t0, 1)
        out["states"][state.name] = row
        log(f"{state.name}: ppl " + ", ".join(f"{k}:{v['ppl']:.3f}" for k, v in row["ppl"].items())
            + " | passkey " + ", ".join(f"{k}:{v['acc']:.2f}" for k, v in row["passkey"].items())
            + (f" | kernels vs references {row['kernels_vs_references']['rel_err_logits']:.1e}"
               if "kernels_vs_references" in row else "") + f" | {row['wall_s']} s")

    def transformers_check() -> None:
        check_windows = windows[longest][: args.hf_check_windows]
        bf16 = next(s for s in states if s.name == "bf16")
        runner = model.runner(bf16, args.page_size, len(check_windows), longest, use_kernels)
        out["hf_check"] = hf_logits_check(model, runner, check_windows, args.ppl_continuation)
        log(f"transformers check: {'passed' if out['hf_check']['passed'] else 'FAILED'} "
            f"({json.dumps({k: v for k, v in out['hf_check'].items() if k.startswith(('rel', 'top1'))})})")

    def attention() -> None:
        t0 = time.time()
        measured = [s for s in states if s.name in out["states"] and s.name != "bf16"]
        bf16 = next(s for s in all_states(args) if s.name == "bf16")
        attn_windows = windows[longest][: args.attn_windows]
        main = model.runner(bf16, args.page_size, len(attn_windows), longest, use_kernels)
        probes = [model.runner(s, args.page_size, len(attn_windows), longest, use_kernels) for s in measured]
        out["attn"] = metrics.attention_errors(model, main, probes, attn_windows, args.ppl_continuation)
        log(f"attention error of {len(probes)} states in {time.time() - t0:.1f} s")

    for state in states:
        attempt(state.name, lambda: one_state(state))
        if state.name == "bf16" and state.name in out["states"] and args.hf_check_windows > 0:
            attempt("hf_check", transformers_check)
    if args.attn_windows > 0 and any(s.name in out["states"] and s.name != "bf16" for s in states):
        attempt("attention_error", attention)
    out["done"] = True
    save(out)
    return out


# ---- parent: workers, merge, summary ---------------------------------------------------------------
FIRST = ("bf16", "k8v8", "k4v4", "k4v2", "k4v2-rot", "k2v2", "ladder:bf16,k8v8,k4v2", "k2v2-rot", "k2v2-kc",
         "k4v2-kc")  # the states the targets and the ladder question need: each worker starts with one


def split_round_robin(names: Sequence[str], workers: int) -> List[List[str]]:
    """Deal the states to workers, ``FIRST`` ones first, so that a worker stopped at the time
    limit loses a secondary variant rather than a headline state."""
    ordered = [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]
    groups = [[] for _ in range(min(workers, len(ordered)))]
    for i, name in enumerate(ordered):
        groups[i % len(groups)].append(name)
    return groups


def run_workers(args, argv: Sequence[str], names: Sequence[str], log) -> Dict:
    """Start one subprocess per group of states (GPUs round-robin), wait up to ``--time-limit``,
    merge what came back. Missing states are listed, not fatal."""
    import tempfile

    import torch

    groups = split_round_robin(names, args.workers)
    tmp = Path(tempfile.mkdtemp(prefix="kvc-quality-"))
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else 0
    procs = []
    for i, group in enumerate(groups):
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        out_file = tmp / f"worker{i}.json"
        cmd = [sys.executable, "-m", "benchmarks.quality.eval_quality", *argv, "--workers", "1",
               "--worker-states", ";".join(group), "--worker-out", str(out_file), "--worker-tag", f"w{i}", "--no-plot"]
        procs.append((subprocess.Popen(cmd, cwd=REPO_ROOT, env=env), out_file, group))
        log(f"worker w{i}: {', '.join(group)}")
    deadline = time.time() + args.time_limit if args.time_limit > 0 else None
    merged: Dict = {"states": {}, "attn": {}, "hf_check": None, "errors": {}, "failed_workers": []}
    for i, (proc, out_file, group) in enumerate(procs):
        try:
            rc = proc.wait(timeout=None if deadline is None else max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "killed at the time limit"
        if out_file.exists():
            part = json.loads(out_file.read_text())
            merged["states"].update(part["states"])
            merged["attn"].update(part["attn"])
            merged["hf_check"] = merged["hf_check"] or part["hf_check"]
            merged["errors"].update(part["errors"])
            if part.get("done"):
                continue
        if rc != 0 or not out_file.exists():
            merged["failed_workers"].append({"worker": f"w{i}", "states": group, "exit": rc})
    return merged


def device_slug(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    from benchmarks.serving import device_name

    name = device_name()
    match = re.search(r"(H100|H200|A100|L40S|B200|GH200)", name)
    return match.group(1) if match else re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve(build_parser().parse_args(argv))
    started = time.time()
    tag = args.worker_tag

    def log(msg: str) -> None:
        print(f"[{tag} {time.time() - started:6.1f}s] {msg}", flush=True)

    if args.worker_states is not None:  # a worker: measure, write the part, exit
        target = Path(args.worker_out)

        def save(part: Dict) -> None:  # atomic: the parent may read it after killing this worker
            target.with_suffix(".tmp").write_text(json.dumps(part))
            target.with_suffix(".tmp").replace(target)

        evaluate_states(args, args.worker_states.split(";"), log, save)
        sys.stdout.flush()
        os._exit(0)  # the part is saved; skip interpreter teardown (seconds with SGLang and CUDA loaded)

    import torch

    from benchmarks.serving import versions

    names = [s.name for s in all_states(args)]
    log(f"{len(names)} states: {', '.join(names)}")
    if args.workers > 1 and len(names) > 1:
        merged = run_workers(args, argv, names, log)
    else:
        merged = evaluate_states(args, names, log)
        merged["failed_workers"] = []
    ppl_lengths, pk_lengths = csv_ints(args.ppl_lengths), csv_ints(args.passkey_lengths)
    date = datetime.date.today().isoformat()
    slug = device_slug(args.device)
    out_path = Path(args.out) if args.out else Path(args.out_dir) / f"quality-{slug}-{date}.json"
    train_log_path = Path(args.model) / "train_log.json"
    train_log = json.loads(train_log_path.read_text()) if train_log_path.exists() else {}
    config = json.loads((Path(args.model) / "config.json").read_text())
    result = {
        "summary": summarize(merged, names, ppl_lengths, pk_lengths),
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "date": date, "versions": versions(),
        "command": "python -m benchmarks.quality.eval_quality " + " ".join(argv),
        "backend": args.backend, "wall_s": round(time.time() - started, 1),
        "protocol": {k: getattr(args, k) for k in (
            "page_size", "write_path", "ppl_lengths", "ppl_windows", "ppl_continuation", "passkey_lengths",
            "passkey_depths", "passkey_trials", "attn_windows", "hf_check_windows", "crosscheck_len", "seed")},
        "model": {"config": {k: config.get(k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "intermediate_size", "vocab_size", "rope_parameters", "max_position_embeddings")},
            "parameters": train_log.get("parameters"), "train_steps": train_log.get("steps"),
            "train_tokens": train_log.get("tokens"), "train_s": train_log.get("train_s"),
            "train_device": train_log.get("device"), "train_check": train_log.get("check"),
            "train_command_args": train_log.get("args")},
        "hf_check": merged["hf_check"],
        "states": merged["states"],
        "attn_rel_err": merged["attn"],
        "missing_states": [n for n in names if n not in merged["states"]],
        "errors": merged["errors"],
        "failed_workers": merged["failed_workers"],
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    log(f"wrote {out_path}")
    if not args.no_plot:
        from benchmarks.quality.report import write_plot

        try:
            log(f"wrote {write_plot(result, out_path.with_suffix('.png'))}")
        except ImportError as err:  # matplotlib missing
            log(f"no plot: {err}")
    for check in result["summary"]["targets"]:
        log(f"target {check['metric']}[{check['state']}] {check['target']}: value {check['value']} met {check['met']}")
    if result["missing_states"]:
        log(f"MISSING states (worker failed or timed out): {', '.join(result['missing_states'])}")
    return result


if __name__ == "__main__":
    main()
