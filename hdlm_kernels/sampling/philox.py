"""The sampling random stream (docs/sampling-stream.md): Philox4x32-10 and its float64 uniforms.

``uniform53`` is an op with backends (``hdlm_kernels.backends``): the NumPy reference, C++ on CPU
tensors, CUDA and Triton (:mod:`.triton_stream`) on GPU tensors; it runs as the custom op
``hdlm_kernels::uniform53``, so ``torch.compile`` traces through it. ``philox4x32_10_ref`` and
``uniform53_ref`` are the reference twins, written independently in NumPy uint64 arithmetic so that
tests can check the kernels against them bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .. import _extension, backends
from .._triton_device import triton_probe
from ..checks import integer, integer_tensor, seed_and_step
from .arguments import signed64, unsigned64
from .constants import SEED_LIMIT, STREAM_LIMIT, WORD_LIMIT

_MASK32 = np.uint64(0xFFFFFFFF)
_PHILOX_M0 = np.uint64(0xD2511F53)
_PHILOX_M1 = np.uint64(0xCD9E8D57)
_PHILOX_W0 = np.uint64(0x9E3779B9)
_PHILOX_W1 = np.uint64(0xBB67AE85)
_PHILOX_ROUNDS = 10

__all__ = ["SEED_LIMIT", "philox4x32_10", "philox4x32_10_ref", "stream_uniforms", "uniform53", "uniform53_ref"]


def philox4x32_10_ref(counter, key) -> np.ndarray:
    """Philox4x32-10 (Random123), vectorized in NumPy.

    counter: integers [..., 4] (each in [0, 2^32)); key: integers [..., 2]; the leading dimensions
    broadcast. Returns uint32 ndarray [..., 4]: the output words (w0, w1, w2, w3).
    """
    counter = np.asarray(counter, dtype=np.uint64)
    key = np.asarray(key, dtype=np.uint64)
    if counter.shape[-1:] != (4,) or key.shape[-1:] != (2,):
        raise ValueError(
            f"counter must have shape [..., 4] and key [..., 2]; got {counter.shape} and {key.shape}"
        )
    c0, c1, c2, c3 = (counter[..., i] for i in range(4))
    k0, k1 = key[..., 0], key[..., 1]
    for round_index in range(_PHILOX_ROUNDS):
        if round_index > 0:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        # Products of two 32-bit values fit in uint64 exactly.
        product0 = _PHILOX_M0 * c0
        product1 = _PHILOX_M1 * c2
        hi0, lo0 = product0 >> np.uint64(32), product0 & _MASK32
        hi1, lo1 = product1 >> np.uint64(32), product1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack(np.broadcast_arrays(c0, c1, c2, c3), axis=-1).astype(np.uint32)


def uniform53_ref(seed: int, step: int, stream: int, index) -> torch.Tensor:
    """Reference twin of ``uniform53``, in NumPy (docs/sampling-stream.md).

    index: integer tensor (or array-like) of element ids >= 0, any shape. Returns float64 tensor of
    the same shape, on index's device (computed on the CPU).
    """
    seed, step = seed_and_step(seed, step)
    stream = integer("stream", stream, 0, STREAM_LIMIT, "an int in [0, 2^32)")
    index = integer_tensor("index", index, "an integer tensor of element ids").to(torch.int64)
    if index.numel() and int(index.min()) < 0:
        raise ValueError(f"index must hold element ids >= 0; got a minimum of {int(index.min())}")
    return _uniform53_numpy(seed, step & 0xFFFFFFFF, stream, index)


def _uniform53_numpy(seed: int, step: int, stream: int, index: torch.Tensor) -> torch.Tensor:
    """uniform53 on the CPU in NumPy; the arguments are already validated (index: int64 >= 0)."""
    elements = index.detach().cpu().numpy().astype(np.uint64)
    pair = elements >> np.uint64(1)
    counter = np.stack(
        [
            pair & _MASK32,
            pair >> np.uint64(32),
            np.full_like(pair, stream),
            np.full_like(pair, step & 0xFFFFFFFF),
        ],
        axis=-1,
    )
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64)
    words = philox4x32_10_ref(counter, key).astype(np.uint64)
    odd = (elements & np.uint64(1)).astype(bool)
    word_a = np.where(odd, words[..., 2], words[..., 0])
    word_b = np.where(odd, words[..., 3], words[..., 1])
    k = ((word_a >> np.uint64(6)) << np.uint64(26)) | (word_b >> np.uint64(6))
    # (k + 0.5) * 2^-52 written as an exact integer (< 2^53) times a power of two.
    uniforms = ((k << np.uint64(1)) | np.uint64(1)).astype(np.float64) * 2.0**-53
    # NumPy turns 0-d results into scalars; restore the index's shape (scalar index included).
    uniforms = np.asarray(uniforms, dtype=np.float64).reshape(elements.shape)
    return torch.from_numpy(uniforms).to(index.device)


def uniform53(seed: int, step: int, stream: int, index: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Float64 uniforms of the sampling stream (docs/sampling-stream.md), one per element id in ``index``.

    Element e of stream ``stream`` at sampler step ``step`` under ``seed`` comes from the
    Philox4x32-10 block of counter (n & 0xffffffff, n >> 32, stream, step & 0xffffffff), n = e >> 1,
    under key (seed & 0xffffffff, seed >> 32): words (w0, w1) for even e, (w2, w3) for odd e give
    k = (w_a >> 6) * 2^26 + (w_b >> 6) and u = (k + 0.5) * 2^-52, exactly, in [2^-53, 1 - 2^-53].
    A draw depends only on (seed, step, stream, e), never on the other ids in the call.

    Args:
        seed: int in [0, 2^64).
        step: int >= 0; only its low 32 bits enter the counter.
        stream: int in [0, 2^32); 0 Gumbel noise, 1 per-row decisions, 2 token substitution.
        index: integer tensor of element ids >= 0, any shape (int32 and smaller are widened to int64).
        backend: a name of ``hdlm_kernels.backends.names("uniform53")``: "auto" (the fused kernel of
            index's device: C++ on CPU tensors, CUDA or Triton on GPU tensors; else the reference),
            "kernels" (insist on it), "reference" (NumPy), "cpp", "cuda" or "triton" (CUDA tensors, or
            CPU tensors under the Triton interpreter). A named backend that cannot run raises
            RuntimeError; it never falls back to another one. Every backend returns the same bits.

    Returns:
        float64 tensor with index's shape, on index's device.
    """
    seed, step = seed_and_step(seed, step)
    stream = integer("stream", stream, 0, STREAM_LIMIT, "an int in [0, 2^32)")
    index = integer_tensor("index", index, "an integer tensor of element ids")
    if index.dtype == torch.uint64:  # ids >= 2^63 would turn negative as int64: the op checks the values
        index = index.view(torch.int64) if index.is_contiguous() else index.contiguous().view(torch.int64)
    index = index.to(torch.int64)
    backends.check_name("uniform53", backend, "uniform53")
    return _uniform53_op(signed64(seed), step & 0xFFFFFFFF, stream, index, backend, True)


