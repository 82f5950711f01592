"""``--attention-backend kvc_triton``: attention that reads the tiered pool's mixed-precision pages.

On the GPU the Triton wrappers of ``sglang_kvc.kernels`` run (plan once per batch, run per layer);
on the CPU the same metadata feeds their torch references.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_kvc.pool import TieredKVPool

logger = logging.getLogger(__name__)


def ragged_kv_indices(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, lens: torch.Tensor,
                      total: Optional[int] = None):
    """(kv_indptr int32 ``[B+1]``, kv_indices int64 ``[sum(lens) + 1]``): the first ``lens[b]``
    slots of each request's row of ``req_to_token``, concatenated, then one padding slot (0) that
    no sequence covers, so a batch without any cached prefix never hands a kernel an empty
    (null) pointer. ``total`` (host int) avoids a sync."""
    device = req_to_token.device
    lens = lens.to(torch.int64)
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int64, device=device)
    torch.cumsum(lens, 0, out=indptr[1:])
    total = int(indptr[-1]) if total is None else int(total)
    positions = torch.arange(total, dtype=torch.int64, device=device)
    seq = torch.searchsorted(indptr[1:], positions, right=True)
    cols = positions - indptr[seq]
    indices = torch.zeros(total + 1, dtype=torch.int64, device=device)
    indices[:total] = req_to_token[req_pool_indices.to(torch.int64)[seq], cols]
    return indptr.to(torch.int32), indices


class KVCTritonAttnBackend(AttentionBackend):
    """Decode and extend attention over a TieredKVPool.

    Invariant: after ``init_forward_metadata`` (eager) or ``init_forward_metadata_out_graph``
    (before a CUDA-graph capture or replay) the wrapper of the batch's mode is planned for exactly
    that batch's kv indices, so ``forward_*`` of every layer only launches kernels. Decode CUDA
    graphs: ``init_cuda_graph_state`` reserves the decode plan's buffers for the largest captured
    batch, and every plan of a captured batch size writes into the same addresses, so a replay
    reads the current tier mix without a recapture.
    """

    def __init__(self, model_runner, use_kernels: Optional[bool] = None):
        """use_kernels: run the Triton wrappers (default: on CUDA devices; tests force them on the
        CPU under TRITON_INTERPRET=1), else their torch references."""
        super().__init__()
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, TieredKVPool):
            raise RuntimeError(
                "--attention-backend kvc_triton reads the tiered KV pool of --kv-compression; "
                "start the server with --kv-compression (e.g. bf16,k8v8,k4v2)")
        self.pool = pool
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.device = torch.device(model_runner.device)
        self.use_kernels = self.device.type == "cuda" if use_kernels is None else use_kernels
        from sglang.srt.runtime_context import get_parallel

        self.num_q_heads = model_runner.model_config.num_attention_heads // get_parallel().attn_tp_size
        self.max_context_len = model_runner.model_config.context_len
        self._order_moves_after(pool, model_runner)
        from sglang_kvc.kernels.decode import TieredDecodeWrapper, served_variant
        from sglang_kvc.kernels.extend import TieredExtendWrapper

        variant = served_variant(pool.head_dim)
        self.decode_wrapper = (TieredDecodeWrapper(pool, self.num_q_heads, variant=variant)
                               if self.use_kernels else None)
        self.extend_wrapper = TieredExtendWrapper(pool, self.num_q_heads) if self.use_kernels else None
        self.metadata = None
        if self.use_kernels:  # no Triton compile may stall the scheduler once requests arrive
            from sglang_kvc.kernels.precompile import precompile_logged

            precompile_logged(pool, logger)

    # ---- metadata -------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        mode = forward_batch.forward_mode
        bs = forward_batch.batch_size
        if mode.is_decode_or_idle():
            if self.use_kernels:  # one planning kernel over SGLang's request rows, no index list
                if bs > 0:
                    total = forward_batch.seq_lens_sum
                    if total is None:
                        total = int(forward_batch.seq_lens[:bs].sum())
                    self.decode_wrapper.plan_requests(self.req_to_token, forward_batch.req_pool_indices,
                                                      forward_batch.seq_lens, total, bs)
                self.metadata = ("decode", None, None, None, None)
                return
            kv_indptr, kv_indices = ragged_kv_indices(
                self.req_to_token, forward_batch.req_pool_indices[:bs], forward_batch.seq_lens[:bs],
                forward_batch.seq_lens_sum)
            self.metadata = ("decode", kv_indptr, kv_indices, None, None)
            return
        if mode.is_target_verify() or mode.is_draft_extend_v2():
            raise NotImplementedError("kvc_triton does not support speculative decoding")
        prefix_lens = forward_batch.extend_prefix_lens
        prefix_total = sum(forward_batch.extend_prefix_lens_cpu)
        kv_indptr, kv_indices = ragged_kv_indices(
            self.req_to_token, forward_batch.req_pool_indices, prefix_lens, prefix_total)
        qo_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=self.device)
        torch.cumsum(forward_batch.extend_seq_lens.to(torch.int32), 0, out=qo_indptr[1:])
        max_extend = max(forward_batch.extend_seq_lens_cpu) if bs else 0
        if self.use_kernels:
            self.extend_wrapper.plan(qo_indptr, kv_indptr, kv_indices, max_len_extend=max_extend,
                                     prefix_total=prefix_total)
        self.metadata = ("extend", kv_indptr, kv_indices, qo_indptr, max_extend)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        """Decode graphs: one batch of up to ``max_bs`` sequences, each up to the context length."""
        if self.use_kernels:
            self.decode_wrapper.reserve(max_bs, max_bs * self.max_context_len + 1)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Before a decode graph's capture or replay: plan into the reserved buffers (the batch
        is already padded to the captured size, padded rows hold seq_len 1 at request slot 0)."""
        if not forward_batch.forward_mode.is_decode_or_idle():
            raise NotImplementedError("kvc_triton captures decode CUDA graphs only; prefill graphs "
                                      "must be breakable (attention runs eagerly between segments)")
        self.init_forward_metadata(forward_batch)

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    @staticmethod
    def _order_moves_after(pool: TieredKVPool, model_runner) -> None:
        """Demotion and compaction run on the scheduler's stream; the forward that may still read
        the pages they overwrite runs on the model runner's: the pool orders them on the device."""
        stream = getattr(model_runner, "forward_stream", None)
        if stream is not None and torch.device(model_runner.device).type == "cuda":
            pool.forward_stream = stream

    # ---- forward --------------------------------------------------------------------------
    def _save(self, layer, forward_batch, k, v, save_kv_cache: bool) -> None:
        if save_kv_cache and k is not None:
            self.pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k.view(-1, layer.tp_k_head_num, layer.qk_head_dim),
                                    v.view(-1, layer.tp_v_head_num, layer.v_head_dim), layer.k_scale, layer.v_scale)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self._save(layer, forward_batch, k, v, save_kv_cache)
        _, kv_indptr, kv_indices, _, _ = self.metadata
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        if self.use_kernels:
            wrapper = self.decode_wrapper
            wrapper.sm_scale, wrapper.logit_cap = layer.scaling, float(layer.logit_cap or 0.0)
            out = wrapper.run(q3.contiguous(), self.pool, layer.layer_id)
        else:
            from sglang_kvc.kernels.decode_ref import decode_reference

            out = decode_reference(q3, self.pool, layer.layer_id, kv_indptr, kv_indices, layer.scaling,
                                   float(layer.logit_cap or 0.0))
        return out.to(q.dtype).reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self._save(layer, forward_batch, k, v, save_kv_cache)
        _, kv_indptr, kv_indices, qo_indptr, _ = self.metadata
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        k3 = k.reshape(-1, layer.tp_k_head_num, layer.qk_head_dim)
        v3 = v.reshape(-1, layer.tp_v_head_num, layer.v_head_dim)
        if self.use_kernels:
            wrapper = self.extend_wrapper
            wrapper.sm_scale, wrapper.logit_cap = layer.scaling, float(layer.logit_cap or 0.0)
            out = wrapper.run(q3.contiguous(), k3.contiguous(), v3.contiguous(), self.pool, layer.layer_id)
        else:
            from sglang_kvc.kernels.extend import extend_reference

            out = extend_reference(q3, k3, v3, self.pool, layer.layer_id, qo_indptr, kv_indptr, kv_indices,
                                   layer.scaling, float(layer.logit_cap or 0.0))
        return out.to(q.dtype).reshape(-1, layer.tp_q_head_num * layer.v_head_dim)


def create_kvc_triton_backend(model_runner) -> KVCTritonAttnBackend:
    return KVCTritonAttnBackend(model_runner)
