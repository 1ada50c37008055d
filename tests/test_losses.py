"""Losses (App. B.2, Eqs. 8-11; SEDD's DWDSE): the O(n·V) closed forms against brute-force sums
written here over a dense generator and its matrix exponential, and the training entry points
against per-cell recomputation."""

import math

import pytest
import torch
import torch.nn.functional as F

import hdlm_kernels as hk
from hdlm_kernels.packing import IGNORE_INDEX
from hdlm_reference import losses as L
from hdlm_reference import noise as nz

BOS = 4


# ----------------------------------------------------------------------------- brute force
def dense_generator(V, gamma):
    """(1-γ)Q_Absorb + γQ_Uniform, column convention (Q[y, x] = rate x -> y), MASK = V-1."""
    N = V - 1
    qa = torch.zeros(V, V, dtype=torch.float64)
    qu = torch.zeros(V, V, dtype=torch.float64)
    for x in range(N):
        qa[x, x], qa[N, x] = -1.0, 1.0
        for y in range(N):
            qu[y, x] = 1.0 / N - (x == y)
    return (1 - gamma) * qa + gamma * qu


def brute_score_entropy(Q, sigma, s, x, x0):
    """Σ_{y≠x} Q[x, y] (e^{s_y} - r_y s_y + K(r_y)), r_y = p(y|x0)/p(x|x0), p = e^{σ̄Q} (SEDD, Thm 3.6)."""
    P = torch.linalg.matrix_exp(sigma * Q)
    r = P[:, x0] / P[x, x0]
    total = s.new_zeros(())
    for y in range(Q.shape[0]):
        if y == x or Q[x, y] == 0:
            continue
        k = 0.0 if r[y] == 0 else r[y] * (math.log(r[y]) - 1)
        total = total + Q[x, y] * (torch.exp(s[y]) - r[y] * s[y] + k)
    return total


HYBRID_GAMMAS = (0.01, 0.2, 0.6, 0.95)
PROCESSES = [nz.Absorb, nz.Uniform] + [lambda V, g=g: nz.GammaHybrid(V, g) for g in HYBRID_GAMMAS]
PROCESS_IDS = ["absorb", "uniform"] + [f"gamma{g}" for g in HYBRID_GAMMAS]


def reachable_cases(process, V, gen, count):
    """(x, x0, σ̄) with p(x | x0) > 0: all reachable pairs for a few σ̄, plus MASK inputs."""
    cases = []
    for _ in range(count):
        sigma = float(torch.exp(torch.empty(()).uniform_(math.log(1e-3), math.log(8.0), generator=gen)))
        x0 = int(torch.randint(0, V - 1, (), generator=gen))
        row = process.transition_prob(torch.tensor(x0), torch.tensor(sigma, dtype=torch.float64))
        for x in range(V):
            if row[x] > 0:
                cases.append((x, x0, sigma))
    cases.append((V - 1, V - 1, 0.7))  # a MASK input stays MASK: r = 0 for every y
    return cases


