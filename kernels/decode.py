"""Paged decode attention over a tiered (mixed-precision) KV pool: split-K Triton kernel + reduce.

Inputs follow SGLang's Triton backend: queries bf16 ``[B, Hq, D]``, ``kv_indptr`` int32 ``[B+1]``
and ``kv_indices`` int64 global slots (one per cached token, any tier, any page size). Pages of one
sequence may sit in different tiers. ``plan`` groups each sequence's tokens by tier on the device
(``plan.py``); ``run`` launches stage 1 (grid ``[Hkv, splits, B]``: each program attends one KV
head's query group to one slice of the sequence, switching tier layout at segment boundaries) and
a reduce over the splits (grid ``[Hq, B]``). ``run`` does no host sync, so it can be captured
in a CUDA graph; ``plan`` cannot, but after ``reserve(max_batch, max_tokens)`` it writes into
persistent buffers, so calling it before each replay with the captured batch size updates what the
captured kernels read (the tier mix of a batch may change between replays without a recapture).

Accuracy: versus attention in float64 on the dequantized cache, the error comes only from bf16
rounding of the dot operands (queries, probabilities, and for ``-kc``/rotated keys the
dequantized keys / rotated queries; variant ``f16`` rounds ``-kc`` keys to fp16) and float32 accumulation; ``decode_ref.rounding_bound`` gives
the bound per output element. Versus attention on the unquantized K/V, add
``decode_ref.quantization_bound`` (from the codec's per-element ``error_bound``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .attend_jit import attend_all_tiers, attend_all_tiers_rows, zeros_acc
from .plan import TierSegments, plan_requests, plan_tier_segments
from .spec import FrameViews, KernelSupportError, check_tensor, gqa_group, layout_consts, use_inline_asm, value_chunk
from sglang_kvc.codec import hadamard

MAX_SPLITS = 64
REDUCE_NARROW = 8  # the reduce's narrow width (``reduce_width``): batches of 8 splits or fewer
# Launch configurations measured best (``config_for``): one warp per program keeps every row
# reduction inside a warp (H100, head_dim 128: benchmarks/results/kernels-nvidia-h100-80gb-hbm3-
# 2026-11-23.json, "tuning"). A ladder of several tiers compiles all tier paths into one kernel; at
# head_dim 128 its register pressure makes two warps per program the better choice (same file, and
# the H200's five-tier "mixed" tuning in kernels-nvidia-h200-2026-12-01-quick-timed-out.log). At
# head_dim 64 it does not: on the H200 the one-warp configuration decodes every three-tier ladder
# 1.5-1.9x faster than the two-warp one (benchmarks/results/decode-matrix-nvidia-h200-2026-12-01.json).
SINGLE_TIER_CONFIG = dict(num_warps=1, block_n=32, num_stages=3, maxnreg=168, programs_per_sm=8)
MULTI_TIER_CONFIG = dict(num_warps=2, block_n=64, num_stages=3, maxnreg=None, programs_per_sm=4)
MULTI_TIER_MIN_HEAD_DIM = 128  # below it, ladders of several tiers take SINGLE_TIER_CONFIG too
BLOCK_N = 64
# Kernel variants (TieredDecodeWrapper(..., variant=...)); ``served_variant`` picks the server's.
# "f16": per-token-group quantized sides dot fp16 operands against codes 1024 + c (0x6400 | c, exact
#   for c < 1024): 8-bit codes become one plane (one PRMT per two codes, one MMA) instead of two
#   4-bit planes; 4/2-bit codes unpack as before. Queries (bf16-rounded) are exact in fp16 for
#   |q| in [2^-17, 65504]; p * scale is rounded to fp16 (finer than bf16; underflows below 2^-24).
#   Per-channel (-kc) keys: c * scale + zero in float32, rounded once to fp16 and dotted with the fp16
#   queries (the served ladder's -kc-rot loops 45.7 / 47.7 -> 41.1 / 43.4 sm_90 instructions per
#   token-head, decode-sass-2026-12-01-kc.md).
# "f16fma": "f16", with -kc keys from the fp16 meta as it is, one fma.rn.f16x2 per two keys (inline
#   PTX, no fp32 conversion per key: 34.1 / 36.1 instructions per token-head).
# "dense": "f16", with 4- and 2-bit codes masked where they lie in the byte (``1024 + 2^S * c``: no
#   shift), the factor 2^S taken out after the dot (keys: in the group's scale; values: the
#   accumulator of a value chunk holds 2^S x its sum inside a tier).
# "rows": "dense", with the score tile's 16 rows = J sub-splits x GQA group (J = 16 // group, at
#   most ROWS_MAX_SUBSPLITS): one program attends J splits, so with GQA 4 no row is padding and each
#   elementwise op covers 4x the tokens (``attend_jit.attend_tier_rows``). block_n: tokens per
#   step of the program (block_n // J per split, at least 16); num_splits rounds up to a multiple
#   of J. Not for per-channel (-kc) keys.
VARIANTS = ("f16", "f16fma", "dense", "rows")
ROWS_MAX_SUBSPLITS = 4
# Launch configuration of variant "rows" for any ladder (knobs left unset), picked by sm_90 instruction
# counts (benchmarks/results/decode-sass-2026-12-01-rows.md), not timed: one warp, no register cap
# (at 168 it spills), no software pipelining of the loads (stages 2-3 add address work per token).
ROWS_CONFIG = dict(num_warps=1, block_n=64, num_stages=1, maxnreg=None, programs_per_sm=8)


@triton.jit
def _split_chunk(SEG_LEN, b, min_split, num_splits, NUM_TIERS: tl.constexpr, BN: tl.constexpr):
    """(tokens of sequence b over every tier, tokens per split): at most ``num_splits`` splits of
    at least ``min_split`` tokens, each a whole number of ``BN`` blocks."""
    total = 0
    for t in tl.static_range(NUM_TIERS):
        total += tl.load(SEG_LEN + b * NUM_TIERS + t)
    splits = tl.minimum(num_splits, tl.maximum(tl.cdiv(total, min_split), 1))
    chunk = tl.cdiv(tl.cdiv(total, splits), BN) * BN
    return total, chunk


# Arguments that change with the batch size (the split count) are not specialized on, so the CUDA
# graphs of every batch size share one compile of each kernel (a stage-1 compile takes seconds).
@triton.jit(do_not_specialize=["min_split", "num_splits"])
def _decode_stage1(Q, QR, SLOTS, SEG_START, SEG_LEN, BUFS, STRIDES, MID_O, MID_LSE, sm_scale,
                   stride_qb, stride_qh, stride_qrb, stride_qrh, stride_mb, stride_mh, stride_ms,
                   min_split, num_splits,
                   LOGIT_CAP: tl.constexpr, SPECS: tl.constexpr, NUM_TIERS: tl.constexpr,
                   GROUP: tl.constexpr, R: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                   DV: tl.constexpr, CV: tl.constexpr, PAGE: tl.constexpr, USE_ASM: tl.constexpr,
                   F16: tl.constexpr = False, PLANES: tl.constexpr = False, KC_FMA: tl.constexpr = False):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = tl.arange(0, R)
    rmask = rows < GROUP
    heads = kv_head * GROUP + rows
    q_ptrs = Q + b * stride_qb + heads * stride_qh
    qr_ptrs = QR + b * stride_qrb + heads * stride_qrh

    total, chunk = _split_chunk(SEG_LEN, b, min_split, num_splits, NUM_TIERS, BN)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, total)

    acc = zeros_acc(R, DV, CV)
    m_i = tl.full([R], float("-inf"), tl.float32)
    l_i = tl.zeros([R], tl.float32)
    acc, m_i, l_i = attend_all_tiers(acc, m_i, l_i, q_ptrs, qr_ptrs, rmask, SLOTS, SEG_START, SEG_LEN,
                                     b * NUM_TIERS, lo, hi, kv_head, BUFS, STRIDES, sm_scale, LOGIT_CAP,
                                     SPECS, NUM_TIERS, R, BN, D, DV, CV, PAGE, USE_ASM, F16, PLANES, KC_FMA)
    mid = b * stride_mb + heads * stride_mh + split * stride_ms
    offs_c = tl.arange(0, CV)
    if lo < hi:
        for c in tl.static_range(DV // CV):
            tl.store(MID_O + mid[:, None] + (c * CV + offs_c)[None, :], acc[c] / l_i[:, None],
                     mask=rmask[:, None])
        tl.store(MID_LSE + mid // DV, m_i + tl.log2(l_i), mask=rmask)
    else:
        tl.store(MID_LSE + mid // DV, tl.full([R], float("-inf"), tl.float32), mask=rmask)


@triton.jit(do_not_specialize=["min_split", "num_splits"])
def _decode_stage1_rows(Q, QR, SLOTS, SEG_START, SEG_LEN, BUFS, STRIDES, MID_O, MID_LSE, sm_scale,
                        stride_qb, stride_qh, stride_qrb, stride_qrh, stride_mb, stride_mh, stride_ms,
                        min_split, num_splits,
                        LOGIT_CAP: tl.constexpr, SPECS: tl.constexpr, NUM_TIERS: tl.constexpr,
                        GROUP: tl.constexpr, J: tl.constexpr, R: tl.constexpr, BN: tl.constexpr,
                        D: tl.constexpr, DV: tl.constexpr, CV: tl.constexpr, PAGE: tl.constexpr,
                        USE_ASM: tl.constexpr):
    """Stage 1 of variant ``rows``: program (kv head, g, b) attends splits ``g*J .. g*J+J-1`` of
    sequence b at once, split ``g*J + j`` on rows ``j*GROUP ..`` of the tile (``attend_tier_rows``)."""
    kv_head = tl.program_id(0)
    group_of_splits = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = tl.arange(0, R)
    row_sub = rows // GROUP
    rmask = row_sub < J
    heads = kv_head * GROUP + rows % GROUP
    q_ptrs = Q + b * stride_qb + heads * stride_qh
    qr_ptrs = QR + b * stride_qrb + heads * stride_qrh

    total, chunk = _split_chunk(SEG_LEN, b, min_split, num_splits, NUM_TIERS, BN)
    los = ()
    his = ()
    for j in tl.static_range(J):
        lo = (group_of_splits * J + j) * chunk
        los = los + (tl.minimum(lo, total),)
        his = his + (tl.minimum(lo + chunk, total),)

    acc = zeros_acc(R, DV, CV)
    m_i = tl.full([R], float("-inf"), tl.float32)
    l_i = tl.zeros([R], tl.float32)
    acc, m_i, l_i = attend_all_tiers_rows(acc, m_i, l_i, q_ptrs, qr_ptrs, rmask, row_sub, SLOTS, SEG_START,
                                          SEG_LEN, b * NUM_TIERS, los, his, kv_head, BUFS, STRIDES, sm_scale,
                                          LOGIT_CAP, SPECS, NUM_TIERS, R, BN, D, DV, CV, PAGE, USE_ASM, J)
    mid = b * stride_mb + heads * stride_mh + (group_of_splits * J + row_sub) * stride_ms
    offs_c = tl.arange(0, CV)
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    for c in tl.static_range(DV // CV):
        tl.store(MID_O + mid[:, None] + (c * CV + offs_c)[None, :], acc[c] / l_safe[:, None],
                 mask=(rmask & seen)[:, None])
    tl.store(MID_LSE + mid // DV, tl.where(seen, m_i + tl.log2(l_safe), float("-inf")), mask=rmask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce(MID_O, MID_LSE, OUT, stride_mb, stride_mh, stride_ms, stride_ob, stride_oh, num_splits,
                   DV: tl.constexpr, SP: tl.constexpr):
    """Program (q head, b): merges sequence b's splits, every split's lse and output loaded at once
    (``SP`` >= num_splits, ``reduce_width``). A loop over the splits waited one load latency per
    split, and small batches run up to MAX_SPLITS of them in every layer."""
    head = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, DV)
    splits = tl.arange(0, SP)
    rows = b * stride_mb + head * stride_mh + splits.to(tl.int64) * stride_ms
    lse = tl.load(MID_LSE + rows // DV, mask=splits < num_splits, other=float("-inf"))
    used = lse > float("-inf")  # splits past a sequence's tokens hold no output
    m = tl.max(lse, 0)
    w = tl.where(used, tl.exp2(lse - tl.where(m > float("-inf"), m, 0.0)), 0.0)
    o = tl.load(MID_O + rows[:, None] + offs[None, :], mask=used[:, None], other=0.0)
    acc = tl.sum(w[:, None] * o, 0)
    l_i = tl.sum(w, 0)
    out = tl.where(l_i > 0, acc / tl.maximum(l_i, 1e-30), 0.0)
    tl.store(OUT + b * stride_ob + head * stride_oh + offs, out.to(OUT.dtype.element_ty))


def reduce_width(num_splits: int) -> int:
    """Splits the reduce loads at once (``SP``): two widths for the planned split counts (at most
    MAX_SPLITS), so it compiles at most twice; a larger fixed ``num_splits`` gets its own."""
    return REDUCE_NARROW if num_splits <= REDUCE_NARROW else triton.next_power_of_2(max(num_splits, MAX_SPLITS))


# The variant the server runs (``served_variant``): fp16 dot operands, 8-bit codes read as one plane ("f16":
# on the H200, B=64 x 4K, benchmarks/results/kernels-nvidia-h200-2026-12-01-quick-timed-out.log, it beat the
# bf16-operand kernel on every tier timed, k8v8 0.314 -> 0.244 ms, with half its error on k8v8); from head_dim
# 128 on, -kc keys by one fma.rn.f16x2 per two keys ("f16fma"). The served -kc ladder timed in one device call
# (decode-matrix-nvidia-h200-2026-12-01-same-call-hd{64,128}-{f16,f16fma}.json, 6,144 tokens of context, a layer,
# B=8 / B=32): head_dim 128 f16 0.140 / 0.464 ms, f16fma 0.131 / 0.412; head_dim 64 f16 0.081 / 0.195,
# f16fma 0.111 / 0.170 (slower at B=8, as in an earlier call: 0.073 against 0.063).
FMA_MIN_HEAD_DIM = 128


def served_variant(head_dim: int) -> str:
    """The decode kernel variant the server runs at ``head_dim``."""
    return "f16fma" if head_dim >= FMA_MIN_HEAD_DIM else "f16"


def config_for(num_tiers: int, head_dim: int) -> dict:
    """The default launch configuration of a ladder of ``num_tiers`` tiers at ``head_dim``."""
    return MULTI_TIER_CONFIG if num_tiers > 1 and head_dim >= MULTI_TIER_MIN_HEAD_DIM else SINGLE_TIER_CONFIG


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


class TieredDecodeWrapper:
    """Decode attention over a ``TieredKVPool``, FlashInfer-style: ``plan`` once per batch, ``run``
    once per layer.

    Invariant after ``plan``: ``segments`` holds every planned sequence's tokens grouped by tier
    (local slots), and the split buffers fit ``[B, Hq, num_splits, Dv]``; ``run`` reads only those.
    """

    def __init__(self, pool, num_qo_heads: int, block_n: Optional[int] = None, num_splits: Optional[int] = None,
                 min_split_tokens: int = 4 * BLOCK_N, num_warps: Optional[int] = None,
                 num_stages: Optional[int] = None, programs_per_sm: Optional[int] = None,
                 maxnreg: Optional[int] = -1, variant: Optional[str] = None):
        """block_n: tokens per inner step; num_splits: fixed split count (default: enough programs
        for ``programs_per_sm`` per multiprocessor); min_split_tokens: shortest split. Knobs left
        unset take ``config_for(tiers, head_dim)`` (ROWS_CONFIG for variant "rows"; maxnreg=-1:
        the config's, None: no cap).
        variant: None (the default kernel) or one of ``VARIANTS`` (opt-in, unmeasured)."""
        if variant is not None and variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not a decode kernel variant; choose None or one of "
                             f"{', '.join(VARIANTS)}")
        self.variant = variant
        if variant == "rows":
            per_channel = [c.name for c in pool.layout.codecs if c.k.per_channel or c.v.per_channel]
            if per_channel:
                raise KernelSupportError(f"variant='rows' does not read per-channel (-kc) tiers "
                                         f"({', '.join(per_channel)}); use variant=None or 'dense' for this ladder")
        config = ROWS_CONFIG if variant == "rows" else config_for(pool.layout.num_tiers, pool.head_dim)
        block_n = config["block_n"] if block_n is None else block_n
        num_warps = config["num_warps"] if num_warps is None else num_warps
        num_stages = config["num_stages"] if num_stages is None else num_stages
        programs_per_sm = config["programs_per_sm"] if programs_per_sm is None else programs_per_sm
        maxnreg = config["maxnreg"] if maxnreg == -1 else maxnreg
        layout = pool.layout
        self.pool = pool
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = pool.head_num
        self.group = gqa_group(pool, num_qo_heads)
        self.rows = max(16, triton.next_power_of_2(self.group))
        self.head_dim = pool.head_dim
        self.v_head_dim = pool.v_head_dim
        self.consts = layout_consts(layout)
        self.views = FrameViews(pool)
        self.chunk_v = value_chunk(layout.codecs)
        self.rotates = any(c.k.rotate for c in layout.codecs)
        self._hadamard = hadamard(self.head_dim, torch.device(pool.device)) if self.rotates else None
        self.block_n = block_n
        # variant "rows": J splits per program, each reading sub_block_n tokens per step
        self.subsplits = max(1, min(ROWS_MAX_SUBSPLITS, 16 // self.group)) if variant == "rows" else 1
        self.sub_block_n = max(16, block_n // self.subsplits)
        self.tokens_per_step = self.sub_block_n * self.subsplits
        if num_splits is not None:
            num_splits = -(-num_splits // self.subsplits) * self.subsplits
        self.fixed_splits = num_splits
        self.min_split_tokens = max(block_n, min_split_tokens)
        self.num_warps = num_warps
        self.num_stages = num_stages
        self.programs_per_sm = programs_per_sm
        self.launch_options = {} if maxnreg is None else {"maxnreg": maxnreg}
        self.use_asm = use_inline_asm(torch.device(pool.device))
        self.segments = None
        self.batch = None
        self._mid = None
        self._reserved = None  # (TierSegments, mid_o, mid_lse) of the largest batch, see reserve()

    def _variant_flags(self) -> dict:
        """Compile-time flags of ``_decode_stage1`` for the variant (none for the default kernel)."""
        return {None: {}, "f16": {"F16": True}, "f16fma": {"F16": True, "KC_FMA": True},
                "dense": {"F16": True, "PLANES": True}}[self.variant]

    def splits_for(self, batch: int) -> int:
        """Split count of a batch of ``batch`` sequences (fixed per batch size, so per captured graph)."""
        if self.fixed_splits is not None:
            return self.fixed_splits
        target = _num_sms(torch.device(self.pool.device)) * self.programs_per_sm
        programs = min(MAX_SPLITS // self.subsplits, max(1, -(-target // (batch * self.num_kv_heads))))
        return programs * self.subsplits

    def reserve(self, max_batch: int, max_tokens: int) -> None:
        """Allocate the plan's and the splits' buffers once for up to ``max_batch`` sequences and
        ``max_tokens`` kv indices: every later plan that fits writes into views of them, so a
        CUDA graph captured after a plan of batch size B reads the right data after any later plan
        of batch size B. Bigger (eager) batches get buffers of their own and leave these alone."""
        device = torch.device(self.pool.device)
        tiers = self.pool.layout.num_tiers
        splits = max(self.splits_for(b) for b in range(1, max_batch + 1))
        self._reserved = (
            TierSegments(torch.zeros(max_tokens, dtype=torch.int32, device=device),
                          torch.zeros((max_batch, tiers), dtype=torch.int32, device=device),
                          torch.zeros((max_batch, tiers), dtype=torch.int32, device=device)),
            torch.empty(max_batch * self.num_qo_heads * splits * self.v_head_dim, dtype=torch.float32,
                        device=device),
            torch.empty(max_batch * self.num_qo_heads * splits, dtype=torch.float32, device=device))

    def plan(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, sm_scale: Optional[float] = None,
             logit_cap: float = 0.0, num_seqs: Optional[int] = None) -> None:
        """kv_indptr int32/int64 ``[B+1]``; kv_indices int32/int64 global slots (``>= kv_indptr[B]``)."""
        device = torch.device(self.pool.device)
        check_tensor("kv_indptr", kv_indptr, (torch.int32, torch.int64), 1, device)
        check_tensor("kv_indices", kv_indices, (torch.int32, torch.int64), 1, device)
        batch = num_seqs if num_seqs is not None else kv_indptr.numel() - 1
        if batch < 1 or batch > kv_indptr.numel() - 1:
            raise ValueError(f"num_seqs={batch} does not fit kv_indptr of {kv_indptr.numel()} entries")
        self.batch = batch
        self.sm_scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.logit_cap = float(logit_cap)
        self.num_splits = self.splits_for(batch)
        seg = plan_tier_segments(self.pool, kv_indptr, kv_indices, batch)
        tokens = seg.local_slots.numel()
        kept, self._mid = self._buffers(batch, tokens)
        if kept is None:
            self.segments = seg
        else:
            kept.local_slots[:tokens].copy_(seg.local_slots)
            kept.seg_start.copy_(seg.seg_start)
            kept.seg_len.copy_(seg.seg_len)
            self.segments = kept

    def plan_requests(self, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                      total_tokens: int, num_seqs: int, sm_scale: Optional[float] = None,
                      logit_cap: float = 0.0) -> None:
        """``plan`` straight from SGLang's request rows: the first ``seq_lens[b]`` slots of row
        ``req_pool_indices[b]`` of ``req_to_token`` (``total_tokens``: their sum, a host int), one
        kernel (``plan.plan_requests``) instead of a kv index list and a sort."""
        device = torch.device(self.pool.device)
        check_tensor("req_to_token", req_to_token, (torch.int32, torch.int64), 2, device)
        if num_seqs < 1 or num_seqs > min(req_pool_indices.numel(), seq_lens.numel()):
            raise ValueError(f"num_seqs={num_seqs} does not fit {req_pool_indices.numel()} request rows")
        self.batch = num_seqs
        self.sm_scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.logit_cap = float(logit_cap)
        self.num_splits = self.splits_for(num_seqs)
        kept, self._mid = self._buffers(num_seqs, total_tokens + 1)
        if kept is None:
            tiers = self.pool.layout.num_tiers
            kept = TierSegments(torch.zeros(total_tokens + 1, dtype=torch.int32, device=device),
                                torch.empty((num_seqs, tiers), dtype=torch.int32, device=device),
                                torch.empty((num_seqs, tiers), dtype=torch.int32, device=device))
        self.segments = plan_requests(self.pool, req_to_token, req_pool_indices, seq_lens, num_seqs, kept)

    def _buffers(self, batch: int, tokens: int):
        """(plan buffers, splits' buffers) of a batch: views of the reserved buffers when it fits
        them (the addresses stay those a captured graph holds; plan buffers None otherwise, the
        caller's own then), else fresh splits' buffers."""
        shape = (batch, self.num_qo_heads, self.num_splits, self.v_head_dim)
        reserved = self._reserved
        if reserved is None or batch > reserved[0].seg_len.shape[0] or tokens > reserved[0].local_slots.numel():
            device = torch.device(self.pool.device)
            return None, (torch.empty(shape, dtype=torch.float32, device=device),
                          torch.empty(shape[:3], dtype=torch.float32, device=device))
        kept, mid_o, mid_lse = reserved
        count = batch * self.num_qo_heads * self.num_splits
        return (TierSegments(kept.local_slots, kept.seg_start[:batch], kept.seg_len[:batch]),
                (mid_o[: count * self.v_head_dim].view(shape), mid_lse[:count].view(shape[:3])))

    def run(self, q: torch.Tensor, pool, layer_id: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q ``[B, Hq, D]`` (bf16; fp16/fp32 accepted) -> out ``[B, Hq, Dv]`` bf16 (or out's dtype)."""
        if self.segments is None:
            raise RuntimeError("call plan(kv_indptr, kv_indices, ...) before run()")
        if pool is not self.pool:
            raise ValueError("run() got a different pool than the wrapper was built for")
        device = torch.device(pool.device)
        check_tensor("q", q, (torch.bfloat16, torch.float16, torch.float32), 3, device)
        expected = (self.batch, self.num_qo_heads, self.head_dim)
        if tuple(q.shape) != expected:
            raise ValueError(f"q has shape {tuple(q.shape)}, the plan expects {expected} [B, Hq, D]")
        if q.stride(-1) != 1:
            raise ValueError("q must be contiguous in its last dimension")
        layer = layer_id - pool.start_layer
        if not 0 <= layer < pool.layer_num:
            raise ValueError(f"layer_id {layer_id} is outside this pool's layers "
                             f"[{pool.start_layer}, {pool.start_layer + pool.layer_num})")
        if out is None:
            out = torch.empty((self.batch, self.num_qo_heads, self.v_head_dim), dtype=torch.bfloat16,
                              device=device)
        elif tuple(out.shape) != (self.batch, self.num_qo_heads, self.v_head_dim) or out.stride(-1) != 1:
            raise ValueError(f"out must have shape {(self.batch, self.num_qo_heads, self.v_head_dim)}")
        q_rot = q
        if self.rotates:
            q_rot = q.float() @ self._hadamard
        mid_o, mid_lse = self._mid
        seg = self.segments
        if self.variant == "rows":
            _decode_stage1_rows[(self.num_kv_heads, self.num_splits // self.subsplits, self.batch)](
                q, q_rot, seg.local_slots, seg.seg_start, seg.seg_len, self.views.layer(layer), self.views.strides,
                mid_o, mid_lse, self.sm_scale, q.stride(0), q.stride(1), q_rot.stride(0), q_rot.stride(1),
                mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), self.min_split_tokens, self.num_splits,
                LOGIT_CAP=self.logit_cap, SPECS=self.consts, NUM_TIERS=len(self.consts), GROUP=self.group,
                J=self.subsplits, R=self.rows, BN=self.sub_block_n, D=self.head_dim, DV=self.v_head_dim,
                CV=self.chunk_v, PAGE=pool.page_size, USE_ASM=self.use_asm, num_warps=self.num_warps,
                num_stages=self.num_stages, **self.launch_options)
        else:
            _decode_stage1[(self.num_kv_heads, self.num_splits, self.batch)](
                q, q_rot, seg.local_slots, seg.seg_start, seg.seg_len, self.views.layer(layer), self.views.strides,
                mid_o, mid_lse, self.sm_scale, q.stride(0), q.stride(1), q_rot.stride(0), q_rot.stride(1),
                mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), self.min_split_tokens, self.num_splits,
                LOGIT_CAP=self.logit_cap, SPECS=self.consts, NUM_TIERS=len(self.consts), GROUP=self.group,
                R=self.rows, BN=self.block_n, D=self.head_dim, DV=self.v_head_dim, CV=self.chunk_v,
                PAGE=pool.page_size, USE_ASM=self.use_asm, **self._variant_flags(),
                num_warps=self.num_warps, num_stages=self.num_stages, **self.launch_options)
        _decode_reduce[(self.num_qo_heads, self.batch)](
            mid_o, mid_lse, out, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), out.stride(0),
            out.stride(1), self.num_splits, DV=self.v_head_dim, SP=reduce_width(self.num_splits),
            num_warps=4)
        return out


def decode_attention(q, pool, layer_id, kv_indptr, kv_indices, sm_scale=None, logit_cap=0.0, **wrapper_kwargs):
    """One-shot decode (plan + run); q bf16 ``[B, Hq, D]`` -> bf16 ``[B, Hq, Dv]``."""
    wrapper = TieredDecodeWrapper(pool, q.shape[1], **wrapper_kwargs)
    wrapper.plan(kv_indptr, kv_indices, sm_scale=sm_scale, logit_cap=logit_cap, num_seqs=q.shape[0])
    return wrapper.run(q, pool, layer_id)
