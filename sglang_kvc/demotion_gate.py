"""Whether demoting out of the write tier pays off now: the demotion yield.

A demotion costs scheduler time and a requantize, and pays off only when the demoted tokens are hit
again before they are dropped. On the H200 (``benchmarks/results/e2e-nvidia-h200-2026-12-02*.json``)
the paced agentic runs hit 2.5 (1b) and 2.7 (8b) lower-tier tokens per token demoted, the
shared-prefix benchmark 0.41; the saturating agentic run (every round sent at once) 0.11: it demoted
578K tokens, dropped 556K of them unread, and spent 38% of its wall time making room. With the gate
closed the cache evicts as stock SGLang does (coldest first, lower tiers being the coldest) and only
a probe share of evictions still demotes, so that a return of reuse reopens it.
"""

from __future__ import annotations

MIN_YIELD = 0.25  # lower-tier hit tokens per demoted token below which demotion stops
PROBE_EVERY = 8  # while closed, one demotion decision in this many still demotes


class DemotionGate:
    """Decayed counts of tokens demoted out of the write tier and of hit tokens served from lower
    tiers, on a clock that advances with every token leaving the write tier (demoted or dropped).

    Invariants: ``demoted >= 0`` and ``hits >= 0``; both halve each time ``window_tokens`` tokens
    have left the write tier; ``allow()`` is True until the first window has passed (too little
    evidence), then while ``hits >= min_yield * demoted``, and otherwise on every
    ``probe_every``-th call (so ``demoted`` keeps measuring what demotion would yield).
    """

    def __init__(self, window_tokens: int, min_yield: float = MIN_YIELD, probe_every: int = PROBE_EVERY):
        if window_tokens <= 0:
            raise ValueError(f"window_tokens must be positive, got {window_tokens}")
        self.window_tokens = int(window_tokens)
        self.min_yield = float(min_yield)
        self.probe_every = int(probe_every)
        self.demoted = 0.0
        self.hits = 0.0
        self._clock = 0  # tokens that left the write tier since the last halving
        self.warm = False  # a whole window has passed
        self._closed_calls = 0
        self.closed_decisions = 0  # demotion decisions refused, since start (a counter for metrics)

    def record_demoted(self, tokens: int) -> None:
        self.demoted += tokens
        self._advance(tokens)

    def record_dropped(self, tokens: int) -> None:
        """Write-tier tokens dropped without demotion."""
        self._advance(tokens)

    def record_hits(self, tokens: int) -> None:
        """Hit tokens served from a lower tier."""
        self.hits += tokens

    def _advance(self, tokens: int) -> None:
        self._clock += tokens
        while self._clock >= self.window_tokens:
            self._clock -= self.window_tokens
            self.warm = True
            self.demoted /= 2
            self.hits /= 2

    @property
    def demotion_yield(self) -> float:
        """Lower-tier hit tokens per demoted token over the window (inf before any demotion)."""
        return self.hits / self.demoted if self.demoted else float("inf")

    def is_open(self) -> bool:
        return not self.warm or self.hits >= self.min_yield * self.demoted

    def allow(self) -> bool:
        """One demotion decision: open, or closed and this call is the probe."""
        if self.is_open():
            self._closed_calls = 0
            return True
        self._closed_calls += 1
        if self._closed_calls >= self.probe_every:
            self._closed_calls = 0
            return True
        self.closed_decisions += 1
        return False