# ----------------------------------------------------------------------------- DWDSE
@pytest.mark.parametrize("make", PROCESSES, ids=PROCESS_IDS)
@pytest.mark.parametrize("V", [5, 7])
def test_score_entropy_matches_brute_force(make, V):
    process = make(V)
    gen = torch.Generator().manual_seed(V)
    Q = dense_generator(V, process.gamma)
    cases = reachable_cases(process, V, gen, 6)
    n = len(cases)
    x = torch.tensor([c[0] for c in cases])
    x0 = torch.tensor([c[1] for c in cases])
    sigma = torch.tensor([c[2] for c in cases], dtype=torch.float64)
    dsigma = torch.rand(n, generator=gen, dtype=torch.float64) * 3
    scores = (torch.randn(n, V, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    got = L.dwdse(process, scores, x, x0, sigma, dsigma)
    expected = torch.stack([dsigma[i] * brute_score_entropy(Q, sigma[i].item(), scores[i], int(x[i]),
                                                            int(x0[i])) for i in range(n)])
    assert got.dtype == torch.float64
    # the tolerance is the brute force's: matrix_exp's absolute error, divided by a small p(x|x0)
    # (the closed form agrees with a 50-digit evaluation to ~1e-16)
    assert torch.allclose(got, expected, rtol=1e-7, atol=1e-9)
    # gradients agree too (and are free of NaN from the unreachable branches)
    g_got, = torch.autograd.grad(got.sum(), scores)
    g_exp, = torch.autograd.grad(expected.sum(), scores)
    assert torch.isfinite(g_got).all()
    assert torch.allclose(g_got, g_exp, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("make", PROCESSES, ids=PROCESS_IDS)
def test_score_entropy_vanishes_at_true_ratios(make):
    V = 6
    process = make(V)
    gen = torch.Generator().manual_seed(3)
    for x, x0, sigma in reachable_cases(process, V, gen, 4)[:-1]:
        row = process.transition_prob(torch.tensor(x0), torch.tensor(sigma, dtype=torch.float64))
        # the exact conditional score log p_t(y)/p_t(x)
        s = torch.log(row / row[x]).clamp_min(-50.0).requires_grad_()
        args = (torch.tensor([x]), torch.tensor([x0]), torch.tensor([sigma]))
        se = L.score_entropy(process, s.unsqueeze(0), *args)
        assert abs(se.item()) < 1e-9 * max(1.0, row.max().item() / row[x].item())
        g, = torch.autograd.grad(se.sum(), s)
        assert g.abs().max() < 1e-8
        # and positive elsewhere, unless no rate leads into x (absorb: unmasked x; uniform: MASK)
        worse = L.score_entropy(process, (s.detach() + 0.3).unsqueeze(0), *args)
        no_rate = (process.gamma == 0 and x != V - 1) or (process.gamma == 1 and x == V - 1)
        assert worse.item() == 0 if no_rate else worse.item() > 0


def official_score_entropy(V, gamma, s, x, x0, sigma):
    """The official score_entropy formulas (docs/official-code.md §5), both branches at the FULL σ̄."""
    N = V - 1
    e = math.expm1(sigma)
    if x == N:
        r_a = 1 / e
        return (1 - gamma) * (torch.exp(s[:N]).sum() - r_a * s[x0] + r_a * (math.log(r_a) - 1))
    r_u = 1 - N / (e + N)
    neg_c = s[:N].mean() - s[x] / N
    pos_c = torch.exp(s[:N]).mean() - torch.exp(s[x]) / N
    if x == x0:
        return gamma * (pos_c - r_u * neg_c + (N - 1) / N * r_u * (math.log(r_u) - 1))
    return gamma * (pos_c - (neg_c + s[x0] / e) + ((-math.log(r_u) - 1) / r_u - (N - 2)) / N)


def test_pure_processes_match_sedd_formulas_and_hybrid_differs_from_official():
    V = 7
    gen = torch.Generator().manual_seed(11)
    for process, gamma_official in ((nz.Absorb(V), 0.0), (nz.Uniform(V), 1.0)):
        for x, x0, sigma in reachable_cases(process, V, gen, 5)[:-1]:
            s = torch.randn(V, generator=gen, dtype=torch.float64)
            args = (torch.tensor([x]), torch.tensor([x0]), torch.tensor([sigma]))
            ours = L.score_entropy(process, s[None], *args)
            if process.gamma == 0 and x != V - 1:
                assert ours.item() == 0.0  # absorb: an unmasked token has no incoming rate
                continue
            official = official_score_entropy(V, gamma_official, s, x, x0, sigma)
            assert math.isclose(ours.item(), official.item(), rel_tol=1e-9, abs_tol=1e-9)
    # γ-hybrid: the official full-σ̄ branches are an approximation of the exact Eq. 7g ratios
    process = nz.GammaHybrid(V, 0.3)
    s = torch.randn(V, generator=gen, dtype=torch.float64)
    for x, x0 in ((V - 1, 2), (2, 2), (3, 2)):
        ours = L.score_entropy(process, s[None], torch.tensor([x]), torch.tensor([x0]), torch.tensor([1.0]))
        official = official_score_entropy(V, 0.3, s, x, x0, 1.0)
        assert abs(ours.item() - official.item()) > 1e-3


def test_score_entropy_at_official_vocabulary_size():
    # V = 50258 in float32, against a direct dense-row evaluation in float64 (O(n·V) both)
    V, n = 50258, 16
    process = nz.GammaHybrid(V, 0.01)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, V - 1, (n,), generator=gen)
    sigma = nz.LogLinearNoise()(torch.rand(n, generator=gen, dtype=torch.float64) * 0.98 + 0.01)[0]
    x = process.sample(x0, sigma, gen)
    x[:3] = V - 1                      # make sure all branches are present
    x[3] = x0[3]
    x[4] = (x0[4] + 1) % (V - 1)
    logits = torch.randn(n, V, generator=gen)
    log_score = L.gamma_log_score(logits, sigma, x)
    got = L.score_entropy(process, log_score, x, x0, sigma)
    assert got.dtype == torch.float32
    probs = process.transition_prob(x0, sigma)               # [n, V] float64
    r = probs / probs.gather(1, x[:, None])
    ids = torch.arange(V)
    rate = torch.where(x[:, None] == V - 1, 1 - process.gamma, process.gamma / (V - 1)) * \
        ((ids[None] < V - 1) & (ids[None] != x[:, None]))
    s64 = log_score.double()
    expected = (rate * (s64.exp() - r * s64 + torch.xlogy(r, r) - r)).sum(1)
    assert torch.allclose(got.double(), expected, rtol=2e-5, atol=1e-3)


# ----------------------------------------------------------------------------- score parametrization
def test_gamma_log_score():
    V = 9
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, V, generator=gen)
    sigma = torch.tensor([1e-6, 0.5, 3.0, 200.0]).reshape(4, 1).expand(4, 3)
    x_t = torch.randint(0, V, (4, 3), generator=gen)
    s = L.gamma_log_score(logits, sigma, x_t)
    sd = sigma.double()
    log_expm1 = torch.where(sd < 50, torch.log(torch.expm1(sd)), sd)  # e^200 - 1 = e^200 in float64
    expected = logits.double() - log_expm1[..., None] - math.log(V - 1)
    expected.scatter_(-1, x_t[..., None], 0.0)
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
    assert torch.allclose(s.double(), expected, rtol=1e-6, atol=1e-4)
    # bf16 logits are upcast before the offset is subtracted (no bf16 rounding of the offset)
    s16 = L.gamma_log_score(logits.bfloat16(), sigma, x_t)
    assert s16.dtype == torch.float32
    assert torch.equal(s16, L.gamma_log_score(logits.bfloat16().float(), sigma, x_t))
    # zero_current only replaces the entry of the current token
    unzeroed = L.gamma_log_score(logits, sigma, zero_current=False)
    current = torch.zeros_like(s, dtype=torch.bool).scatter(-1, x_t[..., None], True)
    assert torch.equal(s[~current], unzeroed[~current]) and (s[current] == 0).all()
    with pytest.raises(ValueError, match="x_t is required"):
        L.gamma_log_score(logits, sigma)
    with pytest.raises(ValueError, match=r"x_t token ids must lie in \[0, 8\]"):
        L.gamma_log_score(logits, sigma, torch.full((4, 3), 9))


# ----------------------------------------------------------------------------- HDCE, CE, Eq. 10-11
def test_hdce_weights_and_loss():
    eps, lam = 0.1, 0.5
    masked = torch.tensor([True, False, False, True])
    shuffled = torch.tensor([False, True, False, False])
    p = torch.tensor([0.25, 0.4, 0.8, 0.5], dtype=torch.float64)
    w = L.hdce_weights(masked, shuffled, p, epsilon=eps, lam=lam)
    expected = torch.tensor([1 / 0.25, lam * (1 - eps) / 0.6, lam * eps / 0.2, 1 / 0.5], dtype=torch.float64)
    assert torch.allclose(w, expected)
    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    x0 = torch.tensor([0, 3, 5, 2])
    loss = L.hdce(logits, x0, masked, shuffled, p, epsilon=eps, lam=lam)
    assert torch.allclose(loss, expected.float() * F.cross_entropy(logits, x0, reduction="none"))
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\], got 1.5"):
        L.hdce_weights(masked, shuffled, p, epsilon=1.5)


