"""One Triton compile per kernel and ladder step, made before serving (``kernels/precompile.py``).

Triton keys a compile on its arguments' types, on integers equal to 1 or divisible by 16 and on
16-byte pointer alignment; a server that launches requantize with 1, 16 and 17 pages compiled it
three times, each a multi-second stall of the scheduler (H200 e2e, 2026-12-01). These tests compute
the sm_90 keys on the CPU (``compile_key``) for launches that vary as serving varies them and check
that every launch reuses the one compile ``precompile`` made.
"""

from __future__ import annotations

import pytest
import torch

import sglang_kvc.kernels.decode as decode_mod
import sglang_kvc.kernels.dequant as dequant_mod
import sglang_kvc.kernels.quantize as quantize_mod
import sglang_kvc.kernels.requantize as requantize_mod
from sglang_kvc.kernels.extend import TieredExtendWrapper
from sglang_kvc.kernels.ops import TritonKVOps
from sglang_kvc.kernels.precompile import precompile
from sglang_kvc.kernels.quantize import quantize_write
from sglang_kvc.kernels.testing import compile_key, make_pool, tier_page_ids, tier_slots
from sglang_kvc.tiers import LADDER_PRESETS as PRESETS

HEADS, Q_HEADS, PAGE = 2, 8, 16
COUNTS = (1, 2, 16, 17, 40)  # the classes Triton tells apart: 1, multiples of 16, the rest


