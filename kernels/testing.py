"""Builders shared by the kernel tests and the benchmark: pools over a frame arena whose frames are
dealt out to the tiers, filled with known data, and sequences whose tokens sit in chosen tiers.

Frame ownership (what the allocator decides in serving) is fixed here: frame ``f`` belongs to tier
``f % (T + 1)`` of a T-tier ladder, share ``T`` being spare frames nobody owns. So the tiers share
the arena, a tier's pages are scattered over every (T+1)-th frame, and kernels that address the
wrong frame read or write another tier's bytes. ``make_pool`` fills the whole arena with
deterministic poison bytes first; only owned frames are ever written or read afterwards.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import torch

from sglang_kvc.layout import DEFAULT_FRAME_PAGES, FrameLayout, KVShape
from sglang_kvc.pool import TieredKVPool
from sglang_kvc.tiers import parse_ladder


def kernel_test_device() -> torch.device:
    """CUDA when a GPU is there and the interpreter is off, else CPU (TRITON_INTERPRET=1)."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return torch.device("cuda")
    return torch.device("cpu")


def full_size() -> bool:
    return kernel_test_device().type == "cuda"


def interleaved_layout(specs, kv_shape: KVShape, page_size: int, tokens_per_tier: int, spare: bool = True,
                       frame_pages: int = DEFAULT_FRAME_PAGES) -> FrameLayout:
    """A layout with enough frames that, dealt out by ``frame_owner``, every tier owns frames for
    at least ``tokens_per_tier`` tokens (and the spare share as many frames as a tier)."""
    specs = parse_ladder(specs) if isinstance(specs, str) else list(specs)
    probe = FrameLayout.from_frames(specs, kv_shape, page_size, 1, frame_pages)
    per_tier = max(-(-tokens_per_tier // (r * page_size)) for r in probe.pages_per_frame)
    return FrameLayout.from_frames(specs, kv_shape, page_size, per_tier * (len(specs) + int(spare)), frame_pages)


def frame_owner(layout: FrameLayout, spare: bool = True) -> torch.Tensor:
    """int64 ``[num_frames]``: the tier owning each frame (``num_tiers``: a spare frame)."""
    return torch.arange(layout.num_frames) % (layout.num_tiers + int(spare))


def tier_frames(layout: FrameLayout, tier: int, spare: bool = True) -> torch.Tensor:
    return torch.nonzero(frame_owner(layout, spare) == tier).reshape(-1)


def tier_page_ids(layout: FrameLayout, tier: int, spare: bool = True) -> torch.Tensor:
    """int64 global page ids of every page slot of the tier's own frames (frame-major)."""
    return layout.frame_page_ids(tier, tier_frames(layout, tier, spare))


def tier_slots(layout: FrameLayout, tier: int, spare: bool = True) -> torch.Tensor:
    """int64 global slots of every token of the tier's own frames."""
    pages = tier_page_ids(layout, tier, spare)
    return (pages[:, None] * layout.page_size + torch.arange(layout.page_size)).reshape(-1)


def poison(pool: TieredKVPool, seed: int = 0) -> None:
    """Fill the whole arena with deterministic random bytes (the same for any device)."""
    gen = torch.Generator().manual_seed(seed)
    pool.arena.copy_(torch.randint(0, 256, pool.arena.shape, generator=gen, dtype=torch.uint8))


def make_pool(ladder, head_dim: int, kv_heads: int, page_size: int, tokens_per_tier: int,
              layers: int = 2, device=None, ops=None, frame_pages: int = DEFAULT_FRAME_PAGES) -> TieredKVPool:
    """A pool whose arena is poisoned and dealt out by ``frame_owner``; each tier owns frames for
    at least ``tokens_per_tier`` tokens."""
    layout = interleaved_layout(ladder, KVShape(layers, kv_heads, head_dim), page_size, tokens_per_tier,
                                frame_pages=frame_pages)
    pool = TieredKVPool(layout, device=str(device or kernel_test_device()), ops=ops)
    poison(pool)
    return pool


def fill_tiers(pool: TieredKVPool, seed: int = 0, scale: float = 1.0) -> Dict[Tuple[int, int], Tuple]:
    """Quantize random K/V (bf16-representable) into every slot of every tier's own frames, directly
    with the codec (one quantization each); returns {(tier, layer): (global slots, k, v)} as written."""
    gen = torch.Generator().manual_seed(seed)
    written = {}
    for t in range(pool.layout.num_tiers):
        slots = tier_slots(pool.layout, t)
        for layer in range(pool.layer_num):
            k = (torch.randn(len(slots), pool.head_num, pool.head_dim, generator=gen) * scale).bfloat16().float()
            v = (torch.randn(len(slots), pool.head_num, pool.v_head_dim, generator=gen) * scale).bfloat16().float()
            dev = pool.tier_of_page.device
            local = pool.local_slots(t, slots).to(dev)
            pool.tiers[t].k.write(layer, local, k.to(dev))
            pool.tiers[t].v.write(layer, local, v.to(dev))
            written[(t, layer)] = (slots, k, v)
    return written


def tier_runs_sequence(pool: TieredKVPool, length: int, tiers: Sequence[int], gen: torch.Generator,
                       run_pages: int = 1) -> torch.Tensor:
    """Global slots of ``length`` tokens laid out as pages (whole pages in order, like radix-tree
    values) whose tiers cycle through ``tiers`` every ``run_pages`` pages; distinct pages drawn at
    random from the tiers' own frames (so a sequence's pages are scattered over frames)."""
    ps = pool.page_size
    pages_needed = -(-length // ps)
    chosen: Dict[int, List[int]] = {}
    slots = []
    for p in range(pages_needed):
        t = tiers[(p // run_pages) % len(tiers)]
        if t not in chosen:
            owned = tier_page_ids(pool.layout, t)
            chosen[t] = owned[torch.randperm(len(owned), generator=gen)].tolist()
        page = chosen[t].pop()
        slots.extend(range(page * ps, page * ps + ps))
    return torch.tensor(slots[:length], dtype=torch.int64)


def batch_indices(sequences: Sequence[torch.Tensor], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kv_indptr int32 ``[B+1]``, kv_indices int64) in SGLang's Triton-backend convention."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    indptr = torch.zeros(len(sequences) + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(lengths, 0)
    indices = torch.cat(list(sequences)) if sequences else torch.zeros(0, dtype=torch.int64)
    return indptr.to(device), indices.to(device)


def compile_key(kernel, *args, **kwargs) -> Tuple:
    """What Triton keys an sm_90 compile of ``kernel`` on for one launch's arguments (argument
    types, integers equal to 1 or divisible by 16, 16-byte pointer alignment, constexprs and launch
    options, as the kernel's ``do_not_specialize*`` lists allow): two launches with different keys
    compile twice. Runs on the CPU, for jit kernels and for the interpreter's stand-ins alike."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(kernel, JITFunction):  # TRITON_INTERPRET=1: keep the decorator's options
        options = {k: v for k, v in kernel.kwargs.items() if k.startswith("do_not_specialize")}
        kernel = JITFunction(kernel.fn, **options)
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
    _, specialization, options = binder(*args, **kwargs)
    return repr(specialization), repr(sorted(options.items()) if isinstance(options, dict) else options)
