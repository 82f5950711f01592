import math

import pytest
import torch

from sglang_kvc.codec import (CodecInputError, TierCodec, hadamard, pack_codes, requantize,
                              unpack_codes)
from sglang_kvc.tiers import TierSpecError, parse_tier

TIERS = ["bf16", "k8v8", "k4v4", "k4v2", "k2v2", "k4v2-rot", "k2v2-g32", "k4v2-kc", "k2v2-kc-rot"]
HEAD_DIM, HEADS, PAGE = 64, 4, 8


def random_kv(tokens=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16).float()


def adversarial_inputs():
    base = random_kv(seed=1)
    outliers = base.clone()
    outliers[:, :, 3] *= 100
    outliers[:, :, 17] *= -100
    constant_rows = base.clone()
    constant_rows[5:13] = 0.75
    zeros = torch.zeros_like(base)
    shifted = base + 300.0
    tiny = base * 1e-4
    return {"outliers": outliers, "constant": constant_rows, "zeros": zeros, "shifted": shifted,
            "tiny": tiny}


def check_side(side, x):
    data, meta = side.quantize(x)
    assert data.dtype == side.data_dtype
    assert data.shape == side.data_shape(x.shape[0], HEADS)
    if meta is None:
        assert side.meta_shape(x.shape[0], HEADS) is None
    else:
        assert meta.dtype == torch.float16 and meta.shape == side.meta_shape(x.shape[0], HEADS)
    err = (side.to_stored_basis(x) - side.dequantize_stored(data, meta)).abs()
    bound = side.error_bound(x)
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"
    if side.rotate:  # in the original basis the L2 error per head vector is bounded
        l2 = (x - side.dequantize(data, meta)).norm(dim=-1)
        assert bool((l2 <= bound.norm(dim=-1) * (1 + 1e-4) + 1e-6).all())
    return err, bound


@pytest.mark.parametrize("tier", TIERS)
def test_error_within_bound_on_random_data(tier):
    codec = TierCodec(parse_tier(tier), HEAD_DIM, PAGE)
    x = random_kv()
    for side in (codec.k, codec.v):
        err, bound = check_side(side, x)
        if side.bits < 16:  # the bound is tight, not vacuous
            assert err.max() >= 0.3 * bound.max()


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("case", list(adversarial_inputs()))
def test_error_within_bound_on_adversarial_data(tier, case):
    codec = TierCodec(parse_tier(tier), HEAD_DIM, PAGE)
    x = adversarial_inputs()[case]
    for side in (codec.k, codec.v):
        check_side(side, x)


@pytest.mark.parametrize("tier", ["k8v8", "k4v4", "k2v2"])
def test_constant_and_zero_groups_are_exact(tier):
    codec = TierCodec(parse_tier(tier), HEAD_DIM, PAGE)
    x = torch.zeros(PAGE, HEADS, HEAD_DIM)
    x[:, 1] = 0.75
    data, meta = codec.v.quantize(x)
    assert torch.equal(codec.v.dequantize(data, meta), x)


def test_bound_shrinks_with_bits():
    x = random_kv()
    bounds = [TierCodec(parse_tier(t), HEAD_DIM, PAGE).v.error_bound(x).mean() for t in ["k8v8", "k4v4", "k2v2"]]
    assert bounds[0] < bounds[1] < bounds[2]
    assert math.isclose(float(bounds[1] / bounds[0]), 255 / 15, rel_tol=0.05)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("tier", ["bf16", "k4v2"])
def test_non_finite_input_rejected(bad, tier):
    codec = TierCodec(parse_tier(tier), HEAD_DIM, PAGE)
    x = random_kv()
    x[3, 1, 7] = bad
    with pytest.raises(CodecInputError, match="NaN or inf"):
        codec.k.quantize(x)


def test_values_beyond_fp16_scales_rejected():
    codec = TierCodec(parse_tier("k8v8"), HEAD_DIM, PAGE)
    x = random_kv()
    x[0, 0, 0] = 1e6
    with pytest.raises(CodecInputError, match="float16"):
        codec.v.quantize(x)


