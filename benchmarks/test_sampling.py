"""Exact categorical sampling: one FP64 Gumbel-max draw per row of a logits matrix, and the ACS step
(docs/sampling-stream.md; the roofline figures in docs/benchmarks.md).

``gumbel_argmax [R x V dtype]`` groups draw one token for every row of the same logits ``[R, V]``:

* ``ours_cuda``, ``ours_triton``, ``ours_cpp``: ``hk.sampling.gumbel_argmax(..., backend=...)``, the
  fused kernels (53-bit Philox uniforms, float64 ``log64`` noise and scores in registers, logits read
  once). CUDA and Triton are timed on a GPU, C++ on a CPU; a backend that is not built or not
  implemented yet is skipped with the library's reason;
* ``ours_reference``: the same draw with ``backend="reference"``, row-chunked PyTorch (a few float64
  temporaries of ``chunk_rows x V``), bit-identical to the kernels;
* ``official_fp64``: the official sampler's ``add_gumbel_noise`` (docs/official-code.md §6,
  from LLaDA): logits cast to float64, ``torch.rand`` float64 uniforms of the same shape,
  ``exp(l) / (-log u) ** τ`` (τ = 1, the ``** 1.0`` a copy) and argmax, every temporary a full
  ``[R, V]`` float64 tensor; the baseline of the ratios;
* ``torch_fp32_gumbel``: ``logits.float() - log(-log(torch.rand(float32)))`` and argmax, the fast but
  inexact reference point (float32 uniforms cap the noise at ≈16.6, docs/sampling-stream.md).

The draws of ``official_fp64`` and ``torch_fp32_gumbel`` come from torch's generator, not from the
Philox stream of docs/sampling-stream.md, so their tokens differ from ours (same distribution for
``official_fp64``); the comparison is one full draw of every row, each contender with its own noise.

``acs_step eta=... [R x V]`` groups time one ACS update (paper §3.4, App. D Alg. 4) of ``R`` rows of
which about half are masked, with ``p_transfer = 1/16`` per row, at η = 0 (MDLM's sampler: only masked
rows change, ``R/2 · 1/16`` of them) and η = 0.01 (plus ``R/2 · 0.01 · 15/16`` corrections):
``ours_*`` call ``hk.sampling.acs_step`` with every row's logits, of which only the changing rows are
read; ``official_acs`` is the official ``full_diff`` ACS branch (two float64 ``torch.rand`` decision
draws, then ``add_gumbel_noise`` and argmax on the gathered rows of each kind, two scatters), the
baseline. Each record carries ``change_frac`` and ``rows_changed`` (the rows ``acs_decisions`` picks
for our seed and step; the official decisions vary with each round around the same expectation), so a
cost proportional to the changing rows shows next to the full draw of the gumbel group.

``hybrid_step gamma=... [R x V]`` groups time one γ-hybrid analytic step (paper App. B.4; τ-leaping)
of ``R`` rows of log-scores (about half the rows MASK, Δσ̄ = 0.05 at σ̄ = 2, γ = 0.01): ``ours_*`` call
``hk.sampling.hybrid_step`` (the fused form: a max pass, an exact fixed-point sum of ``exp64`` ratios,
and a race pass with ``log64`` weights and FP64 Gumbel noise, bit-identical across backends; the C++
race is screened in float32; the records of the C++, CUDA and Triton rows carry the exact scores per row
as ``candidates_mean`` / ``candidates_max``, as the ``gumbel_argmax`` rows do);
``official_analytic`` is the official ``AnalyticPredictor`` recipe (docs/official-code.md §6): ``exp`` of the
log-scores, the interpolated staggered score and the transition row as fp32 ``[R, V]`` tensors, then
``argmax(probs / (-log(u_fp64 + 1e-10)))`` with float64 ``torch.rand`` of ``[R, V]``, the baseline.

Rates: ``read_bytes`` is the logits one call must read (``R · V ·`` element size for a full draw,
``rows_changed · V ·`` element size for an ACS step, the same for every contender of a group);
``gbps`` is ``read_bytes`` over the median time and ``elements_per_s`` the logits elements over it
(both absent under ``--benchmark-disable``); ``floor_us`` is the time ``read_bytes`` takes at this
machine's measured copy rate (``benchmarks/roofline.py``, recorded as ``copy_gbps``; about 190 µs for
[8192, 50258] bf16 at 4.3 TB/s) and ``pct_of_floor`` the floor time over the median (100 is the floor).

Shapes: on a GPU the paper's batch 8 × d = 1024 rows over V = 50258 in bf16 (normal logits × 3,
seeded); on a CPU a small default of 256 rows in fp32 (the C++ path against the torch reference) so
that ``make bench`` stays fast. Triton is not timed on a CPU (only its interpreter runs there).
"""

