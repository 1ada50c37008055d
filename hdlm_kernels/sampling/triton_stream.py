"""Triton primitives of the sampling stream, shared by every Triton sampling kernel, and the
element-wise kernels that expose them (the twins of ``csrc/philox.h``, ``csrc/uniform53.h`` and
``csrc/log64.h``).

* ``philox4x32_10``: Philox4x32-10 (Random123) on uint32 words: ``tl.umulhi`` for the high half of
  each product, the wrapping uint32 product for the low half, and the Weyl key bump between rounds.
  Our counter layout is (n & 0xffffffff, n >> 32, stream, step & 0xffffffff) under the key
  (seed & 0xffffffff, seed >> 32); ``tl.randint4x`` cannot give it (its counter words 2 and 3 are 0).
* ``row_stream``: the prologue of every sampling kernel's row (its Philox pairs, their parity against the
  columns, the key and step words), so that the Gumbel-max and γ kernels walk a row's stream alike.
* ``uniform53_of_words``: k = (w_a >> 6) * 2^26 + (w_b >> 6), u = (2k + 1) * 2^-53, exact in float64.
* ``log64`` and ``exp64``: the functions of :mod:`hdlm_kernels.sampling.log64`, operation by
  operation (docs/log64.md); ``gumbel_noise`` = -log64(-log64 u).

Bit-identity with the torch reference rests on four controls:

* float64 constants: the Horner coefficients, 1/ln 2 and the ln 2 split, and the γ step's scales
  (2^-1022 is not even a float32 number) are loaded from a float64 tensor (``float64_constants``),
  never written as Python float literals (which older Triton versions turn into float32 constants
  before widening); a float64 argument such as the temperature travels as the int64 bit pattern of
  the double and is bitcast back in the kernel (a Python float argument would be passed as
  float32). The only float literals left (0, 0.5, 1.0, 2.0, 2^-53, ±inf) are exact in float32.
* float -> int conversions truncate (``cvt.rzi`` on NVIDIA GPUs, NumPy's ``astype`` in the
  interpreter), as torch's ``.to(torch.int64)`` does: exp64's k and the fixed-point digits of the
  γ step.
* no FMA contraction: every launch passes ``enable_fp_fusion=False`` (``launch_options``), so
  products and sums round separately as in the reference (the interpreter, which computes with
  NumPy, accepts and ignores it).
* float64 ``/`` is the IEEE correctly rounded division (``div.rn.f64`` on NVIDIA GPUs; NumPy in
  the interpreter).

On the CPU the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before this
module is imported; the package imports it lazily, on the first use of a Triton backend).
"""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

from .._triton_device import built_for_interpreter
from .._triton_device import check_triton_device as check_device_for
from .constants import (
    EXP64_COEFFICIENTS,
    EXP64_INV_LN2_64,
    EXP64_LN2_64_HI,
    EXP64_LN2_64_LO,
    EXP64_MIN,
    EXP64_TABLE_BITS,
    EXP64_TABLE_HI,
    EXP64_TABLE_LO,
    FIXED_HI_SCALE,
    FIXED_HI_UNIT,
    FIXED_LO_SCALE,
    FIXED_LO_UNIT,
    LN2_HI,
    LN2_LO,
    LOG64_COEFFICIENTS,
    SMALLEST_WEIGHT,
)

# Elements per program of the element-wise kernels: a GPU size, and a larger one under the
# interpreter, whose cost is per program and per operation rather than per element.
GPU_BLOCK = 1024
INTERPRETER_BLOCK = 16384

