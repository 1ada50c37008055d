"""The screened race of hybrid_step's Triton kernel (docs/sampling-screen.md, "The γ step" and "GPU kernels")
returns the reference's tokens and winning scores bit for bit on the rows built against the screen
(tests/hybrid_screen_rows.py: near-ties engineered from the exact noise at the width of the bound, ratios
cancelling against c2·S, all weights but a few zero, ±1e4, -inf, Δ tiny and huge, final rows), for
γ in {0, 0.05, 0.5, 1} and both methods, in float32, bfloat16 and float16, on strided rows, across
several tiles, on one row of V = 50258, and on the rows the screen does not apply to (a NaN or +inf read
entry, c1 or c2·S out of range: the kernel's exact race). Run in the Triton interpreter here (the
interpreter costs about a second per row, so each launch draws 6 rows of V = 1001 with the step sets
spread over the rows); the GPU run of the same rows is marked ``cuda``. The kernel's sm_90 code keeps
the exact decision free of fused multiply-adds."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hdlm_kernels.sampling.hybrid import _hybrid_step_reference, step_coefficients
from tests.hybrid_screen_rows import NUM_ROWS, ROW_IDS, SEED, STEP, STEPS, VOCAB, rows
from tests.sampling_checks import assert_exact_float64_path, assert_same_draw, compiled_ptx_ops, ptx_ops_script

triton = pytest.importorskip("triton")

REPO = Path(__file__).resolve().parent.parent
SMALL_VOCAB = 1001
METHOD_GAMMAS = [("analytic", 0.0), ("analytic", 0.05), ("analytic", 0.5), ("analytic", 1.0), ("euler", 0.05),
                 ("euler", 1.0)]
STEP_NAMES = list(STEPS)


def triton_hybrid():
    from hdlm_kernels.sampling import triton_hybrid as module

    return module


def coefficients_for(x, vocab, method, gamma, turn=0):
    """step_coefficients of the 6 rows with row r at the step set STEP_NAMES[(r + turn) % 3] (its row of that
    set), so that one launch meets Δ small, tiny, huge and final rows."""
    now = torch.tensor([STEPS[STEP_NAMES[(r + turn) % 3]][0][r] for r in range(NUM_ROWS)], dtype=torch.float64)
    nxt = torch.tensor([STEPS[STEP_NAMES[(r + turn) % 3]][1][r] for r in range(NUM_ROWS)], dtype=torch.float64)
    final = (nxt == 0) | torch.tensor([False, False, False, False, True, False])
    return step_coefficients(x, now, nxt, gamma, vocab - 1, vocab, method, final)


def check(log_score, x, coefficients, row_ids=ROW_IDS):
    """The Triton draw equals the reference's bit for bit; returns the exact scores per row."""
    mask_id = log_score.shape[1] - 1
    expected = _hybrid_step_reference(log_score, x, coefficients, row_ids, mask_id, SEED, STEP, 2)
    tokens, best, counts = triton_hybrid()._draw(log_score, x, coefficients, row_ids, mask_id, SEED, STEP)
    assert_same_draw((tokens, best), expected)
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ties", "cancel", "extreme"])
@pytest.mark.parametrize("method, gamma", METHOD_GAMMAS)
def test_screened_race_matches_the_reference(kind, method, gamma):
    s, x = rows(kind, SMALL_VOCAB)
    turn = METHOD_GAMMAS.index((method, gamma))
    counts = check(s.float(), x, coefficients_for(x, SMALL_VOCAB, method, gamma, turn))
    # Screened rows: the current cell plus the candidates (a handful, or the near-ties' 96 and the cancelling
    # rows' equal scores), never the full race.
    assert int(counts.min()) >= 1 and int(counts.max()) < SMALL_VOCAB, counts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rows(dtype):
    s, x = rows("ties", SMALL_VOCAB)
    check(s.clamp(min=-6e4).to(dtype), x, coefficients_for(x, SMALL_VOCAB, "analytic", 0.05, 1))


def test_strided_rows():
    s, x = rows("ties", SMALL_VOCAB)
    strided = s.float().t().contiguous().t()  # column stride R
    assert strided.stride(1) == NUM_ROWS
    check(strided, x, coefficients_for(x, SMALL_VOCAB, "analytic", 0.5, 2))


def test_rows_across_tiles(monkeypatch):
    # Tiles of 64 Philox pairs: a row of 513 columns spans 5, so the decision skips the tiles without a
    # candidate and the floor gathers lanes of several tiles.
    monkeypatch.setattr(triton_hybrid(), "INTERPRETER_BLOCK_PAIRS", 64)
    s, x = rows("ties", 513)
    take = [0, 2, 5]
    coefficients = coefficients_for(x, 513, "analytic", 0.05)[take]
    counts = check(s.float()[take], x[take], coefficients, ROW_IDS[take])
    assert int(counts.max()) < 513, counts


