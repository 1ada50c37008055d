"""Exact categorical sampling by FP64 Gumbel-max (DESIGN.md §6).

``gumbel_argmax`` draws one token per row of a logits matrix [R, V] (bf16, fp16, fp32 or fp64) from
softmax(logits / temperature), with the noise of stream 0 of the sampling stream (``uniform53``):

    u[r, v] = uniform53(seed, step, stream=0, element=row_ids[r] * V + v)      exact float64
    g[r, v] = -log64(-log64(u[r, v]))                                          float64
    token[r] = argmax_v  float64(logits[r, v]) / temperature + g[r, v]         ties -> lowest v

Why float64 and 53-bit uniforms: a token whose logit is Δ below the top one wins only when its noise
exceeds the top token's by about Δ. Float32 uniforms lie on a 2^-24 grid, so float32 Gumbel noise stops
at -log(-log(1 - 2^-24)) ≈ 16.6 and its largest values are coarsely quantized; tokens 10-16 nats below
the top are under-sampled and those further below are never sampled (Zheng et al. 2024,
notes/kernel-landscape.md §4.2). The 52-bit uniforms of uniform53, in [2^-53, 1 - 2^-53], carry the
noise to about 36.7, and float64 arithmetic keeps the score of every token accurate to ~1e-15.

Why chunks: the float64 temporaries (element ids, noise, scores) of all R rows at once would be
R * V * 8 bytes each (3.3 GB per tensor for 8 x 1024 rows of V = 50258). The reference backend
processes ``chunk_rows`` rows at a time; each row's draw depends only on (seed, step, row_id) and the
row's logits, so the result does not depend on the chunking, nor on the other rows in the call.

Bit-identity across backends: Philox, the uniforms, the float64 conversion, division and addition
are exact or correctly rounded everywhere, but library logs are not (torch's CPU log and glibc's log
already differ in the last bit for ~0.1% of the uniforms). So the noise uses ``log64``
(:mod:`.log64`), a logarithm spelled out in correctly rounded operations that every backend
reproduces bit for bit.

``gumbel_argmax_ref`` is the direct twin (the whole [R, V] at once, NumPy Philox) used by the tests.
The fused kernels (C++ ``csrc/gumbel_cpu.cpp``, CUDA ``csrc/gumbel_cuda.cu``, Triton
:mod:`.triton_sampling`) plug in behind ``gumbel_argmax(..., backend=...)``.
"""

from __future__ import annotations

import importlib.util
import numbers
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .. import _extension
from .log64 import gumbel_noise
from .philox import SEED_LIMIT, _integer, _integer_tensor, _uniform53_numpy, uniform53_ref

GUMBEL_STREAM = 0  # DESIGN.md §6: stream 0 = Gumbel noise, element e = row_id * V + v

BACKENDS = ("auto", "kernels", "reference", "cpp", "triton", "cuda")

# Budget of one float64 (or int64) temporary of the reference backend: chunk_rows * V * 8 bytes.
# log64 keeps up to about six such temporaries alive at once, so the extra memory stays below
# ~6 * 8 MiB plus O(R) (see _gumbel_argmax_reference).
CHUNK_BYTES = 8 * 2**20

LOGITS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_ELEMENT_LIMIT = 2**63  # element ids are int64 (uniform53 accepts ids in [0, 2^63))


