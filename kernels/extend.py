"""Extend (prefill) attention: new tokens attend causally to themselves and to a cached prefix
read from mixed tiers.

Conventions of SGLang's ``extend_attention_fwd``: q_extend ``[N, Hq, D]``, k_extend/v_extend
``[N, Hkv, D|Dv]`` (bf16, in flight: the new tokens' K/V, not read back from the pool),
``qo_indptr`` int32 ``[B+1]`` into them, the prefix as ``kv_indptr`` int32 ``[B+1]`` /
``kv_indices`` int64 global slots (any tiers). Query ``i`` of a sequence sees its whole prefix and
extend tokens ``0..i``.

Every query block reads the whole prefix, so the prefix is unpacked once per layer instead of once
per block: ``plan`` locates the prefix tokens (``dequant.DequantPlan``), ``run`` dequantizes them
into a bf16 buffer (one launch) and runs SGLang's own Triton extend kernel over it, as stock SGLang
does over a bf16 pool (the Triton interpreter runs both on the CPU).
Reference: ``extend_reference`` (float64, gathers the prefix with ``pool.read_tokens``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .decode_ref import _attend, gather
from .dequant import DequantPlan
from .spec import check_tensor, gqa_group


class TieredExtendWrapper:
    """Extend attention over a ``TieredKVPool``: ``plan`` once per batch, ``run`` once per layer.
    Invariant after ``plan``: ``prefix`` locates every planned prefix token, in ``kv_indices``
    order, ``stock_indices`` numbers them for the stock kernel (row ``i`` of the buffers), and
    ``prefix_k``/``prefix_v`` hold room for them (each layer's ``run`` rewrites them)."""

    def __init__(self, pool, num_qo_heads: int):
        self.pool = pool
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = pool.head_num
        gqa_group(pool, num_qo_heads)
        self.prefix = DequantPlan(pool)
        self.planned = False

    def plan(self, qo_indptr, kv_indptr, kv_indices, max_len_extend: Optional[int] = None,
             sm_scale: Optional[float] = None, logit_cap: float = 0.0, prefix_total: Optional[int] = None) -> None:
        """qo_indptr/kv_indptr int32 ``[B+1]``; kv_indices global prefix slots (``>= kv_indptr[B]``);
        max_len_extend / prefix_total: the longest extend and the prefix tokens in all (host ints;
        each computed with one sync if omitted)."""
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
        if prefix_total is None:
            prefix_total = int(kv_indptr[-1])
        self.max_len_extend = int(max_len_extend)
        self.qo_indptr = qo_indptr.to(torch.int32)
        self.kv_indptr = kv_indptr.to(torch.int32)
        self.sm_scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(self.pool.head_dim)
        self.logit_cap = float(logit_cap)
        self.prefix.plan(kv_indices[:prefix_total])
        self.stock_indices = torch.arange(prefix_total, dtype=torch.int64, device=device)
        pool = self.pool  # one bf16 prefix buffer per batch, rewritten by every layer
        self.prefix_k = torch.empty((prefix_total, pool.head_num, pool.head_dim), dtype=torch.bfloat16, device=device)
        self.prefix_v = torch.empty((prefix_total, pool.head_num, pool.v_head_dim), dtype=torch.bfloat16,
                                    device=device)
        self.planned = True

    def run(self, q_extend, k_extend, v_extend, pool, layer_id: int, out: Optional[torch.Tensor] = None):
        """q_extend ``[N, Hq, D]``, k_extend ``[N, Hkv, D]``, v_extend ``[N, Hkv, Dv]`` (bf16) ->
        out ``[N, Hq, Dv]`` bf16."""
        if not self.planned:
            raise RuntimeError("call plan(qo_indptr, kv_indptr, kv_indices, ...) before run()")
        if pool is not self.pool:
            raise ValueError("run() got a different pool than the wrapper was built for")
        device = torch.device(pool.device)
        check_tensor("q_extend", q_extend, (torch.bfloat16,), 3, device)
        check_tensor("k_extend", k_extend, (torch.bfloat16,), 3, device)
        check_tensor("v_extend", v_extend, (torch.bfloat16,), 3, device)
        n = q_extend.shape[0]
        for name, tensor, shape in (("q_extend", q_extend, (n, self.num_qo_heads, pool.head_dim)),
                                    ("k_extend", k_extend, (n, self.num_kv_heads, pool.head_dim)),
                                    ("v_extend", v_extend, (n, self.num_kv_heads, pool.v_head_dim))):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
            if tensor.stride(-1) != 1:
                raise ValueError(f"{name} must be contiguous in its last dimension")
        if out is None:
            out = torch.empty((n, self.num_qo_heads, pool.v_head_dim), dtype=torch.bfloat16, device=device)
        if n == 0 or self.max_len_extend == 0:
            return out
        if self.stock_indices.numel():
            k_prefix, v_prefix = self.prefix.run(layer_id, self.prefix_k, self.prefix_v)
        else:  # no cached prefix: the stock kernel still takes a (never read) buffer
            k_prefix = k_extend[:1]
            v_prefix = v_extend[:1]
        from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd as stock_extend

        stock_extend(q_extend, k_extend, v_extend, out, k_prefix, v_prefix, self.qo_indptr, self.kv_indptr,
                     self.stock_indices, None, True, None, self.max_len_extend, 1.0, 1.0,
                     sm_scale=self.sm_scale, logit_cap=self.logit_cap)
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
