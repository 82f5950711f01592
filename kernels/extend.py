"""Extend (prefill) attention: new tokens attend causally to themselves and to a cached prefix
read from mixed tiers.

Conventions of SGLang's ``extend_attention_fwd``: q_extend ``[N, Hq, D]``, k_extend/v_extend
``[N, Hkv, D|Dv]`` (bf16, in flight: the new tokens' K/V, not read back from the pool),
``qo_indptr`` int32 ``[B+1]`` into them, the prefix as ``kv_indptr`` int32 ``[B+1]`` /
``kv_indices`` int64 global slots (any tiers). Query ``i`` of a sequence sees its whole prefix and
extend tokens ``0..i``. Grid ``[query blocks, Hkv, B]``; rows of a program are (query, head of the
KV head's group) pairs, so each K/V block is read once per group. The prefix loop is the decode
kernels' (``attend_jit``); the extend part is a plain bf16 causal flash loop.
Reference: ``extend_reference`` (float64, gathers the prefix with ``pool.read_tokens``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .attend_jit import LOG2E, attend_all_tiers, zeros_acc
from .decode_ref import _attend, gather
from .plan import plan_tier_segments
from .spec import FrameViews, check_tensor, gqa_group, layout_consts, use_inline_asm, value_chunk
from sglang_kvc.codec import hadamard

ROWS = 16  # 64 rows switch Triton to wgmma, which mis-handles the register-unpacked operands; 32 spill
BLOCK_N = 64


@triton.jit
def _extend_kernel(Q, QR, K_EXT, V_EXT, OUT, QO_INDPTR, SLOTS, SEG_START, SEG_LEN, BUFS, STRIDES, sm_scale,
                   s_qt, s_qh, s_qrt, s_qrh, s_kt, s_kh, s_vt, s_vh, s_ot, s_oh,
                   LOGIT_CAP: tl.constexpr, SPECS: tl.constexpr, NUM_TIERS: tl.constexpr, GROUP: tl.constexpr,
                   GP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                   CV: tl.constexpr, PAGE: tl.constexpr, USE_ASM: tl.constexpr):
    R: tl.constexpr = BM * GP
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(QO_INDPTR + b).to(tl.int64)
    ext_len = tl.load(QO_INDPTR + b + 1).to(tl.int64) - q_start
    if block * BM < ext_len:
        rows = tl.arange(0, R)
        m_idx = block * BM + rows // GP
        sub = rows % GP
        rmask = (sub < GROUP) & (m_idx < ext_len)
        heads = kv_head * GROUP + sub
        tok = q_start + m_idx
        q_ptrs = Q + tok * s_qt + heads * s_qh
        qr_ptrs = QR + tok * s_qrt + heads * s_qrh

        acc = zeros_acc(R, DV, CV)
        m_i = tl.full([R], float("-inf"), tl.float32)
        l_i = tl.zeros([R], tl.float32)
        prefix = 0
        for t in tl.static_range(NUM_TIERS):
            prefix += tl.load(SEG_LEN + b * NUM_TIERS + t)
        acc, m_i, l_i = attend_all_tiers(acc, m_i, l_i, q_ptrs, qr_ptrs, rmask, SLOTS, SEG_START, SEG_LEN,
                                         b * NUM_TIERS, 0, prefix, kv_head, BUFS, STRIDES, sm_scale, LOGIT_CAP,
                                         SPECS, NUM_TIERS, R, BN, D, DV, CV, PAGE, USE_ASM)
        # the extend part: bf16 keys/values in flight, causal
        offs_d = tl.arange(0, D)
        q = tl.load(q_ptrs[:, None] + offs_d[None, :], mask=rmask[:, None], other=0.0).to(tl.bfloat16)
        offs_c = tl.arange(0, CV)
        end = tl.minimum(ext_len, (block + 1) * BM)
        for start in range(0, end, BN):
            offs_n = start + tl.arange(0, BN)
            nmask = offs_n < end
            k = tl.load(K_EXT + (q_start + offs_n)[None, :] * s_kt + kv_head * s_kh + offs_d[:, None],
                        mask=nmask[None, :], other=0.0)
            qk = tl.dot(q, k.to(tl.bfloat16)) * sm_scale
            if LOGIT_CAP > 0:
                qk = LOGIT_CAP * (2.0 * tl.sigmoid(2.0 * qk / LOGIT_CAP) - 1.0)
            visible = nmask[None, :] & (offs_n[None, :] <= m_idx[:, None])
            qk = tl.where(visible, qk * LOG2E, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            pb = p.to(tl.bfloat16)
            out = ()
            for c in tl.static_range(DV // CV):
                v = tl.load(V_EXT + (q_start + offs_n)[:, None] * s_vt + kv_head * s_vh + (c * CV + offs_c)[None, :],
                            mask=nmask[:, None], other=0.0)
                out = out + (tl.dot(pb, v.to(tl.bfloat16), acc[c] * alpha[:, None]),)
            acc = out
            m_i = m_new
        o_ptrs = OUT + tok * s_ot + heads * s_oh
        for c in tl.static_range(DV // CV):
            tl.store(o_ptrs[:, None] + (c * CV + offs_c)[None, :], (acc[c] / l_i[:, None]).to(OUT.dtype.element_ty),
                     mask=rmask[:, None])


class TieredExtendWrapper:
    """Extend attention over a ``TieredKVPool``: ``plan`` once per batch (tier-sorts the prefixes),
    ``run`` once per layer. Invariant after ``plan``: ``segments`` covers every planned prefix."""

    def __init__(self, pool, num_qo_heads: int, rows: int = ROWS, block_n: int = BLOCK_N):
        self.pool = pool
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = pool.head_num
        self.group = gqa_group(pool, num_qo_heads)
        self.group_pad = triton.next_power_of_2(self.group)
        self.block_m = max(1, rows // self.group_pad)
        if self.block_m * self.group_pad < 16:
            self.block_m = 16 // self.group_pad
        self.block_n = block_n
        layout = pool.layout
        self.consts = layout_consts(layout)
        self.views = FrameViews(pool)
        self.chunk_v = value_chunk(layout.codecs)
        self.rotates = any(c.k.rotate for c in layout.codecs)
        self.use_asm = use_inline_asm(torch.device(pool.device))
        self.segments = None

    def plan(self, qo_indptr, kv_indptr, kv_indices, max_len_extend: Optional[int] = None,
             sm_scale: Optional[float] = None, logit_cap: float = 0.0) -> None:
        """qo_indptr/kv_indptr int32 ``[B+1]``; kv_indices global prefix slots; max_len_extend: the
        longest extend (host int; computed with one sync if omitted)."""
        device = torch.device(self.pool.device)
        check_tensor("qo_indptr", qo_indptr, (torch.int32, torch.int64), 1, device)
        check_tensor("kv_indptr", kv_indptr, (torch.int32, torch.int64), 1, device)
        check_tensor("kv_indices", kv_indices, (torch.int32, torch.int64), 1, device)
        if qo_indptr.numel() != kv_indptr.numel():
            raise ValueError(f"qo_indptr has {qo_indptr.numel()} entries, kv_indptr {kv_indptr.numel()}; "
                             f"both must be [B+1]")
        self.batch = qo_indptr.numel() - 1
        if max_len_extend is None:
            max_len_extend = int((qo_indptr[1:] - qo_indptr[:-1]).max()) if self.batch else 0
        self.max_len_extend = int(max_len_extend)
        self.qo_indptr = qo_indptr
        self.sm_scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(self.pool.head_dim)
        self.logit_cap = float(logit_cap)
        self.segments = plan_tier_segments(self.pool, kv_indptr, kv_indices, self.batch)

    def run(self, q_extend, k_extend, v_extend, pool, layer_id: int, out: Optional[torch.Tensor] = None):
        """q_extend ``[N, Hq, D]``, k_extend ``[N, Hkv, D]``, v_extend ``[N, Hkv, Dv]`` (bf16) ->
        out ``[N, Hq, Dv]`` bf16."""
        if self.segments is None:
            raise RuntimeError("call plan(qo_indptr, kv_indptr, kv_indices, ...) before run()")
        if pool is not self.pool:
            raise ValueError("run() got a different pool than the wrapper was built for")
        device = torch.device(pool.device)
        floats = (torch.bfloat16, torch.float16, torch.float32)
        check_tensor("q_extend", q_extend, floats, 3, device)
        check_tensor("k_extend", k_extend, floats, 3, device)
        check_tensor("v_extend", v_extend, floats, 3, device)
        n = q_extend.shape[0]
        for name, tensor, shape in (("q_extend", q_extend, (n, self.num_qo_heads, pool.head_dim)),
                                    ("k_extend", k_extend, (n, self.num_kv_heads, pool.head_dim)),
                                    ("v_extend", v_extend, (n, self.num_kv_heads, pool.v_head_dim))):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
            if tensor.stride(-1) != 1:
                raise ValueError(f"{name} must be contiguous in its last dimension")
        layer = layer_id - pool.start_layer
        if not 0 <= layer < pool.layer_num:
            raise ValueError(f"layer_id {layer_id} is outside this pool's layers")
        if out is None:
            out = torch.empty((n, self.num_qo_heads, pool.v_head_dim), dtype=torch.bfloat16, device=device)
        if n == 0 or self.max_len_extend == 0:
            return out
        q_rot = q_extend.float() @ hadamard(pool.head_dim, device) if self.rotates else q_extend
        seg = self.segments
        grid = (triton.cdiv(self.max_len_extend, self.block_m), self.num_kv_heads, self.batch)
        _extend_kernel[grid](
            q_extend, q_rot, k_extend, v_extend, out, self.qo_indptr, seg.local_slots, seg.seg_start, seg.seg_len,
            self.views.layer(layer), self.views.strides, self.sm_scale,
            q_extend.stride(0), q_extend.stride(1), q_rot.stride(0), q_rot.stride(1), k_extend.stride(0),
            k_extend.stride(1), v_extend.stride(0), v_extend.stride(1), out.stride(0), out.stride(1),
            LOGIT_CAP=self.logit_cap, SPECS=self.consts, NUM_TIERS=len(self.consts), GROUP=self.group,
            GP=self.group_pad, BM=self.block_m, BN=self.block_n, D=pool.head_dim, DV=pool.v_head_dim,
            CV=self.chunk_v, PAGE=pool.page_size, USE_ASM=self.use_asm, num_warps=4, num_stages=2)
        return out


def extend_attention_fwd(q_extend, k_extend, v_extend, o_extend, pool, layer_id, qo_indptr, kv_indptr, kv_indices,
                         max_len_extend=None, sm_scale=None, logit_cap=0.0):
    """One-shot extend attention (plan + run), writing ``o_extend [N, Hq, Dv]``."""
    wrapper = TieredExtendWrapper(pool, q_extend.shape[1])
    wrapper.plan(qo_indptr, kv_indptr, kv_indices, max_len_extend, sm_scale, logit_cap)
    return wrapper.run(q_extend, k_extend, v_extend, pool, layer_id, out=o_extend)


def extend_reference(q_extend, k_extend, v_extend, pool, layer_id, qo_indptr, kv_indptr, kv_indices,
                     sm_scale=None, logit_cap=0.0) -> torch.Tensor:
    """float64 ``[N, Hq, Dv]``: per sequence, prefix (pool.read_tokens) + extend, causal in the extend."""
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q_extend.shape[-1])
    out = torch.zeros(q_extend.shape[0], q_extend.shape[1], v_extend.shape[-1], dtype=torch.float64)
    for b in range(len(qo_indptr) - 1):
        q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        slots = kv_indices[int(kv_indptr[b]):int(kv_indptr[b + 1])]
        pk, pv = gather(pool, layer_id, slots)
        k = torch.cat([pk.cpu(), k_extend[q0:q1].double().cpu()])
        v = torch.cat([pv.cpu(), v_extend[q0:q1].double().cpu()])
        out[q0:q1] = _attend(q_extend[q0:q1].double().cpu(), k, v, sm_scale, logit_cap,
                             extend_mask(len(slots), q1 - q0))[0]
    return out


def extend_mask(prefix_len: int, ext_len: int) -> torch.Tensor:
    """bool ``[E, prefix + E]``: query i sees the prefix and extend tokens 0..i."""
    causal = torch.ones(ext_len, ext_len, dtype=torch.bool).tril()
    return torch.cat([torch.ones(ext_len, prefix_len, dtype=torch.bool), causal], 1)
