"""hk.sampling.hybrid_step: one reverse step of the γ-hybrid process (paper §3.2, App. A Eq. 7g, B.4;
docs/hybrid-step.md), on every backend.

The key check builds the generator Q from its definition on a tiny vocabulary, computes the exact
reverse transition q(x_s | x_t) by Bayes with dense matrix exponentials for a known x0 distribution,
and compares it with the analytic step fed the TRUE log-ratios log p_t(y)/p_t(x). Then every fused
backend (C++, CUDA, Triton) against the reference backend bit for bit (tokens and the winning float64
scores, NaN for bad rows, -inf for rows without weight) over methods, γ, dtypes, layouts, vocabularies,
row ids, seeds and special log-scores; the errors hybrid_step raises; the operator's argument checks;
torch.compile through the custom op; and the Triton kernel's sm_90 code.

The Triton kernel runs in the interpreter on the CPU (one program per row, about 0.1 s each), so its
cases use fewer rows where they test the same thing; tests marked ``cuda`` cover paper-sized ones."""

import math
from dataclasses import dataclass, replace

import pytest
import scipy.linalg
import torch
from sampling_checks import Target, assert_same_draw, backend_targets, calls_during, compiled_ptx_ops
from scipy import stats

import hdlm_kernels as hk
from hdlm_kernels import _extension
from hdlm_kernels.sampling import hybrid as hybrid_module
from hdlm_kernels.sampling.hybrid import METHODS, hybrid_probs, hybrid_probs_ref, hybrid_step, step_coefficients

pytestmark = pytest.mark.usefixtures("single_thread")


def generator_matrix(vocab, mask_id, gamma):
    """Q[y, x] = rate x -> y of (1-γ)Q_Absorb + γQ_Uniform, entry by entry from App. A's definitions
    (real tokens are all ids but mask_id; MASK absorbs; the uniform part moves among real tokens)."""
    n = vocab - 1
    q = torch.zeros(vocab, vocab, dtype=torch.float64)
    for x in range(vocab):
        if x == mask_id:
            continue
        for y in range(vocab):
            if y == mask_id:
                q[y, x] += 1.0 - gamma               # x -> MASK
            elif y != x:
                q[y, x] += gamma / n                 # x -> another real token
        q[x, x] = -q[:, x].sum()
    return q


def expm(a):
    # scipy's expm (Al-Mohy & Higham) is accurate to ~1e-16 at every norm; torch.linalg.matrix_exp
    # is off by ~5e-12 for small ones.
    return torch.from_numpy(scipy.linalg.expm(a.numpy()))


def exact_reverse(vocab, mask_id, gamma, p0, sigma_now, sigma_next):
    """(log-ratios [V, V] with row x = log p_now(·)/p_now(x), exact q(x_next = y | x_now = x) [V, V])."""
    q = generator_matrix(vocab, mask_id, gamma)
    p_now = expm(sigma_now * q) @ p0
    p_next = expm(sigma_next * q) @ p0
    forward = expm((sigma_now - sigma_next) * q)   # forward[x, y] = p(x_now = x | x_next = y)
    log_ratios = torch.log(p_now)[None, :] - torch.log(p_now)[:, None]
    posterior = forward * p_next[None, :] / p_now[:, None]            # Bayes, row x
    return log_ratios, posterior


def x0_distribution(vocab, mask_id, seed):
    """A full-support distribution over the real tokens; data never holds MASK."""
    p0 = torch.rand(vocab - 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.05
    full = torch.zeros(vocab, dtype=torch.float64)
    full[[i for i in range(vocab) if i != mask_id]] = p0 / p0.sum()
    return full


# ------------------------------------------------------------------ exactness (the key test)


@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("sigmas", [(1.3, 0.7), (6.9, 5.0), (0.5, 0.0), (3.0, 2.99), (2.0, 2.0)])
@pytest.mark.parametrize("vocab,mask_id", [(6, 5), (5, 1)])
def test_analytic_step_is_the_exact_reverse_transition(gamma, sigmas, vocab, mask_id):
    sigma_now, sigma_next = sigmas
    p0 = x0_distribution(vocab, mask_id, seed=vocab)
    log_ratios, posterior = exact_reverse(vocab, mask_id, gamma, p0, sigma_now, sigma_next)
    states = torch.arange(vocab)
    reachable = torch.isfinite(log_ratios).all(1)  # p_now(x) > 0 (γ = 1: MASK is never reached)
    if gamma == 1.0:
        reachable[mask_id] = False
        log_ratios[:, mask_id] = 0.0  # a real state's MASK entry is never read; keep it finite
    x, s = states[reachable], log_ratios[reachable]
    got = hybrid_probs(x, s, sigma_now, sigma_next, gamma, mask_id)
    torch.testing.assert_close(got, posterior[reachable], rtol=0, atol=1e-12)
    torch.testing.assert_close(hybrid_probs_ref(x, s, sigma_now, sigma_next, gamma, mask_id),
                               posterior[reachable], rtol=0, atol=1e-12)
    if sigma_next == 0:
        assert (got[:, mask_id] == 0).all()  # clean after the final step


def test_official_interpolated_staggered_score_is_only_first_order():
    """The official code's interpolated staggered score, (1-γ)·absorb(Δ) + γ·uniform(Δ) with the full Δ in
    both, is not the exact step (docs/official-differences.md)."""
    vocab, mask_id, gamma, sigma_now, sigma_next = 6, 5, 0.3, 2.0, 1.0
    n, delta = vocab - 1, sigma_now - sigma_next
    p0 = x0_distribution(vocab, mask_id, seed=1)
    log_ratios, posterior = exact_reverse(vocab, mask_id, gamma, p0, sigma_now, sigma_next)
    x = 2  # a real token
    r = log_ratios[x].exp()
    total = r[:n].sum()
    absorb = r * math.exp(delta)
    absorb[mask_id] += (1 - math.exp(delta)) * r.sum()
    uniform = r * math.exp(delta) + (1 - math.exp(delta)) * total / n
    uniform[mask_id] = r[mask_id]
    staggered = (1 - gamma) * absorb + gamma * uniform
    forward = expm(delta * generator_matrix(vocab, mask_id, gamma))
    official = (staggered * forward[x]).clamp(min=0)
    official = official / official.sum()
    assert (official - posterior[x]).abs().max() > 1e-3
    exact = hybrid_probs(torch.tensor([x]), log_ratios[x:x + 1], sigma_now, sigma_next, gamma, mask_id)
    assert (exact[0] - posterior[x]).abs().max() < 1e-12


@pytest.mark.parametrize("gamma", [0.0, 0.2])
def test_euler_step_is_first_order(gamma):
    vocab, mask_id, sigma_now = 6, 5, 1.5
    p0 = x0_distribution(vocab, mask_id, seed=2)
    errors = []
    for delta in (1e-2, 1e-3):
        log_ratios, posterior = exact_reverse(vocab, mask_id, gamma, p0, sigma_now, sigma_now - delta)
        got = hybrid_probs(torch.arange(vocab), log_ratios, sigma_now, sigma_now - delta, gamma, mask_id,
                           method="euler")
        errors.append(float((got - posterior).abs().max()))
    # local error O(Δ²): ten times smaller steps, ~100 times smaller error
    assert errors[1] < errors[0] / 50 and errors[0] < 1e-3


# ------------------------------------------------------------------ efficient == dense reference


def random_inputs(rows, vocab, mask_id, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (rows,), generator=g)
    x[torch.rand(rows, generator=g) < 0.4] = mask_id
    # model-like scores: not true ratios, so the clamps are exercised
    log_score = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    now = torch.rand(rows, generator=g, dtype=torch.float64) * 7
    nxt = now * torch.rand(rows, generator=g, dtype=torch.float64)
    nxt[torch.rand(rows, generator=g) < 0.2] = 0.0
    nxt[:3] = now[:3]  # Δ = 0: nothing moves (so these rows cannot be final)
    final = torch.rand(rows, generator=g) < 0.3
    final[:3] = False
    return x, log_score, now, nxt, final


@pytest.mark.parametrize("method", ["analytic", "euler"])
@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.5])
def test_efficient_matches_dense_reference(method, gamma):
    vocab, mask_id = 7, 6
    x, log_score, now, nxt, final = random_inputs(300, vocab, mask_id, seed=11)
    args = (x, log_score, now, nxt, gamma, mask_id)
    torch.testing.assert_close(hybrid_probs(*args, method=method, final=final),
                               hybrid_probs_ref(*args, method=method, final=final), rtol=0, atol=1e-12)
    row_ids = torch.arange(300) * 5 + 3
    tokens = hk.sampling.hybrid_step(*args, 123, 4, row_ids=row_ids, method=method, final=final, backend="reference")
    reference = hk.sampling.hybrid_step_ref(*args, 123, 4, row_ids=row_ids, method=method, final=final)
    assert tokens.dtype == torch.int64 and torch.equal(tokens, reference)
    masked_after = tokens == mask_id
    assert not (masked_after & (final | (nxt == 0))).any()
    assert torch.equal(tokens[:3], x[:3])  # Δ = 0


