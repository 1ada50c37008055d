"""The Triton backend of the fused γ-hybrid step (triton_sampling.hybrid_step_triton, hybrid.py "The fused
form") bit for bit against the torch reference: tokens through ``hk.sampling.hybrid_step`` with
``backend="reference"`` and ``backend="triton"``, and the winning float64 scores of the two backend
functions on the same checked inputs (NaN for bad rows, -inf for rows without a positive weight); plus
``exp64_triton`` against ``exp64``.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), at
roughly 0.1 s per row (one program per row), so the shapes here stay small; tests marked ``cuda`` cover
paper-sized ones."""

import math
import sys

import pytest
import torch
from sampling_checks import compiled_ptx_ops

pytest.importorskip("triton")

import hdlm_kernels as hk  # noqa: E402
from hdlm_kernels.sampling import hybrid as hybrid_module  # noqa: E402
from hdlm_kernels.sampling import triton_sampling  # noqa: E402
from hdlm_kernels.sampling.hybrid import step_coefficients  # noqa: E402
from hdlm_kernels.sampling.log64 import EXP64_MIN, INV_LN2, exp64  # noqa: E402

if not torch.cuda.is_available() and not triton_sampling.interpreted():
    pytest.skip("no CUDA GPU and the Triton kernels were not built for the interpreter "
                "(set TRITON_INTERPRET=1 before importing hdlm_kernels)", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not triton_sampling.interpreted() else "cpu")
METHODS = ["analytic", "euler"]
# Each γ with one dtype, so that every dtype and both methods meet γ = 0 (absorb), small, mid and 1
# (uniform) without the full product (interpreter time).
GAMMA_DTYPES = [(0.0, torch.float32), (0.05, torch.bfloat16), (0.5, torch.float16), (1.0, torch.float64)]


def random_inputs(rows, vocab, mask_id, seed, dtype=torch.float32, minus_inf=0.0):
    """As tests/test_hybrid_step.py's: model-like scores (the clamps act), 40 % masked rows, some
    final rows and rows at σ̄_next = 0, the first three with Δ = 0; ``minus_inf`` of the entries -inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (rows,), generator=g)
    x[torch.rand(rows, generator=g) < 0.4] = mask_id
    log_score = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2 - 1
    log_score[torch.rand(rows, vocab, generator=g) < minus_inf] = -torch.inf
    now = torch.rand(rows, generator=g, dtype=torch.float64) * 7
    nxt = now * torch.rand(rows, generator=g, dtype=torch.float64)
    nxt[torch.rand(rows, generator=g) < 0.2] = 0.0
    nxt[:3] = now[:3]
    final = torch.rand(rows, generator=g) < 0.3
    final[:3] = False
    return x, log_score.to(dtype), now, nxt, final


def shuffled_row_ids(rows, vocab, seed):
    """Distinct large row ids in shuffled order, odd and even (row_id * V changes the pairing of columns
    to Philox blocks), up to the largest one with int64 element ids."""
    g = torch.Generator().manual_seed(seed)
    limit = (2**63 - vocab) // vocab
    ids = torch.randint(0, limit, (rows,), generator=g)
    ids[: min(rows, 2)] = torch.tensor([limit, limit - 1])[: min(rows, 2)]
    return ids[torch.randperm(rows, generator=g)]


def run_both(x, log_score, sigma_now, sigma_next, gamma, mask_id, seed, step, row_ids=None,
             method="analytic", final=False):
    """((tokens, best) of hybrid_step_triton, (tokens, best) of the reference backend), on the CPU, for
    the inputs hybrid_step would pass them (checked, with step_coefficients)."""
    x, log_score, now, nxt, gamma, mask_id, method, final = hybrid_module._checked_inputs(
        "hybrid_step", x, log_score, sigma_now, sigma_next, gamma, mask_id, method, final)
    num_rows, vocab = log_score.shape
    row_ids = torch.arange(num_rows) if row_ids is None else row_ids
    coefficients = step_coefficients(x, now, nxt, gamma, mask_id, vocab, method, final)
    expected = hybrid_module._hybrid_step_reference(log_score, x, coefficients, row_ids, mask_id, seed, step,
                                                    64)
    ours = triton_sampling.hybrid_step_triton(log_score.to(DEVICE), x.to(DEVICE), coefficients.to(DEVICE),
                                              row_ids.to(DEVICE), mask_id, seed, step)
    return tuple(t.cpu() for t in ours), expected


def assert_same_step(ours, expected):
    (tokens, best), (tokens_ref, best_ref) = ours, expected
    assert tokens.dtype == torch.int64 and best.dtype == torch.float64
    assert torch.equal(tokens, tokens_ref)
    nan = best_ref.isnan()
    assert torch.equal(best.isnan(), nan)
    assert torch.equal(best[~nan].view(torch.int64), best_ref[~nan].view(torch.int64))  # bit for bit


def both_tokens(*args, **kwargs):
    """hybrid_step's tokens with backend="triton" (inputs on DEVICE) and backend="reference" (CPU)."""
    def to(value, device):
        return value.to(device) if isinstance(value, torch.Tensor) else value

    ours = hk.sampling.hybrid_step(*(to(a, DEVICE) for a in args),
                                   **{k: to(v, DEVICE) for k, v in kwargs.items()}, backend="triton")
    expected = hk.sampling.hybrid_step(*args, **kwargs, backend="reference")
    assert ours.dtype == torch.int64 and ours.device.type == DEVICE.type
    return ours.cpu(), expected