import warnings
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import hdlm_kernels as hk
from benchmarks.roofline import copy_bytes_per_s, floor_info
from benchmarks.timing import median_seconds, synchronized

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
ROWS, VOCAB = (8 * 1024, 50258) if GPU else (256, 50258)
DTYPE = torch.bfloat16 if GPU else torch.float32
ROUNDS, WARMUP_ROUNDS = (10, 2) if GPU else (3, 0)
SLOW_ROUNDS = 3  # the reference backend's full draw (log64 spelled out in PyTorch ops)
SEED, STEP = 1234, 7
TEMPERATURE = 1.0
MASK_ID = VOCAB - 1  # the MASK token of the paper's vocabulary (GPT-2's 50257 tokens + MASK)
P_TRANSFER = 1 / 16
ETAS = (0.0, 0.01)


@dataclass(frozen=True)
class Case:
    """A contender ready to run: ``run()`` is one full draw (or one ACS step)."""

    run: Callable[[], object]
    rounds: int = ROUNDS
    notes: dict = field(default_factory=dict)  # contender-specific extra_info


@dataclass(frozen=True)
class AcsProblem:
    """One ACS step: tokens ``x [R]`` (about half MASK), every row's logits, η."""

    eta: float
    x: torch.Tensor
    logits: torch.Tensor
    rows_changed: int  # what acs_decisions picks for (SEED, STEP)


@pytest.fixture(scope="module")
def logits() -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return (torch.randn(ROWS, VOCAB, generator=g, device=DEVICE) * 3).to(DTYPE)