class KeyRecorder:
    """Stands in for a jit kernel: records each launch's (or ``warmup``'s) compile key, runs nothing."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launched, self.warmed = [], []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append(compile_key(self.kernel, *args, **kwargs))

    def warmup(self, *args, grid=None, **kwargs):
        self.warmed.append(compile_key(self.kernel, *args, **kwargs))


@pytest.fixture
def recorders(monkeypatch):
    found = {}
    for name, module, attr in (("requantize", requantize_mod, "_requant_kernel"),
                               ("dequantize", dequant_mod, "_dequant_kernel"),
                               ("write", quantize_mod, "_write_kernel")):
        found[name] = KeyRecorder(getattr(module, attr))
        monkeypatch.setattr(module, attr, found[name])
    return found


def _pool(ladder: str, head_dim: int):
    return make_pool(ladder, head_dim, HEADS, PAGE, 48 * PAGE, device="cpu", ops=TritonKVOps())


def _offset_view(values: torch.Tensor, offset: int) -> torch.Tensor:
    """``values`` as a view ``offset`` elements into a larger tensor (a slice, as callers pass)."""
    base = torch.zeros(len(values) + offset, dtype=values.dtype)
    base[offset:] = values
    return base[offset:]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("preset", ["aggressive", "balanced"])
def test_serving_launches_reuse_the_precompiled_kernels(recorders, preset, head_dim):
    pool = _pool(PRESETS[preset], head_dim)
    precompile(pool)
    num_tiers = pool.layout.num_tiers
    assert len(recorders["requantize"].warmed) == num_tiers - 1
    assert len(recorders["dequantize"].warmed) == len(recorders["write"].warmed) == 1

    for src in range(num_tiers - 1):  # demotions of every size, index arrays at any offset
        src_pages, dst_pages = tier_page_ids(pool.layout, src), tier_page_ids(pool.layout, src + 1)
        for count in COUNTS:
            for offset in (0, 3):
                requantize_mod.requantize_pages(
                    pool, src, _offset_view(pool.local_pages(src, src_pages[:count]), offset),
                    src + 1, _offset_view(pool.local_pages(src + 1, dst_pages[:count]), offset))
    launched = recorders["requantize"].launched
    assert len(launched) == (num_tiers - 1) * len(COUNTS) * 2
    for src in range(num_tiers - 1):
        step = launched[src * len(COUNTS) * 2: (src + 1) * len(COUNTS) * 2]
        assert set(step) == {recorders["requantize"].warmed[src]}, f"step {src}: {len(set(step))} compiles"

    slots = tier_slots(pool.layout, 0)
    qkv_width = (Q_HEADS + 2 * HEADS) * head_dim
    for count in COUNTS:  # SGLang hands K and V as views into the fused qkv projection
        qkv = torch.randn(count, qkv_width).to(pool.dtype)
        k = qkv[:, Q_HEADS * head_dim:(Q_HEADS + HEADS) * head_dim].view(-1, HEADS, head_dim)
        v = qkv[:, (Q_HEADS + HEADS) * head_dim:].view(-1, HEADS, head_dim)
        for layer in range(pool.layer_num):
            quantize_write(pool, 0, layer, _offset_view(pool.local_slots(0, slots[:count]), 5), k, v)
    assert set(recorders["write"].launched) == set(recorders["write"].warmed)

    cached = torch.cat([tier_slots(pool.layout, t)[:40] for t in range(num_tiers)])
    for count in COUNTS:  # extend over cached prefixes of every length, through its own buffers
        wrapper = TieredExtendWrapper(pool, Q_HEADS)
        indptr = torch.tensor([0, count], dtype=torch.int32)
        wrapper.plan(torch.tensor([0, 4], dtype=torch.int32), indptr, cached[:count], max_len_extend=4,
                     prefix_total=count)
        for layer in range(pool.layer_num):
            wrapper.prefix.run(pool.start_layer + layer, wrapper.prefix_k, wrapper.prefix_v)
    assert set(recorders["dequantize"].launched) == set(recorders["dequantize"].warmed)


# SGLang 0.5.16's default decode CUDA-graph batch sizes (the server log's "Capture target decode" line)
GRAPH_BATCHES = [1, 2, 4, 8, 12, 16] + list(range(24, 257, 8))


def test_decode_graphs_of_every_batch_size_share_one_compile(monkeypatch):
    """The served decode over SGLang's graph batch sizes: their split counts (1 to 64) do not
    specialize stage 1 (one compile, not three) and the reduce compiles at most twice (not eight)."""
    stage1, reduce = KeyRecorder(decode_mod._decode_stage1), KeyRecorder(decode_mod._decode_reduce)
    monkeypatch.setattr(decode_mod, "_decode_stage1", stage1)
    monkeypatch.setattr(decode_mod, "_decode_reduce", reduce)
    monkeypatch.setattr(decode_mod, "_num_sms", lambda device: 132)  # an H200: the server's split counts
    pool = make_pool(PRESETS["aggressive"], 64, 8, PAGE, 4096, device="cpu")
    wrapper = decode_mod.TieredDecodeWrapper(pool, 32, variant="f16")
    wrapper.reserve(max_batch=256, max_tokens=256 * PAGE)
    splits = set()
    for batch in GRAPH_BATCHES:
        indptr = torch.arange(0, batch * PAGE + 1, PAGE, dtype=torch.int32)
        wrapper.plan(indptr, torch.arange(PAGE, PAGE * (batch + 1)))
        wrapper.run(torch.zeros(batch, 32, 64, dtype=torch.bfloat16), pool, 0)
        splits.add(wrapper.num_splits)
    assert {1, 64} <= splits and len(splits) > 3
    assert len(set(stage1.launched)) == 1
    assert len(set(reduce.launched)) <= 2


def test_compile_key_tells_apart_what_triton_specializes_on(monkeypatch):
    """The key itself: the same kernel without its ``do_not_specialize`` lists compiles once per
    count class (the server of 2026-12-01), with them once."""
    from triton.runtime.jit import JITFunction

    pool = _pool(PRESETS["aggressive"], 64)
    served = requantize_mod._requant_kernel
    plain = JITFunction(getattr(served, "fn", served))  # specializing on everything
    for kernel, compiles in ((served, 1), (plain, 3)):  # 3: == 1, % 16 == 0, the rest
        recorder = KeyRecorder(kernel)
        monkeypatch.setattr(requantize_mod, "_requant_kernel", recorder)
        for count in COUNTS:
            pages = torch.arange(count, dtype=torch.int64)
            requantize_mod.requantize_pages(pool, 0, pages, 1, pages)
        assert len(set(recorder.launched)) == compiles


def test_a_failed_precompile_is_a_warning_and_serving_goes_on(monkeypatch, caplog):
    import logging

    import sglang_kvc.kernels.precompile as precompile_mod

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(precompile_mod, "requantize_pages", broken)
    caplog.set_level(logging.INFO)
    logger = logging.getLogger("sglang_kvc.test")
    assert precompile_mod.precompile_logged(_pool(PRESETS["aggressive"], 64), logger) == []
    assert "compiling the kernels before serving failed (RuntimeError('no compiler'))" in caplog.text
    assert caplog.records[-1].levelname == "WARNING"
