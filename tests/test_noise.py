"""Noise schedules and forward processes (paper §3.2, App. A): closed forms against a dense
matrix exponential of generators written here from their definitions, and sampled frequencies
against the closed forms (chi-square)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hdlm_reference import noise as nz

SIGMAS = [0.0, 1e-3, 0.3, 1.0, 2.5, 8.0]
GAMMAS = [0.01, 0.3, 0.7, 0.99]


# ----------------------------------------------------------------------------- dense definitions
def q_absorb(V):
    """Q_Absorb (column convention, Q[y, x] = rate x -> y): real x goes to MASK = V-1 at rate 1."""
    N = V - 1
    q = torch.zeros(V, V, dtype=torch.float64)
    for x in range(N):
        q[x, x] = -1.0
        q[N, x] = 1.0
    return q


def q_uniform(V):
    """Q_Uniform over the N = V-1 real tokens, MASK row and column zero (official QGamma)."""
    N = V - 1
    q = torch.zeros(V, V, dtype=torch.float64)
    for x in range(N):
        for y in range(N):
            q[y, x] = 1.0 / N - (1.0 if x == y else 0.0)
    return q


def dense_generator(process):
    V = process.vocab_size
    if isinstance(process, nz.Absorb):
        return q_absorb(V)
    if isinstance(process, nz.Uniform):
        return q_uniform(V)
    g = process.gamma
    return (1 - g) * q_absorb(V) + g * q_uniform(V)


def sedd_processes(V):
    return [nz.Absorb(V), nz.Uniform(V)] + [nz.GammaHybrid(V, g) for g in GAMMAS]


# ----------------------------------------------------------------------------- noise schedules
def test_loglinear_values_and_derivative():
    noise = nz.LogLinearNoise(eps=1e-3)
    t = torch.linspace(0, 1, 101, dtype=torch.float64, requires_grad=True)
    sigma, dsigma = noise(t)
    assert sigma[0].item() == 0.0
    assert torch.allclose(sigma, -torch.log(1 - (1 - 1e-3) * t.detach()), rtol=1e-12)
    # masking probability is linear in t, and dσ̄/(e^σ̄ - 1) = 1/t
    assert torch.allclose(-torch.expm1(-sigma), (1 - 1e-3) * t, rtol=1e-12)
    assert torch.allclose(dsigma[1:] / torch.expm1(sigma[1:]), 1 / t[1:].detach(), rtol=1e-9)
    (grad,) = torch.autograd.grad(sigma.sum(), t)
    assert torch.allclose(grad, dsigma, rtol=1e-12)
    assert math.isclose(sigma[-1].item(), -math.log(1e-3), rel_tol=1e-12)
    assert noise(torch.tensor([0.5], dtype=torch.float32))[0].dtype == torch.float32
    assert torch.equal(noise.sigma_bar(t.detach()), sigma.detach())
    assert torch.equal(noise.dsigma_bar(t.detach()), dsigma.detach())


def test_official_eps_constant():
    t = torch.tensor([0.5, 0.999, 0.9999], dtype=torch.float64)
    sigma, dsigma = nz.LogLinearNoise(nz.OFFICIAL_LOGLINEAR_EPS)(t)
    # numbers quoted in docs/official-code.md §2 for the official schedule
    assert torch.allclose(sigma, torch.tensor([0.688, 5.117, 5.279], dtype=torch.float64), atol=1e-3)
    assert torch.allclose(dsigma[1:], torch.tensor([166.0, 195.1], dtype=torch.float64), rtol=1e-3)


def test_geometric_values_and_derivative():
    noise = nz.GeometricNoise(1e-4, 20.0)
    t = torch.linspace(0, 1, 11, dtype=torch.float64, requires_grad=True)
    sigma, dsigma = noise(t)
    assert torch.allclose(sigma, 1e-4 ** (1 - t.detach()) * 20.0 ** t.detach(), rtol=1e-12)
    (grad,) = torch.autograd.grad(sigma.sum(), t)
    assert torch.allclose(grad, dsigma, rtol=1e-12)


@pytest.mark.parametrize("make, match", [
    (lambda: nz.LogLinearNoise(0.0), "eps must be in"),
    (lambda: nz.LogLinearNoise(1.0), "eps must be in"),
    (lambda: nz.GeometricNoise(1.0, 0.5), "sigma_min < sigma_max"),
    (lambda: nz.LogLinearNoise()(torch.tensor([1.5])), r"t must lie in \[0, 1\]"),
    (lambda: nz.GammaHybrid(6, 0.0), r"gamma must be in \(0, 1\).*got 0.0"),
    (lambda: nz.GammaHybrid(6, 1.2), r"gamma must be in \(0, 1\).*got 1.2"),
    (lambda: nz.EpsilonHybrid(6, -0.1), r"epsilon must be in \[0, 1\].*got -0.1"),
    (lambda: nz.EpsilonHybrid(6, 1.5), r"epsilon must be in \[0, 1\]"),
    (lambda: nz.Absorb(1), "vocab_size must be >= 2"),
    (lambda: nz.Absorb(6).sample(torch.tensor([0, 6]), 1.0), r"x0 token ids must lie in \[0, 5\].*\[0, 6\]"),
    (lambda: nz.Absorb(6).sample(torch.tensor([0, -1]), 1.0), r"x0 token ids must lie in \[0, 5\]"),
    (lambda: nz.Absorb(6).sample(torch.tensor([0, 1]), -1.0), "sigma_bar must be >= 0"),
    (lambda: nz.Absorb(6).sample(torch.tensor([0, 1.0]), 1.0), "integer tensor"),
])
def test_errors_name_the_argument(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


# ----------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("V", [5, 7])
def test_sedd_closed_forms_match_matrix_exp(V):
    for process in sedd_processes(V):
        q = dense_generator(process)
        assert torch.allclose(process.rate_matrix(), q, atol=0)
        for sigma in SIGMAS:
            expected = torch.linalg.matrix_exp(sigma * q)
            got = process.transition_matrix(sigma)
            assert torch.allclose(got, expected, atol=1e-13, rtol=1e-12), (process, sigma)
            # transition_prob rows are the columns, for a batch of x0 at once
            x0 = torch.arange(V)
            rows = process.transition_prob(x0, torch.full((V,), sigma))
            assert torch.allclose(rows, expected.T, atol=1e-13)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_gamma_hybrid_eq7g_and_commutation(gamma):
    # Eqs. 3, 6 and the product form 7d = 7g, with Δ split as (1-γ)Δ and γΔ
    V = 6
    qa, qu = q_absorb(V), q_uniform(V)
    assert torch.allclose(qa @ qa, -qa) and torch.allclose(qu @ qu, -qu)
    assert torch.allclose(qu @ qa, -qu) and torch.allclose(qa @ qu, -qu)
    eye = torch.eye(V, dtype=torch.float64)
    for delta in SIGMAS:
        a = math.exp(-(1 - gamma) * delta)
        eq7g = eye + (1 - a) * qa + (a - math.exp(-delta)) * qu
        assert torch.allclose(nz.GammaHybrid(V, gamma).transition_matrix(delta), eq7g, atol=1e-14)
        A, B = nz.GammaHybrid(V, gamma).decays(torch.tensor(delta, dtype=torch.float64))
        assert math.isclose(A.item(), a) and math.isclose(B.item(), math.exp(-gamma * delta))


@pytest.mark.parametrize("epsilon", [0.0, 0.01, 0.4, 1.0])
def test_epsilon_hybrid_closed_form(epsilon):
    V = 6
    process = nz.EpsilonHybrid(V, epsilon)
    eye = torch.eye(V, dtype=torch.float64)
    for sigma in SIGMAS:
        got = process.transition_matrix(sigma)
        if sigma == 0:
            assert torch.equal(got, eye)  # level 0: clean, no shuffling
            continue
        # (1 + εQ_U)(1 + (1-α)Q_A), the second factor as e^{σ̄ Q_A}
        expected = (eye + epsilon * q_uniform(V)) @ torch.linalg.matrix_exp(sigma * q_absorb(V))
        assert torch.allclose(got, expected, atol=1e-14)
        p_mask, p_shuffle, p_keep = process.event_probs(torch.tensor(sigma, dtype=torch.float64))
        alpha = math.exp(-sigma)
        assert math.isclose(p_mask.item(), 1 - alpha, rel_tol=1e-12)
        assert math.isclose(p_shuffle.item(), alpha * epsilon, rel_tol=1e-12, abs_tol=1e-300)
        assert math.isclose(p_keep.item(), alpha * (1 - epsilon), rel_tol=1e-12, abs_tol=1e-300)


def test_event_probs_sum_to_one_and_large_sigma():
    sigma = torch.tensor([0.0, 1e-8, 1.0, 50.0, float("inf")], dtype=torch.float64)
    for process in sedd_processes(6) + [nz.EpsilonHybrid(6, 0.1)]:
        probs = torch.stack(process.event_probs(sigma))
        assert torch.isfinite(probs).all(), process
        assert torch.allclose(probs.sum(0), torch.ones(5, dtype=torch.float64))
    # small σ̄: expm1 keeps the masking probability accurate
    tiny = torch.tensor(1e-12, dtype=torch.float64)
    assert math.isclose(nz.Absorb(6).mask_prob(tiny).item(), 1e-12, rel_tol=1e-9)


# ----------------------------------------------------------------------------- sampling
def _chi2_check(samples, probs, V):
    counts = np.bincount(samples.numpy(), minlength=V).astype(np.float64)
    expected = probs.numpy() * counts.sum()
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token of probability 0"
    if support.sum() > 1:
        assert chisquare(counts[support], expected[support]).pvalue > 1e-4


@pytest.mark.parametrize("make", [lambda V: nz.Absorb(V), lambda V: nz.Uniform(V),
                                  lambda V: nz.GammaHybrid(V, 0.3), lambda V: nz.GammaHybrid(V, 0.9),
                                  lambda V: nz.EpsilonHybrid(V, 0.25)],
                         ids=["absorb", "uniform", "gamma0.3", "gamma0.9", "epsilon0.25"])
def test_sample_frequencies_match_closed_form(make):
    V, n = 6, 40_000
    process = make(V)
    g = torch.Generator().manual_seed(1234)
    # several (x0, σ̄) cases in ONE vectorized call, with per-position σ̄
    cases = [(0, 0.2), (3, 1.0), (4, 3.0), (V - 1, 1.0)]
    x0 = torch.tensor([c[0] for c in cases]).repeat_interleave(n).reshape(len(cases), n)
    sigma = torch.tensor([c[1] for c in cases]).repeat_interleave(n).reshape(len(cases), n)
    x_t, events = process.sample(x0, sigma, g, return_events=True)
    assert x_t.shape == x0.shape and x_t.dtype == torch.long
    for k, (tok, s) in enumerate(cases):
        probs = process.transition_prob(torch.tensor(tok), torch.tensor(s, dtype=torch.float32))
        _chi2_check(x_t[k], probs, V)
        p_mask, p_shuffle, _ = process.event_probs(torch.tensor(s, dtype=torch.float32))
        if tok == V - 1:
            assert not events.masked[k].any() and not events.shuffled[k].any()
            continue
        # events are consistent with the outcome and have the closed-form rates (5 sigma)
        assert (x_t[k][events.masked[k]] == V - 1).all()
        assert (x_t[k][~events.masked[k] & ~events.shuffled[k]] == tok).all()
        for event, p in ((events.masked[k], p_mask), (events.shuffled[k], p_shuffle)):
            observed = event.double().mean()
            assert abs(observed.item() - p.item()) <= 5 * math.sqrt(p.item() * (1 - p.item()) / n) + 1e-12
        # a shuffle may draw the original token back (the paper's "shuffled" includes it)
        if p_shuffle > 0.05:
            assert (x_t[k][events.shuffled[k]] == tok).any()


def test_level_zero_is_clean_and_mask_absorbs():
    V = 6
    x0 = torch.arange(V).repeat(500)
    for process in sedd_processes(V) + [nz.EpsilonHybrid(V, 0.5), nz.EpsilonHybrid(V, 1.0)]:
        g = torch.Generator().manual_seed(0)
        assert torch.equal(process.sample(x0, 0.0, g), x0)
        x_t = process.sample(x0, 30.0, g)
        assert (x_t[x0 == V - 1] == V - 1).all()


def test_sampling_is_deterministic_and_vocabulary_sized_tensors_are_not_needed():
    # V = 50258 (the official vocabulary): sampling draws per position only; this would take
    # B·L·V·8 bytes = 3 GB if a [B, L, V] float64 tensor were materialized.
    V = 50258
    process = nz.GammaHybrid(V, 0.01)
    x0 = torch.randint(0, V - 1, (8, 1024), generator=torch.Generator().manual_seed(0))
    sigma = nz.LogLinearNoise()(torch.rand(8, 1024, generator=torch.Generator().manual_seed(1)))[0]
    a = process.sample(x0, sigma, torch.Generator().manual_seed(7))
    b = process.sample(x0, sigma, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) <= V - 1
    masked = (a == V - 1).double().mean().item()
    assert abs(masked - process.mask_prob(sigma).mean().item()) < 0.01


def test_sample_prior():
    g = torch.Generator().manual_seed(0)
    for process in [nz.Absorb(6), nz.GammaHybrid(6, 0.1), nz.EpsilonHybrid(6, 0.1)]:
        assert (process.sample_prior((3, 4), g) == 5).all()
    prior = nz.Uniform(6).sample_prior((20_000,), g)
    assert int(prior.max()) <= 4
    _chi2_check(prior, torch.tensor([0.2] * 5 + [0.0], dtype=torch.float64), 6)
