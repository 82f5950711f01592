"""Train a small Llama (GQA, RoPE, ~30M parameters by default) on the Python standard library's
source mixed with synthetic passkey documents, within a time budget, and save it in Hugging Face
format (``LlamaForCausalLM`` + tokenizer files) for ``eval_quality`` and SGLang.

Data: the stdlib's ``.py`` files minus a held-out 5% (chosen by a hash of each file's relative path,
``corpus.split_files``), a byte-level BPE tokenizer trained here (``bpe_tokenizer``), files packed
into one token stream (``<s> file </s>``...). A ``--passkey-frac`` share of the training rows are
passkey documents (``passkey.PasskeyBuilder``) of random length and depth, padded with code.
Schedule: phases of sequence length (``--phases 1024:0.55,4096:0.45`` = 55% of the budget at 1024
tokens, then 4096, so 4K-context retrieval is trained); AdamW, linear warm-up then cosine decay on
the fraction of the budget used; bf16 autocast; stops at ``--time-budget`` seconds (or
``--max-steps``), then saves. Seeded: with ``--max-steps`` and no time budget a run is repeatable
on one machine; with a time budget the step count depends on the machine's speed.

    python -m benchmarks.quality.train_tiny_lm --out /tmp/kvc-quality/model --time-budget 240

Writes to ``--out``: ``config.json``, ``model.safetensors`` (bf16), ``tokenizer.json``,
``tokenizer_config.json``, ``generation_config.json``, ``corpus_split.json`` (the held-out file
list), ``train_log.json`` (arguments, corpus sizes, loss curve, held-out loss and passkey accuracy
of the saved model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality import corpus  # noqa: E402
from benchmarks.quality.bpe_tokenizer import FastEncoder, to_hf, train_tokenizer  # noqa: E402
from benchmarks.quality.passkey import INTRO, FILLER, NEEDLE, QUESTION, PasskeyBuilder  # noqa: E402

DEFAULT_SHAPE = dict(hidden=512, layers=8, heads=8, kv_heads=2, head_dim=64, intermediate=1408, vocab=8192)


def parse_phases(text: str) -> List[Tuple[int, float]]:
    """``"1024:0.55,4096:0.45"`` -> [(1024, 0.55), (4096, 0.45)]; shares are normalized to sum 1."""
    phases = []
    for part in text.split(","):
        seq, _, share = part.partition(":")
        phases.append((int(seq), float(share or 1.0)))
    total = sum(s for _, s in phases)
    if not phases or total <= 0 or any(s <= 0 or n < 64 for n, s in phases):
        raise argparse.ArgumentTypeError(f"--phases {text!r}: give SEQ:SHARE pairs, e.g. 1024:0.55,4096:0.45")
    return [(n, s / total) for n, s in phases]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (Hugging Face model + logs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=240.0,
                   help="seconds of training (data prep excluded); 0 = none")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = only the time budget)")
    p.add_argument("--phases", type=parse_phases, default=parse_phases("1024:0.55,4096:0.45"),
                   help="SEQ:SHARE,... sequence length per share of the budget; the last should be >= 4096")
    p.add_argument("--tokens-per-step", type=int, default=65536)
    p.add_argument("--micro-batch-tokens", type=int, default=65536, help="split a step into micro-batches of this size")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--passkey-frac", type=float, default=0.25, help="share of training rows that are passkey documents")
    p.add_argument("--hidden", type=int, default=DEFAULT_SHAPE["hidden"])
    p.add_argument("--layers", type=int, default=DEFAULT_SHAPE["layers"])
    p.add_argument("--heads", type=int, default=DEFAULT_SHAPE["heads"])
    p.add_argument("--kv-heads", type=int, default=DEFAULT_SHAPE["kv_heads"])
    p.add_argument("--head-dim", type=int, default=DEFAULT_SHAPE["head_dim"])
    p.add_argument("--intermediate", type=int, default=DEFAULT_SHAPE["intermediate"])
    p.add_argument("--vocab", type=int, default=DEFAULT_SHAPE["vocab"])
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--max-positions", type=int, default=8192)
    p.add_argument("--stdlib-root", default=None, help="default: sysconfig.get_paths()['stdlib']")
    p.add_argument("--heldout-permille", type=int, default=corpus.DEFAULT_HELDOUT_PERMILLE)
    p.add_argument("--max-corpus-mb", type=float, default=40.0, help="cap on training text read")
    p.add_argument("--max-files", type=int, default=0, help="use only this many training files (tests)")
    p.add_argument("--tokenizer-sample-mb", type=float, default=6.0, help="text the BPE tokenizer is trained on")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off only for long budgets)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-docs", type=int, default=16, help="passkey documents per length in the final check")
    p.add_argument("--eval-lengths", default="1024,2048,4096", help="context lengths of the final check")
    p.add_argument("--no-progress", action="store_true")
    return p


# ---- data ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Corpus:
    """Token streams: ``train`` and ``heldout`` int64 ``[T]`` (``<s> file </s>`` packed), and stats."""

    train: "object"
    heldout: "object"
    stats: Dict


def prepare_corpus(args, log) -> Tuple[Corpus, FastEncoder, "object", Dict]:
    """Read and split the stdlib, train the tokenizer, encode both splits."""
    import torch

    root = Path(args.stdlib_root) if args.stdlib_root else corpus.stdlib_root()
    paths = corpus.list_source_files(root)
    train_paths, heldout_paths = corpus.split_files(paths, args.heldout_permille)
    if not train_paths or not heldout_paths:
        raise SystemExit(f"{root} holds {len(paths)} .py files; need training and held-out files "
                         f"(point --stdlib-root at a Python standard library)")
    # a path-hash order, so a size cap keeps a spread of the library rather than its first folders
    order = sorted(train_paths, key=lambda p: (corpus.path_bucket(p + "#order"), p))
    if args.max_files:
        order = order[: args.max_files]
        heldout_paths = heldout_paths[: max(1, args.max_files // 4)]
    t0 = time.time()
    train_texts = corpus.read_texts(root, order, int(args.max_corpus_mb * 1e6))
    heldout_texts = corpus.read_texts(root, heldout_paths)
    passkey_texts = [INTRO + FILLER * 4 + NEEDLE.format(key=str(10000 + 7919 * i % 90000)) + QUESTION
                     for i in range(200)]
    sample, size = [], 0
    for text in train_texts:
        if size > args.tokenizer_sample_mb * 1e6:
            break
        sample.append(text)
        size += len(text)
    tokenizer = train_tokenizer(sample + passkey_texts, args.vocab)
    encoder = FastEncoder(tokenizer)
    log(f"tokenizer: {encoder.vocab_size} tokens trained on {size / 1e6:.1f} MB in {time.time() - t0:.1f} s")

    def stream(texts):
        ids = []
        for encoded in encoder.encode_batch(texts):
            ids.append(encoder.bos_id)
            ids.extend(encoded)
            ids.append(encoder.eos_id)
        return torch.tensor(ids, dtype=torch.int64)

    data = Corpus(stream(train_texts), stream(heldout_texts), {})
    data.stats = {
        "stdlib_root": str(root), "python": platform.python_version(), "files_total": len(paths),
        "files_train_used": len(train_texts), "files_heldout": len(heldout_paths),
        "train_chars": sum(len(t) for t in train_texts), "heldout_chars": sum(len(t) for t in heldout_texts),
        "train_tokens": int(data.train.numel()), "heldout_tokens": int(data.heldout.numel()),
        "prep_s": round(time.time() - t0, 1),
    }
    split = {"stdlib_root": str(root), "python": platform.python_version(),
             "heldout_permille": args.heldout_permille, "heldout_files": heldout_paths,
             "train_files_used": len(train_texts)}
    log(f"corpus: {len(train_texts)} training files ({data.stats['train_tokens']:,} tokens), "
        f"{len(heldout_paths)} held-out files ({data.stats['heldout_tokens']:,} tokens), {data.stats['prep_s']} s")
    return data, encoder, tokenizer, split


class BatchSampler:
    """Rows of training tokens: random windows of the code stream, and (with probability
    ``passkey_frac``) a passkey document followed by ``</s>`` and code. ``batch`` returns rows
    int64 ``[B, S]`` and answer_mask bool ``[B, S]`` (True at the passkey answers' tokens)."""

    def __init__(self, stream, builder: PasskeyBuilder, eos_id: int, passkey_frac: float, seed: int, device):
        import torch

        self.stream = stream.to(device)
        self.builder = builder
        self.eos_id = eos_id
        self.passkey_frac = passkey_frac
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.device = device

    def batch(self, batch_size: int, seq_len: int):
        import torch

        if self.stream.numel() <= seq_len + 1:
            raise SystemExit(f"the training stream has {self.stream.numel()} tokens, fewer than one "
                             f"{seq_len}-token row; raise --max-corpus-mb or --max-files")
        starts = torch.randint(0, self.stream.numel() - seq_len, (batch_size,), generator=self.gen)
        rows = self.stream[starts.to(self.device)[:, None] + torch.arange(seq_len, device=self.device)]
        answer_mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
        min_len = min(seq_len, max(96, seq_len // 8))
        for r in range(batch_size):
            if self.rng.random() >= self.passkey_frac:
                continue
            try:
                doc = self.builder.random_document(seq_len, min_len, self.rng)
            except ValueError:  # seq_len too short for a document
                continue
            ids = doc.ids + [self.eos_id]
            rows[r, : len(ids)] = torch.tensor(ids[:seq_len], dtype=torch.int64, device=self.device)
            answer_mask[r, len(doc.prompt_ids): len(doc.ids)] = True
        return rows, answer_mask.to(self.device)


# ---- model -----------------------------------------------------------------------------------------
def build_config(args, vocab_size: int):
    from transformers import LlamaConfig

    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise SystemExit(f"--hidden {args.hidden} / --heads {args.heads} / --kv-heads {args.kv_heads}: "
                         f"heads must divide hidden and kv-heads must divide heads")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        attention_bias=False, mlp_bias=False, rms_norm_eps=1e-5)
    config.architectures = ["LlamaForCausalLM"]
    return config


def lm_loss(model, rows, answer_mask=None):
    """rows int64 ``[B, S]`` -> (mean next-token cross entropy, summed cross entropy of the tokens
    where ``answer_mask`` bool ``[B, S]`` is True, their count); float32 scalars."""
    import torch.nn.functional as F

    logits = model(input_ids=rows).logits
    per_token = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                reduction="none")
    if answer_mask is None:
        return per_token.mean(), None, None
    picked = answer_mask[:, 1:].reshape(-1)
    return per_token.mean(), (per_token * picked).sum().detach(), picked.sum()


def learning_rate(args, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * warm * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def phase_at(phases: Sequence[Tuple[int, float]], progress: float) -> int:
    edge = 0.0
    for seq_len, share in phases:
        edge += share
        if progress < edge:
            return seq_len
    return phases[-1][0]


def curve_points(pending) -> List[Dict]:
    """Read back (one sync) the steps logged since the last read: loss, grad norm, and the mean
    loss on passkey answer tokens (None when the step had no passkey row)."""
    points = []
    for step, seq_len, lr, loss, norm, answer_nll, answer_count in pending:
        count = int(answer_count)
        points.append({"step": step, "seq_len": seq_len, "lr": lr, "loss": round(float(loss), 4),
                       "grad_norm": round(float(norm), 3),
                       "answer_loss": round(float(answer_nll) / count, 4) if count else None})
    return points


def recent_answer_loss(curve: List[Dict], last: int = 20) -> str:
    values = [p["answer_loss"] for p in curve[-last:] if p["answer_loss"] is not None]
    return f"{sum(values) / len(values):.3f}" if values else "n/a"


# ---- checks of the trained model -------------------------------------------------------------------
def heldout_loss(model, stream, seq_len: int, windows: int, device) -> Optional[float]:
    """Mean next-token loss over the first ``windows`` non-overlapping held-out windows."""
    import torch

    usable = min(windows, stream.numel() // seq_len)
    if usable == 0:
        return None
    rows = stream[: usable * seq_len].view(usable, seq_len).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return float(torch.stack([lm_loss(model, rows[i:i + 1])[0] for i in range(usable)]).mean())


def passkey_accuracy(model, builder: PasskeyBuilder, lengths: Sequence[int], docs_per_length: int, seed: int,
                     device) -> Dict[str, float]:
    """Greedy exact-match accuracy per context length, computed teacher-forced (greedy decoding is
    right iff the argmax at every answer position is the answer token)."""
    import torch

    out = {}
    depths = [(i + 0.5) / docs_per_length for i in range(docs_per_length)]
    for length in lengths:
        docs = builder.grid([length], depths, 1, seed + length)
        correct = 0
        for doc in docs:
            ids = torch.tensor([doc.ids], device=device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=ids).logits[0]
            start = len(doc.prompt_ids) - 1
            pred = logits[start: start + len(doc.answer_ids)].argmax(-1).tolist()
            correct += int(pred == doc.answer_ids)
        out[str(length)] = correct / len(docs)
    return out


# ---- main ------------------------------------------------------------------------------------------
def main(argv=None) -> Dict:
    args = build_parser().parse_args(argv)
    import torch
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    started = time.time()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    log_lines: List[str] = []

    def log(msg: str) -> None:
        line = f"[train {time.time() - started:6.1f}s] {msg}"
        log_lines.append(line)
        print(line, flush=True)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    data, encoder, tokenizer, split = prepare_corpus(args, log)
    builder = PasskeyBuilder(encoder, encoder.bos_id)
    config = build_config(args, encoder.vocab_size)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.1f}M parameters, {args.layers} layers, hidden {args.hidden}, "
        f"{args.heads} query / {args.kv_heads} KV heads of {args.head_dim}, vocab {encoder.vocab_size}, on {device}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    forward_model = torch.compile(model) if args.compile else model
    sampler = BatchSampler(data.train, builder, encoder.eos_id, args.passkey_frac, args.seed, device)
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    budget = args.time_budget if args.time_budget > 0 else float("inf")
    if budget == float("inf") and not args.max_steps:
        raise SystemExit("give --time-budget or --max-steps")
    curve: List[Dict] = []
    step, tokens_seen = 0, 0
    pending = []  # (step, loss tensor) not yet read back (reading syncs)
    train_start = time.time()
    bar = tqdm(total=args.max_steps or None, disable=args.no_progress, desc="train", unit="step")
    model.train()
    while True:
        elapsed = time.time() - train_start
        progress = max(elapsed / budget, step / args.max_steps if args.max_steps else 0.0)
        if progress >= 1.0:
            break
        seq_len = phase_at(args.phases, progress)
        batch_size = max(1, args.tokens_per_step // seq_len)
        micro = max(1, min(batch_size, args.micro_batch_tokens // seq_len))
        lr = learning_rate(args, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows, answer_mask = sampler.batch(batch_size, seq_len)
        step_loss = torch.zeros((), device=device)
        answer_nll = torch.zeros((), device=device)
        answer_count = torch.zeros((), device=device, dtype=torch.int64)
        for chunk, chunk_mask in zip(rows.split(micro), answer_mask.split(micro)):
            with torch.autocast(**autocast):
                loss, nll_sum, count = lm_loss(forward_model, chunk, chunk_mask)
            (loss * chunk.shape[0] / batch_size).backward()
            step_loss += loss.detach() * chunk.shape[0] / batch_size
            answer_nll += nll_sum
            answer_count += count
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += rows.numel()
        pending.append((step, seq_len, lr, step_loss, grad_norm, answer_nll, answer_count))
        bar.update(1)
        if step % args.log_every == 0 or step == 1:
            curve.extend(curve_points(pending))
            pending.clear()
            now = time.time() - train_start
            curve[-1].update(seconds=round(now, 1), tokens=tokens_seen)
            bar.set_postfix(loss=curve[-1]["loss"], seq=seq_len, tok_s=f"{tokens_seen / max(now, 1e-9):,.0f}")
            if args.no_progress:
                log(f"step {step} seq {seq_len} lr {lr:.2e} loss {curve[-1]['loss']:.4f} "
                    f"passkey-answer loss {recent_answer_loss(curve)} "
                    f"{tokens_seen / max(now, 1e-9):,.0f} tokens/s")
    curve.extend(curve_points(pending))
    bar.close()
    train_s = time.time() - train_start
    if curve:
        curve[-1].update(seconds=round(train_s, 1), tokens=tokens_seen)
    log(f"trained {step} steps, {tokens_seen:,} tokens in {train_s:.1f} s "
        f"({tokens_seen / max(train_s, 1e-9):,.0f} tokens/s); last loss {curve[-1]['loss'] if curve else 'n/a'}")

    model.eval()
    lengths = [int(x) for x in args.eval_lengths.split(",") if x]
    check = {"heldout_loss": {str(n): heldout_loss(model, data.heldout, n, 4, device) for n in lengths},
             "passkey_accuracy": passkey_accuracy(model, builder, lengths, args.eval_docs, args.seed + 1, device)}
    log(f"check: held-out loss {check['heldout_loss']}, passkey accuracy {check['passkey_accuracy']}")

    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    to_hf(tokenizer).save_pretrained(out_dir)
    (out_dir / "corpus_split.json").write_text(json.dumps(split, indent=1))
    from benchmarks.serving import device_name, versions

    train_log = {
        "args": {k: v for k, v in vars(args).items()}, "device": device_name() if device.type == "cuda" else "cpu",
        "versions": versions(), "parameters": n_params, "corpus": data.stats, "steps": step,
        "tokens": tokens_seen, "train_s": round(train_s, 1), "total_s": round(time.time() - started, 1),
        "curve": curve, "check": check, "log": log_lines,
    }
    (out_dir / "train_log.json").write_text(json.dumps(train_log, indent=1))
    log(f"saved to {out_dir} ({time.time() - started:.1f} s in all)")
    return train_log


if __name__ == "__main__":
    main()
