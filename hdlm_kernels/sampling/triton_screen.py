"""The screen of the exact samplers in Triton (docs/sampling-screen.md): a cheap float32 score interval
``[lo, hi]`` per token that provably holds the token's exact FP64 score, the twin of ``csrc/screen.h``.

Nothing here has to be bit-identical to the C++ screen: the proof holds for any float32 evaluation with
round-to-nearest operations. The kernels launch with ``enable_fp_fusion=False`` for the sake of their
exact FP64 pass, so the float32 products and sums that can be fused are written as explicit ``tl.fma``
(a fused operation only removes a rounding); Triton's float32 ``/`` is the 2-ulp ``div.full.f32``, one
more rounding in each logarithm, within the margin of the bound (the "GPU kernels" section of the page). Only float32 and integer operations:
the screening loops of the kernels that use these functions hold no FP64 instruction
(``scripts/screen_sass_counts.py`` counts them in the sm_90 machine code).
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

from .constants import SCREEN_ABSOLUTE, SCREEN_RELATIVE

__all__ = ["screen_bounds", "screen_noise", "screen_scale_bits"]

# The float32 constants of csrc/screen.h (every one exact in float32, so that Triton's narrowing of a Python
# float to float32 keeps its value).
LN2_HI = tl.constexpr(float.fromhex("0x1.63p-1"))
LN2_LO = tl.constexpr(float.fromhex("-0x1.bd0106p-13"))
A1 = tl.constexpr(float.fromhex("0x1.555556p-2"))
A2 = tl.constexpr(float.fromhex("0x1.99999ap-3"))
A3 = tl.constexpr(float.fromhex("0x1.24924ap-3"))
A4 = tl.constexpr(float.fromhex("0x1.c71c72p-4"))
SQRT2_BITS = tl.constexpr(0x3FB504F3)  # √2 rounded to float32: a mantissa above it is halved
RELATIVE = tl.constexpr(SCREEN_RELATIVE)  # 2^-20
ABSOLUTE = tl.constexpr(SCREEN_ABSOLUTE)  # 2^-13


@triton.jit
def _log_from_parts(f, e, FIVE_TERMS: tl.constexpr):
    # e ln 2 + 2 atanh(s), s = f / (2 + f), the series 2s (1 + z/3 + z^2/5 + ...) cut after 5 or 4 terms.
    s = f / (2.0 + f)
    z = s * s
    if FIVE_TERMS:
        p = tl.fma(z, A4, A3)
    else:
        p = tl.zeros_like(z) + A3
    p = tl.fma(p, z, A2)
    p = tl.fma(p, z, A1)
    p = tl.fma(p, z, 1.0)
    return tl.fma(e, LN2_HI, tl.fma(e, LN2_LO, (s + s) * p))


@triton.jit
def _split(x):
    # x = m 2^e, m in (√2/2, √2], for a positive normal float32 x: returns (f = m - 1 exactly, e as float32).
    bits = x.to(tl.uint32, bitcast=True)
    exponent = (bits >> 23).to(tl.int32) - 127
    mantissa_bits = (bits & 0x007FFFFF) | 0x3F800000
    halve = mantissa_bits > SQRT2_BITS
    mantissa_bits = tl.where(halve, mantissa_bits - 0x00800000, mantissa_bits)
    exponent = exponent + halve.to(tl.int32)
    return mantissa_bits.to(tl.float32, bitcast=True) - 1.0, exponent.to(tl.float32)


@triton.jit
def screen_noise(word_a, word_b):
    """The cheap Gumbel noise (float32) of the uniform of uint32 words (word_a, word_b): within 2^-14 of
    the exact noise -log64(-log64 u). u > 1/2 exactly when word_a's top bit is set; then the complemented
    words give 1 - u, and -log u = -log(1 - (1 - u)) is formed without rounding u to 1."""
    upper = (word_a >> 31) != 0
    flip = tl.where(upper, 0xFFFFFFFF, 0).to(tl.uint32)
    word_a = word_a ^ flip
    word_b = word_b ^ flip
    # v = min(u, 1 - u) in [2^-53, 1/2]: two exact int -> float conversions, one rounding each.
    high = (word_a >> 6).to(tl.int32).to(tl.float32)
    low = (((word_b >> 6) << 1) | 1).to(tl.int32).to(tl.float32)
    v = tl.fma(high, 1.4901161193847656e-08, low * 1.1102230246251565e-16)  # 2^-26, 2^-53
    f, e = _split(v)
    t = -_log_from_parts(tl.where(upper, -v, f), tl.where(upper, 0.0, e), True)  # -log u in (0, 36.8]
    f2, e2 = _split(t)
    return -_log_from_parts(f2, e2, False)


@triton.jit
def screen_bounds(logit, noise, scale):
    """(lo, hi) of a token with float32 logit ``logit`` and cheap noise ``noise`` at float32 scale 1/T:
    a = logit·scale, c = a + noise, B = 2^-20 |a| + 2^-13, [c - B, c + B]; a -inf logit gives
    [-inf, -inf] (its exact score), a NaN logit a NaN hi (always a candidate)."""
    a = logit * scale
    c = a + noise
    bound = tl.fma(tl.abs(a), RELATIVE, ABSOLUTE)
    minus_inf = float("-inf")
    lo = c - bound
    hi = tl.where(logit == minus_inf, minus_inf, c + bound)
    return lo, hi


def screen_scale_bits(temperature: float) -> int | None:
    """The bit pattern (int) of float32(1 / T) when the temperature can be screened (1/T within
    [2^-100, 2^100]; T = 1 gives 1 exactly), else None: the row then takes the exact path on every token.
    Temperature 0 is greedy (no noise) and is never screened. The kernels bitcast it back, so that no
    float travels through the launcher's own conversion."""
    if temperature == 0:
        return None
    inverse = 1.0 if temperature == 1.0 else 1.0 / temperature
    if not (2.0 ** -100 <= inverse <= 2.0 ** 100):
        return None
    return struct.unpack("<i", struct.pack("<f", inverse))[0]
