"""Coldness policies: which cached tree node to demote (or drop) first. Lower priority = colder."""

from __future__ import annotations

import math
import time
from typing import Tuple, Union

POLICIES = ("lru", "lfu", "cost")


class LRUPolicy:
    """Least recently used first."""

    def priority(self, node) -> float:
        return node.last_access_time


class LFUPolicy:
    """Fewest hits first; ties broken by recency."""

    def priority(self, node) -> Tuple[int, float]:
        return (node.hit_count, node.last_access_time)


class CostAwarePolicy:
    """Keeps what is expensive to recompute and likely to be reused.

    value = expected reuse x recompute cost per cached token, where expected reuse is
    ``(1 + hit_count) / (1 + age / half_life_s)`` and the recompute cost per token grows with the
    node's position: re-prefilling a token at depth ``d`` attends over ``d`` earlier tokens, so a
    deep shared prefix is worth more than a short leaf of one session,
    ``1 + (depth + length / 2) / depth_scale``.
    """

    def __init__(self, half_life_s: float = 60.0, depth_scale: float = 4096.0, clock=time.monotonic):
        self.half_life_s = half_life_s
        self.depth_scale = depth_scale
        self.clock = clock

    def priority(self, node) -> float:
        age = max(0.0, self.clock() - node.last_access_time)
        reuse = (1 + node.hit_count) / (1 + age / self.half_life_s)
        depth = getattr(node, "kvc_depth", 0)
        cost = 1 + (depth + len(node.key) / 2) / self.depth_scale
        return math.log(reuse) + math.log(cost)


def make_policy(name: str) -> Union[LRUPolicy, LFUPolicy, CostAwarePolicy]:
    policies = {"lru": LRUPolicy, "lfu": LFUPolicy, "cost": CostAwarePolicy}
    if name not in policies:
        raise ValueError(f"--kvc-policy={name} is not a known policy; choose one of: {', '.join(POLICIES)}")
    return policies[name]()
