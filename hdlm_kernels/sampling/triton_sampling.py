"""Triton backend of the sampling stream and of FP64 Gumbel-max (DESIGN.md §6), bit-identical to the
reference (``uniform53_ref``, ``log64``, ``_gumbel_argmax_reference``).

* ``_philox4x32_10``: Philox4x32-10 (Random123) on uint32 words: ``tl.umulhi`` for the high half of
  each product, the wrapping uint32 product for the low half (as ``triton.language.random`` does), and
  the Weyl key bump between rounds. Our counter layout is (n & 0xffffffff, n >> 32, stream,
  step & 0xffffffff) under the key (seed & 0xffffffff, seed >> 32); ``tl.randint4x`` cannot give it
  (its counter words 2 and 3 are 0).
* ``_uniform53``: k = (w_a >> 6) * 2^26 + (w_b >> 6), u = (2k + 1) * 2^-53, exact in float64.
* ``_log64``: the logarithm of :mod:`.log64`, operation by operation (bit extraction, the halving above
  the √2 bit pattern, f, s = f / (f + 2), z = s * s, Horner over the 11 coefficients, then
  e·LN2_HI + (e·LN2_LO + (s + s)·p)).
* ``_gumbel_argmax_kernel``: one program per sampled row, looping over the vocabulary in blocks of
  BLOCK_P Philox blocks (2·BLOCK_P columns); see the kernel's comments.
* ``_exp64``: the exponential of :mod:`.log64` (``exp64``), operation by operation.
* ``_hybrid_step_kernel``: the fused γ-hybrid step (:mod:`.hybrid`, "The fused form"), one program per
  row and three passes over it (max, fixed-point sum, Gumbel race with the Gumbel-max kernel's pairing
  of columns); bit-identical to ``_hybrid_step_reference``.

Bit-identity rests on four controls:

* float64 constants: the Horner coefficients, 1/ln 2 and the ln 2 split, and the hybrid step's scales
  (2^-1022 is not even a float32 number) are loaded from a float64 tensor (``_constants``), never
  written as Python float literals (which older Triton versions turn into float32 constants before
  widening); the temperature travels as the int64 bit pattern of the double and is bitcast back in the
  kernel (a Python float argument would be passed as float32). The only float literals left (0, 0.5,
  1.0, 2.0, 2^-53, ±inf) are exact in float32.
* float -> int conversions truncate (``cvt.rzi`` on NVIDIA GPUs, NumPy's ``astype`` in the interpreter),
  as torch's ``.to(torch.int64)`` does: exp64's k and the fixed-point digits of the hybrid step.
* no FMA contraction: every launch passes ``enable_fp_fusion=False``, so products and sums round
  separately as in the reference (the interpreter, which computes with NumPy, accepts and ignores it).
* float64 ``/`` is the IEEE correctly rounded division (``div.rn.f64`` on NVIDIA GPUs; NumPy in the
  interpreter).

On the CPU the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before this
module is imported, which ``hdlm_kernels`` does lazily, on the first ``backend="triton"`` call).
"""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

from .._triton_device import built_for_interpreter
from .._triton_device import check_triton_device as _check_triton_device
from .hybrid import FIXED_HI_SCALE, FIXED_HI_UNIT, FIXED_LO_SCALE, FIXED_LO_UNIT, SMALLEST_WEIGHT
from .log64 import EXP64_COEFFICIENTS, EXP64_MIN, INV_LN2, LN2_HI, LN2_LO, LOG64_COEFFICIENTS

__all__ = [
    "interpreted",
    "check_triton_device",
    "philox4x32_10_triton",
    "uniform53_triton",
    "log64_triton",
    "exp64_triton",
    "gumbel_noise_triton",
    "gumbel_argmax_triton",
    "hybrid_step_triton",
    "corrupt_triton",
]

# Pairs of columns (Philox blocks) per loop iteration of the Gumbel-max kernel, and elements per program
# of the element-wise kernels: GPU sizes, and larger ones under the interpreter, whose cost is per
# program and per operation rather than per element. On sm_90 the Gumbel-max kernel with 512 pairs and
# 8 warps (2 pairs, 4 columns per thread) compiles to 78 registers without spills (137 with 4 warps).
_GPU_BLOCK_PAIRS = 512
_INTERPRETER_BLOCK_PAIRS = 4096
_GPU_BLOCK = 1024
_INTERPRETER_BLOCK = 16384
_PAIRS_PER_WARP = 64
_MAX_WARPS = 8

# The hybrid step's kernel holds more per pair (the weight, its log and exp64 of the log-score besides the
# noise): on sm_90 256 pairs and 8 warps (1 pair per thread) compile to 92 registers without spills, where
# 2 pairs per thread need 128-159 and spill for fp32 input.
_HYBRID_GPU_BLOCK_PAIRS = 256
_HYBRID_PAIRS_PER_WARP = 32