@pytest.mark.parametrize("tier", TIERS)
def test_packed_sizes_match_documented_formula(tier):
    spec = parse_tier(tier)
    codec = TierCodec(spec, HEAD_DIM, PAGE)
    x = random_kv(tokens=4 * PAGE)
    total = 0
    for side, bits in ((codec.k, spec.bits_k), (codec.v, spec.bits_v)):
        data, meta = side.quantize(x)
        per_channel = side is codec.k and spec.key_grouping == "channel"
        if bits == 16:
            expected_meta = 0
        elif per_channel:
            expected_meta = (x.shape[0] // PAGE) * HEADS * HEAD_DIM * 2 * 2
        else:
            expected_meta = x.shape[0] * HEADS * (HEAD_DIM // spec.effective_group_size(HEAD_DIM)) * 2 * 2
        assert data.nbytes == x.shape[0] * HEADS * HEAD_DIM * bits // 8
        assert (0 if meta is None else meta.nbytes) == expected_meta
        total += data.nbytes + expected_meta
    assert codec.bytes_per_token(HEADS, 1) * x.shape[0] == pytest.approx(total)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip_and_plane_layout(bits):
    codes = torch.randint(0, 1 << bits, (5, 3, HEAD_DIM), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, 3, HEAD_DIM * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)
    per_byte, plane = 8 // bits, HEAD_DIM * bits // 8
    for m in range(per_byte):  # byte i holds element i + m * plane at bit m * bits
        assert torch.equal((packed.int() >> (m * bits)) & ((1 << bits) - 1),
                           codes[..., m * plane:(m + 1) * plane].int())


def test_hadamard_is_orthonormal_and_symmetric():
    mat = hadamard(64)
    assert torch.allclose(mat @ mat, torch.eye(64), atol=1e-5)
    assert torch.equal(mat, mat.T)
    with pytest.raises(TierSpecError, match="power-of-two"):
        hadamard(96)


@pytest.mark.parametrize("src,dst", [("bf16", "k8v8"), ("k8v8", "k4v2"), ("k4v4", "k2v2-kc"),
                                     ("bf16", "k4v2-rot"), ("k8v8-rot", "k2v2-kc-rot")])
def test_requantize_within_sum_of_bounds(src, dst):
    a = TierCodec(parse_tier(src), HEAD_DIM, PAGE)
    b = TierCodec(parse_tier(dst), HEAD_DIM, PAGE)
    x = adversarial_inputs()["outliers"]
    k_data, k_meta = a.k.quantize(x)
    v_data, v_meta = a.v.quantize(x)
    nk, nkm, nv, nvm = requantize(a, b, k_data, k_meta, v_data, v_meta)
    v_mid = a.v.dequantize(v_data, v_meta)
    v_err = (b.v.dequantize(nv, nvm) - x).abs()
    assert bool((v_err <= a.v.error_bound(x) + b.v.error_bound(v_mid) + 1e-6).all())
    k_mid = a.k.dequantize(k_data, k_meta)
    k_err = (b.k.dequantize(nk, nkm) - x).norm(dim=-1)
    k_bound = a.k.error_bound(x).norm(dim=-1) + b.k.error_bound(k_mid).norm(dim=-1)
    assert bool((k_err <= k_bound * (1 + 1e-4) + 1e-5).all())


@pytest.mark.parametrize("spec,head_dim,page,fragment", [
    ("k4v4-g48", 64, 8, "does not divide head_dim"),
    ("k4v2-g32-rot", 96, 8, "power-of-two"),
    ("k4v2-kc", 64, 1, "page-size"),
])
def test_codec_rejects_incompatible_shapes(spec, head_dim, page, fragment):
    with pytest.raises(TierSpecError, match=fragment):
        TierCodec(parse_tier(spec), head_dim, page)
