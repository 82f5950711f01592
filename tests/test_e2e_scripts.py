"""CPU checks of the issue-#6 benchmark scripts (benchmarks/agentic_multiturn.py, shared_prefix.py,
e2e.py, results_table.py) against a fake SGLang server that speaks SGLang 0.5.16's HTTP protocol.

The fake (``FakeSGLang``) streams ``/generate`` exactly as ``sglang/srt/entrypoints/http_server.py``
and ``managers/tokenizer_manager.py`` do: ``data: {json}\\n\\n`` events, each with the whole output so
far (or only the new ids with ``--incremental-streaming-output``), ``meta_info`` with id,
finish_reason, prompt_tokens, weight_version, num_retractions, reasoning_tokens, completion_tokens,
cached_tokens, then ``data: [DONE]``. It holds a prefix cache of ``--max-total-tokens`` (more for
``--kv-compression``) so cached_tokens behave like a radix cache under pressure, sleeps per uncached
prompt token and per output token, and writes SGLang-like log lines.

Run as a server: ``python -m tests.test_e2e_scripts --host 127.0.0.1 --port 31000 --model-path M``.
The two end-to-end dry runs (real bench_serving; the whole runner with --resume) take ~1 minute:
they run when ``KVC_SLOW_TESTS=1``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SLOW = os.environ.get("KVC_SLOW_TESTS") == "1"


# ---- the fake server ------------------------------------------------------------------------------
class FakeSGLang:
    """State of one fake server. Invariant: the cached sequences hold at most ``capacity`` tokens,
    least recently used dropped first; ``cached_tokens`` of a request is its longest common prefix
    with a cached sequence, rounded down to ``page_size``."""

    def __init__(self, capacity: int, page_size: int = 16, vocab_size: int = 32000, prefill_s_per_token: float = 0.0,
                 decode_s: float = 0.0, incremental: bool = False, tokenizer=None, kvc: bool = False):
        self.capacity, self.page_size, self.vocab_size = capacity, page_size, vocab_size
        self.prefill_s_per_token, self.decode_s, self.incremental = prefill_s_per_token, decode_s, incremental
        self.tokenizer, self.kvc = tokenizer, kvc
        self.cache: List[tuple] = []
        self.lock = threading.Lock()
        self.counter = 0
        self.prompt_tokens_total = 0
        self.demoted_total = 0

    def match(self, ids: List[int]) -> int:
        best = 0
        with self.lock:
            for index, seq in enumerate(self.cache):
                n = 0
                for a, b in zip(seq, ids):
                    if a != b:
                        break
                    n += 1
                if n > best:
                    best, hit = n, index
            if best:
                self.cache.append(self.cache.pop(hit))
        return best // self.page_size * self.page_size

    def insert(self, ids: List[int]) -> None:
        with self.lock:
            self.cache.append(tuple(ids))
            while sum(len(s) for s in self.cache) > self.capacity and len(self.cache) > 1:
                dropped = self.cache.pop(0)
                self.demoted_total += len(dropped)

    def reply_ids(self, prompt: List[int], count: int) -> List[int]:
        seed = sum(prompt[-8:]) + len(prompt)
        return [1000 + (seed + 7919 * i) % (self.vocab_size - 1000) for i in range(count)]

    def metrics_text(self) -> str:
        lines = ["# HELP sglang:prompt_tokens_total Prompt tokens.", "# TYPE sglang:prompt_tokens_total counter",
                 f'sglang:prompt_tokens_total{{model_name="fake"}} {float(self.prompt_tokens_total)}']
        if self.kvc:
            lines += [f'sglang:kvc_demoted_tokens_total{{model_name="fake",tier="k8v8"}} {float(self.demoted_total)}',
                      f'sglang:kvc_tier_tokens{{model_name="fake",tier="bf16"}} {float(sum(map(len, self.cache)))}']
        return "\n".join(lines) + "\n"


def make_handler(state: FakeSGLang, model_path: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, code: int, body: bytes, content_type: str = "application/json"):
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path in ("/health", "/health_generate"):
                return self._send(200, b"")
            if self.path == "/v1/models":
                return self._send(200, json.dumps({"object": "list", "data": [{"id": model_path}]}).encode())
            if self.path == "/model_info":
                return self._send(200, json.dumps({"model_path": model_path, "tokenizer_path": model_path}).encode())
            if self.path in ("/server_info", "/get_server_info"):
                return self._send(200, json.dumps({"fake": True}).encode())
            if self.path == "/metrics":
                return self._send(200, state.metrics_text().encode(), "text/plain")
            if self.path == "/flush_cache":
                return self.do_POST()
            return self._send(404, b"{}")

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if self.path == "/flush_cache":
                with state.lock:
                    state.cache.clear()
                return self._send(200, b"Cache flushed.\n", "text/plain")
            if self.path != "/generate":
                return self._send(404, b"{}")
            if self.headers.get("Content-Type", "").split(";")[0] != "application/json":
                return self._send(400, b'{"error": "Unsupported Media Type"}')
            request = json.loads(body)
            if "input_ids" in request:
                prompt = list(request["input_ids"])
                if any(not 0 <= t < state.vocab_size for t in prompt):
                    return self._send(400, json.dumps({"error": {"message": "input_ids out of the vocabulary",
                                                                 "code": 400}}).encode())
            else:
                prompt = state.tokenizer.encode(request["text"])
            params = request.get("sampling_params") or {}
            count = int(params.get("max_new_tokens", 16))
            cached = state.match(prompt)
            state.prompt_tokens_total += len(prompt)
            with state.lock:
                state.counter += 1
                rid = f"fake-{state.counter}"
            time.sleep(state.prefill_s_per_token * (len(prompt) - cached))
            output = state.reply_ids(prompt, count)
            state.insert(prompt + output[:-1])

            def event(done: int) -> dict:
                meta = {"id": rid, "finish_reason": {"type": "length", "length": count} if done == count else None,
                        "prompt_tokens": len(prompt), "weight_version": "default", "num_retractions": 0,
                        "reasoning_tokens": 0, "completion_tokens": done, "cached_tokens": cached}
                ids = output[done - 1: done] if state.incremental else output[:done]
                out = {"output_ids": ids, "meta_info": meta}
                if state.tokenizer is not None:
                    out = {"text": state.tokenizer.decode(ids if state.incremental else output[:done]), **out}
                return out

            if not request.get("stream"):
                return self._send(200, json.dumps(event(count)).encode())
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def chunk(data: bytes):
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            for done in range(1, count + 1):
                if done > 1:
                    time.sleep(state.decode_s)
                chunk(b"data: " + json.dumps(event(done)).encode() + b"\n\n")
            chunk(b"data: [DONE]\n\n")
            chunk(b"")

    return Handler


def start_fake(state: FakeSGLang, model_path: str = "fake-model"):
    """Serve ``state`` on a free local port in a daemon thread; returns (httpd, url)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state, model_path))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def fake_server_main(argv=None) -> None:
    """``sglang.launch_server`` stand-in: same flags (unknown ones ignored), SGLang-like log lines."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--max-total-tokens", type=int, default=100000)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--kv-compression", default=None)
    parser.add_argument("--cuda-graph-backend-decode", default="full")
    parser.add_argument("--skip-tokenizer-init", action="store_true")
    args, _ = parser.parse_known_args(argv)
    config = json.load(open(os.path.join(args.model_path, "config.json")))
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_token = config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim
    fp8 = args.kv_cache_dtype.startswith("fp8")
    half_gb = args.max_total_tokens * per_token * (1 if fp8 else 2) / (1 << 30)
    capacity = args.max_total_tokens
    if args.kv_compression:  # one arena of 4-bf16-page frames; the scheduler admits against all of it
        capacity = int(args.max_total_tokens * 3.7)
        frames = args.max_total_tokens // (4 * args.page_size)
        print(f"[fake] sglang-kvc: max_total_num_tokens={args.max_total_tokens} (stock bf16 at this budget: "
              f"{args.max_total_tokens}); arena: {frames} frames of 4 bf16 pages; bf16 4 pages/frame (1.00x "
              f"bf16/GiB), k8v8 7 pages/frame (1.75x bf16/GiB), k4v2 18 pages/frame (4.50x bf16/GiB); "
              f"{frames * 4 * args.page_size * per_token * 4 / (1 << 30):.2f} GB")
        print(f"[fake] max_total_num_tokens={args.max_total_tokens}, chunked_prefill_size=8192")
    else:
        dtype = "torch.float8_e4m3fn" if fp8 else "torch.bfloat16"
        print(f"[fake] KV Cache is allocated. dtype: {dtype}, #tokens: {args.max_total_tokens}, "
              f"K size: {half_gb:.2f} GB, V size: {half_gb:.2f} GB")
        print(f"[fake] max_total_num_tokens={args.max_total_tokens}, chunked_prefill_size=8192")
    tokenizer = None
    if not args.skip_tokenizer_init and os.path.exists(os.path.join(args.model_path, "tokenizer.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    state = FakeSGLang(capacity, args.page_size, config["vocab_size"], prefill_s_per_token=2e-6, decode_s=0.001,
                       tokenizer=tokenizer, kvc=bool(args.kv_compression))
    httpd = ThreadingHTTPServer((args.host, args.port), make_handler(state, args.model_path))
    httpd.daemon_threads = True
    print("[fake] The server is fired up and ready to roll!", flush=True)
    if args.kv_compression:
        print("[fake] Decode batch, #running-req: 1, kvc: bf16 1.0K/8.2K, k8v8 0/8.6K, k4v2 0/167.2K, demoted 0, "
              f"dropped 0, cuda graph: {args.cuda_graph_backend_decode != 'disabled'}", flush=True)
    else:
        print(f"[fake] Decode batch, #running-req: 1, cuda graph: {args.cuda_graph_backend_decode != 'disabled'}",
              flush=True)
    httpd.serve_forever()


# ---- tests: streaming client and agentic benchmark -------------------------------------------------
import pytest  # noqa: E402

from benchmarks import agentic_multiturn as agentic  # noqa: E402
from benchmarks import e2e  # noqa: E402
from benchmarks import results_table  # noqa: E402
from benchmarks import shared_prefix  # noqa: E402
from benchmarks.serving import (counter_deltas, make_tokenizer, merge_stream_ids, parse_metrics,  # noqa: E402
                                stream_generate)
from benchmarks.traces import agentic_trace  # noqa: E402


@pytest.fixture
def fake():
    servers = []

    def make(**kwargs):
        state = FakeSGLang(**kwargs)
        httpd, url = start_fake(state)
        servers.append(httpd)
        return state, url

    yield make
    for httpd in servers:
        httpd.shutdown()


@pytest.mark.parametrize("incremental", [False, True])
def test_stream_generate_times_first_token_and_gaps(fake, incremental):
    state, url = fake(capacity=10_000, prefill_s_per_token=0.002, decode_s=0.03, incremental=incremental)
    result = stream_generate(url, list(range(1000, 1100)), {"max_new_tokens": 6, "ignore_eos": True})
    assert result.error is None
    assert result.output_ids == state.reply_ids(list(range(1000, 1100)), 6)
    assert result.chunks == 6
    assert 0.2 <= result.ttft_s < 0.45  # 100 uncached tokens x 2 ms
    assert 0.025 <= result.tpot_s < 0.06  # 5 gaps of 30 ms over 5 tokens
    assert result.latency_s >= result.ttft_s + 5 * 0.025
    assert result.meta_info["completion_tokens"] == 6 and result.meta_info["cached_tokens"] == 0
    again = stream_generate(url, list(range(1000, 1100)) + [5000] * 40, {"max_new_tokens": 2})
    assert again.meta_info["cached_tokens"] == 96  # page-aligned common prefix
    assert again.ttft_s < result.ttft_s


def test_stream_generate_reports_errors(fake):
    _, url = fake(capacity=1000, vocab_size=2000)
    out_of_vocab = stream_generate(url, [5000], {"max_new_tokens": 2})
    assert out_of_vocab.error and "400" in out_of_vocab.error and out_of_vocab.ttft_s is None
    unreachable = stream_generate("http://127.0.0.1:9", [1], {"max_new_tokens": 2}, timeout=2)
    assert unreachable.error and unreachable.ttft_s is None


def test_merge_stream_ids_cumulative_and_incremental():
    assert merge_stream_ids([], [7], 1) == [7]
    assert merge_stream_ids([7], [7, 8], 2) == [7, 8]  # cumulative chunk
    assert merge_stream_ids([7, 8], [9], 3) == [7, 8, 9]  # incremental chunk
    assert merge_stream_ids([7, 8], [9, 10], 4) == [7, 8, 9, 10]  # incremental, stream_interval 2
    assert merge_stream_ids([7], [7, 8], None) == [7, 8]


def test_session_plans_rebuild_the_trace_prompts():
    trace = agentic_trace(sessions=3, rounds=4, system_len=64, tool_len=48, user_len=8, output_len=16, seed=1)
    plans = agentic.session_plans(trace, vocab_size=32000)
    assert [len(p) for p in plans] == [4, 4, 4]
    by_key = {(r.session, r.round): r for r in trace.requests}
    for plan in plans:
        context: List[int] = []
        for step in plan:
            request = by_key[(step.session, step.round)]
            prompt = context + step.new_ids
            assert prompt == [agentic.fold_token(t, 32000) for t in request.prompt]
            assert step.output_len == len(request.output)
            context = prompt + [agentic.fold_token(t, 32000) for t in request.output]
    assert all(1000 <= t < 32000 for plan in plans for step in plan for t in step.new_ids)
    assert plans[2][0].delay_s == pytest.approx(2 * trace.params["stagger_s"])


def test_agentic_run_against_fake_server(fake):
    state, url = fake(capacity=100_000, decode_s=0.001)
    trace = agentic_trace(sessions=4, rounds=3, system_len=64, tool_len=48, user_len=8, output_len=8, seed=2)
    records = agentic.run_agentic(url, agentic.session_plans(trace, 32000), time_scale=0.0, progress=False)
    assert len(records) == 12 and not any(r.get("error") for r in records)
    for record in records:  # prompt lengths equal the trace's: the server's own replies are as long
        request = next(r for r in trace.requests if (r.session, r.round) == (record["session"], record["round"]))
        assert record["prompt_tokens"] == len(request.prompt) == record["server_prompt_tokens"]
        assert record["output_tokens"] == 8
    later = [r for r in records if r["round"] > 0]
    assert all(r["cached_tokens"] >= r["prompt_tokens"] - 48 - 8 - 16 for r in later)  # whole history hit
    summary = agentic.summarize(records, trace.num_rounds)
    assert summary["late_from_round"] == 1 and summary["overall"]["requests"] == 12
    assert summary["overall"]["output_tokens"] == 96 and summary["overall"]["output_throughput_tok_s"] > 0
    assert summary["per_round"][0]["hit_ratio"] < summary["per_round"][2]["hit_ratio"]


def test_summarize_statistics_on_synthetic_records():
    records = []
    for rnd in range(4):
        for session in range(5):
            records.append({"session": session, "round": rnd, "prompt_tokens": 100, "cached_tokens": 25 * rnd,
                            "ttft_s": 0.1 * (rnd + 1) + 0.01 * session, "tpot_s": 0.02, "output_tokens": 10,
                            "sent_s": rnd * 1.0 + session * 0.1, "finished_s": rnd * 1.0 + session * 0.1 + 0.5})
    records.append({"session": 9, "round": 3, "prompt_tokens": 100, "error": "HTTP 500", "sent_s": 3.0,
                    "finished_s": 9.0})
    summary = agentic.summarize(records, rounds=4)
    round0 = summary["per_round"][0]
    assert round0["ttft_p50_s"] == pytest.approx(0.12) and round0["ttft_p90_s"] == pytest.approx(0.136)
    assert summary["late"]["requests"] == 11 and summary["late"]["errors"] == 1
    late = [0.3, .31, .32, .33, .34, .4, .41, .42, .43, .44]
    assert summary["late"]["ttft_p50_s"] == pytest.approx(percentile_np(late, 50))
    overall = summary["overall"]
    assert overall["output_tokens"] == 200 and overall["duration_s"] == pytest.approx(3.9)
    assert overall["output_throughput_tok_s"] == pytest.approx(200 / 3.9)
    assert overall["hit_ratio"] == pytest.approx(25 * (0 + 1 + 2 + 3) * 5 / 2000)
    assert agentic.percentile([], 50) is None and agentic.percentile([3.0], 90) == 3.0


def percentile_np(values, q):
    import numpy as np

    return float(np.percentile(values, q))


# ---- tests: tokenizer, metrics, shared-prefix ----------------------------------------------------------
def test_tokenizer_round_trip_is_exact(tmp_path):
    import random

    from transformers import AutoTokenizer

    path = make_tokenizer(str(tmp_path), vocab_size=32000)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == 32000 and tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    rng = random.Random(0)
    ids = rng.choices(list(tokenizer.get_vocab().values()), k=3000)  # bench_serving's gen_prompt
    system, question = tokenizer.decode(ids[:2048]), tokenizer.decode(ids[2048:])
    assert tokenizer.encode(f"{system}\n\n{question}") == ids  # generated-shared-prefix prompt format
    assert tokenizer.decode(list(range(31990, 32000)))  # every model id decodes


def test_parse_metrics_and_counter_deltas():
    before = parse_metrics('# TYPE x counter\nsglang:kvc_demoted_tokens_total{tier="k8v8"} 10\nsglang:gauge 5\n')
    after = parse_metrics('sglang:kvc_demoted_tokens_total{tier="k8v8"} 25.0\nsglang:gauge 7\n'
                          'sglang:kvc_dropped_tokens_total{tier="k4v2"} 3\n')
    assert counter_deltas(before, after) == {'sglang:kvc_demoted_tokens_total{tier="k8v8"}': 15.0,
                                             'sglang:kvc_dropped_tokens_total{tier="k4v2"}': 3.0}


def test_bench_serving_command_uses_0_5_16_flags():
    settings = dict(shared_prefix.GSP_DEFAULTS)
    command = shared_prefix.bench_serving_command("http://h:1", "/m", "/m", settings, "/tmp/o.jsonl")
    text = " ".join(command)
    for flag in ("--backend sglang", "--dataset-name generated-shared-prefix", "--gsp-num-groups 64",
                 "--gsp-prompts-per-group 4", "--gsp-system-prompt-len 2048", "--request-rate inf",
                 "--max-concurrency 32", "--cache-report", "--flush-cache", "--tokenizer /m"):
        assert flag in text
    import importlib.util  # every flag exists in SGLang's parser (read, not imported: it needs HF datasets)

    package = importlib.util.find_spec("sglang").submodule_search_locations[0]
    source = open(os.path.join(package, "benchmark", "serving.py")).read()
    for flag in (c for c in command if c.startswith("--")):
        assert f'"{flag}"' in source, flag


def test_extract_metrics_from_a_bench_serving_line(tmp_path):
    line = {"duration": 10.0, "completed": 256, "output_throughput": 3276.8, "median_ttft_ms": 120.0,
            "cache_report": {"total_cached_tokens": 1000, "cache_hit_rate_pct": 25.0}, "errors": ["", ""]}
    path = tmp_path / "o.jsonl"
    path.write_text(json.dumps({"completed": 1}) + "\n" + json.dumps(line) + "\n")
    metrics = shared_prefix.extract_metrics(shared_prefix.parse_output_file(str(path)))
    assert metrics["output_throughput"] == 3276.8 and metrics["hit_ratio"] == 0.25
    assert metrics["cached_tokens"] == 1000 and metrics["mean_ttft_ms"] is None


def test_shared_prefix_builtin_engine_against_fake(fake):
    _, url = fake(capacity=100_000)
    settings = dict(groups=3, prompts_per_group=4, system_len=64, question_len=16, output_len=4)
    record = shared_prefix.run_builtin(url, settings, 32000, max_concurrency=1, progress=False)
    metrics = record["metrics"]
    assert record.get("error") is None and metrics["completed"] == 12
    assert metrics["total_input_tokens"] == 12 * 80 and metrics["total_output_tokens"] == 48
    assert metrics["cached_tokens"] >= 9 * 64  # every group's system prompt after its first request
    assert metrics["output_throughput"] > 0 and metrics["median_ttft_ms"] > 0


def test_shared_prefix_working_set():
    settings = dict(shared_prefix.GSP_DEFAULTS)
    assert shared_prefix.working_set_tokens(settings, 16) == (64 * 2048 + 256 * 256) // 16 * 16 + 32


# ---- tests: runner budget, summary, resume ---------------------------------------------------------------
def runner_args(tmp_path, *extra):
    return e2e.parse_args(["--out", str(tmp_path), *extra])


def test_budget_is_the_same_bytes_for_every_system(tmp_path):
    args = runner_args(tmp_path)
    traces = e2e.run_traces(args)
    working_set = traces[False].working_set_tokens(16)
    assert working_set == 197584  # the cache simulator's agentic trace (results/cache_sim-2026-11-23.json)
    budgets = e2e.run_budgets(args, traces)
    budget = budgets[False]
    assert budget == e2e.KVBudget.from_working_set(working_set, 0.25, 16, e2e.MODEL_SHAPES["1b"])
    assert budget.bf16_tokens == 49392 and budget.bf16_tokens % 16 == 0
    assert budget.bytes_per_token("bf16") == 32768 and budget.budget_bytes == 49392 * 32768
    assert budgets[True].bf16_tokens == int(1.25 * working_set) // 16 * 16 >= working_set  # no pressure
    specs = [e2e.SystemSpec.parse(name) for name in e2e.DEFAULT_SYSTEMS]
    for spec in specs:
        own = budgets[spec.nopressure]
        tokens = own.max_total_tokens(spec)
        assert tokens * own.bytes_per_token(spec.kv_dtype) == own.budget_bytes
        flags = e2e.server_flags(spec, own, args)
        assert flags[flags.index("--max-total-tokens") + 1] == str(tokens)
        assert "--skip-tokenizer-init" not in flags  # bench_serving sends text
    flags = {spec.name: e2e.server_flags(spec, budgets[spec.nopressure], args) for spec in specs}
    assert budget.max_total_tokens(e2e.SystemSpec.parse("stock-fp8")) == 2 * 49392
    assert "fp8_e4m3" in flags["stock-fp8"] and "--kv-cache-dtype" not in flags["stock-bf16"]
    kvc = flags[e2e.HEADLINE_SYSTEMS[0]]
    assert "--kv-compression" in kvc and "--attention-backend" not in kvc  # the plugin picks kvc_triton
    assert "--enable-hierarchical-cache" in flags["stock-hicache"]
    # every system keeps SGLang's CUDA graphs (sglang-kvc captures decode graphs too)
    for name, system_flags in flags.items():
        assert "--cuda-graph-backend-prefill" not in system_flags and "--disable-cuda-graph" not in system_flags
    assert flags["nopressure:" + e2e.HEADLINE_SYSTEMS[0]] == e2e.server_flags(specs[0], budgets[True], args)
    assert {e2e.cuda_graphs(e2e.SystemSpec.parse(n), args) for n in ("nopressure:stock-bf16",
                                                                     "nopressure:" + e2e.HEADLINE_SYSTEMS[0])} == {"default"}
    decode_only = runner_args(tmp_path, "--graphs", "decode-only")
    for spec in specs[:2]:  # kvc and stock alike
        spec_flags = e2e.server_flags(spec, budget, decode_only)
        assert spec_flags[spec_flags.index("--cuda-graph-backend-prefill") + 1] == "disabled"


def test_nopressure_trace_and_budget_flags(tmp_path):
    args = runner_args(tmp_path, "--nopressure-sessions", "8", "--nopressure-rounds", "4", "--nopressure-fraction",
                       "1.5")
    traces = e2e.run_traces(args)
    assert traces[False].params["sessions"] == 32 and traces[True].params["sessions"] == 8
    assert traces[True].num_rounds == 4
    budgets = e2e.run_budgets(args, traces)
    assert budgets[True].bf16_tokens >= 1.5 * traces[True].working_set_tokens(16) - 16
    with_gsp = e2e.run_budgets(runner_args(tmp_path, "--nopressure-sessions", "8", "--nopressure-shared-prefix"),
                               traces)
    assert with_gsp[True].bf16_tokens >= 1.25 * e2e.gsp_working_set(args) - 16  # both benchmarks fit
    settings = e2e.run_settings(args, budgets, traces)["nopressure"]
    assert settings["fraction"] == 1.5 and settings["trace"]["sessions"] == 8 and not settings["shared_prefix"]
    assert settings["budget"]["bf16_tokens"] == budgets[True].bf16_tokens
    with pytest.raises(SystemExit):
        runner_args(tmp_path, "--nopressure-fraction", "0.5")
    kvc, nopressure = e2e.SystemSpec.parse("kvc=bf16"), e2e.SystemSpec.parse("nopressure:kvc=bf16")
    assert e2e.runs_shared_prefix(kvc, args) and not e2e.runs_shared_prefix(nopressure, args)
    assert e2e.runs_shared_prefix(nopressure, runner_args(tmp_path, "--nopressure-shared-prefix"))
    assert not e2e.runs_shared_prefix(kvc, runner_args(tmp_path, "--no-shared-prefix"))


def test_model_sizes_name_their_files_and_models(tmp_path):
    shape = e2e.MODEL_SHAPES["8b"]
    assert shape["hidden_size"] // shape["num_attention_heads"] == 128 and shape["num_key_value_heads"] == 8
    assert shape["num_hidden_layers"] == 32 and shape["intermediate_size"] == 14336
    assert shape["vocab_size"] == e2e.MODEL_SHAPES["1b"]["vocab_size"]
    budget = e2e.KVBudget.from_working_set(197584, 0.25, 16, shape)
    assert budget.bytes_per_token("bf16") == 2 * 32 * 8 * 128 * 2 and budget.bf16_tokens == 49392
    assert e2e.result_json_name("NVIDIA H200", "2026-12-01", "1b") == "e2e-nvidia-h200-2026-12-01.json"
    assert e2e.result_json_name("NVIDIA H200", "2026-12-01", "8b") == "e2e-nvidia-h200-2026-12-01-8b.json"
    assert e2e.logs_dir_name("1b") == "e2e-logs" and e2e.logs_dir_name("8b") == "e2e-logs-8b"
    assert e2e.result_json_name("NVIDIA H200", "2026-12-01", "8b", tp=2) == "e2e-nvidia-h200-2026-12-01-8b-tp2.json"
    assert e2e.logs_dir_name("1b", 2) == "e2e-logs-tp2"
    assert e2e.result_json_name("NVIDIA H200", "2026-12-02", "1b", label="saturated") == \
        "e2e-nvidia-h200-2026-12-02-saturated.json"
    assert e2e.logs_dir_name("8b", 1, "saturated") == "e2e-logs-8b-saturated"
    assert e2e.parse_args(["--label", "saturated"]).label == "saturated" and e2e.parse_args([]).label == ""
    with pytest.raises(SystemExit):
        e2e.parse_args(["--label", "Bad Name"])


def test_tp_budget_is_per_rank_and_every_server_gets_the_flag(tmp_path):
    shape = e2e.MODEL_SHAPES["8b"]
    whole = e2e.KVBudget.from_working_set(197584, 0.25, 16, shape)
    rank = e2e.KVBudget.from_working_set(197584, 0.25, 16, shape, tp=2)
    assert rank.bf16_tokens == whole.bf16_tokens and 2 * rank.budget_bytes == whole.budget_bytes
    with pytest.raises(ValueError, match="--tp 3"):
        e2e.KVBudget.from_working_set(197584, 0.25, 16, shape, tp=3)
    args = runner_args(tmp_path, "--tp", "2")
    for name in ("kvc=k8v8,k4v4,k2v2", "stock-fp8"):
        flags = e2e.server_flags(e2e.SystemSpec.parse(name), rank, args)
        assert flags[flags.index("--tp") + 1] == "2"
    assert "--tp" not in e2e.server_flags(e2e.SystemSpec.parse("stock-fp8"), whole, runner_args(tmp_path))
    # a JSON written before --tp existed resumes as a one-GPU run
    assert e2e.resume_mismatches({"settings": {}}, {"tp": 1}) == []
    assert e2e.resume_mismatches({"settings": {}}, {"tp": 2}) == ["tp: 1 -> 2"]
    assert runner_args(tmp_path).model == "/tmp/kvc-random-llama"
    assert runner_args(tmp_path, "--model-size", "8b").model == "/tmp/kvc-random-llama-8b"


def test_make_random_llama_refuses_another_shape(tmp_path):
    from benchmarks.serving import make_random_llama

    (tmp_path / "config.json").write_text(json.dumps(e2e.MODEL_SHAPES["1b"]))
    with pytest.raises(ValueError, match="another shape"):
        make_random_llama(str(tmp_path), "8b")


def test_server_flags_parse_with_sglangs_parser(tmp_path):
    """Every system's flags are accepted by SGLang 0.5.16's own launch_server parser (+ the plugin's
    flags, which its entry point adds in the launcher), and mean what the runner intends."""
    import argparse as argparse_

    from sglang.srt.server_args import ServerArgs
    from sglang_kvc.patches import flags as kvc_flags

    parser = argparse_.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    kvc_flags.add_cli_args(parser)
    args = runner_args(tmp_path)
    budget = e2e.KVBudget(49392, 16, 16, 8, 64)
    for name in e2e.DEFAULT_SYSTEMS:
        spec = e2e.SystemSpec.parse(name)
        parsed = parser.parse_args(e2e.server_flags(spec, budget, args))
        assert parsed.max_total_tokens == budget.max_total_tokens(spec) and parsed.page_size == 16
        assert not parsed.skip_tokenizer_init and parsed.enable_metrics
        assert parsed.kv_cache_dtype == ("fp8_e4m3" if spec.kv_dtype == "fp8" else "auto")
        assert parsed.enable_hierarchical_cache == (spec.kind == "hicache")
        assert parsed.kv_compression == spec.ladder
        assert parsed.cuda_graph_backend_prefill is None
        if spec.kind == "kvc":
            assert kvc_flags.config_from_args(parsed) is not None  # the plugin's own validation passes
    # kvc=<ladder>+<key>=<value>: the simulator's option keys, as server flags the plugin takes
    from benchmarks.cache_sim import KVC_OPTIONS

    assert {k: v[2] for k, v in KVC_OPTIONS.items()} == e2e.KVC_FLAGS
    spec = e2e.SystemSpec.parse("kvc=k8v8,k4v4-kc+frames=8+yield=0")
    assert spec.ladder == "k8v8,k4v4-kc" and spec.slug == "kvc-k8v8-k4v4-kc-frames-8-yield-0"
    config = kvc_flags.config_from_args(parser.parse_args(e2e.server_flags(spec, budget, args)))
    assert config.frame_pages == 8 and config.min_demotion_yield == 0
    with pytest.raises(ValueError, match="key one of yield, frames"):
        e2e.SystemSpec.parse("kvc=k8v8+pages=2")
    decode_only = runner_args(tmp_path, "--graphs", "decode-only")
    parsed = parser.parse_args(e2e.server_flags(e2e.SystemSpec.parse("stock-bf16"), budget, decode_only))
    assert parsed.cuda_graph_backend_prefill == "disabled" and parsed.cuda_graph_backend_decode is None


def test_budget_matches_what_the_plugin_sizes():
    """sglang-kvc gets --max-total-tokens B, as stock bf16 does, and sizes its arena from B x bf16
    bytes/token (patches/plugin.py): the same bytes as every stock system."""
    budget = e2e.KVBudget(49392, 16, 16, 8, 64)
    kvc, bf16 = e2e.SystemSpec.parse("kvc=bf16,k8v8,k4v2"), e2e.SystemSpec.parse("stock-bf16")
    assert budget.max_total_tokens(kvc) == budget.max_total_tokens(bf16) == 49392
    assert budget.max_total_tokens(kvc) * 2 * 16 * 8 * (64 + 64) == budget.budget_bytes


def test_system_names_parse():
    spec = e2e.SystemSpec.parse("kvc=k4v4-g32-kc,k2v2")
    assert spec.kind == "kvc" and spec.ladder == "k4v4-g32-kc,k2v2" and spec.slug == "kvc-k4v4-g32-kc-k2v2"
    with pytest.raises(ValueError, match="unknown system"):
        e2e.SystemSpec.parse("stock-int4")
    nopressure = e2e.SystemSpec.parse("nopressure:kvc=bf16,k8v8,k4v2")
    assert nopressure.nopressure and nopressure.kind == "kvc" and nopressure.ladder == "bf16,k8v8,k4v2"
    assert nopressure.slug == "nopressure-kvc-bf16-k8v8-k4v2"
    stock = e2e.SystemSpec.parse("nopressure:stock-bf16")
    assert stock.nopressure and stock.kind == "stock" and stock.name == "nopressure:stock-bf16"
    assert not e2e.SystemSpec.parse("stock-bf16").nopressure
    for bad in ("nopressure:", "nopressure:nopressure:stock-bf16"):
        with pytest.raises(ValueError, match="unknown system"):
            e2e.SystemSpec.parse(bad)


def test_default_order_runs_the_headline_pair_first():
    from sglang_kvc.tiers import LADDER_PRESETS

    assert e2e.DEFAULT_SYSTEMS[:2] == e2e.HEADLINE_SYSTEMS == ["kvc=" + LADDER_PRESETS["fp8-quality"], "stock-fp8"]
    assert e2e.DEFAULT_SYSTEMS[2:5] == ["stock-bf16", "nopressure:kvc=" + LADDER_PRESETS["fp8-quality"],
                                        "nopressure:stock-bf16"]
    assert set(e2e.DEFAULT_SYSTEMS[5:]) == {"kvc=" + LADDER_PRESETS["aggressive"], "stock-hicache"}


def test_time_planner_leaves_what_does_not_fit():
    now = [0.0]
    planner = e2e.TimePlanner(535, clock=lambda: now[0])
    kvc, fp8, bf16 = (e2e.SystemSpec.parse(n) for n in ("kvc=bf16", "stock-fp8", "stock-bf16"))
    now[0] = 30.0  # model build
    assert planner.fits(kvc)
    now[0] += planner.estimate(kvc) - e2e.STOP_MARGIN_S  # kvc ran as estimated
    assert planner.fits(fp8)  # the default plan: one kvc ladder and one stock system per call
    now[0] += planner.estimate(fp8) - e2e.STOP_MARGIN_S
    assert not planner.fits(bf16) and not planner.fits(kvc)
    planner.observe(kvc, 60.0, 200.0)  # measured: kvc benchmarks slower than estimated
    assert planner.bench_s["kvc"] == 200.0 and planner.startup_s["kvc"] == 60.0
    assert planner.bench_s["stock"] == e2e.BENCH_ESTIMATE_S["1b"]["stock"]  # other kinds keep their estimates
    planner.observe(kvc, None, 150.0)
    assert planner.bench_s["kvc"] == 200.0  # the largest measurement stands
    assert e2e.TimePlanner(535, "decode-only").startup_s["stock"] == \
        e2e.STARTUP_ESTIMATE_S["1b"]["stock"] - e2e.PREFILL_GRAPH_CAPTURE_S["1b"]


def test_time_planner_plans_the_three_calls():
    """With the H200 estimates, call 1 runs the headline pair, a --resume call 2 runs stock-bf16 and
    the no-pressure pair, and call 3 runs the 8b headline pair (agentic only): the module docstring's plan."""
    def planned(make_planner, names, now, build_s):
        now[0] = 0.0
        planner = make_planner()  # e2e.main starts the clock before it builds the model
        now[0] = build_s
        ran = []
        for spec in map(e2e.SystemSpec.parse, names):
            if planner.fits(spec):
                ran.append(spec.name)
                now[0] += planner.estimate(spec) - e2e.STOP_MARGIN_S
        return ran

    now = [0.0]
    one_b = functools.partial(e2e.TimePlanner, 535, clock=lambda: now[0])
    assert planned(one_b, e2e.DEFAULT_SYSTEMS, now, e2e.MODEL_BUILD_S["1b"]) == e2e.HEADLINE_SYSTEMS
    assert planned(one_b, e2e.DEFAULT_SYSTEMS[2:], now, e2e.MODEL_BUILD_S["1b"]) == \
        ["stock-bf16", "nopressure:" + e2e.HEADLINE_SYSTEMS[0], "nopressure:stock-bf16"]
    args = e2e.parse_args(["--model-size", "8b", "--no-shared-prefix", "--graphs", "decode-only",
                           "--systems", *e2e.HEADLINE_SYSTEMS])
    eight_b = functools.partial(e2e.TimePlanner, 535, "decode-only", clock=lambda: now[0], model_size="8b",
                                shared_prefix=lambda spec: e2e.runs_shared_prefix(spec, args))
    assert planned(eight_b, e2e.DEFAULT_SYSTEMS, now, e2e.MODEL_BUILD_S["8b"]) == e2e.HEADLINE_SYSTEMS
    eight_b_both = functools.partial(e2e.TimePlanner, 535, clock=lambda: now[0], model_size="8b")
    assert planned(eight_b_both, e2e.HEADLINE_SYSTEMS, now, e2e.MODEL_BUILD_S["8b"]) == e2e.HEADLINE_SYSTEMS[:1]