def test_draws_are_keyed_by_row_identity_and_independent_of_chunking():
    vocab, mask_id = 9, 8
    x, log_score, now, nxt, final = random_inputs(64, vocab, mask_id, seed=5)
    row_ids = torch.arange(64) + 1000
    args = (log_score, now, nxt, 0.1, mask_id, 77, 3)
    full = hk.sampling.hybrid_step(x, *args, row_ids=row_ids, final=final)
    assert torch.equal(full, hk.sampling.hybrid_step(x, *args, row_ids=row_ids, final=final, chunk_rows=1))
    assert torch.equal(full, hk.sampling.hybrid_step(x, *args, row_ids=row_ids, final=final, chunk_rows=7))
    part = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:20]
    sub = hk.sampling.hybrid_step(x[part], log_score[part], now[part], nxt[part], 0.1, mask_id, 77, 3,
                                  row_ids=row_ids[part], final=final[part])
    assert torch.equal(sub, full[part])
    other = hk.sampling.hybrid_step(x, log_score, now, nxt, 0.1, mask_id, 78, 3, row_ids=row_ids, final=final)
    assert not torch.equal(full, other)


def test_half_precision_scores_are_widened_exactly():
    vocab, mask_id = 7, 6
    x, log_score, now, nxt, final = random_inputs(50, vocab, mask_id, seed=8, dtype=torch.bfloat16)
    args = (now, nxt, 0.2, mask_id, 1, 2)
    assert torch.equal(hk.sampling.hybrid_step(x, log_score, *args, final=final),
                       hk.sampling.hybrid_step(x, log_score.double(), *args, final=final))


# ------------------------------------------------------------------ statistics


@pytest.mark.parametrize("method,x", [("analytic", 7), ("analytic", 2), ("euler", 7), ("euler", 2)])
def test_frequencies_match_probabilities(method, x):
    vocab, mask_id, rows = 8, 7, 20000
    g = torch.Generator().manual_seed(4)
    log_score = torch.randn(1, vocab, generator=g, dtype=torch.float64) - 1.5
    args = (torch.full((rows,), x), log_score.expand(rows, -1), 2.0, 1.2, 0.3, mask_id)
    probs = hybrid_probs(args[0][:1], log_score, *args[2:], method=method)[0]
    tokens = hk.sampling.hybrid_step(*args, 2024, 9, method=method)  # row_ids = arange(rows)
    counts = torch.bincount(tokens, minlength=vocab).double()
    support = probs > 0
    assert counts[~support].sum() == 0
    expected = probs[support] * rows
    assert expected.min() > 5  # chi-square validity
    assert stats.chisquare(counts[support].numpy(), expected.numpy()).pvalue > 1e-3


# ------------------------------------------------------------------ special cases


@pytest.mark.parametrize("method", ["analytic", "euler"])
def test_gamma_zero_is_sedd_absorb(method):
    vocab, mask_id = 11, 10
    x, log_score, now, nxt, final = random_inputs(400, vocab, mask_id, seed=21)
    tokens = hk.sampling.hybrid_step(x, log_score, now, nxt, 0.0, mask_id, 5, 1, method=method, final=final)
    real = x != mask_id
    assert torch.equal(tokens[real], x[real])           # no backsies: a real token never changes
    assert not (tokens[final & ~real] == mask_id).any()  # final masked rows unmask
    probs = hybrid_probs(x, log_score, now, nxt, 0.0, mask_id, method=method, final=final)
    assert torch.equal(probs[real], torch.nn.functional.one_hot(x[real], vocab).double())
    # γ -> 0 is continuous: a real token changes with probability O(γΔ)
    tiny = hybrid_probs(x, log_score, now, nxt, 1e-9, mask_id, method=method, final=final)
    assert (1 - tiny[real].gather(1, x[real, None])).max() < 1e-6
    assert (tiny[~real] - probs[~real]).abs().max() < 1e-6


