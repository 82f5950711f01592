"""Group each sequence's cached tokens by tier (host metadata for the attention kernels).

Attention over cached tokens does not depend on their order, so the planner sorts every
sequence's kv indices by tier (stably) and turns global slots into slots local to the tier's
buffers. A kernel then reads one tier at a time with that tier's compile-time layout. Only device
ops, no host sync: safe to call once per batch, outside CUDA-graph capture.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl


@dataclasses.dataclass
class TierSegments:
    """Tokens of every (sequence, tier) pair, contiguous in ``local_slots``.

    ``local_slots``: int32 ``[N]`` slot in the tier's own buffers (global - pool.slot_offset[t]);
    ``seg_start``/``seg_len``: int32 ``[B, T]``, the run of sequence b's tier-t tokens in ``local_slots``.
    Entries of ``kv_indices`` beyond ``kv_indptr[B]`` are sorted to the end and never read.
    """

    local_slots: torch.Tensor
    seg_start: torch.Tensor
    seg_len: torch.Tensor


def plan_tier_segments(pool, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, num_seqs: int) -> TierSegments:
    """kv_indptr int32/int64 ``[B+1]``, kv_indices int32/int64 ``[>= kv_indptr[B]]`` global slots."""
    device = kv_indices.device
    num_tiers = pool.layout.num_tiers
    total = kv_indices.numel()
    positions = torch.arange(total, device=device, dtype=torch.int64)
    indptr = kv_indptr[: num_seqs + 1].to(torch.int64)
    seq = torch.searchsorted(indptr[1:], positions, right=True)  # num_seqs past the end
    live = seq < num_seqs
    slots = torch.where(live, kv_indices.to(torch.int64), 0)
    tier = pool.tier_of_page[slots // pool.page_size].to(torch.int64)
    key = torch.where(live, seq * num_tiers + tier, num_seqs * num_tiers).to(torch.int32)
    sorted_key, order = torch.sort(key, stable=True)
    local = (slots - pool.slot_offset[tier])[order].to(torch.int32)
    counts = torch.zeros(num_seqs * num_tiers + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(0, key.to(torch.int64), torch.ones_like(key))
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    shape = (num_seqs, num_tiers)
    return TierSegments(local, starts[:-1].reshape(shape).contiguous(), counts[:-1].reshape(shape).contiguous())


# index-array offsets vary per launch: one compile serves them all
@triton.jit(do_not_specialize_on_alignment=["REQ_IDX", "SEQ_LENS", "INDPTR"])
def _plan_requests_kernel(REQ_TO_TOKEN, stride_req, REQ_IDX, SEQ_LENS, INDPTR, TIER_OF_PAGE, SLOT_OFFSET,
                          LOCAL, SEG_START, SEG_LEN, PAGE: tl.constexpr, NUM_TIERS: tl.constexpr,
                          TP: tl.constexpr, BLOCK: tl.constexpr):
    """Program b: sequence b's cached tokens (row ``REQ_IDX[b]`` of ``REQ_TO_TOKEN``, ``SEQ_LENS[b]``
    of them) counted per tier, then written as local slots in tier order (stable) at
    ``INDPTR[b] + ...``: the result of ``plan_tier_segments`` without materializing kv indices."""
    b = tl.program_id(0)
    row = REQ_TO_TOKEN + tl.load(REQ_IDX + b).to(tl.int64) * stride_req
    n = tl.load(SEQ_LENS + b).to(tl.int32)
    base = tl.load(INDPTR + b).to(tl.int32)
    tiers = tl.arange(0, TP)
    counts = tl.zeros([TP], tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        slot = tl.load(row + offs, mask=mask, other=0).to(tl.int64)
        tier = tl.load(TIER_OF_PAGE + slot // PAGE, mask=mask, other=TP).to(tl.int32)
        counts += tl.sum(((tier[:, None] == tiers[None, :]) & mask[:, None]).to(tl.int32), 0)
    starts = base + tl.cumsum(counts, 0) - counts
    tmask = tiers < NUM_TIERS
    tl.store(SEG_START + b * NUM_TIERS + tiers, starts, mask=tmask)
    tl.store(SEG_LEN + b * NUM_TIERS + tiers, counts, mask=tmask)
    offsets = tl.load(SLOT_OFFSET + tiers, mask=tmask, other=0)
    running = starts
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        slot = tl.load(row + offs, mask=mask, other=0).to(tl.int64)
        tier = tl.load(TIER_OF_PAGE + slot // PAGE, mask=mask, other=TP).to(tl.int32)
        onehot = ((tier[:, None] == tiers[None, :]) & mask[:, None]).to(tl.int32)
        before = tl.cumsum(onehot, 0) - onehot  # same-tier tokens earlier in the block
        pos = tl.sum(onehot * (running[None, :] + before), 1)
        local = slot - tl.sum(onehot.to(tl.int64) * offsets[None, :], 1)
        tl.store(LOCAL + pos, local.to(tl.int32), mask=mask)
        running += tl.sum(onehot, 0)


def plan_requests(pool, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                  num_seqs: int, out: TierSegments) -> TierSegments:
    """``plan_tier_segments`` for the first ``seq_lens[b]`` tokens of rows ``req_pool_indices[b]`` of
    SGLang's ``req_to_token``, written into ``out`` (``local_slots`` holding at least the tokens, seg
    arrays ``[>= num_seqs, T]``); three launches, no host sync. Returns ``out`` cut to ``num_seqs``."""
    num_tiers = pool.layout.num_tiers
    indptr = torch.zeros(num_seqs + 1, dtype=torch.int64, device=seq_lens.device)
    torch.cumsum(seq_lens[:num_seqs], 0, out=indptr[1:])
    seg_start, seg_len = out.seg_start[:num_seqs], out.seg_len[:num_seqs]
    if num_seqs:
        _plan_requests_kernel[(num_seqs,)](
            req_to_token, req_to_token.stride(0), req_pool_indices, seq_lens, indptr, pool.tier_of_page,
            pool.slot_offset, out.local_slots, seg_start, seg_len, PAGE=pool.page_size, NUM_TIERS=num_tiers,
            TP=max(2, triton.next_power_of_2(num_tiers)), BLOCK=256, num_warps=4)
    return TierSegments(out.local_slots, seg_start, seg_len)
