"""The compiled backends of the fused γ-hybrid step (csrc/hybrid_cpu.cpp, csrc/hybrid_cuda.cu; hybrid.py,
"The fused form") bit for bit against the reference backend: exp64 and its constants, then the C++ backend
against backend="reference" (tokens and the winning float64 scores, NaN for bad rows, -inf for rows without
weight) over methods, γ, dtypes, layouts, vocabularies, row ids, seeds and special log-scores (-inf, ties,
±1e4, far above 709, NaN, +inf); the errors hybrid_step raises from them; the operator's argument checks;
and, on a GPU, backend="cuda" against the reference.

The C++ tests skip (with the reason) when hdlm_kernels._C lacks hybrid_step_cpu; the CUDA ones when it has
no CUDA operators or there is no GPU."""

import math
from dataclasses import dataclass, replace

import pytest
import torch
from sampling_checks import assert_same_draw

from hdlm_kernels import _extension
from hdlm_kernels.sampling import hybrid as hybrid_module
from hdlm_kernels.sampling.gumbel import _implementation
from hdlm_kernels.sampling.hybrid import METHODS, hybrid_step, hybrid_step_ref, step_coefficients
from hdlm_kernels.sampling.log64 import EXP64_COEFFICIENTS, EXP64_MIN, INV_LN2, exp64

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
GAMMAS = [0.0, 0.05, 0.5, 1.0]
SEED_MAX = 2**64 - 1
INF = math.inf


@pytest.fixture
def extension():
    if _extension._C is None:
        pytest.skip(f"hdlm_kernels._C is not available: {_extension.missing_reason}")
    if not hasattr(_extension._C, "hybrid_step_cpu"):
        pytest.skip("hdlm_kernels._C was built from older sources (no hybrid_step_cpu); reinstall")
    return _extension._C


@dataclass
class Case:
    """The arguments of one hybrid_step call (on the CPU; `on` moves the tensors)."""

    x: torch.Tensor
    log_score: torch.Tensor
    now: torch.Tensor
    nxt: torch.Tensor
    gamma: float
    mask_id: int
    final: torch.Tensor
    row_ids: torch.Tensor
    method: str = "analytic"
    seed: int = 123
    step: int = 4

    def on(self, device):
        return replace(self, x=self.x.to(device), log_score=self.log_score.to(device),
                       now=self.now.to(device), nxt=self.nxt.to(device), final=self.final.to(device),
                       row_ids=self.row_ids.to(device))

    def rows(self, index):
        """The case restricted to rows `index` (same identities, so the same draws)."""
        return replace(self, x=self.x[index], log_score=self.log_score[index], now=self.now[index],
                       nxt=self.nxt[index], final=self.final[index], row_ids=self.row_ids[index])


