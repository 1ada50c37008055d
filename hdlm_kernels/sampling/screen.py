"""Screen, then decide: how many tokens of each row the exact samplers score in FP64 (docs/sampling-screen.md).

The fused samplers compute a cheap float32 score interval for every token and the exact FP64 score only for
the tokens whose interval reaches the row's best lower bound (the candidates); the tokens are those of the
full FP64 walk, bit for bit. ``gumbel_candidates`` reports the number of candidates per row, for benchmarks
and tests, and ``hybrid_candidates`` the same for the γ step's race (the current cell plus the screen's
candidates); ``SCREEN_RELATIVE`` and ``SCREEN_ABSOLUTE`` are the constants of the bound
``|cheap - exact| <= SCREEN_RELATIVE·|a| + SCREEN_ABSOLUTE`` (a = float32 logit times float32(1/T)).

The counts are a property of each backend's screen (their float32 bits may differ near the bound), so they
are ops of the registry (``hdlm_kernels.backends``) of their own, ``gumbel_candidates`` and
``hybrid_candidates``, with the implementation names of ``gumbel_argmax`` and ``hybrid_step``: "cpp" (CPU
tensors), "cuda" and "triton" (GPU tensors; Triton also runs CPU tensors under its interpreter), and the
reference, which scores every token exactly (V per row). ``backend="auto"`` picks what the sampler's own
``"auto"`` picks for the tensors' device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _extension, backends
from .._triton_device import triton_probe
from ..checks import seed_and_step
from . import hybrid
from .arguments import (
    check_row_id_values,
    checked_exclude,
    checked_logits,
    checked_row_ids,
    checked_temperature,
    exclude_values,
)
from .constants import SCREEN_ABSOLUTE, SCREEN_NOISE_ERROR, SCREEN_RELATIVE

__all__ = ["SCREEN_ABSOLUTE", "SCREEN_NOISE_ERROR", "SCREEN_RELATIVE", "gumbel_candidates", "hybrid_candidates"]


def gumbel_candidates(logits: torch.Tensor, seed: int, step: int, row_ids: torch.Tensor | None = None,
                      temperature: float = 1.0, exclude=None, backend: str = "auto") -> torch.Tensor:
    """The number of tokens per row whose exact FP64 score ``gumbel_argmax`` computes with ``backend``, for
    the arguments of ``gumbel_argmax``: the screen's candidates, or V for a row on the exact path (float64
    logits, temperature 0, or 1/T outside [2^-100, 2^100]). int64 [R], on logits' device.

    ``backend`` is a name of ``hdlm_kernels.backends.names("gumbel_candidates")``: "auto" (C++ on CPU
    tensors, CUDA, else Triton, on GPU tensors, the reference otherwise), "kernels", "cpp", "cuda", "triton"
    or "reference" (V on every row: it scores every token). A named backend that cannot run raises
    RuntimeError."""
    logits = checked_logits(logits)
    num_rows, vocab = logits.shape
    seed, step = seed_and_step(seed, step)
    backends.check_name("gumbel_candidates", backend, "gumbel_candidates")
    row_ids = checked_row_ids(row_ids, num_rows, logits.device)
    check_row_id_values(row_ids, vocab)
    temperature = checked_temperature(temperature)
    exclude = exclude_values(checked_exclude(exclude, logits.device), vocab)
    implementation = backends.select("gumbel_candidates", backend, logits.device, "gumbel_candidates")
    return implementation(logits, None, row_ids, seed, step, temperature, exclude)


def hybrid_candidates(x: torch.Tensor, log_score: torch.Tensor, sigma_now, sigma_next, gamma: float, mask_id: int,
                      seed: int, step: int, row_ids: torch.Tensor | None = None, method: str = "analytic",
                      final=False, backend: str = "auto") -> torch.Tensor:
    """The number of tokens per row whose exact FP64 score ``hybrid_step`` computes with ``backend``, for
    the arguments of ``hybrid_step``: the current cell plus the screen's candidates (docs/sampling-screen.md,
    "The γ step"), or V for a row on the full exact race (float64 log-scores, a row with a NaN or +inf read
    entry, constants outside the screen's range). int64 [R], on log_score's device. The exact row sum S is
    computed for every row.

    ``backend`` as ``gumbel_candidates``' (the names of ``hdlm_kernels.backends.names("hybrid_candidates")``)."""
    x, log_score, now, nxt, gamma, mask_id, method, final = hybrid._checked_inputs(
        "hybrid_candidates", x, log_score, sigma_now, sigma_next, gamma, mask_id, method, final)
    seed, step = seed_and_step(seed, step)
    backends.check_name("hybrid_candidates", backend, "hybrid_candidates")
    num_rows, vocab = log_score.shape
    row_ids = checked_row_ids(row_ids, num_rows, log_score.device)
    check_row_id_values(row_ids, vocab)
    hybrid._check_values("hybrid_candidates", x, vocab, now, nxt)
    final = final | (nxt == 0)
    coefficients = hybrid.step_coefficients(x, now, nxt, gamma, mask_id, vocab, method, final)
    implementation = backends.select("hybrid_candidates", backend, log_score.device, "hybrid_candidates")
    return implementation(log_score, x, coefficients, row_ids, mask_id, seed, step)


# ---------------------------------------------------------------- the implementations

def _gumbel_candidates_reference(logits, take, row_ids, seed, step, temperature, exclude) -> torch.Tensor:
    """The reference backend scores every token of every row exactly: V per row."""
    return torch.full((row_ids.shape[0],), logits.shape[1], dtype=torch.int64, device=logits.device)


def _hybrid_candidates_reference(log_score, x, coefficients, row_ids, mask_id, seed, step) -> torch.Tensor:
    """The reference backend scores every token of every row exactly: V per row."""
    return torch.full((log_score.shape[0],), log_score.shape[1], dtype=torch.int64, device=log_score.device)


def _counted(operator_name: str) -> Callable[[], Callable]:
    """The loader of a counted ``_C`` operator (``*_counted_cpu`` / ``*_counted_cuda``): the draw's arguments
    plus ``count=True``, of whose (tokens, scores, counts) it returns the counts."""
    load_operator = _extension.operator_loader(operator_name)

    def load() -> Callable:
        operator = load_operator()
        return lambda *arguments: operator(*arguments, True)[2]

    return load


def _gumbel_candidates_triton() -> Callable:
    from . import triton_gumbel  # imports triton and builds the kernels (for the interpreter or the GPU)

    return triton_gumbel.gumbel_candidates_triton


def _hybrid_candidates_triton() -> Callable:
    from . import triton_hybrid  # imports triton and builds the kernels (for the interpreter or the GPU)

    return triton_hybrid.hybrid_candidates_triton


# In the order of preference of gumbel_argmax and hybrid_step, so that "auto" counts the kernel the sampler's
# "auto" runs.
backends.register("gumbel_candidates", "reference", summary="every token scored exactly: V per row, any device",
                  load=lambda: _gumbel_candidates_reference)
backends.register("gumbel_candidates", "cpp", summary="C++ (csrc/gumbel_cpu.cpp): the screen's candidates",
                  fused=True, auto_devices=("cpu",),
                  probe=_extension.operator_probe("gumbel_argmax_counted_cpu", "cpu"),
                  load=_counted("gumbel_argmax_counted_cpu"))
backends.register("gumbel_candidates", "cuda", summary="CUDA (csrc/gumbel_cuda.cu): the screen's candidates",
                  fused=True, auto_devices=("cuda",),
                  probe=_extension.operator_probe("gumbel_argmax_counted_cuda", "cuda"),
                  load=_counted("gumbel_argmax_counted_cuda"))
backends.register("gumbel_candidates", "triton", summary="Triton (hdlm_kernels/sampling/triton_gumbel.py): the "
                  "screen's candidates", fused=True, auto_devices=("cuda",),
                  probe=triton_probe("hdlm_kernels.sampling.triton_gumbel"), load=_gumbel_candidates_triton)
backends.register("hybrid_candidates", "reference", summary="every token scored exactly: V per row, any device",
                  load=lambda: _hybrid_candidates_reference)
backends.register("hybrid_candidates", "cpp", summary="C++ (csrc/hybrid_cpu.cpp): the current cell and the "
                  "screen's candidates", fused=True, auto_devices=("cpu",),
                  probe=_extension.operator_probe("hybrid_step_counted_cpu", "cpu"),
                  load=_counted("hybrid_step_counted_cpu"))
backends.register("hybrid_candidates", "cuda", summary="CUDA (csrc/hybrid_cuda.cu): the current cell and the "
                  "screen's candidates", fused=True, auto_devices=("cuda",),
                  probe=_extension.operator_probe("hybrid_step_counted_cuda", "cuda"),
                  load=_counted("hybrid_step_counted_cuda"))
backends.register("hybrid_candidates", "triton", summary="Triton (hdlm_kernels/sampling/triton_hybrid.py): the "
                  "current cell and the screen's candidates", fused=True, auto_devices=("cuda",),
                  probe=triton_probe("hdlm_kernels.sampling.triton_hybrid"), load=_hybrid_candidates_triton)
