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

The unit helpers (``load_units``, ``requantize_units``; the requantize kernel) cut a head vector
into units of 16 elements (whole 16-byte words of every packing: a unit lies in one bit plane and
one group, since planes and groups are multiples of 16) and hold unit ``u`` as four tensors
``[rows, 4]``, entry ``b`` holding elements ``16 u + 4 i + b``, i = 0 .. 3: the elements whose
codes share byte ``b`` of the 32-bit words ``i`` of the unit's 16 bytes, at bit ``8 b + j * bits``
for the unit's plane ``j``. So packing and unpacking are elementwise shifts on whole words, and
a ``[rows, 4]`` 32-bit tensor is one 16-byte access per row: each thread holds whole rows, group
reductions stay in its registers and a group's meta is computed once per row. They avoid slow
instructions without changing a bit of the results above (for finite inputs, all a tier holds):

* int <-> float conversions become bit tricks on ``2^23 + code`` (exact below 2^23);
* dequantize is one fma: ``code * scale`` is exact (8 x 11 significant bits), so
  ``fma(code, scale, zero)`` rounds once like ``code * scale + zero``; a code left at bit ``s``
  of its word is taken as ``code * 2^s`` with the scale ``scale * 2^-s`` (exact), so no shift;
* the per-element IEEE division becomes one correctly rounded reciprocal per group and a
  correction by two fmas, which gives the IEEE quotient exactly (Markstein's theorem:
  ``y = RN(1 / b)``, ``q = RN(a * y)`` within one ulp, then ``RN(q + fma(-q, b, a) * y) = RN(a / b)``);
* no clamp: for finite values ``zero <= x`` and ``scale >= RN((max - zero) / levels)`` keep every
  quotient in ``[0, levels + 0.5)`` (``_codes`` clamps for non-finite inputs only).
"""

import triton
import triton.language as tl


@triton.jit
def f16_round(x, DOWN: tl.constexpr):
    """float32 -> nearest float16 value <= x (DOWN) or >= x (not DOWN), returned as float32."""
    value, _ = f16_round_bits(x, DOWN)
    return value


@triton.jit
def f16_round_bits(x, DOWN: tl.constexpr):
    """``f16_round`` and the value's 16 bits (low half of an int32)."""
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
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32), bits & 0xFFFF


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




MAGIC = tl.constexpr(8388608.0)  # 2^23: a float32 in [2^23, 2^24) holds an integer in its low mantissa bits
MAGIC_BITS = tl.constexpr(0x4B000000)


@triton.jit
def split4(x):
    """``[R, 4 Q]`` -> the four ``[R, Q]`` tensors of columns ``4 i + b``, b = 0 .. 3 (in registers)."""
    R: tl.constexpr = x.shape[0]
    Q: tl.constexpr = x.shape[1] // 4
    even, odd = tl.split(tl.reshape(x, [R, Q, 2, 2]))
    b0, b2 = tl.split(even)
    b1, b3 = tl.split(odd)
    return b0, b1, b2, b3


@triton.jit
def join4(b0, b1, b2, b3):
    """Inverse of ``split4``."""
    R: tl.constexpr = b0.shape[0]
    Q: tl.constexpr = b0.shape[1]
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), [R, 4 * Q])


@triton.jit
def group_meta(lo, hi, LEVELS: tl.constexpr):
    """A group's (zero, scale, meta word) from its min and max, as ``quantize_tokens``: zero = lo
    rounded down to fp16, scale = ``div_rn(hi - zero, LEVELS)`` rounded up (the quotient by
    Markstein's correction with the constant ``RN(1 / LEVELS)``; hi - zero >= 0)."""
    RCP: tl.constexpr = 1.0 / LEVELS  # RN(1 / LEVELS) for 3, 15, 255 (no float32 tie in between)
    zero, zero_bits = f16_round_bits(lo, True)
    a = hi - zero
    q = a * RCP
    q = tl.fma(tl.fma(q, tl.full(q.shape, -LEVELS * 1.0, tl.float32), a), tl.full(q.shape, RCP, tl.float32), q)
    scale, scale_bits = f16_round_bits(q, False)
    return zero, scale, scale_bits | (zero_bits << 16)