def test_time_planner_keys_agentic_only_systems_apart():
    planner = e2e.TimePlanner(535)
    nopressure, kvc = e2e.SystemSpec.parse("nopressure:kvc=bf16"), e2e.SystemSpec.parse("kvc=bf16")
    assert planner.bench_key(nopressure) == "kvc/agentic" and planner.bench_key(kvc) == "kvc"
    assert planner.estimate(nopressure) < planner.estimate(kvc)  # agentic only
    planner.observe(nopressure, None, 500.0)
    assert planner.bench_s["kvc"] == e2e.BENCH_ESTIMATE_S["1b"]["kvc"]  # measured apart from both benchmarks
    args = e2e.parse_args(["--nopressure-shared-prefix"])
    both = e2e.TimePlanner(535, shared_prefix=lambda spec: e2e.runs_shared_prefix(spec, args))
    assert both.estimate(nopressure) == both.estimate(kvc)
    assert e2e.TimePlanner(535, model_size="tiny").estimate(kvc) == e2e.TimePlanner(535).estimate(kvc)
    assert e2e.TimePlanner(535, model_size="8b").estimate(kvc) > e2e.TimePlanner(535).estimate(kvc)


def synthetic_system(name, late_p50, agentic_tps, sp_tps, sp_ttft=100.0, status="done", admitted=1000):
    spec = e2e.SystemSpec.parse(name)
    return {"name": name, "kind": spec.kind, "status": status, "ladder": spec.ladder, "nopressure": spec.nopressure,
            "cuda_graphs": "default",
            "max_total_tokens": 1000, "kv_budget_bytes": 1 << 30, "startup_s": 100.0,
            "log_summary": {"kv_gb": 1.0, "budget_matches": True, "admitted_tokens": admitted,
                            "cuda_graph_batches": {"on": 5, "off": 1, "decode_on": 4}},
            "kvc_metrics_end": {'sglang:kvc_move_gpu_seconds_total{kind="requantize"}': 9.0,
                                "sglang:kvc_cache_host_seconds_total{}": 9.0,
                                "sglang:kvc_cache_host_syncs_total{}": 90.0,
                                "sglang:kvc_cache_host_sync_seconds_total{}": 2.0} if spec.kind == "kvc" else None,
            "agentic": {"wall_s": 100.0,
                        "metrics_delta": {'sglang:kvc_move_gpu_seconds_total{kind="requantize"}': 1.5,
                                          'sglang:kvc_move_gpu_seconds_total{kind="compaction"}': 0.5,
                                          "sglang:kvc_cache_host_seconds_total{}": 3.0,
                                          "sglang:kvc_cache_host_syncs_total{}": 50.0,
                                          "sglang:kvc_cache_host_sync_seconds_total{}": 1.0} if spec.kind == "kvc" else {},
                        "summary": {"late": {"ttft_p50_s": late_p50, "ttft_p90_s": late_p50 * 2},
                                    "overall": {"output_throughput_tok_s": agentic_tps, "hit_ratio": 0.5,
                                                "ttft_p50_s": late_p50, "tpot_p50_s": 0.01, "errors": 0},
                                    "per_round": [{"round": r, "ttft_p50_s": late_p50 * (r + 1) / 4,
                                                   "ttft_p90_s": late_p50 * (r + 1) / 2} for r in range(4)]}},
            "shared_prefix": {"engine": "bench_serving", "metrics": {"output_throughput": sp_tps,
                                                                     "median_ttft_ms": sp_ttft, "hit_ratio": 0.4}}}