@pytest.mark.slow
def test_one_row_of_the_full_vocabulary():
    s, x = rows("ties", VOCAB)
    coefficients = coefficients_for(x, VOCAB, "analytic", 0.05)
    counts = check(s.float()[[2]], x[[2]], coefficients[[2]], ROW_IDS[[2]])  # odd row_id · V
    assert 1 <= int(counts[0]) < VOCAB, counts


def test_rows_outside_the_screen_take_the_exact_race():
    s, x = rows("extreme", SMALL_VOCAB)
    s = s.float()
    coefficients = coefficients_for(x, SMALL_VOCAB, "analytic", 0.5)
    s[0, 7] = float("nan")  # bad rows: the reference's NaN score
    s[1, 700] = float("inf")
    coefficients[2, 0] = 2.0 ** -101  # c1 below the screen's range
    coefficients[3, 0] = 2.0 ** 101  # c1 above
    coefficients[4, 1] *= 2.0 ** -200  # c2·S below 2^-100 (and not 0)
    coefficients[5, 0] = 0.0  # c1 = 0: no read weight, only the current cell is scored
    counts = check(s, x, coefficients)
    assert counts.tolist()[:5] == [SMALL_VOCAB] * 5 and int(counts[5]) == 1, counts


def test_float64_log_scores_take_the_exact_kernel():
    s, x = rows("ties", 257)
    assert triton_hybrid().screened(s.float()) and not triton_hybrid().screened(s)
    counts = check(s[:2], x[:2], coefficients_for(x, 257, "euler", 0.5)[:2], ROW_IDS[:2])
    assert counts.tolist() == [257, 257]


