import pytest

from sglang_kvc.config import KVCConfig
from sglang_kvc.layout import KVShape
from sglang_kvc.tiers import TierSpecError


def test_parse_full_config():
    config = KVCConfig.parse("bf16,k8v8,k4v2", policy="cost", min_hit_bits=3, rotate_keys=True, frame_pages=8,
                             watermark=0.1)
    assert [t.name for t in config.ladder] == ["bf16", "k8v8-rot", "k4v2-rot"]
    assert config.policy == "cost" and config.frame_pages == 8 and config.watermark == 0.1
    assert config.min_demotion_yield == 0.25 and KVCConfig.parse("k8v8", min_demotion_yield=0).min_demotion_yield == 0


def test_write_tier_drops_upper_tiers():
    config = KVCConfig.parse("bf16,k8v8,k4v2", write_tier="k8v8")
    assert config.ladder_text == "k8v8,k4v2"


@pytest.mark.parametrize("kwargs,fragment", [
    ({"write_tier": "k4v4"}, "not a tier of the ladder"),
    ({"frame_pages": 0}, "--kvc-frame-pages=0 must be an integer"),
    ({"watermark": 0.7}, "--kvc-watermark=0.7 must lie in"),
    ({"policy": "fifo"}, "lru, lfu, cost"),
    ({"min_hit_bits": 20}, "must lie in"),
    ({"min_demotion_yield": -1}, "--kvc-min-demotion-yield=-1 must be a finite number >= 0"),
])
def test_bad_values_name_the_fix(kwargs, fragment):
    with pytest.raises(TierSpecError, match=fragment):
        KVCConfig.parse("bf16,k8v8,k4v2", **kwargs)


def test_the_arena_holds_stock_bf16_bytes_plus_the_reserve():
    config = KVCConfig.parse("bf16,k8v8,k4v2")
    shape = KVShape(4, 2, 64)
    layout = config.build_layout(shape, 16, bf16_tokens=16000)
    stock_bytes = (16000 + 16) * layout.bf16_bytes_per_token()  # + SGLang's padding page
    reserve = 2 * layout.frame_bytes * shape.num_layers
    assert stock_bytes <= layout.total_bytes() - reserve < stock_bytes + layout.frame_bytes * shape.num_layers