def test_block_weights_eq11():
    assert L.block_weights(12, 4).tolist() == [0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5, 1, 1, 1, 1]
    assert L.block_weights(10, 4).tolist() == [0] * 4 + [0.5] * 4 + [1] * 2
    assert L.block_weights(5, 8).tolist() == [1.0] * 5          # ⌈d/ω⌉ = 1
    assert L.block_weights(3, 1).tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="width must be an int >= 1"):
        L.block_weights(4, 0)


def test_settled_cross_entropy_and_combination():
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 1, IGNORE_INDEX, 3, 4])
    w = torch.tensor([1.0, 0.5, 1.0, 0.0, 2.0])
    ce = L.settled_cross_entropy(logits, targets, w)
    ref = F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE_INDEX) * w
    assert torch.allclose(ce, ref) and ce[2] == 0
    assert L.combine_losses(torch.tensor(2.0), torch.tensor(3.0), 0.5, 2.0).item() == 7.0


# ----------------------------------------------------------------------------- packed batches
def manual_token_loss(process, row_logits, x0, x, sigma, dsigma, masked, shuffled, lam):
    """One target, recomputed from the definitions (dense generator for SEDD processes)."""
    V = process.vocab_size
    if isinstance(process, nz.EpsilonHybrid):
        p = -math.expm1(-sigma)
        w = 1 / p if masked else lam * ((1 - process.epsilon) if shuffled else process.epsilon) / (1 - p)
        return w * F.cross_entropy(row_logits.double()[None], torch.tensor([x0]), reduction="none")[0]
    s = row_logits.double()
    if process.gamma < 1:  # scale_by_sigma + zero the current token
        s = s - math.log(math.expm1(sigma)) - math.log(V - 1)
        s = s.clone()
        s[x] = 0.0
    return dsigma * brute_score_entropy(dense_generator(V, process.gamma), sigma, s, x, x0)


