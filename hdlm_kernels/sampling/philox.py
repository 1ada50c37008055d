"""The sampling random stream of DESIGN.md §6: Philox4x32-10 and its float64 uniforms.

``uniform53`` runs on the compiled backends (C++ on CPU tensors, CUDA on GPU tensors) and on the Triton
kernels of :mod:`.triton_sampling` (``backend="triton"``).
``philox4x32_10_ref`` and ``uniform53_ref`` are their reference twins, written independently in
NumPy uint64 arithmetic so that tests can check the kernels against them bit for bit.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch

from .. import _extension

_MASK32 = np.uint64(0xFFFFFFFF)
_PHILOX_M0 = np.uint64(0xD2511F53)
_PHILOX_M1 = np.uint64(0xCD9E8D57)
_PHILOX_W0 = np.uint64(0x9E3779B9)
_PHILOX_W1 = np.uint64(0xBB67AE85)
_PHILOX_ROUNDS = 10

BACKENDS = ("auto", "cpp", "cuda", "reference", "triton")
SEED_LIMIT = 2**64
STREAM_LIMIT = 2**32
_WORD_LIMIT = 2**32


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
    """Reference twin of ``uniform53``, in NumPy (DESIGN.md §6).

    index: integer tensor (or array-like) of element ids >= 0, any shape. Returns float64 tensor of
    the same shape, on index's device (computed on the CPU).
    """
    return _uniform53_numpy(*_validated(seed, step, stream, index))


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
    """Float64 uniforms of the sampling stream (DESIGN.md §6), one per element id in ``index``.

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
        backend: "auto" (CUDA for CUDA tensors; C++ for CPU tensors, or the reference when the
            extension is not built), "cpp", "cuda", "reference" or "triton" (CUDA tensors, or CPU
            tensors under the Triton interpreter: TRITON_INTERPRET=1 set before its first use). A
            requested backend that is unavailable raises RuntimeError; it never falls back to another
            one.

    Returns:
        float64 tensor with index's shape, on index's device.
    """
    seed, step, stream, index = _validated(seed, step, stream, index)
    backend = _resolved_backend(backend, index)
    if backend == "reference":
        return _uniform53_numpy(seed, step, stream, index)
    if backend == "triton":
        return _triton_sampling("uniform53").uniform53_triton(seed, step, stream, index)
    if backend == "cpp":
        _require_device(index, "cpu", backend)
        return _extension.require_extension("uniform53", "cpp").uniform53_cpu(seed, step, stream, index)
    _require_device(index, "cuda", backend)
    return _extension.require_extension("uniform53", "cuda").uniform53_cuda(seed, step, stream, index)


def philox4x32_10(
    counter: Sequence[int], key: Sequence[int], backend: str = "auto"
) -> tuple[int, int, int, int]:
    """Philox4x32-10 of one counter (4 ints in [0, 2^32)) under one key (2 ints in [0, 2^32)).

    backend: "auto" (C++ when the extension is built, else the reference), "cpp" or "reference".
    Returns the 4 output words as Python ints.
    """
    counter = _words("counter", counter, 4)
    key = _words("key", key, 2)
    if backend not in ("auto", "cpp", "reference"):
        raise ValueError(f"backend must be one of 'auto', 'cpp', 'reference'; got {backend!r}")
    if backend == "cpp" or (backend == "auto" and _extension._C is not None):
        words = _extension.require_extension("philox4x32_10", "cpp").philox4x32_10(counter, key)
    else:
        words = philox4x32_10_ref(counter, key).tolist()
    return tuple(int(w) for w in words)


def _resolved_backend(backend: str, index: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend != "auto":
        return backend
    if index.device.type == "cuda":
        return "cuda"
    if index.device.type == "cpu":
        return "cpp" if _extension._C is not None else "reference"
    return "reference"


def _triton_sampling(op: str):
    """The Triton sampling module, imported on first use (importing it imports triton and builds the
    kernels, for the interpreter when TRITON_INTERPRET=1)."""
    try:
        from . import triton_sampling
    except ImportError as error:
        raise RuntimeError(
            f"{op} with backend='triton' needs triton, which is not importable ({error})"
        ) from error
    return triton_sampling


def _require_device(index: torch.Tensor, device_type: str, backend: str) -> None:
    if index.device.type != device_type:
        raise ValueError(
            f"index must be on {device_type} for backend={backend!r}; got a tensor on {index.device}"
        )


def _validated(seed, step, stream, index) -> tuple[int, int, int, torch.Tensor]:
    """Checks the arguments of uniform53 and returns (seed, step, stream, int64 index)."""
    seed = _integer("seed", seed, 0, SEED_LIMIT, "an int in [0, 2^64)")
    step = _integer("step", step, 0, None, "an int >= 0")
    stream = _integer("stream", stream, 0, STREAM_LIMIT, "an int in [0, 2^32)")
    index = _integer_tensor("index", index, "an integer tensor of element ids")
    if index.dtype == torch.uint64 and index.numel() > 0 and bool((index.to(torch.int64) < 0).any()):
        raise ValueError("index must hold element ids in [0, 2^63); got values >= 2^63")
    index = index.to(torch.int64)
    if index.numel() > 0:
        smallest = int(index.min())
        if smallest < 0:
            raise ValueError(f"index must hold element ids >= 0; got a minimum of {smallest}")
    return seed, step & 0xFFFFFFFF, stream, index


def _integer_tensor(name: str, value, expected: str) -> torch.Tensor:
    """``value`` as a tensor of an integer dtype: tensors pass through, arrays and sequences are
    converted; anything else, or a bool/floating/complex dtype, raises a TypeError naming ``name``."""
    if not isinstance(value, torch.Tensor):
        if isinstance(value, np.ndarray) or (isinstance(value, Sequence) and not isinstance(value, (str, bytes))):
            value = torch.as_tensor(np.asarray(value))
        else:
            raise TypeError(f"{name} must be {expected}; got {type(value).__name__}")
    if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
        raise TypeError(f"{name} must be {expected}; got dtype {value.dtype}")
    return value


def _integer(name: str, value, low: int, high: int | None, expected: str) -> int:
    if isinstance(value, (bool, float, torch.Tensor)):  # bools and 0-d int tensors pass operator.index
        raise TypeError(f"{name} must be {expected}; got {value!r} ({type(value).__name__})")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {expected}; got {value!r} ({type(value).__name__})") from None
    if value < low or (high is not None and value >= high):
        raise ValueError(f"{name} must be {expected}; got {value}")
    return value


def _words(name: str, values, count: int) -> list[int]:
    expected = f"{count} ints in [0, 2^32)"
    if not isinstance(values, (Sequence, np.ndarray)) or isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be {expected}; got {type(values).__name__}")
    if len(values) != count:
        raise ValueError(f"{name} must be {expected}; got {len(values)} values")
    return [_integer(f"{name}[{i}]", v, 0, _WORD_LIMIT, "an int in [0, 2^32)") for i, v in enumerate(values)]