def synthetic_result():
    systems = {"kvc=bf16,k8v8,k4v2": synthetic_system("kvc=bf16,k8v8,k4v2", 0.2, 1200.0, 3000.0, 50.0, admitted=1100),
               "kvc=k8v8,k4v4,k2v2": synthetic_system("kvc=k8v8,k4v4,k2v2", 0.25, 1300.0, 3300.0),
               "stock-fp8": synthetic_system("stock-fp8", 0.5, 1000.0, 2000.0, 150.0, admitted=2000),
               "stock-bf16": synthetic_system("stock-bf16", 0.8, 900.0, 1500.0),
               "nopressure:kvc=bf16,k8v8,k4v2": synthetic_system("nopressure:kvc=bf16,k8v8,k4v2", 0.05, 970.0, 1.0),
               "nopressure:stock-bf16": synthetic_system("nopressure:stock-bf16", 0.04, 1000.0, 1.0)}
    return {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-24", "versions": {"sglang_kvc_commit": "abc"},
            "command": "python benchmarks/e2e.py",
            "settings": {"model_size": "1b", "budget": {"budget_bytes": 1 << 30},
                         "nopressure": {"fraction": 1.25, "budget": {"budget_bytes": 5 << 30}}},
            "requested": list(systems), "systems": systems, "calls": [{"command": "x"}]}


