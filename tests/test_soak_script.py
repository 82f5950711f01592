"""CPU checks of the soak benchmark (benchmarks/soak.py): its classification of replies and streams,
the leak arithmetic, and two short soaks against a fake SGLang server (serving on the CPU needs
SGLang's CPU engine, which CI does not have), one healthy and one with every fault the soak must
catch.

The fake (``FakeSoakServer``, aiohttp) answers as SGLang 0.5.16 does for what the soak sends:
``/generate`` with ``input_ids`` (a 400 for broken JSON and wrong types before anything else, as
FastAPI's validation does; then the tokenizer manager's ValueErrors, which a streamed request gets
as a 200 with an error event of code 400; prompts over ``max_total_num_tokens`` finish with
``abort``, status_code 400); streams (``data: {json}`` events with the whole output so far, then
``data: [DONE]``); ``/flush_cache`` refused while requests run; ``/metrics`` with the plugin's kvc
series (per-tier tokens, capacity, frames; free frames) and SGLang's queue and retraction series;
a start-up log with the plugin's arena line. A client that drops a stream aborts the request.

Faults (``--fake-faults a,b``): ``leak`` (a lower tier keeps a frame and 3 pages after a flush),
``drift`` (greedy outputs change after the first 50 requests), ``type500`` (max_new_tokens given as
a string gets a 500 and a traceback in the log: stock SGLang 0.5.16 raises TypeError there),
``hang`` (SIGTERM is ignored).

Run as a server: ``python -m tests.test_soak_script --port 31500 --model-path M --kv-compression k8v8,k4v4``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PAGES_PER_FRAME = {"bf16": 4, "k8v8": 7, "k4v4": 14, "k4v2": 18, "k2v2": 25}
RESERVE_FRAMES = 2


class FakeSoakServer:
    """One fake server's state. Invariant: per tier, ``tokens <= capacity``; the write tier owns
    the padding page's frame plus the frames its tokens need, a lower tier the frames its tokens
    need; free frames = regular frames - owned frames (``leak`` keeps a lower-tier frame owned
    after a flush)."""

    def __init__(self, ladder, max_total_tokens, page_size, vocab_size, context_len, faults, max_running=8):
        self.tiers = ladder.split(",")
        self.page_size, self.vocab_size, self.context_len = page_size, vocab_size, context_len
        self.frames_total = max_total_tokens // (4 * page_size) + RESERVE_FRAMES
        self.regular_frames = self.frames_total - RESERVE_FRAMES
        self.max_total_num_tokens = int(max_total_tokens * PAGES_PER_FRAME[self.tiers[0]] / 4)
        self.capacity = max_total_tokens // 2  # per tier: demotion and drops come early
        self.faults = set(faults)
        self.tokens = [0] * len(self.tiers)
        self.demoted = [0] * len(self.tiers)
        self.dropped = [0] * len(self.tiers)
        self.running, self.waiting, self.served, self.retracted = 0, 0, 0, 0
        self.slots = asyncio.Semaphore(max_running)

    def frames(self):
        owned = [math.ceil(t / (PAGES_PER_FRAME[name] * self.page_size)) for t, name in zip(self.tokens, self.tiers)]
        owned[0] += 1  # the padding page's frame
        return owned

    def insert(self, count):
        self.tokens[0] += count
        for t in range(len(self.tiers)):
            over = self.tokens[t] - self.capacity
            if over > 0:
                self.tokens[t] -= over
                if t + 1 < len(self.tiers):
                    self.tokens[t + 1] += over
                    self.demoted[t + 1] += over
                else:
                    self.dropped[t] += over

    def flush(self):
        self.tokens = [0] * len(self.tiers)
        if "leak" in self.faults and len(self.tiers) > 1:
            self.tokens[1] = 3 * self.page_size

    def flush_line(self):
        frames = self.frames()
        tiers = ", ".join(f"{n} {t} tok/{f} fr" for n, t, f in zip(self.tiers, self.tokens, frames))
        return f"sglang-kvc: flushed; tiers {tiers}; free {self.regular_frames - sum(frames)}/{self.frames_total} fr"

    def metrics(self):
        labels = 'model_name="fake"'
        lines = []
        for name, tokens, frames, demoted, dropped in zip(self.tiers, self.tokens, self.frames(), self.demoted,
                                                          self.dropped):
            tier = f'{{{labels},tier="{name}"}}'
            capacity = self.max_total_num_tokens if name == self.tiers[0] else \
                frames * PAGES_PER_FRAME[name] * self.page_size
            lines += [f"sglang:kvc_tier_tokens{tier} {float(tokens)}",
                      f"sglang:kvc_tier_capacity_tokens{tier} {float(capacity)}",
                      f"sglang:kvc_tier_frames{tier} {float(frames)}",
                      f"sglang:kvc_demoted_tokens_total{tier} {float(demoted)}",
                      f"sglang:kvc_dropped_tokens_total{tier} {float(dropped)}"]
        lines += [f"sglang:kvc_free_frames{{{labels}}} {float(self.regular_frames - sum(self.frames()))}",
                  f"sglang:num_running_reqs{{{labels}}} {float(self.running)}",
                  f"sglang:num_queue_reqs{{{labels}}} {float(self.waiting)}",
                  f"sglang:num_retracted_requests_total{{{labels}}} {float(self.retracted)}"]
        return "\n".join(["# TYPE sglang:kvc_tier_tokens gauge"] + lines) + "\n"

    def reply_ids(self, prompt, count):
        seed = sum(prompt[-8:]) + len(prompt) + (self.served // 50 if "drift" in self.faults else 0)
        return [10 + (seed + 7919 * i) % (self.vocab_size - 10) for i in range(count)]


def bad_request(message):
    from aiohttp import web

    return web.json_response({"object": "error", "message": message, "type": "Bad Request", "code": 400}, status=400)


def make_app(state: FakeSoakServer):
    from aiohttp import web

    async def generate(request):
        try:
            obj = json.loads(await request.read())
        except ValueError as err:
            return bad_request(f"JSON decode error: {err}")
        ids, params = obj.get("input_ids"), obj.get("sampling_params") or {}
        if isinstance(ids, list) and any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
            return bad_request("input_ids: Input should be a valid integer")
        count = params.get("max_new_tokens", 16)
        if isinstance(count, str):
            if "type500" in state.faults:
                print("Traceback (most recent call last):\n  File \"tokenizer_manager.py\", line 1169, in "
                      "_create_tokenized_object\nTypeError: '<' not supported between instances of 'str' and 'int'",
                      flush=True)
                return web.Response(status=500, text="Internal Server Error")
            return bad_request("sampling_params.max_new_tokens: Input should be a valid integer")
        stream = bool(obj.get("stream"))
        problem = None  # the tokenizer manager's ValueErrors
        if not isinstance(ids, list):
            problem = "input_ids should be a list of lists for batch processing."
        elif not ids:
            problem = "input_ids cannot be empty."
        elif any(not 0 <= t < state.vocab_size for t in ids):
            pos = next(i for i, t in enumerate(ids) if not 0 <= t < state.vocab_size)
            problem = f"input_ids[{pos}] = {ids[pos]} is outside the model's vocabulary [0, {state.vocab_size})"
        elif len(ids) >= state.context_len:
            problem = (f"The input ({len(ids)} tokens) is longer than the model's context length "
                       f"({state.context_len} tokens).")
        elif count < 0:
            problem = f"max_new_tokens must be at least 0, got {count}."
        if problem is not None:
            print(f"[http_server] Error: {problem}", flush=True)
            if not stream:
                return web.json_response({"error": {"message": problem}}, status=400)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            error = {"error": {"message": problem, "type": "invalid_request_error", "code": 400}}
            await response.write(b"data: " + json.dumps(error).encode() + b"\n\n" + b"data: [DONE]\n\n")
            return response
        state.waiting += 1
        async with state.slots:
            state.waiting -= 1
            state.running += 1
            state.served += 1
            try:
                return await answer(request, ids, count, stream)
            finally:
                state.running -= 1

    async def answer(request, ids, count, stream):
        meta = {"id": f"fake-{state.served}", "prompt_tokens": len(ids), "cached_tokens": 0, "num_retractions": 0,
                "completion_tokens": 0, "finish_reason": None}
        if len(ids) >= state.max_total_num_tokens:  # the scheduler's max_req_input_len check
            meta["finish_reason"] = {"type": "abort", "status_code": 400,
                                     "message": f"Input length ({len(ids)}) exceeds the maximum allowed length"}
            if not stream:
                return bad_request(meta["finish_reason"]["message"])
            count = 0
        output = state.reply_ids(ids, count)
        await asyncio.sleep(0.0005 + len(ids) * 2e-6)
        if not stream:
            await asyncio.sleep(0.001 * count)
            state.insert(len(ids) + count)
            meta.update(completion_tokens=count, finish_reason={"type": "length", "length": count})
            return web.json_response({"output_ids": output, "meta_info": meta})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for done in range(1, count + 1):
                await asyncio.sleep(0.001)
                meta.update(completion_tokens=done,
                            finish_reason={"type": "length", "length": count} if done == count else None)
                await response.write(b"data: " + json.dumps({"output_ids": output[:done], "meta_info": meta}).encode()
                                     + b"\n\n")
            if count == 0:
                await response.write(b"data: " + json.dumps({"output_ids": [], "meta_info": meta}).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            return response  # the client dropped it: aborted, as SGLang does
        state.insert(len(ids) + count)
        return response

    async def flush_cache(request):
        if state.running or state.waiting:
            return web.Response(status=400, text="Cache not flushed because there are pending requests.")
        state.flush()
        print(state.flush_line(), flush=True)
        return web.Response(text="Cache flushed.\n")

    async def health(request):
        return web.Response(text="")

    async def metrics(request):
        return web.Response(text=state.metrics(), content_type="text/plain")

    async def server_info(request):
        return web.json_response({"internal_states": [{"max_total_num_tokens": state.max_total_num_tokens}]})

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/generate", generate)
    app.router.add_post("/flush_cache", flush_cache)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/server_info", server_info)
    return app


def fake_server_main(argv=None) -> None:
    """``sglang.launch_server`` stand-in for the soak (unknown flags ignored)."""
    from aiohttp import web

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=31500)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--max-total-tokens", type=int, default=4096)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--kv-compression", default="k8v8,k4v4")
    parser.add_argument("--fake-faults", default="")
    args, _ = parser.parse_known_args(argv)
    with open(os.path.join(args.model_path, "config.json")) as handle:
        config = json.load(handle)
    state = FakeSoakServer(args.kv_compression, args.max_total_tokens, args.page_size, config["vocab_size"],
                           config["max_position_embeddings"], [f for f in args.fake_faults.split(",") if f])
    arena = ", ".join(f"{name} {PAGES_PER_FRAME[name]} pages/frame ({PAGES_PER_FRAME[name] / 4:.2f}x bf16/GiB)"
                      for name in state.tiers)
    print(f"[fake] sglang-kvc: max_total_num_tokens={state.max_total_num_tokens} (stock bf16 at this budget: "
          f"{args.max_total_tokens}); arena: {state.frames_total} frames of 4 bf16 pages; {arena}; 0.01 GB")
    print("[fake] The server is fired up and ready to roll!", flush=True)
    hang = "hang" in state.faults
    if hang:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    web.run_app(make_app(state), host=args.host, port=args.port, print=None, handle_signals=not hang,
                access_log=None)


if __name__ == "__main__":
    fake_server_main()
    sys.exit(0)

# ---- tests --------------------------------------------------------------------------------------------
import pytest  # noqa: E402

from benchmarks import soak  # noqa: E402

SUMMARY_KEYS = {"alive", "tracebacks", "unanswered", "leaked_pages_after_flush", "probe_outputs_equal",
                "bad_token_id_requests_sent", "bad_token_id_requests_refused", "clean_shutdown_s", "requests_total",
                "abort_share", "minutes"}


def test_classify_reply():
    ok = json.dumps({"output_ids": [5, 6], "meta_info": {"finish_reason": {"type": "length"}, "num_retractions": 1}})
    assert soak.classify_reply(200, ok.encode())[:3] == ("ok", "", [5, 6])
    assert soak.classify_reply(400, b'{"error": {"message": "input_ids cannot be empty."}}')[:2] == \
        ("refused", "HTTP 400: input_ids cannot be empty.")
    assert soak.classify_reply(400, b"not json")[0] == "refused"
    assert soak.classify_reply(500, b"Internal Server Error")[0] == "unanswered"
    assert soak.classify_reply(503, b"")[0] == "unanswered"
    assert soak.classify_reply(200, b"<html>")[0] == "unanswered"
    refused_abort = {"output_ids": [], "meta_info": {"finish_reason": {"type": "abort", "status_code": 400,
                                                                       "message": "too long"}}}
    assert soak.classify_reply(200, json.dumps(refused_abort).encode())[0] == "refused"
    server_abort = {"output_ids": [], "meta_info": {"finish_reason": {"type": "abort", "status_code": 503}}}
    assert soak.classify_reply(200, json.dumps(server_abort).encode())[0] == "unanswered"


def events(*objects):
    return [b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n" for o in objects]


def test_stream_reader():
    reader = soak.StreamReader()
    for line in events({"output_ids": [7], "meta_info": {"completion_tokens": 1, "finish_reason": None}},
                       {"output_ids": [7, 8], "meta_info": {"completion_tokens": 2,
                                                             "finish_reason": {"type": "length"}}}, b"[DONE]"):
        reader.feed(line)
    assert reader.done and reader.end() == ("ok", "") and reader.output_ids == [7, 8]
    refused = soak.StreamReader()
    for line in events({"error": {"message": "max_new_tokens must be at least 0", "code": 400}}, b"[DONE]"):
        refused.feed(line)
    assert refused.end()[0] == "refused"
    cut = soak.StreamReader()
    cut.feed(events({"output_ids": [7], "meta_info": {"completion_tokens": 1, "finish_reason": None}})[0])
    assert cut.result is None and cut.end()[0] == "unanswered"  # the connection ended mid-stream
    early_done = soak.StreamReader()
    early_done.feed(b"data: [DONE]\n")
    assert early_done.end()[0] == "unanswered"


def test_leaked_pages_against_the_flushed_baseline():
    baseline = {"tiers": {"k8v8": {"tokens": 0, "capacity_tokens": 900, "frames": 1},
                          "k4v4": {"tokens": 0, "capacity_tokens": 0, "frames": 0}}, "free_frames": 50}
    assert soak.leaked_pages(baseline, baseline, 16, "k8v8", 7)[0] == 0
    lower = {"tiers": {"k8v8": {"tokens": 0, "capacity_tokens": 900, "frames": 1},
                       "k4v4": {"tokens": 20, "capacity_tokens": 224, "frames": 1}}, "free_frames": 49}
    leaked, detail = soak.leaked_pages(lower, baseline, 16, "k8v8", 7)
    assert leaked == 2 + 12 and detail["missing_free_frames"] == 0  # the frame's 14 pages: 2 cached, 12 free
    assert soak.leaked_pages(lower, lower, 16, None, 7)[0] == 14  # a leak the fresh server had already
    write = {"tiers": {"k8v8": {"tokens": 40, "capacity_tokens": 900, "frames": 3},
                       "k4v4": {"tokens": 0, "capacity_tokens": 0, "frames": 0}}, "free_frames": 48}
    leaked, detail = soak.leaked_pages(write, baseline, 16, "k8v8", 7)
    assert leaked == 3 + 2 * 7 and detail["missing_free_frames"] == 2
    assert soak.leaked_pages(None, baseline, 16, "k8v8", 7)[0] is None
    series = soak.kvc_series(soak.parse_metrics(
        'sglang:kvc_tier_tokens{model_name="m",tier="k8v8"} 5.0\nsglang:kvc_tier_frames{model_name="m",tier="k8v8"} 2\n'
        'sglang:kvc_free_frames{model_name="m"} 7\n'))
    assert series == {"tiers": {"k8v8": {"tokens": 5.0, "capacity_tokens": 0.0, "frames": 2.0}}, "free_frames": 7.0}


def test_log_scan_and_arena_line():
    log = ("sglang-kvc: max_total_num_tokens=1792 (stock bf16 at this budget: 1024); arena: 18 frames of 4 bf16 "
           "pages; k8v8 7 pages/frame (1.75x bf16/GiB), k4v4 14 pages/frame (3.50x bf16/GiB); 0.01 GB\n"
           "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\nTypeError: bad\nnext line\n")
    assert soak.write_pages_per_frame(log, "k8v8,k4v4") == 7 and soak.write_pages_per_frame(log, "k4v4") == 14
    scan = soak.scan_log(log + "Traceback (most recent call last):\nKeyboardInterrupt\n", shutdown_offset=len(log))
    assert scan["tracebacks"] == 2 and scan["tracebacks_before_sigterm"] == 1 and scan["tracebacks_after_sigterm"] == 1
    assert scan["traceback_excerpts"][0].endswith("TypeError: bad")


def test_mix_parsing():
    assert soak.parse_mix("session=1,stream_abort=0.5") == {"session": 1.0, "stream_abort": 0.5}
    with pytest.raises(ValueError, match="unknown kind"):
        soak.parse_mix("sessions=1")
    assert soak.parse_args(["--malformed", "empty_ids,broken_json"]).malformed == "empty_ids,broken_json"
    with pytest.raises(SystemExit):
        soak.parse_args(["--malformed", "empty_ids,nope"])


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_soak(tmp_path, monkeypatch, *extra):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 512, "max_position_embeddings": 2048}))
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setattr(soak, "versions", lambda: {"python": sys.version.split()[0]})  # no torch import
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--server-module", "tests.test_soak_script", "--model", str(model),
            "--port", str(free_port()), "--kv-compression", "k8v8,k4v4", "--max-total-tokens", "1024",
            "--minutes", "0.07", "--requests-min", "100", "--concurrency", "8", "--sessions", "6",
            "--system-tokens", "32", "--turn-tokens", "32", "--max-history", "256", "--prefixes", "4",
            "--prefix-tokens", "64", "--burst-every-s", "1.5", "--burst-size", "6", "--burst-prompt-tokens", "128",
            "--burst-output-tokens", "16", "--probes", "2", "--probe-prompt-tokens", "96", "--probe-tokens", "8",
            "--progress-interval-s", "1", "--startup-timeout-s", "60", "--drain-timeout-s", "10",
            "--flush-settle-s", "1", *extra]
    code = soak.main(argv)
    [json_path] = out.glob("soak-*.json")
    result = json.loads(json_path.read_text())
    return code, result, out / (json_path.stem + ".log")


def test_soak_against_a_healthy_fake_server(tmp_path, monkeypatch):
    code, result, log = run_soak(tmp_path, monkeypatch)
    summary = result["summary"]
    assert set(summary) == SUMMARY_KEYS
    assert code == 0 and result["passed"], (result["checks"], summary, result["traffic"]["examples"])
    assert summary["alive"] and summary["tracebacks"] == 0 and summary["unanswered"] == 0
    assert summary["leaked_pages_after_flush"] == 0 and summary["probe_outputs_equal"]
    assert summary["bad_token_id_requests_refused"] == summary["bad_token_id_requests_sent"] > 0
    assert summary["clean_shutdown_s"] is not None and summary["clean_shutdown_s"] <= 30
    assert summary["requests_total"] >= 100 and summary["abort_share"] >= 0.10 and 0.05 < summary["minutes"] < 0.2
    per_kind = result["traffic"]["per_kind"]
    assert set(per_kind) == {"session", "shared_prefix", "stream_abort", "stream", "malformed", "bad_token_id", "burst"}
    assert per_kind["malformed"]["outcomes"]["ok"] == 0 and per_kind["malformed"]["outcomes"]["refused"] > 0
    assert per_kind["session"]["outcomes"]["ok"] > 0 and per_kind["stream"]["outcomes"]["ok"] > 0
    assert "over_budget" in result["traffic"]["malformed_variants"]
    assert result["traffic"]["accepted_malformed"] == {}
    assert result["pressure"]["demoted_tokens"]["k4v4"] > 0 and result["pressure"]["dropped_tokens"]["k4v4"] > 0
    assert result["checks"]["demotion_and_drops_seen"]
    assert result["server"]["max_total_num_tokens"] == 1792 and result["server"]["write_pages_per_frame"] == 7
    assert result["accounting"]["baseline"] == result["accounting"]["after"]
    assert log.exists() and "sglang-kvc: flushed" in log.read_text()
    assert result["device"] and result["date"] and result["command"].startswith("python benchmarks/soak.py")


def test_soak_reports_every_fault(tmp_path, monkeypatch):
    code, result, _ = run_soak(tmp_path, monkeypatch, "--server-arg=--fake-faults=leak,drift,type500,hang",
                               "--shutdown-wait-s", "2")
    summary, checks = result["summary"], result["checks"]
    assert code == 1 and not result["passed"]
    assert summary["leaked_pages_after_flush"] == 14  # a k4v4 frame (14 pages, 3 cached) kept after the flush
    assert summary["probe_outputs_equal"] is False and result["probes"]["differing"]
    assert summary["tracebacks"] >= 1 and "TypeError" in result["log"]["traceback_excerpts"][0]
    assert summary["unanswered"] >= 1
    assert "malformed/max_new_tokens_as_string/unanswered" in result["traffic"]["examples"]
    assert summary["clean_shutdown_s"] is None and "SIGKILL" in result["shutdown"]["note"]
    assert not checks["no_leaked_pages"] and not checks["probe_outputs_equal"] and not checks["clean_shutdown"]
    assert checks["alive"] and checks["every_bad_token_id_refused"]


def test_help_and_gpu_wrapper():
    assert subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "soak.py"), "--help"],
                          capture_output=True, timeout=60).returncode == 0
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_soak.sh")]).returncode == 0
