"""The screened race of hybrid_step's C++ backend (docs/sampling-screen.md, "The γ step") returns the
reference's tokens and winning scores bit for bit on rows built against the screen: near-ties engineered
from the exact noise at the width of the bound, ratios that cancel against c2·S, every weight but a few
zero, log-scores ±1e4 and -inf, Δ tiny and huge, γ in {0, 0.05, 0.5, 1}, both methods, final rows,
V = 50258, strided rows, float32 / bfloat16 / float16, with both instruction sets of the CPU stages.
``hybrid_candidates`` reports how many tokens per row were scored exactly."""

import pytest
import torch

import hdlm_kernels as hk
from hdlm_kernels import _extension
from hdlm_kernels.sampling.hybrid import _hybrid_step_reference, step_coefficients
from tests.hybrid_screen_rows import NUM_ROWS, ROW_IDS, SEED, STEP, STEPS, VOCAB, rows
from tests.sampling_checks import assert_same_draw, cpu_isas

pytestmark = pytest.mark.skipif(bool(_extension.missing_reason), reason="needs the compiled extension")

MASK_ID = VOCAB - 1


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
