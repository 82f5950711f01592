import pytest

from sglang_kvc.config import KVCConfig
from sglang_kvc.layout import KVShape
from sglang_kvc.tiers import TierSpecError


def test_parse_full_config():
    config = KVCConfig.parse("bf16,k8v8,k4v2", tier_fractions="0.5,0.25,0.25", policy="cost",
                             min_hit_bits=3, rotate_keys=True)
    assert [t.name for t in config.ladder] == ["bf16", "k8v8-rot", "k4v2-rot"]
    assert config.tier_fractions == (0.5, 0.25, 0.25) and config.policy == "cost"


def test_write_tier_drops_upper_tiers():
    config = KVCConfig.parse("bf16,k8v8,k4v2", write_tier="k8v8")
    assert config.ladder_text == "k8v8,k4v2"


@pytest.mark.parametrize("kwargs,fragment", [
    ({"write_tier": "k4v4"}, "not a tier of the ladder"),
    ({"tier_fractions": "0.5,0.5"}, "one per tier"),
    ({"tier_fractions": "a,b,c"}, "comma-separated numbers"),
    ({"tier_fractions": "0.5,0.6,-0.1"}, "positive and sum to 1"),
    ({"policy": "fifo"}, "lru, lfu, cost"),
    ({"min_hit_bits": 20}, "must lie in"),
])
def test_bad_values_name_the_fix(kwargs, fragment):
    with pytest.raises(TierSpecError, match=fragment):
        KVCConfig.parse("bf16,k8v8,k4v2", **kwargs)


def test_min_write_tokens_grows_the_write_tier():
    config = KVCConfig.parse("bf16,k8v8,k4v2")
    shape = KVShape(4, 2, 64)
    small = config.build_layout(shape, 16, budget_bytes=4 << 20)
    grown = config.build_layout(shape, 16, budget_bytes=4 << 20, min_write_tokens=1500)
    assert small.capacity_tokens(0) < 1500 <= grown.capacity_tokens(0)
    assert grown.total_bytes() <= 4 << 20