_MAX_VOCAB = 2**30  # column arithmetic is int32 (2j - parity for j up to V / 2 + BLOCK_P)

# --------------------------------------------------------------------------------------------------
# device functions
# --------------------------------------------------------------------------------------------------


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of uint32 counter words (c0..c3) under uint32 key words (k0, k1)."""
    for round_index in tl.static_range(10):
        if round_index > 0:
            k0 = k0 + 0x9E3779B9  # uint32: wraps modulo 2^32
            k1 = k1 + 0xBB67AE85
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _stream_block(n, k0, k1, stream, step_lo):
    """The Philox block of pair n (int64 >= 0) of the stream: counter (n lo, n hi, stream, step lo)."""
    c0 = (n & 0xFFFFFFFF).to(tl.uint32)
    c1 = (n >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + stream
    c3 = tl.zeros_like(c0) + step_lo
    return _philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def _uniform53(word_a, word_b):
    """u = (k + 0.5) * 2^-52 = (2k + 1) * 2^-53 with k = (w_a >> 6) * 2^26 + (w_b >> 6): exact."""
    k = ((word_a >> 6).to(tl.int64) << 26) | (word_b >> 6).to(tl.int64)
    return ((k << 1) | 1).to(tl.float64) * 1.1102230246251565e-16  # 2^-53, exact in float32 too


@triton.jit
def _log64(x, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo):
    """log64 of float64 x (finite, normal, > 0), operation by operation as in log64.py.

    c0..c10, ln2_hi, ln2_lo: float64 scalars (loaded from the constants tensor)."""
    bits = x.to(tl.int64, bitcast=True)
    exponent = (bits >> 52) - 1023
    mantissa_bits = (bits & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000  # m in [1, 2)
    halve = mantissa_bits > 0x3FF6A09E667F3BCD  # the bit pattern of √2 rounded down
    mantissa_bits = tl.where(halve, mantissa_bits - 0x10000000000000, mantissa_bits)  # m / 2, exactly
    exponent = exponent + halve.to(tl.int64)
    f = mantissa_bits.to(tl.float64, bitcast=True) - 1.0
    s = f / (f + 2.0)
    z = s * s
    p = c10 * z + c9
    p = p * z + c8
    p = p * z + c7
    p = p * z + c6
    p = p * z + c5
    p = p * z + c4
    p = p * z + c3
    p = p * z + c2
    p = p * z + c1
    p = p * z + c0
    e = exponent.to(tl.float64)
    return e * ln2_hi + (e * ln2_lo + (s + s) * p)


@triton.jit
def _load_constants(CONSTS):
    return (tl.load(CONSTS + 0), tl.load(CONSTS + 1), tl.load(CONSTS + 2), tl.load(CONSTS + 3),
            tl.load(CONSTS + 4), tl.load(CONSTS + 5), tl.load(CONSTS + 6), tl.load(CONSTS + 7),
            tl.load(CONSTS + 8), tl.load(CONSTS + 9), tl.load(CONSTS + 10), tl.load(CONSTS + 11),
            tl.load(CONSTS + 12))


@triton.jit
def _gumbel(u, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo):
    """g = -log64(-log64(u))."""
    inner = _log64(u, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo)
    return -_log64(-inner, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo)


@triton.jit
def _load_exp_constants(CONSTS):
    """E[0..13], INV_LN2 and EXP64_MIN (the rest of exp64's constants, LN2_HI and LN2_LO, are log64's)."""
    return (tl.load(CONSTS + 13), tl.load(CONSTS + 14), tl.load(CONSTS + 15), tl.load(CONSTS + 16),
            tl.load(CONSTS + 17), tl.load(CONSTS + 18), tl.load(CONSTS + 19), tl.load(CONSTS + 20),
            tl.load(CONSTS + 21), tl.load(CONSTS + 22), tl.load(CONSTS + 23), tl.load(CONSTS + 24),
            tl.load(CONSTS + 25), tl.load(CONSTS + 26), tl.load(CONSTS + 27), tl.load(CONSTS + 28))


@triton.jit
def _exp64(x, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, inv_ln2, ln2_hi, ln2_lo, exp_min):
    """exp64 of float64 x (x <= 708, -inf allowed), operation by operation as in log64.py.

    e0..e13, inv_ln2, ln2_hi, ln2_lo, exp_min: float64 scalars (loaded from the constants tensor)."""
    live = x >= exp_min
    x = tl.where(live, x, 0.0)  # keeps k in range (and -inf, NaN out of the int conversion); result 0
    t = x * inv_ln2
    k = tl.where(t >= 0, t + 0.5, t - 0.5).to(tl.int64)  # float -> int truncates: round half away from 0
    kf = k.to(tl.float64)
    r = (x - kf * ln2_hi) - kf * ln2_lo
    p = e13 * r + e12
    p = p * r + e11
    p = p * r + e10
    p = p * r + e9
    p = p * r + e8
    p = p * r + e7
    p = p * r + e6
    p = p * r + e5
    p = p * r + e4
    p = p * r + e3
    p = p * r + e2
    p = p * r + e1
    p = p * r + e0
    scale = ((k + 1023) << 52).to(tl.float64, bitcast=True)  # 2^k, exactly (k >= -1021 where live)
    return tl.where(live, p * scale, 0.0)


@triton.jit
def _widen(value):
    """A loaded log-score in float64: bf16 / fp16 / fp32 -> fp32 -> fp64 is exact."""
    if value.dtype == tl.float64:
        wide = value
    else:
        wide = value.to(tl.float32).to(tl.float64)
    return wide


@triton.jit
def _take_if_better(best_val, best_idx, score, col, valid, SENTINEL: tl.constexpr):
    # Columns reach a lane in increasing order, so a strict > keeps the lowest index among equal scores.
    # The lane's first valid column is always taken (even at -inf: a row with no candidate then reports
    # -inf, as the reference does), and a NaN score wins over every number and is kept (the caller
    # raises for it).
    take = valid & ((score > best_val) | (best_idx == SENTINEL)
                    | ((score != score) & (best_val == best_val)))
    return tl.where(take, score, best_val), tl.where(take, col, best_idx)


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _row_winner(best_val, best_idx, SENTINEL: tl.constexpr):
    """The row's (token, score) from the lanes' bests: a NaN anywhere wins (the lowest NaN column, score
    NaN); otherwise the maximum, ties to the lowest column."""
    is_nan = best_val != best_val
    any_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
    top = tl.max(tl.where(is_nan, float("-inf"), best_val), axis=0)
    winner = tl.where(any_nan, is_nan, (best_val == top) & (best_idx != SENTINEL))
    token = tl.min(tl.where(winner, best_idx, SENTINEL), axis=0)
    return token, tl.where(any_nan, float("nan"), top)


@triton.jit(do_not_specialize=["key0", "key1", "step_lo", "temperature_bits"])
def _gumbel_argmax_kernel(
        LOGITS, TAKE, ROW_IDS, EXCLUDE, CONSTS, TOKENS, BEST,
        stride_row, stride_col, vocab,
        key0: tl.int64, key1: tl.int64, step_lo: tl.int64, temperature_bits: tl.int64,
        HAS_TAKE: tl.constexpr, HAS_EXCLUDE: tl.constexpr, NOISE: tl.constexpr, DIVIDE: tl.constexpr,
        BLOCK_P: tl.constexpr):
    # Program i samples row i: logits row TAKE[i] (or i), noise of row identity ROW_IDS[i]. Element
    # e = row_id * V + v of stream 0 uses Philox block n = e >> 1, words (w0, w1) when e is even and
    # (w2, w3) when odd. The loop walks the row's Philox blocks: lane j of an iteration owns block
    # n = (row_id * V >> 1) + j, whose even element is column 2j - parity and odd element the next
    # column (parity = row_id * V & 1), so each block is computed once and feeds two columns.
    SENTINEL: tl.constexpr = 2147483647
    i = tl.program_id(0)
    if HAS_TAKE:
        row = tl.load(TAKE + i)
    else:
        row = i.to(tl.int64)
    row_id = tl.load(ROW_IDS + i)
    row_ptr = LOGITS + row * stride_row
    element_base = row_id * vocab
    parity = (element_base & 1).to(tl.int32)
    pair_base = element_base >> 1
    num_pairs = (vocab + parity + 1) // 2

    k0 = key0.to(tl.uint32)
    k1 = key1.to(tl.uint32)
    step_word = step_lo.to(tl.uint32)
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo = _load_constants(CONSTS)
    temperature = temperature_bits.to(tl.int64).to(tl.float64, bitcast=True)

    lanes = tl.arange(0, BLOCK_P)
    best_val = tl.full([BLOCK_P], float("-inf"), tl.float64)
    best_idx = tl.full([BLOCK_P], SENTINEL, tl.int32)
    for start in range(0, num_pairs, BLOCK_P):
        j = start + lanes
        col_even = 2 * j - parity
        col_odd = col_even + 1
        valid_even = (col_even >= 0) & (col_even < vocab)
        valid_odd = col_odd < vocab
        x_even = tl.load(row_ptr + col_even.to(tl.int64) * stride_col, mask=valid_even, other=0.0)
        x_odd = tl.load(row_ptr + col_odd.to(tl.int64) * stride_col, mask=valid_odd, other=0.0)
        if LOGITS.dtype.element_ty == tl.float64:
            s_even = x_even
            s_odd = x_odd
        else:  # bf16 / fp16 / fp32 -> fp32 -> fp64: exact
            s_even = x_even.to(tl.float32).to(tl.float64)
            s_odd = x_odd.to(tl.float32).to(tl.float64)
        if DIVIDE:
            s_even = s_even / temperature
            s_odd = s_odd / temperature
        if NOISE:
            w0, w1, w2, w3 = _stream_block(pair_base + j, k0, k1, 0, step_word)
            s_even = s_even + _gumbel(_uniform53(w0, w1), c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10,
                                      ln2_hi, ln2_lo)
            s_odd = s_odd + _gumbel(_uniform53(w2, w3), c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10,
                                    ln2_hi, ln2_lo)
        if HAS_EXCLUDE:
            excluded_even = tl.load(EXCLUDE + col_even, mask=valid_even, other=0)
            excluded_odd = tl.load(EXCLUDE + col_odd, mask=valid_odd, other=0)
            s_even = tl.where(excluded_even != 0, float("-inf"), s_even)
            s_odd = tl.where(excluded_odd != 0, float("-inf"), s_odd)
        # Even before odd: the lower column first.
        best_val, best_idx = _take_if_better(best_val, best_idx, s_even, col_even, valid_even, SENTINEL)
        best_val, best_idx = _take_if_better(best_val, best_idx, s_odd, col_odd, valid_odd, SENTINEL)

    token, best = _row_winner(best_val, best_idx, SENTINEL)
    tl.store(TOKENS + i, token.to(tl.int64))
    tl.store(BEST + i, best.to(tl.float64))


@triton.jit(do_not_specialize=["mask_id", "key0", "key1", "step_lo"])
def _hybrid_step_kernel(
        LOG_SCORE, X, COEFFICIENTS, ROW_IDS, CONSTS, TOKENS, BEST,
        stride_row, stride_col, vocab, mask_id,
        key0: tl.int64, key1: tl.int64, step_lo: tl.int64,
        BLOCK_P: tl.constexpr):
    # Program i steps row i (the fused form of hybrid.py): pass 1 the maximum m of the read entries,
    # pass 2 the fixed-point sum of r' = exp64(s - m), pass 3 the weights and the Gumbel race. "Read"
    # columns are the real tokens other than x. The log-scores are loaded three times in their own dtype
    # and widened in registers; nothing of the row is kept in memory between the passes.
    SENTINEL: tl.constexpr = 2147483647
    BLOCK_C: tl.constexpr = 2 * BLOCK_P  # columns per iteration of passes 1 and 2
    i = tl.program_id(0)
    row_ptr = LOG_SCORE + i.to(tl.int64) * stride_row
    x = tl.load(X + i)
    row_id = tl.load(ROW_IDS + i)
    coefficients = COEFFICIENTS + i.to(tl.int64) * 6
    c1 = tl.load(coefficients + 0)
    c2 = tl.load(coefficients + 1)
    c3 = tl.load(coefficients + 2)
    c4 = tl.load(coefficients + 3)
    c5 = tl.load(coefficients + 4)
    c6 = tl.load(coefficients + 5)
    l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, ln2_hi, ln2_lo = _load_constants(CONSTS)
    (e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13,
     inv_ln2, exp_min) = _load_exp_constants(CONSTS)
    hi_scale = tl.load(CONSTS + 29)
    lo_scale = tl.load(CONSTS + 30)
    hi_unit = tl.load(CONSTS + 31)
    lo_unit = tl.load(CONSTS + 32)
    smallest_weight = tl.load(CONSTS + 33)

    # Pass 1: m over the read entries; a NaN or +inf there marks the row bad, and a bad row continues
    # with every read entry at -inf, as the reference's masked row does (its score becomes NaN at the end).
    columns = tl.arange(0, BLOCK_C)
    top = tl.full([BLOCK_C], float("-inf"), tl.float64)
    broken = tl.zeros([BLOCK_C], tl.int32)
    for start in range(0, vocab, BLOCK_C):
        col = start + columns
        read = (col < vocab) & (col != mask_id) & (col != x)
        s = _widen(tl.load(row_ptr + col.to(tl.int64) * stride_col, mask=read, other=float("-inf")))
        invalid = read & ((s != s) | (s == float("inf")))
        broken = broken | invalid.to(tl.int32)
        top = tl.maximum(top, tl.where(invalid, float("-inf"), s))  # no NaN reaches tl.maximum
    bad = tl.max(broken, axis=0) > 0
    good = tl.max(broken, axis=0) == 0
    m = tl.where(bad, float("-inf"), tl.max(top, axis=0))
    m = tl.where(x != mask_id, tl.maximum(m, 0.0), m)  # r_x = 1 is a ratio of the row too
    m = tl.maximum(m, exp_min)  # -inf (nothing read) included: exp64(-m) stays finite
    # (m's sign at 0 does not matter: exp64(±0) and s - (±0) give the same bits downstream.)

    # Pass 2: S_o as two int64 sums (exact, so the order of additions is free), then S.
    high_sum = tl.zeros([BLOCK_C], tl.int64)
    low_sum = tl.zeros([BLOCK_C], tl.int64)
    for start in range(0, vocab, BLOCK_C):
        col = start + columns
        read = (col < vocab) & (col != mask_id) & (col != x) & good
        s = _widen(tl.load(row_ptr + col.to(tl.int64) * stride_col, mask=read, other=float("-inf")))
        ratio = _exp64(s - m, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, inv_ln2, ln2_hi,
                       ln2_lo, exp_min)  # in [0, 1]; 0 off the read columns (exp64(-inf))
        scaled = ratio * hi_scale
        high = scaled.to(tl.int64)  # truncation = floor for r' >= 0; exact
        low = ((scaled - high.to(tl.float64)) * lo_scale).to(tl.int64)
        high_sum += high
        low_sum += low
    others = (tl.sum(high_sum, axis=0).to(tl.float64) * hi_unit
              + tl.sum(low_sum, axis=0).to(tl.float64) * lo_unit)
    u = _exp64(-m, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, inv_ln2, ln2_hi, ln2_lo,
               exp_min)
    total = others + c3 * u
    shift = c2 * total
    current = c4 * (c5 * u - c6 * total)  # the weight of y = x

    # Pass 3: the race, walking the row's Philox blocks as _gumbel_argmax_kernel does (lane j owns block
    # (row_id * V >> 1) + j: columns 2j - parity and 2j - parity + 1), so the noise is that kernel's.
    k0 = key0.to(tl.uint32)
    k1 = key1.to(tl.uint32)
    step_word = step_lo.to(tl.uint32)
    element_base = row_id * vocab
    parity = (element_base & 1).to(tl.int32)
    pair_base = element_base >> 1
    num_pairs = (vocab + parity + 1) // 2
    lanes = tl.arange(0, BLOCK_P)
    best_val = tl.full([BLOCK_P], float("-inf"), tl.float64)
    best_idx = tl.full([BLOCK_P], SENTINEL, tl.int32)
    for start in range(0, num_pairs, BLOCK_P):
        j = start + lanes
        w0, w1, w2, w3 = _stream_block(pair_base + j, k0, k1, 0, step_word)
        for half in tl.static_range(2):  # even column (w0, w1) before odd (w2, w3): the lower first
            if half == 0:
                col = 2 * j - parity
                valid = (col >= 0) & (col < vocab)
                word_a = w0
                word_b = w1
            else:
                col = 2 * j - parity + 1
                valid = col < vocab
                word_a = w2
                word_b = w3
            read = valid & (col != mask_id) & (col != x) & good
            s = _widen(tl.load(row_ptr + col.to(tl.int64) * stride_col, mask=read, other=float("-inf")))
            ratio = _exp64(s - m, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, inv_ln2,
                           ln2_hi, ln2_lo, exp_min)
            weight = (ratio - shift) * c1
            weight = tl.where(col == mask_id, 0.0, weight)
            weight = tl.where(col == x, current, weight)  # after MASK: x = MASK keeps its own weight
            positive = weight >= smallest_weight  # subnormal, <= 0 (and NaN) weights count as 0
            log_weight = _log64(tl.where(positive, weight, 1.0), l0, l1, l2, l3, l4, l5, l6, l7, l8, l9,
                                l10, ln2_hi, ln2_lo)
            score = tl.where(positive, log_weight, float("-inf"))
            score = score + _gumbel(_uniform53(word_a, word_b), l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10,
                                    ln2_hi, ln2_lo)
            best_val, best_idx = _take_if_better(best_val, best_idx, score, col, valid, SENTINEL)

    token, best = _row_winner(best_val, best_idx, SENTINEL)  # no NaN score here: bad rows are flagged
    best = tl.where(bad, float("nan"), best)
    tl.store(TOKENS + i, token.to(tl.int64))
    tl.store(BEST + i, best.to(tl.float64))


@triton.jit
def _exp64_kernel(X, OUT, CONSTS, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    x = tl.load(X + offs, mask=ok, other=0.0)
    l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, ln2_hi, ln2_lo = _load_constants(CONSTS)
    (e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13,
     inv_ln2, exp_min) = _load_exp_constants(CONSTS)
    y = _exp64(x, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, inv_ln2, ln2_hi, ln2_lo,
               exp_min)
    tl.store(OUT + offs, y, mask=ok)


@triton.jit(do_not_specialize=["key0", "key1", "stream", "step_lo"])
def _uniform53_kernel(INDEX, OUT, numel, key0: tl.int64, key1: tl.int64, stream: tl.int64,
                      step_lo: tl.int64, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    element = tl.load(INDEX + offs, mask=ok, other=0)
    w0, w1, w2, w3 = _stream_block(element >> 1, key0.to(tl.uint32), key1.to(tl.uint32),
                                   stream.to(tl.uint32), step_lo.to(tl.uint32))
    odd = (element & 1) != 0
    u = _uniform53(tl.where(odd, w2, w0), tl.where(odd, w3, w1))
    tl.store(OUT + offs, u, mask=ok)


@triton.jit(do_not_specialize=["key0", "key1", "step_lo"])
def _corrupt_kernel(X0, P_MASK, P_SHUFFLE, ROW_IDS, XT, MASKED, SHUFFLED, numel, num_tokens, mask_id,
                    key0: tl.int64, key1: tl.int64, step_lo: tl.int64, STREAM: tl.constexpr,
                    BLOCK: tl.constexpr):
    # One Philox block per position (pair n = row_id of stream 2): (w0, w1) decide the event,
    # (w2, w3) pick the replacement token; see hdlm_kernels.sampling.corrupt.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    row_id = tl.load(ROW_IDS + offs, mask=ok, other=0)
    w0, w1, w2, w3 = _stream_block(row_id, key0.to(tl.uint32), key1.to(tl.uint32),
                                   tl.full([], STREAM, tl.uint32), step_lo.to(tl.uint32))
    u_event = _uniform53(w0, w1)
    u_token = _uniform53(w2, w3)
    x0 = tl.load(X0 + offs, mask=ok, other=0)
    p_mask = tl.load(P_MASK + offs, mask=ok, other=0.0)
    p_shuffle = tl.load(P_SHUFFLE + offs, mask=ok, other=0.0)
    real = x0 != mask_id
    masked = real & (u_event < p_mask)
    shuffled = real & (u_event >= p_mask) & (u_event < p_mask + p_shuffle)
    replacement = tl.minimum((u_token * num_tokens.to(tl.float64)).to(tl.int64), num_tokens - 1)
    x_t = tl.where(masked, mask_id, tl.where(shuffled, replacement, x0))
    tl.store(XT + offs, x_t, mask=ok)
    tl.store(MASKED + offs, masked.to(tl.int8), mask=ok)
    tl.store(SHUFFLED + offs, shuffled.to(tl.int8), mask=ok)


@triton.jit
def _philox_kernel(COUNTERS, KEYS, OUT, count, BLOCK: tl.constexpr):
    # COUNTERS int64 [count, 4], KEYS int64 [count, 2], OUT int64 [count, 4]; words in [0, 2^32).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < count
    c0 = tl.load(COUNTERS + offs * 4 + 0, mask=ok, other=0).to(tl.uint32)
    c1 = tl.load(COUNTERS + offs * 4 + 1, mask=ok, other=0).to(tl.uint32)
    c2 = tl.load(COUNTERS + offs * 4 + 2, mask=ok, other=0).to(tl.uint32)
    c3 = tl.load(COUNTERS + offs * 4 + 3, mask=ok, other=0).to(tl.uint32)
    k0 = tl.load(KEYS + offs * 2 + 0, mask=ok, other=0).to(tl.uint32)
    k1 = tl.load(KEYS + offs * 2 + 1, mask=ok, other=0).to(tl.uint32)
    w0, w1, w2, w3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(OUT + offs * 4 + 0, w0.to(tl.int64), mask=ok)
    tl.store(OUT + offs * 4 + 1, w1.to(tl.int64), mask=ok)
    tl.store(OUT + offs * 4 + 2, w2.to(tl.int64), mask=ok)
    tl.store(OUT + offs * 4 + 3, w3.to(tl.int64), mask=ok)


@triton.jit
def _log64_kernel(X, OUT, CONSTS, numel, GUMBEL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    x = tl.load(X + offs, mask=ok, other=0.5)
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo = _load_constants(CONSTS)
    if GUMBEL:
        y = _gumbel(x, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo)
    else:
        y = _log64(x, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo)
    tl.store(OUT + offs, y, mask=ok)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------


def interpreted() -> bool:
    """Whether the kernels of this module were built for the Triton interpreter (CPU tensors)."""
    return built_for_interpreter(_gumbel_argmax_kernel)


def check_triton_device(tensor: torch.Tensor, context: str) -> None:
    """Raise a clear RuntimeError when ``tensor`` cannot be processed by these kernels here."""
    _check_triton_device(tensor, context, interpreted())


_CONSTANTS: dict[torch.device, torch.Tensor] = {}


def _constants(device: torch.device) -> torch.Tensor:
    """float64 [34] on ``device`` (cached): the log64 coefficients C[0..10], LN2_HI, LN2_LO (0..12, read
    by _load_constants), the exp64 coefficients E[0..13], INV_LN2, EXP64_MIN (13..28, _load_exp_constants)
    and the hybrid step's fixed-point scales and smallest weight (29..33, _hybrid_step_kernel)."""
    constants = _CONSTANTS.get(device)
    if constants is None:
        values = (list(LOG64_COEFFICIENTS) + [LN2_HI, LN2_LO] + list(EXP64_COEFFICIENTS[:14])
                  + [INV_LN2, EXP64_MIN, FIXED_HI_SCALE, FIXED_LO_SCALE, FIXED_HI_UNIT, FIXED_LO_UNIT,
                     SMALLEST_WEIGHT])
        constants = torch.tensor(values, dtype=torch.float64, device=device)
        _CONSTANTS[device] = constants
    return constants


