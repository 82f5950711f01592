"""The quality benchmark's pieces on the CPU (issue #7): a few training steps of a tiny Llama and its
Hugging Face round trip, the passkey generator, the held-out split, the tiered forward (torch
references) against transformers at bf16, a quantized tier within the codec's bound, and an
end-to-end eval + report on a tiny grid. The GPU run itself is benchmarks/gpu_quality.sh."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.quality import corpus
from benchmarks.quality.passkey import FILLER, PasskeyBuilder

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--time-budget", "0", "--max-steps", "3", "--phases", "128:1", "--tokens-per-step", "256",
              "--micro-batch-tokens", "128", "--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
              "--head-dim", "32", "--intermediate", "128", "--vocab", "384", "--max-files", "24",
              "--tokenizer-sample-mb", "0.2", "--eval-lengths", "256", "--eval-docs", "1", "--no-progress",
              "--device", "cpu", "--seed", "3"]
PAGE = 16


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from benchmarks.quality import train_tiny_lm

    out = tmp_path_factory.mktemp("tiny_lm")
    log = train_tiny_lm.main(["--out", str(out)] + TINY_TRAIN)
    return out, log


@pytest.fixture(scope="module")
def loaded(tiny_model):
    from benchmarks.quality.eval_quality import heldout_stream, load_model

    model, encoder = load_model(str(tiny_model[0]), "cpu")
    return model, encoder, heldout_stream(str(tiny_model[0]), encoder)


def test_training_saves_a_loadable_hf_model(tiny_model):
    from transformers import AutoTokenizer, LlamaForCausalLM

    out, log = tiny_model
    assert log["steps"] == 3 and len(log["curve"]) == 3 and all(math.isfinite(p["loss"]) for p in log["curve"])
    saved = json.loads((out / "train_log.json").read_text())
    assert saved["curve"] == log["curve"] and saved["corpus"]["files_heldout"] > 0
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4  # GQA
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return x + 12345\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
    assert [tok.decode([i]) for i in tok(" 907", add_special_tokens=False)["input_ids"]][-3:] == ["9", "0", "7"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), tok.vocab_size) and torch.isfinite(logits).all()


def test_held_out_split_is_disjoint_and_deterministic(tiny_model):
    root = corpus.stdlib_root()
    paths = corpus.list_source_files(root)
    train, held = corpus.split_files(paths)
    assert set(train).isdisjoint(held) and sorted(train + held) == paths and held
    assert 0.02 < len(held) / len(paths) < 0.09
    assert corpus.split_files(paths) == (train, held)
    subset = paths[::3]  # a file's side does not depend on the other files
    assert corpus.split_files(subset)[1] == [p for p in held if p in set(subset)]
    assert corpus.path_bucket("os.py") == 956 and corpus.path_bucket("json/__init__.py") == 227  # sha256-pinned
    assert not any(p.startswith(("site-packages", "dist-packages")) or "/site-packages/" in p for p in paths)
    split = json.loads((tiny_model[0] / "corpus_split.json").read_text())
    assert split["heldout_files"] and all(corpus.is_held_out(p) for p in split["heldout_files"])


def test_passkey_document_holds_the_answer_at_the_requested_depth(loaded):
    _, encoder, _ = loaded
    builder = PasskeyBuilder(encoder, encoder.bos_id)
    block = len(encoder(FILLER))
    for length in (256, 600):
        for depth in (0.0, 0.3, 0.5, 0.9, 1.0):
            doc = builder.document(length, depth, "40917")
            text = encoder.tokenizer.decode(doc.prompt_ids)
            assert text.count("40917") == 2 and text.rstrip().endswith("The pass key is")
            assert encoder.tokenizer.decode(doc.answer_ids) == " 40917"
            assert length - block < len(doc.ids) <= length
            assert doc.prompt_ids[0] == encoder.bos_id
            assert encoder.tokenizer.decode(doc.prompt_ids[doc.needle_start:]).startswith("The pass key is 40917.")
            assert abs(doc.depth - depth) <= (block + len(builder.intro) + 12) / len(doc.prompt_ids)
    grid = builder.grid([256], [0.2, 0.8], 3, seed=5)
    assert len(grid) == 6 and grid == builder.grid([256], [0.2, 0.8], 3, seed=5)
    assert len({d.key for d in grid}) > 1
    with pytest.raises(ValueError, match="too short"):
        builder.document(20, 0.5, "12345")


def _windows(stream, length, count):
    from benchmarks.quality.eval_quality import windows_of

    return windows_of(stream, length, count)


def test_bf16_pipeline_matches_transformers(loaded):
    from benchmarks.quality.hf_check import hf_logits_check
    from benchmarks.quality.tier_states import make_state

    model, _, stream = loaded
    windows = _windows(stream, 96, 2)
    runner = model.runner(make_state("bf16"), PAGE, 2, 96, use_kernels=False)
    check = hf_logits_check(model, runner, windows, continuation=32)
    assert check["passed"], check
    assert check["rel_err_ours_vs_hf_bf16"] < 2e-2 and check["top1_agree_ours_vs_hf_bf16"] >= 0.97
    assert abs(check["ppl_ours"] / check["ppl_hf_fp32"] - 1) < 5e-3


def test_quantized_tier_moves_attention_within_the_codec_bound(loaded):
    """Layer 0 sees identical inputs in every pool, so its attention-output change is the codec's
    doing alone and must respect decode_ref.quantization_bound (+ bf16 rounding); logits move."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from sglang_kvc.kernels.decode_ref import quantization_bound
    from sglang_kvc.kernels.extend import extend_mask
    from benchmarks.quality.metrics import attention_errors, continuation_logits
    from benchmarks.quality.tier_states import make_state

    model, _, stream = loaded
    length, cont = 96, 32
    prefix = length - cont
    window = _windows(stream, length, 1)
    main = model.runner(make_state("bf16"), PAGE, 1, length, use_kernels=False)
    names = ("k4v4", "k2v2-kc", "ladder:bf16,k8v8,k4v2")
    probes = [model.runner(make_state(n), PAGE, 1, length, use_kernels=False) for n in names]
    errors = attention_errors(model, main, probes, window, cont)
    hf = model.hf_model.model
    with torch.no_grad():
        h = hf.embed_tokens(window[0])
        cos, sin = hf.rotary_emb(h, torch.arange(length)[None])
        attn = hf.layers[0].self_attn
        x = hf.layers[0].input_layernorm(h)
        q = attn.q_proj(x).view(length, model.num_q_heads, model.head_dim)
        k = attn.k_proj(x).view(length, model.num_kv_heads, model.head_dim)
        v = attn.v_proj(x).view(length, model.num_kv_heads, model.head_dim)
        q, k = apply_rotary_pos_emb(q, k, cos[0], sin[0], unsqueeze_dim=1)
    codec = probes[0].pool.layout.codecs[0]  # k4v4: every prefix token quantized on write
    k_err = torch.cat([codec.k.error_bound(k[:prefix].float()), torch.zeros(cont, *k.shape[1:])])
    v_err = torch.cat([codec.v.error_bound(v[:prefix].float()), torch.zeros(cont, *v.shape[1:])])
    bound = quantization_bound(q[prefix:], k, v, k_err, v_err, torch.zeros(length, dtype=torch.bool),
                               model.sm_scale, mask=extend_mask(prefix, cont))
    group = model.num_q_heads // model.num_kv_heads
    out_norm = torch.nn.functional.scaled_dot_product_attention(
        q[prefix:].transpose(0, 1).double(), k.repeat_interleave(group, 1).transpose(0, 1).double(),
        v.repeat_interleave(group, 1).transpose(0, 1).double(), attn_mask=extend_mask(prefix, cont)).norm()
    rounding = 3 * 2.0 ** -8  # both outputs are rounded to bf16
    for name in names:
        assert len(errors[name]) == model.config.num_hidden_layers
        assert all(math.isfinite(e) and e > 0 for e in errors[name]), (name, errors[name])
    assert errors["k4v4"][0] <= float(bound.norm() / out_norm) + rounding, (errors["k4v4"][0], bound.norm() / out_norm)
    assert errors["k2v2-kc"][0] > errors["k4v4"][0]
    logits_b = continuation_logits(model, main, window, cont)
    logits_q = continuation_logits(model, probes[0], window, cont)
    diff = (logits_q - logits_b).abs()
    assert torch.isfinite(logits_q).all() and float(diff.max()) > 0
    assert float(diff.norm() / logits_b.norm()) < 0.5


