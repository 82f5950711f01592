"""The tiered paged KV pool: SGLang's KVCache interface over per-tier packed buffers."""

from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional, Tuple

import torch
from sglang.srt.mem_cache.memory_pool import KVCache

from sglang_kvc.codec import SideCodec, TierCodec
from sglang_kvc.layout import GIB, TierLayout

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SideBuffers:
    """One side (K or V) of one tier, stacked over layers.

    ``data``: ``[layers, slots, heads, D]`` bf16 or ``[layers, slots, heads, D*bits//8]`` uint8;
    ``meta``: None (bf16), ``[layers, slots, heads, D//G, 2]`` (per-token groups) or
    ``[layers, pages, heads, D, 2]`` (per-channel keys) float16. Slots and pages are local to the
    tier: global slot ``s`` is local slot ``s - layout.storage_first_page(t) * page_size``.
    """

    codec: SideCodec
    data: torch.Tensor
    meta: Optional[torch.Tensor]

    @classmethod
    def allocate(cls, codec: SideCodec, layers: int, slots: int, heads: int, device) -> "SideBuffers":
        data = torch.zeros((layers,) + codec.data_shape(slots, heads), dtype=codec.data_dtype, device=device)
        meta_shape = codec.meta_shape(slots, heads)
        meta = None if meta_shape is None else torch.zeros((layers,) + meta_shape, dtype=torch.float16,
                                                           device=device)
        return cls(codec, data, meta)

    def nbytes(self) -> int:
        return self.data.nbytes + (self.meta.nbytes if self.meta is not None else 0)

    def meta_rows(self, local_slots: torch.Tensor) -> torch.Tensor:
        """Rows of ``meta`` that hold the groups of the given local slots (whole pages for -kc)."""
        if self.codec.per_channel:
            return local_slots[:: self.codec.page_size] // self.codec.page_size
        return local_slots

    def write(self, layer: int, local_slots: torch.Tensor, values: torch.Tensor) -> None:
        data, meta = self.codec.quantize(values, checked=False)
        self.data[layer, local_slots] = data
        if meta is not None:
            self.meta[layer, self.meta_rows(local_slots)] = meta

    def read(self, layer: int, local_slots: torch.Tensor, stored_basis: bool = False) -> torch.Tensor:
        data = self.data[layer, local_slots]
        meta = None if self.meta is None else self.meta[layer, self.meta_rows(local_slots)]
        if stored_basis:
            return self.codec.dequantize_stored(data, meta)
        return self.codec.dequantize(data, meta)


@dataclasses.dataclass
class TierBuffers:
    codec: TierCodec
    k: SideBuffers
    v: SideBuffers


class ReferenceKVOps:
    """Quantize-on-write and page requantization in plain torch (the kernels' reference)."""

    name = "torch-reference"

    def write(self, pool: "TieredKVPool", tier: int, layer: int, local_slots, cache_k, cache_v) -> None:
        buffers = pool.tiers[tier]
        buffers.k.write(layer, local_slots, cache_k)
        buffers.v.write(layer, local_slots, cache_v)

    def requantize(self, pool: "TieredKVPool", src_tier: int, src_local_pages: torch.Tensor,
                   dst_tier: int, dst_local_pages: torch.Tensor) -> None:
        src, dst = pool.tiers[src_tier], pool.tiers[dst_tier]
        src_slots = pool.pages_to_slots(src_local_pages)
        dst_slots = pool.pages_to_slots(dst_local_pages)
        for layer in range(pool.layer_num):
            dst.k.write(layer, dst_slots, src.k.read(layer, src_slots))
            dst.v.write(layer, dst_slots, src.v.read(layer, src_slots))