def random_case(rows, vocab, mask_id, seed, dtype=torch.float32, gamma=0.05, method="analytic", scale=2.0,
                offset=-1.0):
    """Masked and real rows, Δ = 0 rows, rows stepping to σ̄ = 0, final rows, large shuffled row ids, and
    model-like log-scores (not true ratios, so the clamps at 0 act)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (rows,), generator=g)
    x[torch.rand(rows, generator=g) < 0.4] = mask_id
    log_score = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    now = torch.rand(rows, generator=g, dtype=torch.float64) * 7
    nxt = now * torch.rand(rows, generator=g, dtype=torch.float64)
    nxt[torch.rand(rows, generator=g) < 0.2] = 0.0
    nxt[:2] = now[:2]  # Δ = 0: nothing moves
    final = torch.rand(rows, generator=g) < 0.3
    final[:2] = False
    row_ids = torch.randperm(rows, generator=g) * 7919 + 10**9 + 1
    return Case(x, log_score, now, nxt, gamma, mask_id, final, row_ids, method, seed=SEED_MAX - seed,
                step=seed)


def mask_id_for(dtype, vocab):
    """The MASK id at the end, the start or the middle of the vocabulary, varied with the dtype."""
    if dtype == torch.bfloat16:
        return 0
    return vocab // 2 if dtype == torch.float16 else vocab - 1


def draw(backend, case, chunk_rows=16):
    """(tokens, best) of one backend, called as hybrid_step calls it (coefficients on the case's device)."""
    vocab = case.log_score.shape[1]
    coefficients = step_coefficients(case.x, case.now, case.nxt, case.gamma, case.mask_id, vocab, case.method,
                                     case.final | (case.nxt == 0))
    implementation = hybrid_module._IMPLEMENTATIONS[backend]
    return implementation(case.log_score, case.x, coefficients, case.row_ids, case.mask_id, case.seed,
                          case.step, chunk_rows)


def step(case, backend, rows=slice(None)):
    """hybrid_step itself (with its checks) on `rows` of the case."""
    part = case.rows(rows)
    return hybrid_step(part.x, part.log_score, part.now, part.nxt, part.gamma, part.mask_id, part.seed,
                       part.step, row_ids=part.row_ids, method=part.method, final=part.final, backend=backend)


def assert_cpp_matches_reference(case):
    """The operator against the reference on every row, then hybrid_step(backend="cpp") on the rows it
    accepts (finite winners) against backend="reference". Returns the operator's (tokens, best)."""
    ours = draw("cpp", case)
    assert_same_draw(ours, draw("reference", case))
    fine = torch.isfinite(ours[1])
    if bool(fine.any()):
        tokens = step(case, "cpp", fine)
        assert torch.equal(tokens, ours[0][fine])
        assert torch.equal(tokens, step(case, "reference", fine))
    return ours


# ---------------------------------------------------------------- exp64


def exp64_inputs():
    """The exponential's domain [-708, 708] and beyond its lower end: uniform, small magnitudes, both sides of
    every rounding half point of k, the step's ratios s - m <= 0 of sampler-like scores, and the edges."""
    g = torch.Generator().manual_seed(0)
    wide = torch.rand(200_000, generator=g, dtype=torch.float64) * 1430 - 722
    small = torch.randn(20_000, generator=g, dtype=torch.float64) * torch.exp2(
        -torch.randint(0, 70, (20_000,), generator=g).double())
    halves = (torch.arange(-1021, 1022, dtype=torch.float64) + 0.5) / INV_LN2
    halves = halves[halves.abs() <= 708]
    halves = torch.cat([halves, torch.nextafter(halves, torch.full_like(halves, INF)),
                        torch.nextafter(halves, torch.full_like(halves, -INF))])
    scores = torch.randn(2000, 50, generator=g, dtype=torch.float64) * 3
    ratios = (scores - scores.amax(1, keepdim=True)).flatten()
    ends = torch.tensor([EXP64_MIN, -708.0000001, math.nextafter(EXP64_MIN, -INF),
                         math.nextafter(EXP64_MIN, INF), 0.0, -0.0, 708.0, -INF, math.nan, -1e300, 1e-300,
                         -1e-300, 5e-324, -5e-324, 1.0, -1.0, math.log(2) / 2, -math.log(2) / 2, 709.0,
                         -745.2],
                        dtype=torch.float64)
    return torch.cat([wide, small, halves, ratios, ends])


def test_exp64_constants_equal_the_python_ones(extension):
    expected = list(EXP64_COEFFICIENTS[:14]) + [INV_LN2, EXP64_MIN]
    assert [v.hex() for v in extension.exp64_constants()] == [v.hex() for v in expected]


def test_exp64_cpp_equals_torch_bit_for_bit(extension):
    x = exp64_inputs()
    ours = extension.exp64_cpu(x)
    assert torch.equal(ours.view(torch.int64), exp64(x).view(torch.int64))
    # below EXP64_MIN (and -inf, NaN) exactly 0; e^0 = 1 exactly; e^708 finite
    assert ours[x < EXP64_MIN].eq(0).all() and ours[x.isnan()].eq(0).all()
    assert extension.exp64_cpu(torch.tensor([0.0, 708.0], dtype=torch.float64)).tolist()[0] == 1.0
    assert math.isfinite(extension.exp64_cpu(torch.tensor([708.0], dtype=torch.float64)).item())
    # Any shape and layout; float64 only.
    grid = x[:24].reshape(2, 3, 4).transpose(0, 2)
    expected = exp64(grid.contiguous()).view(torch.int64)
    assert torch.equal(extension.exp64_cpu(grid).view(torch.int64), expected)
    with pytest.raises(RuntimeError, match="exp64_cpu: x must be a float64 CPU tensor, got Float"):
        extension.exp64_cpu(torch.ones(3))


# ---------------------------------------------------------------- bit-exact against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("method", METHODS)
def test_cpp_matches_reference_bit_exactly(extension, method, gamma, dtype):
    vocab = 301
    mask_id = mask_id_for(dtype, vocab)
    case = random_case(40, vocab, mask_id, seed=DTYPES.index(dtype) + 10, dtype=dtype, gamma=gamma,
                       method=method)
    tokens, best = assert_cpp_matches_reference(case)
    done = case.final | (case.nxt == 0)
    if gamma == 1.0:  # the uniform process never leaves MASK: final masked rows have no weight
        assert torch.equal(best == -INF, done & (case.x == mask_id))
    else:
        assert torch.isfinite(best).all()
    assert not ((tokens == mask_id) & done & torch.isfinite(best)).any()
    assert torch.equal(tokens[:2], case.x[:2])  # Δ = 0


@pytest.mark.parametrize("method", METHODS)
def test_cpp_equals_the_dense_twin_on_a_tiny_vocabulary(extension, method):
    case = random_case(300, 7, 6, seed=11, gamma=0.3, method=method)
    args = (case.x, case.log_score, case.now, case.nxt, case.gamma, case.mask_id, case.seed, case.step)
    tokens = hybrid_step(*args, row_ids=case.row_ids, method=method, final=case.final, backend="cpp")
    assert torch.equal(tokens, hybrid_step_ref(*args, row_ids=case.row_ids, method=method, final=case.final))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paper_sized_vocabulary(extension, dtype):
    vocab, mask_id = 50258, 50257
    limit = (2**63 - vocab) // vocab  # the largest row id with int64 element ids
    for method, gamma in (("analytic", 0.05), ("euler", 0.5)):
        case = random_case(4, vocab, mask_id, seed=3, dtype=dtype, gamma=gamma, method=method)
        case.x[:] = torch.tensor([mask_id, mask_id, 17, 50000])
        case.nxt[:] = case.now * 0.9
        case.row_ids = torch.tensor([0, 1, 123456789, limit])
        assert_cpp_matches_reference(case)


@pytest.mark.parametrize("vocab", [2, 3, 5, 127, 255, 256, 257, 258, 511, 513, 1001])
def test_vocabularies_that_are_not_a_multiple_of_a_tile(extension, vocab):
    """The C++ kernel walks Philox pairs in tiles of 128 (256 columns): rows that start on an odd element
    (odd row_id * V) begin with half a pair, and the last tile is partial."""
    for mask_id in sorted({0, vocab - 1}):
        case = random_case(8, vocab, mask_id, seed=vocab, gamma=0.5, scale=0.5)
        case.row_ids = torch.tensor([0, 1, 2, 3, 7, 2**31 - 1, 2**32 + 1, 10**12 + 3])
        assert_cpp_matches_reference(case)


def test_non_contiguous_log_scores(extension):
    base = random_case(30, 620, 599, seed=6).log_score
    views = {
        "row stride 1860, column slice": base[::3, 10:610],
        "column stride 30 (transposed)": base.t().contiguous().t()[5:15, :600],
        "column stride 2": base[10:20, ::2][:, :300],
        "row stride 0": base[0:1, :600].expand(10, 600),
        "bf16 transposed": base.to(torch.bfloat16).t().contiguous().t()[0:10, :600],
        "fp16 column slice": base.to(torch.float16)[20:30, 15:615],
    }
    for name, view in views.items():
        assert not view.is_contiguous(), name
        vocab = view.shape[1]
        case = random_case(10, vocab, vocab - 1, seed=7, gamma=0.05)
        case.log_score = view
        tokens, best = assert_cpp_matches_reference(case)
        assert_same_draw((tokens, best), draw("cpp", replace(case, log_score=view.contiguous())))


@pytest.mark.parametrize("method", METHODS)
def test_rows_are_keyed_by_identity(extension, method):
    case = random_case(64, 97, 96, seed=5, gamma=0.2, method=method)
    tokens, best = draw("cpp", case)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:40]
    assert_same_draw(draw("cpp", case.rows(order)), (tokens[order], best[order]))
    other = draw("cpp", replace(case, seed=case.seed - 1))
    assert not torch.equal(other[0], tokens)