def test_eval_and_report_end_to_end(tiny_model, tmp_path):
    from benchmarks.quality import eval_quality, report

    out = tmp_path / "quality-cpu.json"
    result = eval_quality.main(["--model", str(tiny_model[0]), "--out", str(out), "--tiers", "k8v8,k4v2-kc",
                                "--ladders", "bf16,k8v8,k4v2", "--ppl-lengths", "96", "--ppl-windows", "2",
                                "--ppl-continuation", "32", "--passkey-lengths", "256", "--passkey-depths", "0.5",
                                "--passkey-trials", "2", "--attn-windows", "1", "--hf-check-windows", "1",
                                "--device", "cpu", "--no-plot"])
    saved = json.loads(out.read_text())
    summary = saved["summary"]
    names = ["bf16", "k8v8", "k4v2-kc", "ladder:bf16,k8v8,k4v2"]
    assert set(summary["ppl_increase_pct"]) == set(names) and summary["ppl_increase_pct"]["bf16"] == 0
    assert set(summary["passkey_4k_over_bf16"]) == set(names)
    assert saved["states"]["k4v2-kc"]["filled_by"] == "demotion"
    assert saved["states"]["k8v8"]["filled_by"] == "quantize-on-write"
    assert saved["hf_check"]["passed"] and not saved["missing_states"] and result["device"] == "cpu"
    assert saved["states"]["k8v8"]["bits_per_element"] < saved["states"]["bf16"]["bits_per_element"]
    assert {"device", "date", "versions", "command"} <= set(saved)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.START}\nold\n{report.END}\nafter\n")
    report.main([str(out), "--update-readme", "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and "before" in text and "after" in text and "`k4v2-kc`" in text
    assert text.count(report.START) == 1


def test_scripts_import_nothing_gpu_only_and_have_help():
    probe = ("import sys, benchmarks.quality.eval_quality, benchmarks.quality.train_tiny_lm, "
             "benchmarks.quality.report; print(sorted(m for m in ('sglang', 'triton', 'sglang_kvc.kernels', "
             "'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr
    for script in ("train_tiny_lm.py", "eval_quality.py", "report.py"):
        res = subprocess.run([sys.executable, f"benchmarks/quality/{script}", "--help"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "usage" in res.stdout, res.stderr


def test_the_fp8_reference_state_stores_what_sglangs_fp8_pool_holds():
    """``fp8_e4m3`` (stock SGLang's --kv-cache-dtype fp8_e4m3, no scale): the prefix K/V rounded to bf16,
    then to float8_e4m3fn, held exactly in a bf16 pool; other states store K/V as computed."""
    from benchmarks.quality.tier_states import make_state
    from benchmarks.quality.tiered_llama import stored_kv

    state = make_state("fp8_e4m3")
    assert [spec.name for spec in state.ladder] == ["bf16"] and state.runs == (0,)
    assert state.bits_per_element(64, 16) == 8.0
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(5, 2, 8, generator=gen) * 3, torch.randn(5, 2, 8, generator=gen)
    stored_k, stored_v = stored_kv(state, k, v)
    assert torch.equal(stored_k, k.bfloat16().to(torch.float8_e4m3fn).float())
    assert torch.equal(stored_v, v.bfloat16().to(torch.float8_e4m3fn).float())
    assert not torch.equal(stored_k, k) and torch.equal(stored_k.bfloat16().float(), stored_k)  # exact in bf16
    assert stored_kv(make_state("bf16"), k, v) == (k, v)
