"""The tiered paged KV pool: SGLang's KVCache interface over one arena of frames shared by every tier."""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional, Tuple

import torch
from sglang.srt.mem_cache.memory_pool import KVCache

from sglang_kvc.codec import KVC_META_DTYPE, SideCodec, TierCodec
from sglang_kvc.layout import GIB, FrameLayout, SideRegions

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SideBuffers:
    """One side (K or V) of one tier: typed, strided views of the shared arena.

    ``data``: ``[layers, frames, R, page_size, heads, X]`` (bf16 with ``X = D``, or uint8 codes with
    ``X = D*bits//8``); ``meta``: None (bf16), ``[layers, frames, R, page_size, heads, D//G, 2]``
    (per-token groups) or ``[layers, frames, R, 1, heads, D, 2]`` (per-channel keys) float16.
    ``R`` is the tier's pages per frame; local page ``p`` of the tier is ``(frame, slot) =
    (p // R, p % R)`` and local slot ``s`` is token ``s % page_size`` of local page
    ``s // page_size``. The views alias the arena: writing a tier's page overwrites whatever
    another tier kept in that frame, so only the frame's owner may write it.
    """

    codec: SideCodec
    data: torch.Tensor
    meta: Optional[torch.Tensor]
    pages_per_frame: int

    @classmethod
    def view(cls, codec: SideCodec, arena: torch.Tensor, regions: SideRegions, page_bytes: int,
             pages_per_frame: int, page_size: int, heads: int) -> "SideBuffers":
        layers, frames, frame_bytes = arena.shape
        _, _, x = codec.data_shape(page_size, heads)
        data = _arena_view(arena, codec.data_dtype, regions.data_offset, page_bytes, pages_per_frame,
                           (page_size, heads, x))
        meta = None
        meta_shape = codec.meta_shape(page_size, heads)
        if meta_shape is not None:
            meta = _arena_view(arena, KVC_META_DTYPE, regions.meta_offset, page_bytes, pages_per_frame,
                               tuple(meta_shape))
        return cls(codec, data, meta, pages_per_frame)

    def _page_index(self, local_pages: torch.Tensor):
        return local_pages // self.pages_per_frame, local_pages % self.pages_per_frame

    def _slot_index(self, local_slots: torch.Tensor):
        page_size = self.codec.page_size
        frame, slot = self._page_index(local_slots // page_size)
        return frame, slot, local_slots % page_size

    def _meta_index(self, local_slots: torch.Tensor):
        """Index of the meta rows holding the groups of the given slots (whole pages for -kc)."""
        if self.codec.per_channel:
            frame, slot = self._page_index(local_slots[:: self.codec.page_size] // self.codec.page_size)
            return frame, slot, torch.zeros_like(frame)
        return self._slot_index(local_slots)

    def write(self, layer: int, local_slots: torch.Tensor, values: torch.Tensor) -> None:
        data, meta = self.codec.quantize(values, checked=False)
        frame, slot, token = self._slot_index(local_slots)
        self.data[layer, frame, slot, token] = data
        if meta is not None:
            frame, slot, row = self._meta_index(local_slots)
            self.meta[layer, frame, slot, row] = meta

    def read(self, layer: int, local_slots: torch.Tensor, stored_basis: bool = False) -> torch.Tensor:
        frame, slot, token = self._slot_index(local_slots)
        data = self.data[layer, frame, slot, token]
        meta = None
        if self.meta is not None:
            frame, slot, row = self._meta_index(local_slots)
            meta = self.meta[layer, frame, slot, row]
        if stored_basis:
            return self.codec.dequantize_stored(data, meta)
        return self.codec.dequantize(data, meta)


def _arena_view(arena: torch.Tensor, dtype: torch.dtype, offset: int, page_bytes: int, pages_per_frame: int,
                page_shape: Tuple[int, ...]) -> torch.Tensor:
    """``[layers, frames, R, *page_shape]`` view of ``dtype`` at byte ``offset`` of every page slot."""
    layers, frames, frame_bytes = arena.shape
    size = dtype.itemsize
    typed = arena.view(dtype)
    inner = []
    stride = 1
    for dim in reversed(page_shape):
        inner.append(stride)
        stride *= dim
    strides = (frames * frame_bytes // size, frame_bytes // size, page_bytes // size) + tuple(reversed(inner))
    return torch.as_strided(typed, (layers, frames, pages_per_frame) + tuple(page_shape), strides, offset // size)


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


class MoveTimer:
    """GPU seconds spent moving pages, by kind (``requantize``, ``compaction``), from CUDA events
    read only once they have completed (``poll``): timing never waits for the device."""

    KINDS = ("requantize", "compaction")
    MAX_PENDING = 4096

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.seconds: Dict[str, float] = {kind: 0.0 for kind in self.KINDS}
        self._pending: List[Tuple[str, object, object]] = []

    def start(self):
        if not self.enabled:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, kind: str, start) -> None:
        if start is None:
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((kind, start, end))
        if len(self._pending) > self.MAX_PENDING:
            self.poll()

    def poll(self) -> Dict[str, float]:
        """Add the completed moves' times; returns the cumulative seconds per kind."""
        waiting = []
        for kind, start, end in self._pending:
            if end.query():
                self.seconds[kind] += start.elapsed_time(end) / 1000.0
            else:
                waiting.append((kind, start, end))
        self._pending = waiting
        return dict(self.seconds)


class TieredKVPool(KVCache):
    """KV pool over one arena of frames shared by every tier (FrameLayout).

    Invariants: ``arena`` is uint8 ``[layers, num_frames, frame_bytes]``; every tier's buffers are
    views of it (``SideBuffers``), so a global page of tier ``t`` is stored at its frame and slot
    (``layout``); new KV is written at the write tier (tier 0); ``move_pages`` (requantize) and
    ``copy_pages`` (compaction) are the only ways data changes place. Which tier owns a frame, and
    which slots are free, is the allocator's business, not the pool's.
    """

    def __init__(self, layout: FrameLayout, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                 enable_memory_saver: bool = False, start_layer: Optional[int] = None,
                 end_layer: Optional[int] = None, ops=None):
        shape = layout.kv_shape
        super().__init__(layout.max_tokens(0), layout.page_size, dtype, shape.num_layers, device,
                         enable_memory_saver, start_layer, end_layer)
        self.layout = layout
        self.head_num = shape.num_kv_heads
        self.head_dim = shape.head_dim
        self.v_head_dim = shape.value_head_dim
        self.ops = ops or ReferenceKVOps()
        # The stream SGLang's forward passes run on, when it differs from the one the cache moves
        # pages on (the overlap scheduler's): moves wait for it on the device, never on the host.
        self.forward_stream = None
        self.move_timer = MoveTimer(enabled=torch.device(device).type == "cuda")
        self.arena = torch.zeros((shape.num_layers, layout.num_frames, layout.frame_bytes), dtype=torch.uint8,
                                 device=device)
        self.tiers: List[TierBuffers] = []
        for t, codec in enumerate(layout.codecs):
            k_regions, v_regions, page_bytes = layout.regions[t]
            r = layout.pages_per_frame[t]
            self.tiers.append(TierBuffers(
                codec,
                SideBuffers.view(codec.k, self.arena, k_regions, page_bytes, r, layout.page_size, self.head_num),
                SideBuffers.view(codec.v, self.arena, v_regions, page_bytes, r, layout.page_size, self.head_num)))
        self.tier_of_page = layout.tier_of_page_table(device)
        self.slot_offset = torch.tensor([layout.first_page[t] * layout.page_size for t in range(layout.num_tiers)],
                                        dtype=torch.int64, device=device)
        self.mem_usage = self.arena.nbytes / GIB
        logger.info(f"Tiered KV cache is allocated. KV size: {self.mem_usage:.2f} GB, {layout.describe()}")

    # ---- index helpers ------------------------------------------------------------------
    def local_slots(self, tier: int, global_slots: torch.Tensor) -> torch.Tensor:
        return global_slots - self.layout.first_page[tier] * self.page_size

    def local_pages(self, tier: int, global_pages: torch.Tensor) -> torch.Tensor:
        return global_pages - self.layout.first_page[tier]

    def pages_to_slots(self, pages: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.page_size, device=pages.device, dtype=pages.dtype)
        return (pages[:, None] * self.page_size + offsets).reshape(-1)

    def _layer_index(self, layer, layer_id_override: Optional[int]) -> int:
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        return layer_id - self.start_layer

    def page_view(self, tier: int) -> torch.Tensor:
        """uint8 ``[layers, frames, R, page_bytes]``: the tier's page slots as raw bytes."""
        layers, frames, frame_bytes = self.arena.shape
        page_bytes = self.layout.page_bytes[tier]
        return torch.as_strided(self.arena, (layers, frames, self.layout.pages_per_frame[tier], page_bytes),
                                (frames * frame_bytes, frame_bytes, page_bytes, 1))

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
        half = self.arena.nbytes // 2
        return half, self.arena.nbytes - half

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

    def _after_running_forward(self) -> None:
        """Order the next move after the forward passes already launched (they may still read
        the frames it overwrites): a device-side wait, no host sync."""
        stream = self.forward_stream
        if stream is not None and stream != torch.cuda.current_stream():
            torch.cuda.current_stream().wait_stream(stream)

    def _before_next_forward(self) -> None:
        """Order the next forward after the move (it may write the pages the move just read)."""
        stream = self.forward_stream
        if stream is not None and stream != torch.cuda.current_stream():
            stream.wait_stream(torch.cuda.current_stream())

    def move_pages(self, src_tier: int, src_pages: torch.Tensor, dst_tier: int, dst_pages: torch.Tensor) -> None:
        """Requantize whole global pages from ``src_tier`` into ``dst_tier``, all layers at once."""
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"{len(src_pages)} source pages for {len(dst_pages)} destination pages")
        if len(src_pages) == 0:
            return
        self._after_running_forward()
        started = self.move_timer.start()
        self.ops.requantize(self, src_tier, self.local_pages(src_tier, src_pages),
                            dst_tier, self.local_pages(dst_tier, dst_pages))
        self.move_timer.stop("requantize", started)
        self._before_next_forward()  # the sources are freed next; no later write may overtake

    def copy_pages(self, tier: int, src_pages: torch.Tensor, dst_pages: torch.Tensor) -> None:
        """Copy whole global pages of one tier to other pages of the same tier (compaction), bytes
        as they are, all layers."""
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"{len(src_pages)} source pages for {len(dst_pages)} destination pages")
        if len(src_pages) == 0:
            return
        self._after_running_forward()
        started = self.move_timer.start()
        r = self.layout.pages_per_frame[tier]
        src = self.local_pages(tier, src_pages.to(self.arena.device))
        dst = self.local_pages(tier, dst_pages.to(self.arena.device))
        view = self.page_view(tier)
        view[:, dst // r, dst % r] = view[:, src // r, src % r]
        self.move_timer.stop("compaction", started)
        self._before_next_forward()