@pytest.fixture
def small_blocks(monkeypatch):
    """8 Philox blocks (16 columns) per loop iteration: several iterations of every pass even for small V."""
    monkeypatch.setattr(triton_sampling, "_INTERPRETER_BLOCK_PAIRS", 8)
    monkeypatch.setattr(triton_sampling, "_HYBRID_GPU_BLOCK_PAIRS", 8)


# ---------------------------------------------------------------- exp64


def exp64_inputs():
    """Random arguments over exp64's domain, the differences to a row maximum the step feeds it, the
    -708 cut-off from both sides, the round-half-away-from-zero points of k (t = ±(n + 0.5)) with their
    neighbours, tiny and signed zero arguments, and -inf."""
    g = torch.Generator().manual_seed(0)
    spread = torch.rand(20000, generator=g, dtype=torch.float64) * 1458 - 750
    differences = -torch.rand(5000, generator=g, dtype=torch.float64) * 40
    halves = torch.arange(-1021, 1021, dtype=torch.float64) + 0.5
    halves = halves / INV_LN2
    halves = torch.cat([torch.nextafter(halves, torch.tensor(-math.inf, dtype=torch.float64)), halves,
                        torch.nextafter(halves, torch.tensor(math.inf, dtype=torch.float64))])
    below = math.nextafter(EXP64_MIN, -math.inf)
    edges = torch.tensor([EXP64_MIN, below, math.nextafter(EXP64_MIN, 0.0), -709.0, -745.2, -1e300, 0.0, -0.0,
                          5e-324, -5e-324, 1e-300, -1e-17, 1e-17, 708.0, 707.9, 1.0, -1.0, -math.inf],
                         dtype=torch.float64)
    return torch.cat([spread, differences, halves[halves.abs() <= 708], edges])


def test_exp64_triton_equals_exp64_bit_for_bit():
    x = exp64_inputs()
    got = triton_sampling.exp64_triton(x.to(DEVICE)).cpu()
    assert torch.equal(got.view(torch.int64), exp64(x).view(torch.int64))
    assert got[-1] == 0 and got[x == math.nextafter(EXP64_MIN, -math.inf)].eq(0).all()  # the cut-off
    # Shape kept, non-contiguous input, empty input; float64 only.
    block = x[:24].view(2, 3, 4).transpose(0, 2)
    assert torch.equal(triton_sampling.exp64_triton(block.to(DEVICE)).cpu(), exp64(block))
    assert triton_sampling.exp64_triton(torch.zeros(0, 3, dtype=torch.float64, device=DEVICE)).shape == (0, 3)
    with pytest.raises(TypeError, match="exp64: x must be a float64 tensor"):
        triton_sampling.exp64_triton(torch.zeros(3, device=DEVICE))