class TieredKVPool(KVCache):
    """KV pool whose index space is split into tiers of different precision (TierLayout).

    Invariant: every global slot of tier ``t`` is stored in ``tiers[t]`` at its local slot; new
    KV is written at the write tier (tier 0); ``move_pages`` is the only way data changes tier.
    Slot ownership (free or not) is the allocator's business, not the pool's.
    """

    def __init__(self, layout: TierLayout, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                 enable_memory_saver: bool = False, start_layer: Optional[int] = None,
                 end_layer: Optional[int] = None, ops=None):
        shape = layout.kv_shape
        super().__init__(layout.total_capacity_tokens, layout.page_size, dtype, shape.num_layers, device,
                         enable_memory_saver, start_layer, end_layer)
        self.layout = layout
        self.head_num = shape.num_kv_heads
        self.head_dim = shape.head_dim
        self.v_head_dim = shape.value_head_dim
        self.ops = ops or ReferenceKVOps()
        # With SGLang's overlap scheduler the previous batch may still read pages on another
        # stream while the scheduler demotes; the serving hook sets this to order them.
        self.sync_before_move = False
        self.tiers: List[TierBuffers] = []
        for t, codec in enumerate(layout.codecs):
            slots = layout.storage_slots(t)
            self.tiers.append(TierBuffers(
                codec,
                SideBuffers.allocate(codec.k, shape.num_layers, slots, self.head_num, device),
                SideBuffers.allocate(codec.v, shape.num_layers, slots, self.head_num, device)))
        self.tier_of_page = layout.tier_of_page_table(device)
        self.slot_offset = torch.tensor(
            [layout.storage_first_page(t) * layout.page_size for t in range(layout.num_tiers)],
            dtype=torch.int64, device=device)
        k_bytes, v_bytes = self.get_kv_size_bytes()
        self.mem_usage = (k_bytes + v_bytes) / GIB
        logger.info(
            f"Tiered KV cache is allocated. #tokens: {layout.total_capacity_tokens}, "
            f"KV size: {self.mem_usage:.2f} GB, tiers: {layout.describe()}")

    # ---- index helpers ------------------------------------------------------------------
    def local_slots(self, tier: int, global_slots: torch.Tensor) -> torch.Tensor:
        return global_slots - self.layout.storage_first_page(tier) * self.page_size

    def local_pages(self, tier: int, global_pages: torch.Tensor) -> torch.Tensor:
        return global_pages - self.layout.storage_first_page(tier)

    def pages_to_slots(self, pages: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.page_size, device=pages.device, dtype=pages.dtype)
        return (pages[:, None] * self.page_size + offsets).reshape(-1)

    def _layer_index(self, layer, layer_id_override: Optional[int]) -> int:
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        return layer_id - self.start_layer

    # ---- SGLang's KVCache interface -----------------------------------------------------
    def set_kv_buffer(self, layer, loc, cache_k: torch.Tensor, cache_v: torch.Tensor,
                      k_scale: Optional[float] = None, v_scale: Optional[float] = None,
                      layer_id_override: Optional[int] = None, **unused) -> None:
        """Write new tokens at write-tier slots ``loc``; quantized on write when the tier is."""
        if hasattr(loc, "loc"):  # SGLang's KVWriteLoc
            loc = loc.loc
        if k_scale is not None:
            cache_k = cache_k / k_scale
        if v_scale is not None:
            cache_v = cache_v / v_scale
        self.ops.write(self, 0, self._layer_index(layer, layer_id_override), loc, cache_k, cache_v)

    def _unsupported_plain_read(self, *args, **kwargs):
        raise NotImplementedError(
            "the tiered KV pool stores packed mixed-precision pages and has no plain K/V buffer; "
            "use --attention-backend kvc_triton (or read_tokens for tests)")

    get_key_buffer = _unsupported_plain_read
    get_value_buffer = _unsupported_plain_read
    get_kv_buffer = _unsupported_plain_read

    def get_kv_size_bytes(self) -> Tuple[int, int]:
        return (sum(t.k.nbytes() for t in self.tiers), sum(t.v.nbytes() for t in self.tiers))

    # ---- tiered operations --------------------------------------------------------------
    def read_tokens(self, layer_id: int, slots: torch.Tensor, stored_basis: bool = False
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dequantized K and V (float32 ``[n, heads, D]``) of any global slots, mixed tiers allowed.

        Slots of per-channel tiers must come in whole pages (as radix-tree values do).
        """
        layer = layer_id - self.start_layer
        out_k = torch.empty((len(slots), self.head_num, self.head_dim), device=slots.device)
        out_v = torch.empty((len(slots), self.head_num, self.v_head_dim), device=slots.device)
        tiers = self.layout.tier_of_slots(slots)
        for t, buffers in enumerate(self.tiers):
            mask = tiers == t
            if not bool(mask.any()):
                continue
            local = self.local_slots(t, slots[mask])
            out_k[mask] = buffers.k.read(layer, local, stored_basis)
            out_v[mask] = buffers.v.read(layer, local, stored_basis)
        return out_k, out_v

    def move_pages(self, src_tier: int, src_pages: torch.Tensor, dst_tier: int, dst_pages: torch.Tensor) -> None:
        """Requantize whole global pages from ``src_tier`` into ``dst_tier``, all layers at once."""
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"{len(src_pages)} source pages for {len(dst_pages)} destination pages")
        if len(src_pages) == 0:
            return
        if self.sync_before_move and torch.device(self.device).type == "cuda":
            torch.cuda.synchronize()
        self.ops.requantize(self, src_tier, self.local_pages(src_tier, src_pages),
                            dst_tier, self.local_pages(dst_tier, dst_pages))
