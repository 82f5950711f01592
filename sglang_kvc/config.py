"""The one frozen configuration of sglang-kvc, built from the flags and validated once."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from sglang_kvc.layout import KVShape, TierLayout
from sglang_kvc.policy import POLICIES
from sglang_kvc.tiers import TierSpec, TierSpecError, parse_ladder


@dataclasses.dataclass(frozen=True)
class KVCConfig:
    """A validated compression setup. Invariant: ``ladder`` goes down in bits, its first tier is
    the write tier, and ``tier_fractions`` is None (default split) or one positive share per
    tier summing to 1."""

    ladder: Tuple[TierSpec, ...]
    tier_fractions: Optional[Tuple[float, ...]] = None
    policy: str = "lru"
    min_hit_bits: float = 0.0

    @classmethod
    def parse(cls, kv_compression: str, write_tier: Optional[str] = None,
              tier_fractions: Optional[str] = None, policy: str = "lru", min_hit_bits: float = 0.0,
              rotate_keys: bool = False) -> "KVCConfig":
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
        fractions = None
        if tier_fractions and tier_fractions.strip() != "auto":
            try:
                fractions = tuple(float(x) for x in tier_fractions.split(","))
            except ValueError:
                raise TierSpecError(
                    f"--kvc-tier-fractions={tier_fractions} must be comma-separated numbers, "
                    f"e.g. 0.4,0.3,0.3, or 'auto'") from None
            if len(fractions) != len(ladder):
                raise TierSpecError(
                    f"--kvc-tier-fractions gives {len(fractions)} shares for {len(ladder)} tiers; "
                    f"give one per tier of {','.join(t.name for t in ladder)}")
            if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-3:
                raise TierSpecError(f"--kvc-tier-fractions={tier_fractions} must be positive and sum to 1")
        if policy not in POLICIES:
            raise TierSpecError(f"--kvc-policy={policy} is not a known policy; choose one of: {', '.join(POLICIES)}")
        top_bits = ladder[0].mean_bits
        if not 0 <= min_hit_bits <= top_bits:
            raise TierSpecError(
                f"--kvc-min-hit-bits={min_hit_bits} must lie in [0, {top_bits:g}] (the write tier's bits); "
                f"0 keeps every tier matchable")
        return cls(ladder, fractions, policy, float(min_hit_bits))

    @property
    def ladder_text(self) -> str:
        return ",".join(t.name for t in self.ladder)

    def build_layout(self, kv_shape: KVShape, page_size: int, budget_bytes: float,
                     min_write_tokens: int = 0) -> TierLayout:
        return TierLayout.from_budget(self.ladder, kv_shape, page_size, budget_bytes, self.tier_fractions,
                                      min_write_tokens)