def test_large_row_ids_seeds_and_steps(extension):
    vocab = 50258
    limit = (2**63 - vocab) // vocab
    case = random_case(5, vocab, 50257, seed=4, gamma=0.5)
    case.x[:] = 50257  # every column weighed
    case.final[:] = False
    # Element ids around the 2^32 and 2^33 counter-word boundaries, and at the very top of int64.
    case.row_ids = torch.tensor([2**32 // vocab, 2**33 // vocab, 2**33 // vocab + 1, limit - 1, limit])
    for seed, step_ in ((SEED_MAX, 2**32 - 1), (2**32 - 1, 0), (2**32, 2**32 + 5), (0, 7)):
        assert_cpp_matches_reference(replace(case, seed=seed, step=step_))


# ---------------------------------------------------------------- special log-scores


def special_cases():
    """Named cases of special log-scores, shared by the C++ and the CUDA tests."""
    cases = {}
    vocab, mask_id = 300, 299
    # -inf entries (a third of each row) and rows of ties: equal log-scores everywhere, or a tied maximum
    case = random_case(24, vocab, mask_id, seed=21, gamma=0.5)
    holes = torch.rand(24, vocab, generator=torch.Generator().manual_seed(2)) < 0.33
    case.log_score[holes] = -INF
    case.log_score[3:6] = 0.0
    case.log_score[6:9] = 1.5
    case.log_score[9:12, [5, 50, 250]] = 40.0
    cases["minus_inf_and_ties"] = case
    # bf16 / fp16 round many scores to ties
    for dtype in (torch.bfloat16, torch.float16):
        cases[f"rounded_ties_{dtype}"] = random_case(32, vocab, mask_id, seed=22, dtype=dtype, gamma=0.05,
                                                     scale=0.05)
    # ±1e4 in every dtype (fp16's range ends at 65504): ratios e^{-2e4} vanish, the row maximum dominates
    g = torch.Generator().manual_seed(9)
    for dtype in DTYPES:
        case = random_case(16, vocab, mask_id, seed=23, dtype=dtype, gamma=0.05)
        signs = torch.randint(0, 2, (16, vocab), generator=g) * 2 - 1
        noise = torch.randn(16, vocab, generator=g, dtype=torch.float64) * 4
        case.log_score = (signs * 1e4 + noise).to(dtype)
        case.log_score[:, 7] = 1e4
        case.log_score[:, 200] = 1e4
        cases[f"plus_minus_1e4_{dtype}"] = case
    # far above 709 (where e^s overflows float64): the scaling by e^{-m} keeps every ratio in [0, 1]
    big = {torch.float16: 60000.0, torch.bfloat16: 1e30, torch.float32: 3e38, torch.float64: 1e300}
    for dtype in DTYPES:
        case = random_case(12, vocab, mask_id, seed=24, dtype=dtype, gamma=0.05, scale=1.0, offset=0.0)
        case.log_score = case.log_score.double()
        case.log_score[0:4] += 800.0
        case.log_score[4:8, 11] = big[dtype]
        case.log_score[8:12, 100:110] = 710.0 + torch.arange(10, dtype=torch.float64)
        case.log_score = case.log_score.to(dtype)
        cases[f"above_709_{dtype}"] = case
    # every read entry -inf: masked rows (MASK wins unless final), real rows (x stays), final masked rows
    # (no weight: -inf, token 0)
    case = random_case(12, vocab, mask_id, seed=25, gamma=0.5)
    case.log_score[:] = -INF
    case.log_score[:, mask_id] = 3.0  # not read
    case.x[:] = torch.tensor([mask_id] * 8 + [0, 1, 298, 150])
    case.final[:] = torch.tensor([False] * 4 + [True] * 4 + [False, True, False, True])
    case.nxt[:] = case.now * 0.5
    cases["all_minus_inf"] = case
    # NaN and +inf at read entries (bad rows), and at the unread entries x and MASK (ignored)
    case = random_case(10, vocab, mask_id, seed=26, gamma=0.5)
    case.x[:] = torch.tensor([mask_id, mask_id, 3, 3, 3, 3, mask_id, 100, 200, mask_id])
    case.log_score[0, 17] = math.nan
    case.log_score[1, [5, 290]] = INF
    case.log_score[2, 9] = math.nan
    case.log_score[2, 10] = INF
    case.log_score[3, 3] = math.nan    # x's column: not read
    case.log_score[4, mask_id] = INF   # MASK column of a real row: not read
    case.log_score[5, [3, mask_id]] = math.nan
    case.log_score[6, 0] = -INF        # -inf is allowed
    case.log_score[7, 100] = INF       # x's column
    case.log_score[8] = math.nan
    case.log_score[8, 200] = 0.0       # every read entry NaN
    case.log_score[9, mask_id] = math.nan  # x = MASK: the MASK column is x's, not read
    cases["nan_and_inf"] = case
    return cases


SPECIAL = special_cases()


@pytest.mark.parametrize("name", list(SPECIAL))
def test_special_log_scores_match_the_reference(extension, name):
    assert_cpp_matches_reference(SPECIAL[name])


def test_large_scores_do_not_overflow(extension):
    """A masked row at γ = 0 with one log-score 1e4 (or 800) above the rest: every other ratio underflows
    to 0 and MASK's weight is clamped at 0, so that token is certain."""
    vocab, mask_id = 300, 299
    for dtype, top in ((torch.float16, 1e4), (torch.float32, 1e4), (torch.bfloat16, 800.0),
                       (torch.float64, 1e300)):
        case = random_case(6, vocab, mask_id, seed=31, dtype=dtype, gamma=0.0)
        case.x[:] = mask_id
        case.nxt[:] = case.now * 0.5
        case.log_score = torch.zeros(6, vocab, dtype=dtype)
        columns = torch.tensor([0, 1, 128, 255, 256, 298])
        case.log_score[torch.arange(6), columns] = top
        tokens, best = assert_cpp_matches_reference(case)
        assert torch.equal(tokens, columns) and torch.isfinite(best).all()


def test_rows_without_weight(extension):
    case = SPECIAL["all_minus_inf"]
    tokens, best = assert_cpp_matches_reference(case)
    mask_id = case.mask_id
    assert tokens[0:4].tolist() == [mask_id] * 4                       # masked, not final: stays MASK
    assert tokens[4:8].tolist() == [0] * 4 and (best[4:8] == -INF).all()  # final MASK: no weight
    assert tokens[8:].tolist() == case.x[8:].tolist()                   # real rows keep x
    for backend in ("cpp", "reference"):
        with pytest.raises(ValueError, match="row 1 has no token of positive probability.* 4 such row"):
            step(case, backend, slice(3, None))


def test_nan_and_plus_inf_raise(extension):
    case = SPECIAL["nan_and_inf"]
    tokens, best = assert_cpp_matches_reference(case)
    bad = torch.tensor([True, True, True, False, False, False, False, False, True, False])
    assert torch.equal(best.isnan(), bad)
    assert torch.isfinite(best[~bad]).all()
    for backend in ("cpp", "reference"):
        with pytest.raises(ValueError, match="log_score must hold finite values or -inf.*row 0 does not "
                                             r"\(4 such row"):
            step(case, backend)
        with pytest.raises(ValueError, match="row 1 does not"):
            step(case, backend, slice(7, None))


def test_result_does_not_depend_on_the_thread_count(extension):
    case = random_case(40, 2000, 1999, seed=11, gamma=0.05)  # above the parallel threshold
    try:
        torch.set_num_threads(1)
        single = draw("cpp", case)
        torch.set_num_threads(2)
        multi = draw("cpp", case)
    finally:
        torch.set_num_threads(1)  # the single_thread fixture restores the original count
    assert_same_draw(multi, single)
    assert_same_draw(multi, draw("reference", case))


def test_empty_input_and_float64_log_scores_are_not_modified(extension):
    case = random_case(3, 20, 19, seed=1, dtype=torch.float64)
    tokens, best = draw("cpp", case.rows(slice(0, 0)))
    assert tokens.shape == (0,) and best.shape == (0,)
    before = case.log_score.clone()
    assert_cpp_matches_reference(case)
    assert torch.equal(case.log_score, before)


def test_auto_backend_on_the_cpu_is_the_cpp_kernel(extension):
    chosen = _implementation("auto", "hybrid_step", torch.device("cpu"), hybrid_module._IMPLEMENTATIONS)
    assert chosen is hybrid_module._IMPLEMENTATIONS["cpp"]


# ---------------------------------------------------------------- argument checks of the operator


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(log_score=torch.zeros(3, 4, dtype=torch.int32)),
         "log_score must have dtype float32, float64, float16 or bfloat16, got Int"),
        (dict(log_score=torch.zeros(12)), r"log_score must have shape \[R, V\], got shape \[12\]"),
        (dict(log_score=torch.zeros(3, 0)), r"log_score must have 1 <= V < 2\^31 tokens, got V = 0"),
        (dict(log_score=torch.zeros(3, 4, device="meta")), "log_score must be on CPU, got a tensor on meta"),
        (dict(x=torch.tensor([0, 3, 1], dtype=torch.int32)),
         r"x must be an int64 tensor \[R\] = \[3\], got Int"),
        (dict(x=torch.tensor([0, 3])), r"x must be an int64 tensor \[R\] = \[3\], got Long of shape \[2\]"),
        (dict(x=torch.tensor([0, 4, 1])),
         r"x must hold token ids in \[0, V\) = \[0, 4\), got 4 at position 1"),
        (dict(x=torch.tensor([0, 3, -1])),
         r"x must hold token ids in \[0, V\) = \[0, 4\), got -1 at position 2"),
        (dict(x=torch.tensor([0, 3, 1], device="meta")), "x must be on log_score's device cpu, got meta"),
        (dict(coefficients=torch.zeros(3, 6)),
         r"coefficients must be a float64 tensor \[R, 6\] = \[3, 6\], got Float of shape \[3, 6\]"),
        (dict(coefficients=torch.zeros(3, 5, dtype=torch.float64)),
         r"coefficients must be a float64 tensor .*got Double of shape \[3, 5\]"),
        (dict(row_ids=torch.arange(3, dtype=torch.int32)),
         r"row_ids must be an int64 tensor \[R\] = \[3\], got Int"),
        (dict(row_ids=torch.arange(4)),
         r"row_ids must be an int64 tensor \[R\] = \[3\], got Long of shape \[4\]"),
        (dict(row_ids=torch.tensor([0, -1, 2])),
         r"row_ids must be in \[0, 2305843009213693951\] for V = 4 .*got -1 at position 1"),
        (dict(row_ids=torch.tensor([0, 2**62, 2])), "row_ids must be in .*got 4611686018427387904"),
        (dict(mask_id=4), r"mask_id must be in \[0, V\) = \[0, 4\), got 4"),
        (dict(mask_id=-1), r"mask_id must be in \[0, V\) = \[0, 4\), got -1"),
        (dict(step=-1), "step must be >= 0, got -1"),
    ],
)
def test_operator_errors_name_the_argument(extension, change, match):
    arguments = dict(log_score=torch.zeros(3, 4), x=torch.tensor([0, 3, 1]),
                     coefficients=torch.zeros(3, 6, dtype=torch.float64), row_ids=torch.arange(3), mask_id=3,
                     seed=SEED_MAX, step=1)
    arguments.update(change)
    with pytest.raises(RuntimeError, match="hybrid_step: " + match):
        extension.hybrid_step_cpu(**arguments)


