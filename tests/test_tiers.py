import pytest

from sglang_kvc.tiers import LADDER_PRESETS, TierSpec, TierSpecError, parse_ladder, parse_tier


@pytest.mark.parametrize("name,bits", [("bf16", (16, 16)), ("k8v8", (8, 8)), ("k4v4", (4, 4)),
                                        ("k4v2", (4, 2)), ("k2v2", (2, 2))])
def test_known_schemes_parse_and_round_trip(name, bits):
    spec = parse_tier(name)
    assert (spec.bits_k, spec.bits_v) == bits
    assert spec.name == name
    assert parse_tier(spec.name) == spec


def test_modifiers():
    spec = parse_tier("k4v2-g32-kc-rot")
    assert spec.group_size == 32 and spec.key_grouping == "channel" and spec.rotate_keys
    assert parse_tier(spec.name) == spec


@pytest.mark.parametrize("text,fragment", [
    ("k3v2", "not supported"),
    ("int4", "not a known scheme"),
    ("k4v2-zz", "unknown modifier"),
    ("bf16-rot", "takes no modifiers"),
    ("k16v4-rot", "16-bit keys"),
    ("k4v4-g0", "positive"),
])
def test_bad_specs_name_the_fix(text, fragment):
    with pytest.raises(TierSpecError, match=fragment):
        parse_tier(text)


def test_unknown_scheme_lists_choices():
    with pytest.raises(TierSpecError, match="choose one of: bf16, k8v8, k4v4, k4v2, k2v2"):
        parse_tier("k3v2x")


@pytest.mark.parametrize("ladder", ["k4v2,k8v8", "bf16,bf16", "k4v2,k2v4", "k4v2,k4v2-rot"])
def test_ladder_must_go_down(ladder):
    with pytest.raises(TierSpecError, match="must go down in bits"):
        parse_ladder(ladder)


def test_ladder_and_presets():
    assert [t.name for t in parse_ladder("bf16,k8v8,k4v2")] == ["bf16", "k8v8", "k4v2"]
    for preset, text in LADDER_PRESETS.items():
        assert parse_ladder(preset) == parse_ladder(text)
    with pytest.raises(TierSpecError, match="empty"):
        parse_ladder(" , ")


def test_spec_is_frozen():
    with pytest.raises(Exception):
        TierSpec(8, 8).bits_k = 4