def test_summary_ratios_pick_the_best_ladder():
    summary = results_table.compute_summary(synthetic_result()["systems"])
    assert summary["best_kvc_system"] == "kvc=bf16,k8v8,k4v2"  # lowest late TTFT p50 (no-pressure runs aside)
    assert summary["kvc_admitted_over_stock_bf16"] == pytest.approx(1.1) and summary["notes"] == []
    assert summary["refused_requests"] == 0
    assert summary["nopressure_kvc_system"] == "nopressure:kvc=bf16,k8v8,k4v2"
    assert summary["nopressure_throughput_kvc_over_bf16"] == pytest.approx(0.97)
    assert summary["nopressure_cuda_graphs"] == "default for both"
    assert summary["kvc_cuda_graphs"] is True and summary["demotion_gpu_share"] == pytest.approx(0.015)
    assert summary["compaction_gpu_share"] == pytest.approx(0.005) and summary["cache_host_share"] == pytest.approx(0.03)
    assert summary["cache_host_syncs_per_s"] == pytest.approx(0.5)
    assert summary["cache_host_sync_share"] == pytest.approx(0.01)
    assert summary["demotion_yield"] is None  # the synthetic records export no tier counters
    record = {"ladder": "k8v8,k4v4-kc", "agentic": {"metrics_delta": {
        'sglang:kvc_demoted_tokens_total{tier="k4v4-kc"}': 400.0, 'sglang:kvc_hit_tokens_total{tier="k8v8"}': 900.0,
        'sglang:kvc_hit_tokens_total{tier="k4v4-kc"}': 100.0}}}
    assert results_table.demotion_yield(record) == 0.25  # lower-tier hits only, per token demoted into tier 1
    assert summary["cache_host_phase_shares"] is None
    phases = {'sglang:kvc_cache_host_phase_seconds_total{phase="demote"}': 3.0,
              'sglang:kvc_cache_host_phase_seconds_total{phase="drop_write"}': 1.0, "sglang:other": 9.0}
    assert results_table.host_phase_shares(phases, 10.0) == {"demote": 0.3, "drop_write": 0.1}
    moved = {"sglang:kvc_cache_host_seconds_total": 0.5, 'sglang:kvc_demoted_tokens_total{tier="k4v4-kc"}': 3e5,
             'sglang:kvc_dropped_tokens_total{tier="k8v8"}': 1e5, 'sglang:kvc_compacted_tokens_total{tier="k8v8"}': 1e5,
             'sglang:kvc_hit_tokens_total{tier="k8v8"}': 9e9}  # hits are not moved tokens
    assert results_table.host_us_per_moved_token(moved, " ".join(moved)) == pytest.approx(1.0)
    assert results_table.host_us_per_moved_token(moved, "sglang:other") is None  # a server without the series
    assert set(summary["per_kvc_system"]) == {"kvc=bf16,k8v8,k4v2", "kvc=k8v8,k4v4,k2v2"}
    assert set(results_table.SUMMARY_KEYS) <= set(summary) and set(results_table.SUMMARY_KEYS) <= set(
        summary["definitions"])
    assert summary["ttft_late_p50_bf16_over_kvc"] == pytest.approx(4.0)
    assert summary["ttft_late_p50_fp8_over_kvc"] == pytest.approx(2.5)
    assert summary["throughput_kvc_over_fp8"] == pytest.approx(1.2)
    assert summary["shared_prefix_kvc_over_fp8"] == pytest.approx(1.5)
    assert summary["shared_prefix_ttft_p50_fp8_over_kvc"] == pytest.approx(3.0)
    assert summary["per_kvc_system"]["kvc=k8v8,k4v4,k2v2"]["throughput_kvc_over_fp8"] == pytest.approx(1.3)
    assert summary["missing"] == [] and summary["ttft_late_p50_hicache_over_kvc"] is None
    partial = results_table.compute_summary({"kvc=bf16": synthetic_system("kvc=bf16", 0.2, 1.0, 1.0)})
    assert partial["best_kvc_system"] == "kvc=bf16" and partial["throughput_kvc_over_fp8"] is None
    assert partial["missing"] == ["stock-bf16", "stock-fp8", "nopressure:stock-bf16", "nopressure:kvc=<any ladder>"]
    assert partial["kvc_admitted_over_stock_bf16"] is None and partial["nopressure_throughput_kvc_over_bf16"] is None
    failed = synthetic_system("kvc=k2v2", 0.01, 1.0, 1.0)
    failed["agentic"]["error"] = "3 of 256 requests failed"
    failed["agentic"]["requests"] = [{"error": "HTTP 400: too long"}] * 2 + [{"error": "skipped: benchmark timeout"},
                                                                            {"ttft_s": 0.1}]
    failed_summary = results_table.compute_summary({"kvc=k2v2": failed})
    assert failed_summary["best_kvc_system"] is None and failed_summary["refused_requests"] == 2