@triton.jit
def group_divisor(scale):
    """Per group: (``rcp`` = 1 / safe scale correctly rounded, ``neg_divisor``) for ``div_codes``;
    the safe scale is ``_codes``' (1.0 where scale is 0). An infinite scale gets rcp 0 and divisor
    1.0, so its codes are 0 (``x / inf``) and the residual stays finite."""
    safe = tl.where(scale > 0, scale, 1.0)
    rcp = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)
    return rcp, tl.where(rcp > 0, -safe, -1.0)


@triton.jit
def div_codes(x, zero, rcp, neg_divisor):
    """float32 ``2^23 + code`` with ``code = _codes(x, zero, scale, bits)`` for finite x, from the
    group's ``group_divisor`` (all broadcast to x's shape): the IEEE quotient by Markstein's
    correction, then the 2^23 add of the round-half-even; the code is in the low mantissa bits."""
    a = x - zero
    q = a * rcp
    q = tl.fma(tl.fma(q, neg_divisor, a), rcp, q)
    return q + MAGIC


@triton.jit
def _word_codes(low, high, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """float32 ``code * 2^s`` for the ``BITS``-bit codes at bit ``SHIFT`` of the words whose
    ``low = word | 2^23's bits`` and ``high = (word >> 16) + 2^23's bits``: s = SHIFT (< 16) or
    SHIFT - 16; one and (the exponent bits are already there), one subtract."""
    CODE: tl.constexpr = (1 << BITS) - 1
    if SHIFT >= 16:
        bits = high & (MAGIC_BITS | (CODE << (SHIFT - 16)))
    else:
        bits = low & (MAGIC_BITS | (CODE << SHIFT))
    return bits.to(tl.float32, bitcast=True) - MAGIC


@triton.jit
def _dequantize(c, S: tl.constexpr, scale, zero):
    """``code * scale + zero`` of ``c = code * 2^S`` (scale, zero broadcast to c's shape)."""
    return tl.fma(c, scale * (1.0 / (1 << S)), zero)


@triton.jit
def _cat2(a, b):
    """``[R, 2]``, ``[R, 2]`` -> ``[R, 4]`` (a's columns first), in registers."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), [a.shape[0], 4])


@triton.jit
def load_units(DATA, META, rows, meta_rows, rmask, RB: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
               G: tl.constexpr, KC: tl.constexpr):
    """The raw source of every unit of the head vectors at ``DATA + rows`` (element offsets of each
    row), packed at ``BITS``, and its meta (``meta_rows``: offsets of each token's, for KC each
    page's, int32 meta row): tuples ``(data, meta)`` of ``D // 16`` entries, undecoded
    (``dequantize_unit`` decodes one), so a kernel can issue every load first. A packed unit is its
    4 words (16 bytes: each unit lies in one plane); a bf16 unit two ``[RB, 8]`` halves. Masked
    rows read as 0."""
    SP: tl.constexpr = D * BITS // 8 if BITS < 8 else D  # the source's plane: bytes per head
    datas = ()
    metas = ()
    for u in tl.static_range(D // 16):
        if BITS == 16:
            datas = datas + ((tl.load(DATA + rows[:, None] + (16 * u + tl.arange(0, 8))[None, :],
                                      mask=rmask[:, None], other=0.0),
                              tl.load(DATA + rows[:, None] + (16 * u + 8 + tl.arange(0, 8))[None, :],
                                      mask=rmask[:, None], other=0.0)),)
            metas = metas + (rmask,)  # unused
        else:
            words = tl.load(DATA.to(tl.pointer_type(tl.int32)) + (rows >> 2)[:, None]
                            + ((16 * u) % SP // 4 + tl.arange(0, 4))[None, :], mask=rmask[:, None], other=0)
            datas = datas + (words.to(tl.uint32, bitcast=True),)
            if KC:  # every token of a page reads its page's (scale, zero) per channel; entry b's
                ms = ()
                for b in tl.static_range(4):
                    ms = ms + (tl.load(META + meta_rows[:, None] + (16 * u + b + 4 * tl.arange(0, 4))[None, :],
                                       mask=rmask[:, None], other=0),)
                metas = metas + (ms,)
            else:  # the unit's group
                metas = metas + (tl.load(META + meta_rows + (16 * u) // G, mask=rmask, other=0),)
    return datas, metas


@triton.jit
def dequantize_unit(data, meta, U: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, KC: tl.constexpr):
    """Unit ``U`` of ``load_units``, dequantized: its four float32 entries ``[RB, 4]`` (module doc),
    stored basis."""
    SP: tl.constexpr = D * BITS // 8 if BITS < 8 else D
    if BITS == 16:  # a half holds elements 4 i + b for i = 0, 1 (low) or 2, 3 (high)
        l0, l1, l2, l3 = split4(data[0].to(tl.float32))
        h0, h1, h2, h3 = split4(data[1].to(tl.float32))
        return _cat2(l0, h0), _cat2(l1, h1), _cat2(l2, h2), _cat2(l3, h3)
    else:
        low = data | MAGIC_BITS
        high = (data >> 16) + MAGIC_BITS
        xs = ()
        if not KC:
            scale, zero = split_word(meta)
        for b in tl.static_range(4):
            c = _word_codes(low, high, 8 * b + (16 * U) // SP * BITS, BITS)
            if KC:
                scale_b, zero_b = split_word(meta[b])
                xs = xs + (_dequantize(c, (8 * b + (16 * U) // SP * BITS) % 16, scale_b, zero_b),)
            else:
                shift = (8 * b + (16 * U) // SP * BITS) % 16
                xs = xs + (_dequantize(c, shift, tl.broadcast_to(scale[:, None], c.shape),
                                       tl.broadcast_to(zero[:, None], c.shape)),)
        return xs


@triton.jit
def _codes_of(xs, zero, scale):
    """``div_codes`` of each tensor of ``xs`` with one (zero, scale) broadcast to its shape."""
    rcp, neg_divisor = group_divisor(scale)
    out = ()
    for m in tl.static_range(len(xs)):
        x = xs[m]
        out = out + (div_codes(x, tl.broadcast_to(zero, x.shape), tl.broadcast_to(rcp, x.shape),
                               tl.broadcast_to(neg_divisor, x.shape)),)
    return out


@triton.jit
def quantize_group(xs, META, meta_rows, rmask, U0: tl.constexpr, RB: tl.constexpr, PS: tl.constexpr,
                   HB: tl.constexpr, LEVELS: tl.constexpr, G: tl.constexpr, KC: tl.constexpr):
    """Quantize the entries ``xs`` of units ``U0 ..`` (one group: ``G // 16`` units; for KC one unit,
    grouped per channel over each page's tokens), store the meta at ``META + meta_rows`` and return
    each entry's ``2^23 + code`` (``div_codes``). For KC the rows are whole pages ordered (page,
    token, head in ``HB``) and ``meta_rows`` gives every row its page's meta row."""
    if KC:
        PB: tl.constexpr = RB // (PS * HB)
        page_meta = tl.max(tl.reshape(meta_rows, [PB, PS, HB]), 1)
        page_mask = tl.max(tl.reshape(rmask.to(tl.int32), [PB, PS, HB]), 1) > 0
        ts = ()
        for b in tl.static_range(4):
            pages = tl.reshape(xs[b], [PB, PS, HB, 4])
            zero, scale, word = group_meta(tl.min(pages, 1), tl.max(pages, 1), LEVELS)
            (t,) = _codes_of((pages,), zero[:, None, :, :], scale[:, None, :, :])
            ts = ts + (tl.reshape(t, [RB, 4]),)
            tl.store(META + page_meta[:, :, None] + (16 * U0 + b + 4 * tl.arange(0, 4))[None, None, :], word,
                     mask=page_mask[:, :, None])
        return ts
    else:
        lo = xs[0]
        hi = xs[0]
        for m in tl.static_range(1, len(xs)):
            lo = tl.minimum(lo, xs[m])
            hi = tl.maximum(hi, xs[m])
        zero, scale, word = group_meta(tl.min(lo, 1), tl.max(hi, 1), LEVELS)
        tl.store(META + meta_rows + (16 * U0) // G, word, mask=rmask)
        return _codes_of(xs, zero[:, None], scale[:, None])


@triton.jit
def requantize_units(datas, metas, DATA, META, rows, meta_rows, rmask, HSIGN, ROTATE: tl.constexpr,
                     RB: tl.constexpr, PS: tl.constexpr, HB: tl.constexpr, D: tl.constexpr,
                     S_BITS: tl.constexpr, S_G: tl.constexpr, S_KC: tl.constexpr, BITS: tl.constexpr,
                     G: tl.constexpr, KC: tl.constexpr):
    """Dequantize a side from ``load_units`` (source ``S_BITS``, ``S_G``, ``S_KC``), rotate it by
    ``hadamard(D)`` if ROTATE, quantize it at ``BITS`` / ``G`` / ``KC`` and store it at ``DATA +
    rows`` (codes) and ``META + meta_rows`` (meta): the codes and meta of ``store_side`` (finite
    inputs). A side whose codec does not change (same bits and groups, e.g. V of k4v2 -> k2v2) keeps
    its codes when ``kept_codes`` proves requantizing gives them back, for every row of the program:
    then only the meta is recomputed (else everything, ``requantize_groups``)."""
    if S_BITS == BITS and S_G == G and not S_KC and not KC and not ROTATE and BITS < 16:
        ok, words = kept_codes(datas, metas, RB, D, BITS, G)
        if tl.min(tl.where(rmask, ok, 1)) == 1:
            for c in tl.static_range(D * BITS // 8 // 16):  # unit c holds words 4 c .. 4 c + 3
                tl.store(DATA.to(tl.pointer_type(tl.int32)) + (rows >> 2)[:, None] + (4 * c + tl.arange(0, 4))[None, :],
                         datas[c].to(tl.int32, bitcast=True), mask=rmask[:, None])
            for g in tl.static_range(D // G):
                tl.store(META + meta_rows + g, words[g], mask=rmask)
        else:
            requantize_groups(datas, metas, DATA, META, rows, meta_rows, rmask, HSIGN, ROTATE, RB, PS, HB, D,
                              S_BITS, S_KC, BITS, G, KC)
    else:
        requantize_groups(datas, metas, DATA, META, rows, meta_rows, rmask, HSIGN, ROTATE, RB, PS, HB, D, S_BITS,
                          S_KC, BITS, G, KC)


@triton.jit
def _lanes_fold(w, BITS: tl.constexpr, ANY: tl.constexpr):
    """uint32 words of ``BITS``-bit lanes -> each lane's OR (ANY) or AND of its bits, in the lane's
    lowest bit (the other bits: junk)."""
    if BITS >= 2:
        w = (w | (w >> 1)) if ANY else (w & (w >> 1))
    if BITS >= 4:
        w = (w | (w >> 2)) if ANY else (w & (w >> 2))
    if BITS >= 8:
        w = (w | (w >> 4)) if ANY else (w & (w >> 4))
    return w


@triton.jit
def kept_codes(datas, metas, RB: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr):
    """Requantizing a row at its own codec (``BITS``, per-token groups of ``G``): (int32 ``[RB]``, 1
    where every group's codes come back unchanged; per group the new meta words ``[RB]``). A group
    keeps its codes if they include 0 and ``levels = 2^BITS - 1`` (so its minimum is ``x_0 =
    RN(zero)`` and its maximum ``x_L = RN(levels scale + zero)``: dequantizing is monotone; the new
    meta is ``group_meta(x_0, x_L)``, zero' = zero) and the bound below is under 1/2: with ``x_c =
    RN(c scale + zero)`` and ``a = RN(x_c - zero')`` within ``2^-24 (|zero| + 2 levels scale)`` of
    ``c scale`` each, ``RN(a / scale')`` is within ``levels |1 - scale / scale'| + 2^-23 (|zero| + 2
    levels scale) / scale' + (levels + 1) 2^-24`` of c, so it rounds to c."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    P: tl.constexpr = D * BITS // 8 if BITS < 8 else D
    ok = tl.full([RB], 1, tl.int32)
    words = ()
    for g in tl.static_range(D // G):
        has_min = tl.zeros([RB], tl.int32)
        has_max = tl.zeros([RB], tl.int32)
        for m in tl.static_range(G // 16):
            w = datas[g * (G // 16) + m]
            lanes = 0x01010101 << ((16 * (g * (G // 16) + m)) // P * BITS)  # lowest bits of the unit's plane
            has_min |= tl.max((((_lanes_fold(w, BITS, True) & lanes) ^ lanes) != 0).to(tl.int32), 1)
            has_max |= tl.max(((_lanes_fold(w, BITS, False) & lanes) != 0).to(tl.int32), 1)
        scale, zero = split_word(metas[g * (G // 16)])
        lo = tl.fma(tl.zeros_like(scale), scale, zero)
        hi = tl.fma(tl.full(scale.shape, LEVELS * 1.0, tl.float32), scale, zero)
        _, new_scale, word = group_meta(lo, hi, LEVELS)
        bound = ((LEVELS * tl.abs(new_scale - scale) + 2.0 ** -23 * (tl.abs(zero) + 2 * LEVELS * scale))
                 / tl.where(new_scale > 0, new_scale, 1.0) + (LEVELS + 1) * 2.0 ** -24)
        kept = (has_min != 0) & (has_max != 0) & (scale > 0) & (new_scale > 0) & (bound < 0.45)
        ok = ok & kept.to(tl.int32)
        words = words + (word,)
    return ok, words


@triton.jit
def requantize_groups(datas, metas, DATA, META, rows, meta_rows, rmask, HSIGN, ROTATE: tl.constexpr,
                      RB: tl.constexpr, PS: tl.constexpr, HB: tl.constexpr, D: tl.constexpr,
                      S_BITS: tl.constexpr, S_KC: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
                      KC: tl.constexpr):
    """``requantize_units``' arithmetic: without ROTATE one group at a time, so only one group's
    values are live."""
    UG: tl.constexpr = 1 if (KC or BITS == 16) else G // 16  # units per group
    C: tl.constexpr = (D * BITS // 8 if BITS < 8 else D) // 16  # units per destination plane
    LEVELS: tl.constexpr = (1 << BITS) - 1
    if ROTATE:
        every = ()
        for u in tl.static_range(D // 16):
            every = every + dequantize_unit(datas[u], metas[u], u, D, S_BITS, S_KC)
        every = rotate_units(every, HSIGN, RB, D)
    if BITS == 16:
        for u in tl.static_range(D // 16):
            if ROTATE:
                xs = (every[4 * u], every[4 * u + 1], every[4 * u + 2], every[4 * u + 3])
            else:
                xs = dequantize_unit(datas[u], metas[u], u, D, S_BITS, S_KC)
            x = join4(xs[0], xs[1], xs[2], xs[3])
            tl.store(DATA + rows[:, None] + (16 * u + tl.arange(0, 16))[None, :], x.to(tl.bfloat16),
                     mask=rmask[:, None])
    else:
        # unit u = j C + c fills bits 8 b + j BITS of the destination words 4 c + i; each t is
        # 2^23 + code, whose exponent bits shift out or cancel (uint32 wrap-around)
        words = ()
        for c in tl.static_range(C):
            words = words + (tl.zeros([RB, 4], tl.uint32),)
        for g in tl.static_range(D // 16 // UG):
            xs = ()
            for m in tl.static_range(UG):
                if ROTATE:
                    xs = xs + (every[4 * (g * UG + m)], every[4 * (g * UG + m) + 1], every[4 * (g * UG + m) + 2],
                               every[4 * (g * UG + m) + 3])
                else:
                    xs = xs + dequantize_unit(datas[g * UG + m], metas[g * UG + m], g * UG + m, D, S_BITS, S_KC)
            ts = quantize_group(xs, META, meta_rows, rmask, g * UG, RB, PS, HB, LEVELS, G, KC)
            updated = ()
            for c in tl.static_range(C):
                w = words[c]
                for m in tl.static_range(UG):
                    if (g * UG + m) % C == c:
                        for b in tl.static_range(4):
                            w += ((ts[4 * m + b].to(tl.uint32, bitcast=True) - MAGIC_BITS)
                                  << (8 * b + (g * UG + m) // C * BITS))
                updated = updated + (w,)
            words = updated
        for c in tl.static_range(C):
            tl.store(DATA.to(tl.pointer_type(tl.int32)) + (rows >> 2)[:, None] + (4 * c + tl.arange(0, 4))[None, :],
                     words[c].to(tl.int32, bitcast=True), mask=rmask[:, None])


@triton.jit
def _cat(a, b):
    """``[R, n]``, ``[R, n]`` -> ``[R, 2 n]`` (a first)."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), [a.shape[0], 2 * a.shape[1]])


@triton.jit
def _halves(x):
    """Inverse of ``_cat``."""
    return tl.split(tl.permute(tl.reshape(x, [x.shape[0], 2, x.shape[1] // 2]), (0, 2, 1)))


@triton.jit
def rotate_units(xs, HSIGN, RB: tl.constexpr, D: tl.constexpr):
    """The unit entries of ``x @ hadamard(D)`` (HSIGN: the +-1 matrix, float32) for unit entries
    ``xs``: the units joined into ``[RB, D]``, one IEEE float32 dot, split again."""
    INV_SQRT_D: tl.constexpr = 1.0 / (D ** 0.5)
    parts = ()
    for u in tl.static_range(D // 16):
        parts = parts + (join4(xs[4 * u], xs[4 * u + 1], xs[4 * u + 2], xs[4 * u + 3]),)
    for level in tl.static_range(D // 16):  # pairwise, log2(D / 16) rounds
        if len(parts) > 1:
            merged = ()
            for k in tl.static_range(len(parts) // 2):
                merged = merged + (_cat(parts[2 * k], parts[2 * k + 1]),)
            parts = merged
    offs = tl.arange(0, D)
    signs = tl.load(HSIGN + offs[:, None] * D + offs[None, :]).to(tl.bfloat16)
    # x = hi + mid + lo exactly (three bf16 parts of a float32); the +-1 products are exact on the
    # tensor cores, so this is a float32 sum of exact products (smallest parts first)
    x = parts[0]
    hi = x.to(tl.bfloat16)
    rest = x - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    acc = tl.dot(lo, signs, out_dtype=tl.float32)
    acc = tl.dot(mid, signs, acc)
    acc = tl.dot(hi, signs, acc)
    parts = (acc * INV_SQRT_D,)
    for level in tl.static_range(D // 16):
        if parts[0].shape[1] > 16:
            split = ()
            for k in tl.static_range(len(parts)):
                lo, hi = _halves(parts[k])
                split = split + (lo, hi)
            parts = split
    out = ()
    for u in tl.static_range(D // 16):
        b0, b1, b2, b3 = split4(parts[u])
        out = out + (b0, b1, b2, b3)
    return out
