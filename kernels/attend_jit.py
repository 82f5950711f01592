"""Triton building blocks shared by the decode and extend kernels: attend a block of query rows to
the cached tokens of one tier, reading the packed layout of ``sglang_kvc.codec`` directly.

Dequantization is factorized so that no per-element multiply is needed. With ``x = c * s + z`` per
group (code ``c``, fp16 scale ``s`` and zero ``z`` of the token's group):

* keys:   ``q . k = sum_g s_g * (q_g . c_g) + z_g * sum(q_g)``: one bf16 tensor-core dot per chunk
  on the raw codes, then one FMA per (row, token, group);
* values: ``sum_n p_n v_n = sum_g [ (p * s_g) @ c_g ] + sum_n p_n z_n``: the scale goes onto the
  probabilities, the zero is a per-row term.

Codes become bf16 by OR-ing them into the mantissa of 128.0 (``0x4300 | c == 128 + c`` exactly for
``c < 128``, one LOP3 per two codes with inline PTX); the 128 offset is folded into the zero term
using the same rounded operands, so it cancels exactly. 8-bit codes are read as two 4-bit planes,
``c = 16 * hi + lo``. Per-channel keys (``-kc``) are dequantized to bf16 (variant ``f16``: to fp16,
one fused ``c * scale + zero`` per key) and dotted; bf16 sides are dotted as they are.
Rows are query heads (decode) or (query, head) pairs (extend); tokens come from a list of slots
local to the tier, addressed in the frame arena by ``frame_jit`` (pages of one tier scattered over
frames, ``PPF`` pages per frame).
"""

import triton
import triton.language as tl

from .frame_jit import page_row_offset, slot_unit, token_offset
from .quant_jit import split_word

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _codes_asm(x, SHIFT: tl.constexpr, MASK2: tl.constexpr, F16: tl.constexpr):
    # 4 packed uint8 -> 4 codes as 16-bit floats (two x2 registers): each code OR-ed into the
    # mantissa of 128.0 (bf16, 0x4300) or 1024.0 (fp16, 0x6400); MASK2 = code mask in both halves.
    HIGH2: tl.constexpr = 0x64006400 if F16 else 0x43004300
    if SHIFT > 0:
        codes = tl.inline_asm_elementwise(
            asm=f"""{{
            .reg .b32 t;
            shr.b32 t, $2, {SHIFT};
            prmt.b32 $0, t, 0, 0x4140;
            prmt.b32 $1, t, 0, 0x4342;
            lop3.b32 $0, $0, {MASK2}, {HIGH2}, 0xEA;
            lop3.b32 $1, $1, {MASK2}, {HIGH2}, 0xEA;
            }}""",
            constraints="=r,=r,r", args=[x], dtype=tl.bfloat16, is_pure=True, pack=4)
    else:
        codes = tl.inline_asm_elementwise(
            asm=f"""{{
            prmt.b32 $0, $2, 0, 0x4140;
            prmt.b32 $1, $2, 0, 0x4342;
            lop3.b32 $0, $0, {MASK2}, {HIGH2}, 0xEA;
            lop3.b32 $1, $1, {MASK2}, {HIGH2}, 0xEA;
            }}""",
            constraints="=r,=r,r", args=[x], dtype=tl.bfloat16, is_pure=True, pack=4)
    if F16:  # the same 16 bits (a bitcast costs no instruction)
        codes = codes.to(tl.float16, bitcast=True)
    return codes


@triton.jit
def _codes(x, SHIFT: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr, F16: tl.constexpr):
    """uint8 bytes -> ``MAGIC + ((x >> SHIFT) & (2^BITS - 1))`` as bf16 (MAGIC 128) or fp16 (MAGIC
    1024), exact for BITS <= 4."""
    if USE_ASM:
        return _codes_asm(x, SHIFT, ((1 << BITS) - 1) * 0x10001, F16)
    v = x.to(tl.uint16)
    if SHIFT > 0:
        v = v >> SHIFT
    if F16:
        return ((v & ((1 << BITS) - 1)) | 0x6400).to(tl.float16, bitcast=True)
    else:
        return ((v & ((1 << BITS) - 1)) | 0x4300).to(tl.bfloat16, bitcast=True)