# ---------------------------------------------------------------- the step against the reference


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("gamma, dtype", GAMMA_DTYPES, ids=lambda v: str(v))
def test_step_equals_reference(method, gamma, dtype):
    vocab, mask_id = 300, 123  # MASK inside the row, not at its end
    x, log_score, now, nxt, final = random_inputs(10, vocab, mask_id, seed=vocab, dtype=dtype, minus_inf=0.05)
    row_ids = shuffled_row_ids(10, vocab, seed=1)
    assert_same_step(*run_both(x, log_score, now, nxt, gamma, mask_id, 2**64 - 1, 2**32 + 5, row_ids, method,
                               final))


@pytest.mark.parametrize("method", METHODS)
def test_hybrid_step_tokens_equal_reference(method):
    vocab, mask_id = 211, 210
    x, log_score, now, nxt, final = random_inputs(16, vocab, mask_id, seed=3)
    row_ids = shuffled_row_ids(16, vocab, seed=2)
    ours, expected = both_tokens(x, log_score, now, nxt, 0.2, mask_id, 99, 7, row_ids=row_ids, method=method,
                                 final=final)
    assert torch.equal(ours, expected)
    assert not ((ours == mask_id) & (final | (nxt == 0))).any()  # final rows leave MASK
    assert torch.equal(ours[:3], x[:3])  # Δ = 0: nothing moves


@pytest.mark.parametrize("method", METHODS)
def test_several_blocks_and_odd_vocabularies(small_blocks, method):
    # V not a multiple of the 16 columns per iteration (and smaller than one), MASK first or last, odd
    # and even row_id * V (the Philox pairing).
    for vocab, mask_id in ((2, 1), (3, 0), (17, 16), (61, 30)):
        x, log_score, now, nxt, final = random_inputs(5, vocab, mask_id, seed=vocab, minus_inf=0.1)
        row_ids = torch.tensor([0, 1, 10**9 + 7, 2**40 + 1, 5])
        assert_same_step(*run_both(x, log_score, now, nxt, 0.3, mask_id, 5, 6, row_ids, method, final))


def test_non_contiguous_log_scores():
    vocab, mask_id = 150, 0
    g = torch.Generator().manual_seed(6)
    base = torch.randn(24, 2 * vocab, generator=g) * 2
    x = torch.randint(0, vocab, (8,), generator=g)
    x[::2] = mask_id
    row_ids = torch.arange(8) * 3 + 5
    for view in (base[::3, 10:10 + vocab],                       # row stride 3 · 2V, a column slice
                 base.t().contiguous().t()[5:13, :vocab],        # column stride 24
                 base[0:1, :vocab].expand(8, vocab),             # row stride 0
                 base.to(torch.bfloat16)[::3, 1:2 * vocab:2]):   # bf16, column stride 2
        assert not view.is_contiguous()
        ours, expected = both_tokens(x, view, 3.0, 1.0, 0.4, mask_id, 4, 5, row_ids=row_ids)
        assert torch.equal(ours, expected)
        assert torch.equal(ours, hk.sampling.hybrid_step(x, view.contiguous(), 3.0, 1.0, 0.4, mask_id, 4, 5,
                                                         row_ids=row_ids, backend="reference"))


def test_moderate_and_paper_sized_vocabularies():
    for rows, vocab, dtype in ((4, 5000, torch.float32), (2, 50258, torch.bfloat16)):
        mask_id = vocab - 1
        x, log_score, now, nxt, final = random_inputs(rows, vocab, mask_id, seed=rows, dtype=dtype)
        x[0] = mask_id
        x[1] = 17
        nxt[:2] = now[:2] * 0.5  # both rows move
        row_ids = shuffled_row_ids(rows, vocab, seed=rows)
        assert_same_step(*run_both(x, log_score, now, nxt, 0.1, mask_id, 2**64 - 1, 2**32 + 9, row_ids,
                                   "analytic", final))


