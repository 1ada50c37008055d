"""The float64 logarithm and exponential every sampling backend uses, so that Gumbel noise and the
γ-hybrid step's weights are bit-identical on the torch reference, NumPy, C++, CUDA and Triton
(docs/log64.md).

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

The exponential follows the same rules (``exp64``, needed by the γ-hybrid step's ratios ``e^{s}``), with
a table of 2^(j/64) so that the polynomial is short (docs/log64.md, "exp64"):

    x < -708: 0                                              (results below 2^-1022 are flushed)
    t = x · (64 / ln 2);  k = trunc(t + 0.5) if t >= 0 else trunc(t - 0.5)  (round half away from 0)
    r = (x - k · LN2_HI / 64) - k · LN2_LO / 64              (|r| <= ~ln 2 / 128; k · LN2_HI / 64 exact)
    p = (E[5] · r + E[4]) · r + E[3];  p = p · r + E[2];  q = r + (r · r) · p     (e^r - 1; E[n] = 1 / n!)
    j = k & 63;  exp x = (T_HI[j] + (T_LO[j] + T_HI[j] · q)) · 2^(k >> 6)   (T = 2^(j/64) in two doubles)

Defined for x <= 708 (every caller stays below: the step's arguments are differences to a row maximum
and the negated maximum, clamped). ``expm1_64`` (accurate ``e^x - 1`` near 0, for the per-row
constants of the step) is ``x · (F[13] x^13 + ... + F[0])`` with ``F[n] = 1 / (n + 1)!`` for
``|x| < ln 2 / 2``, and ``exp64(x) - 1`` beyond.

``log64``, ``exp64`` and ``gumbel_noise`` are ops with backends (``hdlm_kernels.backends``): the torch
reference (the default: it is the formula every backend follows), C++ (``csrc/log64_cpu.cpp``, the
functions of ``csrc/log64.h``) and Triton (:mod:`.triton_stream`); the kernels exist so that tests can
check each backend's arithmetic against the reference bit for bit. The NumPy twins (``*_numpy``) are
independent rewrites for the same purpose.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .. import _extension, backends
from .._triton_device import triton_probe
from .constants import (
    EXP64_COEFFICIENTS,
    EXP64_INV_LN2_64,
    EXP64_LN2_64_HI,
    EXP64_LN2_64_LO,
    EXP64_MIN,
    EXP64_TABLE_BITS,
    EXP64_TABLE_HI,
    EXP64_TABLE_LO,
    HALF_LN2,
    INV_LN2,
    LN2_HI,
    LN2_LO,
    LOG64_COEFFICIENTS,
)

__all__ = ["log64", "log64_numpy", "gumbel_noise", "gumbel_noise_numpy", "exp64", "exp64_numpy", "expm1_64",
           "LOG64_COEFFICIENTS", "EXP64_COEFFICIENTS", "EXP64_MIN", "INV_LN2", "LN2_HI", "LN2_LO"]

_MANTISSA_MASK = (1 << 52) - 1
_EXPONENT_ONE = 1023 << 52          # the bit pattern of 1.0
_SQRT2_BITS = 0x3FF6A09E667F3BCD   # the bit pattern of √2 rounded down; m above it is halved


def _log64_torch(x: torch.Tensor) -> torch.Tensor:
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


def _gumbel_noise_torch(u: torch.Tensor) -> torch.Tensor:
    return -_log64_torch(-_log64_torch(u))


def gumbel_noise_numpy(u: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`gumbel_noise`."""
    return -log64_numpy(-log64_numpy(u))


def _exp64_table(values: tuple, device: torch.device) -> torch.Tensor:
    key = (values is EXP64_TABLE_HI, device)
    table = _EXP64_TABLES.get(key)
    if table is None:
        table = _EXP64_TABLES[key] = torch.tensor(values, dtype=torch.float64, device=device)
    return table


_EXP64_TABLES: dict = {}
_TABLE_MASK = (1 << EXP64_TABLE_BITS) - 1


def _exp64_torch(x: torch.Tensor) -> torch.Tensor:
    live = x >= EXP64_MIN
    x = torch.where(live, x, 0.0)  # keeps k in range; the result is replaced by 0 below
    t = x * EXP64_INV_LN2_64
    k = torch.where(t >= 0, t + 0.5, t - 0.5).to(torch.int64)  # truncation toward 0
    kf = k.to(torch.float64)
    r = (x - kf * EXP64_LN2_64_HI) - kf * EXP64_LN2_64_LO
    p = EXP64_COEFFICIENTS[5] * r + EXP64_COEFFICIENTS[4]
    p = p * r + EXP64_COEFFICIENTS[3]
    p = p * r + EXP64_COEFFICIENTS[2]
    q = r + (r * r) * p  # e^r - 1
    j = k & _TABLE_MASK
    hi = _exp64_table(EXP64_TABLE_HI, x.device)[j]
    lo = _exp64_table(EXP64_TABLE_LO, x.device)[j]
    scale = (((k >> EXP64_TABLE_BITS) + 1023) << 52).view(torch.float64)
    return torch.where(live, (hi + (lo + hi * q)) * scale, 0.0)


