"""Where a server's GPU time goes over a sample of scheduler steps (issue #11, "where the time goes").

``profile_server`` asks a running SGLang server to record ``num_steps`` forward steps with the torch
profiler (``POST /start_profile``, CPU and GPU activities), sends a burst of requests shaped like an
agentic round (a shared prefix, then distinct tokens), waits for the trace SGLang writes, and keeps
only its summary (``summarize_trace``): GPU kernel time by group (attention, KV write, requantize and
dequantize moves, GEMMs and the rest) and by kernel, the heaviest CPU ops, and the wall span; the
trace itself (tens of MB) is deleted. ``benchmarks/e2e.py --profile-steps N`` runs it on every system
after its agentic benchmark, so kvc and stock are profiled in the same device call.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import time
import urllib.request
from collections import defaultdict
from typing import Dict, List, Optional


# Kernel groups, first match wins (names as CUPTI reports Triton and CUDA kernels).
KERNEL_GROUPS = (
    ("attention", re.compile(r"_decode_stage1|_decode_reduce|_fwd_kernel|_fwd_grouped_kernel|decode_attention|"
                             r"extend_attention|flash|fmha|attention", re.I)),
    ("kv_dequantize", re.compile(r"_dequant_kernel")),
    ("kv_write", re.compile(r"_write_kernel|store_kvcache|set_kv|copy_kv|_set_kv")),
    ("requantize", re.compile(r"_requant_kernel")),
    ("plan", re.compile(r"_plan_requests_kernel|create_flashinfer_kv_indices|kv_indices")),
    ("gemm", re.compile(r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul", re.I)),
)
TOP = 25


def post(url: str, payload: dict, timeout: float) -> Optional[bytes]:
    """The response body of a JSON POST, None if it failed (the caller records what did not answer)."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.read()
    except OSError:
        return None


def kernel_group(name: str) -> str:
    for group, pattern in KERNEL_GROUPS:
        if pattern.search(name):
            return group
    return "other"


def load_trace(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def summarize_trace(trace: dict) -> dict:
    """GPU kernel time (us) by group and by kernel, CPU op time (inclusive) by name, the span of the
    trace and the number of forward steps SGLang annotated. Shares are of the summed kernel time."""
    kernels: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0])
    cpu_ops: Dict[str, List[float]] = defaultdict(lambda: [0.0, 0])
    start, end = float("inf"), 0.0
    for event in trace.get("traceEvents", []):
        if event.get("ph") != "X" or "dur" not in event:
            continue
        start, end = min(start, float(event["ts"])), max(end, float(event["ts"]) + float(event["dur"]))
        table = kernels if event.get("cat") == "kernel" else cpu_ops if event.get("cat") == "cpu_op" else None
        if table is not None:
            entry = table[event.get("name", "?")]
            entry[0] += float(event["dur"])
            entry[1] += 1
    total = sum(us for us, _ in kernels.values())
    groups: Dict[str, float] = defaultdict(float)
    for name, (us, _) in kernels.items():
        groups[kernel_group(name)] += us
    by_kernel = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:TOP]
    by_cpu = sorted(cpu_ops.items(), key=lambda kv: -kv[1][0])[:TOP]
    return {
        "span_us": round(end - start, 1) if end > start else 0.0,
        "kernel_us": round(total, 1),
        "groups_us": {g: round(us, 1) for g, us in sorted(groups.items(), key=lambda kv: -kv[1])},
        "groups_share": {g: round(us / total, 4) for g, us in groups.items()} if total else {},
        "kernels": [{"name": name[:160], "us": round(us, 1), "count": count, "group": kernel_group(name)}
                    for name, (us, count) in by_kernel],
        "cpu_ops": [{"name": name[:160], "us": round(us, 1), "count": count} for name, (us, count) in by_cpu],
    }


def burst(url: str, vocab_size: int, requests: int, prefix_len: int, prompt_len: int, output_len: int,
          seed: int = 4242) -> int:
    """Send ``requests`` prompts (a shared ``prefix_len``-token prefix, then distinct tokens) at once;
    returns how many got an answer."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(seed)
    prefix = [rng.randrange(10, vocab_size) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randrange(10, vocab_size) for _ in range(prompt_len - prefix_len)]
               for _ in range(requests)]
    body = lambda ids: {"input_ids": ids, "sampling_params": {"max_new_tokens": output_len, "temperature": 0.0,
                                                               "ignore_eos": True}}
    with ThreadPoolExecutor(max_workers=requests) as pool:
        answers = list(pool.map(lambda ids: post(url + "/generate", body(ids), timeout=120), prompts))
    return sum(1 for a in answers if a is not None)


def profile_server(url: str, out_dir: str, vocab_size: int, num_steps: int = 40, requests: int = 16,
                   prefix_len: int = 1024, prompt_len: int = 1664, output_len: int = 64,
                   wait_s: float = 90.0) -> dict:
    """Profile ``num_steps`` steps of a running server under one burst; the summary (or an error)."""
    os.makedirs(out_dir, exist_ok=True)
    before = set(glob.glob(os.path.join(out_dir, "*.json*")))
    started = post(url + "/start_profile", {"output_dir": out_dir, "num_steps": num_steps,
                                            "activities": ["CPU", "GPU"]}, timeout=60)
    if started is None:
        return {"error": "POST /start_profile failed"}
    answered = burst(url, vocab_size, requests, prefix_len, prompt_len, output_len)
    deadline = time.monotonic() + wait_s
    traces: List[str] = []
    while time.monotonic() < deadline:
        traces = sorted(set(glob.glob(os.path.join(out_dir, "*.json*"))) - before)
        if traces and all(_stable(p) for p in traces):
            break
        time.sleep(2)
    if not traces:
        return {"error": f"no trace in {out_dir} after {wait_s:.0f} s", "answered": answered}
    summary = summarize_trace(load_trace(traces[0]))
    summary.update(answered=answered, requests=requests, num_steps=num_steps, prefix_len=prefix_len,
                   prompt_len=prompt_len, output_len=output_len, trace_files=[os.path.basename(p) for p in traces])
    for path in traces:
        os.remove(path)
    return summary


def _stable(path: str, settle_s: float = 1.0) -> bool:
    """A trace file SGLang has finished writing (its size did not change for ``settle_s``)."""
    size = os.path.getsize(path)
    time.sleep(settle_s)
    return size > 0 and os.path.getsize(path) == size


def attention_share(profile: Optional[dict]) -> Optional[float]:
    """GPU time in attention kernels (with kvc's prefix dequantize) over all kernel time."""
    if not profile or not profile.get("groups_share"):
        return None
    shares = profile["groups_share"]
    return round(shares.get("attention", 0.0) + shares.get("kv_dequantize", 0.0), 4)