def test_extreme_log_scores():
    # ±1e4 and beyond e^709 (scaled by e^-m, nothing overflows), -inf, and rows of one repeated value
    # (equal weights: only the noise decides).
    g = torch.Generator().manual_seed(4)
    values = torch.tensor([1e4, -1e4, 0.0, 709.5, 750.0, -750.0, -torch.inf, 3.0])
    vocab, mask_id = 40, 39
    log_score = values[torch.randint(0, len(values), (8, vocab), generator=g)]
    log_score[0] = 750.0
    log_score[1] = -1e4
    log_score[2] = 0.0
    x = torch.tensor([mask_id, 5, mask_id, 7, mask_id, 0, 38, mask_id])
    final = torch.tensor([False, False, True, False, True, False, False, False])
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for method, gamma in (("analytic", 0.3), ("euler", 0.05)):
            assert_same_step(*run_both(x, log_score.to(dtype), 2.5, 0.5, gamma, mask_id, 1, 2, None, method,
                                       final))


# ---------------------------------------------------------------- rows without a choice, bad rows


def test_rows_whose_read_entries_are_all_minus_inf():
    vocab, mask_id = 30, 29
    log_score = torch.randn(4, vocab, generator=torch.Generator().manual_seed(1))
    log_score[:3] = -torch.inf
    log_score[0, mask_id] = 5.0  # unread: the MASK column
    log_score[1, 4] = 5.0        # unread: x's own column
    x = torch.tensor([mask_id, 4, mask_id, mask_id])
    # Masked and not final: only MASK has weight; real x: only x; the last row draws normally.
    ours, expected = both_tokens(x, log_score, 2.0, 1.0, 0.3, mask_id, 3, 3)
    assert torch.equal(ours, expected)
    assert ours[:3].tolist() == [mask_id, 4, mask_id]
    # Final masked rows without any finite read entry have no token: -inf, the lowest column.
    final = torch.tensor([True, False, True, False])
    ours, expected = run_both(x, log_score, 2.0, 1.0, 0.3, mask_id, 3, 3, None, "analytic", final)
    assert_same_step(ours, expected)
    assert ours[1][0] == -torch.inf and ours[1][2] == -torch.inf and ours[0][0] == 0
    with pytest.raises(ValueError, match="row 0 has no token of positive probability"):
        hk.sampling.hybrid_step(x.to(DEVICE), log_score.to(DEVICE), 2.0, 1.0, 0.3, mask_id, 3, 3,
                                final=final.to(DEVICE), backend="triton")
    # γ = 1 on a final masked row: MASK is unreachable, so nothing has weight either way.
    with pytest.raises(ValueError, match="no token of positive probability"):
        hk.sampling.hybrid_step(x[3:].to(DEVICE), log_score[3:].to(DEVICE), 2.0, 0.0, 1.0, mask_id, 3, 3,
                                backend="triton")


