"""CPU checks of benchmarks/parity.py against a fake SGLang server (aiohttp) that answers
``/generate`` with ``return_logprob`` as SGLang 0.5.16 does: ``meta_info.input_token_logprobs`` =
``[logprob, token_id, null]`` per input position from ``logprob_start_len`` on (the first input
token's logprob is null), ``input_top_logprobs`` = ``[[logprob, token_id, null]]`` per position
(null for the first), and ``cached_tokens`` = the page-aligned prefix found in its cache, at most
``logprob_start_len`` (SGLang matches no cached prefix past the first position it must score).

Each fake system's logprobs are a deterministic function of the prompt plus the system's own
noise (set by its flags): none for triton, a little for FlashInfer and the bf16 ladder, more for a
quantized tier on tokens read over a cached prefix. Run as a server:
``python -m tests.test_parity_script --port 31000 --model-path M [--attention-backend flashinfer]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NOISE = {"triton": 0.0, "flashinfer": 0.01, "bf16": 0.012, "k8v8": 0.02, "k4v4": 0.08, "k4v2": 0.15, "k2v2": 0.6}
FLIP_PERMILLE = {"triton": 0, "flashinfer": 5, "bf16": 4, "k8v8": 6, "k4v4": 20, "k4v2": 40, "k2v2": 150}


def _mix(*values: int) -> int:
    h = 1469598103
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFF)) * 16777619) & 0xFFFFFFFF
    return h


class FakeLogprobServer:
    """One fake system. ``tier``: the key of NOISE its flags select. Invariant: the cache holds every
    prompt served, and a request's cached_tokens never exceeds its logprob_start_len."""

    def __init__(self, tier: str, page_size: int = 16):
        self.tier, self.page_size = tier, page_size
        self.cache = []
        self.lock = threading.Lock()

    def matched(self, ids, limit: int) -> int:
        best = 0
        for seq in self.cache:
            n = 0
            for a, b in zip(seq, ids):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return min(best, limit) // self.page_size * self.page_size

    def answer(self, ids, start: int) -> dict:
        with self.lock:
            cached = self.matched(ids, max(start, 0))
            self.cache.append(list(ids))
        noise, flips = NOISE["bf16" if self.tier == "bf16" else self.tier], FLIP_PERMILLE[self.tier]
        logprobs, tops = [], []
        for pos in range(max(start, 0), len(ids)):
            if pos == 0:
                logprobs.append([None, ids[0], None])
                tops.append(None)
                continue
            h = _mix(ids[pos], ids[pos - 1], pos)
            true = -((h % 1000) / 100.0)
            # a quantized tier shows its noise only where the prefix was read back from its cache
            scale = noise if (self.tier in ("triton", "flashinfer", "bf16") or pos >= cached > 0) else NOISE["bf16"]
            wobble = ((_mix(h, 7) % 2001) - 1000) / 1000.0
            logprobs.append([true + scale * wobble, ids[pos], None])
            top = h % 32000
            if _mix(h, 11) % 1000 < flips:
                top = (top + 1) % 32000
            tops.append([[true + 1.0, top, None]])
        return {"output_ids": [ids[-1]], "meta_info": {
            "prompt_tokens": len(ids), "cached_tokens": cached, "completion_tokens": 1,
            "input_token_logprobs": logprobs, "input_top_logprobs": tops,
            "finish_reason": {"type": "length", "length": 1}}}


def tier_of_flags(args) -> str:
    if args.kv_compression:
        ladder = args.kv_compression.split(",")
        tier = args.kvc_write_tier or ladder[0]
        return tier.split("-")[0]
    return args.attention_backend or "triton"


def make_app(state: FakeLogprobServer):
    from aiohttp import web

    async def generate(request):
        obj = json.loads(await request.read())
        start = obj.get("logprob_start_len", -1) if obj.get("return_logprob") else -1
        return web.json_response(state.answer(obj["input_ids"], start if start >= 0 else len(obj["input_ids"])))

    async def health(request):
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/generate", generate)
    app.router.add_get("/health", health)
    return app