def test_admitted_ratio_falls_back_on_the_budget_the_kvc_log_states():
    kvc = synthetic_system("kvc=bf16,k8v8,k4v2", 0.2, 1.0, 1.0, admitted=49344)
    kvc["log_summary"].update(kvc_stock_dtype="bf16", kvc_stock_tokens=49392)
    summary = results_table.compute_summary({"kvc=bf16,k8v8,k4v2": kvc})
    assert summary["kvc_admitted_over_stock_bf16"] == pytest.approx(49344 / 49392, abs=1e-4)
    assert len(summary["notes"]) == 1 and "stock-bf16 did not run" in summary["notes"][0]
    bf16 = synthetic_system("stock-bf16", 0.8, 1.0, 1.0, admitted=49392)
    with_bf16 = results_table.compute_summary({"kvc=bf16,k8v8,k4v2": kvc, "stock-bf16": bf16})
    assert with_bf16["kvc_admitted_over_stock_bf16"] == pytest.approx(0.999, abs=1e-3) and with_bf16["notes"] == []


def test_ratios_against_a_stock_run_cut_short_carry_a_note():
    kvc = synthetic_system("kvc=k8v8", 0.2, 1.0, 1.0)
    bf16 = synthetic_system("stock-bf16", 0.8, 1.0, 1.0, status="partial")
    bf16["agentic"]["error"] = "30 of 256 requests failed"
    summary = results_table.compute_summary({"kvc=k8v8": kvc, "stock-bf16": bf16})
    assert summary["ttft_late_p50_bf16_over_kvc"] == pytest.approx(4.0)
    assert any("stock-bf16 was cut short" in n and "30 of 256" in n for n in summary["notes"])
    assert "stock-bf16" in summary["missing"]
    bf16["status"] = "done"
    assert not any("cut short" in n for n in results_table.compute_summary({"kvc=k8v8": kvc, "stock-bf16": bf16})["notes"])