@pytest.fixture(scope="module", params=ETAS, ids=lambda eta: f"eta{eta:g}")
def acs_problem(request, logits) -> AcsProblem:
    g = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randint(0, MASK_ID, (ROWS,), generator=g, device=DEVICE)
    x[torch.randperm(ROWS, generator=g, device=DEVICE)[:ROWS // 2]] = MASK_ID
    change = hk.sampling.acs_decisions(x, P_TRANSFER, request.param, MASK_ID, SEED, STEP)
    return AcsProblem(request.param, x, logits, int(change.sum()))


def require(backend: str, probe: Callable[[torch.Tensor], object]) -> None:
    """Skips unless ``backend`` is timed here and available; ``probe(tiny_logits)`` calls it once."""
    if backend == "triton" and not GPU:
        pytest.skip("Triton runs on CPU only in the interpreter, which is not a speed measurement")
    if backend == "cuda" and not GPU:
        pytest.skip("the CUDA backend needs a CUDA GPU")
    if backend == "cpp" and GPU:
        pytest.skip("the C++ backend takes CPU tensors; a GPU run times the GPU backends")
    try:  # a tiny call, so that a failure of the real call below is a failure, not a skip
        probe(torch.zeros(2, 8, device=DEVICE, dtype=DTYPE))
    except RuntimeError as error:  # not built, or not implemented yet: the library says why
        pytest.skip(f"backend={backend!r} unavailable: {error}")


def official_add_gumbel_noise(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """docs/official-code.md §6: the exponential race in float64, exp(l) / (-log u) ** τ."""
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel_noise = (-torch.log(noise)) ** TEMPERATURE
    return logits.exp() / gumbel_noise


def generator() -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(2)


# -- gumbel_argmax contenders: logits -> Case -------------------------------------------------------------
def gumbel_ours(logits: torch.Tensor, backend: str, rounds: int = ROUNDS) -> Case:
    require(backend, lambda tiny: hk.sampling.gumbel_argmax(tiny, SEED, STEP, backend=backend))
    return Case(lambda: hk.sampling.gumbel_argmax(logits, SEED, STEP, temperature=TEMPERATURE,
                                                  backend=backend), rounds)


def with_candidates(case: Case, counts: torch.Tensor) -> Case:
    """The case, its record carrying the screen's exact scores per row (docs/sampling-screen.md, "Cost and
    candidates"): mean and max over the rows."""
    counts = counts.double()
    return Case(case.run, case.rounds, dict(candidates_mean=round(counts.mean().item(), 4),
                                            candidates_max=int(counts.max())))


def gumbel_ours_counted(logits: torch.Tensor, backend: str) -> Case:
    case = gumbel_ours(logits, backend)
    return with_candidates(case, hk.sampling.gumbel_candidates(logits, SEED, STEP, temperature=TEMPERATURE,
                                                               backend=backend))


def ours_cuda(logits: torch.Tensor) -> Case:
    return gumbel_ours_counted(logits, "cuda")


def ours_triton(logits: torch.Tensor) -> Case:
    return gumbel_ours_counted(logits, "triton")


def ours_cpp(logits: torch.Tensor) -> Case:
    return gumbel_ours_counted(logits, "cpp")


def ours_reference(logits: torch.Tensor) -> Case:
    return gumbel_ours(logits, "reference", SLOW_ROUNDS)


def official_fp64(logits: torch.Tensor) -> Case:
    g = generator()
    return Case(lambda: torch.argmax(official_add_gumbel_noise(logits, g), dim=-1))


def torch_fp32_gumbel(logits: torch.Tensor) -> Case:
    g = generator()

    def fp32_gumbel():
        u = torch.rand(logits.shape, generator=g, device=logits.device, dtype=torch.float32)
        return torch.argmax(logits.float() - torch.log(-torch.log(u)), dim=-1)

    return Case(fp32_gumbel, notes=dict(exact=False))


GUMBEL_CONTENDERS = [ours_cuda, ours_triton, ours_cpp, ours_reference, official_fp64, torch_fp32_gumbel]
GUMBEL_BASELINE = official_fp64


# -- acs_step contenders: problem -> Case -----------------------------------------------------------------
def acs_ours(p: AcsProblem, backend: str) -> Case:
    def probe(tiny):  # one masked row that must transfer (p = 1), so the backend samples
        x = torch.full((tiny.shape[0],), tiny.shape[1] - 1, dtype=torch.int64, device=DEVICE)
        return hk.sampling.acs_step(x, tiny, 1.0, 0.0, tiny.shape[1] - 1, SEED, STEP, backend=backend)

    require(backend, probe)
    return Case(lambda: hk.sampling.acs_step(p.x, p.logits, P_TRANSFER, p.eta, MASK_ID, SEED, STEP,
                                             temperature=TEMPERATURE, backend=backend))


def acs_ours_cuda(p: AcsProblem) -> Case:
    return acs_ours(p, "cuda")


def acs_ours_triton(p: AcsProblem) -> Case:
    return acs_ours(p, "triton")


def acs_ours_cpp(p: AcsProblem) -> Case:
    return acs_ours(p, "cpp")


def acs_ours_reference(p: AcsProblem) -> Case:
    return acs_ours(p, "reference")


def official_acs(p: AcsProblem) -> Case:
    g = generator()
    masked = p.x == MASK_ID
    unmasked = ~masked

    def official():  # docs/official-code.md §6, full_diff alg == "acs", one sequence of R rows
        x0 = p.x.clone()
        transfer = torch.rand(x0.shape, generator=g, device=DEVICE, dtype=torch.float64) < P_TRANSFER
        correct = (torch.rand(x0.shape, generator=g, device=DEVICE, dtype=torch.float64)
                   < p.eta * (1 - P_TRANSFER))
        unmask_noisy = official_add_gumbel_noise(p.logits[transfer & masked], g)
        shuffle_noisy = official_add_gumbel_noise(p.logits[correct & unmasked], g)
        x0[transfer & masked] = torch.argmax(unmask_noisy, dim=-1)
        x0[correct & unmasked] = torch.argmax(shuffle_noisy, dim=-1)
        return x0.clone()

    return Case(official)


ACS_CONTENDERS = [acs_ours_cuda, acs_ours_triton, acs_ours_cpp, acs_ours_reference, official_acs]
ACS_BASELINE = official_acs


# -- hybrid_step contenders: problem -> Case --------------------------------------------------------------
GAMMA = 0.01
SIGMA_NOW, SIGMA_NEXT = 2.0, 1.95


@dataclass(frozen=True)
class HybridProblem:
    """One γ-hybrid analytic step: tokens ``x [R]`` (about half MASK) and their log-scores ``[R, V]``."""

    x: torch.Tensor
    log_score: torch.Tensor


@pytest.fixture(scope="module")
def hybrid_problem(logits) -> HybridProblem:
    g = torch.Generator(device=DEVICE).manual_seed(3)
    x = torch.randint(0, MASK_ID, (ROWS,), generator=g, device=DEVICE)
    x[torch.randperm(ROWS, generator=g, device=DEVICE)[:ROWS // 2]] = MASK_ID
    return HybridProblem(x, logits - 10.0)  # log-ratios: most tokens far less likely than the current one


def hybrid_ours(p: HybridProblem, backend: str, rounds: int = ROUNDS) -> Case:
    def probe(tiny):
        x = torch.zeros(tiny.shape[0], dtype=torch.int64, device=DEVICE)
        return hk.sampling.hybrid_step(x, tiny, SIGMA_NOW, SIGMA_NEXT, GAMMA, tiny.shape[1] - 1, SEED, STEP,
                                       backend=backend)

    require(backend, probe)
    return Case(lambda: hk.sampling.hybrid_step(p.x, p.log_score, SIGMA_NOW, SIGMA_NEXT, GAMMA, MASK_ID, SEED,
                                                STEP, backend=backend), rounds)


def hybrid_ours_counted(p: HybridProblem, backend: str) -> Case:
    # The race's exact scores per row (docs/sampling-screen.md, "The γ step"): the current cell plus candidates.
    return with_candidates(hybrid_ours(p, backend), hk.sampling.hybrid_candidates(
        p.x, p.log_score, SIGMA_NOW, SIGMA_NEXT, GAMMA, MASK_ID, SEED, STEP, backend=backend))


def hybrid_ours_cuda(p: HybridProblem) -> Case:
    return hybrid_ours_counted(p, "cuda")


def hybrid_ours_triton(p: HybridProblem) -> Case:
    return hybrid_ours_counted(p, "triton")


def hybrid_ours_cpp(p: HybridProblem) -> Case:
    return hybrid_ours_counted(p, "cpp")


def hybrid_ours_reference(p: HybridProblem) -> Case:
    return hybrid_ours(p, "reference", SLOW_ROUNDS)


def official_analytic(p: HybridProblem) -> Case:
    """docs/official-code.md §6, AnalyticPredictor.update_fn on one position per row:
    QGamma.staggered_score (the linear interpolation of SEDD's absorbing and uniform staggered scores)
    times QGamma.transp_transition (Eq. 7g's row of x), in fp32, then sample_categorical in float64."""
    g = generator()
    n = VOCAB - 1
    delta = SIGMA_NOW - SIGMA_NEXT
    e_delta = torch.tensor(delta, device=DEVICE).exp()
    a, b = torch.tensor(-(1 - GAMMA) * delta).exp().item(), torch.tensor(-GAMMA * delta).exp().item()
    masked = (p.x == MASK_ID)[:, None]
    real = torch.nn.functional.one_hot(p.x.clamp(max=n - 1), VOCAB).bool() & ~masked

    def official():
        score = p.log_score.float().exp()
        total = score.sum(-1, keepdim=True)
        absorb = score * e_delta
        absorb[:, MASK_ID:] += (1 - e_delta) * total
        uniform = score * e_delta + (1 - e_delta) * (total - score[:, MASK_ID:]) / n
        uniform[:, MASK_ID:] = score[:, MASK_ID:]
        staggered = (1 - GAMMA) * absorb + GAMMA * uniform
        transition = torch.where(masked, 1 - a, a * (1 - b) / n + a * b * real)
        transition[:, MASK_ID:] = torch.where(masked, 1.0, 0.0)
        probs = staggered * transition
        u = torch.rand(probs.shape, generator=g, device=DEVICE, dtype=torch.float64)
        return torch.argmax(probs / (-torch.log(u + 1e-10)), dim=-1)

    return Case(official)


HYBRID_CONTENDERS = [hybrid_ours_cuda, hybrid_ours_triton, hybrid_ours_cpp, hybrid_ours_reference, official_analytic]
HYBRID_BASELINE = official_analytic




def side(contender) -> str:
    """``"ours"`` for this package's backends, ``"baseline"`` for the official recipes and plain torch."""
    return "ours" if "ours" in contender.__name__ else "baseline"


def measure(benchmark, case: Case, group: str, shape: str, rows_read: int, baseline: bool, **notes) -> None:
    benchmark.group = group
    target = synchronized(case.run)
    with torch.no_grad():
        with warnings.catch_warnings():  # compile, autotune and allocate outside the timing
            warnings.simplefilter("ignore")
            target()
        benchmark.pedantic(target, rounds=case.rounds, warmup_rounds=WARMUP_ROUNDS)

    elements = rows_read * VOCAB
    read_bytes = elements * torch.empty((), dtype=DTYPE).element_size()
    copy_rate = copy_bytes_per_s(DEVICE)
    median = median_seconds(benchmark)
    info = dict(shape=shape, dtype=str(DTYPE).replace("torch.", ""), read_bytes=read_bytes,
                copy_gbps=float(f"{copy_rate / 1e9:.4g}"), **floor_info(read_bytes / copy_rate, median),
                **notes, **case.notes)
    if median is not None:  # None under --benchmark-disable
        info["gbps"] = float(f"{read_bytes / median / 1e9:.4g}")
        info["elements_per_s"] = float(f"{elements / median:.4g}")
    if baseline:
        info["baseline"] = True
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("contender", GUMBEL_CONTENDERS, ids=lambda c: c.__name__)
def test_gumbel_argmax(benchmark, logits, contender):
    case = contender(logits)
    dtype = str(DTYPE).replace("torch.", "")
    measure(benchmark, case, f"gumbel_argmax [{ROWS} x {VOCAB} {dtype}]", f"R={ROWS} V={VOCAB}", ROWS,
            contender is GUMBEL_BASELINE, side=side(contender))


@pytest.mark.parametrize("contender", ACS_CONTENDERS, ids=lambda c: c.__name__)
def test_acs_step(benchmark, acs_problem, contender):
    p = acs_problem
    case = contender(p)
    measure(benchmark, case, f"acs_step eta={p.eta:g} [{ROWS} x {VOCAB}]",
            f"R={ROWS} V={VOCAB} masked={ROWS // 2} p={P_TRANSFER:g}", p.rows_changed,
            contender is ACS_BASELINE, side=side(contender), eta=p.eta, rows_changed=p.rows_changed,
            change_frac=round(p.rows_changed / ROWS, 4))


@pytest.mark.parametrize("contender", HYBRID_CONTENDERS, ids=lambda c: c.__name__)
def test_hybrid_step(benchmark, hybrid_problem, contender):
    case = contender(hybrid_problem)
    dtype = str(DTYPE).replace("torch.", "")
    measure(benchmark, case, f"hybrid_step gamma={GAMMA:g} [{ROWS} x {VOCAB} {dtype}]",
            f"R={ROWS} V={VOCAB} masked={ROWS // 2} dsigma={SIGMA_NOW - SIGMA_NEXT:g}", ROWS,
            contender is HYBRID_BASELINE, side=side(contender), gamma=GAMMA)