def test_operator_takes_the_whole_seed_range(extension):
    case = random_case(5, 30, 29, seed=2)
    for seed in (0, SEED_MAX):
        assert_cpp_matches_reference(replace(case, seed=seed))


# ---------------------------------------------------------------- GPU


def require_cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if _extension.cuda_missing_reason():
        pytest.skip(_extension.cuda_missing_reason())
    if not hasattr(_extension._C, "hybrid_step_cuda"):
        pytest.skip("hdlm_kernels._C was built from older sources (no hybrid_step_cuda); reinstall")


def assert_cuda_matches_reference(case):
    """The CUDA operator on the case's tensors moved to the GPU against the reference on the CPU, then
    hybrid_step(backend="cuda") (coefficients computed on the GPU) on the rows it accepts."""
    expected = draw("reference", case)
    gpu = case.on("cuda")
    ours = draw("cuda", gpu)
    assert ours[0].device.type == "cuda" and ours[1].device.type == "cuda"
    assert_same_draw(ours, expected)
    fine = torch.isfinite(expected[1])
    if bool(fine.any()):
        assert torch.equal(step(gpu, "cuda", fine.cuda()).cpu(), expected[0][fine])
    return ours


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_reference_bit_exactly(method, gamma, dtype):
    require_cuda_backend()
    vocab = 301
    case = random_case(40, vocab, mask_id_for(dtype, vocab), seed=DTYPES.index(dtype) + 10, dtype=dtype,
                       gamma=gamma, method=method)
    assert_cuda_matches_reference(case)


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(SPECIAL))
def test_cuda_special_log_scores_match_the_reference(name):
    require_cuda_backend()
    assert_cuda_matches_reference(SPECIAL[name])