def test_nopressure_graph_settings_are_compared():
    systems = synthetic_result()["systems"]
    systems["nopressure:stock-bf16"]["cuda_graphs"] = "decode-only"
    assert results_table.compute_summary(systems)["nopressure_cuda_graphs"].startswith("differ:")
    systems["nopressure:stock-bf16"]["cuda_graphs"] = "off"
    systems["nopressure:stock-bf16"]["log_summary"]["cuda_graph_batches"]["on"] = 3
    assert "3 batches ran on a CUDA graph" in results_table.compute_summary(systems)["nopressure_cuda_graphs"]
    systems["nopressure:stock-bf16"]["cuda_graphs"] = "default"
    systems["nopressure:stock-bf16"]["log_summary"]["cuda_graph_batches"]["on"] = 0
    assert "no batch ran on a CUDA graph" in results_table.compute_summary(systems)["nopressure_cuda_graphs"]


def test_resume_checks_settings_and_skips_done_systems():
    previous = synthetic_result()
    previous["systems"]["stock-bf16"]["status"] = "failed"
    previous["settings"] = {"page_size": 16, "trace": {"sessions": 32}, "budget_fraction": 0.25}
    assert e2e.resume_mismatches(previous, {"page_size": 16, "trace": {"sessions": 32}, "budget_fraction": 0.25}) == []
    assert e2e.resume_mismatches(previous, {"page_size": 16, "trace": {"sessions": 8}, "budget_fraction": 0.25}) \
        == ["trace: {'sessions': 32} -> {'sessions': 8}"]
    requested = ["kvc=bf16,k8v8,k4v2", "stock-fp8", "stock-bf16", "nopressure:kvc=bf16,k8v8,k4v2",
                 "nopressure:stock-bf16", "kvc=k8v8,k4v4,k2v2", "stock-hicache"]
    todo = e2e.systems_to_run(requested, previous["systems"], rerun=["stock-fp8"])
    assert todo == ["stock-fp8", "stock-bf16", "stock-hicache"]  # the no-pressure pair is done too