def fake_server_main(argv=None) -> None:
    """``sglang.launch_server`` stand-in (unknown flags ignored)."""
    from aiohttp import web

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=31100)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--attention-backend", default=None)
    parser.add_argument("--kv-compression", default=None)
    parser.add_argument("--kvc-write-tier", default=None)
    args, _ = parser.parse_known_args(argv)
    state = FakeLogprobServer(tier_of_flags(args), args.page_size)
    print(f"[fake] system noise {state.tier}; The server is fired up and ready to roll!", flush=True)
    web.run_app(make_app(state), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    fake_server_main()
    sys.exit(0)

# ---- tests --------------------------------------------------------------------------------------------
import pytest  # noqa: E402

from benchmarks import parity  # noqa: E402


def _record(logprobs, top1, name="p"):
    return {"name": name, "logprobs": logprobs, "top1": top1, "cached_tokens": 0}


def test_compare_aligns_from_the_end_and_summarizes_the_checks():
    base = {"fresh": [_record([-1.0, -2.0, -3.0], [5, 6, 7])], "cached": [_record([-2.0, -3.0], [6, 7])]}
    other = {"fresh": [_record([-2.1, -3.0], [6, 8])], "cached": [_record([-2.0, -3.5], [6, 7])]}
    row = parity.compare(other, base)
    assert row["tokens"] == 4 and row["by_phase"]["fresh"]["tokens"] == 2
    assert row["max_abs_dlogprob"] == pytest.approx(0.5)
    assert row["mean_abs_dlogprob"] == pytest.approx((0.1 + 0 + 0 + 0.5) / 4)
    assert row["top1_agreement"] == pytest.approx(3 / 4)
    summary = parity.summarize({"stock-triton": base, "stock-flashinfer": other, "kvc-bf16": base,
                                "kvc=k4v2@k4v2": {"error": "start-up failed"}})
    assert summary["bf16_ladder_max_dlogprob_over_reference"] == 0.0
    assert summary["bf16_ladder_top1_agreement"] == 1.0 and summary["reference_top1_agreement"] == 0.75
    assert all(summary["checks"].values()) and summary["failed_systems"] == ["kvc=k4v2@k4v2"]
    worse = {"fresh": [_record([-1.0, -2.9, -3.0], [5, 6, 7])], "cached": [_record([-2.0, -3.0], [6, 7])]}
    summary = parity.summarize({"stock-triton": base, "stock-flashinfer": other, "kvc-bf16": worse})
    assert summary["bf16_ladder_max_dlogprob_over_reference"] == pytest.approx(0.9 / 0.5)
    assert summary["checks"]["bf16_ladder_max_dlogprob_over_reference <= 1.5"] is False


def test_systems_expand_to_one_server_per_storage_tier():
    names, notes = parity.expand_systems("stock-triton,kvc-ladders", "bf16,k8v8,k4v2-kc;k8v8,k4v4,k2v2")
    assert names == ["stock-triton", "kvc=bf16,k8v8,k4v2-kc@k8v8", "kvc=k8v8,k4v4,k2v2@k4v4",
                     "kvc=k8v8,k4v4,k2v2@k2v2"]
    assert len(notes) == 1 and "k4v2-kc" in notes[0]
    names, _ = parity.expand_systems("kvc-bf16,kvc=bf16,k8v8,k4v2@k4v2,kvc=k8v8,k4v4,stock-flashinfer", "")
    assert names == ["kvc-bf16", "kvc=bf16,k8v8,k4v2@k4v2", "kvc=k8v8,k4v4", "stock-flashinfer"]
    flags = parity.system_flags("kvc=k8v8,k4v4,k2v2@k4v4", "/m", 16, 1000)
    assert flags[flags.index("--kv-compression") + 1] == "k8v8,k4v4,k2v2"
    assert flags[flags.index("--kvc-write-tier") + 1] == "k4v4"
    assert "flashinfer" in parity.system_flags("stock-flashinfer", "/m", 16, 1000)
    with pytest.raises(ValueError, match="unknown system"):
        parity.system_flags("stock-fp8", "/m", 16, 1000)


def _fake_model(tmp_path):
    from benchmarks.serving import MODEL_SHAPES

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(MODEL_SHAPES["tiny"]))
    (model / "tokenizer.json").write_text("{}")  # make_random_llama finds the model made
    return model


def test_parity_launches_each_system_and_writes_the_summary(tmp_path, monkeypatch):
    """The whole script: each system's fake server launched as sglang.launch_server would be,
    both phases, the JSON's summary and checks."""
    import benchmarks.serving as serving

    original = serving.Server.__init__

    def fake_module(self, args, port, log_path, env=None, module="sglang.launch_server"):
        original(self, args, port, log_path, env, module="tests.test_parity_script")

    monkeypatch.setattr(serving.Server, "__init__", fake_module)
    monkeypatch.setattr(serving, "device_name", lambda: "fake")
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    rc = parity.main(["--out", str(out), "--model", str(_fake_model(tmp_path)), "--model-size", "tiny",
                      "--systems", "stock-triton,stock-flashinfer,kvc-bf16,kvc-ladders", "--ladders", "bf16,k8v8,k4v2",
                      "--shared-prefixes", "2", "--prefix-tokens", "200", "--suffixes", "2", "--suffix-tokens", "40",
                      "--standalone", "50,120", "--port", "31187"])
    saved = json.loads(next(out.glob("parity-fake-*.json")).read_text())
    summary = saved["summary"]
    assert rc == 0 and summary["failed_systems"] == []
    assert set(summary["systems"]) == {"stock-flashinfer", "kvc-bf16", "kvc=bf16,k8v8,k4v2@k8v8",
                                       "kvc=bf16,k8v8,k4v2@k4v2"}
    ref, bf16 = summary["systems"]["stock-flashinfer"], summary["systems"]["kvc-bf16"]
    # fresh: every token but each prompt's first; cached: the suffixes (page-aligned start 192)
    assert ref["by_phase"]["fresh"]["tokens"] == 4 * 239 + 49 + 119
    assert ref["by_phase"]["cached"]["tokens"] == 4 * (240 - 192)
    assert 0 < ref["max_abs_dlogprob"] <= 0.0101 and summary["reference_max_dlogprob"] == ref["max_abs_dlogprob"]
    assert summary["bf16_ladder_max_dlogprob_over_reference"] == pytest.approx(1.2, rel=0.05)
    assert summary["bf16_ladder_top1_agreement"] >= summary["reference_top1_agreement"]
    assert all(summary["checks"].values())
    k4v2 = summary["systems"]["kvc=bf16,k8v8,k4v2@k4v2"]
    assert k4v2["by_phase"]["cached"]["max_abs_dlogprob"] > 10 * ref["max_abs_dlogprob"]
    assert k4v2["top1_agreement"] < ref["top1_agreement"]
    cached = saved["systems"]["kvc-bf16"]["cached"]
    assert all(r["cached_tokens"] == 192 for r in cached) and "logprobs" not in cached[0]
    assert (out / "parity-server-kvc_bf16_k8v8_k4v2_k4v2.log").exists()
