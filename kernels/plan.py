"""Group each sequence's cached tokens by tier (host metadata for the attention kernels).

Attention over cached tokens does not depend on their order, so the planner sorts every
sequence's kv indices by tier (stably) and turns global slots into slots local to the tier's
buffers. A kernel then reads one tier at a time with that tier's compile-time layout. Only device
ops, no host sync: safe to call once per batch, outside CUDA-graph capture.
"""

from __future__ import annotations

import dataclasses

import torch


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
