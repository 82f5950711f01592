"""A Llama forward whose attention stores K/V in a ``TieredKVPool`` and reads it back with the
project's attention kernels: the path SGLang's ``kvc_triton`` backend takes
(``patches/attention_backend.py``), outside the server.

* ``KVRunner``: one pool (one tier ladder), its tiered allocator, the extend/decode wrappers and
  the slot table of the sequences being evaluated. Per layer it writes new K/V with
  ``pool.set_kv_buffer`` (quantized on write when the write tier is quantized) and attends with
  ``TieredExtendWrapper`` / ``TieredDecodeWrapper`` (GPU) or their torch references
  ``extend_reference`` / ``decode_reference`` (CPU; small inputs only: float64, per sequence).
  ``demote_prefix`` moves whole prefix pages down the ladder with ``allocator.demote``. With
  ``sdpa=True`` (CPU, long contexts) attention reads the cache with ``pool.read_tokens`` (the
  references' dequantization) and attends in float32 with ``scaled_dot_product_attention``; the
  tests tie it to ``extend_reference``.
* ``PrefixCapture``: a stand-in runner for a prefill with no cached prefix (every K/V in flight,
  causal sdpa) that keeps each layer's K/V; ``fill_from_capture`` writes them into any runner's
  pool and demotes them, so one prefill serves every state (the K/V of a prefill do not depend on
  the tier they are stored at).
* ``TieredLlama``: embeddings, RMSNorms, projections, RoPE and MLPs are the loaded
  ``LlamaForCausalLM``'s own modules; only attention goes through the runners. With several
  runners, the first one's attention output feeds the model (the main path); the others
  ("probes") receive the same K/V and their attention outputs are only compared with the main one.

Extend semantics are SGLang's: new tokens attend to the cached prefix (read from the pool at its
tiers) and causally to each other with their in-flight bf16 K/V; decode writes the token's K/V
first and then attends over everything cached, itself included.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from benchmarks.quality.tier_states import TierState


class KVRunner:
    """One tiered pool + allocator + attention wrappers, and a batch of sequences in it.

    Invariant: ``slots[b, :lens[b]]`` are the global kv slots holding positions ``0..lens[b]-1``
    of sequence b in every layer; ``slots[b]`` is a run of whole pages, oldest first, so a page
    of a sequence is either wholly cached or holds its tail.
    """

    def __init__(self, state: TierState, kv_shape, num_q_heads: int, page_size: int, max_seqs: int,
                 max_len: int, device, use_kernels: bool, sm_scale: float, sdpa: bool = False):
        from sglang_kvc import allocator as allocator_module
        from sglang_kvc.layout import FrameLayout
        from sglang_kvc.pool import TieredKVPool

        self.state = state
        self.page_size = page_size
        self.device = torch.device(device)
        self.use_kernels = use_kernels
        self.sdpa = sdpa and not use_kernels
        self.sm_scale = sm_scale
        self.pages_per_seq = -(-max_len // page_size)
        self.max_seqs = max_seqs
        # frames enough for every tier to hold every sequence's pages (plus the padding page) in
        # frames of its own at once, plus the allocator's reserve
        pages = max_seqs * self.pages_per_seq + 1
        probe = FrameLayout.from_frames(list(state.ladder), kv_shape, page_size, 1)
        frames = sum(-(-pages // r) for r in probe.pages_per_frame)
        frames += getattr(allocator_module, "RESERVE_FRAMES", 0)
        layout = FrameLayout.from_frames(list(state.ladder), kv_shape, page_size, frames)
        ops = None
        if use_kernels:
            from sglang_kvc.kernels.ops import TritonKVOps

            ops = TritonKVOps()
        self.pool = TieredKVPool(layout, device=str(self.device), ops=ops)
        self.allocator = allocator_module.make_tiered_allocator(self.pool, device=str(self.device))
        self.extend_wrapper = self.decode_wrapper = None
        if use_kernels:
            from sglang_kvc.kernels.decode import TieredDecodeWrapper
            from sglang_kvc.kernels.extend import TieredExtendWrapper

            self.extend_wrapper = TieredExtendWrapper(self.pool, num_q_heads)
            self.decode_wrapper = TieredDecodeWrapper(self.pool, num_q_heads)
        self.slots = None
        self.lens: List[int] = []
        self._mode = None

    # ---- the batch -------------------------------------------------------------------------
    def start(self, num_seqs: int) -> None:
        """Free everything and give each of ``num_seqs`` sequences ``pages_per_seq`` write-tier pages."""
        if num_seqs > self.max_seqs:
            raise ValueError(f"{num_seqs} sequences for a runner sized for {self.max_seqs}")
        self.allocator.clear()
        need = self.pages_per_seq * self.page_size
        rows = []
        for _ in range(num_seqs):
            slots = self.allocator.alloc(need)
            if slots is None:
                raise RuntimeError(f"the write tier of {self.state.name} has no room for {need} tokens")
            rows.append(slots.to(torch.int64))
        self.slots = torch.stack(rows).to(self.device)
        self.lens = [0] * num_seqs

    def demote_prefix(self, prefix_lens: Sequence[int]) -> Dict[str, int]:
        """Move the whole pages of each sequence's first ``prefix_lens[b]`` tokens to the tiers the
        state assigns them (``TierState.page_tiers``), one tier down per ``allocator.demote`` call,
        batched over sequences; the partial last page stays at the write tier (SGLang's paged
        radix cache never caches it). Returns pages demoted per destination tier."""
        ps = self.page_size
        targets = [self.state.page_tiers(n // ps) for n in prefix_lens]
        moved = {}
        for to_tier in range(1, len(self.state.ladder)):
            picks = [(b, p) for b, tiers in enumerate(targets) for p, t in enumerate(tiers) if t >= to_tier]
            if not picks:
                continue
            index = torch.tensor([b * self.slots.shape[1] + p * ps + i for b, p in picks for i in range(ps)],
                                 dtype=torch.int64, device=self.device)
            flat = self.slots.view(-1)
            current = flat[index]
            host_pages = None if to_tier == 1 else (current[::ps] // ps).cpu().numpy()
            flat[index], _ = self.allocator.demote(current, to_tier - 1, to_tier, host_pages)
            moved[self.state.ladder[to_tier].name] = len(picks)
        return moved

    # ---- per forward -----------------------------------------------------------------------
    def _cached(self, extra: int):
        lens = [n + extra for n in self.lens]
        kv_indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
        kv_indptr[1:] = torch.cumsum(torch.tensor(lens), 0)
        parts = [self.slots[b, :n] for b, n in enumerate(lens)]
        # one padding-page slot past kv_indptr[B]: never read, keeps the tensor non-empty
        parts.append(torch.zeros(1, dtype=torch.int64, device=self.device))
        return kv_indptr.to(self.device), torch.cat(parts)

    def plan_extend(self, new_lens: Sequence[int]) -> None:
        """Next forward adds ``new_lens[b]`` tokens after each sequence's cached ones."""
        if len(new_lens) != len(self.lens):
            raise ValueError(f"{len(new_lens)} extend lengths for {len(self.lens)} sequences")
        self.loc = torch.cat([self.slots[b, n:n + m] for b, (n, m) in enumerate(zip(self.lens, new_lens))])
        qo = torch.zeros(len(new_lens) + 1, dtype=torch.int32)
        qo[1:] = torch.cumsum(torch.tensor(list(new_lens)), 0)
        self.qo_indptr = qo.to(self.device)
        self.kv_indptr, self.kv_indices = self._cached(0)
        if self.use_kernels:
            self.extend_wrapper.plan(self.qo_indptr, self.kv_indptr, self.kv_indices,
                                     max_len_extend=max(new_lens), sm_scale=self.sm_scale)
        self._mode, self._new = "extend", list(new_lens)

    def plan_decode(self) -> None:
        """Next forward adds one token per sequence and attends over all cached tokens + itself."""
        self.loc = torch.stack([self.slots[b, n] for b, n in enumerate(self.lens)])
        self.kv_indptr, self.kv_indices = self._cached(1)
        if self.use_kernels:
            self.decode_wrapper.plan(self.kv_indptr, self.kv_indices, sm_scale=self.sm_scale,
                                     num_seqs=len(self.lens))
        self._mode, self._new = "decode", [1] * len(self.lens)

    def commit(self) -> None:
        self.lens = [n + m for n, m in zip(self.lens, self._new)]
        self._mode = None

    def save(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k ``[N, Hkv, D]``, v ``[N, Hkv, Dv]`` of the planned new tokens -> pool (write tier)."""
        self.pool.set_kv_buffer(None, self.loc, k, v, layer_id_override=layer_id)

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q ``[N, Hq, D]`` (+ in-flight k/v for extend) -> ``[N, Hq, Dv]`` in q's dtype."""
        if self.sdpa and self._mode in ("extend", "decode"):
            return self._attend_sdpa(layer_id, q, k, v)
        if self._mode == "extend":
            if self.use_kernels:
                return self.extend_wrapper.run(q.contiguous(), k.contiguous(), v.contiguous(), self.pool,
                                               layer_id).to(q.dtype)
            from sglang_kvc.kernels.extend import extend_reference

            return extend_reference(q, k, v, self.pool, layer_id, self.qo_indptr.cpu(), self.kv_indptr.cpu(),
                                    self.kv_indices.cpu(), self.sm_scale).to(q.device, q.dtype)
        if self._mode == "decode":
            if self.use_kernels:
                return self.decode_wrapper.run(q.contiguous(), self.pool, layer_id).to(q.dtype)
            from sglang_kvc.kernels.decode_ref import decode_reference

            return decode_reference(q, self.pool, layer_id, self.kv_indptr.cpu(), self.kv_indices.cpu(),
                                    self.sm_scale).to(q.device, q.dtype)
        raise RuntimeError("plan_extend() or plan_decode() before the forward")

    def _attend_sdpa(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per sequence: the cache as ``pool.read_tokens`` dequantizes it (float32), plus for extend
        the in-flight k/v (causal among the new tokens), attended in float32. Decode reads the
        token itself back from the pool, as the decode references do."""
        import torch.nn.functional as F

        outs = []
        qo = 0
        for b, new in enumerate(self._new):
            start, end = int(self.kv_indptr[b]), int(self.kv_indptr[b + 1])
            ck, cv = self.pool.read_tokens(layer_id, self.kv_indices[start:end])
            qb = q[qo:qo + new].float()
            mask = None
            if self._mode == "extend":
                ck = torch.cat([ck, k[qo:qo + new].float()])
                cv = torch.cat([cv, v[qo:qo + new].float()])
                mask = _extend_mask(end - start, new, q.device)
            out = F.scaled_dot_product_attention(qb.transpose(0, 1)[None], ck.transpose(0, 1)[None],
                                                 cv.transpose(0, 1)[None], attn_mask=mask, scale=self.sm_scale,
                                                 enable_gqa=True)
            outs.append(out[0].transpose(0, 1))
            qo += new
        return torch.cat(outs).to(q.dtype)


def _extend_mask(prefix_len: int, ext_len: int, device) -> torch.Tensor:
    """bool ``[E, prefix + E]``: query i sees the whole prefix and extend tokens 0..i."""
    causal = torch.ones(ext_len, ext_len, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(ext_len, prefix_len, dtype=torch.bool, device=device), causal], 1)


class PrefixCapture:
    """A runner stand-in for one prefill with nothing cached: causal attention over the in-flight
    K/V (float32 sdpa), and each layer's K/V kept: ``k[layer]`` / ``v[layer]`` ``[N, Hkv, D]``
    float32, tokens of the planned sequences concatenated. Use with ``TieredLlama.forward`` as the
    only runner, then ``fill_from_capture`` into the runners of the states."""

    def __init__(self, num_layers: int, sm_scale: float):
        self.sm_scale = sm_scale
        self.k: List[Optional[torch.Tensor]] = [None] * num_layers
        self.v: List[Optional[torch.Tensor]] = [None] * num_layers
        self.lens: List[int] = []

    def plan_extend(self, new_lens: Sequence[int]) -> None:
        self.lens = list(new_lens)

    def save(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer_id], self.v[layer_id] = k.float().clone(), v.float().clone()

    def attend(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        outs, start = [], 0
        for n in self.lens:
            out = F.scaled_dot_product_attention(
                q[start:start + n].float().transpose(0, 1)[None], k[start:start + n].float().transpose(0, 1)[None],
                v[start:start + n].float().transpose(0, 1)[None], is_causal=True, scale=self.sm_scale,
                enable_gqa=True)
            outs.append(out[0].transpose(0, 1))
            start += n
        return torch.cat(outs).to(q.dtype)

    def commit(self) -> None:
        pass


def stored_kv(state: TierState, k: torch.Tensor, v: torch.Tensor):
    """The K/V ``state``'s pool receives: as computed, or (``store_as`` fp8_e4m3) rounded to bf16 and cast
    to float8_e4m3fn as stock SGLang's fp8 pool casts them, back in ``k``'s dtype."""
    if state.store_as is None:
        return k, v
    return tuple(x.to(torch.bfloat16).to(torch.float8_e4m3fn).to(x.dtype) for x in (k, v))


def fill_from_capture(runner: KVRunner, capture: PrefixCapture, prefix_lens: Sequence[int]) -> Dict[str, int]:
    """Start ``runner`` with one sequence per captured one and store the first ``prefix_lens[b]``
    tokens' K/V of each: written at the write tier (``set_kv_buffer``, quantized on write when that
    tier is), then demoted as the runner's state says. Returns pages demoted per tier."""
    if len(prefix_lens) != len(capture.lens) or any(p > n for p, n in zip(prefix_lens, capture.lens)):
        raise ValueError(f"prefixes {list(prefix_lens)} do not fit the captured lengths {capture.lens}")
    runner.start(len(prefix_lens))
    runner.plan_extend(prefix_lens)
    starts = [sum(capture.lens[:b]) for b in range(len(prefix_lens))]
    rows = torch.cat([torch.arange(s, s + p) for s, p in zip(starts, prefix_lens)])
    for layer_id, (k, v) in enumerate(zip(capture.k, capture.v)):
        runner.save(layer_id, *stored_kv(runner.state, k[rows], v[rows]))
    runner.commit()
    return runner.demote_prefix(prefix_lens)


class AttentionErrors:
    """Per probe and layer: sums of ||o_probe - o_main||^2 and ||o_main||^2 (float64)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.sums: Dict[str, torch.Tensor] = {}

    def add(self, name: str, layer: int, probe: torch.Tensor, main: torch.Tensor) -> None:
        sums = self.sums.setdefault(name, torch.zeros(self.num_layers, 2, dtype=torch.float64))
        diff = (probe.double() - main.double()).pow(2).sum().cpu()
        sums[layer, 0] += diff
        sums[layer, 1] += main.double().pow(2).sum().cpu()

    def relative(self) -> Dict[str, List[float]]:
        """name -> per-layer ``||o_probe - o_main|| / ||o_main||`` over all recorded tokens."""
        return {name: (s[:, 0] / s[:, 1].clamp_min(1e-300)).sqrt().tolist() for name, s in self.sums.items()}


class TieredLlama:
    """``LlamaForCausalLM`` weights, attention through ``KVRunner``s. Shapes: token-major, no batch
    axis: input_ids / positions int64 ``[N]`` (sequences concatenated in runner order)."""

    def __init__(self, hf_model):
        config = hf_model.config
        self.hf_model = hf_model
        self.config = config
        self.num_q_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.sm_scale = self.head_dim ** -0.5
        self.device = next(hf_model.parameters()).device

    def kv_shape(self):
        from sglang_kvc.layout import KVShape

        return KVShape(self.config.num_hidden_layers, self.num_kv_heads, self.head_dim)

    def runner(self, state: TierState, page_size: int, max_seqs: int, max_len: int, use_kernels: bool,
               sdpa: bool = False) -> KVRunner:
        return KVRunner(state, self.kv_shape(), self.num_q_heads, page_size, max_seqs, max_len, self.device,
                        use_kernels, self.sm_scale, sdpa)

    def capture(self) -> PrefixCapture:
        return PrefixCapture(self.config.num_hidden_layers, self.sm_scale)

    @torch.no_grad()
    def forward(self, runners: Sequence[KVRunner], input_ids: torch.Tensor, positions: torch.Tensor,
                logits_rows: Optional[torch.Tensor] = None, errors: Optional[AttentionErrors] = None
                ) -> Optional[torch.Tensor]:
        """One planned forward (every runner planned alike) -> float32 logits ``[M, vocab]`` of the
        tokens ``logits_rows`` (or None). Probes (runners[1:]) attend only when ``errors`` is given."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        model = self.hf_model.model
        n = input_ids.shape[0]
        h = model.embed_tokens(input_ids)
        cos, sin = model.rotary_emb(h, positions[None])
        cos, sin = cos[0], sin[0]
        for layer_id, layer in enumerate(model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(n, self.num_q_heads, self.head_dim)
            k = attn.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
            q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
            for runner in runners:
                runner.save(layer_id, k, v)
            out = runners[0].attend(layer_id, q, k, v)
            if errors is not None:
                for probe in runners[1:]:
                    errors.add(probe.state.name, layer_id, probe.attend(layer_id, q, k, v), out)
            h = h + attn.o_proj(out.reshape(n, self.num_q_heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        for runner in runners:
            runner.commit()
        if logits_rows is None:
            return None
        return self.hf_model.lm_head(model.norm(h[logits_rows])).float()


def ragged_positions(starts: Sequence[int], lengths: Sequence[int], device) -> torch.Tensor:
    """Concatenated ``arange(start_b, start_b + length_b)`` as int64 ``[sum(lengths)]``."""
    return torch.cat([torch.arange(s, s + n, dtype=torch.int64) for s, n in zip(starts, lengths)]).to(device)