@triton.jit
def codes_bf16(x, SHIFT: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """uint8 bytes -> bf16 ``128 + ((x >> SHIFT) & (2^BITS - 1))`` (exact; BITS <= 4)."""
    return _codes(x, SHIFT, BITS, USE_ASM, False)


@triton.jit
def codes_f16(x, SHIFT: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """uint8 bytes -> fp16 ``1024 + ((x >> SHIFT) & (2^BITS - 1))`` (exact; BITS <= 8): the ``f16``
    decode variant's codes, 8-bit codes as one plane (one PRMT per two codes, the 0x64 exponent
    byte taken from the second operand: no mask)."""
    if USE_ASM and BITS == 8:
        return tl.inline_asm_elementwise(
            asm="""{
            prmt.b32 $0, $2, 0x64646464, 0x4140;
            prmt.b32 $1, $2, 0x64646464, 0x4342;
            }""",
            constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)
    return _codes(x, SHIFT, BITS, USE_ASM, True)


@triton.jit
def codes_f16_inplace(x, SHIFT: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
    """uint8 bytes -> fp16 ``1024 + (x & ((2^BITS - 1) << SHIFT))`` = ``1024 + 2^SHIFT * c``: the
    code masked where it lies, not shifted down (exact: ``2^SHIFT * c < 256``); the caller takes the
    factor ``2^SHIFT`` out after the dot (variant ``dense``). With inline PTX: two PRMT and two
    LOP3 per four codes, no SHR. 8-bit codes: ``codes_f16``."""
    if BITS == 8:
        return codes_f16(x, 0, 8, USE_ASM)
    MASK2: tl.constexpr = (((1 << BITS) - 1) << SHIFT) * 0x10001
    if USE_ASM:
        return tl.inline_asm_elementwise(
            asm=f"""{{
            prmt.b32 $0, $2, 0, 0x4140;
            prmt.b32 $1, $2, 0, 0x4342;
            lop3.b32 $0, $0, {MASK2}, 0x64006400, 0xEA;
            lop3.b32 $1, $1, {MASK2}, 0x64006400, 0xEA;
            }}""",
            constraints="=r,=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=4)
    return ((x.to(tl.uint16) & (((1 << BITS) - 1) << SHIFT)) | 0x6400).to(tl.float16, bitcast=True)


@triton.jit
def _q_chunks(q_ptrs, rmask, C: tl.constexpr, D: tl.constexpr, SCALE: tl.constexpr, F16: tl.constexpr = False):
    """Rows of q (any float dtype) as a tuple of bf16 chunks ``[R, C]`` times SCALE (a power of two);
    F16: the bf16-rounded rows as fp16 (exact for |q| in [2^-17, 65504])."""
    offs = tl.arange(0, C)
    out = ()
    for c in tl.static_range(D // C):
        q = tl.load(q_ptrs[:, None] + (c * C + offs)[None, :], mask=rmask[:, None], other=0.0)
        if F16:
            out = out + ((q.to(tl.float32).to(tl.bfloat16).to(tl.float32) * SCALE).to(tl.float16),)
        else:
            out = out + ((q.to(tl.float32).to(tl.bfloat16).to(tl.float32) * SCALE).to(tl.bfloat16),)
    return out


@triton.jit
def _scores_quant(qc, qc16, qsums, k_rows, km_rows, nmask, R: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                  BITS: tl.constexpr, G: tl.constexpr, C: tl.constexpr, USE_ASM: tl.constexpr,
                  F16: tl.constexpr = False):
    """Raw scores ``q . k`` [R, BN] for per-token-group quantized keys; qsums: per group sum(q_g).
    F16 (variant ``f16``): qc are fp16 and codes ``1024 + c`` fp16, 8-bit codes as one plane.
    (Per-token values are replicated over the lanes holding a column, so folding the softmax scale
    into them costs as much as applying it per element.)"""
    P: tl.constexpr = D * BITS // 8 if BITS < 8 else D
    MAGIC: tl.constexpr = 1024.0 if F16 else (128.0 * 17 if BITS == 8 else 128.0)
    offs = tl.arange(0, C)
    qk = tl.zeros([R, BN], tl.float32)
    for g in tl.static_range(D // G):
        scale, zero = split_word(tl.load(km_rows + g, mask=nmask, other=0))
        part = tl.zeros([R, BN], tl.float32)
        for cc in tl.static_range(G // C):
            # chunk (g * G + cc * C) // C of the head vector: plane (g*G + cc*C) // P at byte offset % P
            x = tl.load(k_rows[None, :] + ((g * G + cc * C) % P + offs)[:, None], mask=nmask[None, :], other=0)
            if F16:
                part = tl.dot(qc[g * (G // C) + cc],
                              codes_f16(x, ((g * G + cc * C) // P) * BITS if BITS < 8 else 0, BITS, USE_ASM), part)
            elif BITS == 8:
                part = tl.dot(qc16[g * (G // C) + cc], codes_bf16(x, 4, 4, USE_ASM), part)
                part = tl.dot(qc[g * (G // C) + cc], codes_bf16(x, 0, 4, USE_ASM), part)
            else:
                part = tl.dot(qc[g * (G // C) + cc], codes_bf16(x, ((g * G + cc * C) // P) * BITS, BITS, USE_ASM),
                              part)
        qk += part * scale[None, :] + qsums[g][:, None] * (zero - MAGIC * scale)[None, :]
    return qk


@triton.jit
def _fma_channel_asm(code, w):
    """fp16 codes ``1024 + c`` and their int32 meta words (scale low, zero high) -> fp16
    ``c * scale + zero`` rounded once (``fma.rn.f16x2``; ``c`` = code - 1024 is exact)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 c, s, z, m;
        mov.b32 m, 0x64006400;
        sub.rn.f16x2 c, $1, m;
        prmt.b32 s, $2, $3, 0x5410;
        prmt.b32 z, $2, $3, 0x7632;
        fma.rn.f16x2 $0, c, s, z;
        }""",
        constraints="=r,r,r,r", args=[code, w], dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _scores_channel(qc, k_rows, km_rows, nmask, R: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                    BITS: tl.constexpr, C: tl.constexpr, USE_ASM: tl.constexpr, F16: tl.constexpr = False,
                    KC_FMA: tl.constexpr = False):
    """Raw scores for per-channel (-kc) keys: codes dequantized per element, then dotted. Default:
    ``code * scale + zero`` in float32, rounded to bf16 (qc bf16). F16 (variant ``f16``, qc fp16):
    the fp16 scale and zero of the meta word are used as they are, ``c * scale + zero`` rounded
    once to fp16 (with inline PTX one ``fma.rn.f16x2`` per two keys, no fp32 conversion); no
    worse than bf16: unit roundoff 2^-11, plus 2^-25 absolute below fp16's normal range."""
    P: tl.constexpr = D * BITS // 8 if BITS < 8 else D
    offs = tl.arange(0, C)
    qk = tl.zeros([R, BN], tl.float32)
    for c in tl.static_range(D // C):
        x = tl.load(k_rows[None, :] + ((c * C) % P + offs)[:, None], mask=nmask[None, :], other=0)
        w = tl.load(km_rows[None, :] + (c * C + offs)[:, None], mask=nmask[None, :], other=0)
        if F16:
            code = codes_f16(x, ((c * C) // P) * BITS if BITS < 8 else 0, BITS, USE_ASM)
            if USE_ASM and KC_FMA:
                k = _fma_channel_asm(code, w)
            else:  # float32 FMA, then one rounding to fp16
                scale, zero = split_word(w)
                k = ((code.to(tl.float32) - 1024.0) * scale + zero).to(tl.float16)
        else:
            scale, zero = split_word(w)
            if BITS == 8:
                code = x.to(tl.float32)
            else:
                code = codes_bf16(x, ((c * C) // P) * BITS, BITS, False).to(tl.float32) - 128.0
            k = (code * scale + zero).to(tl.bfloat16)
        qk = tl.dot(qc[c], k, qk)
    return qk


@triton.jit
def _values_quant(acc, alpha, p, v_rows, vm_rows, nmask, BN: tl.constexpr, DV: tl.constexpr,
                  BITS: tl.constexpr, G: tl.constexpr, CV: tl.constexpr, USE_ASM: tl.constexpr,
                  F16: tl.constexpr = False):
    """acc_c <- alpha * acc_c + sum_n p_n v_n (chunk c) for per-token-group quantized values.
    F16 (variant ``f16``): ``p * s`` rounded to fp16 and codes ``1024 + c`` fp16, 8-bit as one plane."""
    P: tl.constexpr = DV * BITS // 8 if BITS < 8 else DV
    MAGIC: tl.constexpr = 1024.0 if F16 else (128.0 * 17 if BITS == 8 else 128.0)
    offs = tl.arange(0, CV)
    out = ()
    for g in tl.static_range(DV // G):
        scale, zero = split_word(tl.load(vm_rows + g, mask=nmask, other=0))
        if F16:
            pg = (p * scale[None, :]).to(tl.float16)
        else:
            pg = (p * scale[None, :]).to(tl.bfloat16)
        if BITS == 8 and not F16:
            pg16 = (p * (scale * 16.0)[None, :]).to(tl.bfloat16)
        corr = tl.sum(p * zero[None, :] - MAGIC * pg.to(tl.float32), 1)
        for cc in tl.static_range(G // CV):
            x = tl.load(v_rows[:, None] + ((g * G + cc * CV) % P + offs)[None, :], mask=nmask[:, None], other=0)
            a = acc[g * (G // CV) + cc] * alpha[:, None] + corr[:, None]
            if F16:
                a = tl.dot(pg, codes_f16(x, ((g * G + cc * CV) // P) * BITS if BITS < 8 else 0, BITS, USE_ASM), a)
            elif BITS == 8:
                a = tl.dot(pg16, codes_bf16(x, 4, 4, USE_ASM), a)
                a = tl.dot(pg, codes_bf16(x, 0, 4, USE_ASM), a)
            else:
                a = tl.dot(pg, codes_bf16(x, ((g * G + cc * CV) // P) * BITS, BITS, USE_ASM), a)
            out = out + (a,)
    return out


@triton.jit
def _pow2(SHIFT):
    """``2^SHIFT`` as float32 (a compile-time constant: SHIFT is one)."""
    return (tl.full([], 1, tl.int32) << SHIFT).to(tl.float32)


@triton.jit
def _scores_planes(qc, qsums, k_rows, km_rows, nmask, R: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                   BITS: tl.constexpr, G: tl.constexpr, C: tl.constexpr, USE_ASM: tl.constexpr):
    """Raw scores ``q . k`` [R, BN] for per-token-group quantized keys, variant ``dense``: fp16 qc,
    codes masked in place (``codes_f16_inplace``, ``1024 + 2^S * c``); the chunks of a group that
    share a plane are dotted into one part, which gets ``scale / 2^S`` and the zero term
    ``qsum * (zero - 1024 * scale / 2^S)``. qsums: per chunk of C elements, sum(q)."""
    P: tl.constexpr = D * BITS // 8 if BITS < 8 else D
    offs = tl.arange(0, C)
    qk = tl.zeros([R, BN], tl.float32)
    for g in tl.static_range(D // G):
        scale, zero = split_word(tl.load(km_rows + g, mask=nmask, other=0))
        part = tl.zeros([R, BN], tl.float32)
        qsum = tl.zeros([R], tl.float32)
        for cc in tl.static_range(G // C):  # element g*G + cc*C, at bit (its plane) * BITS of its byte
            x = tl.load(k_rows[None, :] + ((g * G + cc * C) % P + offs)[:, None], mask=nmask[None, :], other=0)
            part = tl.dot(qc[(g * G + cc * C) // C],
                          codes_f16_inplace(x, ((g * G + cc * C) // P) * BITS, BITS, USE_ASM), part)
            qsum += qsums[(g * G + cc * C) // C]
            if cc == G // C - 1 or (g * G + cc * C + C) // P != (g * G + cc * C) // P:
                step = scale / _pow2(((g * G + cc * C) // P) * BITS)
                qk += part * step[None, :] + qsum[:, None] * (zero - 1024.0 * step)[None, :]
                part = tl.zeros([R, BN], tl.float32)
                qsum = tl.zeros([R], tl.float32)
    return qk


@triton.jit
def _acc_units(acc, FACTOR_OF_CHUNK: tl.constexpr, P: tl.constexpr, BITS: tl.constexpr, CV: tl.constexpr,
               DV: tl.constexpr):
    """acc chunks times (FACTOR_OF_CHUNK) or divided by (not) ``2^S`` of their plane (variant
    ``dense``: inside a tier the value accumulator of a chunk at plane shift S holds 2^S x the sum)."""
    out = ()
    for c in tl.static_range(DV // CV):
        if FACTOR_OF_CHUNK:
            out = out + (acc[c] * _pow2((c * CV // P) * BITS),)
        else:
            out = out + (acc[c] / _pow2((c * CV // P) * BITS),)
    return out


@triton.jit
def _values_planes(acc, alpha, p, v_rows, vm_rows, nmask, BN: tl.constexpr, DV: tl.constexpr,
                   BITS: tl.constexpr, G: tl.constexpr, CV: tl.constexpr, USE_ASM: tl.constexpr):
    """acc_c <- alpha * acc_c + 2^S_c sum_n p_n v_n (chunk c) for per-token-group quantized values,
    variant ``dense``: ``p * s`` rounded to fp16 (as ``f16``), codes masked in place
    (``1024 + 2^S * c``), so acc_c is kept in units of ``2^-S_c`` (``_acc_units``) and the
    per-row zero term is ``2^S * sum(p z) - 1024 * sum(p s)``."""
    P: tl.constexpr = DV * BITS // 8 if BITS < 8 else DV
    offs = tl.arange(0, CV)
    out = ()
    for g in tl.static_range(DV // G):
        scale, zero = split_word(tl.load(vm_rows + g, mask=nmask, other=0))
        pg = (p * scale[None, :]).to(tl.float16)
        for cc in tl.static_range(G // CV):  # element g*G + cc*CV, at bit (its plane) * BITS of its byte
            corr = tl.sum(p * zero[None, :] - (1024.0 / _pow2(((g * G + cc * CV) // P) * BITS)) * pg.to(tl.float32),
                          1) * _pow2(((g * G + cc * CV) // P) * BITS)
            x = tl.load(v_rows[:, None] + ((g * G + cc * CV) % P + offs)[None, :], mask=nmask[:, None], other=0)
            a = acc[(g * G + cc * CV) // CV] * alpha[:, None] + corr[:, None]
            out = out + (tl.dot(pg, codes_f16_inplace(x, ((g * G + cc * CV) // P) * BITS, BITS, USE_ASM), a),)
    return out


@triton.jit
def _values_bf16(acc, alpha, p, v_rows, nmask, DV: tl.constexpr, CV: tl.constexpr):
    offs = tl.arange(0, CV)
    pb = p.to(tl.bfloat16)
    out = ()
    for c in tl.static_range(DV // CV):
        v = tl.load(v_rows[:, None] + (c * CV + offs)[None, :], mask=nmask[:, None], other=0.0)
        out = out + (tl.dot(pb, v, acc[c] * alpha[:, None]),)
    return out


@triton.jit
def attend_tier(acc, m_i, l_i, q_ptrs, qr_ptrs, rmask, slot_ptr, lo, hi, kv_head,
                K, KM, V, VM, KS, KMS, VS, VMS,
                sm_scale, LOGIT_CAP: tl.constexpr,
                R: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, CV: tl.constexpr,
                PAGE: tl.constexpr, USE_ASM: tl.constexpr,
                BK: tl.constexpr, GK: tl.constexpr, KC: tl.constexpr, ROT: tl.constexpr, CK: tl.constexpr,
                BV: tl.constexpr, GV: tl.constexpr, CV_TIER: tl.constexpr, PPF: tl.constexpr,
                PAGE_UNITS: tl.constexpr, WASTE_UNITS: tl.constexpr, F16: tl.constexpr = False,
                PLANES: tl.constexpr = False, KC_FMA: tl.constexpr = False):
    """Online-softmax update of (acc, m_i, l_i) with the tokens ``slot_ptr[lo:hi]`` of one tier.

    acc: tuple of ``DV // CV`` float32 ``[R, CV]``; m_i, l_i: float32 ``[R]`` (log2 domain);
    q_ptrs / qr_ptrs: ``[R]`` pointers to each row's query (original / Hadamard-rotated basis);
    slot_ptr: int32 local slots of this tier; K/KM/V/VM: the tier's layer views of the arena (meta
    as int32) and KS/KMS/VS/VMS their (token, head) strides; PPF, PAGE_UNITS, WASTE_UNITS: where the
    tier's pages lie in the frames (``frame_jit``); F16: variant ``f16`` (fp16 dot operands with the
    ``1024 + c`` codes on per-token-group quantized sides; ``decode.VARIANTS``); PLANES (with F16,
    variant ``dense``): codes masked in place (``_scores_planes`` / ``_values_planes``).
    """
    K_ITEM: tl.constexpr = 2 if BK == 16 else 1
    V_ITEM: tl.constexpr = 2 if BV == 16 else 1
    if ROT:
        qsrc = qr_ptrs
    else:
        qsrc = q_ptrs
    K_F16: tl.constexpr = F16 and BK < 16 and not KC
    V_F16: tl.constexpr = F16 and BV < 16
    qc = _q_chunks(qsrc, rmask, CK, D, 1.0, F16 and BK < 16)
    if BK == 8 and not K_F16:
        qc16 = _q_chunks(qsrc, rmask, CK, D, 16.0)
    else:
        qc16 = qc
    if LOGIT_CAP > 0:
        qk_scale = sm_scale
    else:
        qk_scale = sm_scale * LOG2E
    K_PLANES: tl.constexpr = PLANES and K_F16
    V_PLANES: tl.constexpr = PLANES and V_F16
    PV: tl.constexpr = DV * BV // 8 if BV < 8 else DV
    qsums = ()
    if K_PLANES:
        for c in tl.static_range(D // CK):
            qsums = qsums + (tl.sum(qc[c].to(tl.float32), 1),)
    elif BK < 16 and not KC:
        for g in tl.static_range(D // GK):
            qsum = tl.zeros([R], tl.float32)
            for cc in tl.static_range(GK // CK):
                qsum += tl.sum(qc[(g * GK) // CK + cc].to(tl.float32), 1)
            qsums = qsums + (qsum,)
    if V_PLANES:
        acc = _acc_units(acc, True, PV, BV, CV, DV)
    for start in range(lo, hi, BN):
        offs_n = start + tl.arange(0, BN)
        nmask = offs_n < hi
        unit, tok = slot_unit(tl.load(slot_ptr + offs_n, mask=nmask, other=0), PAGE, PPF, PAGE_UNITS, WASTE_UNITS)
        k_rows = K + token_offset(unit, tok, kv_head, KS, K_ITEM)
        if BK == 16:
            qk = tl.zeros([R, BN], tl.float32)
            offs_c = tl.arange(0, CK)
            for c in tl.static_range(D // CK):
                kc = tl.load(k_rows[None, :] + (c * CK + offs_c)[:, None], mask=nmask[None, :], other=0.0)
                qk = tl.dot(qc[c], kc, qk)
        elif KC:
            km_rows = KM + page_row_offset(unit, kv_head, KMS, 4)
            qk = _scores_channel(qc, k_rows, km_rows, nmask, R, BN, D, BK, CK, USE_ASM, F16, KC_FMA)
        elif K_PLANES:
            km_rows = KM + token_offset(unit, tok, kv_head, KMS, 4)
            qk = _scores_planes(qc, qsums, k_rows, km_rows, nmask, R, BN, D, BK, GK, CK, USE_ASM)
        else:
            km_rows = KM + token_offset(unit, tok, kv_head, KMS, 4)
            qk = _scores_quant(qc, qc16, qsums, k_rows, km_rows, nmask, R, BN, D, BK, GK, CK, USE_ASM, K_F16)
        qk = qk * qk_scale
        if LOGIT_CAP > 0:  # qk_scale was sm_scale alone: cap the natural-unit logits, then go to log2
            qk = LOGIT_CAP * (2.0 * tl.sigmoid(2.0 * qk / LOGIT_CAP) - 1.0) * LOG2E
        qk = tl.where(nmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = V + token_offset(unit, tok, kv_head, VS, V_ITEM)
        if BV == 16:
            acc = _values_bf16(acc, alpha, p, v_rows, nmask, DV, CV)
        elif V_PLANES:
            vm_rows = VM + token_offset(unit, tok, kv_head, VMS, 4)
            acc = _values_planes(acc, alpha, p, v_rows, vm_rows, nmask, BN, DV, BV, GV, CV, USE_ASM)
        else:
            vm_rows = VM + token_offset(unit, tok, kv_head, VMS, 4)
            acc = _values_quant(acc, alpha, p, v_rows, vm_rows, nmask, BN, DV, BV, GV, CV, USE_ASM, V_F16)
        m_i = m_new
    if V_PLANES:
        acc = _acc_units(acc, False, PV, BV, CV, DV)
    return acc, m_i, l_i


@triton.jit
def attend_all_tiers(acc, m_i, l_i, q_ptrs, qr_ptrs, rmask, SLOTS, SEG_START, SEG_LEN, seg_row, lo, hi,
                     kv_head, BUFS, STRIDES, sm_scale, LOGIT_CAP: tl.constexpr, SPECS: tl.constexpr,
                     NUM_TIERS: tl.constexpr, R: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                     DV: tl.constexpr, CV: tl.constexpr, PAGE: tl.constexpr, USE_ASM: tl.constexpr,
                     F16: tl.constexpr = False, PLANES: tl.constexpr = False, KC_FMA: tl.constexpr = False):
    """Attend to positions ``[lo, hi)`` of one sequence's tier-sorted cached tokens (segments of
    ``seg_row``: tier 0's tokens first, then tier 1's, ...), whatever tiers they fall in.
    BUFS / STRIDES: ``spec.FrameViews`` (per tier four arena views and their (token, head)
    strides); SPECS: ``spec.layout_consts`` (per tier its ``TierConsts``, frame placement last)."""
    base = 0
    for t in tl.static_range(NUM_TIERS):
        seg_start = tl.load(SEG_START + seg_row + t)
        seg_len = tl.load(SEG_LEN + seg_row + t)
        a = tl.maximum(lo, base)
        e = tl.minimum(hi, base + seg_len)
        if a < e:
            acc, m_i, l_i = attend_tier(
                acc, m_i, l_i, q_ptrs, qr_ptrs, rmask, SLOTS + seg_start - base, a, e, kv_head,
                BUFS[t][0], BUFS[t][1], BUFS[t][2], BUFS[t][3],
                STRIDES[t][0], STRIDES[t][1], STRIDES[t][2], STRIDES[t][3],
                sm_scale, LOGIT_CAP, R, BN, D, DV, CV, PAGE, USE_ASM,
                SPECS[t][0], SPECS[t][1], SPECS[t][2], SPECS[t][3], SPECS[t][4],
                SPECS[t][5], SPECS[t][6], SPECS[t][7], SPECS[t][8], SPECS[t][9], SPECS[t][10], F16, PLANES, KC_FMA)
        base += seg_len
    return acc, m_i, l_i


@triton.jit
def zeros_acc(R: tl.constexpr, DV: tl.constexpr, CV: tl.constexpr):
    out = ()
    for c in tl.static_range(DV // CV):
        out = out + (tl.zeros([R, CV], tl.float32),)
    return out


# Variant "rows" (decode only): the R = 16 rows of the score tile are J sub-splits x GROUP query
# heads (row r: sub-split r // GROUP, head r % GROUP), so with GQA 4 every row is real and each
# elementwise op on the tile covers 4x the tokens. Sub-split j reads its own BN tokens per step;
# a dot of the (head-replicated) queries with sub-split j's codes is right on j's rows only, so
# the J key dots are merged by selects and the probabilities are masked to j's rows before j's
# value dot (the dots per token stay those of the default kernel). Per-token meta is loaded per
# element of the [R, BN] tile. Codes as variant "dense" (fp16, masked in place).


@triton.jit
def _merge_rows(parts, row_sub, J: tl.constexpr):
    """[R, BN] tile whose rows of sub-split j come from ``parts[j]``."""
    out = parts[0]
    for j in tl.static_range(1, J):
        out = tl.where(row_sub[:, None] == j, parts[j], out)
    return out


@triton.jit
def _zeros_parts(R: tl.constexpr, BN: tl.constexpr, J: tl.constexpr):
    out = ()
    for j in tl.static_range(J):
        out = out + (tl.zeros([R, BN], tl.float32),)
    return out


@triton.jit
def _scores_rows(qc, qsums, k_rows, km2, nmask, nmask2, row_sub, R: tl.constexpr, BN: tl.constexpr,
                 D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr, C: tl.constexpr, J: tl.constexpr,
                 USE_ASM: tl.constexpr):
    """Raw scores [R, BN] (row r, column n: sub-split r // GROUP's token n) for per-token-group
    quantized keys, as ``_scores_planes`` per sub-split; k_rows / nmask: per sub-split [BN] code
    rows and mask; km2 / nmask2: [R, BN] meta rows and mask (row r: its sub-split's tokens)."""
    P: tl.constexpr = D * BITS // 8 if BITS < 8 else D
    offs = tl.arange(0, C)
    qk = tl.zeros([R, BN], tl.float32)
    for g in tl.static_range(D // G):
        scale, zero = split_word(tl.load(km2 + g, mask=nmask2, other=0))
        parts = _zeros_parts(R, BN, J)
        qsum = tl.zeros([R], tl.float32)
        for cc in tl.static_range(G // C):  # element g*G + cc*C, at bit (its plane) * BITS of its byte
            grown = ()
            for j in tl.static_range(J):
                x = tl.load(k_rows[j][None, :] + ((g * G + cc * C) % P + offs)[:, None], mask=nmask[j][None, :],
                            other=0)
                grown = grown + (tl.dot(qc[(g * G + cc * C) // C],
                                        codes_f16_inplace(x, ((g * G + cc * C) // P) * BITS, BITS, USE_ASM),
                                        parts[j]),)
            parts = grown
            qsum += qsums[(g * G + cc * C) // C]
            if cc == G // C - 1 or (g * G + cc * C + C) // P != (g * G + cc * C) // P:
                step = scale / _pow2(((g * G + cc * C) // P) * BITS)
                qk += _merge_rows(parts, row_sub, J) * step + qsum[:, None] * (zero - 1024.0 * step)
                parts = _zeros_parts(R, BN, J)
                qsum = tl.zeros([R], tl.float32)
    return qk


@triton.jit
def _scores_rows_bf16(qc, k_rows, nmask, row_sub, R: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                      C: tl.constexpr, J: tl.constexpr):
    offs = tl.arange(0, C)
    parts = ()
    for j in tl.static_range(J):
        part = tl.zeros([R, BN], tl.float32)
        for c in tl.static_range(D // C):
            kc = tl.load(k_rows[j][None, :] + (c * C + offs)[:, None], mask=nmask[j][None, :], other=0.0)
            part = tl.dot(qc[c], kc, part)
        parts = parts + (part,)
    return _merge_rows(parts, row_sub, J)


@triton.jit
def _values_rows(acc, alpha, p, v_rows, vm2, nmask, nmask2, row_sub, BN: tl.constexpr, DV: tl.constexpr,
                 BITS: tl.constexpr, G: tl.constexpr, CV: tl.constexpr, J: tl.constexpr, USE_ASM: tl.constexpr):
    """``_values_planes`` with sub-split j's probabilities (its rows of p) dotted with its codes."""
    P: tl.constexpr = DV * BITS // 8 if BITS < 8 else DV
    offs = tl.arange(0, CV)
    out = ()
    for g in tl.static_range(DV // G):
        scale, zero = split_word(tl.load(vm2 + g, mask=nmask2, other=0))
        pg = (p * scale).to(tl.float16)
        pgs = ()
        for j in tl.static_range(J):
            pgs = pgs + (tl.where(row_sub[:, None] == j, pg, 0.0),)
        for cc in tl.static_range(G // CV):  # element g*G + cc*CV, at bit (its plane) * BITS of its byte
            corr = tl.sum(p * zero - (1024.0 / _pow2(((g * G + cc * CV) // P) * BITS)) * pg.to(tl.float32),
                          1) * _pow2(((g * G + cc * CV) // P) * BITS)
            a = acc[(g * G + cc * CV) // CV] * alpha[:, None] + corr[:, None]
            for j in tl.static_range(J):
                x = tl.load(v_rows[j][:, None] + ((g * G + cc * CV) % P + offs)[None, :], mask=nmask[j][:, None],
                            other=0)
                a = tl.dot(pgs[j], codes_f16_inplace(x, ((g * G + cc * CV) // P) * BITS, BITS, USE_ASM), a)
            out = out + (a,)
    return out


@triton.jit
def _values_rows_bf16(acc, alpha, p, v_rows, nmask, row_sub, DV: tl.constexpr, CV: tl.constexpr, J: tl.constexpr):
    offs = tl.arange(0, CV)
    pb = p.to(tl.bfloat16)
    pbs = ()
    for j in tl.static_range(J):
        pbs = pbs + (tl.where(row_sub[:, None] == j, pb, 0.0),)
    out = ()
    for c in tl.static_range(DV // CV):
        a = acc[c] * alpha[:, None]
        for j in tl.static_range(J):
            v = tl.load(v_rows[j][:, None] + (c * CV + offs)[None, :], mask=nmask[j][:, None], other=0.0)
            a = tl.dot(pbs[j], v, a)
        out = out + (a,)
    return out


@triton.jit
def attend_tier_rows(acc, m_i, l_i, q_ptrs, qr_ptrs, rmask, row_sub, slot_ptr, los, his, lo_r, hi_r, kv_head,
                     K, KM, V, VM, KS, KMS, VS, VMS,
                     sm_scale, LOGIT_CAP: tl.constexpr,
                     R: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, CV: tl.constexpr,
                     PAGE: tl.constexpr, USE_ASM: tl.constexpr,
                     BK: tl.constexpr, GK: tl.constexpr, KC: tl.constexpr, ROT: tl.constexpr, CK: tl.constexpr,
                     BV: tl.constexpr, GV: tl.constexpr, CV_TIER: tl.constexpr, PPF: tl.constexpr,
                     PAGE_UNITS: tl.constexpr, WASTE_UNITS: tl.constexpr, J: tl.constexpr):
    """``attend_tier`` for variant ``rows``: sub-split j attends to positions ``[los[j], his[j])``
    (scalars; lo_r / hi_r: the same per row) of the tier's slots ``slot_ptr``; rows whose range
    is used up see only masked tokens (their m_i, l_i, acc stay). No ``-kc`` keys."""
    K_ITEM: tl.constexpr = 2 if BK == 16 else 1
    V_ITEM: tl.constexpr = 2 if BV == 16 else 1
    K_Q: tl.constexpr = BK < 16
    V_Q: tl.constexpr = BV < 16
    PV: tl.constexpr = DV * BV // 8 if BV < 8 else DV
    if ROT:
        qsrc = qr_ptrs
    else:
        qsrc = q_ptrs
    qc = _q_chunks(qsrc, rmask, CK, D, 1.0, K_Q)
    if LOGIT_CAP > 0:
        qk_scale = sm_scale
    else:
        qk_scale = sm_scale * LOG2E
    qsums = ()
    if K_Q:
        for c in tl.static_range(D // CK):
            qsums = qsums + (tl.sum(qc[c].to(tl.float32), 1),)
    if V_Q:
        acc = _acc_units(acc, True, PV, BV, CV, DV)
    span = his[0] - los[0]
    for j in tl.static_range(1, J):
        span = tl.maximum(span, his[j] - los[j])
    offs_b = tl.arange(0, BN)
    for start in range(0, span, BN):
        k_rows = ()
        v_rows = ()
        nmask = ()
        for j in tl.static_range(J):
            offs_n = los[j] + start + offs_b
            nm = offs_n < his[j]
            unit, tok = slot_unit(tl.load(slot_ptr + offs_n, mask=nm, other=0), PAGE, PPF, PAGE_UNITS, WASTE_UNITS)
            k_rows = k_rows + (K + token_offset(unit, tok, kv_head, KS, K_ITEM),)
            v_rows = v_rows + (V + token_offset(unit, tok, kv_head, VS, V_ITEM),)
            nmask = nmask + (nm,)
        offs2 = lo_r[:, None] + start + offs_b[None, :]
        nmask2 = offs2 < hi_r[:, None]
        # queries reloaded every step (L1 hits) under a mask the compiler cannot hoist: kept live
        # across the loop, their dot-operand registers get copied before every MMA
        qc = _q_chunks(qsrc, rmask & (start < span), CK, D, 1.0, K_Q)
        if K_Q or V_Q:  # meta rows per element of the tile (row r: its sub-split's token)
            unit2, tok2 = slot_unit(tl.load(slot_ptr + offs2, mask=nmask2, other=0), PAGE, PPF, PAGE_UNITS,
                                    WASTE_UNITS)
        if K_Q:
            km2 = KM + token_offset(unit2, tok2, kv_head, KMS, 4)
            qk = _scores_rows(qc, qsums, k_rows, km2, nmask, nmask2, row_sub, R, BN, D, BK, GK, CK, J, USE_ASM)
        else:
            qk = _scores_rows_bf16(qc, k_rows, nmask, row_sub, R, BN, D, CK, J)
        qk = qk * qk_scale
        if LOGIT_CAP > 0:  # qk_scale was sm_scale alone: cap the natural-unit logits, then go to log2
            qk = LOGIT_CAP * (2.0 * tl.sigmoid(2.0 * qk / LOGIT_CAP) - 1.0) * LOG2E
        qk = tl.where(nmask2, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no token yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_Q:
            vm2 = VM + token_offset(unit2, tok2, kv_head, VMS, 4)
            acc = _values_rows(acc, alpha, p, v_rows, vm2, nmask, nmask2, row_sub, BN, DV, BV, GV, CV, J, USE_ASM)
        else:
            acc = _values_rows_bf16(acc, alpha, p, v_rows, nmask, row_sub, DV, CV, J)
        m_i = m_new
    if V_Q:
        acc = _acc_units(acc, False, PV, BV, CV, DV)
    return acc, m_i, l_i


@triton.jit
def attend_all_tiers_rows(acc, m_i, l_i, q_ptrs, qr_ptrs, rmask, row_sub, SLOTS, SEG_START, SEG_LEN, seg_row,
                          los, his, kv_head, BUFS, STRIDES, sm_scale, LOGIT_CAP: tl.constexpr,
                          SPECS: tl.constexpr, NUM_TIERS: tl.constexpr, R: tl.constexpr, BN: tl.constexpr,
                          D: tl.constexpr, DV: tl.constexpr, CV: tl.constexpr, PAGE: tl.constexpr,
                          USE_ASM: tl.constexpr, J: tl.constexpr):
    """``attend_all_tiers`` for variant ``rows``: sub-split j covers positions ``[los[j], his[j])``."""
    base = 0
    for t in tl.static_range(NUM_TIERS):
        seg_start = tl.load(SEG_START + seg_row + t)
        seg_len = tl.load(SEG_LEN + seg_row + t)
        tier_los = ()
        tier_his = ()
        lo_r = tl.zeros_like(row_sub)
        hi_r = tl.zeros_like(row_sub)
        any_tokens = False
        for j in tl.static_range(J):
            a = tl.maximum(los[j], base)
            e = tl.maximum(tl.minimum(his[j], base + seg_len), a)
            tier_los = tier_los + (a,)
            tier_his = tier_his + (e,)
            lo_r = tl.where(row_sub == j, a, lo_r)
            hi_r = tl.where(row_sub == j, e, hi_r)
            any_tokens = any_tokens | (a < e)
        if any_tokens:
            acc, m_i, l_i = attend_tier_rows(
                acc, m_i, l_i, q_ptrs, qr_ptrs, rmask, row_sub, SLOTS + seg_start - base, tier_los, tier_his,
                lo_r, hi_r, kv_head, BUFS[t][0], BUFS[t][1], BUFS[t][2], BUFS[t][3],
                STRIDES[t][0], STRIDES[t][1], STRIDES[t][2], STRIDES[t][3],
                sm_scale, LOGIT_CAP, R, BN, D, DV, CV, PAGE, USE_ASM,
                SPECS[t][0], SPECS[t][1], SPECS[t][2], SPECS[t][3], SPECS[t][4],
                SPECS[t][5], SPECS[t][6], SPECS[t][7], SPECS[t][8], SPECS[t][9], SPECS[t][10], J)
        base += seg_len
    return acc, m_i, l_i