def test_gamma_zero_masked_row_is_mdlm_unmasking_with_the_true_score():
    # absorbing, true score: P(stay MASK) = (1 - e^{-σ̄_next}) / (1 - e^{-σ̄_now})
    vocab, mask_id, sigma_now, sigma_next = 6, 5, 1.7, 0.4
    p0 = x0_distribution(vocab, mask_id, seed=3)
    log_ratios, _ = exact_reverse(vocab, mask_id, 0.0, p0, sigma_now, sigma_next)
    probs = hybrid_probs(torch.tensor([mask_id]), log_ratios[mask_id:], sigma_now, sigma_next, 0.0, mask_id)
    stay = -math.expm1(-sigma_next) / -math.expm1(-sigma_now)
    assert abs(float(probs[0, mask_id]) - stay) < 1e-14
    torch.testing.assert_close(probs[0, :mask_id] / (1 - stay), p0[:mask_id], rtol=0, atol=1e-13)


def test_large_noise_gap_does_not_overflow():
    vocab, mask_id = 6, 5
    x = torch.tensor([5, 5, 1])
    log_score = torch.zeros(3, vocab)
    # e^{Δ} = e^{800} overflows float64; the weights only use e^{-(1-γ)Δ}, e^{-γΔ}
    tokens = hk.sampling.hybrid_step(x, log_score, 800.0, 0.0, 0.01, mask_id, 0, 0)
    assert not (tokens == mask_id).any()
    probs = hybrid_probs(x, log_score, 800.0, 0.0, 0.01, mask_id)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs[0], torch.tensor([0.2] * 5 + [0.0], dtype=torch.float64))


def test_row_without_admissible_token_raises():
    log_score = torch.full((2, 5), -torch.inf)
    with pytest.raises(ValueError, match="row 1 has no token of positive probability"):
        hk.sampling.hybrid_step(torch.tensor([1, 4]), log_score, 1.0, 0.0, 0.1, 4, 0, 0)


def test_bad_arguments_raise():
    x, s = torch.tensor([0, 4]), torch.zeros(2, 5)
    step = hk.sampling.hybrid_step
    with pytest.raises(ValueError, match="method must be one of 'analytic', 'euler'; got 'rk4'"):
        step(x, s, 1.0, 0.5, 0.1, 4, 0, 0, method="rk4")
    with pytest.raises(ValueError, match=r"x must have shape \[R\] = \[2\]"):
        step(x[:1], s, 1.0, 0.5, 0.1, 4, 0, 0)
    with pytest.raises(TypeError, match="x must be an integer tensor"):
        step(x.double(), s, 1.0, 0.5, 0.1, 4, 0, 0)
    with pytest.raises(ValueError, match=r"x must hold token ids in \[0, V\) = \[0, 5\)"):
        step(torch.tensor([0, 5]), s, 1.0, 0.5, 0.1, 4, 0, 0)
    with pytest.raises(TypeError, match="log_score must have dtype"):
        step(x, s.long(), 1.0, 0.5, 0.1, 4, 0, 0)
    with pytest.raises(ValueError, match="sigma_next must be <= sigma_now"):
        step(x, s, 1.0, torch.tensor([0.5, 1.5]), 0.1, 4, 0, 0)
    with pytest.raises(ValueError, match="sigma_now must be finite and >= 0"):
        step(x, s, math.inf, 0.5, 0.1, 4, 0, 0)
    with pytest.raises(ValueError, match=r"sigma_now must be a float or a tensor of shape \[R\] = \[2\]"):
        step(x, s, torch.ones(3), 0.5, 0.1, 4, 0, 0)
    with pytest.raises(ValueError, match=r"gamma must be a float in \[0, 1\]; got 1.5"):
        step(x, s, 1.0, 0.5, 1.5, 4, 0, 0)
    with pytest.raises(ValueError, match=r"mask_id must be an int in \[0, V\)"):
        step(x, s, 1.0, 0.5, 0.1, 5, 0, 0)
    with pytest.raises(TypeError, match="final must be a bool or a bool tensor"):
        step(x, s, 1.0, 0.5, 0.1, 4, 0, 0, final=torch.ones(2))
    with pytest.raises(ValueError, match="log_score must hold finite values or -inf"):
        step(x, torch.tensor([[0.0, math.nan, 0, 0, 0], [0.0] * 5]), 1.0, 0.5, 0.1, 4, 0, 0)
    with pytest.raises(ValueError, match="hybrid_step has no backend 'gpu'; its backends are 'auto', 'kernels', "
                                         "'reference', 'cpp', 'cuda', 'triton'"):
        step(x, s, 1.0, 0.5, 0.1, 4, 0, 0, backend="gpu")
    with pytest.raises(RuntimeError, match="hybrid_step: backend='cuda' cannot run on cpu tensors here"):
        step(x, s, 1.0, 0.5, 0.1, 4, 0, 0, backend="cuda")
    with pytest.raises(ValueError, match="seed must be an int in"):
        step(x, s, 1.0, 0.5, 0.1, 4, -1, 0)


# ------------------------------------------------------------------ the fused form's edges