@pytest.mark.cuda
def test_cuda_vocabularies_layouts_and_row_ids():
    require_cuda_backend()
    for vocab in (2, 3, 255, 256, 257, 511, 512, 513, 1001):  # partial last strides, odd row starts
        case = random_case(8, vocab, vocab - 1, seed=vocab, gamma=0.5, scale=0.5)
        case.row_ids = torch.tensor([0, 1, 2, 3, 7, 2**31 - 1, 2**32 + 1, 10**12 + 3])
        assert_cuda_matches_reference(case)
    base = random_case(30, 620, 599, seed=6).log_score
    views = (lambda b: b[::3, 10:610], lambda b: b.t().contiguous().t()[5:15, :600],
             lambda b: b[10:20, ::2][:, :300], lambda b: b[0:1, :600].expand(10, 600),
             lambda b: b.to(torch.bfloat16).t().contiguous().t()[0:10, :600])
    for view_of in views:
        view, gpu_view = view_of(base), view_of(base.cuda())  # the same strides on both devices
        assert not gpu_view.is_contiguous() and gpu_view.stride() == view.stride()
        vocab = view.shape[1]
        case = random_case(10, vocab, vocab - 1, seed=7, gamma=0.05)
        expected = draw("reference", replace(case, log_score=view))
        assert_same_draw(draw("cuda", replace(case.on("cuda"), log_score=gpu_view)), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_paper_sized_batch_equals_reference_and_cpp(dtype):
    require_cuda_backend()
    vocab, mask_id = 50258, 50257
    for method, gamma in (("analytic", 0.05), ("euler", 0.5), ("analytic", 0.0)):
        case = random_case(64, vocab, mask_id, seed=1, dtype=dtype, gamma=gamma, method=method)
        case.row_ids = torch.arange(64) * 17 + 3
        ours = assert_cuda_matches_reference(case)
        some = slice(0, 8)  # across devices: the C++ backend on the CPU
        assert_same_draw((ours[0][some], ours[1][some]), draw("cpp", case.rows(some)))