ALL_PROCESSES = [nz.Absorb(6), nz.Uniform(6), nz.GammaHybrid(6, 0.3), nz.EpsilonHybrid(6, 0.2)]


@pytest.mark.parametrize("config", ["aligned", "shifted"])
@pytest.mark.parametrize("kind", ["block", "slide"])
def test_noise_packed_batch_consistency(config, kind):
    sched = hk.schedules.block(8, 4, 3) if kind == "block" else hk.schedules.slide(8, 3)
    noise = nz.LogLinearNoise()
    V = 6
    x = torch.randint(0, V - 1, (4, 8), generator=torch.Generator().manual_seed(0))
    packed = hk.packing.pack(x, sched, config, generator=torch.Generator().manual_seed(1), bos_id=BOS)
    for process in ALL_PROCESSES:
        nb = L.noise_packed_batch(process, noise, packed, torch.Generator().manual_seed(2),
                                  num_levels=sched.num_levels, config=config)
        clean = packed.levels == 0
        assert torch.equal(nb.input_ids[clean], packed.input_ids[clean])
        assert (nb.sigma_bar[clean] == 0).all()
        loss = packed.loss_positions
        shift = 1 if config == "shifted" else 0
        rows, cols = loss.nonzero(as_tuple=True)
        # the target's noisy value is the input of the cell that holds the target position
        assert torch.equal(nb.target_noisy_ids[rows, cols], nb.input_ids[rows, cols + shift])
        assert torch.equal(nb.target_sigma_bar[rows, cols], nb.sigma_bar[rows, cols + shift])
        t = packed.target_levels[rows, cols].double() / sched.num_levels
        sigma, dsigma = noise(t)
        assert torch.equal(nb.target_sigma_bar[rows, cols], sigma.float())
        assert torch.equal(nb.target_dsigma_bar[rows, cols], dsigma.float())
        assert torch.equal(nb.target_masked[loss], nb.target_noisy_ids[loss] == V - 1)
        assert not nb.target_masked[~loss].any() and not nb.target_shuffled[~loss].any()
        kept = loss & ~nb.target_masked & ~nb.target_shuffled
        assert torch.equal(nb.target_noisy_ids[kept], packed.target_ids[kept])
        if isinstance(process, nz.EpsilonHybrid):  # events come from the same cell as the noisy value
            always = L.noise_packed_batch(nz.EpsilonHybrid(V, 1.0), noise, packed,
                                          torch.Generator().manual_seed(3), num_levels=sched.num_levels,
                                          config=config)
            assert torch.equal(always.target_shuffled, loss & ~always.target_masked)
            assert torch.equal(always.target_masked, loss & (always.target_noisy_ids == V - 1))
        # settled targets are clean
        settled = packed.settled_positions
        assert torch.equal(nb.target_noisy_ids[settled], packed.target_ids[settled])
    other = "aligned" if config == "shifted" else "shifted"
    with pytest.raises(ValueError, match=f"config='{other}'|config={other!r}"):
        L.noise_packed_batch(ALL_PROCESSES[0], noise, packed, num_levels=sched.num_levels, config=other)