def test_log_scores_beyond_the_float64_exponent_range_are_scaled_not_overflowed():
    """Weights are scaled by e^{-max}: log-scores of 800 (e^800 overflows) give the draw of the same
    row shifted down by 800 (the analytic weights of a MASK row are homogeneous in r for γ = 0)."""
    vocab, mask_id = 7, 6
    x = torch.full((200,), mask_id)
    g = torch.Generator().manual_seed(2)
    log_score = torch.randn(200, vocab, generator=g, dtype=torch.float64)
    args = (1.0, 0.0, 0.0, mask_id, 3, 4)  # final step: MASK excluded, the rest proportional to r
    low = hk.sampling.hybrid_step(x, log_score, *args, backend="reference")
    high = hk.sampling.hybrid_step(x, log_score + 800.0, *args, backend="reference")
    assert torch.equal(low, high)
    probs = hybrid_probs(x[:1], log_score[:1] + 800.0, 1.0, 0.0, 0.0, mask_id)
    expected = torch.softmax(log_score[0, :mask_id], 0)
    torch.testing.assert_close(probs[0, :mask_id], expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("target", backend_targets("hybrid_step"))
def test_deferred_step_is_the_same_step_and_reports_bad_rows_instead_of_raising(target):
    vocab, mask_id = 9, 8
    x, log_score, now, nxt, final = random_inputs(8 if target.interpreted else 64, vocab, mask_id, seed=12)
    row_ids = torch.arange(x.shape[0]) * 3 + 1
    on = [t.to(target.device) for t in (x, log_score, now, nxt, final, row_ids)]
    args = (*on[:4], 0.1, mask_id, 5, 6, on[5])
    tokens, failed = hk.sampling.hybrid_step_deferred(*args, final=on[4], backend=target.name)
    expected = hk.sampling.hybrid_step(x, log_score, now, nxt, 0.1, mask_id, 5, 6, row_ids, final=final,
                                       backend="reference")
    assert torch.equal(tokens.cpu(), expected)
    assert not bool(failed)
    on[1][3, (int(x[3]) + 1) % mask_id] = math.nan
    assert bool(hk.sampling.hybrid_step_deferred(*args, final=on[4], backend=target.name)[1])
    with pytest.raises(ValueError, match="log_score must hold finite values or -inf"):
        hk.sampling.hybrid_step(*args, final=on[4], backend=target.name)
    with pytest.raises(TypeError, match="row_ids must be an int64 tensor"):
        hk.sampling.hybrid_step_deferred(*args[:-1], on[5].int(), backend=target.name)


# ------------------------------------------------------------------ every backend bit for bit

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
GAMMAS = [0.0, 0.05, 0.5, 1.0]
SEED_MAX = 2**64 - 1
INF = math.inf
FUSED = backend_targets("hybrid_step", reference_cpu=False)
EVERY = backend_targets("hybrid_step")
REFERENCE = Target("hybrid_step", "reference", "cpu")


@dataclass
class Case:
    """The arguments of one hybrid_step call (on the CPU; ``on`` moves the tensors)."""

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
        return replace(self, x=self.x.to(device), log_score=self.log_score.to(device), now=self.now.to(device),
                       nxt=self.nxt.to(device), final=self.final.to(device), row_ids=self.row_ids.to(device))

    def rows(self, index):
        """The case restricted to rows ``index`` (same identities, so the same draws)."""
        return replace(self, x=self.x[index], log_score=self.log_score[index], now=self.now[index],
                       nxt=self.nxt[index], final=self.final[index], row_ids=self.row_ids[index])


def random_case(rows, vocab, mask_id, seed, dtype=torch.float32, gamma=0.05, method="analytic", scale=2.0,
                offset=-1.0, minus_inf=0.0):
    """Masked and real rows, Δ = 0 rows, rows stepping to σ̄ = 0, final rows, large shuffled row ids (the
    largest with int64 element ids among them) and model-like log-scores (not true ratios, so the clamps
    at 0 act); ``minus_inf`` of the entries -inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (rows,), generator=g)
    x[torch.rand(rows, generator=g) < 0.4] = mask_id
    log_score = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale + offset
    log_score[torch.rand(rows, vocab, generator=g) < minus_inf] = -INF
    now = torch.rand(rows, generator=g, dtype=torch.float64) * 7
    nxt = now * torch.rand(rows, generator=g, dtype=torch.float64)
    nxt[torch.rand(rows, generator=g) < 0.2] = 0.0
    nxt[:2] = now[:2]  # Δ = 0: nothing moves
    final = torch.rand(rows, generator=g) < 0.3
    final[:2] = False
    limit = (2**63 - vocab) // vocab
    row_ids = torch.randperm(rows, generator=g) * 7919 + 10**9 + 1
    row_ids[rows // 2] = limit
    return Case(x, log_score.to(dtype), now, nxt, gamma, mask_id, final, row_ids, method, seed=SEED_MAX - seed,
                step=seed)


def mask_id_for(dtype, vocab):
    """The MASK id at the end, the start or the middle of the vocabulary, varied with the dtype."""
    if dtype == torch.bfloat16:
        return 0
    return vocab // 2 if dtype == torch.float16 else vocab - 1


def draw(target, case, chunk_rows=16):
    """(tokens, best) on the CPU of ``target``'s implementation, called as hybrid_step calls it (the
    coefficients computed on the target's device)."""
    case = case.on(target.device)
    vocab = case.log_score.shape[1]
    coefficients = step_coefficients(case.x, case.now, case.nxt, case.gamma, case.mask_id, vocab, case.method,
                                     case.final | (case.nxt == 0))
    tokens, best = target.implementation(case.log_score, case.x, coefficients, case.row_ids, case.mask_id,
                                         case.seed, case.step, chunk_rows)
    assert tokens.device.type == best.device.type == target.kind
    return tokens.cpu(), best.cpu()


def step(case, target, rows=slice(None)):
    """hybrid_step itself (with its checks) on ``rows`` of the case, on ``target``; tokens on the CPU."""
    part = case.rows(rows).on(target.device)
    return hybrid_step(part.x, part.log_score, part.now, part.nxt, part.gamma, part.mask_id, part.seed, part.step,
                       row_ids=part.row_ids, method=part.method, final=part.final, backend=target.name).cpu()


def assert_matches_reference(target, case):
    """The implementation against the reference on every row, then hybrid_step on ``target`` on the rows it
    accepts (finite winners) against the reference's tokens. Returns the implementation's (tokens, best)."""
    ours = draw(target, case)
    expected = draw(REFERENCE, case)
    assert_same_draw(ours, expected)
    fine = torch.isfinite(expected[1])
    if bool(fine.any()) and not target.interpreted:  # the interpreter pays per row; its public path is checked
        assert torch.equal(step(case, target, fine), expected[0][fine])  # by the tests of tokens below
    return ours


@pytest.fixture
def small_blocks(monkeypatch):
    """8 Philox blocks (16 columns) per loop iteration of the Triton kernel: several iterations of every pass
    even for small V (a no-op for the other backends)."""
    try:
        from hdlm_kernels.sampling import triton_hybrid
    except ImportError:
        return
    monkeypatch.setattr(triton_hybrid, "INTERPRETER_BLOCK_PAIRS", 8)
    monkeypatch.setattr(triton_hybrid, "GPU_BLOCK_PAIRS", 8)


def _gamma_dtype_method():
    """Every method, γ and dtype on compiled backends; in the interpreter each γ with one dtype, so that every
    dtype and both methods meet γ = 0 (absorb), small, mid and 1 (uniform) without the full product."""
    for param in FUSED:
        target = param.values[0]
        if target.interpreted:
            combinations = [(m, g, d) for m in METHODS for g, d in zip(GAMMAS, DTYPES)]
        else:
            combinations = [(m, g, d) for m in METHODS for g in GAMMAS for d in DTYPES]
        for method, gamma, dtype in combinations:
            yield pytest.param(target, method, gamma, dtype, marks=param.marks,
                               id=f"{target}-{method}-{gamma}-{str(dtype)[6:]}")


@pytest.mark.parametrize("target,method,gamma,dtype", list(_gamma_dtype_method()))
def test_every_backend_matches_the_reference_bit_for_bit(target, method, gamma, dtype):
    rows, vocab = (10 if target.interpreted else 40), 301
    mask_id = mask_id_for(dtype, vocab)
    case = random_case(rows, vocab, mask_id, seed=DTYPES.index(dtype) + 10, dtype=dtype, gamma=gamma, method=method,
                       minus_inf=0.05)
    tokens, best = assert_matches_reference(target, case)
    done = case.final | (case.nxt == 0)
    no_weight = (best == -INF)
    if gamma == 1.0:  # the uniform process never leaves MASK: final masked rows have no weight
        assert torch.equal(no_weight, done & (case.x == mask_id))
    assert not ((tokens == mask_id) & done & torch.isfinite(best)).any()
    assert torch.equal(tokens[:2], case.x[:2])  # Δ = 0


@pytest.mark.parametrize("target", FUSED)  # the reference: test_efficient_matches_dense_reference
@pytest.mark.parametrize("method", METHODS)
def test_every_backend_equals_the_dense_twin_on_a_tiny_vocabulary(target, method):
    case = random_case(16 if target.interpreted else 300, 7, 6, seed=11, gamma=0.3, method=method)
    args = (case.x, case.log_score, case.now, case.nxt, case.gamma, case.mask_id, case.seed, case.step)
    expected = hk.sampling.hybrid_step_ref(*args, row_ids=case.row_ids, method=method, final=case.final)
    assert torch.equal(step(case, target), expected)


@pytest.mark.parametrize("target", FUSED)
def test_paper_sized_vocabulary(target):
    vocab, mask_id = 50258, 50257
    limit = (2**63 - vocab) // vocab  # the largest row id with int64 element ids
    configurations = ((("analytic", 0.1, torch.bfloat16),) if target.interpreted else
                      tuple((m, g, d) for m, g in (("analytic", 0.05), ("euler", 0.5))
                            for d in (torch.float32, torch.bfloat16)))
    for method, gamma, dtype in configurations:
        case = random_case(4, vocab, mask_id, seed=3, dtype=dtype, gamma=gamma, method=method)
        case.x[:] = torch.tensor([mask_id, mask_id, 17, 50000])
        case.nxt[:] = case.now * 0.9
        case.row_ids = torch.tensor([0, 1, 123456789, limit])
        if target.interpreted:
            case = case.rows(slice(1, 3))
        assert_matches_reference(target, case)


@pytest.mark.parametrize("target", FUSED)
def test_vocabularies_that_are_not_a_multiple_of_a_tile(target, small_blocks):
    """The C++ kernel walks Philox pairs in tiles of 256 columns, the CUDA kernel in strides of a block, the
    Triton kernel in iterations of 16 columns here (small_blocks): rows that start on an odd element (odd
    row_id * V) begin with half a pair, and the last tile is partial. MASK first or last."""
    if target.interpreted:
        cases = [(2, 1, 0.3), (3, 0, 0.3), (17, 16, 0.3), (61, 30, 0.3)]
        row_ids = torch.tensor([0, 1, 10**9 + 7, 2**40 + 1, 5])
    else:
        cases = [(vocab, mask_id, 0.5) for vocab in (2, 3, 5, 127, 255, 256, 257, 258, 511, 513, 1001)
                 for mask_id in sorted({0, vocab - 1})]
        row_ids = torch.tensor([0, 1, 2, 3, 7, 2**31 - 1, 2**32 + 1, 10**12 + 3])
    for vocab, mask_id, gamma in cases:
        for method in METHODS:
            case = random_case(len(row_ids), vocab, mask_id, seed=vocab, gamma=gamma, scale=0.5, method=method,
                               minus_inf=0.1)
            case.row_ids = row_ids
            assert_matches_reference(target, case)


@pytest.mark.parametrize("target", EVERY)
def test_non_contiguous_log_scores(target):
    base = random_case(30, 620, 599, seed=6).log_score
    views = {  # applied to the base on each device, so the strides are the same on both
        "row stride, column slice": lambda b: b[::3, 10:610],
        "column stride 30 (transposed)": lambda b: b.t().contiguous().t()[5:15, :600],
        "column stride 2": lambda b: b[10:20, ::2][:, :300],
        "row stride 0": lambda b: b[0:1, :600].expand(10, 600),
        "bf16 transposed": lambda b: b.to(torch.bfloat16).t().contiguous().t()[0:10, :600],
        "fp16 column slice": lambda b: b.to(torch.float16)[20:30, 15:615],
    }
    if target.interpreted:  # the interpreter pays per row: one view of each kind of stride
        views = {name: views[name] for name in ("row stride, column slice", "column stride 30 (transposed)",
                                                "row stride 0", "bf16 transposed")}
    for name, view_of in views.items():
        view, ours = view_of(base), view_of(base.to(target.device))
        if target.interpreted:
            view, ours = view[:5], ours[:5]
        assert not ours.is_contiguous() and ours.stride() == view.stride(), name
        vocab = view.shape[1]
        case = random_case(view.shape[0], vocab, vocab - 1, seed=7, gamma=0.05)
        expected = draw(REFERENCE, replace(case, log_score=view.contiguous()))
        on = replace(case.on(target.device), log_score=ours)
        assert torch.equal(step(on, target), expected[0]), name
        if target != REFERENCE and not target.interpreted:
            assert_same_draw(draw(target, on), expected)


@pytest.mark.parametrize("target", EVERY)
@pytest.mark.parametrize("method", METHODS)
def test_draws_are_keyed_by_row_identity(target, method):
    if target.interpreted and method == "euler":
        pytest.skip("the keying of the draws does not depend on the method; the analytic case covers the interpreter")
    case = random_case(8 if target.interpreted else 64, 97, 96, seed=5, gamma=0.2, method=method)
    tokens, best = draw(target, case)
    order = torch.randperm(case.x.shape[0], generator=torch.Generator().manual_seed(1))[:5]
    assert_same_draw(draw(target, case.rows(order)), (tokens[order], best[order]))
    other = draw(target, replace(case, seed=case.seed - 1))
    assert not torch.equal(other[0], tokens)


@pytest.mark.parametrize("target", FUSED)
def test_large_row_ids_seeds_and_steps(target):
    vocab = 97 if target.interpreted else 50258
    limit = (2**63 - vocab) // vocab
    case = random_case(5, vocab, vocab - 1, seed=4, gamma=0.5)
    case.x[:] = vocab - 1  # every column weighed
    case.final[:] = False
    case.nxt[:] = case.now * 0.5
    # Element ids around the 2^32 and 2^33 counter-word boundaries, and at the very top of int64.
    case.row_ids = torch.tensor([2**32 // vocab, 2**33 // vocab, 2**33 // vocab + 1, limit - 1, limit])
    for seed, step_ in ((SEED_MAX, 2**32 - 1), (2**32 - 1, 0), (2**32, 2**32 + 5), (0, 7)):
        assert_matches_reference(target, replace(case, seed=seed, step=step_))


# ------------------------------------------------------------------ special log-scores


def special_cases():
    """Named cases of special log-scores."""
    cases = {}
    vocab, mask_id = 40, 39
    # -inf entries (a third of each row) and rows of ties: equal log-scores everywhere, or a tied maximum
    case = random_case(12, vocab, mask_id, seed=21, gamma=0.5)
    case.log_score[torch.rand(12, vocab, generator=torch.Generator().manual_seed(2)) < 0.33] = -INF
    case.log_score[3:6] = 0.0
    case.log_score[6:9] = 1.5
    case.log_score[9:12, [5, 20, 30]] = 40.0
    cases["minus_inf_and_ties"] = case
    # bf16 / fp16 round many scores to ties
    for dtype in (torch.bfloat16, torch.float16):
        cases[f"rounded_ties_{str(dtype)[6:]}"] = random_case(8, vocab, mask_id, seed=22, dtype=dtype, gamma=0.05,
                                                              scale=0.05)
    # ±1e4 (fp16's range ends at 65504): ratios e^{-2e4} vanish, the row maximum dominates; beyond e^709 (where
    # e^s overflows float64): the scaling by e^{-m} keeps every ratio in [0, 1]; -inf; rows of one value.
    g = torch.Generator().manual_seed(4)
    values = torch.tensor([1e4, -1e4, 0.0, 709.5, 750.0, -750.0, -INF, 3.0])
    extreme = values[torch.randint(0, len(values), (8, vocab), generator=g)]
    extreme[0] = 750.0
    extreme[1] = -1e4
    extreme[2] = 0.0
    extreme[3, [7, 20]] = 1e4
    for dtype in DTYPES:
        case = random_case(8, vocab, mask_id, seed=23, dtype=dtype, gamma=0.3)
        case.log_score = extreme.to(dtype)
        case.x[:] = torch.tensor([mask_id, 5, mask_id, 7, mask_id, 0, 38, mask_id])
        case.final[:] = torch.tensor([False, False, True, False, True, False, False, False])
        case.nxt[:] = case.now * 0.2
        cases[f"extreme_{str(dtype)[6:]}"] = case
    big = {torch.float16: 60000.0, torch.bfloat16: 1e30, torch.float32: 3e38, torch.float64: 1e300}
    for dtype in DTYPES:
        case = random_case(12, vocab, mask_id, seed=24, dtype=torch.float64, gamma=0.05, scale=1.0, offset=0.0)
        case.log_score[0:4] += 800.0
        case.log_score[4:8, 11] = big[dtype]
        case.log_score[8:12, 10:20] = 710.0 + torch.arange(10, dtype=torch.float64)
        case.log_score = case.log_score.to(dtype)
        cases[f"above_709_{str(dtype)[6:]}"] = case
    # every read entry -inf: masked rows (MASK wins unless final), real rows (x stays), final masked rows
    # (no weight: -inf, token 0)
    case = random_case(12, vocab, mask_id, seed=25, gamma=0.5)
    case.log_score[:] = -INF
    case.log_score[:, mask_id] = 3.0  # not read
    case.x[:] = torch.tensor([mask_id] * 8 + [0, 1, 38, 15])
    case.final[:] = torch.tensor([False] * 4 + [True] * 4 + [False, True, False, True])
    case.nxt[:] = case.now * 0.5
    cases["all_minus_inf"] = case
    # NaN and +inf at read entries (bad rows), and at the unread entries x and MASK (ignored)
    case = random_case(10, vocab, mask_id, seed=26, gamma=0.5)
    case.x[:] = torch.tensor([mask_id, mask_id, 3, 3, 3, 3, mask_id, 10, 20, mask_id])
    case.nxt[:] = case.now * 0.5
    case.log_score[0, 17] = math.nan
    case.log_score[1, [5, 29]] = INF
    case.log_score[2, 9] = math.nan
    case.log_score[2, 10] = INF
    case.log_score[3, 3] = math.nan    # x's column: not read
    case.log_score[4, mask_id] = INF   # MASK column of a real row: not read
    case.log_score[5, [3, mask_id]] = math.nan
    case.log_score[6, 0] = -INF        # -inf is allowed
    case.log_score[7, 10] = INF        # x's column
    case.log_score[8] = math.nan
    case.log_score[8, 20] = 0.0        # every read entry NaN
    case.log_score[9, mask_id] = math.nan  # x = MASK: the MASK column is x's, not read
    cases["nan_and_inf"] = case
    return cases


SPECIAL = special_cases()


@pytest.mark.parametrize("target", FUSED)
def test_special_log_scores_match_the_reference(target):
    for name, case in SPECIAL.items():
        if target.interpreted and name.startswith(("rounded", "above_709", "minus_inf_and_ties")):
            continue  # the interpreter pays per row: the "extreme" cases hold -inf, ties and scores above 709
        assert_matches_reference(target, case)


@pytest.mark.parametrize("target", EVERY)
def test_large_scores_do_not_overflow(target):
    """A masked row at γ = 0 with one log-score 1e4 (or 800, or 1e300) above the rest: every other ratio
    underflows to 0 and MASK's weight is clamped at 0, so that token is certain."""
    vocab, mask_id = 300, 299
    tops = ((torch.float16, 1e4), (torch.float32, 1e4), (torch.bfloat16, 800.0), (torch.float64, 1e300))
    for dtype, top in tops[::3] if target.interpreted else tops:  # the interpreter pays per row
        case = random_case(6, vocab, mask_id, seed=31, dtype=dtype, gamma=0.0)
        case.x[:] = mask_id
        case.nxt[:] = case.now * 0.5
        case.log_score = torch.zeros(6, vocab, dtype=dtype)
        columns = torch.tensor([0, 1, 128, 255, 256, 298])
        case.log_score[torch.arange(6), columns] = top
        tokens, best = draw(target, case)
        assert torch.equal(tokens, columns) and torch.isfinite(best).all()
    vocab, mask_id = 6, 5
    # e^{Δ} = e^{800} overflows float64; the weights only use e^{-(1-γ)Δ}, e^{-γΔ}
    tokens = hybrid_step(torch.tensor([5, 5, 1], device=target.device), torch.zeros(3, vocab, device=target.device),
                         800.0, 0.0, 0.01, mask_id, 0, 0, backend=target.name)
    assert not (tokens == mask_id).any()


@pytest.mark.parametrize("target", EVERY)
def test_rows_without_weight(target):
    case = SPECIAL["all_minus_inf"]
    tokens, best = draw(target, case)
    mask_id = case.mask_id
    assert tokens[0:4].tolist() == [mask_id] * 4                          # masked, not final: stays MASK
    assert tokens[4:8].tolist() == [0] * 4 and (best[4:8] == -INF).all()  # final MASK: no weight
    assert tokens[8:].tolist() == case.x[8:].tolist()                      # real rows keep x
    with pytest.raises(ValueError, match="row 1 has no token of positive probability.* 4 such row"):
        step(case, target, slice(3, None))
    # γ = 1 on a final masked row: MASK is unreachable, so nothing has weight either way.
    with pytest.raises(ValueError, match="no token of positive probability"):
        hybrid_step(torch.tensor([4], device=target.device), torch.zeros(1, 5, device=target.device), 2.0, 0.0, 1.0,
                    4, 3, 3, backend=target.name)


@pytest.mark.parametrize("target", EVERY)
def test_subnormal_weights_count_as_zero(target):
    # Euler on final masked rows (no MASK weight) with a subnormal step: w_y = Δ · r'_y. Row 0: every weight
    # subnormal (no token); row 1: only column 3 (r' = 1) is normal, the rest are subnormal.
    vocab, mask_id = 20, 19
    log_score = torch.full((2, vocab), -23.0, dtype=torch.float64)
    log_score[:, 3] = 0.0
    log_score[0] = 0.0
    case = Case(torch.tensor([mask_id, mask_id]), log_score, torch.tensor([2e-310, 2e-300], dtype=torch.float64),
                torch.tensor([1e-310, 1e-300], dtype=torch.float64), 0.0, mask_id, torch.tensor([True, True]),
                torch.arange(2), "euler", 7, 7)
    tokens, best = draw(target, case)
    assert best[0] == -INF and tokens.tolist() == [0, 3]
    if target != REFERENCE:
        assert_same_draw((tokens, best), draw(REFERENCE, case))


@pytest.mark.parametrize("target", EVERY)
def test_nan_and_plus_inf_raise(target):
    case = SPECIAL["nan_and_inf"]
    tokens, best = draw(target, case)
    bad = torch.tensor([True, True, True, False, False, False, False, False, True, False])
    assert torch.equal(best.isnan(), bad)
    assert torch.isfinite(best[~bad]).all()
    for dtype in (torch.bfloat16,) if target.interpreted else (torch.float32, torch.bfloat16):
        poisoned = replace(case, log_score=case.log_score.to(dtype))
        with pytest.raises(ValueError, match="log_score must hold finite values or -inf.*row 0 does not "
                                             r"\(4 such row"):
            step(poisoned, target)
        with pytest.raises(ValueError, match="row 1 does not"):
            step(poisoned, target, slice(7, None))
        assert torch.equal(step(poisoned, target, slice(3, 8)), step(poisoned, REFERENCE, slice(3, 8)))


@pytest.mark.parametrize("target", EVERY)
def test_empty_input_and_log_scores_are_not_modified(target):
    case = random_case(3, 20, 19, seed=1, dtype=torch.float64).on(target.device)
    tokens, best = draw(target, case.rows(slice(0, 0)))
    assert tokens.shape == (0,) and best.shape == (0,)
    assert step(case, target, slice(0, 0)).shape == (0,)
    before = case.log_score.clone()
    step(case, target)
    assert torch.equal(case.log_score, before)


def test_cpp_result_does_not_depend_on_the_thread_count():
    target = Target("hybrid_step", "cpp", "cpu")
    if not target.implementation.available("cpu"):
        pytest.skip(target.implementation.unavailable_reason("cpu"))
    case = random_case(40, 2000, 1999, seed=11, gamma=0.05)  # above the parallel threshold
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = draw(target, case)
        torch.set_num_threads(2)
        multi = draw(target, case)
    finally:
        torch.set_num_threads(threads)
    assert_same_draw(multi, single)
    assert_same_draw(multi, draw(REFERENCE, case))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(log_score=torch.zeros(3, 4, dtype=torch.int32)),
         "log_score must have dtype float32, float64, float16 or bfloat16, got Int"),
        (dict(log_score=torch.zeros(12)), r"log_score must have shape \[R, V\], got shape \[12\]"),
        (dict(log_score=torch.zeros(3, 0)), r"log_score must have 1 <= V < 2\^31 tokens, got V = 0"),
        (dict(log_score=torch.zeros(3, 4, device="meta")), "log_score must be on CPU, got a tensor on meta"),
        (dict(x=torch.tensor([0, 3, 1], dtype=torch.int32)), r"x must be an int64 tensor \[R\] = \[3\], got Int"),
        (dict(x=torch.tensor([0, 3])), r"x must be an int64 tensor \[R\] = \[3\], got Long of shape \[2\]"),
        (dict(x=torch.tensor([0, 4, 1])), r"x must hold token ids in \[0, V\) = \[0, 4\), got 4 at position 1"),
        (dict(x=torch.tensor([0, 3, -1])), r"x must hold token ids in \[0, V\) = \[0, 4\), got -1 at position 2"),
        (dict(x=torch.tensor([0, 3, 1], device="meta")), "x must be on log_score's device cpu, got meta"),
        (dict(coefficients=torch.zeros(3, 6)),
         r"coefficients must be a float64 tensor \[R, 6\] = \[3, 6\], got Float of shape \[3, 6\]"),
        (dict(coefficients=torch.zeros(3, 5, dtype=torch.float64)),
         r"coefficients must be a float64 tensor .*got Double of shape \[3, 5\]"),
        (dict(row_ids=torch.arange(3, dtype=torch.int32)), r"row_ids must be an int64 tensor \[R\] = \[3\], got Int"),
        (dict(row_ids=torch.arange(4)), r"row_ids must be an int64 tensor \[R\] = \[3\], got Long of shape \[4\]"),
        (dict(row_ids=torch.tensor([0, -1, 2])),
         r"row_ids must be in \[0, 2305843009213693951\] for V = 4 .*got -1 at position 1"),
        (dict(row_ids=torch.tensor([0, 2**62, 2])), "row_ids must be in .*got 4611686018427387904"),
        (dict(mask_id=4), r"mask_id must be in \[0, V\) = \[0, 4\), got 4"),
        (dict(mask_id=-1), r"mask_id must be in \[0, V\) = \[0, 4\), got -1"),
        (dict(step=-1), "step must be >= 0, got -1"),
    ],
)
def test_cpp_operator_errors_name_the_argument(change, match):
    if _extension._C is None or not hasattr(_extension._C, "hybrid_step_cpu"):
        pytest.skip(f"hdlm_kernels._C has no hybrid_step_cpu: {_extension.missing_reason}")
    arguments = dict(log_score=torch.zeros(3, 4), x=torch.tensor([0, 3, 1]),
                     coefficients=torch.zeros(3, 6, dtype=torch.float64), row_ids=torch.arange(3), mask_id=3,
                     seed=SEED_MAX, step=1)
    arguments.update(change)
    with pytest.raises(RuntimeError, match="hybrid_step: " + match):
        _extension._C.hybrid_step_cpu(**arguments)