def _on_device(tensor: torch.Tensor):
    """Launches on the tensor's GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def _block(gpu: int, interpreter: int) -> int:
    return interpreter if interpreted() else gpu


def _launch_options(num_warps: int = 4) -> dict:
    # No FMA contraction (log64's products and sums round separately). The interpreter ignores both.
    return {"num_warps": num_warps, "enable_fp_fusion": False}


def _double_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def philox4x32_10_triton(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of many blocks: counter integer [N, 4], key integer [N, 2] (words in [0, 2^32)),
    on one device. Returns int64 [N, 4] (the output words). For tests of the device function."""
    counter = torch.as_tensor(counter).to(torch.int64).reshape(-1, 4).contiguous()
    key = torch.as_tensor(key).to(device=counter.device, dtype=torch.int64).reshape(-1, 2).contiguous()
    if key.shape[0] != counter.shape[0]:
        raise ValueError(
            f"counter and key must hold as many blocks; got {counter.shape[0]} and {key.shape[0]}")
    check_triton_device(counter, "philox4x32_10")
    count = counter.shape[0]
    out = torch.empty(count, 4, dtype=torch.int64, device=counter.device)
    if count:
        block = 256
        with _on_device(counter):
            _philox_kernel[(triton.cdiv(count, block),)](counter, key, out, count, BLOCK=block,
                                                         **_launch_options())
    return out