def test_resume_merge_keeps_done_systems_and_appends_the_call(tmp_path, monkeypatch):
    """A --resume call whose systems are all done: nothing starts, the JSON gains the call and keeps
    every system, the summary is recomputed."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(e2e.MODEL_SHAPES["1b"]))
    (model / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    base = ["--out", str(out), "--model", str(model), "--shared-prefix-engine", "builtin", "--no-progress",
            "--systems", "kvc=bf16,k8v8,k4v2", "stock-fp8"]
    monkeypatch.setattr(e2e, "device_name", lambda: "NVIDIA H100 80GB HBM3")
    args = e2e.parse_args(base)
    traces = e2e.run_traces(args)
    budgets = e2e.run_budgets(args, traces)
    args.warmup_tokens = 2 * budgets[False].bf16_tokens
    previous = synthetic_result()
    previous["settings"] = e2e.run_settings(args, budgets, traces)
    resumed = tmp_path / "e2e-nvidia-h100-80gb-hbm3-2026-11-24.json"
    resumed.write_text(json.dumps(previous))
    monkeypatch.setattr(e2e.Run, "run_system", lambda *a: pytest.fail("no system should start"))
    assert e2e.main(base + ["--resume", str(resumed)]) == 0
    merged = json.loads((out / resumed.name).read_text())
    assert set(merged["systems"]) == set(previous["systems"]) and len(merged["calls"]) == 2
    assert merged["summary"]["best_kvc_system"] == "kvc=bf16,k8v8,k4v2" and merged["pending"] == []
    monkeypatch.setattr(e2e, "device_name", lambda: "NVIDIA H200")
    assert e2e.main(base + ["--resume", str(resumed)]) == 2  # another device: refused
    monkeypatch.setattr(e2e, "device_name", lambda: "NVIDIA H100 80GB HBM3")
    assert e2e.main(base + ["--resume", str(resumed), "--page-size", "1"]) == 2  # other settings: refused
    assert e2e.main(base + ["--resume", str(resumed), "--nopressure-fraction", "2"]) == 2


def test_summarize_log_checks_the_budget(tmp_path):
    budget = e2e.KVBudget(49392, 16, 16, 8, 64)
    gb = budget.budget_bytes / (1 << 30)
    log = tmp_path / "server.log"
    log.write_text(f"[x] KV Cache is allocated. dtype: torch.float8_e4m3fn, #tokens: 98784, K size: {gb / 2:.2f} GB, "
                   f"V size: {gb / 2:.2f} GB\n[x] Capture target decode CUDA graph end. elapsed=5.81 s, mem\n"
                   f"[x] max_total_num_tokens=98784, chunked_prefill_size=8192\n"
                   f"[x] Prefill batch, #new-seq: 1, #queue-req: 0, cuda graph: True, input\n"
                   f"[x] Decode batch, #running-req: 1, cuda graph: False, gen\n")
    summary = e2e.summarize_log(str(log), budget)
    assert summary["budget_matches"] and summary["kv_tokens"] == 98784 and summary["max_total_num_tokens"] == [98784]
    assert summary["admitted_tokens"] == 98784 and summary["cuda_graph_batches"] == {"on": 1, "off": 1, "decode_on": 0}
    assert summary["cuda_graph_capture_s"] == 5.8 and summary["errors"] == []
    assert summary["kvc_precompile_s"] is None
    assert summary["kvc_last_summary"] is None and "kvc_max_total_num_tokens" not in summary
    kvc_line = ("sglang-kvc: max_total_num_tokens=49344 (stock bf16 at this budget: 49392); arena: 771 frames of 4 "
                "bf16 pages; bf16 4 pages/frame (1.00x bf16/GiB), k8v8 7 pages/frame (1.75x bf16/GiB), "
                "k4v4-g32-kc 14 pages/frame (3.50x bf16/GiB); 1.51 GB")  # patches/build.py
    log.write_text(f"[x] {kvc_line}\n[x] max_total_num_tokens=49344, chunked_prefill_size=8192\n"
                   f"[x] sglang-kvc: compiled 4 kernels before serving (requantize bf16->k8v8, dequantize) in 12.5 s\n"
                   f"[x] Decode batch, kvc: bf16 1.2K/8.2K, demoted 3K, dropped 0, cuda graph: False\n"
                   f"Traceback (most recent call last):\n")
    summary = e2e.summarize_log(str(log), budget)
    assert summary["budget_matches"] and summary["kv_gb"] == round(771 * 4 * 16 * 32768 / (1 << 30), 3)
    assert summary["kvc_max_total_num_tokens"] == 49344 == summary["admitted_tokens"]
    assert summary["kvc_stock_dtype"] == "bf16" and summary["kvc_stock_tokens"] == 49392
    assert summary["arena_frames"] == 771 and summary["frame_bf16_pages"] == 4
    assert summary["tier_pages_per_frame"] == {"bf16": 4, "k8v8": 7, "k4v4-g32-kc": 14}
    assert summary["kvc_pool_gb"] == 1.51 and summary["kvc_precompile_s"] == 12.5
    assert summary["max_total_num_tokens"] == [49344] and summary["kvc_last_summary"].startswith("kvc: bf16")
    assert summary["errors"] == ["Traceback (most recent call last):"]
    log.write_text(f"[x] {kvc_line}\n")  # SGLang's own line missing: the plugin's stands in
    summary = e2e.summarize_log(str(log), budget)
    assert summary["admitted_tokens"] == 49344 and summary["kvc_last_summary"] is None


def test_plots_are_written(tmp_path):
    paths = results_table.plot_results(synthetic_result(), str(tmp_path / "e2e-x"))
    assert [os.path.basename(p) for p in paths] == ["e2e-x-ttft.png", "e2e-x-throughput.png"]
    assert all(os.path.getsize(p) > 1000 for p in paths)


# ---- tests: results table --------------------------------------------------------------------------
def test_results_table_renders_and_updates_the_readme(tmp_path):
    path = tmp_path / "e2e-nvidia-h100-2026-11-24.json"
    result = synthetic_result()
    result["summary"] = results_table.compute_summary(result["systems"])
    path.write_text(json.dumps(result))
    table = results_table.render_files([str(path)])
    assert "| kvc=bf16,k8v8,k4v2 |" in table and "| stock-fp8 |" in table
    assert "| nopressure:stock-bf16 | 1000 | default |" in table and "| stock-bf16 | 1000 | default |" in table
    assert "200" in table  # late TTFT p50 of the best ladder, in ms
    assert "4.00x" in table and "2.50x" in table and "1.20x" in table and "1.50x" in table
    assert "admits 1.10x" in table and "0.97x stock bf16's" in table and "CUDA graphs default for both" in table
    assert "demotion on the GPU 1.50%" in table
    assert "refused or failed over every kvc system: 0" in table and "`nopressure:` rows 5.00 GiB" in table
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nintro\n\n<!-- e2e-table -->\nold\n<!-- /e2e-table -->\n\nrest\n")
    assert results_table.main([str(path), "--update-readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "| stock-bf16 |" in text and text.endswith("rest\n")
    assert results_table.main([str(path), "--update-readme", str(readme)]) == 0
    assert readme.read_text() == text  # idempotent
    bare = tmp_path / "BARE.md"
    bare.write_text("# y\n")
    assert results_table.main([str(path), "--update-readme", str(bare)]) == 0
    assert "<!-- e2e-table -->" in bare.read_text()


def test_results_table_renders_the_cache_sim_summary():
    table = results_table.render_files([os.path.join(ROOT, "benchmarks/results/cache_sim-2026-11-23.json")])
    assert "stock-fp8" in table and "bf16,k8v8,k4v2@default" in table and "2.25x" in table


# ---- tests: command lines and imports -----------------------------------------------------------------
@pytest.mark.parametrize("script", ["agentic_multiturn.py", "shared_prefix.py", "e2e.py", "results_table.py"])
def test_help_works(script):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "usage:" in done.stdout


def test_scripts_import_nothing_gpu_only():
    code = ("import sys; import benchmarks.e2e, benchmarks.agentic_multiturn, benchmarks.shared_prefix, "
            "benchmarks.results_table; bad = [m for m in ('torch', 'triton', 'sglang', 'flashinfer', 'sgl_kernel', "
            "'transformers', 'sglang_kvc', 'matplotlib') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_gpu_wrapper_is_valid_bash():
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks/gpu_e2e.sh")]).returncode == 0


# ---- slow dry runs (KVC_SLOW_TESTS=1) ---------------------------------------------------------------------
@pytest.mark.skipif(not SLOW, reason="slow: set KVC_SLOW_TESTS=1 (real bench_serving, ~40 s)")
def test_real_bench_serving_against_fake_server(tmp_path):
    """SGLang's own bench_serving (its HF-datasets import stubbed) against the fake server, with the
    tokenizer serving.py saves: prompts arrive exactly as long as asked and the JSONL parses."""
    from transformers import AutoTokenizer

    model = make_tokenizer(str(tmp_path / "model"))
    state = FakeSGLang(capacity=100_000, tokenizer=AutoTokenizer.from_pretrained(model))
    httpd, url = start_fake(state, model)
    try:
        settings = dict(groups=4, prompts_per_group=3, system_len=256, question_len=32, output_len=8)
        record = shared_prefix.run_bench_serving(url, model, model, settings, str(tmp_path / "work"),
                                                 max_concurrency=4, timeout_s=240, env=None)
    finally:
        httpd.shutdown()
    log = open(record["log"]).read()
    assert record.get("error") is None, log[-3000:]
    metrics = record["metrics"]
    assert metrics["completed"] == 12 and metrics["total_output_tokens"] == 96
    assert metrics["total_input_tokens"] == 12 * (256 + 32)  # exact lengths through the tokenizer
    assert metrics["cached_tokens"] >= 4 * 256 and metrics["output_throughput"] > 0  # concurrent misses aside
    assert metrics["median_ttft_ms"] is not None


@pytest.mark.skipif(not SLOW, reason="slow: set KVC_SLOW_TESTS=1 (whole runner on fake servers, ~60 s)")
def test_runner_dry_run_with_resume(tmp_path, monkeypatch):
    """e2e.py end to end on the CPU: fake servers started and stopped by PID, warm-up, both
    benchmarks, JSON after each system, plots, then --resume adds a system to the same JSON."""
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    small = ["--out", str(out), "--model", str(tmp_path / "model"), "--model-size", "tiny", "--no-progress",
             "--server-module", "tests.test_e2e_scripts", "--shared-prefix-engine", "builtin",
             "--sessions", "4", "--rounds", "4", "--system-len", "256", "--tool-len", "128", "--output-len", "8",
             "--time-scale", "0", "--gsp-groups", "4", "--gsp-prompts-per-group", "2", "--gsp-system-len", "256",
             "--gsp-output-len", "4", "--warmup-tokens", "4096", "--port", "31700", "--nopressure-sessions", "2",
             "--nopressure-rounds", "3"]
    assert e2e.main(small + ["--systems", "kvc=bf16,k8v8,k4v2", "stock-fp8"]) == 0
    (path,) = list(out.glob("e2e-*.json"))
    first = json.loads(path.read_text())
    assert [s["status"] for s in first["systems"].values()] == ["done", "done"]
    for record in first["systems"].values():
        assert record["log_summary"]["budget_matches"], record["log_summary"]
        assert record["agentic"]["summary"]["overall"]["errors"] == 0
        assert record["shared_prefix"]["metrics"]["completed"] == 8
        assert os.path.exists(out / record["log"])
    assert first["summary"]["throughput_kvc_over_fp8"] is not None
    assert first["systems"]["kvc=bf16,k8v8,k4v2"]["kvc_metrics_end"]
    assert (out / path.name.replace(".json", "-ttft.png")).exists()
    assert first["summary"]["kvc_admitted_over_stock_bf16"] == 1.0  # from the budget the kvc line states
    assert "stock-bf16 did not run" in first["summary"]["notes"][0]
    later = ["stock-bf16", "nopressure:kvc=bf16,k8v8,k4v2", "nopressure:stock-bf16"]
    assert e2e.main(small + ["--systems", "kvc=bf16,k8v8,k4v2", "stock-fp8", *later, "--resume", str(path)]) == 0
    merged = json.loads(path.read_text())
    assert list(merged["systems"]) == ["kvc=bf16,k8v8,k4v2", "stock-fp8", *later]
    assert merged["systems"]["stock-fp8"]["call"] == 0 and merged["systems"]["stock-bf16"]["call"] == 1
    summary = merged["summary"]
    assert summary["ttft_late_p50_bf16_over_kvc"] is not None and merged["pending"] == []
    assert summary["kvc_admitted_over_stock_bf16"] == 1.0 and summary["notes"] == []
    assert summary["refused_requests"] == 0 and summary["nopressure_throughput_kvc_over_bf16"] is not None
    assert summary["nopressure_cuda_graphs"] == "default for both" and summary["missing"] == []
    assert summary["kvc_cuda_graphs"] is True
    nopressure = {name: merged["systems"][name] for name in later[1:]}
    budget = merged["settings"]["nopressure"]["budget"]
    assert budget["bf16_tokens"] >= budget["agentic_working_set_tokens"]
    for record in nopressure.values():
        assert record["status"] == "done" and record["nopressure"] and record["cuda_graphs"] == "default"
        assert record["max_total_tokens"] == budget["bf16_tokens"] and record["log_summary"]["budget_matches"]
        assert record["agentic"]["summary"]["overall"]["requests"] == 2 * 3 and "skipped" in record["shared_prefix"]
    assert merged["systems"]["stock-bf16"]["log_summary"]["cuda_graph_batches"]["on"] == 1
    assert len(merged["calls"]) == 2
    table = results_table.render_files([str(path)])
    assert "| stock-bf16 |" in table and "| nopressure:stock-bf16 |" in table


if __name__ == "__main__":
    fake_server_main()


def test_warm_up_fills_kvc_down_to_its_last_tier_and_rereads_cached_prefixes(fake):
    """Stock servers get one wave; a kvc server gets waves until its last tier was demoted into
    (here: the fake's only series, once its cache overflows); the re-reads pick prompts the cache
    still holds, so they hit."""
    state, url = fake(capacity=6 * 256, kvc=True)
    out = e2e.warm_up(url, 32000, total_tokens=4 * 256, prompt_len=256, concurrency=2, reread=3)
    assert out["waves"] == 2 and out["last_tier_demoted_tokens"] > 0 and out["errors"] == 0
    assert all(cached and cached >= 128 - 16 for cached in out["reread_cached_tokens"])
    state, url = fake(capacity=6 * 256)
    out = e2e.warm_up(url, 32000, total_tokens=4 * 256, prompt_len=256, concurrency=2, reread=3)
    assert out["waves"] == 1 and out["last_tier_demoted_tokens"] is None


def test_profiled_systems_budget_the_profile_and_report_gpu_time_by_group():
    kvc = e2e.SystemSpec.parse("kvc=bf16")
    assert e2e.TimePlanner(535, profile=True).estimate(kvc) == \
        e2e.TimePlanner(535).estimate(kvc) + e2e.PROFILE_ESTIMATE_S
    assert e2e.parse_args([]).profile_steps == 0 and e2e.parse_args(["--profile-steps", "40"]).profile_steps == 40
    result = synthetic_result()
    result["systems"]["stock-fp8"]["profile"] = {"groups_share": {"attention": 0.25, "gemm": 0.7, "other": 0.05}}
    result["systems"]["kvc=bf16,k8v8,k4v2"]["profile"] = {"error": "no trace"}
    summary = results_table.compute_summary(result["systems"])
    assert summary["gpu_time_by_group"] == {"stock-fp8": {"attention": 0.25, "gemm": 0.7, "other": 0.05}}
    result["summary"] = summary
    text = results_table.render_e2e(result)
    assert "GPU kernel time of `stock-fp8` over its profiled steps" in text and "gemm 70.0%, attention 25.0%" in text


def test_host_probe_names_the_host_and_times_a_fixed_loop():
    from benchmarks.serving import host_probe

    probe = host_probe(loop_n=1000, repeat=2)
    assert probe["cpus"] >= 1 and probe["python_loop_n"] == 1000
    assert probe["python_loop_ms"] > 0 and probe["load_1min"] >= 0
    assert isinstance(probe["cpu_model"], str)


def test_the_trace_bounds_any_systems_agentic_throughput():
    """The trace's waiting floor is its longest chain of delays (session start + tool delays); the
    README sentence puts stock fp8's agentic duration over it."""
    from benchmarks.traces import agentic_trace

    trace = agentic_trace(sessions=3, rounds=2, system_len=8, tool_len=8, user_len=2, output_len=4,
                          stagger_s=1.0, tool_delay_s=(2.0, 2.0))
    assert trace.waiting_floor_s == pytest.approx(2 * 1.0 + 2.0)  # the last session: starts at 2 s, waits 2 s
    result = synthetic_result()
    params = dict(trace.params)
    result["settings"].update(trace=params, time_scale=0.5)
    result["systems"]["stock-fp8"]["agentic"]["summary"]["overall"]["duration_s"] = 6.0
    assert results_table.throughput_ceiling(result) == pytest.approx((2.0, 6.0, 3.0))
    assert "at most 3.00x fp8's agentic output throughput" in results_table.render_e2e(result)
    del result["settings"]["trace"]
    assert results_table.throughput_ceiling(result) is None


def test_a_back_to_back_trace_sets_no_throughput_bound():
    from benchmarks.traces import agentic_trace

    result = synthetic_result()
    result["settings"].update(trace=dict(agentic_trace(sessions=2, rounds=2, system_len=8, tool_len=8, user_len=2,
                                                       output_len=4).params), time_scale=0.0)
    result["systems"]["stock-fp8"]["agentic"]["summary"]["overall"]["duration_s"] = 6.0
    assert results_table.throughput_ceiling(result) is None


def test_triton_cache_entries_count_the_compiles_already_on_disk(tmp_path):
    assert e2e.triton_cache_entries({"TRITON_CACHE_DIR": str(tmp_path / "missing")}) == 0
    for name in ("a1b2", "c3d4"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "kernel.json").write_text("{}")
    (tmp_path / "stray.lock").write_text("")
    assert e2e.triton_cache_entries({"TRITON_CACHE_DIR": str(tmp_path)}) == 2


def test_fresh_triton_cache_gives_each_system_its_own_empty_cache(tmp_path):
    spec = e2e.SystemSpec.parse("kvc=k8v8,k4v4-kc")
    shared = e2e.parse_args(["--systems", spec.name])
    assert e2e.server_env(spec, shared) == {"PYTHONUNBUFFERED": "1"}
    fresh = e2e.parse_args(["--systems", spec.name, "--fresh-triton-cache", str(tmp_path)])
    env = e2e.server_env(spec, fresh)
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / spec.slug)
    assert e2e.server_env(e2e.SystemSpec.parse("stock-fp8"), fresh)["TRITON_CACHE_DIR"] != env["TRITON_CACHE_DIR"]
    assert e2e.triton_cache_entries(env) == 0


def test_agentic_timeout_reserves_time_only_for_a_shared_prefix_run_that_follows():
    spec = e2e.SystemSpec.parse("stock-bf16")
    with_sp = e2e.parse_args([])
    without_sp = e2e.parse_args(["--no-shared-prefix"])
    remaining = 200.0
    assert e2e.agentic_timeout_s(without_sp, spec, remaining) == pytest.approx(
        min(without_sp.agentic_timeout_s, remaining - e2e.STOP_MARGIN_S))
    assert e2e.agentic_timeout_s(with_sp, spec, remaining) == pytest.approx(
        min(with_sp.agentic_timeout_s, remaining - e2e.SHARED_PREFIX_RESERVE_S - e2e.STOP_MARGIN_S))
    nopressure = e2e.SystemSpec.parse("nopressure:stock-bf16")  # agentic only unless --nopressure-shared-prefix
    assert e2e.agentic_timeout_s(with_sp, nopressure, remaining) > e2e.agentic_timeout_s(with_sp, spec, remaining)
    assert e2e.agentic_timeout_s(with_sp, spec, 10.0) == 30.0
