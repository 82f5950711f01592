"""Agentic multi-turn benchmark (issue #6) against any running SGLang server, in token ids.

N sessions x R rounds (defaults 32 x 8, the cache simulator's agentic trace, ``benchmarks/traces.py``)
share one system prompt. Round 0 sends ``system + tool chunk + user turn``; each later round sends
the whole previous conversation (its prompt and the reply the server really generated) plus a new
tool-output chunk and user turn. Every reply is exactly the trace's output length (greedy,
ignore_eos), so prompt lengths, and the working set, equal the simulator's. Session ``s`` starts
``s * stagger`` seconds in; each later round waits the trace's tool-execution delay after the
previous reply (``--time-scale`` scales every delay; 0 sends back to back).

Requests go to ``/generate`` with ``input_ids`` and ``stream: true`` (works with or without
``--skip-tokenizer-init``); the client times the first streamed token (TTFT), the mean gap between
later tokens (TPOT) and reads ``meta_info.cached_tokens`` (prefix-cache hit tokens). Trace token
ids are folded into the model's vocabulary (``--vocab-size``), keeping equal sequences equal.

Reported: per-round TTFT p50/p90, TPOT, hit tokens; over all and over the late rounds
(``round >= rounds // 2`` unless ``--late-from``); output throughput = output tokens / (last
reply - first send).

    python benchmarks/agentic_multiturn.py --url http://127.0.0.1:31000 --out /tmp/agentic.json

On the GPU machine ``benchmarks/e2e.py`` (``bash benchmarks/gpu_e2e.sh``) calls ``run_agentic`` for
each server it starts. Against a server started by hand there (kit unpacked as gpu_e2e.sh does):
    PYTHONPATH=/tmp/site python3 benchmarks/agentic_multiturn.py --url http://127.0.0.1:31000 \
        --vocab-size 32000 --out $OUT/agentic.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.serving import stream_generate  # noqa: E402
from benchmarks.traces import FIRST_ORDINARY_TOKEN, Trace, agentic_trace  # noqa: E402

TRACE_DEFAULTS = dict(sessions=32, rounds=8, system_len=1024, tool_len=768, user_len=64, output_len=128,
                      range_ratio=0.5, stagger_s=0.5, tool_delay_s=(0.5, 3.0), seed=0)


def fold_token(token: int, vocab_size: int) -> int:
    """A trace id (drawn from Llama 3's vocabulary) as an ordinary id of a ``vocab_size`` vocabulary."""
    return FIRST_ORDINARY_TOKEN + (int(token) - FIRST_ORDINARY_TOKEN) % (vocab_size - FIRST_ORDINARY_TOKEN)


@dataclasses.dataclass(frozen=True)
class Step:
    """One round of one session: the ids appended to the conversation (round 0: the whole first
    prompt), the reply length, and the wait before sending (round 0: from the benchmark start;
    later rounds: after the previous reply)."""

    session: int
    round: int
    new_ids: List[int]
    output_len: int
    delay_s: float


def session_plans(trace: Trace, vocab_size: int) -> List[List[Step]]:
    """Per session, its rounds in order. Invariant: for the trace's own outputs, the prompt of
    round r equals the concatenation of every ``new_ids`` and output up to round r, so the real
    run sends prompts of exactly the trace's lengths."""
    plans: Dict[int, List[Step]] = {}
    for index, request in enumerate(trace.requests):
        if request.follows is None:
            new = request.prompt
        else:
            previous = trace.requests[request.follows]
            new = request.prompt[len(previous.prompt) + len(previous.output):]
        plans.setdefault(request.session, []).append(Step(
            request.session, request.round, [fold_token(t, vocab_size) for t in new], len(request.output),
            request.delay_s))
    return [sorted(plans[s], key=lambda step: step.round) for s in sorted(plans)]


def run_agentic(url: str, plans: List[List[Step]], time_scale: float = 1.0, timeout_s: float = 900,
                progress: bool = True, label: str = "agentic") -> List[dict]:
    """Replay ``plans`` against ``url``, one thread per session; one record per request.

    A failed request is recorded with its error and the session goes on with the trace's reply
    length of filler ids (so later rounds keep their shape). Requests not sent by ``timeout_s``
    after the start are recorded as skipped."""
    from tqdm import tqdm

    total = sum(len(plan) for plan in plans)
    records: List[dict] = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + timeout_s
    bar = tqdm(total=total, desc=label, unit="req", disable=not progress,
               mininterval=1.0 if sys.stderr.isatty() else 10.0)

    def run_session(plan: List[Step]) -> None:
        context: List[int] = []
        for step in plan:
            wait_until = (start if step.round == 0 else time.perf_counter()) + step.delay_s * time_scale
            time.sleep(max(0.0, wait_until - time.perf_counter()))
            prompt = context + step.new_ids
            record = {"session": step.session, "round": step.round, "prompt_tokens": len(prompt)}
            if time.perf_counter() > deadline:
                record["error"] = "skipped: benchmark timeout"
                output = [FIRST_ORDINARY_TOKEN] * step.output_len
            else:
                result = stream_generate(url, prompt, {"temperature": 0.0, "max_new_tokens": step.output_len,
                                                       "ignore_eos": True},
                                         timeout=max(1.0, deadline - time.perf_counter()))
                record.update(sent_s=result.sent_at - start, finished_s=result.finished_at - start,
                              ttft_s=result.ttft_s, tpot_s=result.tpot_s, latency_s=result.latency_s,
                              output_tokens=len(result.output_ids),
                              cached_tokens=result.meta_info.get("cached_tokens"),
                              cached_tokens_details=result.meta_info.get("cached_tokens_details"),
                              server_prompt_tokens=result.meta_info.get("prompt_tokens"))
                if result.error:
                    record["error"] = result.error
                output = result.output_ids if not result.error else [FIRST_ORDINARY_TOKEN] * step.output_len
            context = prompt + list(output)
            with lock:
                records.append(record)
                bar.update(1)
                done = [r["ttft_s"] for r in records if r["round"] == step.round and r.get("ttft_s") is not None]
                if done:
                    bar.set_postfix_str(f"round {step.round} ttft p50 {percentile(done, 50) * 1000:.0f} ms")

    with ThreadPoolExecutor(max_workers=max(1, len(plans))) as pool:
        for future in [pool.submit(run_session, plan) for plan in plans]:
            future.result()
    bar.close()
    return sorted(records, key=lambda r: (r["round"], r["session"]))


# ---- statistics ----------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (numpy's default rule); None for no values."""
    data = sorted(values)
    if not data:
        return None
    position = (len(data) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (position - low)


def _stats(records: List[dict]) -> dict:
    ok = [r for r in records if not r.get("error")]
    ttft = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    tpot = [r["tpot_s"] for r in ok if r.get("tpot_s") is not None]
    prompt = sum(r["prompt_tokens"] for r in ok)
    cached = sum(r.get("cached_tokens") or 0 for r in ok)
    return {"requests": len(records), "errors": len(records) - len(ok),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90),
            "ttft_mean_s": sum(ttft) / len(ttft) if ttft else None,
            "tpot_p50_s": percentile(tpot, 50), "tpot_mean_s": sum(tpot) / len(tpot) if tpot else None,
            "prompt_tokens": prompt, "cached_tokens": cached, "hit_ratio": cached / prompt if prompt else None,
            "output_tokens": sum(r.get("output_tokens") or 0 for r in ok)}


def summarize(records: List[dict], rounds: int, late_from: Optional[int] = None) -> dict:
    """Per-round, late-round and overall statistics of ``run_agentic`` records (JSON-able).

    ``output_throughput_tok_s`` is every generated token over the span from the first send to the
    last reply, think time included (what an operator sees)."""
    late_from = rounds // 2 if late_from is None else late_from
    per_round = []
    for rnd in range(rounds):
        stats = _stats([r for r in records if r["round"] == rnd])
        per_round.append(dict(round=rnd, **stats))
    overall = _stats(records)
    sent = [r["sent_s"] for r in records if "sent_s" in r]
    finished = [r["finished_s"] for r in records if "finished_s" in r and not r.get("error")]
    span = (max(finished) - min(sent)) if sent and finished else None
    overall["duration_s"] = span
    overall["output_throughput_tok_s"] = overall["output_tokens"] / span if span else None
    return {"rounds": rounds, "late_from_round": late_from, "overall": overall,
            "late": _stats([r for r in records if r["round"] >= late_from]), "per_round": per_round}


def trace_from_args(args) -> Trace:
    return agentic_trace(sessions=args.sessions, rounds=args.rounds, system_len=args.system_len,
                         tool_len=args.tool_len, user_len=args.user_len, output_len=args.output_len,
                         range_ratio=args.range_ratio, stagger_s=args.stagger_s,
                         tool_delay_s=tuple(args.tool_delay_s), seed=args.seed)


def add_trace_args(parser: argparse.ArgumentParser) -> None:
    """The agentic trace's parameters, defaults as the cache simulator's (shared with e2e.py)."""
    d = TRACE_DEFAULTS
    group = parser.add_argument_group("agentic trace (benchmarks/traces.py agentic_trace)")
    group.add_argument("--sessions", type=int, default=d["sessions"])
    group.add_argument("--rounds", type=int, default=d["rounds"])
    group.add_argument("--system-len", type=int, default=d["system_len"], help="shared system prompt tokens")
    group.add_argument("--tool-len", type=int, default=d["tool_len"], help="tool-output chunk tokens (max)")
    group.add_argument("--user-len", type=int, default=d["user_len"], help="user-turn tokens")
    group.add_argument("--output-len", type=int, default=d["output_len"], help="reply tokens (ignore_eos)")
    group.add_argument("--range-ratio", type=float, default=d["range_ratio"], help="tool chunk min/max")
    group.add_argument("--stagger-s", type=float, default=d["stagger_s"], help="session start spacing")
    group.add_argument("--tool-delay-s", type=float, nargs=2, default=list(d["tool_delay_s"]),
                       metavar=("MIN", "MAX"), help="think time before each later round")
    group.add_argument("--seed", type=int, default=d["seed"])
    group.add_argument("--time-scale", type=float, default=1.0, help="multiplies every delay (0: back to back)")
    group.add_argument("--late-from", type=int, default=None, help="first 'late' round (default rounds // 2)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:31000", help="SGLang server base URL")
    parser.add_argument("--vocab-size", type=int, default=32000, help="the served model's vocabulary size")
    parser.add_argument("--timeout-s", type=float, default=900, help="stop sending after this many seconds")
    parser.add_argument("--out", default=None, help="write records and summary to this JSON file")
    parser.add_argument("--no-progress", action="store_true")
    add_trace_args(parser)
    args = parser.parse_args(argv)
    trace = trace_from_args(args)
    records = run_agentic(args.url.rstrip("/"), session_plans(trace, args.vocab_size), args.time_scale,
                          args.timeout_s, progress=not args.no_progress)
    summary = summarize(records, trace.num_rounds, args.late_from)
    print(json.dumps({"overall": summary["overall"], "late": summary["late"]}, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"trace": trace.params, "summary": summary, "requests": records}, handle, indent=1)
    return 0 if summary["overall"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