def uniform53_triton(seed: int, step: int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """uniform53 (DESIGN.md §6) on the Triton backend; arguments already validated (seed in [0, 2^64),
    step, stream in [0, 2^32), index int64 >= 0). float64 with index's shape, on index's device."""
    check_triton_device(index, "uniform53")
    flat = index.reshape(-1).contiguous()
    out = torch.empty(flat.shape, dtype=torch.float64, device=index.device)
    numel = flat.numel()
    if numel:
        block = _block(_GPU_BLOCK, _INTERPRETER_BLOCK)
        with _on_device(index):
            _uniform53_kernel[(triton.cdiv(numel, block),)](
                flat, out, numel, seed & 0xFFFFFFFF, seed >> 32, stream, step & 0xFFFFFFFF,
                BLOCK=block, **_launch_options())
    return out.reshape(index.shape)


def corrupt_triton(x0: torch.Tensor, p_mask: torch.Tensor, p_shuffle: torch.Tensor, num_tokens: int,
                   mask_id: int, seed: int, step: int, row_ids: torch.Tensor, stream: int):
    """The forward corruption of :func:`hdlm_kernels.sampling.corrupt` in one pass; arguments already
    validated and flattened (x0, row_ids int64 [n]; p_mask, p_shuffle float64 [n]). Returns
    (x_t int64 [n], masked bool [n], shuffled bool [n])."""
    check_triton_device(x0, "corrupt")
    numel = x0.numel()
    x_t = torch.empty_like(x0)
    masked = torch.empty(numel, dtype=torch.int8, device=x0.device)
    shuffled = torch.empty(numel, dtype=torch.int8, device=x0.device)
    if numel:
        block = _block(_GPU_BLOCK, _INTERPRETER_BLOCK)
        with _on_device(x0):
            _corrupt_kernel[(triton.cdiv(numel, block),)](
                x0, p_mask, p_shuffle, row_ids, x_t, masked, shuffled, numel, num_tokens, mask_id,
                seed & 0xFFFFFFFF, seed >> 32, step & 0xFFFFFFFF, STREAM=stream, BLOCK=block,
                **_launch_options())
    return x_t, masked.bool(), shuffled.bool()


def _elementwise(kernel, x: torch.Tensor, context: str, **constexprs) -> torch.Tensor:
    """``kernel`` (an elementwise float64 kernel of this module) over every element of ``x``."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float64:
        raise TypeError(f"{context}: x must be a float64 tensor")
    check_triton_device(x, context)
    flat = x.reshape(-1).contiguous()
    out = torch.empty_like(flat)
    numel = flat.numel()
    if numel:
        block = _block(_GPU_BLOCK, _INTERPRETER_BLOCK)
        with _on_device(x):
            kernel[(triton.cdiv(numel, block),)](flat, out, _constants(x.device), numel, BLOCK=block,
                                                 **constexprs, **_launch_options())
    return out.reshape(x.shape)


def log64_triton(x: torch.Tensor) -> torch.Tensor:
    """:func:`hdlm_kernels.sampling.log64.log64` in Triton (float64, finite, normal, > 0)."""
    return _elementwise(_log64_kernel, x, "log64", GUMBEL=False)


def gumbel_noise_triton(u: torch.Tensor) -> torch.Tensor:
    """:func:`hdlm_kernels.sampling.log64.gumbel_noise` in Triton: -log64(-log64 u)."""
    return _elementwise(_log64_kernel, u, "gumbel_noise", GUMBEL=True)


def exp64_triton(x: torch.Tensor) -> torch.Tensor:
    """:func:`hdlm_kernels.sampling.log64.exp64` in Triton (float64, x <= 708, -inf allowed)."""
    return _elementwise(_exp64_kernel, x, "exp64")


def gumbel_argmax_triton(
    logits: torch.Tensor,
    take: torch.Tensor | None,
    row_ids: torch.Tensor,
    seed: int,
    step: int,
    temperature: float,
    exclude: torch.Tensor | None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton backend of ``gumbel_argmax``; the arguments and result of ``_gumbel_argmax_reference``
    (checked there): logits [K, V] (any strides), take None or int64 [n] rows of logits, row_ids int64
    [n], exclude None or sorted distinct int64 ids. Returns (tokens int64 [n], winning scores float64
    [n]). One program per sampled row, no float64 temporaries in memory; chunk_rows is ignored."""
    del chunk_rows  # the kernel holds one block of a row at a time
    check_triton_device(logits, "gumbel_argmax")
    device = logits.device
    vocab = logits.shape[1]
    if vocab > _MAX_VOCAB:
        raise ValueError(f"gumbel_argmax: backend='triton' supports V <= 2^30; got V = {vocab}")
    num_rows = row_ids.shape[0]
    tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    best = torch.empty(num_rows, dtype=torch.float64, device=device)
    if num_rows == 0:
        return tokens, best
    row_ids = row_ids.to(device=device, dtype=torch.int64).contiguous()
    if take is not None:
        take = take.to(device=device, dtype=torch.int64).contiguous()
    if exclude is not None:
        excluded = torch.zeros(vocab, dtype=torch.int8, device=device)
        excluded[exclude.to(device)] = 1
    else:
        excluded = tokens  # never read (HAS_EXCLUDE=False)
    noise = temperature != 0
    # A row spans at most V // 2 + 1 Philox blocks (V + 1 slots when row_id * V is odd).
    block_pairs = min(_block(_GPU_BLOCK_PAIRS, _INTERPRETER_BLOCK_PAIRS),
                      triton.next_power_of_2(vocab // 2 + 1))
    with _on_device(logits):
        _gumbel_argmax_kernel[(num_rows,)](
            logits, row_ids if take is None else take, row_ids, excluded, _constants(device), tokens, best,
            logits.stride(0), logits.stride(1), vocab,
            seed & 0xFFFFFFFF, seed >> 32, step & 0xFFFFFFFF, _double_bits(temperature),
            HAS_TAKE=take is not None, HAS_EXCLUDE=exclude is not None, NOISE=noise,
            DIVIDE=noise and temperature != 1.0, BLOCK_P=block_pairs,
            **_launch_options(max(1, min(_MAX_WARPS, block_pairs // _PAIRS_PER_WARP))))
    return tokens, best


def hybrid_step_triton(
    log_score: torch.Tensor,
    x: torch.Tensor,
    coefficients: torch.Tensor,
    row_ids: torch.Tensor,
    mask_id: int,
    seed: int,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton backend of ``hybrid_step``; the arguments and result of ``_hybrid_step_reference``
    (checked by ``hybrid_step``): log_score [R, V] bf16/fp16/fp32/fp64 (any strides), x int64 [R],
    coefficients float64 [R, 6] (``step_coefficients``), row_ids int64 [R]. Returns (tokens int64 [R],
    winning scores float64 [R]: NaN for a row with a NaN or +inf read log-score, -inf for a row without a
    positive weight). One program per row, no float64 copy of the log-scores."""
    check_triton_device(log_score, "hybrid_step")
    device = log_score.device
    num_rows, vocab = log_score.shape
    if vocab > _MAX_VOCAB:
        raise ValueError(f"hybrid_step: backend='triton' supports V <= 2^30; got V = {vocab}")
    tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    best = torch.empty(num_rows, dtype=torch.float64, device=device)
    if num_rows == 0:
        return tokens, best
    x = x.to(device=device, dtype=torch.int64).contiguous()
    coefficients = coefficients.to(device=device, dtype=torch.float64).contiguous()
    row_ids = row_ids.to(device=device, dtype=torch.int64).contiguous()
    # Pass 3 spans at most V // 2 + 1 Philox blocks; passes 1 and 2 take 2 * block_pairs columns at a time.
    block_pairs = min(_block(_HYBRID_GPU_BLOCK_PAIRS, _INTERPRETER_BLOCK_PAIRS),
                      triton.next_power_of_2(vocab // 2 + 1))
    with _on_device(log_score):
        _hybrid_step_kernel[(num_rows,)](
            log_score, x, coefficients, row_ids, _constants(device), tokens, best,
            log_score.stride(0), log_score.stride(1), vocab, mask_id,
            seed & 0xFFFFFFFF, seed >> 32, step & 0xFFFFFFFF, BLOCK_P=block_pairs,
            **_launch_options(max(1, min(_MAX_WARPS, block_pairs // _HYBRID_PAIRS_PER_WARP))))
    return tokens, best
