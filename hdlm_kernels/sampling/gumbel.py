"""Exact categorical sampling by FP64 Gumbel-max (docs/sampling-stream.md).

``gumbel_argmax`` draws one token per row of a logits matrix [R, V] (bf16, fp16, fp32 or fp64) from
softmax(logits / temperature), with the noise of stream 0 of the sampling stream (``uniform53``):

    u[r, v] = uniform53(seed, step, stream=0, element=row_ids[r] * V + v)      exact float64
    g[r, v] = -log64(-log64(u[r, v]))                                          float64
    token[r] = argmax_v  float64(logits[r, v]) / temperature + g[r, v]         ties -> lowest v

Why float64 and 53-bit uniforms: a token whose logit is Δ below the top one wins only when its noise
exceeds the top token's by about Δ. Float32 uniforms lie on a 2^-24 grid, so float32 Gumbel noise stops
at -log(-log(1 - 2^-24)) ≈ 16.6 and its largest values are coarsely quantized; tokens 10-16 nats below
the top are under-sampled and those further below are never sampled (Zheng et al. 2024, "Masked
diffusion models are secretly time-agnostic masked models and exploit inaccurate categorical sampling"). The 52-bit uniforms of uniform53, in [2^-53, 1 - 2^-53], carry the
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
The implementations (the chunked torch reference, C++ ``csrc/gumbel_cpu.cpp``, CUDA
``csrc/gumbel_cuda.cu``, Triton :mod:`.triton_gumbel`) are registered with ``hdlm_kernels.backends``
as op ``gumbel_argmax`` and run inside the custom op ``hdlm_kernels::gumbel_argmax``, which
``torch.compile`` traces through without a graph break.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _extension, backends
from .._triton_device import triton_probe
from ..checks import seed_and_step
from .arguments import (
    check_index_tensor,
    check_row_id_values,
    check_winners,
    checked_chunk_rows,
    checked_exclude,
    checked_logits,
    checked_row_ids,
    checked_temperature,
    exclude_values,
    signed64,
    unsigned64,
)
from .constants import GUMBEL_STREAM
from .log64 import gumbel_noise
from .philox import stream_uniforms, uniform53_ref

__all__ = ["draw", "fused_backend", "gumbel_argmax", "gumbel_argmax_deferred", "gumbel_argmax_ref"]


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

    Implements the Gumbel-max rule of docs/sampling-stream.md (see the module docstring): noise from stream 0 at
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
        backend: a name of ``hdlm_kernels.backends.names("gumbel_argmax")``: "auto" (the fused
            kernel for logits' device when one is available: CUDA, else Triton, on GPU tensors;
            C++ on CPU tensors; the reference otherwise), "kernels" (the fused kernel, or
            RuntimeError), "reference", "cpp", "triton" or "cuda". A named backend that cannot run
            raises RuntimeError; it never falls back to another one. Every backend returns the
            same tokens.
        chunk_rows: rows per chunk of the reference backend (its float64 temporaries are
            chunk_rows * V * 8 bytes each); default max(1, CHUNK_BYTES // (8 * V)). Does not
            change the result.

    Returns:
        LongTensor [R] of token ids in [0, V), on logits' device.
    """
    logits = checked_logits(logits)
    num_rows, vocab = logits.shape
    seed, step = seed_and_step(seed, step)
    row_ids = checked_row_ids(row_ids, num_rows, logits.device)
    temperature = checked_temperature(temperature)
    exclude = checked_exclude(exclude, logits.device)
    chunk_rows = checked_chunk_rows(chunk_rows, vocab)
    backends.check_name("gumbel_argmax", backend, "gumbel_argmax")
    tokens, _ = _gumbel_argmax_op(logits, None, row_ids, signed64(seed), step, temperature, exclude, chunk_rows,
                                  backend, True)
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
    logits = checked_logits(logits)
    seed, step = seed_and_step(seed, step)
    check_index_tensor("row_ids", row_ids, logits.device, logits.shape[0])
    if exclude is not None:
        check_index_tensor("exclude", exclude, logits.device)
    temperature = checked_temperature(temperature)
    backends.check_name("gumbel_argmax", backend, "gumbel_argmax_deferred")
    tokens, best = _gumbel_argmax_op(logits, None, row_ids, signed64(seed), step, temperature, exclude,
                                     checked_chunk_rows(None, logits.shape[1]), backend, False)
    return tokens, (torch.isnan(best) | (best == -torch.inf)).any()