def test_cpp_operator_takes_the_whole_seed_range():
    target = Target("hybrid_step", "cpp", "cpu")
    if not target.implementation.available("cpu"):
        pytest.skip(target.implementation.unavailable_reason("cpu"))
    case = random_case(5, 30, 29, seed=2)
    for seed in (0, SEED_MAX):
        assert_matches_reference(target, replace(case, seed=seed))


# ------------------------------------------------------------------ torch.compile through the custom op


def _compiles_without_graph_breaks(target):
    case = random_case(6, 20, 19, seed=3, gamma=0.2)
    expected = hk.sampling.hybrid_step_ref(case.x, case.log_score, case.now, case.nxt, case.gamma, case.mask_id,
                                           case.seed, case.step, case.row_ids, final=case.final)
    on = case.on(target.device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def reverse_step(x, log_score, now, nxt, row_ids, final):
        return hybrid_step(x, log_score * 1.0, now, nxt, case.gamma, case.mask_id, case.seed, case.step, row_ids,
                           final=final, backend=target.name) + 0

    got = reverse_step(on.x, on.log_score, on.now, on.nxt, on.row_ids, on.final)
    assert torch.equal(got.cpu(), expected)


def test_compiles_without_graph_breaks_on_the_cpu_with_the_cpp_backend():
    target = Target("hybrid_step", "cpp", "cpu")
    if not target.implementation.available("cpu"):
        pytest.skip(target.implementation.unavailable_reason("cpu"))
    _compiles_without_graph_breaks(target)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_compiles_without_graph_breaks_on_the_gpu(name):
    _compiles_without_graph_breaks(Target("hybrid_step", name, "cuda"))


def test_argument_checks_run_once_per_call():
    """The metadata checks run in hybrid_step, the value checks inside the op: each once per call."""
    case = random_case(5, 12, 11, seed=4)
    checkers = ("_checked_inputs", "_check_values", "check_row_id_values", "_check_drawn", "checked_row_ids")
    counts, selected = calls_during(hybrid_module, checkers, lambda: step(case, REFERENCE))
    assert counts == dict.fromkeys(checkers, 1)
    assert selected.count("hybrid_step") == 1


# ------------------------------------------------------------------ the Triton kernel's GPU code, compiled without a GPU

_PTX_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hdlm_kernels.sampling import triton_hybrid, triton_stream

found = {"f64": set(), "literals": set(), "cvt_to_int": set()}
for dtype in ("bf16", "fp32", "fp64"):
    signature = {"LOG_SCORE": "*" + dtype, "X": "*i64", "COEFFICIENTS": "*fp64", "ROW_IDS": "*i64",
                 "CONSTS": "*fp64", "TOKENS": "*i64", "BEST": "*fp64", "stride_row": "i32",
                 "stride_col": "i32", "vocab": "i32", "mask_id": "i32", "key0": "i64", "key1": "i64",
                 "step_lo": "i64", "BLOCK_P": "constexpr"}
    source = ASTSource(fn=triton_hybrid._hybrid_step_kernel, signature=signature,
                       constexprs={"BLOCK_P": triton_hybrid.GPU_BLOCK_PAIRS})
    warps = max(1, min(triton_hybrid.MAX_WARPS, triton_hybrid.GPU_BLOCK_PAIRS // triton_hybrid.PAIRS_PER_WARP))
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=triton_stream.launch_options(warps))
    ptx = kernel.asm["ptx"]
    found["f64"] |= set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.f64\b", ptx))
    found["literals"] |= set(re.findall(r"\b0d[0-9A-F]{16}\b", ptx))
    found["cvt_to_int"] |= set(re.findall(r"\bcvt(?:\.[a-z0-9]+)*\.[su]\d+\.f64\b", ptx))
json.dump({k: sorted(v) for k, v in found.items()}, sys.stdout)
"""


def test_triton_gpu_code_has_no_fma_and_only_exact_float64_literals(tmp_path):
    """Compiles the hybrid step kernel for sm_90 with the launch options of the module (no GPU needed) and
    checks what bit-identity on the GPU rests on: no fused multiply-add, IEEE round-to-nearest float64
    arithmetic, truncating float -> int conversions (exp64's k, the fixed-point digits), and no float64
    constant but exact ones (the coefficients and scales come from a float64 tensor)."""
    pytest.importorskip("triton")
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


# ------------------------------------------------------------------ GPU: paper-sized batches


@pytest.mark.cuda
@pytest.mark.parametrize("target", [p for p in FUSED if p.values[0].kind == "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_paper_sized_batch_equals_the_reference_on_both_devices(target, dtype):
    vocab, mask_id = 50258, 50257
    gpu_reference = Target("hybrid_step", "reference", "cuda")
    for method, gamma in (("analytic", 0.05), ("euler", 0.5), ("analytic", 0.0)):
        case = random_case(512, vocab, mask_id, seed=1, dtype=dtype, gamma=gamma, method=method, minus_inf=0.01)
        case.row_ids = torch.arange(512) * 17 + 3
        ours = draw(target, case)
        assert_same_draw(ours, draw(gpu_reference, case))
        some = slice(0, 8)  # across devices: the reference on the CPU
        assert_same_draw((ours[0][some], ours[1][some]), draw(REFERENCE, case.rows(some)))
        fine = torch.isfinite(ours[1])
        assert torch.equal(step(case, target, fine), ours[0][fine])