def exp64_numpy(x: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`exp64` (the same operations in the same order)."""
    x = np.asarray(x, dtype=np.float64)
    live = x >= EXP64_MIN
    x = np.where(live, x, 0.0)
    t = x * EXP64_INV_LN2_64
    k = np.where(t >= 0, t + 0.5, t - 0.5).astype(np.int64)
    kf = k.astype(np.float64)
    r = (x - kf * EXP64_LN2_64_HI) - kf * EXP64_LN2_64_LO
    p = EXP64_COEFFICIENTS[5] * r + EXP64_COEFFICIENTS[4]
    p = p * r + EXP64_COEFFICIENTS[3]
    p = p * r + EXP64_COEFFICIENTS[2]
    q = r + (r * r) * p
    j = k & _TABLE_MASK
    hi = np.asarray(EXP64_TABLE_HI, dtype=np.float64)[j]
    lo = np.asarray(EXP64_TABLE_LO, dtype=np.float64)[j]
    scale = (((k >> EXP64_TABLE_BITS) + 1023) << 52).view(np.float64)
    return np.where(live, (hi + (lo + hi * q)) * scale, 0.0)


def expm1_64(x: torch.Tensor) -> torch.Tensor:
    """e^x - 1 of a float64 tensor (x <= 708), accurate near 0 (module docstring)."""
    if x.dtype != torch.float64:
        raise TypeError(f"expm1_64: x must be float64, got {x.dtype}")
    small = x.abs() < HALF_LN2
    y = torch.where(small, x, 0.0)
    q = torch.full_like(y, EXP64_COEFFICIENTS[14])
    for c in EXP64_COEFFICIENTS[13:0:-1]:
        q = q * y + c
    return torch.where(small, y * q, _exp64_torch(x) - 1.0)


def log64(x: torch.Tensor, backend: str = "reference") -> torch.Tensor:
    """Natural log of a float64 tensor (finite, normal, > 0) by the recipe of the module docstring.

    backend: a name of ``hdlm_kernels.backends.names("log64")``; every backend returns the same bits."""
    return _float64_function("log64", x, backend)


def gumbel_noise(u: torch.Tensor, backend: str = "reference") -> torch.Tensor:
    """g = -log(-log u) with :func:`log64`, for float64 uniforms in (0, 1)."""
    return _float64_function("gumbel_noise", u, backend)


def exp64(x: torch.Tensor, backend: str = "reference") -> torch.Tensor:
    """e^x of a float64 tensor (x <= 708, -inf allowed) by the recipe of the module docstring."""
    return _float64_function("exp64", x, backend)


def _float64_function(op: str, x: torch.Tensor, backend: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float64:
        raise TypeError(f"{op}: x must be a float64 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return backends.select(op, backend, x.device, op)(x)


_REFERENCE: dict[str, Callable] = {"log64": _log64_torch, "gumbel_noise": _gumbel_noise_torch, "exp64": _exp64_torch}


def _triton(name: str) -> Callable[[], Callable]:
    def load() -> Callable:
        from . import triton_stream  # imports triton and builds the kernels

        return getattr(triton_stream, name)

    return load


def _cpp_log64(gumbel: bool) -> Callable[[], Callable]:
    def load() -> Callable:
        operator = _extension._C.log64_cpu
        return lambda x: operator(x, gumbel)

    return load


_CPP = {"log64": ("log64_cpu", _cpp_log64(False)), "gumbel_noise": ("log64_cpu", _cpp_log64(True)),
        "exp64": ("exp64_cpu", _extension.operator_loader("exp64_cpu"))}
for _op, _reference in _REFERENCE.items():
    backends.register(_op, "reference", summary="torch float64 (this module's recipe), any device",
                      load=lambda function=_reference: function)
    backends.register(_op, "cpp", summary="C++ (csrc/log64.h)", fused=True, auto_devices=("cpu",),
                      probe=_extension.operator_probe(_CPP[_op][0], "cpu"), load=_CPP[_op][1])
    backends.register(_op, "triton", summary="Triton (hdlm_kernels/sampling/triton_stream.py)", fused=True,
                      auto_devices=("cuda",), probe=triton_probe("hdlm_kernels.sampling.triton_stream"),
                      load=_triton(f"{_op}_triton"))
del _op, _reference
