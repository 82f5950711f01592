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

The column helpers (``load_packed``, ``requantize_columns``; the requantize kernel) hold a head
vector in the destination's packing order: a tuple of ``4 N`` tensors ``[rows, P // 4]`` for
``N`` bit planes of ``P`` elements (``N = 8 // bits``, 1 for 8 and 16 bits), entry ``4 j + b``
holding elements ``j * P + 4 i + b``, so that entry's codes land in byte ``b`` of the packed
32-bit word ``i`` at bit ``8 b + j * bits``: packing and unpacking are elementwise shifts on
whole words. They avoid slow instructions without changing a bit of the
results above (for finite inputs, all a tier holds):

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
def load_packed(DATA, META, rows, meta_rows, rmask, RB: tl.constexpr, D: tl.constexpr, N: tl.constexpr,
                BITS: tl.constexpr, G: tl.constexpr, KC: tl.constexpr):
    """The bytes of the head vectors at ``DATA + rows`` (element offsets of each row), packed at
    ``BITS``, that each of the ``N`` *destination* planes needs, and their meta (``meta_rows``:
    offsets of each token's, for KC each page's, int32 meta row): a tuple ``(data, meta)`` of N
    entries each, undecoded (``dequantize_plane`` decodes one), so a kernel can issue every load
    first. Masked rows read as 0."""
    P: tl.constexpr = D // N
    Q: tl.constexpr = P // 4
    SP: tl.constexpr = D * BITS // 8 if BITS < 8 else D  # the source's plane: bytes per head
    CODE: tl.constexpr = (1 << BITS) - 1
    NG: tl.constexpr = max(P // G, 1)  # source groups per destination plane
    datas = ()
    metas = ()
    for j in tl.static_range(N):
        if BITS == 16:
            datas = datas + (tl.load(DATA + rows[:, None] + (j * P + tl.arange(0, P))[None, :], mask=rmask[:, None],
                                     other=0.0),)
            metas = metas + (rmask,)  # unused
        else:
            if P <= SP:  # inside one source plane: whole words, codes at fixed bits
                words = tl.load(DATA.to(tl.pointer_type(tl.int32)) + (rows >> 2)[:, None]
                                + ((j * P) % SP // 4 + tl.arange(0, Q))[None, :], mask=rmask[:, None], other=0)
                datas = datas + (words.to(tl.uint32, bitcast=True),)
            else:  # across source planes (a wider destination): each element's own byte and shift
                codes = ()
                for b in tl.static_range(4):
                    d = j * P + 4 * tl.arange(0, Q) + b
                    byte = tl.load(DATA + rows[:, None] + (d % SP)[None, :], mask=rmask[:, None], other=0)
                    codes = codes + ((byte.to(tl.int32) >> ((d // SP) * BITS)[None, :]) & CODE,)
                datas = datas + (codes,)
            if KC:  # every token of a page reads its page's (scale, zero) per channel
                metas = metas + (tl.load(META + meta_rows[:, None] + (j * P + tl.arange(0, P))[None, :],
                                         mask=rmask[:, None], other=0),)
            elif G >= P:  # one group for the whole plane
                metas = metas + (tl.load(META + meta_rows + (j * P) // G, mask=rmask, other=0),)
            else:
                metas = metas + (tl.load(META + meta_rows[:, None] + (j * NG + tl.arange(0, NG))[None, :],
                                         mask=rmask[:, None], other=0),)
    return datas, metas


@triton.jit
def dequantize_plane(data, meta, J: tl.constexpr, RB: tl.constexpr, D: tl.constexpr, N: tl.constexpr,
                     BITS: tl.constexpr, G: tl.constexpr, KC: tl.constexpr):
    """Destination plane ``J``'s entries of ``load_packed``, dequantized: the four float32 column
    tensors ``[RB, D // N // 4]`` of the module doc (entries ``4 J .. 4 J + 3``), stored basis."""
    P: tl.constexpr = D // N
    Q: tl.constexpr = P // 4
    SP: tl.constexpr = D * BITS // 8 if BITS < 8 else D
    NG: tl.constexpr = max(P // G, 1)
    GQ: tl.constexpr = max(G // 4, 1)
    if BITS == 16:
        return split4(data.to(tl.float32))
    else:
        cs = ()
        shifts = ()
        if P <= SP:
            low = data | MAGIC_BITS
            high = (data >> 16) + MAGIC_BITS
            for b in tl.static_range(4):
                cs = cs + (_word_codes(low, high, 8 * b + (J * P) // SP * BITS, BITS),)
                shifts = shifts + ((8 * b + (J * P) // SP * BITS) % 16,)
        else:
            for b in tl.static_range(4):
                cs = cs + (((data[b] | MAGIC_BITS).to(tl.float32, bitcast=True) - MAGIC),)
                shifts = shifts + (0,)
        xs = ()
        if KC:
            w0, w1, w2, w3 = split4(meta)
            ws = (w0, w1, w2, w3)
            for b in tl.static_range(4):
                scale, zero = split_word(ws[b])
                xs = xs + (_dequantize(cs[b], shifts[b], scale, zero),)
        elif G >= P:
            scale, zero = split_word(meta)
            for b in tl.static_range(4):
                xs = xs + (_dequantize(cs[b], shifts[b], tl.broadcast_to(scale[:, None], [RB, Q]),
                                       tl.broadcast_to(zero[:, None], [RB, Q])),)
        else:  # NG groups of G // 4 columns
            scale, zero = split_word(meta)
            for b in tl.static_range(4):
                x = _dequantize(tl.reshape(cs[b], [RB, NG, GQ]), shifts[b],
                                tl.broadcast_to(scale[:, :, None], [RB, NG, GQ]),
                                tl.broadcast_to(zero[:, :, None], [RB, NG, GQ]))
                xs = xs + (tl.reshape(x, [RB, Q]),)
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
def quantize_block(xs, META, meta_rows, rmask, J0: tl.constexpr, RB: tl.constexpr, PS: tl.constexpr,
                   HB: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, KC: tl.constexpr):
    """Quantize the columns ``xs`` of destination planes ``J0 ..`` (``plane_block`` planes: the
    groups they hold are complete), store their meta at ``META + meta_rows`` and return each
    entry's ``2^23 + code`` (``div_codes``). For KC the rows are whole pages ordered (page, token,
    head in ``HB``) and ``meta_rows`` gives every row its page's meta row."""
    N: tl.constexpr = 8 // BITS if BITS < 8 else 1
    P: tl.constexpr = D // N
    Q: tl.constexpr = P // 4
    LEVELS: tl.constexpr = (1 << BITS) - 1
    PB: tl.constexpr = max(RB // (PS * HB), 1)  # KC: pages per program
    NG: tl.constexpr = max(P // G, 1)  # G < P: groups per plane
    GQ: tl.constexpr = max(G // 4, 1)
    ts = ()
    if KC:  # one plane; one group per channel per page: reduce over the page's tokens
        page_meta = tl.max(tl.reshape(meta_rows, [PB, PS, HB]), 1)
        page_mask = tl.max(tl.reshape(rmask.to(tl.int32), [PB, PS, HB]), 1) > 0
        ws = ()
        for b in tl.static_range(4):
            pages = tl.reshape(xs[b], [PB, PS, HB, Q])
            zero, scale, word = group_meta(tl.min(pages, 1), tl.max(pages, 1), LEVELS)
            (t,) = _codes_of((pages,), zero[:, None, :, :], scale[:, None, :, :])
            ts = ts + (tl.reshape(t, [RB, Q]),)
            ws = ws + (tl.reshape(word, [PB * HB, Q]),)
        words = tl.reshape(join4(ws[0], ws[1], ws[2], ws[3]), [PB, HB, P])
        tl.store(META + page_meta[:, :, None] + (J0 * P + tl.arange(0, P))[None, None, :], words,
                 mask=page_mask[:, :, None])
    elif G >= P:  # one group of G // P whole planes: reduce across their columns, then along the row
        lo = xs[0]
        hi = xs[0]
        for m in tl.static_range(1, len(xs)):
            lo = tl.minimum(lo, xs[m])
            hi = tl.maximum(hi, xs[m])
        zero, scale, word = group_meta(tl.min(lo, 1), tl.max(hi, 1), LEVELS)
        ts = _codes_of(xs, zero[:, None], scale[:, None])
        tl.store(META + meta_rows + (J0 * P) // G, word, mask=rmask)
    else:  # one plane of NG groups of G // 4 columns
        group = ()
        for b in tl.static_range(4):
            group = group + (tl.reshape(xs[b], [RB, NG, GQ]),)
        lo = tl.minimum(tl.minimum(group[0], group[1]), tl.minimum(group[2], group[3]))
        hi = tl.maximum(tl.maximum(group[0], group[1]), tl.maximum(group[2], group[3]))
        zero, scale, word = group_meta(tl.min(lo, 2), tl.max(hi, 2), LEVELS)
        codes = _codes_of(group, zero[:, :, None], scale[:, :, None])
        for b in tl.static_range(4):
            ts = ts + (tl.reshape(codes[b], [RB, Q]),)
        tl.store(META + meta_rows[:, None] + (J0 * NG + tl.arange(0, NG))[None, :], word, mask=rmask[:, None])
    return ts


@triton.jit
def requantize_columns(datas, metas, DATA, META, rows, meta_rows, rmask, HSIGN, ROTATE: tl.constexpr,
                       RB: tl.constexpr, PS: tl.constexpr, HB: tl.constexpr, D: tl.constexpr,
                       S_BITS: tl.constexpr, S_G: tl.constexpr, S_KC: tl.constexpr,
                       BITS: tl.constexpr, G: tl.constexpr, KC: tl.constexpr):
    """Dequantize a side from ``load_packed`` (source ``S_BITS``, ``S_G``, ``S_KC``), rotate it by
    ``hadamard(D)`` if ROTATE, quantize it at ``BITS`` / ``G`` / ``KC`` and store it at ``DATA +
    rows`` (codes) and ``META + meta_rows`` (meta): same codes and meta as ``store_side`` (finite
    inputs). Without ROTATE it goes a block of whole groups at a time (``quantize_block``), so only
    one block's values are live; codes land in 32-bit words (module doc)."""
    N: tl.constexpr = 8 // BITS if BITS < 8 else 1
    P: tl.constexpr = D // N
    Q: tl.constexpr = P // 4
    JB: tl.constexpr = max(G // P, 1) if (BITS < 16 and not KC) else 1  # planes per block
    if ROTATE or BITS == 16:
        every = ()
        for j in tl.static_range(N):
            every = every + dequantize_plane(datas[j], metas[j], j, RB, D, N, S_BITS, S_G, S_KC)
        if ROTATE:
            every = rotate_columns(every, HSIGN, RB, D, N)
    if BITS == 16:
        x = join4(every[0], every[1], every[2], every[3])
        tl.store(DATA + rows[:, None] + tl.arange(0, P)[None, :], x.to(tl.bfloat16), mask=rmask[:, None])
    else:
        # word i holds entry 4 j + b's code at bit 8 b + j * BITS; each t is 2^23 + code
        word = tl.zeros([RB, Q], tl.uint32)
        for blk in tl.static_range(N // JB):
            xs = ()
            for m in tl.static_range(JB):
                if ROTATE:
                    j = blk * JB + m
                    xs = xs + (every[4 * j], every[4 * j + 1], every[4 * j + 2], every[4 * j + 3])
                else:
                    xs = xs + dequantize_plane(datas[blk * JB + m], metas[blk * JB + m], blk * JB + m, RB, D, N,
                                               S_BITS, S_G, S_KC)
            ts = quantize_block(xs, META, meta_rows, rmask, blk * JB, RB, PS, HB, D, BITS, G, KC)
            for m in tl.static_range(JB):
                for b in tl.static_range(4):
                    word += ((ts[4 * m + b].to(tl.uint32, bitcast=True) - MAGIC_BITS)
                             << (8 * b + (blk * JB + m) * BITS))
        tl.store(DATA.to(tl.pointer_type(tl.int32)) + (rows >> 2)[:, None] + tl.arange(0, Q)[None, :],
                 word.to(tl.int32, bitcast=True), mask=rmask[:, None])


@triton.jit
def rotate_columns(xs, HSIGN, RB: tl.constexpr, D: tl.constexpr, N: tl.constexpr):
    """The columns of ``x @ hadamard(D)`` (HSIGN: the +-1 matrix, float32) for columns ``xs`` of
    ``N`` planes: one IEEE float32 dot per pair of planes."""
    P: tl.constexpr = D // N
    INV_SQRT_D: tl.constexpr = 1.0 / (D ** 0.5)
    offs = tl.arange(0, P)
    planes = ()
    for j in tl.static_range(N):
        planes = planes + (join4(xs[4 * j], xs[4 * j + 1], xs[4 * j + 2], xs[4 * j + 3]),)
    out = ()
    for jo in tl.static_range(N):
        acc = tl.zeros([RB, P], tl.float32)
        for ji in tl.static_range(N):
            signs = tl.load(HSIGN + (ji * P + offs)[:, None] * D + (jo * P + offs)[None, :])
            acc = tl.dot(planes[ji], signs, acc, input_precision="ieee")
        b0, b1, b2, b3 = split4(acc * INV_SQRT_D)
        out = out + (b0, b1, b2, b3)
    return out
