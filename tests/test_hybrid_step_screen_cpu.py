"""The screened race of hybrid_step's C++ backend (docs/sampling-screen.md, "The γ step") returns the
reference's tokens and winning scores bit for bit on rows built against the screen: near-ties engineered
from the exact noise at the width of the bound, ratios that cancel against c2·S, every weight but a few
zero, log-scores ±1e4 and -inf, Δ tiny and huge, γ in {0, 0.05, 0.5, 1}, both methods, final rows,
V = 50258, strided rows, float32 / bfloat16 / float16, with both instruction sets of the CPU stages.
``hybrid_candidates`` reports how many tokens per row were scored exactly."""

import math

import pytest
import torch

import hdlm_kernels as hk
from hdlm_kernels import _extension
from hdlm_kernels.sampling.hybrid import _hybrid_step_reference, step_coefficients
from hdlm_kernels.sampling.log64 import gumbel_noise
from tests.sampling_checks import assert_same_draw, cpu_isas

pytestmark = pytest.mark.skipif(bool(_extension.missing_reason), reason="needs the compiled extension")

VOCAB = 50258
MASK_ID = VOCAB - 1
SEED, STEP = 2024, 9
ROW_IDS = torch.tensor([0, 5, 10**9 + 1, 2**33 + 7, 11, 3])
NUM_ROWS = len(ROW_IDS)


def exact_noise(row_id: int, columns: torch.Tensor) -> torch.Tensor:
    """The FP64 Gumbel noise of the race at (row_id, columns) (stream 0, element row_id · V + y)."""
    u = hk.sampling.uniform53(SEED, STEP, 0, row_id * VOCAB + columns, backend="reference")
    return gumbel_noise(u)


def near_ties(log_score: torch.Tensor, row: int, level: float, spacing: float, count: int = 96) -> None:
    """Gives `count` read tokens of `row` the log-score level - g_y + k·spacing, k in -3..3, so that their
    scores log w_y + g_y (≈ ln c1 + s_y - m when the ratios dominate c2·S) tie within a few `spacing`s."""
    g = torch.Generator().manual_seed(row)
    columns = torch.randperm(VOCAB - 2, generator=g)[:count] + 1
    offsets = torch.randint(-3, 4, (count,), generator=g).double() * spacing
    log_score[row, columns] = level - exact_noise(int(ROW_IDS[row]), columns) + offsets


def cancelling(log_score: torch.Tensor, row: int) -> None:
    """Row of equal log-scores up to 1e-6 noise: with B = e^{-γΔ} near 0 on a MASK row (huge Δ), every ratio
    r' is within about 1e-6 of c2·S = (1 - B)·mean ratio, so about half the weights are c1·(r' - c2·S) of
    order 1e-6 and the rest exactly 0 (with smaller Δ, r' - c2·S ≈ B·r' instead)."""
    g = torch.Generator().manual_seed(100 + row)
    log_score[row] = 1.0 + 1e-6 * torch.randn(VOCAB, generator=g, dtype=torch.float64)