def test_subnormal_weights_count_as_zero():
    # Euler on final masked rows (no MASK weight) with a subnormal step: w_y = Δ · r'_y. Row 0: every
    # weight subnormal (no token); row 1: only column 3 (r' = 1) is normal, the rest are subnormal.
    vocab, mask_id = 20, 19
    log_score = torch.full((2, vocab), -23.0, dtype=torch.float64)
    log_score[:, 3] = 0.0
    log_score[0] = 0.0
    x = torch.tensor([mask_id, mask_id])
    now = torch.tensor([2e-310, 2e-300], dtype=torch.float64)
    nxt = torch.tensor([1e-310, 1e-300], dtype=torch.float64)
    ours, expected = run_both(x, log_score, now, nxt, 0.0, mask_id, 7, 7, None, "euler", True)
    assert_same_step(ours, expected)
    assert ours[1][0] == -torch.inf and ours[0].tolist() == [0, 3]


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_nan_and_plus_inf_make_the_row_bad(poison):
    vocab, mask_id = 25, 24
    log_score = torch.randn(4, vocab, generator=torch.Generator().manual_seed(2))
    x = torch.tensor([3, mask_id, 3, mask_id])
    log_score[0, 10] = poison
    log_score[1, 24] = poison  # unread (MASK column): not an error
    log_score[2, 3] = poison   # unread (x's column): not an error
    log_score[3, 0] = poison
    ours, expected = run_both(x, log_score, 1.5, 1.0, 0.2, mask_id, 8, 1)
    assert_same_step(ours, expected)
    assert ours[1].isnan().tolist() == [True, False, False, True]
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(ValueError, match="log_score must hold finite values or -inf .* row 0 does not "
                                             r"\(2 such row\(s\)\)"):
            hk.sampling.hybrid_step(x.to(DEVICE), log_score.to(dtype).to(DEVICE), 1.5, 1.0, 0.2, mask_id,
                                    8, 1, backend="triton")
        ours, expected = both_tokens(x[1:3], log_score[1:3].to(dtype), 1.5, 1.0, 0.2, mask_id, 8, 1)
        assert torch.equal(ours, expected)


# ---------------------------------------------------------------- plumbing


def test_empty_input_and_log_scores_are_not_modified():
    x = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert hk.sampling.hybrid_step(x, torch.zeros(0, 10, device=DEVICE), 1.0, 0.5, 0.1, 9, 1, 1,
                                   backend="triton").shape == (0,)
    log_score = torch.randn(3, 20, dtype=torch.float64).to(DEVICE)
    before = log_score.clone()
    hk.sampling.hybrid_step(torch.tensor([1, 19, 2], device=DEVICE), log_score, 1.0, 0.5, 0.1, 19, 1, 1,
                            backend="triton")
    assert torch.equal(log_score, before)


def test_triton_is_a_registered_backend():
    assert hybrid_module._IMPLEMENTATIONS["triton"] is hybrid_module._hybrid_step_triton


def test_unsupported_devices_raise_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_sampling, "interpreted", lambda: False)  # as if built for the GPU
    with pytest.raises(RuntimeError, match="hybrid_step: backend='triton' runs on CUDA tensors, or on CPU "
                                           "tensors under the Triton interpreter"):
        hk.sampling.hybrid_step(torch.tensor([0, 4]), torch.zeros(2, 5), 1.0, 0.5, 0.1, 4, 0, 0,
                                backend="triton")
    with pytest.raises(RuntimeError, match="exp64: backend='triton' runs on CUDA tensors"):
        triton_sampling.exp64_triton(torch.zeros(3, dtype=torch.float64))


def test_a_broken_triton_install_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.delattr(hk.sampling, "triton_sampling", raising=False)
    monkeypatch.setitem(sys.modules, "hdlm_kernels.sampling.triton_sampling", None)
    with pytest.raises(RuntimeError, match="hybrid_step with backend='triton' needs triton"):
        hk.sampling.hybrid_step(torch.tensor([0, 4]), torch.zeros(2, 5), 1.0, 0.5, 0.1, 4, 0, 0,
                                backend="triton")


# ---------------------------------------------------------------- the GPU code, compiled without a GPU

_PTX_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hdlm_kernels.sampling import triton_sampling as ts

found = {"f64": set(), "literals": set(), "cvt_to_int": set()}
for dtype in ("bf16", "fp32", "fp64"):
    signature = {"LOG_SCORE": "*" + dtype, "X": "*i64", "COEFFICIENTS": "*fp64", "ROW_IDS": "*i64",
                 "CONSTS": "*fp64", "TOKENS": "*i64", "BEST": "*fp64", "stride_row": "i32",
                 "stride_col": "i32", "vocab": "i32", "mask_id": "i32", "key0": "i64", "key1": "i64",
                 "step_lo": "i64", "BLOCK_P": "constexpr"}
    source = ASTSource(fn=ts._hybrid_step_kernel, signature=signature,
                       constexprs={"BLOCK_P": ts._HYBRID_GPU_BLOCK_PAIRS})
    warps = ts._HYBRID_GPU_BLOCK_PAIRS // ts._HYBRID_PAIRS_PER_WARP
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=ts._launch_options(warps))
    ptx = kernel.asm["ptx"]
    found["f64"] |= set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.f64\b", ptx))
    found["literals"] |= set(re.findall(r"\b0d[0-9A-F]{16}\b", ptx))
    found["cvt_to_int"] |= set(re.findall(r"\bcvt(?:\.[a-z0-9]+)*\.[su]\d+\.f64\b", ptx))
