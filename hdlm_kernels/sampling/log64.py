"""The float64 logarithm and exponential every sampling backend uses, so that Gumbel noise and the
γ-hybrid step's weights are bit-identical on the torch reference, NumPy, C++, CUDA and Triton (DESIGN.md §6).

Library logs are not: glibc, torch's vectorized CPU log, CUDA's ``log`` and libdevice differ in the
last bit for a fraction of inputs, which can flip a Gumbel-max draw. Here the logarithm is spelled
out with operations that IEEE 754 rounds correctly everywhere (bit extraction, +, -, *, /, exact
int -> float conversion), in one fixed order and with no fused multiply-add, so every implementation
that follows the recipe returns the same bits:

    x = m · 2^e with m in (√2/2, √2]                         (exact: from the bit pattern)
    f = m - 1                                               (exact: Sterbenz)
    s = f / (2 + f);  z = s · s                              (log m = 2 atanh s)
    p = C[10];  p = p · z + C[k] for k = 9 .. 0              (C[k] = 1 / (2k + 1), Horner)
    log x = e · LN2_HI + (e · LN2_LO + (s + s) · p)

With |s| <= 3 - 2√2 ≈ 0.1716 the truncated series is accurate to ~1e-19 relative, so the result is
within a few ulp of the true logarithm (checked against ``math.log`` in the tests). Defined for
finite normal x > 0, which covers the sampler's inputs: uniforms in [2^-53, 1 - 2^-53] and their
negated logarithms in [1.1e-16, 36.8].

The exponential follows the same rules (``exp64``, needed by the γ-hybrid step's ratios ``e^{s}``):

    x < -708: 0                                              (results below 2^-1021 are flushed)
    t = x · INV_LN2;  k = trunc(t + 0.5) if t >= 0 else trunc(t - 0.5)      (round half away from 0)
    r = (x - k · LN2_HI) - k · LN2_LO                        (|r| <= ~0.347; k · LN2_HI exact)
    p = E[13];  p = p · r + E[n] for n = 12 .. 0             (E[n] = 1 / n!, Horner)
    exp x = p · 2^k                                          (2^k from its bit pattern: exact)

Defined for x <= 708 (every caller stays below: the step's arguments are differences to a row maximum
and the negated maximum, clamped). ``expm1_64`` (accurate ``e^x - 1`` near 0, for the per-row
constants of the step) is ``x · (F[13] x^13 + ... + F[0])`` with ``F[n] = 1 / (n + 1)!`` for
``|x| < ln 2 / 2``, and ``exp64(x) - 1`` beyond.

The C++/CUDA twin is ``csrc/log64.h``; the Triton twin lives with the Triton sampling kernels.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

__all__ = ["log64", "log64_numpy", "gumbel_noise", "gumbel_noise_numpy", "exp64", "exp64_numpy", "expm1_64",
           "LOG64_COEFFICIENTS", "EXP64_COEFFICIENTS", "EXP64_MIN", "INV_LN2", "LN2_HI", "LN2_LO"]

# 1 / (2k + 1), k = 0..10, each the correctly rounded double of the fraction.
LOG64_COEFFICIENTS = tuple(float(np.float64(1.0) / np.float64(2 * k + 1)) for k in range(11))
# ln 2 split so that e · LN2_HI is exact for |e| < 2^11 (LN2_HI has 32 trailing zero bits).
LN2_HI = float.fromhex("0x1.62e42fee00000p-1")
LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")

# 1 / n!, n = 0..14, each the correctly rounded double of the fraction (exp64 uses E[0..13], expm1_64
# E[1..14]).
EXP64_COEFFICIENTS = tuple(float(Fraction(1, math.factorial(n))) for n in range(15))
INV_LN2 = float.fromhex("0x1.71547652b82fep+0")  # 1 / ln 2, correctly rounded
EXP64_MIN = -708.0  # exp64 is 0 below (k >= -1021 above, so p · 2^k stays normal)
_HALF_LN2 = float.fromhex("0x1.62e42fefa39efp-2")  # ln 2 / 2: expm1_64 switches from series to exp64 at it

_MANTISSA_MASK = (1 << 52) - 1
_EXPONENT_ONE = 1023 << 52          # the bit pattern of 1.0
_SQRT2_BITS = 0x3FF6A09E667F3BCD   # the bit pattern of √2 rounded down; m above it is halved


def log64(x: torch.Tensor) -> torch.Tensor:
    """Natural log of a float64 tensor (finite, normal, > 0) by the recipe of the module docstring."""
    if x.dtype != torch.float64:
        raise TypeError(f"log64: x must be float64, got {x.dtype}")
    bits = x.view(torch.int64)
    exponent = (bits >> 52) - 1023
    mantissa_bits = (bits & _MANTISSA_MASK) | _EXPONENT_ONE       # m in [1, 2)
    halve = mantissa_bits > _SQRT2_BITS
    mantissa_bits = torch.where(halve, mantissa_bits - (1 << 52), mantissa_bits)  # m / 2, exactly
    exponent = exponent + halve.to(torch.int64)
    f = mantissa_bits.view(torch.float64) - 1.0
    s = f / (f + 2.0)
    z = s * s
    p = torch.full_like(z, LOG64_COEFFICIENTS[10])
    for c in LOG64_COEFFICIENTS[9::-1]:
        p = p * z + c
    e = exponent.to(torch.float64)
    return e * LN2_HI + (e * LN2_LO + (s + s) * p)


def log64_numpy(x: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`log64` (the same operations in the same order)."""
    x = np.asarray(x, dtype=np.float64)
    bits = x.view(np.int64)
    exponent = (bits >> 52) - 1023
    mantissa_bits = (bits & _MANTISSA_MASK) | _EXPONENT_ONE
    halve = mantissa_bits > _SQRT2_BITS
    mantissa_bits = np.where(halve, mantissa_bits - (1 << 52), mantissa_bits)
    exponent = exponent + halve.astype(np.int64)
    f = mantissa_bits.view(np.float64) - 1.0
    s = f / (f + 2.0)
    z = s * s
    p = np.full_like(z, LOG64_COEFFICIENTS[10])
    for c in LOG64_COEFFICIENTS[9::-1]:
        p = p * z + c
    e = exponent.astype(np.float64)
    return e * LN2_HI + (e * LN2_LO + (s + s) * p)


