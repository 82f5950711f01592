"""Triton helpers that quantize / dequantize rows of head vectors in the packed layout of
``sglang_kvc.codec``, reproducing the reference arithmetic step by step:

* zero = min rounded *down* to fp16, scale = (max - zero) / levels rounded *up* to fp16
  (``div_rn`` is IEEE division, the directed fp16 rounding is done on the bits);
* code = round-half-to-even((x - zero) / scale) (IEEE division; the 2^23 add/subtract rounds),
  clamped to [0, levels];
* dequantize = code * scale + zero as a multiply then an add (launch with enable_fp_fusion=False).

So without a basis change the codes and meta are bit-identical to the reference; a Hadamard
rotation is an fp32 dot whose summation order differs from torch's, which can move a value
across a rounding boundary (one code step, still within the codec's error bound).
"""

import triton
import triton.language as tl


@triton.jit
def f16_round(x, DOWN: tl.constexpr):
    """float32 -> nearest float16 value <= x (DOWN) or >= x (not DOWN), returned as float32."""
    h = x.to(tl.float16)
    bits = h.to(tl.int16, bitcast=True).to(tl.int32)
    negative = bits < 0
    is_zero = (bits & 0x7FFF) == 0
    if DOWN:
        step = tl.where(is_zero, -32767, tl.where(negative, bits + 1, bits - 1))
        wrong = h.to(tl.float32) > x
    else:
        step = tl.where(is_zero, 1, tl.where(negative, bits - 1, bits + 1))
        wrong = h.to(tl.float32) < x
    bits = tl.where(wrong, step, bits)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def f16_bits(x):
    """float32 holding an fp16 value -> its 16 bits in the low half of an int32."""
    return x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def meta_word(scale, zero):
    """(scale, zero) float32 fp16-exact values -> int32 word as stored (scale in the low half)."""
    return f16_bits(scale) | (f16_bits(zero) << 16)


