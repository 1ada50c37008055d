"""Screen, then decide: how many tokens of each row the exact samplers score in FP64 (docs/sampling-screen.md).

The fused CPU sampler computes a cheap float32 score interval for every token and the exact FP64 score only
for the tokens whose interval reaches the row's best lower bound (the candidates); the tokens are those of
the full FP64 walk, bit for bit. ``gumbel_candidates`` reports the number of candidates per row, for
benchmarks and tests, and ``hybrid_candidates`` the same for the γ step's race (the current cell plus
the screen's candidates); ``SCREEN_RELATIVE`` and ``SCREEN_ABSOLUTE`` are the constants of the bound
``|cheap - exact| <= SCREEN_RELATIVE·|a| + SCREEN_ABSOLUTE`` (a = float32 logit times float32(1/T)).
"""

from __future__ import annotations

import torch

from .. import _extension
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
                      temperature: float = 1.0, exclude=None) -> torch.Tensor:
    """The number of tokens per row whose exact FP64 score the C++ ``gumbel_argmax`` computes, for CPU
    logits and the arguments of ``gumbel_argmax``: the screen's candidates, or V for a row on the exact
    path (float64 logits, temperature 0, or 1/T outside [2^-100, 2^100]). int64 [R].

    Raises RuntimeError when the compiled extension is not built."""
    logits = checked_logits(logits)
    if logits.device.type != "cpu":
        raise ValueError(f"gumbel_candidates: logits must be on the CPU (the C++ backend), got {logits.device}")
    num_rows, vocab = logits.shape
    seed, step = seed_and_step(seed, step)
    row_ids = checked_row_ids(row_ids, num_rows, logits.device)
    check_row_id_values(row_ids, vocab)
    temperature = checked_temperature(temperature)
    exclude = exclude_values(checked_exclude(exclude, logits.device), vocab)
    missing = _extension.operator_probe("gumbel_argmax_counted_cpu", "cpu")("cpu")
    if missing:
        raise RuntimeError(f"gumbel_candidates needs the compiled extension: {missing}")
    operator = _extension.operator_loader("gumbel_argmax_counted_cpu")()
    _, _, counts = operator(logits, None, row_ids, seed, step, temperature, exclude, True)
    return counts


def hybrid_candidates(x: torch.Tensor, log_score: torch.Tensor, sigma_now, sigma_next, gamma: float, mask_id: int,
                      seed: int, step: int, row_ids: torch.Tensor | None = None, method: str = "analytic",
                      final=False) -> torch.Tensor:
    """The number of tokens per row whose exact FP64 score the C++ ``hybrid_step`` computes, for CPU
    log-scores and the arguments of ``hybrid_step``: the current cell plus the screen's candidates
    (docs/sampling-screen.md, "The γ step"), or V for a row on the full exact race (float64 log-scores, a
    row with a NaN or +inf read entry, constants outside the screen's range). int64 [R]. The exact row sum
    S is computed for every row.

    Raises RuntimeError when the compiled extension is not built."""
    x, log_score, now, nxt, gamma, mask_id, method, final = hybrid._checked_inputs(
        "hybrid_candidates", x, log_score, sigma_now, sigma_next, gamma, mask_id, method, final)
    if log_score.device.type != "cpu":
        raise ValueError(f"hybrid_candidates: log_score must be on the CPU (the C++ backend), got {log_score.device}")
    seed, step = seed_and_step(seed, step)
    num_rows, vocab = log_score.shape
    row_ids = checked_row_ids(row_ids, num_rows, log_score.device)
    check_row_id_values(row_ids, vocab)
    hybrid._check_values("hybrid_candidates", x, vocab, now, nxt)
    final = final | (nxt == 0)
    coefficients = hybrid.step_coefficients(x, now, nxt, gamma, mask_id, vocab, method, final)
    missing = _extension.operator_probe("hybrid_step_counted_cpu", "cpu")("cpu")
    if missing:
        raise RuntimeError(f"hybrid_candidates needs the compiled extension: {missing}")
    operator = _extension.operator_loader("hybrid_step_counted_cpu")()
    _, _, counts = operator(log_score, x, coefficients, row_ids, mask_id, seed, step, True)
    return counts