def test_screened_kernel_decides_without_fma(tmp_path):
    """The screened kernel compiled for sm_90 (no GPU needed; bf16: the FP64 code does not depend on the
    dtype, which is widened on load): its exact FP64 pass (row sum,
    the current cell, the candidates, the exact race of the rows outside the screen) has no fused
    multiply-add, only IEEE round-to-nearest float64 arithmetic, truncating conversions and exact float64
    literals: besides those of the exact kernel, the screen's range 2^±100, and ±2^-150, where the compiler
    folds float_at_most's test float32(v) > 0 (resp. < 0) into v > 2^-150 (resp. v < -2^-150)."""
    module = triton_hybrid()
    pairs = module.GPU_BLOCK_PAIRS
    warps = max(1, min(module.MAX_WARPS, pairs // module.PAIRS_PER_WARP))
    signatures = [{"LOG_SCORE": "*" + dtype, "X": "*i64", "COEFFICIENTS": "*fp64", "ROW_IDS": "*i64",
                   "CONSTS": "*fp64", "TOKENS": "*i64", "BEST": "*fp64", "COUNTS": "*i64", "stride_row": "i32",
                   "stride_col": "i32", "vocab": "i32", "mask_id": "i32", "key0": "i64", "key1": "i64",
                   "step_lo": "i64", "BLOCK_P": "constexpr", "MAX_TILES": "constexpr", "PREFILTER": "constexpr"}
                  for dtype in ("bf16",)]
    constexprs = {"BLOCK_P": pairs, "MAX_TILES": module.max_tiles(VOCAB, pairs), "PREFILTER": True}
    found = compiled_ptx_ops(ptx_ops_script("triton_hybrid", "_hybrid_step_screened_kernel", signatures,
                                            constexprs, warps), tmp_path)
    assert_exact_float64_path(found, extra_literals={"0d39B0000000000000", "0d4630000000000000",  # 2^-100, 2^100
                                                     "0d3690000000000000", "0dB690000000000000"})  # ±2^-150
    assert {"add.rn.f64", "sub.rn.f64", "mul.rn.f64", "div.rn.f64"} <= set(found["f64"]), found["f64"]
    assert found["cvt_to_int"], found


@pytest.mark.slow
def test_screen_loop_has_no_fp64(tmp_path):
    """scripts/screen_sass_counts.py on the screened kernel (bf16, compiled for sm_90 with the stand-in
    driver): five loops in source order (max, sum, screen, decide, the exact race of the rows outside the
    screen), no FP64 instruction in the screen loop, the exact FP64 score in the decide and exact loops."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "screen_sass_counts.py"), "--no-cuda", "--only",
                             "triton hybrid_step screened bfloat16", "--out-dir", str(tmp_path)],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    (record,) = json.loads((tmp_path / "screen-sass-counts.json").read_text())["kernels"]
    assert [loop["role"] for loop in record["loops"]] == ["max", "sum", "screen", "decide", "exact race"], record
    roles = {loop["role"]: loop for loop in record["loops"]}
    assert roles["screen"]["fp64"] == 0 and record["screen_fp64"] == 0
    assert roles["decide"]["fp64"] > 0 and roles["exact race"]["fp64"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_screened_race_matches_the_reference(dtype):
    module = triton_hybrid()
    for kind in ("ties", "cancel", "extreme"):
        s, x = rows(kind)
        log_score = s.clamp(min=-6e4).to(dtype)
        for turn, (method, gamma) in enumerate(METHOD_GAMMAS):
            coefficients = coefficients_for(x, VOCAB, method, gamma, turn)
            expected = _hybrid_step_reference(log_score, x, coefficients, ROW_IDS, VOCAB - 1, SEED, STEP, 2)
            ours = module.hybrid_step_triton(log_score.cuda(), x.cuda(), coefficients.cuda(), ROW_IDS.cuda(),
                                             VOCAB - 1, SEED, STEP)
            assert_same_draw(ours, expected)


# ---------------------------------------------------------------- the prefilter

PREFILTER_VOCAB = 1001  # 8 tiles of 64 Philox pairs (small tiles below)


def prefilter_rows(vocab: int = PREFILTER_VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-scores [6, vocab] float64 (normal × 3 - 10) and current tokens where the γ step's prefilter
    (docs/sampling-screen.md, "The γ step") decides which tiles get the cheap noise; MASK is vocab - 1:
    0. a MASK row with a huge read log-score early: the floor is high after the first tile, later tiles skipped;
    1. a MASK row whose winner sits in the last tile, the floor already high from the first;
    2. a real row (x = 5) whose current cell outweighs every read token: its exact score is the first floor,
       and every tile is skipped from the start;
    3. a real row with a read token in the last tile far above the current cell;
    4. a MASK row with runner-ups 0.01 below an early leader in a middle tile;
    5. a MASK row with every log-score -inf but two, far apart."""
    mask_id = vocab - 1
    g = torch.Generator().manual_seed(31)
    s = torch.randn(NUM_ROWS, vocab, generator=g, dtype=torch.float64) * 3 - 10
    x = torch.tensor([mask_id, mask_id, 5, 17, mask_id, mask_id])
    s[0, 3] = 30.0
    s[1, 5] = 25.0
    s[1, vocab - 5] = 30.0
    s[2, 5] = 30.0  # the current token's own log-score is not read (its weight is the current cell's)
    s[3, vocab - 3] = 40.0
    s[4, 2] = 20.0
    s[4, vocab // 2: vocab // 2 + 8] = 19.99
    s[5] = -math.inf
    s[5, [1, vocab - 2]] = torch.tensor([0.0, 0.5], dtype=torch.float64)
    return s, x


def prefilter_coefficients(x, method, gamma, final_row=False):
    """step_coefficients of the rows at Δ = 0.05 (sigma 2 -> 1.95), so that every row has read weight (γ < 1
    on MASK rows); final_row makes row 4 the final step."""
    now = torch.full((NUM_ROWS,), 2.0, dtype=torch.float64)
    nxt = torch.full((NUM_ROWS,), 1.95, dtype=torch.float64)
    final = torch.tensor([False, False, False, False, final_row, False])
    return step_coefficients(x, now, nxt, gamma, PREFILTER_VOCAB - 1, PREFILTER_VOCAB, method, final)


def check_prefilter(log_score, x, coefficients, row_ids=ROW_IDS):
    """The prefiltered draw is the reference's (check), and the unfiltered screen gives the same draw and
    the same exact-score counts. Returns the counts."""
    counts = check(log_score, x, coefficients, row_ids)
    mask_id = log_score.shape[1] - 1
    tokens, best, counts_all = triton_hybrid()._draw(log_score, x, coefficients, row_ids, mask_id, SEED, STEP,
                                                      prefilter=False)
    assert_same_draw((tokens, best), _hybrid_step_reference(log_score, x, coefficients, row_ids, mask_id, SEED,
                                                            STEP, 2))
    assert torch.equal(counts, counts_all), (counts, counts_all)
    return counts


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(triton_hybrid(), "INTERPRETER_BLOCK_PAIRS", 64)


@pytest.mark.parametrize("method, gamma", [("analytic", 0.05), ("euler", 0.5)])
def test_prefilter_rows(method, gamma, small_tiles):
    s, x = prefilter_rows()
    counts = check_prefilter(s.float(), x, prefilter_coefficients(x, method, gamma))
    # The current cell plus a handful of candidates per row (the 8 runner-ups of row 4 among them at most).
    assert int(counts.min()) >= 1 and int(counts.max()) <= 12, counts


@pytest.mark.slow
@pytest.mark.parametrize("dtype, method, gamma, final_row", [(torch.float32, "analytic", 0.5, True),
                                                             (torch.float32, "analytic", 0.0, False),
                                                             (torch.bfloat16, "analytic", 0.95, False),
                                                             (torch.float16, "euler", 0.05, True)])
def test_prefilter_rows_across_steps_and_dtypes(dtype, method, gamma, final_row, small_tiles):
    s, x = prefilter_rows()
    check_prefilter(s.to(dtype), x, prefilter_coefficients(x, method, gamma, final_row))


@pytest.mark.slow
def test_prefilter_strided_rows_and_near_ties(small_tiles):
    s, x = prefilter_rows()
    strided = s.float().t().contiguous().t()  # column stride R
    check_prefilter(strided, x, prefilter_coefficients(x, "analytic", 0.05))
    s, x = rows("ties", PREFILTER_VOCAB)  # near-ties at the width of the bound, spread over every tile
    check_prefilter(s.float(), x, coefficients_for(x, PREFILTER_VOCAB, "analytic", 0.05, 1))