@triton.jit
def split_word(w):
    scale = (w & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    zero = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return scale, zero


@triton.jit
def _codes(x, zero, scale, BITS: tl.constexpr):
    levels: tl.constexpr = (1 << BITS) - 1
    safe = tl.where(scale > 0, scale, 1.0)
    v = tl.math.div_rn(x - zero, safe)
    v = (v + 8388608.0) - 8388608.0  # round half to even (0 <= v < 2^22)
    return tl.minimum(tl.maximum(v, 0.0), levels).to(tl.int32)


@triton.jit
def pack(codes, BT: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """int32 codes ``[BT, D]`` -> split-plane bytes ``[BT, P]`` uint8."""
    if BITS == 8:
        return codes.to(tl.uint8)
    else:
        N: tl.constexpr = 8 // BITS
        planes = tl.reshape(codes, [BT, N, D // N])
        shifts = (tl.arange(0, N) * BITS)[None, :, None]
        return tl.sum(planes << shifts, 1).to(tl.uint8)


@triton.jit
def quantize_tokens(x, BT: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr):
    """float32 ``[BT, D]`` (stored basis) -> (bytes ``[BT, P]`` uint8, meta words ``[BT, D // G]`` int32)."""
    grouped = tl.reshape(x, [BT, D // G, G])
    zero = f16_round(tl.min(grouped, 2), True)
    scale = f16_round(tl.math.div_rn(tl.max(grouped, 2) - zero, (1 << BITS) - 1.0), False)
    codes = _codes(grouped, zero[:, :, None], scale[:, :, None], BITS)
    return pack(tl.reshape(codes, [BT, D]), BT, D, BITS), meta_word(scale, zero)


@triton.jit
def quantize_channels(x, BT: tl.constexpr, PS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """float32 ``[BT, D]`` = BT // PS whole pages -> (bytes ``[BT, P]``, meta words ``[BT // PS, D]``):
    one group per channel per page (``-kc``)."""
    pages = tl.reshape(x, [BT // PS, PS, D])
    zero = f16_round(tl.min(pages, 1), True)
    scale = f16_round(tl.math.div_rn(tl.max(pages, 1) - zero, (1 << BITS) - 1.0), False)
    codes = _codes(pages, zero[:, None, :], scale[:, None, :], BITS)
    return pack(tl.reshape(codes, [BT, D]), BT, D, BITS), meta_word(scale, zero)


@triton.jit
def rotate(x, HSIGN, D: tl.constexpr, INV_SQRT_D: tl.constexpr):
    """x ``[BT, D]`` float32 -> x @ hadamard(D) (HSIGN: the +-1 matrix, float32), IEEE float32 dot."""
    offs = tl.arange(0, D)
    signs = tl.load(HSIGN + offs[:, None] * D + offs[None, :])
    return tl.dot(x, signs, input_precision="ieee") * INV_SQRT_D


@triton.jit
def load_side(DATA, META, rows, meta_rows, rmask, BT: tl.constexpr, PS: tl.constexpr, D: tl.constexpr,
              BITS: tl.constexpr, G: tl.constexpr, KC: tl.constexpr):
    """Dequantized float32 ``[BT, D]`` (stored basis) of the rows at ``DATA + rows`` (element offsets
    of each row's head vector); meta_rows: offsets of each token's (or, for KC, each page's) meta."""
    if BITS == 16:
        offs = tl.arange(0, D)
        return tl.load(DATA + rows[:, None] + offs[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    else:
        # each element's byte and bit offset in the split-plane layout: no reshape, the repeated
        # bytes of one row come from L1
        P: tl.constexpr = D * BITS // 8 if BITS < 8 else D
        offs_d = tl.arange(0, D)
        byte = tl.load(DATA + rows[:, None] + (offs_d % P)[None, :], mask=rmask[:, None], other=0)
        codes = (byte.to(tl.int32) >> ((offs_d // P) * BITS)[None, :]) & ((1 << BITS) - 1)
        if KC:  # every token of a page reads its page's (scale, zero) per channel
            words = tl.load(META + meta_rows[:, None] + offs_d[None, :], mask=rmask[:, None], other=0)
            scale, zero = split_word(words)
            return codes.to(tl.float32) * scale + zero
        else:
            words = tl.load(META + meta_rows[:, None] + (offs_d // G)[None, :], mask=rmask[:, None], other=0)
            scale, zero = split_word(words)
            return codes.to(tl.float32) * scale + zero


@triton.jit
def store_side(x, DATA, META, rows, meta_rows, rmask, BT: tl.constexpr, PS: tl.constexpr, D: tl.constexpr,
               BITS: tl.constexpr, G: tl.constexpr, KC: tl.constexpr):
    """Quantize float32 ``x [BT, D]`` (stored basis) and store it at ``DATA + rows``; for KC, rows
    are whole pages and ``meta_rows`` gives every token its page's meta offset."""
    if BITS == 16:
        offs = tl.arange(0, D)
        tl.store(DATA + rows[:, None] + offs[None, :], x.to(tl.bfloat16), mask=rmask[:, None])
    else:
        P: tl.constexpr = D * BITS // 8
        offs_p = tl.arange(0, P)
        if KC:
            packed, words = quantize_channels(x, BT, PS, D, BITS)
            offs_d = tl.arange(0, D)
            page_words = tl.reshape(tl.broadcast_to(words[:, None, :], [BT // PS, PS, D]), [BT, D])
            first = (tl.arange(0, BT) % PS) == 0
            tl.store(META + meta_rows[:, None] + offs_d[None, :], page_words, mask=(rmask & first)[:, None])
        else:
            packed, words = quantize_tokens(x, BT, D, BITS, G)
            offs_g = tl.arange(0, D // G)
            tl.store(META + meta_rows[:, None] + offs_g[None, :], words, mask=rmask[:, None])
        tl.store(DATA + rows[:, None] + offs_p[None, :], packed, mask=rmask[:, None])