def gumbel_argmax(
    logits: torch.Tensor,
    seed: int,
    step: int,
    row_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    exclude=None,
    backend: str = "auto",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """One token per row, sampled exactly from softmax(logits / temperature) by FP64 Gumbel-max.

    Implements the Gumbel-max rule of DESIGN.md §6 (see the module docstring): noise from stream 0 at
    element row_ids[r] * V + v, g = -log(-log u) and score = float64(logit) / temperature + g in
    float64, argmax with ties to the lowest index. The draw of a row depends only on (seed, step,
    row_ids[r]) and that row's logits, never on the other rows of the call, their order or the
    chunking. Rows that share a row_id share their noise.

    Args:
        logits: [R, V] bf16, fp16, fp32 or fp64, any device. Never copied to float64 as a whole.
            A +inf logit wins outright; a row whose scores are all -inf (every candidate at -inf
            or excluded) or that holds a NaN raises ValueError.
        seed: int in [0, 2^64).
        step: int >= 0, the sampler step (its low 32 bits enter the Philox counter).
        row_ids: [R] integer tensor (int64 preferred) of absolute row identities >= 0, e.g.
            b * d + i for position i of sequence b; default arange(R). Needs
            max(row_ids) * V + V - 1 < 2^63 (element ids are int64).
        temperature: float >= 0. 0 is greedy: the argmax of the logits, ties to the lowest index,
            no noise drawn.
        exclude: token ids removed from the race (e.g. MASK): None, an int, a sequence of ints or
            an integer tensor, each in [0, V); at least one token must remain.
        backend: "auto" (the fused kernel for logits' device when one exists, see ``fused_backend``:
            CUDA, else Triton, on GPU tensors; C++ on CPU tensors; the reference otherwise),
            "kernels" (the fused kernel, or RuntimeError), "reference", "cpp", "triton" or "cuda".
            A named backend that is not available raises RuntimeError; it never falls back to
            another one. Every backend returns the same tokens.
        chunk_rows: rows per chunk of the reference backend (its float64 temporaries are
            chunk_rows * V * 8 bytes each); default max(1, CHUNK_BYTES // (8 * V)). Does not
            change the result.

    Returns:
        LongTensor [R] of token ids in [0, V), on logits' device.
    """
    logits = _checked_logits(logits)
    num_rows, vocab = logits.shape
    seed = _integer("seed", seed, 0, SEED_LIMIT, "an int in [0, 2^64)")
    step = _integer("step", step, 0, None, "an int >= 0")
    row_ids = _checked_row_ids(row_ids, num_rows, vocab, logits.device)
    temperature = _checked_temperature(temperature)
    exclude = _checked_exclude(exclude, vocab, logits.device)
    chunk_rows = _checked_chunk_rows(chunk_rows, vocab)
    implementation = _implementation(backend, "gumbel_argmax", logits.device)
    tokens, best = implementation(logits, None, row_ids, seed, step, temperature, exclude, chunk_rows)
    _check_winners(best)
    return tokens


def gumbel_argmax_deferred(
    logits: torch.Tensor,
    seed: int,
    step: int,
    row_ids: torch.Tensor,
    temperature: float = 1.0,
    exclude: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``gumbel_argmax`` without a host synchronization, for generation loops that keep the device busy.

    Same draw as ``gumbel_argmax``, but nothing that needs a tensor's values on the host is checked
    (types, dtypes, shapes and devices still are). The caller guarantees what ``gumbel_argmax`` would
    check: ``row_ids`` (required) int64 on logits' device, distinct, >= 0, with row_id·V + V - 1 <
    2^63; ``exclude`` None or an int64 tensor of sorted distinct ids in [0, V) on logits' device that
    leaves a token. Rows ``gumbel_argmax`` rejects (a NaN logit, no candidate) are reported instead.

    Returns:
        (tokens LongTensor [R], failed): ``failed`` is a 0-d bool tensor on logits' device, True when
        some row would have raised in ``gumbel_argmax`` (its token is then meaningless); read it when
        the caller synchronizes anyway, e.g. at the end of generation.
    """
    logits = _checked_logits(logits)
    num_rows, vocab = logits.shape
    seed = _integer("seed", seed, 0, SEED_LIMIT, "an int in [0, 2^64)")
    step = _integer("step", step, 0, None, "an int >= 0")
    _check_index_tensor("row_ids", row_ids, logits.device, num_rows)
    if exclude is not None:
        _check_index_tensor("exclude", exclude, logits.device)
    temperature = _checked_temperature(temperature)
    implementation = _implementation(backend, "gumbel_argmax", logits.device)
    tokens, best = implementation(logits, None, row_ids, seed, step, temperature, exclude,
                                  _checked_chunk_rows(None, vocab))
    return tokens, (torch.isnan(best) | (best == -torch.inf)).any()


def gumbel_argmax_ref(
    logits: torch.Tensor,
    seed: int,
    step: int,
    row_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    exclude=None,
) -> torch.Tensor:
    """Reference twin of ``gumbel_argmax``: DESIGN.md §6 written out directly, for tests.

    Builds the whole [R, V] element-id, noise and score tensors in float64 (memory R * V * 8 bytes
    each) and draws the noise with the NumPy Philox twin ``uniform53_ref``. Same arguments and result
    as ``gumbel_argmax``, without its input checks.
    """
    num_rows, vocab = logits.shape
    device = logits.device
    if row_ids is None:
        row_ids = torch.arange(num_rows, device=device)
    row_ids = torch.as_tensor(row_ids, device=device).to(torch.int64)
    scores = logits.to(torch.float64, copy=True)
    if temperature != 0:
        elements = row_ids[:, None] * vocab + torch.arange(vocab, device=device)
        u = uniform53_ref(seed, step, GUMBEL_STREAM, elements)
        # A 0-d divisor on logits' device: PyTorch's CUDA division by a CPU scalar multiplies by
        # the reciprocal, which is not the correctly rounded quotient the contract asks for.
        divisor = torch.tensor(float(temperature), dtype=torch.float64, device=device)
        scores = scores / divisor + gumbel_noise(u)
    if exclude is not None:
        excluded = torch.as_tensor(exclude, dtype=torch.int64, device=device).reshape(-1)
        scores[:, excluded] = -torch.inf
    return scores.argmax(dim=1)  # the first maximum: ties to the lowest index


# ---------------------------------------------------------------- backends


def _gumbel_argmax_reference(
    logits: torch.Tensor,
    take: torch.Tensor | None,
    row_ids: torch.Tensor,
    seed: int,
    step: int,
    temperature: float,
    exclude: torch.Tensor | None,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference backend, in chunks of rows (arguments already checked).

    logits: [K, V]; take: None (sample every row of logits) or LongTensor [n] of logits rows to
    sample, in output order; row_ids: int64 [n]. Returns (tokens int64 [n], the winning scores
    float64 [n]), the scores for the caller's NaN / no-candidate checks.

    Per chunk of c rows the extra memory is a few c x V temporaries of 8 bytes (element ids, the
    uniforms and log64's intermediates, then noise and scores), plus, when ``take`` gathers rows,
    their c x V copy in logits' dtype for the moment it takes to convert it to float64.
    """
    device = logits.device
    vocab = logits.shape[1]
    num_rows = row_ids.shape[0]
    tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    best = torch.empty(num_rows, dtype=torch.float64, device=device)
    if num_rows == 0:
        return tokens, best
    columns = torch.arange(vocab, dtype=torch.int64, device=device)
    # A 0-d divisor on logits' device keeps the division correctly rounded on CUDA (see the twin).
    divisor = torch.tensor(temperature, dtype=torch.float64, device=device)
    for start in range(0, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        if temperature != 0:
            elements = row_ids[start:stop, None] * vocab + columns
            noise = gumbel_noise(_stream_uniforms(seed, step, GUMBEL_STREAM, elements))
            del elements
        rows = logits[start:stop] if take is None else logits.index_select(0, take[start:stop])
        # Exact for every input dtype; copy=True so that fp64 logits are never modified in place.
        scores = rows.to(torch.float64, copy=True)
        del rows
        if temperature != 0:
            if temperature != 1:  # x / 1 == x exactly
                scores.div_(divisor)
            scores.add_(noise)
            del noise
        if exclude is not None:
            scores.index_fill_(1, exclude, -torch.inf)
        # torch.max returns the first index of the maximum: ties go to the lowest token id. A NaN
        # score is returned as the maximum, which the caller reports.
        torch.max(scores, dim=1, out=(best[start:stop], tokens[start:stop]))
        del scores
    return tokens, best


def _gumbel_argmax_triton(
    logits: torch.Tensor,
    take: torch.Tensor | None,
    row_ids: torch.Tensor,
    seed: int,
    step: int,
    temperature: float,
    exclude: torch.Tensor | None,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton backend (:mod:`.triton_sampling`): one program per row, bit-identical to the reference.

    Runs CUDA tensors, or CPU tensors when the kernels were built for the Triton interpreter
    (TRITON_INTERPRET=1 set before the first backend="triton" call); otherwise raises RuntimeError.
    The module is imported on first use, so that importing hdlm_kernels does not import triton.
    """
    try:
        from . import triton_sampling
    except ImportError as error:  # triton is installed (see below) but does not import
        raise RuntimeError(
            f"gumbel_argmax with backend='triton' needs triton, which is not importable ({error})"
        ) from error
    return triton_sampling.gumbel_argmax_triton(
        logits, take, row_ids, seed, step, temperature, exclude, chunk_rows
    )


def _compiled_backend(backend: str, device_type: str, operator_name: str, summary: str,
                      op: str = "gumbel_argmax", first_name: str = "logits") -> Callable:
    """A backend that calls the ``_C`` operator ``operator_name`` with the reference backend's
    arguments minus the last one, chunk_rows (the kernels keep no float64 temporaries). Its first
    argument (the logits or log-scores) must be on ``device_type``. It raises RuntimeError for
    tensors on another device, or when ``_C`` (or its CUDA part, or this operator) is missing; it
    never falls back to another backend."""
    where = "CPU" if device_type == "cpu" else "CUDA"

    def run(first, *rest):
        if first.device.type != device_type:
            raise RuntimeError(
                f"{op}: backend={backend!r} runs on {where} tensors; got {first_name} on {first.device}")
        extension = _extension.require_extension(op, backend)
        operator = getattr(extension, operator_name, None)
        if operator is None:  # a _C built from older sources than this Python package
            raise RuntimeError(
                f"{op}: hdlm_kernels._C has no {operator_name} (it was built from older sources); "
                "reinstall with `pip install --no-build-isolation .`")
        return operator(first, *rest[:-1])

    run.__doc__ = summary
    return run


_gumbel_argmax_cpp = _compiled_backend(
    "cpp", "cpu", "gumbel_argmax_cpu",
    "The C++ backend (csrc/gumbel_cpu.cpp): OpenMP over rows, logits read through their strides.")
_gumbel_argmax_cuda = _compiled_backend(
    "cuda", "cuda", "gumbel_argmax_cuda",
    "The CUDA backend (csrc/gumbel_cuda.cu): one thread block per sampled row.")


# Backends that exist here; every entry takes the arguments of _gumbel_argmax_reference and returns the
# same pair. "cpp" and "cuda" are always registered and raise RuntimeError when _C (or its CUDA part) is
# not built. "triton" is registered when triton is installed (its kernels are built lazily, on the first
# call).
_IMPLEMENTATIONS: dict[str, Callable] = {
    "reference": _gumbel_argmax_reference,
    "cpp": _gumbel_argmax_cpp,
    "cuda": _gumbel_argmax_cuda,
}
if importlib.util.find_spec("triton") is not None:
    _IMPLEMENTATIONS["triton"] = _gumbel_argmax_triton


def fused_backend(device: torch.device | str) -> str:
    """The fused sampling backend for tensors on ``device``: ``"cuda"`` (the ``_C`` kernels) or else
    ``"triton"`` on a GPU, ``"cpp"`` on the CPU. Raises RuntimeError naming what is missing when
    there is none, so that ``sampler_backend="kernels"`` never silently runs the reference."""
    device = torch.device(device)
    if device.type == "cuda":
        if "cuda" in _IMPLEMENTATIONS and _compiled_backend_ready("cuda"):
            return "cuda"
        if "triton" in _IMPLEMENTATIONS and _triton_ready(device):
            return "triton"
        raise RuntimeError("no fused sampling kernel for CUDA tensors here: hdlm_kernels._C lacks its CUDA "
                           f"sampling kernels ({_extension.cuda_missing_reason() or 'not built'}) and triton is "
                           "not usable")
    if device.type == "cpu" and "cpp" in _IMPLEMENTATIONS and _compiled_backend_ready("cpp"):
        return "cpp"
    raise RuntimeError(f"no fused sampling kernel for {device.type} tensors here: the C++ extension is not "
                       f"built ({_extension.missing_reason or 'it lacks the sampling kernels'})")


def _compiled_backend_ready(backend: str) -> bool:
    """Whether the ``_C`` operator behind ``backend`` ("cpp" or "cuda") is built here."""
    extension = _extension._C
    if extension is None or (backend == "cuda" and _extension.cuda_missing_reason()):
        return False
    return hasattr(extension, "gumbel_argmax_cuda" if backend == "cuda" else "gumbel_argmax_cpu")


def _triton_ready(device: torch.device) -> bool:
    try:
        from . import triton_sampling
    except ImportError:
        return False
    return (device.type == "cuda") != triton_sampling.interpreted()


def _implementation(backend: str, op: str, device: torch.device | None = None,
                    implementations: dict[str, Callable] | None = None) -> Callable:
    """The backend function for ``op`` on ``device``, from ``implementations`` (default: the
    ``gumbel_argmax`` backends). ``"auto"`` takes the fused kernel when one exists for the device
    (:func:`fused_backend`) and the reference otherwise; ``"kernels"`` insists on the fused kernel;
    a named backend that does not exist raises."""
    implementations = _IMPLEMENTATIONS if implementations is None else implementations
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend in ("auto", "kernels"):
        try:
            backend = fused_backend(device if device is not None else "cpu")
        except RuntimeError:
            if backend == "kernels":
                raise
            backend = "reference"
    if backend not in implementations:
        available = ", ".join(map(repr, implementations))
        raise RuntimeError(
            f"{op} with backend={backend!r} is not implemented yet; available backends: {available} "
            f"(or 'auto')"
        )
    return implementations[backend]


def _stream_uniforms(seed: int, step: int, stream: int, elements: torch.Tensor) -> torch.Tensor:
    """uniform53 on elements' device: the compiled stream when built for that device, else the NumPy
    twin (copied over). All of them are bit-identical (tests/test_philox.py), so this choice never
    changes a draw; it only saves the reference sampler from failing where _C lacks CUDA.

    ``elements`` are int64 ids >= 0 built by the caller from checked row ids, so the operators are
    called directly, without ``uniform53``'s validation (which reads the ids on the host)."""
    step &= 0xFFFFFFFF
    if elements.device.type == "cpu" and _extension._C is not None:
        return _extension._C.uniform53_cpu(seed, step, stream, elements)
    if elements.device.type == "cuda" and not _extension.cuda_missing_reason():
        return _extension._C.uniform53_cuda(seed, step, stream, elements)
    return _uniform53_numpy(seed, step, stream, elements)


# ---------------------------------------------------------------- argument checks


def _checked_logits(logits) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a floating tensor [R, V]; got {type(logits).__name__}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(
            f"logits must have dtype bfloat16, float16, float32 or float64; got {logits.dtype}"
        )
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [R, V]; got shape {tuple(logits.shape)}")
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have V >= 1 tokens; got shape {tuple(logits.shape)}")
    if logits.shape[1] >= 2**31:  # the kernels index a row's tokens with int32
        raise ValueError(f"logits must have V < 2^31 tokens; got V = {logits.shape[1]}")
    return logits.detach()  # sampling is not differentiable; keep autograd out of the temporaries


def _checked_row_ids(row_ids, num_rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Returns int64 [num_rows] on device; checks ids >= 0, distinct, and row_id * V + V - 1 < 2^63.

    Distinct because a row's randomness is keyed by its id: two rows with one id would draw the same
    noise, which is never what a caller sampling independent positions wants."""
    if row_ids is None:
        return torch.arange(num_rows, dtype=torch.int64, device=device)
    row_ids = _integer_tensor("row_ids", row_ids, "an integer tensor [R] (int64)")
    if row_ids.dtype == torch.uint64:
        raise TypeError("row_ids must be an integer tensor [R] (int64); got dtype torch.uint64")
    if tuple(row_ids.shape) != (num_rows,):
        raise ValueError(f"row_ids must have shape [R] = [{num_rows}]; got shape {tuple(row_ids.shape)}")
    row_ids = row_ids.to(device=device, dtype=torch.int64)
    if num_rows > 0:
        smallest, largest = (int(v) for v in torch.aminmax(row_ids))
        if smallest < 0:
            raise ValueError(f"row_ids must be >= 0; got a minimum of {smallest}")
        limit = (_ELEMENT_LIMIT - vocab) // vocab  # largest row id with row_id * V + V - 1 < 2^63
        if largest > limit:
            raise ValueError(
                f"row_ids must be <= {limit} for V = {vocab} (element ids row_id * V + v must stay "
                f"below 2^63); got a maximum of {largest}"
            )
        if num_rows > 1 and bool((row_ids[1:] > row_ids[:-1]).all()):
            return row_ids  # increasing, hence distinct: the usual case, without a sort
        distinct = torch.unique(row_ids)
        if distinct.numel() != num_rows:
            counts = torch.bincount(torch.searchsorted(distinct, row_ids))
            repeated = int(distinct[counts > 1][0])
            raise ValueError(f"row_ids must be distinct (a row's noise is keyed by its id); {repeated} "
                             f"appears {int(counts.max())} times")
    return row_ids


def _check_index_tensor(name: str, value, device: torch.device, length: int | None = None) -> None:
    """Metadata-only check of an int64 [length] tensor on ``device`` (the deferred entry points)."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or value.device != device:
        raise TypeError(f"{name} must be an int64 tensor on {device}; got "
                        f"{getattr(value, 'dtype', type(value).__name__)} on {getattr(value, 'device', '-')}")
    if value.dim() != 1 or (length is not None and value.shape[0] != length):
        expected = "[R]" if length is None else f"[R] = [{length}]"
        raise ValueError(f"{name} must have shape {expected}; got shape {tuple(value.shape)}")


def _checked_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(
            f"temperature must be a float >= 0; got {temperature!r} ({type(temperature).__name__})"
        )
    temperature = float(temperature)
    if not (0.0 <= temperature < float("inf")):
        raise ValueError(f"temperature must be a finite float >= 0; got {temperature}")
    return temperature


def _checked_exclude(exclude, vocab: int, device: torch.device) -> torch.Tensor | None:
    """Returns the sorted distinct excluded ids (int64 on device), or None when there are none."""
    if exclude is None:
        return None
    if isinstance(exclude, torch.Tensor):
        if exclude.dtype == torch.bool or exclude.dtype.is_floating_point or exclude.dtype.is_complex:
            raise TypeError(f"exclude must hold integer token ids; got a tensor of dtype {exclude.dtype}")
        ids = exclude.detach().reshape(-1).to("cpu", torch.int64)
    elif isinstance(exclude, numbers.Integral) and not isinstance(exclude, bool):
        ids = torch.tensor([int(exclude)], dtype=torch.int64)
    elif isinstance(exclude, (Sequence, np.ndarray)) and not isinstance(exclude, (str, bytes)):
        values = list(exclude)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(
                    f"exclude must hold integer token ids; got {value!r} ({type(value).__name__})"
                )
        ids = torch.tensor([int(v) for v in values], dtype=torch.int64).reshape(-1)
    else:
        raise TypeError(
            "exclude must be None, an int, a sequence of ints or an integer tensor; "
            f"got {type(exclude).__name__}"
        )
    if ids.numel() == 0:
        return None
    smallest, largest = int(ids.min()), int(ids.max())
    if smallest < 0 or largest >= vocab:
        bad = smallest if smallest < 0 else largest
        raise ValueError(f"exclude must hold token ids in [0, V) = [0, {vocab}); got {bad}")
    ids = torch.unique(ids)  # sorted, distinct
    if ids.numel() == vocab:
        raise ValueError(f"exclude removes all V = {vocab} tokens; at least one token must remain")
    return ids.to(device)


def _checked_chunk_rows(chunk_rows, vocab: int) -> int:
    if chunk_rows is None:
        return max(1, CHUNK_BYTES // (8 * vocab))
    return _integer("chunk_rows", chunk_rows, 1, None, "an int >= 1 or None")


def _check_winners(best: torch.Tensor, positions: torch.Tensor | None = None) -> None:
    """Raises ValueError for rows whose winning score is NaN (NaN logits) or -inf (no candidate).

    best: float64 [n] winning scores; positions: the caller's row number of each (default arange(n)).
    """
    if best.numel() == 0:
        return
    nan = torch.isnan(best)
    bad = nan | (best == -torch.inf)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        row = first if positions is None else int(positions[first])
        count = int(bad.sum())
        if bool(nan[first]):
            raise ValueError(f"logits must not hold NaN; row {row} does ({count} bad row(s) in all)")
        raise ValueError(
            f"every row of logits needs a token with a logit > -inf outside exclude; row {row} has none "
            f"({count} bad row(s) in all)"
        )
