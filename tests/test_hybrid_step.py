"""hk.sampling.hybrid_step: one reverse step of the γ-hybrid process (paper §3.2, App. A Eq. 7g, B.4).

The key check builds the generator Q from its definition on a tiny vocabulary, computes the exact
reverse transition q(x_s | x_t) by Bayes with dense matrix exponentials for a known x0 distribution,
and compares it with the analytic step fed the TRUE log-ratios log p_t(y)/p_t(x).
"""

import math

import pytest
import scipy.linalg
import torch
from scipy import stats

import hdlm_kernels as hk
from hdlm_kernels.sampling.hybrid import hybrid_probs, hybrid_probs_ref

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
    """notes §3.1.2: (1-γ)·absorb(Δ) + γ·uniform(Δ) with the full Δ in both is not the exact step."""
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
    tokens = hk.sampling.hybrid_step(*args, 123, 4, row_ids=row_ids, method=method, final=final)
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
    with pytest.raises(ValueError, match="backend must be one of"):
        step(x, s, 1.0, 0.5, 0.1, 4, 0, 0, backend="gpu")
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


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_deferred_step_is_the_same_step_and_reports_bad_rows_instead_of_raising(backend):
    vocab, mask_id = 9, 8
    x, log_score, now, nxt, final = random_inputs(64, vocab, mask_id, seed=12)
    row_ids = torch.arange(64) * 3 + 1
    args = (x, log_score, now, nxt, 0.1, mask_id, 5, 6, row_ids)
    tokens, failed = hk.sampling.hybrid_step_deferred(*args, final=final, backend=backend)
    assert torch.equal(tokens, hk.sampling.hybrid_step(*args, final=final, backend="reference"))
    assert not bool(failed)
    log_score[3, (int(x[3]) + 1) % mask_id] = math.nan
    assert bool(hk.sampling.hybrid_step_deferred(*args, final=final, backend=backend)[1])
    with pytest.raises(ValueError, match="log_score must hold finite values or -inf"):
        hk.sampling.hybrid_step(*args, final=final, backend=backend)
    with pytest.raises(TypeError, match="row_ids must be an int64 tensor"):
        hk.sampling.hybrid_step_deferred(*args[:-1], row_ids.int(), backend=backend)
