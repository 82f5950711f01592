"""Tier specs: the precision a tier stores K and V at, parsed from strings like ``k4v2-rot``.

Grammar: ``bf16`` or ``k<bits>v<bits>`` followed by optional modifiers, each after a ``-``:
``g<N>`` (elements per scale/zero group along head_dim; default ``min(64, head_dim)``), ``kc`` (keys grouped per
channel over the tokens of one page, as in KIVI; values stay per-token) and ``rot`` (keys rotated
by a normalized Hadamard matrix before quantization). Bits are one of 2, 4, 8, 16; 16 means
that side is stored unquantized in bf16. A ladder is a comma-separated list of specs that goes
down in bits: ``bf16,k8v8,k4v2``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Tuple

SUPPORTED_BITS = (2, 4, 8, 16)
DEFAULT_GROUP_SIZE = 64
KNOWN_SCHEMES = ("bf16", "k8v8", "k4v4", "k4v2", "k2v2")
LADDER_PRESETS = {
    # chosen by the SmolLM2-135M-Instruct quality runs (benchmarks/results/quality-cpu-smollm2-2026-12-01*.json):
    # +2.3% / +3.0% perplexity, the passkey found at 1K-8K (the former aggressive k8v8,k4v4,k2v2 lost +59%).
    # Keys per channel (-kc) without rotation: the rotated ladders measured +2.2% / +2.8% but decode slower on the
    # H200 (decode-matrix-nvidia-h200-2026-12-01-kc-f16.json, served batch, head_dim 64: 0.063 against 0.228 ms a
    # layer at B=8), and the server with the -kc ladder matched stock fp8's late TTFT (1.00x,
    # e2e-nvidia-h200-2026-12-01-e9a7733.json) where the rotated one reached 0.77x (-80d382d.json).
    "balanced": "bf16,k8v8,k4v2-g32-kc",
    "aggressive": "k8v8,k4v4-kc,k4v2-g32-kc",
    "int8": "bf16,k8v8",
    # stock fp8 KV's quality (the mission's bar): on SmolLM2 fp8_e4m3 measured -0.15% perplexity and a mean
    # attention-output error of 0.033, this ladder +0.12% and 0.032, every passkey found
    # (quality-cpu-smollm2-2026-12-01-fp8-k4v4-ladders.json; over 12 windows fp8 +0.15%, this ladder +0.25%,
    # aggressive +2.90%: -fp8-ppl12.json); the two presets above cost +2.3% / +3.0% and 0.11 (-fp8.json).
    # No 2-bit tier: its lowest tier stores 5.25 bits an element against fp8's 8. Not k8v4-g32,k4v4-g32-kc:
    # as good on SmolLM2 (+0.17%, 0.035: quality-cpu-smollm2-2026-12-02-k8v4g32-ladder.json) with a write
    # tier of 1.125x fp8's tokens, but the H200 server decoded it at 4.7 ms a token against this ladder's 2.0
    # and lost to stock fp8 (e2e-nvidia-h200-2026-12-02-k8v4g32.json).
    "fp8-quality": "k8v8,k4v4-kc",
}
_SPEC_RE = re.compile(r"^k(\d+)v(\d+)$")


class TierSpecError(ValueError):
    """A tier spec or ladder string the user gave cannot be used; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class TierSpec:
    """One precision tier. Invariant: bits in SUPPORTED_BITS, group_size None or > 0, and a side with
    16 bits carries no quantization options (it is stored as bf16)."""

    bits_k: int
    bits_v: int
    group_size: Optional[int] = None  # None: min(DEFAULT_GROUP_SIZE, head_dim)
    key_grouping: str = "token"  # "token": groups along head_dim; "channel": one page per group
    rotate_keys: bool = False

    def __post_init__(self):
        for side, bits in (("K", self.bits_k), ("V", self.bits_v)):
            if bits not in SUPPORTED_BITS:
                raise TierSpecError(
                    f"{side} bits {bits} are not supported; choose one of {SUPPORTED_BITS}"
                )
        if self.group_size is not None and self.group_size <= 0:
            raise TierSpecError(f"group size must be positive, got {self.group_size}")
        if self.key_grouping not in ("token", "channel"):
            raise TierSpecError(f"key grouping must be 'token' or 'channel', got {self.key_grouping!r}")
        if self.bits_k == 16 and (self.key_grouping == "channel" or self.rotate_keys):
            raise TierSpecError(f"{self.name}: 16-bit keys are stored as bf16; drop '-kc'/'-rot'")

    @property
    def name(self) -> str:
        if self.bits_k == 16 and self.bits_v == 16:
            return "bf16"
        parts = [f"k{self.bits_k}v{self.bits_v}"]
        if self.group_size is not None:
            parts.append(f"g{self.group_size}")
        if self.key_grouping == "channel":
            parts.append("kc")
        if self.rotate_keys:
            parts.append("rot")
        return "-".join(parts)

    def effective_group_size(self, head_dim: int) -> int:
        return self.group_size if self.group_size is not None else min(DEFAULT_GROUP_SIZE, head_dim)

    @property
    def is_quantized(self) -> bool:
        return self.bits_k < 16 or self.bits_v < 16

    @property
    def mean_bits(self) -> float:
        return (self.bits_k + self.bits_v) / 2

    def __str__(self) -> str:
        return self.name


def parse_tier(text: str) -> TierSpec:
    """Parse one tier spec string (see module docstring)."""
    head, *mods = text.strip().lower().split("-")
    if head == "bf16":
        if mods:
            raise TierSpecError(f"{text!r}: bf16 takes no modifiers")
        return TierSpec(16, 16)
    match = _SPEC_RE.match(head)
    if not match:
        raise TierSpecError(
            f"{text!r} is not a known scheme; choose one of: {', '.join(KNOWN_SCHEMES)} "
            f"(optionally with -g<N>, -kc, -rot, e.g. k4v2-rot)"
        )
    kwargs = {"bits_k": int(match.group(1)), "bits_v": int(match.group(2))}
    for mod in mods:
        if mod == "kc":
            kwargs["key_grouping"] = "channel"
        elif mod == "rot":
            kwargs["rotate_keys"] = True
        elif re.fullmatch(r"g\d+", mod):
            kwargs["group_size"] = int(mod[1:])
        else:
            raise TierSpecError(
                f"{text!r}: unknown modifier {mod!r}; use -g<N> (group size), -kc (per-channel keys) or -rot"
            )
    try:
        return TierSpec(**kwargs)
    except TierSpecError as err:
        raise TierSpecError(f"{text!r}: {err}") from None


def parse_ladder(text: str) -> Tuple[TierSpec, ...]:
    """Parse a ladder (comma-separated specs, or a preset name) that must go down in bits."""
    text = LADDER_PRESETS.get(text.strip(), text)
    tiers = tuple(parse_tier(part) for part in text.split(",") if part.strip())
    if not tiers:
        raise TierSpecError("the ladder is empty; give at least one tier, e.g. bf16,k8v8,k4v2")
    for upper, lower in zip(tiers, tiers[1:]):
        if lower.bits_k > upper.bits_k or lower.bits_v > upper.bits_v or (
            lower.bits_k + lower.bits_v >= upper.bits_k + upper.bits_v
        ):
            raise TierSpecError(
                f"ladder {text!r} must go down in bits: {lower.name} is not below {upper.name}; "
                f"order the tiers from most to fewest bits, e.g. bf16,k8v8,k4v2"
            )
    return tiers
