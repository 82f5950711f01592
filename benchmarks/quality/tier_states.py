"""The cache states the quality benchmark compares: one tier for every cached page, or a demoted ladder.

A state names the pool's ladder (write tier first) and where each cached prefix page ends up:

* ``bf16``, ``k8v8``, ``k4v2-rot`` ...: every prefix page at that tier. Tiers that can be the write
  tier are filled by quantize-on-write (``set_kv_buffer`` at a one-tier pool); ``-kc`` tiers (never
  a write tier: keys are grouped over a whole page) sit below a bf16 write tier and are filled by
  ``allocator.demote`` (requantize whole pages), as demotion does. ``write_path="demote"`` sends
  every quantized tier through demotion instead.
* ``ladder:bf16,k8v8,k4v2``: the prefix pages split into as many equal runs as the ladder has
  tiers, oldest run in the last tier: written at the write tier, then demoted one tier at a time
  (oldest two thirds to k8v8, then the oldest third on to k4v2), as the cache leaves a cold prefix.
* ``fp8_e4m3``: stock SGLang's ``--kv-cache-dtype fp8_e4m3`` (the quality users accept from fp8, the
  mission's bar): the prefix's K/V rounded to bf16, cast to float8_e4m3fn as SGLang's pool casts
  them (no scale), held exactly in a bf16 pool.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

from sglang_kvc.tiers import TierSpec, parse_ladder, parse_tier

LADDER_PREFIX = "ladder:"
FP8_STATE = "fp8_e4m3"
SCHEMES = ("k8v8", "k4v4", "k4v2", "k2v2")
VARIANTS = ("", "-rot", "-kc", "-kc-rot")  # plain, rotated keys, per-channel keys, both
DEFAULT_TIERS = ("bf16",) + tuple(s + v for s in SCHEMES for v in VARIANTS)
DEFAULT_LADDERS = ("bf16,k8v8,k4v2", "bf16,k8v8-rot,k4v2-rot")


@dataclasses.dataclass(frozen=True)
class TierState:
    """ladder: the pool's tiers (write tier first); runs: for each of ``len(runs)`` equal runs of a
    sequence's prefix pages, oldest first, the tier index it ends in (a non-increasing tuple);
    store_as: a dtype the K/V pass through before the pool stores them (``FP8_STATE``), else None."""

    name: str
    ladder: Tuple[TierSpec, ...]
    runs: Tuple[int, ...]
    store_as: Optional[str] = None

    @property
    def demotes(self) -> bool:
        return any(t > 0 for t in self.runs)

    def page_tiers(self, num_pages: int) -> List[int]:
        """Target tier of each of ``num_pages`` prefix pages, oldest first."""
        k = len(self.runs)
        return [self.runs[min(k - 1, p * k // max(num_pages, 1))] for p in range(num_pages)]

    def bits_per_element(self, head_dim: int, page_size: int) -> float:
        """Mean stored bits per K/V element (scales and zeros included) over the runs."""
        from sglang_kvc.codec import TierCodec

        if self.store_as == FP8_STATE:
            return 8.0
        bits = []
        for t in self.runs:
            codec = TierCodec(self.ladder[t], head_dim, page_size)
            bits.append(8 * (codec.k.bytes_per_token_head() + codec.v.bytes_per_token_head()) / (2 * head_dim))
        return sum(bits) / len(bits)


def make_state(name: str, write_path: str = "quantize") -> TierState:
    """``k4v2-rot`` -> a single-tier state; ``ladder:bf16,k8v8,k4v2`` -> a demoted ladder;
    ``fp8_e4m3`` -> stock SGLang's fp8 KV."""
    if name == FP8_STATE:
        return TierState(FP8_STATE, (parse_tier("bf16"),), (0,), store_as=FP8_STATE)
    if name.startswith(LADDER_PREFIX):
        ladder = parse_ladder(name[len(LADDER_PREFIX):])
        name = LADDER_PREFIX + ",".join(s.name for s in ladder)
        return TierState(name, ladder, tuple(range(len(ladder) - 1, -1, -1)))
    spec = parse_tier(name)
    if not spec.is_quantized:
        return TierState("bf16", (spec,), (0,))
    if spec.key_grouping == "channel" or write_path == "demote":
        return TierState(spec.name, (parse_tier("bf16"), spec), (1,))
    return TierState(spec.name, (spec,), (0,))


def make_states(tiers: Sequence[str], ladders: Sequence[str], write_path: str = "quantize") -> List[TierState]:
    """bf16 first (every comparison is against it), then the tiers, then the ladders; no duplicates."""
    states, seen = [], set()
    for name in ["bf16", *tiers, *(LADDER_PREFIX + ladder for ladder in ladders)]:
        state = make_state(name, write_path)
        if state.name not in seen:
            seen.add(state.name)
            states.append(state)
    return states