json.dump({k: sorted(v) for k, v in found.items()}, sys.stdout)
"""


def test_gpu_code_has_no_fma_and_only_exact_float64_literals(tmp_path):
    """Compiles the hybrid step kernel for sm_90 with the launch options of the module (no GPU needed) and
    checks what bit-identity on the GPU rests on: no fused multiply-add, IEEE round-to-nearest float64
    arithmetic, truncating float -> int conversions (exp64's k, the fixed-point digits), and no float64
    constant but exact ones (the coefficients and scales come from a float64 tensor)."""
    found = compiled_ptx_ops(_PTX_SCRIPT, tmp_path)
    assert not [op for op in found["f64"] if op.startswith("fma") or "approx" in op], found["f64"]
    arithmetic = [op for op in found["f64"] if op.split(".")[0] in ("add", "sub", "mul", "div")]
    assert {"add.rn.f64", "sub.rn.f64", "mul.rn.f64", "div.rn.f64"} <= set(arithmetic), found["f64"]
    assert all(".rn." in op for op in arithmetic), found["f64"]
    assert found["cvt_to_int"] and all(".rzi." in op for op in found["cvt_to_int"]), found["cvt_to_int"]
    exact = {"0d3CA0000000000000", "0d3FE0000000000000", "0dBFE0000000000000", "0d3FF0000000000000",
             "0dBFF0000000000000", "0d4000000000000000", "0d7FF0000000000000", "0dFFF0000000000000",
             "0d7FF8000000000000", "0d0000000000000000"}  # 2^-53, ±0.5, ±1, 2, ±inf, NaN, 0
    assert set(found["literals"]) <= exact, found["literals"]


# ---------------------------------------------------------------- GPU: paper-sized shapes


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_cuda_paper_sized_batch_equals_reference(dtype):
    rows, vocab = 512, 50258
    mask_id = vocab - 1
    x, log_score, now, nxt, final = random_inputs(rows, vocab, mask_id, seed=1, dtype=dtype, minus_inf=0.01)
    row_ids = shuffled_row_ids(rows, vocab, seed=3)
    cuda = [t.cuda() for t in (x, log_score, now, nxt, final, row_ids)]
    for method, gamma in (("analytic", 0.05), ("euler", 0.5), ("analytic", 0.0)):
        args = (gamma, mask_id, 2**64 - 1, 2**32 + 9)
        got = hk.sampling.hybrid_step(*cuda[:4], *args, row_ids=cuda[5], method=method, final=cuda[4],
                                      backend="triton")
        expected = hk.sampling.hybrid_step(*cuda[:4], *args, row_ids=cuda[5], method=method, final=cuda[4],
                                           backend="reference")
        assert torch.equal(got, expected)
    # A CPU reference for a few rows, scores included (cross-device bit identity).
    some = slice(0, 8)
    ours, expected = run_both(x[some], log_score[some], now[some], nxt[some], 0.3, mask_id, 5, 6,
                              row_ids[some], "analytic", final[some])
    assert_same_step(ours, expected)


@pytest.mark.cuda
def test_cuda_exp64_on_many_elements():
    x = torch.rand(4_000_000, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1458 - 750
    x = torch.cat([x, exp64_inputs()])
    assert torch.equal(triton_sampling.exp64_triton(x.cuda()).cpu().view(torch.int64),
                       exp64(x).view(torch.int64))

