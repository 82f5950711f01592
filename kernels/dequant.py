"""Dequantize cached tokens of any tiers into a contiguous bf16 K/V buffer (what extend reads).

Extend (prefill over a cached prefix) attends every new token to the whole prefix: a kernel that
unpacks the prefix inside its attention loop unpacks it once per block of queries, which costs more
than the attention. ``DequantPlan`` instead reads each prefix token's packed codes once per layer
(one launch, grid ``[token blocks, KV heads]``, every tier of the ladder in one kernel), writes
them as bf16 ``[N, Hkv, D]`` in the prefix's order, and SGLang's own Triton extend kernel then
attends over that buffer as over a bf16 pool. Keys of ``-rot`` tiers are turned back to the
original basis (the new tokens' keys are not rotated).

Reference: ``pool.read_tokens`` (float32, same values; the kernel computes ``code * scale + zero``
as the reference does, then rounds to bf16; the basis change is an fp32 dot, summed in another
order than torch's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .frame_jit import page_row_offset, slot_unit, token_offset
from .quant_jit import split_word
from .spec import FrameViews, check_tensor, hadamard_signs, layout_consts

BLOCK_TOKENS = 32


@triton.jit
def _load_side(DATA, META, unit, tok, head, S, SM, mask, BT: tl.constexpr, D: tl.constexpr,
               BITS: tl.constexpr, G: tl.constexpr, KC: tl.constexpr):
    """float32 ``[BT, D]``: the tokens' head vectors of one side of one tier, dequantized."""
    offs = tl.arange(0, D)
    if BITS == 16:
        rows = token_offset(unit, tok, head, S, 2)
        return tl.load(DATA + rows[:, None] + offs[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    else:
        P: tl.constexpr = D * BITS // 8 if BITS < 8 else D
        rows = token_offset(unit, tok, head, S, 1)
        x = tl.load(DATA + rows[:, None] + (offs % P)[None, :], mask=mask[:, None], other=0).to(tl.int32)
        code = (x >> ((offs // P) * BITS)[None, :]) & ((1 << BITS) - 1)
        if KC:
            meta_rows = page_row_offset(unit, head, SM, 4)
            w = tl.load(META + meta_rows[:, None] + offs[None, :], mask=mask[:, None], other=0)
        else:
            meta_rows = token_offset(unit, tok, head, SM, 4)
            w = tl.load(META + meta_rows[:, None] + (offs // G)[None, :], mask=mask[:, None], other=0)
        scale, zero = split_word(w)
        return code.to(tl.float32) * scale + zero


# counts and index-array offsets vary per launch: one compile serves them all (precompile.py)
@triton.jit(do_not_specialize=["n"], do_not_specialize_on_alignment=["SLOTS", "TIERS"])
def _dequant_kernel(SLOTS, TIERS, OUT_K, OUT_V, BUFS, STRIDES, HSIGN, n, s_kt, s_kh, s_vt, s_vh,
                    SPECS: tl.constexpr, NUM_TIERS: tl.constexpr, BT: tl.constexpr, D: tl.constexpr,
                    DV: tl.constexpr, PAGE: tl.constexpr):
    head = tl.program_id(1)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < n
    slot = tl.load(SLOTS + rows, mask=rmask, other=0)
    tier = tl.load(TIERS + rows, mask=rmask, other=-1)
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, D)
    offs_v = tl.arange(0, DV)
    for t in tl.static_range(NUM_TIERS):
        mask = rmask & (tier == t)
        if tl.max(mask.to(tl.int32), 0) > 0:
            unit, tok = slot_unit(slot, PAGE, SPECS[t][8], SPECS[t][9], SPECS[t][10])
            k = _load_side(BUFS[t][0], BUFS[t][1], unit, tok, head, STRIDES[t][0], STRIDES[t][1], mask, BT, D,
                           SPECS[t][0], SPECS[t][1], SPECS[t][2])
            if SPECS[t][3]:  # stored as k @ R (R = Hadamard / sqrt(D), R @ R = I): back to k
                signs = tl.load(HSIGN + offs_d[:, None] * D + offs_d[None, :])
                k = tl.dot(k, signs, input_precision="ieee") * (1.0 / (D ** 0.5))
            tl.store(OUT_K + rows64[:, None] * s_kt + head * s_kh + offs_d[None, :], k.to(tl.bfloat16),
                     mask=mask[:, None])
            v = _load_side(BUFS[t][2], BUFS[t][3], unit, tok, head, STRIDES[t][2], STRIDES[t][3], mask, BT, DV,
                           SPECS[t][5], SPECS[t][6], False)
            tl.store(OUT_V + rows64[:, None] * s_vt + head * s_vh + offs_v[None, :], v.to(tl.bfloat16),
                     mask=mask[:, None])


class DequantPlan:
    """The cached tokens of one batch, located once (``plan``), dequantized per layer (``run``).

    Invariant after ``plan(slots)``: ``local[i]`` / ``tier[i]`` locate global slot ``slots[i]``,
    and ``run`` writes token ``i``'s K/V at row ``i`` of its buffers.
    """

    def __init__(self, pool):
        self.pool = pool
        self.consts = layout_consts(pool.layout)
        self.views = FrameViews(pool)
        device = torch.device(pool.device)
        rotates = any(c.k.rotate for c in pool.layout.codecs)
        self.signs = hadamard_signs(pool.head_dim, device).float() if rotates else None
        self.local = self.tier = None

    def plan(self, slots: torch.Tensor) -> None:
        """slots: int32/int64 global slots ``[N]`` (any tiers, any order, repeats allowed)."""
        pool = self.pool
        check_tensor("slots", slots, (torch.int32, torch.int64), 1, torch.device(pool.device))
        slots = slots.to(torch.int64)
        tier = pool.tier_of_page[slots // pool.page_size].to(torch.int64)
        self.local = (slots - pool.slot_offset[tier]).to(torch.int32)
        self.tier = tier.to(torch.int32)

    def run(self, layer_id: int, out_k: torch.Tensor = None, out_v: torch.Tensor = None,
            compile_only: bool = False):
        """bf16 K ``[N, Hkv, D]`` and V ``[N, Hkv, Dv]`` of the planned tokens at layer ``layer_id``
        (``compile_only``: compile the kernel this launch needs, launch nothing: ``precompile``)."""
        pool = self.pool
        if self.local is None:
            raise RuntimeError("call plan(slots) before run()")
        layer = layer_id - pool.start_layer
        if not 0 <= layer < pool.layer_num:
            raise ValueError(f"layer_id {layer_id} is outside this pool's layers")
        n, device = self.local.numel(), torch.device(pool.device)
        if out_k is None:
            out_k = torch.empty((n, pool.head_num, pool.head_dim), dtype=torch.bfloat16, device=device)
        if out_v is None:
            out_v = torch.empty((n, pool.head_num, pool.v_head_dim), dtype=torch.bfloat16, device=device)
        if n == 0 and not compile_only:
            return out_k, out_v
        signs = self.signs if self.signs is not None else self.local
        grid = (max(1, triton.cdiv(n, BLOCK_TOKENS)), pool.head_num)
        args = (self.local, self.tier, out_k, out_v, self.views.layer(layer), self.views.strides, signs, n,
                out_k.stride(0), out_k.stride(1), out_v.stride(0), out_v.stride(1))
        constants = dict(SPECS=self.consts, NUM_TIERS=len(self.consts), BT=BLOCK_TOKENS, D=pool.head_dim,
                         DV=pool.v_head_dim, PAGE=pool.page_size, num_warps=4, enable_fp_fusion=False)
        if compile_only:
            _dequant_kernel.warmup(*args, grid=grid, **constants)
        else:
            _dequant_kernel[grid](*args, **constants)
        return out_k, out_v
