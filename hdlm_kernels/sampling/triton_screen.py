"""The screen of the exact samplers in Triton (docs/sampling-screen.md): a cheap float32 score interval
``[lo, hi]`` per token that provably holds the token's exact FP64 score, the twin of ``csrc/screen.h``.

Nothing here has to be bit-identical to the C++ screen: the proof holds for any float32 evaluation with
round-to-nearest operations. The kernels launch with ``enable_fp_fusion=False`` for the sake of their
exact FP64 pass, so the float32 products and sums that can be fused are written as explicit ``tl.fma``
(a fused operation only removes a rounding); Triton's float32 ``/`` is the 2-ulp ``div.full.f32``, one
more rounding in each logarithm, within the margin of the bound (the "GPU kernels" section of the page). Only float32 and integer operations:
the screening loops of the kernels that use these functions hold no FP64 instruction
(``scripts/screen_sass_counts.py`` counts them in the sm_90 machine code).

``screen_noise_bound`` is the prefilter's bound of the noise from a token's first Philox word alone, and
``reaches_floor`` / ``raised_floor`` / ``largest_bound`` the per-tile steps of the screen pass against a
running floor (docs/sampling-screen.md, "The prefilter" and "GPU kernels").
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .constants import SCREEN_ABSOLUTE, SCREEN_RELATIVE
from .triton_stream import GPU_BLOCK, INTERPRETER_BLOCK, check_triton_device, launch_block, launch_options, on_device

__all__ = ["largest_bound", "raised_floor", "reaches_floor", "screen_bounds", "screen_noise", "screen_noise_bound",
           "screen_noise_bound_triton", "screen_noise_triton", "screen_scale_bits"]

# The float32 constants of csrc/screen.h (every one exact in float32, so that Triton's narrowing of a Python
# float to float32 keeps its value).
LN2_HI = tl.constexpr(float.fromhex("0x1.63p-1"))
LN2_LO = tl.constexpr(float.fromhex("-0x1.bd0106p-13"))
A1 = tl.constexpr(float.fromhex("0x1.555556p-2"))
A2 = tl.constexpr(float.fromhex("0x1.99999ap-3"))
A3 = tl.constexpr(float.fromhex("0x1.24924ap-3"))
A4 = tl.constexpr(float.fromhex("0x1.c71c72p-4"))
SQRT2_BITS = tl.constexpr(0x3FB504F3)  # √2 rounded to float32: a mantissa above it is halved
LN2_UP = tl.constexpr(float.fromhex("0x1.62e430p-1"))  # ln 2 rounded up
LOWER_HALF_BOUND = tl.constexpr(float.fromhex("0x1.7758p-2"))  # 0.366547 > -ln ln 2 = 0.3665129...
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
def screen_noise_bound(word_a):
    """An upper bound (float32) of the exact Gumbel noise g(u) = -ln(-ln u) of every uniform whose first
    Philox word is the uint32 ``word_a``, whatever the second word: the twin of ``screen_noise_bound`` in
    ``csrc/screen.h``, the same integer and float32 operations (docs/sampling-screen.md, "The prefilter").

    A word without its top bit has u < 1/2, so g(u) < g(1/2) = -ln ln 2 = 0.36651...: the bound is
    0.366547. Otherwise v = 1 - u > A·2^-26 with A = (~word_a) >> 6, and g(u) < -ln v < 26 ln 2 - ln A; with
    A' = A >> 2 (below 2^24, exact in float32) and the bits n of float32(A') read as a number,
    n·2^-23 - 127 <= log2 A' (log2 m >= m - 1 on [1, 2]), so g < (24 - (n·2^-23 - 127)) ln 2, plus a margin
    of 2^-10 for the roundings (the conversion of n errs by at most 2^-16 in log2 A', the products by
    2^-22 relative). A' = 0 gives 151 ln 2 = 104.7, above every noise (<= 53 ln 2).

    The proof counts one round-to-nearest rounding per operation and holds for any round-to-nearest float32
    evaluation: the two products and sums written as ``tl.fma`` (the kernels launch with
    ``enable_fp_fusion=False``) only remove a rounding, so GPU bits may differ from the C++ bits in the
    last place and both stay bounds."""
    # A' = A >> 2 = (~word_a) >> 8 = (2^24 - 1) - (word_a >> 8), below 2^24: exact in float32.
    complement = 16777215 - (word_a >> 8).to(tl.int32)
    n = complement.to(tl.float32).to(tl.int32, bitcast=True).to(tl.float32)
    log2_lower = tl.fma(n, 1.1920928955078125e-07, -127.0)  # n 2^-23 - 127 <= log2 A'
    upper_half = tl.fma(24.0 - log2_lower, LN2_UP, 0.0009765625)  # (26 - 2 - log2 A') ln 2 + 2^-10
    return tl.where((word_a >> 31) != 0, upper_half, LOWER_HALF_BOUND)


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


@triton.jit
def largest_bound(hi_even, hi_odd):
    """The largest upper bound of a tile (a scalar), a NaN counted as +inf: a NaN bound reaches every floor."""
    top = tl.maximum(tl.where(hi_even != hi_even, float("inf"), hi_even),
                     tl.where(hi_odd != hi_odd, float("inf"), hi_odd))
    return tl.max(top, axis=0)


@triton.jit
def reaches_floor(hi_even, hi_odd, floor):
    """Whether some upper bound of a tile reaches the running floor (a scalar: True when one is >= floor or
    NaN). One integer reduction, cheaper than the largest bound with its NaN handling."""
    reach = ~(hi_even < floor) | ~(hi_odd < floor)
    return tl.max(reach.to(tl.int32), axis=0) != 0


@triton.jit
def raised_floor(floor, lo_even, lo_odd):
    """The running floor (a float32 scalar, never NaN) raised to the largest lower bound of a tile; a NaN
    lower bound is ignored."""
    raised = tl.where(lo_even > floor, lo_even, floor)
    raised = tl.where(lo_odd > raised, lo_odd, raised)
    return tl.max(raised, axis=0)


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


# --------------------------------------------------------------------------------------------------
# element-wise kernels of the noise functions (for the tests of the device functions)
# --------------------------------------------------------------------------------------------------


@triton.jit
def _screen_noise_kernel(WORD_A, WORD_B, NOISE, BOUND, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    word_a = tl.load(WORD_A + offs, mask=ok, other=0).to(tl.uint32)
    word_b = tl.load(WORD_B + offs, mask=ok, other=0).to(tl.uint32)
    tl.store(NOISE + offs, screen_noise(word_a, word_b), mask=ok)
    tl.store(BOUND + offs, screen_noise_bound(word_a), mask=ok)


def _noise_and_bound(word_a: torch.Tensor, word_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    check_triton_device(word_a, "screen_noise")
    word_a = torch.as_tensor(word_a).to(torch.int64).reshape(-1).contiguous()
    word_b = torch.as_tensor(word_b).to(device=word_a.device, dtype=torch.int64).reshape(-1).contiguous()
    if word_b.shape != word_a.shape:
        raise ValueError(f"word_a and word_b must have the same number of words; got {word_a.numel()} and "
                         f"{word_b.numel()}")
    noise = torch.empty(word_a.shape, dtype=torch.float32, device=word_a.device)
    bound = torch.empty_like(noise)
    numel = word_a.numel()
    if numel:
        block = launch_block(GPU_BLOCK, INTERPRETER_BLOCK)
        with on_device(word_a):
            _screen_noise_kernel[(triton.cdiv(numel, block),)](word_a, word_b, noise, bound, numel, BLOCK=block,
                                                               **launch_options())
    return noise, bound


def screen_noise_triton(word_a: torch.Tensor, word_b: torch.Tensor) -> torch.Tensor:
    """``screen_noise`` of integer tensors of uint32 words (values in [0, 2^32)), one float32 per pair."""
    return _noise_and_bound(word_a, word_b)[0]


def screen_noise_bound_triton(word_a: torch.Tensor) -> torch.Tensor:
    """``screen_noise_bound`` of an integer tensor of uint32 first words (values in [0, 2^32)): float32."""
    return _noise_and_bound(word_a, torch.zeros_like(torch.as_tensor(word_a)))[1]
