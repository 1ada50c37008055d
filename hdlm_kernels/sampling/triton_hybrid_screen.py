"""The screen of the γ step's race in Triton (docs/sampling-screen.md, "The γ step"): the twin of
``csrc/hybrid_screen.h``. For a read token of a row whose exact row sum S is known (so ``K = c2·S`` is an
exact float64), a float32 interval ``[lo, hi]`` that provably holds the token's exact score
``log64(w) + g``, ``w = c1·(r' - K)``, ``r' = exp64(s - m)``, computed with float32 and integer
operations only; the row's constants ``ln c1`` and ``ln K`` are computed once per row in FP64
(``hybrid_screen_row``) and rounded to float32 as the C++ rule does.

As for ``triton_screen``, nothing here has to be bit-identical to the C++ screen: the bound holds for any
round-to-nearest float32 evaluation (fused or not). The kernels launch with ``enable_fp_fusion=False`` for
the sake of their exact FP64 pass; the float32 work here is left unfused (one rounding per operation, as
the proof counts).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_stream import log64

__all__ = ["float_at_most", "hybrid_screen_bounds", "hybrid_screen_row"]

# The float32 constants of csrc/hybrid_screen.h (every one exact in float32, so that Triton's narrowing of
# a Python float keeps its value).
# ln(1 - e^-a) rounded down, for the ladder a in {1, 2, 3, 4, 6, 8, 11, 16, 24}: lower bounds of φ(y), y >= a.
PHI_1 = tl.constexpr(float.fromhex("-0x1.d5aef0p-2"))
PHI_2 = tl.constexpr(float.fromhex("-0x1.29ce88p-3"))
PHI_3 = tl.constexpr(float.fromhex("-0x1.a25bd6p-5"))
PHI_4 = tl.constexpr(float.fromhex("-0x1.2edd96p-6"))
PHI_6 = tl.constexpr(float.fromhex("-0x1.454c60p-9"))
PHI_8 = tl.constexpr(float.fromhex("-0x1.5fd12cp-12"))
PHI_11 = tl.constexpr(float.fromhex("-0x1.1835dep-16"))
PHI_16 = tl.constexpr(float.fromhex("-0x1.e356bep-24"))
PHI_24 = tl.constexpr(float.fromhex("-0x1.54107ap-35"))
# |ln r' - fl32(s - m)| <= LOG_RATIO_RELATIVE |s - m| + TINY; y's computed ends within
# Y_RELATIVE (|ln K| + |s - m|) + TINY; the final margin MARGIN_RELATIVE (|ln c1| + |s - m| + |φ| + 40)
# + MARGIN_ABSOLUTE (the roundings of the sums, ln c1 to float32, the cheap noise).
LOG_RATIO_RELATIVE = tl.constexpr(2.0 ** -22)
TINY = tl.constexpr(2.0 ** -40)
Y_RELATIVE = tl.constexpr(2.0 ** -21)
MARGIN_RELATIVE = tl.constexpr(2.0 ** -19)
MARGIN_ABSOLUTE = tl.constexpr(2.0 ** -12)
# ln 2 rounded up and down; the slack of the float32 evaluations of e ln 2 - y/2 and y - 1.
LN2_UP = tl.constexpr(float.fromhex("0x1.62e430p-1"))
LN2_DOWN = tl.constexpr(float.fromhex("0x1.62e42ep-1"))
PHI_SLACK = tl.constexpr(2.0 ** -16)
SMALLEST_Y = tl.constexpr(2.0 ** -60)
# Below these r' may be 0 or the weight below 2^-1022 (the lower end is -inf); below DEAD the ratio is
# exactly 0 (the score is exactly -inf).
LOW_RATIO = tl.constexpr(-707.5)
LOW_LOG_WEIGHT = tl.constexpr(-707.0)
DEAD = tl.constexpr(-709.0)
# The screen's range of the row constants: c1 and K (when not 0) in [2^-100, 2^100].
SMALLEST_CONSTANT = tl.constexpr(2.0 ** -100)
LARGEST_CONSTANT = tl.constexpr(2.0 ** 100)


@triton.jit
def _ladder_bound(y):
    # φ(a) rounded down for the largest ladder step a <= y (y >= 1): a chain of selections.
    phi = tl.zeros_like(y) + PHI_1
    phi = tl.where(y >= 2.0, PHI_2, phi)
    phi = tl.where(y >= 3.0, PHI_3, phi)
    phi = tl.where(y >= 4.0, PHI_4, phi)
    phi = tl.where(y >= 6.0, PHI_6, phi)
    phi = tl.where(y >= 8.0, PHI_8, phi)
    phi = tl.where(y >= 11.0, PHI_11, phi)
    phi = tl.where(y >= 16.0, PHI_16, phi)
    phi = tl.where(y >= 24.0, PHI_24, phi)
    return phi


@triton.jit
def _exponent_of(y):
    # The exponent e of a positive normal float32 y in [2^e, 2^(e+1)), as a float32 (exact).
    return ((y.to(tl.uint32, bitcast=True) >> 23).to(tl.int32) - 127).to(tl.float32)


@triton.jit
def hybrid_screen_row(shift, c1, k, l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, ln2_hi, ln2_lo):
    """The screen's constants of a row, from its exact float64 m (``shift``), c1 and K = c2·S (scalars):
    (applies, shift float32, ln c1 float32, ln K float32, K == 0). It applies when c1 and K (unless 0) lie
    in [2^-100, 2^100] and m is a float32 value (always: a float32 maximum, 0 or -708); the logarithms are
    log64 of the exact values rounded to float32 (to nearest), as hybrid_screen_row of the C++ rule."""
    c1_ok = (c1 >= SMALLEST_CONSTANT) & (c1 <= LARGEST_CONSTANT)
    k_zero = k == 0.0
    k_ok = k_zero | ((k >= SMALLEST_CONSTANT) & (k <= LARGEST_CONSTANT))
    shift32 = shift.to(tl.float32)
    applies = c1_ok & k_ok & (shift32.to(tl.float64) == shift)
    log_c1 = log64(tl.where(c1_ok, c1, 1.0), l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, ln2_hi, ln2_lo)
    log_k = log64(tl.where(k_ok & ~k_zero, k, 1.0), l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, ln2_hi, ln2_lo)
    return applies, shift32, log_c1.to(tl.float32), tl.where(k_zero, 0.0, log_k.to(tl.float32)), k_zero


@triton.jit
def float_at_most(v):
    """The largest float32 <= v, for a finite float64 v with |v| < 2^100 (a lower bound of an exact score
    used as the row's first floor): v rounded to nearest, then one step down when that rounded up."""
    f = v.to(tl.float32)
    bits = f.to(tl.int32, bitcast=True)
    # One step toward -inf: |f| shrinks for f > 0, grows for f < 0; below ±0 lies -2^-149 (bits 0x80000001).
    down = tl.where(f > 0.0, bits - 1, tl.where(f < 0.0, bits + 1, -2147483647))
    return tl.where(f.to(tl.float64) > v, down.to(tl.float32, bitcast=True), f)


@triton.jit
def hybrid_screen_bounds(score, noise, shift, log_c1, log_k, k_zero):
    """(lo, hi) of the exact score of read tokens with float32 log-scores ``score`` (-inf for the tokens
    that are not read) and cheap noise ``noise`` (``screen_noise`` of their Philox words), with the row's
    float32 ``shift`` (m), ``log_c1``, ``log_k`` and ``k_zero`` (K = 0: φ = 0) of ``hybrid_screen_row``.

    In the log domain ln w = ln c1 + ln r' + φ(y), y = ln r' - ln K, φ(y) = ln(1 - e^-y): φ is bounded from
    y's interval (above by min(0, ln y), ln y <= min(y - 1, (e + 1) ln 2); below by e ln 2 - y/2 under 1 and
    the ladder above). y_hi <= 0 proves r' <= K: the score is exactly -inf (hi = -inf); lo = -inf where
    the weight may be 0 or below 2^-1022."""
    minus_inf = float("-inf")
    x = score - shift  # <= 0: ln r' within LOG_RATIO_RELATIVE |x| + TINY
    ax = tl.abs(x)
    e1 = ax * LOG_RATIO_RELATIVE + TINY
    ek = (tl.abs(log_k) + ax) * Y_RELATIVE + TINY
    y_hi = ((x + e1) - log_k) + ek  # y = ln r' - ln K lies in [y_lo, y_hi]
    y_lo = ((x - e1) - log_k) - ek
    # φ(y) <= min(0, ln y) at y_hi (y_hi <= 0, an exact zero weight, is handled below).
    e_hi = _exponent_of(tl.where(y_hi > SMALLEST_Y, y_hi, SMALLEST_Y))
    log_y_hi = (e_hi + 1.0) * LN2_DOWN  # e + 1 <= 0 where it matters
    below_one = tl.where(y_hi - 1.0 < log_y_hi, y_hi - 1.0, log_y_hi) + PHI_SLACK
    phi_hi = tl.where(below_one < 0.0, below_one, 0.0)
    # φ(y) >= ln y - y/2 >= e ln 2 - y/2 below 1, the ladder above (y_lo < SMALLEST_Y is handled below).
    e_lo = _exponent_of(tl.where(y_lo > SMALLEST_Y, y_lo, 1.0))
    phi_lo = tl.where(y_lo >= 1.0, _ladder_bound(y_lo), (e_lo * LN2_UP - 0.5 * y_lo) - PHI_SLACK)
    phi_hi = tl.where(k_zero, 0.0, phi_hi)
    phi_lo = tl.where(k_zero, 0.0, phi_lo)
    base = log_c1 + x  # ln c1 + ln r', up to the margin
    size = (tl.abs(log_c1) + ax) + 40.0
    lw_lo = base + phi_lo
    hi = ((base + phi_hi) + noise) + ((size + tl.abs(phi_hi)) * MARGIN_RELATIVE + MARGIN_ABSOLUTE)
    lo = (lw_lo + noise) - ((size + tl.abs(phi_lo)) * MARGIN_RELATIVE + MARGIN_ABSOLUTE)
    # Lower end -inf where r' may be 0, the weight below 2^-1022, or y below SMALLEST_Y.
    lo = tl.where(x - e1 >= LOW_RATIO, lo, minus_inf)
    lo = tl.where(lw_lo >= LOW_LOG_WEIGHT, lo, minus_inf)
    lo = tl.where(y_lo >= SMALLEST_Y, lo, tl.where(k_zero, lo, minus_inf))
    hi = tl.where(y_hi > 0.0, hi, tl.where(k_zero, hi, minus_inf))  # r' <= K: the weight is exactly <= 0
    # r' = 0 exactly (also -inf and absent tokens): the score is exactly -inf.
    lo = tl.where(x >= DEAD, lo, minus_inf)
    hi = tl.where(x >= DEAD, hi, minus_inf)
    return lo, hi
