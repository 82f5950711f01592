"""The one frozen configuration of sglang-kvc, built from the flags and validated once."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from sglang_kvc.demotion_gate import MIN_YIELD
from sglang_kvc.layout import DEFAULT_FRAME_PAGES, FrameLayout, KVShape
from sglang_kvc.policy import POLICIES
from sglang_kvc.tiers import TierSpec, TierSpecError, parse_ladder

DEFAULT_WATERMARK = 0.02


@dataclasses.dataclass(frozen=True)
class KVCConfig:
    """A validated compression setup. Invariant: ``ladder`` goes down in bits and its first tier is
    the write tier; ``frame_pages`` >= 1; ``watermark`` in [0, 0.5); ``min_demotion_yield`` >= 0."""

    ladder: Tuple[TierSpec, ...]
    policy: str = "lru"
    min_hit_bits: float = 0.0
    frame_pages: int = DEFAULT_FRAME_PAGES
    watermark: float = DEFAULT_WATERMARK
    min_demotion_yield: float = MIN_YIELD

    @classmethod
    def parse(cls, kv_compression: str, write_tier: Optional[str] = None, policy: str = "lru",
              min_hit_bits: float = 0.0, rotate_keys: bool = False, frame_pages: int = DEFAULT_FRAME_PAGES,
              watermark: float = DEFAULT_WATERMARK, min_demotion_yield: float = MIN_YIELD) -> "KVCConfig":
        """Build from flag strings; raises TierSpecError / ValueError with the fix in the message."""
        ladder = parse_ladder(kv_compression)
        if rotate_keys:
            ladder = tuple(dataclasses.replace(t, rotate_keys=True) if t.bits_k < 16 else t for t in ladder)
        if write_tier:
            names = [t.name for t in ladder]
            wanted = parse_ladder(write_tier)
            if len(wanted) != 1 or wanted[0] not in ladder:
                raise TierSpecError(
                    f"--kvc-write-tier={write_tier} is not a tier of the ladder {','.join(names)}; "
                    f"choose one of: {', '.join(names)}")
            ladder = ladder[ladder.index(wanted[0]):]
        if policy not in POLICIES:
            raise TierSpecError(f"--kvc-policy={policy} is not a known policy; choose one of: {', '.join(POLICIES)}")
        top_bits = ladder[0].mean_bits
        if not 0 <= min_hit_bits <= top_bits:
            raise TierSpecError(
                f"--kvc-min-hit-bits={min_hit_bits} must lie in [0, {top_bits:g}] (the write tier's bits); "
                f"0 keeps every tier matchable")
        if int(frame_pages) != frame_pages or not 1 <= frame_pages <= 64:
            raise TierSpecError(f"--kvc-frame-pages={frame_pages} must be an integer in [1, 64] (default "
                                f"{DEFAULT_FRAME_PAGES})")
        if not 0 <= watermark < 0.5:
            raise TierSpecError(f"--kvc-watermark={watermark} must lie in [0, 0.5): the share of the write "
                                f"tier's tokens kept free by demoting ahead of need (0 turns it off)")
        if not 0 <= min_demotion_yield < float("inf"):
            raise TierSpecError(f"--kvc-min-demotion-yield={min_demotion_yield} must be a finite number >= 0 "
                                f"(lower-tier hit tokens per demoted token; 0 always demotes)")
        return cls(ladder, policy, float(min_hit_bits), int(frame_pages), float(watermark), float(min_demotion_yield))

    @property
    def ladder_text(self) -> str:
        return ",".join(t.name for t in self.ladder)

    def build_layout(self, kv_shape: KVShape, page_size: int, bf16_tokens: int) -> FrameLayout:
        """The arena holding the bytes of ``bf16_tokens`` (stock SGLang's token count at this budget)."""
        from sglang_kvc.allocator import RESERVE_FRAMES

        return FrameLayout.for_bf16_pages(self.ladder, kv_shape, page_size, bf16_tokens // page_size,
                                          self.frame_pages, RESERVE_FRAMES)
