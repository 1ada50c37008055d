"""Rows built against the γ step's screen (docs/sampling-screen.md, "The γ step"), shared by the tests of
every screened backend (tests/test_hybrid_step_screen_cpu.py, tests/test_hybrid_step_screen_triton.py):
near-ties engineered from the exact noise at the width of the bound, ratios that cancel against c2·S,
every weight but a few zero, log-scores ±1e4 and -inf, and the steps (Δ small, tiny, huge, final rows)
they are drawn at. ``vocab`` defaults to the paper's V = 50258; the interpreter's tests take smaller rows."""

from __future__ import annotations

import math

import torch

import hdlm_kernels as hk
from hdlm_kernels.sampling.log64 import gumbel_noise

VOCAB = 50258
SEED, STEP = 2024, 9
ROW_IDS = torch.tensor([0, 5, 10**9 + 1, 2**33 + 7, 11, 3])
NUM_ROWS = len(ROW_IDS)

STEPS = {  # (sigma_now, sigma_next) per row: Δ = 0.05, tiny, huge, final (sigma_next = 0)
    "small": ([2.0] * NUM_ROWS, [1.95] * NUM_ROWS),
    "mixed": ([2.0, 2.0, 60.0, 1.0, 3.0, 2.0], [2.0 - 1e-9, 2.0 - 1e-40, 10.0, 0.0, 0.0, 1.5]),
    "huge": ([60.0] * NUM_ROWS, [0.5] * NUM_ROWS),
}


def exact_noise(row_id: int, columns: torch.Tensor, vocab: int = VOCAB) -> torch.Tensor:
    """The FP64 Gumbel noise of the race at (row_id, columns) (stream 0, element row_id · V + y)."""
    u = hk.sampling.uniform53(SEED, STEP, 0, row_id * vocab + columns, backend="reference")
    return gumbel_noise(u)


def near_ties(log_score: torch.Tensor, row: int, level: float, spacing: float, count: int = 96) -> None:
    """Gives `count` read tokens of `row` the log-score level - g_y + k·spacing, k in -3..3, so that their
    scores log w_y + g_y (≈ ln c1 + s_y - m when the ratios dominate c2·S) tie within a few `spacing`s."""
    vocab = log_score.shape[1]
    g = torch.Generator().manual_seed(row)
    columns = torch.randperm(vocab - 2, generator=g)[:count] + 1
    offsets = torch.randint(-3, 4, (count,), generator=g).double() * spacing
    log_score[row, columns] = level - exact_noise(int(ROW_IDS[row]), columns, vocab) + offsets


def cancelling(log_score: torch.Tensor, row: int) -> None:
    """Row of equal log-scores up to 1e-6 noise: with B = e^{-γΔ} near 0 on a MASK row (huge Δ), every ratio
    r' is within about 1e-6 of c2·S = (1 - B)·mean ratio, so about half the weights are c1·(r' - c2·S) of
    order 1e-6 and the rest exactly 0 (with smaller Δ, r' - c2·S ≈ B·r' instead)."""
    g = torch.Generator().manual_seed(100 + row)
    log_score[row] = 1.0 + 1e-6 * torch.randn(log_score.shape[1], generator=g, dtype=torch.float64)


def rows(kind: str, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-scores [6, vocab] float64 (the dtype under test is cast later) and current tokens x; the MASK
    id is vocab - 1."""
    mask_id = vocab - 1
    g = torch.Generator().manual_seed(7)
    s = torch.randn(NUM_ROWS, vocab, generator=g, dtype=torch.float64) * 3 - 10
    x = torch.tensor([mask_id, 5, mask_id, 17, mask_id, min(40000, vocab - 3)])
    if kind == "ties":
        near_ties(s, 0, 4.0, 2.0 ** -12)
        near_ties(s, 1, 6.0, 2.0 ** -13)
        near_ties(s, 2, 30.0, 2.0 ** -11)  # huge ratios: x far below
        near_ties(s, 3, 2.0, 1e-4)
        near_ties(s, 4, -5.0, 3e-4)
        near_ties(s, 5, 0.0, 2.0 ** -14)
    elif kind == "cancel":
        for row in range(NUM_ROWS):
            cancelling(s, row)
        x = torch.full((NUM_ROWS,), mask_id)
    elif kind == "extreme":
        s[0] *= 3000  # ±1e4
        s[1] = -1e4  # every ratio 0 but one
        s[1, 123] = 0.5
        s[2, : vocab // 2] = -math.inf
        s[3] = -math.inf  # nothing read has weight: the current cell, or -inf at column 0
        s[4] = 0.0  # every ratio 1: the noise decides among equal weights
        s[5] = s[5] + 40  # far above the current token
    return s, x