def rows(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-scores [6, V] float64 (the dtype under test is cast later) and current tokens x."""
    g = torch.Generator().manual_seed(7)
    s = torch.randn(NUM_ROWS, VOCAB, generator=g, dtype=torch.float64) * 3 - 10
    x = torch.tensor([MASK_ID, 5, MASK_ID, 17, MASK_ID, 40000])
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
        x = torch.full((NUM_ROWS,), MASK_ID)
    elif kind == "extreme":
        s[0] *= 3000  # ±1e4
        s[1] = -1e4  # every ratio 0 but one
        s[1, 123] = 0.5
        s[2, : VOCAB // 2] = -math.inf
        s[3] = -math.inf  # nothing read has weight: the current cell, or -inf at column 0
        s[4] = 0.0  # every ratio 1: the noise decides among equal weights
        s[5] = s[5] + 40  # far above the current token
    return s, x


def draw(log_score, x, coefficients, isa):
    C = _extension._C
    C.set_cpu_isa(isa)
    try:
        return C.hybrid_step_cpu(log_score, x, coefficients, ROW_IDS, MASK_ID, SEED, STEP)
    finally:
        C.set_cpu_isa("auto")


def check_all_isas(log_score, x, coefficients):
    expected = _hybrid_step_reference(log_score, x, coefficients, ROW_IDS, MASK_ID, SEED, STEP, 2)
    for isa in cpu_isas():
        assert_same_draw(draw(log_score, x, coefficients, isa), expected)


STEPS = {  # (sigma_now, sigma_next) per row: Δ = 0.05, tiny, huge, final (sigma_next = 0)
    "small": ([2.0] * NUM_ROWS, [1.95] * NUM_ROWS),
    "mixed": ([2.0, 2.0, 60.0, 1.0, 3.0, 2.0], [2.0 - 1e-9, 2.0 - 1e-40, 10.0, 0.0, 0.0, 1.5]),
    "huge": ([60.0] * NUM_ROWS, [0.5] * NUM_ROWS),
}


@pytest.mark.parametrize("kind", ["ties", "cancel", "extreme"])
@pytest.mark.parametrize("method, gamma", [("analytic", 0.0), ("analytic", 0.05), ("analytic", 0.5),
                                           ("analytic", 1.0), ("euler", 0.05), ("euler", 1.0)])
@pytest.mark.parametrize("steps", ["small", "mixed", "huge"])
def test_screened_race_matches_the_reference(kind, method, gamma, steps):
    s, x = rows(kind)
    now, nxt = (torch.tensor(v, dtype=torch.float64) for v in STEPS[steps])
    final = (nxt == 0) | torch.tensor([False, False, False, False, True, False])
    coefficients = step_coefficients(x, now, nxt, gamma, MASK_ID, VOCAB, method, final)
    check_all_isas(s.float(), x, coefficients)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rows(dtype):
    s, x = rows("ties")
    now, nxt = (torch.tensor(v, dtype=torch.float64) for v in STEPS["mixed"])
    coefficients = step_coefficients(x, now, nxt, 0.05, MASK_ID, VOCAB, "analytic", nxt == 0)
    check_all_isas(s.clamp(min=-6e4).to(dtype), x, coefficients)


def test_strided_rows():
    s, x = rows("ties")
    strided = s.float().t().contiguous().t()  # column stride R
    assert strided.stride(1) == NUM_ROWS
    now, nxt = (torch.tensor(v, dtype=torch.float64) for v in STEPS["small"])
    coefficients = step_coefficients(x, now, nxt, 0.5, MASK_ID, VOCAB, "analytic", nxt == 0)
    check_all_isas(strided, x, coefficients)


def test_hybrid_candidates_counts_the_exact_scores():
    g = torch.Generator().manual_seed(3)
    log_score = torch.randn(16, VOCAB, generator=g) * 3 - 10
    x = torch.randint(0, MASK_ID, (16,), generator=g)
    x[::2] = MASK_ID
    counts = hk.sampling.hybrid_candidates(x, log_score, 2.0, 1.95, 0.01, MASK_ID, SEED, STEP)
    assert counts.dtype == torch.int64 and counts.shape == (16,)
    assert int(counts.min()) >= 1 and int(counts.max()) <= 8  # the current cell plus a handful
    # float64 log-scores are not screened: every token is scored exactly.
    full = hk.sampling.hybrid_candidates(x[:2], log_score[:2].double(), 2.0, 1.95, 0.01, MASK_ID, SEED, STEP)
    assert full.tolist() == [VOCAB, VOCAB]


def test_hybrid_candidates_checks_its_arguments():
    log_score = torch.zeros(2, 8)
    x = torch.tensor([1, 7])
    with pytest.raises(ValueError, match="x must hold token ids"):
        hk.sampling.hybrid_candidates(torch.tensor([1, 8]), log_score, 2.0, 1.0, 0.5, 7, 0, 0)
    with pytest.raises(ValueError, match="gamma"):
        hk.sampling.hybrid_candidates(x, log_score, 2.0, 1.0, 1.5, 7, 0, 0)