@pytest.mark.parametrize("config", ["aligned", "shifted"])
@pytest.mark.parametrize("process", ALL_PROCESSES, ids=lambda p: p.name)
def test_packed_loss_matches_per_cell_recomputation(config, process):
    sched = hk.schedules.block(8, 4, 3)
    noise = nz.LogLinearNoise()
    V, lam, beta1, beta2 = 6, 0.7, 0.4, 1.3
    x = torch.randint(0, V - 1, (3, 8), generator=torch.Generator().manual_seed(3))
    packed = hk.packing.pack(x, sched, config, generator=torch.Generator().manual_seed(4), bos_id=BOS)
    nb = L.noise_packed_batch(process, noise, packed, torch.Generator().manual_seed(5),
                              num_levels=sched.num_levels, config=config)
    logits = torch.randn(*packed.input_ids.shape, V, generator=torch.Generator().manual_seed(6))
    logits.requires_grad_()
    loss, metrics = L.packed_loss(process, logits, packed, nb, beta1=beta1, beta2=beta2, lam=lam)
    diff, ce = [], []
    shift = 1 if config == "shifted" else 0
    for b, c in packed.loss_positions.nonzero().tolist():
        holder = c + shift  # cell holding the target position's noisy token
        diff.append(manual_token_loss(
            process, logits[b, c].detach(), int(packed.target_ids[b, c]), int(nb.input_ids[b, holder]),
            float(nb.sigma_bar[b, holder]), float(noise(packed.levels[b, holder].double() / 3)[1]),
            bool(nb.input_ids[b, holder] == V - 1), bool(nb.target_shuffled[b, c]), lam))
    for b, c in packed.settled_positions.nonzero().tolist():
        ce.append(F.cross_entropy(logits[b, c].detach().double()[None], packed.target_ids[b, c][None],
                                  reduction="none")[0])
    expected = beta1 * torch.stack(ce).mean() + beta2 * torch.stack(diff).mean()
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
    assert metrics["diffusion_tokens"].item() == len(diff) and metrics["settled_tokens"].item() == len(ce)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~(packed.loss_positions | packed.settled_positions)] == 0).all()