def stream_uniforms(seed: int, step: int, stream: int, elements: torch.Tensor) -> torch.Tensor:
    """``uniform53`` for the references of the other ops, without its checks: ``elements`` are int64 ids
    >= 0 that the caller built from checked row ids.

    Always "auto" (the fused kernel of the device, else the NumPy reference): every ``uniform53``
    backend returns the same bits (tests/test_uniform53.py), so this choice never changes a draw; it only
    keeps the reference samplers fast."""
    implementation = backends.select("uniform53", backends.AUTO, elements.device)
    return implementation(seed, step & 0xFFFFFFFF, stream, elements)


def _uniform53_checked(seed: int, step: int, stream: int, index: torch.Tensor, backend: str,
                       check: bool) -> torch.Tensor:
    seed = unsigned64(seed)
    if check and index.numel() > 0:
        smallest = int(index.min())
        if smallest < 0:
            raise ValueError(f"index must hold element ids in [0, 2^63); got a minimum of {smallest}"
                             + (" (ids >= 2^63 read as negative int64)" if smallest < -(2**62) else ""))
    implementation = backends.select("uniform53", backend, index.device, "uniform53")
    return implementation(seed, step, stream, index)


_uniform53_op = torch.library.custom_op(
    "hdlm_kernels::uniform53", _uniform53_checked, mutates_args=(),
    schema="(int seed, int step, int stream, Tensor index, str backend, bool check) -> Tensor")