def gumbel_noise(u: torch.Tensor) -> torch.Tensor:
    """g = -log(-log u) with :func:`log64`, for float64 uniforms in (0, 1)."""
    return -log64(-log64(u))


def gumbel_noise_numpy(u: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`gumbel_noise`."""
    return -log64_numpy(-log64_numpy(u))


def exp64(x: torch.Tensor) -> torch.Tensor:
    """e^x of a float64 tensor (x <= 708, -inf allowed) by the recipe of the module docstring."""
    if x.dtype != torch.float64:
        raise TypeError(f"exp64: x must be float64, got {x.dtype}")
    live = x >= EXP64_MIN
    x = torch.where(live, x, 0.0)  # keeps k in range; the result is replaced by 0 below
    t = x * INV_LN2
    k = torch.where(t >= 0, t + 0.5, t - 0.5).to(torch.int64)  # truncation toward 0
    kf = k.to(torch.float64)
    r = (x - kf * LN2_HI) - kf * LN2_LO
    p = torch.full_like(r, EXP64_COEFFICIENTS[13])
    for c in EXP64_COEFFICIENTS[12::-1]:
        p = p * r + c
    scale = ((k + 1023) << 52).view(torch.float64)
    return torch.where(live, p * scale, 0.0)


def exp64_numpy(x: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`exp64` (the same operations in the same order)."""
    x = np.asarray(x, dtype=np.float64)
    live = x >= EXP64_MIN
    x = np.where(live, x, 0.0)
    t = x * INV_LN2
    k = np.where(t >= 0, t + 0.5, t - 0.5).astype(np.int64)
    kf = k.astype(np.float64)
    r = (x - kf * LN2_HI) - kf * LN2_LO
    p = np.full_like(r, EXP64_COEFFICIENTS[13])
    for c in EXP64_COEFFICIENTS[12::-1]:
        p = p * r + c
    scale = ((k + 1023) << 52).view(np.float64)
    return np.where(live, p * scale, 0.0)


def expm1_64(x: torch.Tensor) -> torch.Tensor:
    """e^x - 1 of a float64 tensor (x <= 708), accurate near 0 (module docstring)."""
    if x.dtype != torch.float64:
        raise TypeError(f"expm1_64: x must be float64, got {x.dtype}")
    small = x.abs() < _HALF_LN2
    y = torch.where(small, x, 0.0)
    q = torch.full_like(y, EXP64_COEFFICIENTS[14])
    for c in EXP64_COEFFICIENTS[13:0:-1]:
        q = q * y + c
    return torch.where(small, y * q, exp64(x) - 1.0)