# ----------------------------------------------------------------------------- per-step path
def test_step_roles_match_split():
    for sched in (hk.schedules.block(12, 4, 3), hk.schedules.slide(10, 4), hk.schedules.flat(6, 5)):
        for t in range(sched.num_steps):
            levels, settled, active = L.step_roles(sched, t)
            a, b = sched.split(t)
            pos = torch.arange(sched.length)
            assert torch.equal(levels, sched.levels(t))
            assert torch.equal(settled, pos < a) and torch.equal(active, (pos >= a) & (pos < b))
    with pytest.raises(ValueError, match=r"t must be an int in \[0, 8\]"):
        L.step_roles(hk.schedules.block(12, 4, 3), 9)


@pytest.mark.parametrize("config", ["aligned", "shifted"])
@pytest.mark.parametrize("process", ALL_PROCESSES, ids=lambda p: p.name)
def test_step_loss_matches_per_token_recomputation(config, process):
    sched = hk.schedules.block(12, 4, 3)
    noise = nz.LogLinearNoise()
    V, lam = 6, 1.0
    x0 = torch.randint(0, V - 1, (3, 12), generator=torch.Generator().manual_seed(7))
    t = 5  # block 1 active at level 2, block 0 settled, block 2 worthless
    levels, settled, active = L.step_roles(sched, t)
    nb = L.noise_step(process, noise, x0, levels, torch.Generator().manual_seed(8),
                      num_levels=sched.num_levels, config=config, bos_id=BOS)
    P = 12 + (config == "shifted")
    assert nb.input_ids.shape == (3, P)
    if config == "shifted":
        assert (nb.input_ids[:, 0] == BOS).all() and torch.equal(nb.input_ids[:, 1:], nb.target_noisy_ids)
    assert torch.equal(nb.target_noisy_ids[:, settled], x0[:, settled])
    logits = torch.randn(3, P, V, generator=torch.Generator().manual_seed(9), requires_grad=True)
    loss, metrics = L.step_loss(process, logits, nb, settled, active, block_width=4, lam=lam)
    w = L.block_weights(12, 4)
    diff, ce = [], []
    for b in range(3):
        for i in range(12):
            if active[i]:
                sigma, dsigma = noise(levels[i].double() / 3)
                diff.append(manual_token_loss(
                    process, logits[b, i].detach(), int(x0[b, i]), int(nb.target_noisy_ids[b, i]),
                    float(sigma), float(dsigma), bool(nb.target_masked[b, i]), bool(nb.target_shuffled[b, i]),
                    lam))
            elif settled[i]:
                ce.append(w[i] * F.cross_entropy(logits[b, i].detach()[None], x0[b, i][None],
                                                 reduction="none")[0])
    expected = torch.stack(ce).mean() + torch.stack(diff).mean()
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
    assert metrics["diffusion_tokens"].item() == 3 * int(active.sum())
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[:, 8:] == 0).all()  # worthless positions (and SHIFTED's discarded row) carry no loss


def test_step_entry_point_errors():
    process, noise = nz.GammaHybrid(6, 0.1), nz.LogLinearNoise()
    x0 = torch.zeros(2, 4, dtype=torch.long)
    levels = torch.tensor([0, 1, 2, 2])
    with pytest.raises(ValueError, match="needs bos_id"):
        L.noise_step(process, noise, x0, levels, num_levels=2, config="shifted")
    with pytest.raises(ValueError, match=r"levels must lie in \[0, num_levels=2\]"):
        L.noise_step(process, noise, x0, torch.tensor([0, 1, 2, 3]), num_levels=2)
    nb = L.noise_step(process, noise, x0, levels, num_levels=2)
    logits = torch.zeros(2, 4, 6)
    with pytest.raises(ValueError, match="settled and active overlap"):
        L.step_loss(process, logits, nb, levels == 0, levels >= 0)
    with pytest.raises(ValueError, match=r"logits must have shape \[B, d, V\]"):
        L.step_loss(process, torch.zeros(2, 6, 6), nb, levels == 0, levels > 0)
    with pytest.raises(ValueError, match="score_parametrization must be one of"):
        L.step_loss(process, logits, nb, levels == 0, levels > 0, score_parametrization="bogus")