@_uniform53_op.register_fake
def _(seed, step, stream, index, backend, check):
    return torch.empty(index.shape, dtype=torch.float64, device=index.device)


def philox4x32_10(
    counter: Sequence[int], key: Sequence[int], backend: str = "auto"
) -> tuple[int, int, int, int]:
    """Philox4x32-10 of one counter (4 ints in [0, 2^32)) under one key (2 ints in [0, 2^32)).

    backend: a name of ``hdlm_kernels.backends.names("philox4x32_10")``: "auto" (C++ when the
    extension is built, else the reference), "kernels", "cpp" or "reference".
    Returns the 4 output words as Python ints.
    """
    counter = _words("counter", counter, 4)
    key = _words("key", key, 2)
    words = backends.select("philox4x32_10", backend, "cpu", "philox4x32_10")(counter, key)
    return tuple(int(w) for w in words)


def _words(name: str, values, count: int) -> list[int]:
    expected = f"{count} ints in [0, 2^32)"
    if not isinstance(values, (Sequence, np.ndarray)) or isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be {expected}; got {type(values).__name__}")
    if len(values) != count:
        raise ValueError(f"{name} must be {expected}; got {len(values)} values")
    return [integer(f"{name}[{i}]", v, 0, WORD_LIMIT, "an int in [0, 2^32)") for i, v in enumerate(values)]


# ---------------------------------------------------------------- backends


def _uniform53_triton() -> Callable:
    from . import triton_stream  # imports triton and builds the kernels (for the interpreter or the GPU)

    return triton_stream.uniform53_triton


def _philox_reference(counter: list[int], key: list[int]) -> list[int]:
    return philox4x32_10_ref(counter, key).tolist()


backends.register("uniform53", "reference", summary="NumPy uint64 Philox (uniform53_ref's arithmetic), any device",
                  load=lambda: _uniform53_numpy)
backends.register("uniform53", "cpp", summary="C++ (csrc/uniform53_cpu.cpp)", fused=True, auto_devices=("cpu",),
                  probe=_extension.operator_probe("uniform53_cpu", "cpu"),
                  load=_extension.operator_loader("uniform53_cpu"))
backends.register("uniform53", "cuda", summary="CUDA (csrc/uniform53_cuda.cu)", fused=True, auto_devices=("cuda",),
                  probe=_extension.operator_probe("uniform53_cuda", "cuda"),
                  load=_extension.operator_loader("uniform53_cuda"))
backends.register("uniform53", "triton", summary="Triton (hdlm_kernels/sampling/triton_stream.py)", fused=True,
                  auto_devices=("cuda",), probe=triton_probe("hdlm_kernels.sampling.triton_stream"),
                  load=_uniform53_triton)
backends.register("philox4x32_10", "reference", summary="NumPy uint64 arithmetic", load=lambda: _philox_reference)
backends.register("philox4x32_10", "cpp", summary="C++ (csrc/philox.h)", fused=True, auto_devices=("cpu",),
                  probe=_extension.operator_probe("philox4x32_10", "cpu"),
                  load=_extension.operator_loader("philox4x32_10"))
