"""Plain-torch references for the attention kernels (decode and extend) and their error bounds.

The references gather the cache with ``pool.read_tokens`` (dequantized, float32) and compute
softmax attention in float64. Two bounds, per output element:

* ``rounding_bound``: what the Triton kernels may differ from the reference on the *same* stored
  cache: bf16 rounding of dot operands (rotated queries, ``-kc`` keys, probabilities times scales:
  unit roundoff ``2^-8``; variant ``f16`` rounds ``-kc`` keys to fp16 instead, within the same
  bound but for fp16's subnormal range, see ``rounding_bound``), float32 accumulation (``gamma_n = n * 2^-24`` per sum of n terms) of
  dots whose codes carry the kernels' +128 offset (x17 for 8-bit codes read as two 4-bit
  planes), the softmax denominator, and the output's bf16 rounding.
* ``quantization_bound``: what attention on the dequantized cache may differ from attention on
  the unquantized K/V, from the codec's per-element bounds ``e_k`` (stored basis) and ``e_v``.
  With logit errors ``|d_n| <= delta = sm_scale * max_n sum_d |q~_d| e_k[n, d]`` (``q~`` = q in the
  keys' stored basis), every normalized probability moves by a factor within ``exp(+-2 delta)``,
  so ``|o' - o| <= exp(2 delta) * sum_n p_n e_v[n] + (exp(2 delta) - 1) * range_n(v) / 2``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from sglang_kvc.codec import hadamard

BF16_U = 2.0 ** -8  # unit roundoff of bf16 (8 significant bits)
FP32_U = 2.0 ** -24
FP16_TINY = 2.0 ** -25  # largest fp16 rounding error below its normal range (half of 2^-24)


def code_offset(bits: int) -> float:
    """Largest ``code + offset`` a kernel dot operand carries for a side of ``bits`` bits."""
    if bits == 16:
        return 0.0
    return 128.0 * 17 + 255 if bits == 8 else 128.0 + (1 << bits) - 1


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, logit_cap: float,
            mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """q ``[M, Hq, D]``, k ``[N, Hkv, D]``, v ``[N, Hkv, Dv]`` (float64) -> (out ``[M, Hq, Dv]``,
    probabilities ``[M, Hq, N]``); mask bool ``[M, N]`` (True = attend)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    scores = torch.einsum("mhd,nhd->mhn", q, k) * sm_scale
    if logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    probs = torch.softmax(scores, -1)
    return torch.einsum("mhn,nhd->mhd", probs, v), probs


