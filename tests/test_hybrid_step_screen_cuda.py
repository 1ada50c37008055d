"""The screened race of hybrid_step's CUDA backend (docs/sampling-screen.md, "The γ step" and "GPU kernels")
returns the reference's tokens and winning scores bit for bit on the adversarial rows of the C++ screen's
tests (near-ties at the width of the bound, ratios that cancel against c2·S, ±1e4 and -inf log-scores, Δ tiny
and huge, γ in {0, 0.05, 0.5, 1}, both methods, final rows, V = 50258), in float32, bfloat16 and float16,
contiguous (one 16-byte load per chunk), strided and misaligned rows, rows the screen does not take (a NaN
entry, constants outside its range) and float64 rows (the full race). Marked ``cuda``: they run where a GPU
is available; without one the kernel is only compiled (.ci/cuda_compile_check.sh) and its screen loop's
machine code checked for FP64 instructions (scripts/screen_sass_counts.py)."""

import math

import pytest
import torch

import hdlm_kernels as hk
from hdlm_kernels.sampling.hybrid import _hybrid_step_reference, step_coefficients
from tests.sampling_checks import assert_same_draw
from tests.test_hybrid_step_screen_cpu import MASK_ID, ROW_IDS, SEED, STEP, STEPS, VOCAB, rows

pytestmark = pytest.mark.cuda


def cuda_draw(log_score, x, coefficients, row_ids=ROW_IDS):
    implementation = hk.backends.select("hybrid_step", "cuda", "cuda", "test").function()
    device_tensors = (t.cuda() for t in (log_score, x, coefficients, row_ids))
    return implementation(*device_tensors, MASK_ID, SEED, STEP, 2)


def check(log_score, x, coefficients, row_ids=ROW_IDS):
    expected = _hybrid_step_reference(log_score, x, coefficients, row_ids, MASK_ID, SEED, STEP, 2)
    assert_same_draw(cuda_draw(log_score, x, coefficients, row_ids), expected)


def coefficients_for(x, steps, gamma, method, final_rows=(4,)):
    now, nxt = (torch.tensor(v, dtype=torch.float64) for v in STEPS[steps])
    final = nxt == 0
    final[list(final_rows)] = True
    return step_coefficients(x, now, nxt, gamma, MASK_ID, VOCAB, method, final)


@pytest.mark.parametrize("kind", ["ties", "cancel", "extreme"])
@pytest.mark.parametrize("method, gamma", [("analytic", 0.0), ("analytic", 0.05), ("analytic", 0.5),
                                           ("analytic", 1.0), ("euler", 0.05), ("euler", 1.0)])
@pytest.mark.parametrize("steps", ["small", "mixed", "huge"])
def test_screened_race_matches_the_reference(kind, method, gamma, steps):
    s, x = rows(kind)
    check(s.float(), x, coefficients_for(x, steps, gamma, method))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", ["ties", "extreme"])
def test_other_dtypes(dtype, kind):
    s, x = rows(kind)
    coefficients = coefficients_for(x, "mixed", 0.05, "analytic")
    check(s.clamp(min=-6e4).to(dtype) if dtype != torch.float64 else s, x, coefficients)


@pytest.mark.parametrize("layout", ["column stride", "odd row stride", "misaligned"])
def test_rows_without_16_byte_loads(layout):
    s, x = rows("ties")
    if layout == "column stride":
        log_score = s.float().t().contiguous().t()
    elif layout == "odd row stride":
        log_score = torch.zeros(len(x), VOCAB + 1, dtype=torch.float32)[:, :VOCAB]
        log_score.copy_(s)
    else:  # contiguous, but the data starts 4 bytes past a 16-byte boundary
        log_score = torch.zeros(len(x) * VOCAB + 1, dtype=torch.float32)[1:].view(len(x), VOCAB)
        log_score.copy_(s)
    coefficients = coefficients_for(x, "small", 0.5, "analytic")
    expected = _hybrid_step_reference(log_score, x, coefficients, ROW_IDS, MASK_ID, SEED, STEP, 2)
    # Build the layout on the device itself (a .cuda() copy of a view would be contiguous).
    if layout == "column stride":
        device_scores = log_score.cuda().t().contiguous().t()
    elif layout == "odd row stride":
        device_scores = torch.zeros(len(x), VOCAB + 1, dtype=torch.float32, device="cuda")[:, :VOCAB]
        device_scores.copy_(log_score.cuda())
    else:
        flat = torch.zeros(len(x) * VOCAB + 1, dtype=torch.float32, device="cuda")
        device_scores = flat[1:].view(len(x), VOCAB)
        device_scores.copy_(log_score.cuda())
    implementation = hk.backends.select("hybrid_step", "cuda", "cuda", "test").function()
    ours = implementation(device_scores, x.cuda(), coefficients.cuda(), ROW_IDS.cuda(), MASK_ID, SEED, STEP,
                          2)
    assert_same_draw(ours, expected)


def test_rows_the_screen_does_not_take():
    """A NaN entry (a bad row: NaN score), +inf, c1 beyond 2^100 and K below 2^-100 take the full race."""
    s, x = rows("ties")
    coefficients = coefficients_for(x, "small", 0.5, "analytic")
    s[0, 77] = math.nan
    s[1, 12] = math.inf
    coefficients[2, 0] = 2.0 ** 101  # c1
    coefficients[3, 1] = 2.0 ** -120  # c2: K = c2 · S far below 2^-100
    check(s.float(), x, coefficients)


def test_many_rows_and_odd_vocabularies():
    """Rows whose Philox pairs start one column early (odd row_id · V), vocabularies that are not a multiple
    of a chunk, and a row count past one wave of blocks."""
    g = torch.Generator().manual_seed(11)
    for vocab in (1, 2, 3, 9, 1001, 4099):
        num_rows = 300
        log_score = torch.randn(num_rows, vocab, generator=g) * 4 - 2
        mask_id = vocab - 1
        x = torch.randint(0, vocab, (num_rows,), generator=g)
        x[::3] = mask_id
        now = torch.full((num_rows,), 2.0, dtype=torch.float64)
        nxt = torch.full((num_rows,), 1.9, dtype=torch.float64)
        coefficients = step_coefficients(x, now, nxt, 0.3, mask_id, vocab, "analytic", nxt == 0)
        row_ids = torch.arange(num_rows) * 7 + 1
        expected = _hybrid_step_reference(log_score, x, coefficients, row_ids, mask_id, SEED, STEP, 64)
        implementation = hk.backends.select("hybrid_step", "cuda", "cuda", "test").function()
        ours = implementation(log_score.cuda(), x.cuda(), coefficients.cuda(), row_ids.cuda(), mask_id, SEED,
                              STEP, 2)
        assert_same_draw(ours, expected)
