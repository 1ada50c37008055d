"""The constants every sampling backend shares: stream numbers, the float64 coefficients of ``log64``
and ``exp64``, the fixed-point scales of the γ step's row sum, and the limits of the arguments.

One module, imported by the torch references, the Triton kernels and the argument checks alike (the
C++/CUDA twins spell the same values in ``csrc/log64.h`` and ``csrc/hybrid_rule.h``, and the tests
compare them). See docs/sampling-stream.md and docs/log64.md.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

from ..checks import SEED_LIMIT

__all__ = [
    "GUMBEL_STREAM", "DECISION_STREAM", "CORRUPTION_STREAM", "SEED_LIMIT", "STREAM_LIMIT", "WORD_LIMIT",
    "ELEMENT_LIMIT", "LOGITS_DTYPES", "CHUNK_BYTES", "LOG64_COEFFICIENTS", "LN2_HI", "LN2_LO",
    "EXP64_COEFFICIENTS", "INV_LN2", "EXP64_MIN", "EXP64_TABLE_BITS", "EXP64_INV_LN2_64", "EXP64_LN2_64_HI",
    "EXP64_LN2_64_LO", "EXP64_TABLE_HI", "EXP64_TABLE_LO", "HALF_LN2", "FIXED_HI_SCALE", "FIXED_LO_SCALE",
    "FIXED_HI_UNIT", "FIXED_LO_UNIT", "SMALLEST_WEIGHT", "SCREEN_RELATIVE", "SCREEN_ABSOLUTE", "SCREEN_NOISE_ERROR",
]

# -- the random stream (docs/sampling-stream.md) ----------------------------------------------------
GUMBEL_STREAM = 0  # Gumbel noise: element e = row_id * V + v
DECISION_STREAM = 1  # per-row decisions (ACS transfer / correction): element e = row_id
CORRUPTION_STREAM = 2  # the forward noise of training: elements 2·row_id (event), 2·row_id + 1 (token)
STREAM_LIMIT = 2**32  # a stream number is the third Philox counter word
WORD_LIMIT = 2**32  # Philox counter and key words
ELEMENT_LIMIT = 2**63  # element ids are int64 >= 0

# -- the samplers' inputs ----------------------------------------------------------------------------
LOGITS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
# Budget of one float64 (or int64) temporary of a reference backend: chunk_rows * V * 8 bytes.
# log64 keeps up to about six such temporaries alive at once, so the extra memory stays below
# ~6 * 8 MiB plus O(R).
CHUNK_BYTES = 8 * 2**20

# -- log64 and exp64 (docs/log64.md) -----------------------------------------------------------------
# 1 / (2k + 1), k = 0..10, each the correctly rounded double of the fraction.
LOG64_COEFFICIENTS = tuple(float(np.float64(1.0) / np.float64(2 * k + 1)) for k in range(11))
# ln 2 split so that e · LN2_HI is exact for |e| < 2^11 (LN2_HI has 32 trailing zero bits).
LN2_HI = float.fromhex("0x1.62e42fee00000p-1")
LN2_LO = float.fromhex("0x1.a39ef35793c76p-33")
# 1 / n!, n = 0..14, each the correctly rounded double of the fraction (exp64 uses E[2..5], expm1_64
# E[1..14]).
EXP64_COEFFICIENTS = tuple(float(Fraction(1, math.factorial(n))) for n in range(15))
INV_LN2 = float.fromhex("0x1.71547652b82fep+0")  # 1 / ln 2, correctly rounded
EXP64_MIN = -708.0  # exp64 is 0 below (above it the result's power of two is >= 2^-1022: normal)
# exp64's table form (docs/log64.md, "exp64"): x = k ln2 / 64 + r, e^x = 2^(k >> 6) · 2^(j / 64) · e^r with
# j = k & 63. The scalings by 64 are exact (powers of two), so these are the constants above in other units:
# k · EXP64_LN2_64_HI is exact for |k| < 2^32 (21 significant bits).
EXP64_TABLE_BITS = 6
EXP64_INV_LN2_64 = INV_LN2 * 64.0
EXP64_LN2_64_HI = LN2_HI / 64.0
EXP64_LN2_64_LO = LN2_LO / 64.0


def _power_of_two_root(j: int, bits: int = 256) -> Fraction:
    """2^(j / 64) rounded down to `bits` fraction bits, exactly: six nested integer square roots of
    2^(j + 64 bits) (floor(sqrt(floor(sqrt(n)))) = floor(n^(1/4)) for integers)."""
    n = 1 << (j + 64 * bits)
    for _ in range(6):
        n = math.isqrt(n)
    return Fraction(n, 1 << bits)


# 2^(j / 64) = EXP64_TABLE_HI[j] + EXP64_TABLE_LO[j] (j = 0..63): the correctly rounded double, and the
# correctly rounded double of the rest (together within 2^-106 relative).
EXP64_TABLE_HI = tuple(float(_power_of_two_root(j)) for j in range(1 << EXP64_TABLE_BITS))
EXP64_TABLE_LO = tuple(float(_power_of_two_root(j) - Fraction(hi)) for j, hi in enumerate(EXP64_TABLE_HI))
HALF_LN2 = float.fromhex("0x1.62e42fefa39efp-2")  # ln 2 / 2: expm1_64 switches from series to exp64 at it

# -- the γ step's exact row sum (docs/hybrid-step.md) ------------------------------------------------
# The fixed-point sum of a row's scaled ratios r' in [0, 1]: two int64 accumulators of
# trunc(r' · 2^32) and of the next 31 bits, exact for any order of additions and any V < 2^31
# (V · 2^32 < 2^63 and V · 2^31 < 2^62).
FIXED_HI_SCALE = 2.0**32
FIXED_LO_SCALE = 2.0**31
FIXED_HI_UNIT = 2.0**-32
FIXED_LO_UNIT = 2.0**-63
SMALLEST_WEIGHT = 2.0**-1022  # weights below (subnormal or <= 0) count as 0: log64 needs normal inputs

# The screen's bound (docs/sampling-screen.md, "The bound"): |cheap - exact| <= SCREEN_RELATIVE * |a| +
# SCREEN_ABSOLUTE with a the float32 scaled logit; the cheap noise alone is within SCREEN_NOISE_ERROR.
# The same values as csrc/screen.h; here for the Triton screen and the tests.
SCREEN_RELATIVE = 2.0 ** -20
SCREEN_ABSOLUTE = 2.0 ** -13
SCREEN_NOISE_ERROR = 2.0 ** -14