# --------------------------------------------------------------------------------------------------
# device functions
# --------------------------------------------------------------------------------------------------


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
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
def stream_block(n, k0, k1, stream, step_lo):
    """The Philox block of pair n (int64 >= 0) of the stream: counter (n lo, n hi, stream, step lo)."""
    c0 = (n & 0xFFFFFFFF).to(tl.uint32)
    c1 = (n >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + stream
    c3 = tl.zeros_like(c0) + step_lo
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


@triton.jit
def row_stream(row_id, vocab, key0, key1, step_lo):
    """The stream of a sampled row as the sampling kernels walk it (docs/sampling-stream.md): element
    e = row_id·V + v of stream 0 uses Philox block n = e >> 1, words (w0, w1) when e is even and (w2, w3)
    when odd, so lane j of a walk owns block pair_base + j, whose even element is column 2j - parity and
    odd element the next column. Returns (element_base = row_id·V, parity = element_base & 1 (int32),
    pair_base, num_pairs (the blocks that cover columns 0..V-1), and the uint32 key and step words)."""
    element_base = row_id * vocab
    parity = (element_base & 1).to(tl.int32)
    num_pairs = (vocab + parity + 1) // 2
    return (element_base, parity, element_base >> 1, num_pairs, key0.to(tl.uint32), key1.to(tl.uint32),
            step_lo.to(tl.uint32))


@triton.jit
def uniform53_of_words(word_a, word_b):
    """u = (k + 0.5) * 2^-52 = (2k + 1) * 2^-53 with k = (w_a >> 6) * 2^26 + (w_b >> 6): exact."""
    k = ((word_a >> 6).to(tl.int64) << 26) | (word_b >> 6).to(tl.int64)
    return ((k << 1) | 1).to(tl.float64) * 1.1102230246251565e-16  # 2^-53, exact in float32 too


@triton.jit
def log64(x, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo):
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
def load_log64_constants(CONSTS):
    return (tl.load(CONSTS + 0), tl.load(CONSTS + 1), tl.load(CONSTS + 2), tl.load(CONSTS + 3),
            tl.load(CONSTS + 4), tl.load(CONSTS + 5), tl.load(CONSTS + 6), tl.load(CONSTS + 7),
            tl.load(CONSTS + 8), tl.load(CONSTS + 9), tl.load(CONSTS + 10), tl.load(CONSTS + 11),
            tl.load(CONSTS + 12))


@triton.jit
def gumbel_noise(u, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo):
    """g = -log64(-log64(u))."""
    inner = log64(u, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo)
    return -log64(-inner, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo)


@triton.jit
def load_exp64_constants(CONSTS):
    """E[2..5], 64 / ln 2, ln 2 / 64 (high, low) and EXP64_MIN (slots 13..20); the table 2^(j/64) stays in
    the buffer (EXP64_TABLE_SLOT: the high parts, then the low parts) and exp64 gathers from it."""
    return (tl.load(CONSTS + 13), tl.load(CONSTS + 14), tl.load(CONSTS + 15), tl.load(CONSTS + 16),
            tl.load(CONSTS + 17), tl.load(CONSTS + 18), tl.load(CONSTS + 19), tl.load(CONSTS + 20))


EXP64_TABLE_SLOT = tl.constexpr(26)  # float64_constants: 2^(j/64) high parts at 26..89, low parts at 90..153
EXP64_TABLE_SIZE = tl.constexpr(1 << EXP64_TABLE_BITS)
EXP64_TABLE_SHIFT = tl.constexpr(EXP64_TABLE_BITS)  # k >> 6: the power of two of 2^(k/64)


@triton.jit
def exp64(x, e2, e3, e4, e5, inv_ln2_64, ln2_64_hi, ln2_64_lo, exp_min, CONSTS):
    """exp64 of float64 x (x <= 708, -inf allowed), operation by operation as in log64.py.

    e2..exp_min: float64 scalars (load_exp64_constants); CONSTS: the constants buffer, whose table
    2^(j/64) is gathered (one read of the high and one of the low part per element, cached)."""
    live = x >= exp_min
    x = tl.where(live, x, 0.0)  # keeps k in range (and -inf, NaN out of the int conversion); result 0
    t = x * inv_ln2_64
    k = tl.where(t >= 0, t + 0.5, t - 0.5).to(tl.int64)  # float -> int truncates: round half away from 0
    kf = k.to(tl.float64)
    r = (x - kf * ln2_64_hi) - kf * ln2_64_lo
    p = e5 * r + e4
    p = p * r + e3
    p = p * r + e2
    q = r + (r * r) * p  # e^r - 1
    j = k & (EXP64_TABLE_SIZE - 1)
    table_hi = tl.load(CONSTS + EXP64_TABLE_SLOT + j)
    table_lo = tl.load(CONSTS + EXP64_TABLE_SLOT + EXP64_TABLE_SIZE + j)
    # 2^(k >> 6), exactly (k >> 6 >= -1022 where live; >> on int64 is arithmetic: the floor of k / 64)
    scale = (((k >> EXP64_TABLE_SHIFT) + 1023) << 52).to(tl.float64, bitcast=True)
    return tl.where(live, (table_hi + (table_lo + table_hi * q)) * scale, 0.0)


@triton.jit
def widen(value):
    """A loaded log-score in float64: bf16 / fp16 / fp32 -> fp32 -> fp64 is exact."""
    if value.dtype == tl.float64:
        wide = value
    else:
        wide = value.to(tl.float32).to(tl.float64)
    return wide


# --------------------------------------------------------------------------------------------------
# element-wise kernels (the stream itself and the float64 functions, for tests and the references)
# --------------------------------------------------------------------------------------------------


@triton.jit
def _exp64_kernel(X, OUT, CONSTS, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    x = tl.load(X + offs, mask=ok, other=0.0)
    e2, e3, e4, e5, inv_ln2_64, ln2_64_hi, ln2_64_lo, exp_min = load_exp64_constants(CONSTS)
    y = exp64(x, e2, e3, e4, e5, inv_ln2_64, ln2_64_hi, ln2_64_lo, exp_min, CONSTS)
    tl.store(OUT + offs, y, mask=ok)


@triton.jit(do_not_specialize=["key0", "key1", "stream", "step_lo"])
def _uniform53_kernel(INDEX, OUT, numel, key0: tl.int64, key1: tl.int64, stream: tl.int64,
                      step_lo: tl.int64, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    element = tl.load(INDEX + offs, mask=ok, other=0)
    w0, w1, w2, w3 = stream_block(element >> 1, key0.to(tl.uint32), key1.to(tl.uint32),
                                   stream.to(tl.uint32), step_lo.to(tl.uint32))
    odd = (element & 1) != 0
    u = uniform53_of_words(tl.where(odd, w2, w0), tl.where(odd, w3, w1))
    tl.store(OUT + offs, u, mask=ok)



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
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(OUT + offs * 4 + 0, w0.to(tl.int64), mask=ok)
    tl.store(OUT + offs * 4 + 1, w1.to(tl.int64), mask=ok)
    tl.store(OUT + offs * 4 + 2, w2.to(tl.int64), mask=ok)
    tl.store(OUT + offs * 4 + 3, w3.to(tl.int64), mask=ok)


@triton.jit
def _log64_kernel(X, OUT, CONSTS, numel, GUMBEL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    x = tl.load(X + offs, mask=ok, other=0.5)
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo = load_log64_constants(CONSTS)
    if GUMBEL:
        y = gumbel_noise(x, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo)
    else:
        y = log64(x, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo)
    tl.store(OUT + offs, y, mask=ok)


# --------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------


def interpreted() -> bool:
    """Whether the kernels of this module were built for the Triton interpreter (CPU tensors)."""
    return built_for_interpreter(_uniform53_kernel)


def check_triton_device(tensor: torch.Tensor, context: str) -> None:
    """Raise a clear RuntimeError when ``tensor`` cannot be processed by these kernels here."""
    check_device_for(tensor, context, interpreted())


_CONSTANTS: dict[torch.device, torch.Tensor] = {}


def float64_constants(device: torch.device) -> torch.Tensor:
    """float64 [154] on ``device`` (cached): the log64 coefficients C[0..10], LN2_HI, LN2_LO (0..12, read
    by load_log64_constants), exp64's E[2..5], 64 / ln 2, ln 2 / 64 (high, low), EXP64_MIN (13..20,
    load_exp64_constants), the γ step's fixed-point scales and smallest weight (21..25, the γ step kernel)
    and exp64's table 2^(j/64): high parts (26..89) and low parts (90..153), gathered by exp64."""
    constants = _CONSTANTS.get(device)
    if constants is None:
        values = (list(LOG64_COEFFICIENTS) + [LN2_HI, LN2_LO] + list(EXP64_COEFFICIENTS[2:6])
                  + [EXP64_INV_LN2_64, EXP64_LN2_64_HI, EXP64_LN2_64_LO, EXP64_MIN]
                  + [FIXED_HI_SCALE, FIXED_LO_SCALE, FIXED_HI_UNIT, FIXED_LO_UNIT, SMALLEST_WEIGHT]
                  + list(EXP64_TABLE_HI) + list(EXP64_TABLE_LO))
        assert len(values) == EXP64_TABLE_SLOT.value + 2 * EXP64_TABLE_SIZE.value
        constants = torch.tensor(values, dtype=torch.float64, device=device)
        _CONSTANTS[device] = constants
    return constants


def on_device(tensor: torch.Tensor):
    """Launches on the tensor's GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def launch_block(gpu: int, interpreter: int) -> int:
    return interpreter if interpreted() else gpu


def launch_options(num_warps: int = 4) -> dict:
    # No FMA contraction (log64's products and sums round separately). The interpreter ignores both.
    return {"num_warps": num_warps, "enable_fp_fusion": False}


def double_bits(value: float) -> int:
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
        with on_device(counter):
            _philox_kernel[(triton.cdiv(count, block),)](counter, key, out, count, BLOCK=block,
                                                         **launch_options())
    return out


def uniform53_triton(seed: int, step: int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """uniform53 (docs/sampling-stream.md) on the Triton backend; arguments already validated (seed in
    [0, 2^64), step, stream in [0, 2^32), index int64 >= 0). float64 with index's shape, on index's
    device."""
    check_triton_device(index, "uniform53")
    flat = index.reshape(-1).contiguous()
    out = torch.empty(flat.shape, dtype=torch.float64, device=index.device)
    numel = flat.numel()
    if numel:
        block = launch_block(GPU_BLOCK, INTERPRETER_BLOCK)
        with on_device(index):
            _uniform53_kernel[(triton.cdiv(numel, block),)](
                flat, out, numel, seed & 0xFFFFFFFF, seed >> 32, stream, step & 0xFFFFFFFF,
                BLOCK=block, **launch_options())
    return out.reshape(index.shape)


def _elementwise(kernel, x: torch.Tensor, context: str, **constexprs) -> torch.Tensor:
    """``kernel`` (an elementwise float64 kernel of this module) over every element of ``x``."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float64:
        raise TypeError(f"{context}: x must be a float64 tensor")
    check_triton_device(x, context)
    flat = x.reshape(-1).contiguous()
    out = torch.empty_like(flat)
    numel = flat.numel()
    if numel:
        block = launch_block(GPU_BLOCK, INTERPRETER_BLOCK)
        with on_device(x):
            kernel[(triton.cdiv(numel, block),)](flat, out, float64_constants(x.device), numel, BLOCK=block,
                                                 **constexprs, **launch_options())
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