def draw(logits: torch.Tensor, take: torch.Tensor | None, row_ids: torch.Tensor, seed: int, step: int,
         temperature: float, exclude: torch.Tensor | None, chunk_rows: int, backend: str,
         check: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gumbel-max draw behind ``gumbel_argmax`` and the ACS ops: the custom op
    ``hdlm_kernels::gumbel_argmax`` on arguments whose metadata is checked (``seed`` in [0, 2^64)).

    ``take`` (None or int64 [n]) picks the logits rows to sample, in output order; ``check`` makes
    the op check the values of ``row_ids`` and ``exclude`` and raise for rows without a winner.
    Returns (tokens int64 [n], winning scores float64 [n])."""
    return _gumbel_argmax_op(logits, take, row_ids, signed64(seed), step, temperature, exclude, chunk_rows,
                             backend, check)


def _gumbel_argmax_checked(logits: torch.Tensor, take: torch.Tensor | None, row_ids: torch.Tensor, seed: int,
                          step: int, temperature: float, exclude: torch.Tensor | None, chunk_rows: int,
                          backend: str, check: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of the custom op: the value checks (when ``check``), the implementation, the winners."""
    implementation = backends.select("gumbel_argmax", backend, logits.device, "gumbel_argmax")  # before any work
    vocab = logits.shape[1]
    if check:
        check_row_id_values(row_ids, vocab)
        exclude = exclude_values(exclude, vocab)
    tokens, best = implementation(logits, take, row_ids, unsigned64(seed), step, temperature, exclude, chunk_rows)
    if check:
        check_winners(best)
    return tokens, best


_gumbel_argmax_op = torch.library.custom_op(
    "hdlm_kernels::gumbel_argmax", _gumbel_argmax_checked, mutates_args=(),
    schema="(Tensor logits, Tensor? take, Tensor row_ids, int seed, int step, float temperature, Tensor? exclude, "
           "int chunk_rows, str backend, bool check) -> (Tensor, Tensor)")


@_gumbel_argmax_op.register_fake
def _(logits, take, row_ids, seed, step, temperature, exclude, chunk_rows, backend, check):
    num_rows = row_ids.shape[0]
    return (torch.empty(num_rows, dtype=torch.int64, device=logits.device),
            torch.empty(num_rows, dtype=torch.float64, device=logits.device))


def gumbel_argmax_ref(
    logits: torch.Tensor,
    seed: int,
    step: int,
    row_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    exclude=None,
) -> torch.Tensor:
    """Reference twin of ``gumbel_argmax``: the rule of docs/sampling-stream.md written out directly, for tests.

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
            noise = gumbel_noise(stream_uniforms(seed, step, GUMBEL_STREAM, elements))
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


def _gumbel_argmax_triton() -> Callable:
    from . import triton_gumbel  # imports triton and builds the kernels (for the interpreter or the GPU)

    return triton_gumbel.gumbel_argmax_triton


def compiled_without_chunk_rows(operator_name: str) -> Callable[[], Callable]:
    """The loader of a ``_C`` sampling operator, which takes the reference backend's arguments minus the
    last one, chunk_rows (the kernels keep no float64 temporaries)."""
    load_operator = _extension.operator_loader(operator_name)

    def load() -> Callable:
        operator = load_operator()
        return lambda *arguments: operator(*arguments[:-1])

    return load


def register_draw_backends(op: str) -> None:
    """Registers the Gumbel-max implementations under ``op`` (``gumbel_argmax``, and ``acs``, whose draw
    they are), in order of preference: the reference, C++ (CPU), CUDA, then Triton (GPU)."""
    backends.register(op, "reference", summary="torch float64 in chunks of rows, any device",
                      load=lambda: _gumbel_argmax_reference)
    backends.register(op, "cpp", summary="C++ (csrc/gumbel_cpu.cpp): OpenMP over rows", fused=True,
                      auto_devices=("cpu",), probe=_extension.operator_probe("gumbel_argmax_cpu", "cpu"),
                      load=compiled_without_chunk_rows("gumbel_argmax_cpu"))
    backends.register(op, "cuda", summary="CUDA (csrc/gumbel_cuda.cu): one thread block per row", fused=True,
                      auto_devices=("cuda",), probe=_extension.operator_probe("gumbel_argmax_cuda", "cuda"),
                      load=compiled_without_chunk_rows("gumbel_argmax_cuda"))
    backends.register(op, "triton", summary="Triton (hdlm_kernels/sampling/triton_gumbel.py): one program per row",
                      fused=True, auto_devices=("cuda",), probe=triton_probe("hdlm_kernels.sampling.triton_gumbel"),
                      load=_gumbel_argmax_triton)


register_draw_backends("gumbel_argmax")


def fused_backend(device: torch.device | str) -> str:
    """The name of the fused sampling kernel ``"auto"`` picks for tensors on ``device`` (``"cuda"`` or
    ``"triton"`` on a GPU, ``"cpp"`` on the CPU). Raises RuntimeError naming what is missing when
    there is none, so that ``sampler_backend="kernels"`` never silently runs the reference."""
    return backends.select("gumbel_argmax", backends.KERNELS, device, "fused_backend").name