def read_side(side_buf, layer: int, local: torch.Tensor, stored_basis: bool = False) -> torch.Tensor:
    """``SideBuffers.read`` for any local slots: per-channel (-kc) sides are read by whole pages
    (what their meta needs) and the wanted tokens picked out."""
    codec = side_buf.codec
    local = local.to(side_buf.data.device)
    if not codec.per_channel:
        return side_buf.read(layer, local, stored_basis)
    ps = codec.page_size
    whole = ((local // ps)[:, None] * ps + torch.arange(ps, device=local.device)).reshape(-1)
    values = side_buf.read(layer, whole, stored_basis)
    return values.view(len(local), ps, *values.shape[1:])[torch.arange(len(local)), (local % ps).cpu()]


def meta_rows(side_buf, layer: int, local: torch.Tensor) -> torch.Tensor:
    """fp16 (scale, zero) of each local slot's groups, ``[n, H, groups, 2]``: the token's own row,
    or for -kc its page's row (``[n, H, D, 2]``), looked up in the tier's frames."""
    ps, r = side_buf.codec.page_size, side_buf.pages_per_frame
    page = local // ps
    token = torch.zeros_like(local) if side_buf.codec.per_channel else local % ps
    return side_buf.meta[layer, page // r, page % r, token]


def gather(pool, layer_id: int, slots: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K, V (float64, on the CPU, original basis) of global ``slots``, mixed tiers."""
    layer = layer_id - pool.start_layer
    slots = slots.cpu().to(torch.int64)
    tiers = pool.layout.tier_of_slots(slots)
    out_k = torch.zeros(len(slots), pool.head_num, pool.head_dim, dtype=torch.float64)
    out_v = torch.zeros(len(slots), pool.head_num, pool.v_head_dim, dtype=torch.float64)
    for t, buffers in enumerate(pool.tiers):
        mask = tiers == t
        if bool(mask.any()):
            local = pool.local_slots(t, slots[mask])
            out_k[mask] = read_side(buffers.k, layer, local).double().cpu()
            out_v[mask] = read_side(buffers.v, layer, local).double().cpu()
    return out_k, out_v


def decode_reference(q, pool, layer_id, kv_indptr, kv_indices, sm_scale=None, logit_cap=0.0) -> torch.Tensor:
    """q ``[B, Hq, D]`` -> float64 ``[B, Hq, Dv]``: softmax attention over each sequence's cache."""
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    outs = []
    for b in range(q.shape[0]):
        slots = kv_indices[int(kv_indptr[b]):int(kv_indptr[b + 1])]
        k, v = gather(pool, layer_id, slots)
        outs.append(_attend(q[b:b + 1].double().cpu(), k, v, sm_scale, logit_cap)[0][0])
    return torch.stack(outs)


def _side_terms(pool, layer_id: int, slots: torch.Tensor, side: str):
    """Per token of ``slots``: stored-basis values, scale and |zero| per element, and flags
    (rotated, per-channel: dequantized, then rounded) as float64 ``[n, H, D]`` / bool ``[n]``."""
    layer = layer_id - pool.start_layer
    tiers = pool.layout.tier_of_slots(slots)
    n, heads = len(slots), pool.head_num
    dim = pool.head_dim if side == "k" else pool.v_head_dim
    stored = torch.zeros(n, heads, dim, dtype=torch.float64)
    step = torch.zeros_like(stored)
    zero = torch.zeros_like(stored)
    rotated = torch.zeros(n, dtype=torch.bool)
    per_channel = torch.zeros(n, dtype=torch.bool)
    offset = torch.zeros(n, dtype=torch.float64)
    for t, buffers in enumerate(pool.tiers):
        mask = tiers == t
        if not bool(mask.any()):
            continue
        side_buf = getattr(buffers, side)
        local = pool.local_slots(t, slots[mask]).to(side_buf.data.device)
        stored[mask] = read_side(side_buf, layer, local, stored_basis=True).double().cpu()
        codec = side_buf.codec
        if codec.bits == 16:
            continue
        meta = meta_rows(side_buf, layer, local).double().cpu()
        if not codec.per_channel:
            meta = meta.repeat_interleave(codec.group_size, 2)
        step[mask], zero[mask] = meta[..., 0], meta[..., 1].abs()
        rotated[mask] = codec.rotate
        per_channel[mask] = codec.per_channel
        offset[mask] = 0.0 if codec.per_channel else code_offset(codec.bits)
    return stored, step, zero, rotated, per_channel, offset


def _softmax_bound(probs, v, delta, v_terms):
    """probs ``[M, Hq, N]``, v ``[N, Hq, Dv]``, delta ``[M, Hq]``, v_terms ``[N, Hq, Dv]``."""
    grow = torch.exp(2 * delta)[..., None]
    spread = (v.amax(0) - v.amin(0))[None] / 2 if v.shape[0] else torch.zeros_like(v[:1])
    return grow * torch.einsum("mhn,nhd->mhd", probs, v_terms) + (grow - 1) * spread


def rounding_bound(q, pool, layer_id, slots, sm_scale, logit_cap=0.0, mask=None, extra_k=None, extra_v=None,
                   rows_per_step: int = 8):
    """Bound on |kernel - reference| for query rows q ``[M, Hq, D]`` over cached ``slots`` (+ optional
    in-flight bf16 ``extra_k/extra_v`` ``[E, Hkv, D]`` appended after them), mask ``[M, N]``.

    Logit of token n (before ``sm_scale``): the kernel dots operands ``q^ = q (1 + e_q)`` and
    ``k^ = k (1 + e_k) + t_k`` with ``|e_q| <= u`` when the query is rotated (a float32 product
    rounded to bf16, ``u = 2^-8``), else 0, and for ``-kc`` keys (dequantized, then rounded)
    ``|e_k| <= u``: bf16 in the default kernel; fp16 in variant ``f16`` (``2^-11 <= u``, one
    rounding of the fused ``c * scale + zero``) but for keys below fp16's normal range, where
    ``|t_k| <= FP16_TINY`` absolute; the same holds for the fp16 query there (bf16 -> fp16 exact
    above ``2^-17``, else ``|t_q| <= FP16_TINY``). So with ``r`` roundings (0, 1 or 2):
    ``|q^ k^ - q k| <= ((1 + u)^r - 1) |q| |k| + FP16_TINY (1 + u) (|q| + |k^|)`` per element, the
    tiny term for ``-kc`` tokens only, summed over d, plus float32 accumulation (``gamma_k``)."""
    parts = []
    for r in range(0, max(q.shape[0], 1), rows_per_step):
        sub_mask = None if mask is None else mask[r:r + rows_per_step]
        parts.append(_rounding_bound_rows(q[r:r + rows_per_step], pool, layer_id, slots, sm_scale, logit_cap,
                                          sub_mask, extra_k, extra_v))
    return torch.cat(parts)


def _rounding_bound_rows(q, pool, layer_id, slots, sm_scale, logit_cap, mask, extra_k, extra_v):
    q = q.double().cpu()
    group = q.shape[1] // pool.head_num
    k, k_step, k_zero, rot, k_channel, k_off = _side_terms(pool, layer_id, slots.cpu(), "k")
    v, v_step, v_zero, _, _, v_off = _side_terms(pool, layer_id, slots.cpu(), "v")
    k_orig, _ = gather(pool, layer_id, slots)
    if extra_k is not None:
        ek, ev = extra_k.double().cpu(), extra_v.double().cpu()
        k, v, k_orig = torch.cat([k, ek]), torch.cat([v, ev]), torch.cat([k_orig, ek])
        k_step, v_step = torch.cat([k_step, torch.zeros_like(ek)]), torch.cat([v_step, torch.zeros_like(ev)])
        k_zero, v_zero = torch.cat([k_zero, torch.zeros_like(ek)]), torch.cat([v_zero, torch.zeros_like(ev)])
        none = torch.zeros(len(ek), dtype=torch.bool)
        rot, k_channel = torch.cat([rot, none]), torch.cat([k_channel, none])
        k_off, v_off = torch.cat([k_off, none.double()]), torch.cat([v_off, none.double()])
    expand = lambda x: x.repeat_interleave(group, 1)  # noqa: E731
    k, k_step, k_zero, v, v_step, v_zero = map(expand, (k, k_step, k_zero, v, v_step, v_zero))
    q_rot = q @ hadamard(q.shape[-1]).double()
    q_used = torch.where(rot[None, :, None, None], q_rot[:, None], q[:, None])  # [M, N, Hq, D]
    dot_abs = (q_used.abs() * k.abs()[None]).sum(-1)  # [M, N, Hq]
    gamma_k = (q.shape[-1] + 4) * FP32_U
    slack = gamma_k * (q_used.abs() * (k.abs() + k_off[:, None, None] * k_step)[None]).sum(-1)
    roundings = rot.double() + k_channel.double()  # rotated query, -kc key (bf16, or fp16 in variant f16)
    slack = slack + ((1 + BF16_U) ** roundings - 1)[None, :, None] * dot_abs
    tiny = FP16_TINY * (1 + BF16_U) * (q_used.abs().sum(-1) + (k.abs() * (1 + BF16_U)).sum(-1)[None])
    slack = slack + tiny * k_channel[None, :, None]
    delta = sm_scale * slack
    if mask is not None:
        delta = delta.masked_fill(~mask[:, :, None], 0.0)
    delta = delta.amax(1) if delta.shape[1] else torch.zeros(q.shape[:2], dtype=torch.float64)
    out, probs = _attend(q, k_orig, v[:, ::group], sm_scale, logit_cap, mask)
    gamma_n = (k.shape[0] + 68) * FP32_U
    v_terms = BF16_U * (v.abs() + v_zero) + gamma_n * (v.abs() + v_off[:, None, None] * v_step)
    return _softmax_bound(probs, v, delta, v_terms) + (BF16_U + 2 * gamma_n) * out.abs() + 1e-6


def quantization_bound(q, k_true, v_true, k_err, v_err, rotated, sm_scale, logit_cap=0.0, mask=None):
    """Bound on |attention(dequantized) - attention(unquantized)| for rows q ``[M, Hq, D]`` and
    original k_true/v_true ``[N, Hkv, D]`` with per-element codec bounds k_err (stored basis) and
    v_err; rotated bool ``[N]`` marks keys stored in the Hadamard basis."""
    q = q.double().cpu()
    group = q.shape[1] // k_true.shape[1]
    k_err = k_err.double().cpu().repeat_interleave(group, 1)
    v_err = v_err.double().cpu().repeat_interleave(group, 1)
    q_rot = q @ hadamard(q.shape[-1]).double()
    q_used = torch.where(rotated.cpu()[None, :, None, None], q_rot[:, None], q[:, None])
    delta = sm_scale * (q_used.abs() * k_err[None]).sum(-1)
    if mask is not None:
        delta = delta.masked_fill(~mask[:, :, None], 0.0)
    delta = delta.amax(1)
    out, probs = _attend(q, k_true.double().cpu(), v_true.double().cpu(), sm_scale, logit_cap, mask)
    v = v_true.double().cpu().repeat_interleave(group, 1)
    return _softmax_bound(probs, v, delta, v_err)


def per_sequence(kv_indptr, kv_indices) -> List[torch.Tensor]:
    return [kv_indices[int(kv_indptr[b]):int(kv_indptr[b + 1])] for b in range(len(kv_indptr) - 1)]
