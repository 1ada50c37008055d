"""The perplexity upper bound (paper App. C.1), sample entropy and generative perplexity (C.2).

The bound is checked against exact likelihoods: an oracle denoiser of a known Markov chain (exact
posteriors / exact scores by forward-backward) must give E[bound] = -log p(y) in continuous time, for
every hyperschedule (and never less beyond the Monte-Carlo noise); τ_Quench in discrete time must give
the autoregressive chain rule exactly, for the oracle and for a real DiT.
"""

import math
import sys
import types

import pytest
import torch

import hdlm_kernels as hk
from hdlm_kernels.masks import IntervalMask
from hdlm_reference import evaluate as E
from hdlm_reference import noise as N
from hdlm_reference.model import DiT, ModelConfig
from hdlm_reference.objective import ObjectiveConfig, PackedObjective

pytestmark = pytest.mark.usefixtures("single_thread")

INIT = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
TRANS = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.6, 0.2], [0.3, 0.3, 0.4]], dtype=torch.float64)
D = 6


# ---------------------------------------------------------------------------------------------
# a known data distribution and its exact denoiser
# ---------------------------------------------------------------------------------------------

def sample_chain(init, trans, batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.empty(batch, length, dtype=torch.long)
    y[:, 0] = torch.multinomial(init.expand(batch, -1), 1, generator=g)[:, 0]
    for i in range(1, length):
        y[:, i] = torch.multinomial(trans[y[:, i - 1]], 1, generator=g)[:, 0]
    return y


def chain_nll(init, trans, y):
    """Exact -log p(y) of each sequence."""
    nll = -torch.log(init[y[:, 0]])
    for i in range(1, y.shape[1]):
        nll = nll - torch.log(trans[y[:, i - 1], y[:, i]])
    return nll


class MarkovOracle(torch.nn.Module):
    """Exact denoiser of a Markov chain over N real tokens (MASK = N), with the model's interface.

    The fed cells are noisy observations of the chain: ε family, a cell is either MASK (no evidence) or
    its clean token; γ family, cell i is drawn from Eq. 7g at σ̄_i (the ``sigma`` input). Forward-backward
    gives m_i(y) ∝ p(y_i = y, x_{-i}). ε logits: log p(y_i | x) (MASK at -1e9). γ logits: the exact
    log-ratios log p(x with x_i = v)/p(x) plus the scale_by_sigma offset that gamma_log_score removes.
    The attention mask is ignored: the oracle conditions on every fed cell (ALIGNED only).
    """

    def __init__(self, init, trans, family="epsilon", gamma=None):
        super().__init__()
        self.init, self.trans, self.n = init, trans, init.numel()
        self.config = types.SimpleNamespace(vocab_size=self.n + 1, family=family, gamma=gamma)
        self.process = N.GammaHybrid(self.n + 1, gamma) if family == "gamma" else None
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, input_ids, position_ids, mask, sigma=None, logits_rows=None):
        B, K = input_ids.shape
        n, x = self.n, input_ids
        if self.process is None:
            emit = torch.where((x == n)[..., None], torch.ones(B, K, n, dtype=torch.float64),
                               torch.nn.functional.one_hot(x.clamp(max=n - 1), n).double())
        else:
            sig = sigma.expand(B, K).double()
            probs = self.process.transition_prob(torch.arange(n).expand(B, K, n),
                                                 sig[..., None].expand(B, K, n))
            emit = probs.gather(-1, x[:, :, None, None].expand(B, K, n, 1)).squeeze(-1)  # q(x_i | y_i = y)
        before = torch.empty(B, K, n, dtype=torch.float64)   # p(y_i, x_{<i}) up to a constant
        message = self.init.expand(B, n)
        for i in range(K):
            before[:, i] = message
            message = message * emit[:, i]
            message = (message / message.sum(-1, keepdim=True)) @ self.trans
        after = torch.empty(B, K, n, dtype=torch.float64)    # p(x_{>i} | y_i) up to a constant
        message = torch.ones(B, n, dtype=torch.float64)
        for i in reversed(range(K)):
            after[:, i] = message
            message = (emit[:, i] * message) @ self.trans.T
            message = message / message.sum(-1, keepdim=True)
        joint = before * after
        if self.process is None:
            logits = torch.full((B, K, n + 1), -1e9, dtype=torch.float64)
            logits[..., :n] = torch.log((joint * emit).clamp_min(1e-300))
        else:
            numerator = torch.einsum("bky,bkyv->bkv", joint, probs)
            offset = torch.log(torch.expm1(sig.clamp_min(1e-30))) + math.log(n)
            logits = (torch.log(numerator.clamp_min(1e-300)) - torch.log(numerator.gather(-1, x[..., None]))
                      + offset[..., None])
        if logits_rows is None:
            return logits
        return logits[logits_rows] if logits_rows.dtype == torch.bool else logits[:, logits_rows]


@pytest.fixture(scope="module")
def chain_data():
    y = sample_chain(INIT, TRANS, 32, D, seed=0)
    return y, chain_nll(INIT, TRANS, y)


def _check_close_to_truth(result, truth):
    """The mean bound equals the mean true NLL within 4 Monte-Carlo standard errors (the bound is tight
    for the exact denoiser in continuous time, so it is in particular never below the truth beyond the
    noise); returns (difference, standard error) per sequence."""
    B = truth.numel()
    diff = float((result.total - truth).mean())
    stderr = math.sqrt(float(result.mc_variance.sum())) / B
    assert stderr < 0.3
    assert abs(diff) <= 4 * stderr + 0.01, (diff, stderr)
    print(f"bound - truth = {diff:.4f} ± {stderr:.4f}")
    return diff, stderr


# ---------------------------------------------------------------------------------------------
# (a) the bound of an exact model is the true NLL
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sched,time_warp", [(hk.schedules.flat(D, 4), False),
                                             (hk.schedules.flat(D, 4), True),
                                             (hk.schedules.block(D, 2, 3), False),
                                             (hk.schedules.slide(D, 3), False)],
                         ids=["flat", "flat-warp", "block", "slide"])
def test_oracle_epsilon_bound_is_the_true_nll(chain_data, sched, time_warp):
    y, truth = chain_data
    oracle = MarkovOracle(INIT, TRANS, "epsilon")
    result = E.nll_bound(oracle, y, sched, num_samples=480, seed=1, context="causal", time_warp=time_warp)
    _check_close_to_truth(result, truth)
    assert torch.equal(result.prior, torch.zeros(y.shape[0], dtype=torch.float64))


def test_oracle_gamma_bound_is_the_true_nll_plus_prior(chain_data):
    y, truth = chain_data
    oracle = MarkovOracle(INIT, TRANS, "gamma", gamma=0.1)
    result = E.nll_bound(oracle, y, hk.schedules.flat(D, 4), num_samples=480, seed=1)
    _check_close_to_truth(result, truth)
    noise = N.LogLinearNoise()
    expected_prior = D * E.prior_nll(N.GammaHybrid(4, 0.1), -math.log(noise.eps))
    assert 0 < expected_prior < 0.05
    assert torch.allclose(result.prior, torch.full_like(result.prior, expected_prior))


def test_quench_discrete_is_the_exact_chain_rule_for_the_oracle(chain_data):
    # τ_Quench, discrete time, M = T: every step once, weight 1, the active position always masked.
    y, truth = chain_data
    oracle = MarkovOracle(INIT, TRANS, "epsilon")
    result = E.nll_bound(oracle, y, hk.schedules.quench(D), num_samples=D, seed=3, time="discrete",
                         context="causal")
    torch.testing.assert_close(result.total, truth, rtol=0, atol=1e-9)


def test_discrete_time_bound_is_looser_than_continuous(chain_data):
    # Two factorized steps cannot express the correlations: a real gap above the exact NLL.
    y, truth = chain_data
    oracle = MarkovOracle(INIT, TRANS, "epsilon")
    result = E.nll_bound(oracle, y, hk.schedules.flat(D, 2), num_samples=32, seed=1, time="discrete")
    gap = float((result.total - truth).mean())
    assert gap > 0.3 and gap > 6 * math.sqrt(float(result.mc_variance.sum())) / y.shape[0]


def test_iid_oracle_gives_the_entropy():
    # i.i.d. tokens: the exact posterior is the marginal, the bound is Σ -log π(y_i) whatever the masks.
    marginal = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    oracle = MarkovOracle(marginal, marginal.expand(3, 3).clone(), "epsilon")
    y = sample_chain(marginal, marginal.expand(3, 3), 64, 8, seed=5)
    for time in E.TIMES:
        result = E.perplexity_bound(oracle, [y[:32], y[32:]], hk.schedules.block(8, 4, 2), num_samples=8,
                                    seed=2, time=time)
        empirical = float(-torch.log(marginal[y]).mean())
        entropy = float(-(marginal * marginal.log()).sum())
        assert abs(result.nll - empirical) <= 4 * result.mc_stderr + 1e-9
        assert abs(result.nll - entropy) < 0.15
        assert result.perplexity == pytest.approx(math.exp(result.nll))


# ---------------------------------------------------------------------------------------------
# (d) τ_Quench with a real ε model: the active-only bound is the AR chain rule
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_dit():
    torch.manual_seed(0)
    model = DiT(ModelConfig(vocab_size=9, hidden_size=32, num_layers=2, num_heads=2, cond_dim=16,
                            max_length=13, family="epsilon", dropout=0.0)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # context-dependent predictions (the output layer starts at zero)
    return model


def _direct_ar_nll(model, y):
    """Σ_t -log p(y_t | y_<t): cells [0, t] = y_<t then MASK, prefix causal, softmax over real tokens."""
    B, d = y.shape
    mask_id = model.config.vocab_size - 1
    total = torch.zeros(B, dtype=torch.float64)
    with torch.no_grad():
        for t in range(d):
            cells = torch.arange(t + 1)
            is_last = cells == t
            mask = IntervalMask(torch.where(is_last, t, cells + 1)[None], torch.where(is_last, t, 0)[None],
                                torch.where(is_last, t + 1, 0)[None], t + 1)
            inputs = torch.cat([y[:, :t], torch.full((B, 1), mask_id)], 1)
            logits = model(inputs, cells[None], mask)[:, t, :mask_id]
            total -= logits.log_softmax(-1).gather(-1, y[:, t:t + 1]).squeeze(-1)
    return total


def test_quench_discrete_bound_equals_the_ar_chain_rule_for_a_dit(random_dit):
    y = torch.randint(0, 8, (4, 12), generator=torch.Generator().manual_seed(1))
    direct = _direct_ar_nll(random_dit, y)
    result = E.nll_bound(random_dit, y, hk.schedules.quench(12), num_samples=12, seed=0, time="discrete",
                         context="causal")
    torch.testing.assert_close(result.total, direct, rtol=1e-12, atol=1e-10)
    # continuous time is the same quantity in expectation (the last position's level runs 1 -> 0)
    continuous = E.nll_bound(random_dit, y, hk.schedules.quench(12), num_samples=96, seed=0, context="causal")
    stderr = math.sqrt(float(continuous.mc_variance.sum())) / 4
    assert abs(float((continuous.total - direct).mean())) <= 4 * stderr + 1e-6


# ---------------------------------------------------------------------------------------------
# (b) training lowers the bound; (c) reproducibility
# ---------------------------------------------------------------------------------------------

def _train(model, objective, data, steps, lr=3e-3):
    loss_fn = PackedObjective(objective, model.config.vocab_size, data.shape[1], seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        batch = data[torch.randint(0, data.shape[0], (16,), generator=g)]
        loss, _ = loss_fn(model, batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("family", ["epsilon", "gamma"])
def test_training_lowers_the_bound(family):
    d, n = 16, 8
    trans = torch.full((n, n), 0.02, dtype=torch.float64)
    trans += 0.84 * torch.eye(n, dtype=torch.float64).roll(1, 1)
    trans = trans / trans.sum(1, keepdim=True)
    data = sample_chain(torch.full((n,), 1.0 / n, dtype=torch.float64), trans, 256, d, seed=0)
    held_out = sample_chain(torch.full((n,), 1.0 / n, dtype=torch.float64), trans, 16, d, seed=1)
    torch.manual_seed(0)
    model = DiT(ModelConfig(vocab_size=n + 1, hidden_size=32, num_layers=1, num_heads=2, cond_dim=16,
                            max_length=d + 1, family=family, gamma=0.05, dropout=0.0)).eval()
    objective = ObjectiveConfig(family=family, schedule="block", width=8, levels=4, gamma=0.05)
    sched = objective.schedule_for(d)
    options = dict(num_samples=64, seed=0, **E.bound_options(objective))
    before = E.perplexity_bound(model, [held_out], sched, **options)
    if family == "epsilon":  # zero logits: every masked token costs log N, so the bound is log N
        assert abs(before.nll - math.log(n)) <= 4 * before.mc_stderr + 1e-6
    _train(model, objective, data, steps=120)
    after = E.perplexity_bound(model, [held_out], sched, **options)
    assert math.isfinite(after.nll) and math.isfinite(before.nll)
    print(f"{family}: bound {before.nll:.3f} ± {before.mc_stderr:.3f} -> "
          f"{after.nll:.3f} ± {after.mc_stderr:.3f}")
    assert after.nll < before.nll - 0.2 - 3 * (after.mc_stderr + before.mc_stderr)
    # circulant chain, uniform start: the data's entropy per token is exact; an upper bound stays above it
    entropy = (math.log(n) + (d - 1) * float(-(trans[0] * trans[0].log()).sum())) / d
    assert after.nll > entropy - 4 * after.mc_stderr


def test_fixed_seed_is_reproducible(random_dit):
    y = torch.randint(0, 8, (3, 12), generator=torch.Generator().manual_seed(2))
    sched = hk.schedules.block(12, 4, 3)
    first = E.nll_bound(random_dit, y, sched, num_samples=5, seed=11)
    second = E.nll_bound(random_dit, y, sched, num_samples=5, seed=11)
    other = E.nll_bound(random_dit, y, sched, num_samples=5, seed=12)
    assert torch.equal(first.draws, second.draws) and torch.equal(first.total, second.total)
    assert not torch.equal(first.draws, other.draws)
    # batch k draws from (seed, k): its estimate does not depend on the batches before it
    both = E.perplexity_bound(random_dit, [y[:2], y[2:]], sched, num_samples=5, seed=4)
    again = E.perplexity_bound(random_dit, [y[:2], y[2:]], sched, num_samples=5, seed=4)
    assert both.nll == again.nll and torch.equal(both.per_sequence, again.per_sequence)


@pytest.mark.parametrize("config", ["aligned", "shifted"])
def test_gamma_dit_shifted_and_aligned_run(config):
    torch.manual_seed(0)
    model = DiT(ModelConfig(vocab_size=9, hidden_size=32, num_layers=1, num_heads=2, cond_dim=16,
                            max_length=13, family="gamma", gamma=0.05, dropout=0.0))
    y = torch.randint(0, 8, (2, 12), generator=torch.Generator().manual_seed(1))
    result = E.nll_bound(model, y, hk.schedules.slide(12, 4), num_samples=4, seed=0, config=config,
                         context="causal", bos_id=8)
    assert torch.isfinite(result.total).all() and (result.total > 0).all()
    assert model.training  # the mode is restored


def test_invalid_arguments_raise(random_dit):
    y = torch.randint(0, 8, (2, 12))
    sched = hk.schedules.block(12, 4, 4)
    with pytest.raises(ValueError, match="MASK"):
        E.nll_bound(random_dit, torch.full((2, 12), 8), sched)
    with pytest.raises(ValueError, match="sched.length"):
        E.nll_bound(random_dit, y[:, :10], sched)
    with pytest.raises(ValueError, match="discrete"):
        E.nll_bound(random_dit, y, sched, family="gamma", gamma=0.1, time="discrete")
    with pytest.raises(ValueError, match="bos_id"):
        E.nll_bound(random_dit, y, sched, config="shifted")
    with pytest.raises(ValueError, match="num_samples"):
        E.nll_bound(random_dit, y, sched, num_samples=0)


def test_prior_matches_a_dense_kl():
    process = N.GammaHybrid(6, 0.2)
    sigma = 3.0
    q = process.transition_prob(torch.tensor([2]), torch.tensor([sigma]))[0]
    base = process.transition_prob(torch.arange(5), torch.full((5,), sigma)).mean(0)
    dense = float((q * (q / base).log()).sum())
    assert E.prior_nll(process, sigma) == pytest.approx(dense, rel=1e-10)
    assert E.prior_nll(N.Absorb(6), float("inf")) == 0.0


def test_token_batches_cover_every_chunk_once():
    import numpy as np

    from hdlm_reference.data import TokenDataset

    dataset = TokenDataset(np.arange(50, dtype=np.uint16), 8)  # 6 chunks, remainder 2
    batches = E.token_batches(dataset, 4)
    assert [b.shape[0] for b in batches] == [4, 2]
    assert torch.equal(torch.cat(batches).reshape(-1), torch.arange(48))
    assert len(E.token_batches(dataset, 4, num_batches=1)) == 1


# ---------------------------------------------------------------------------------------------
# C.2: unigram entropy, generative perplexity
# ---------------------------------------------------------------------------------------------

def test_unigram_entropy():
    samples = torch.tensor([[0, 0, 1, 1], [5, 5, 5, 5], [1, 2, 3, 4]])
    result = E.unigram_entropy(samples)
    expected = torch.tensor([math.log(2), 0.0, math.log(4)], dtype=torch.float64)
    torch.testing.assert_close(result.per_sample, expected)
    assert result.mean == pytest.approx(float(expected.mean()))
    assert result.std == pytest.approx(float(expected.std(unbiased=False)))
    assert E.unigram_entropy([[7, 7, 9], [9]], exclude=9).per_sample.tolist() == [0.0, 0.0]


def test_generative_perplexity_with_a_callable_judge():
    def judge(texts):
        return [torch.full((len(t),), 0.5 if t.startswith("a") else 1.5) for t in texts]

    result = E.generative_perplexity(["ab", "bcd"], judge, batch_size=1)
    assert result.num_tokens == 5
    assert result.nll == pytest.approx((2 * 0.5 + 3 * 1.5) / 5)  # global token mean, not mean of per-sample
    assert result.perplexity == pytest.approx(math.exp(result.nll))
    decoded = E.generative_perplexity(torch.tensor([[97, 98]]), judge, decode=lambda ids: bytes(ids).decode())
    assert decoded.nll == pytest.approx(0.5)


def test_generative_perplexity_without_transformers_raises_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(E.JudgeUnavailableError, match="transformers"):
        E.generative_perplexity(["some text"], "gpt2-large")


# ---------------------------------------------------------------------------------------------
# hdlm eval
# ---------------------------------------------------------------------------------------------

def test_cli_eval(tmp_path, capsys):
    from hdlm_reference.cli import main

    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--steps", "2", "--seq-len", "32", "--batch-size", "4",
                 "--width", "8", "--out", str(run), "--no-progress", "--eval-every", "0"]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--num-batches", "1", "--batch-size", "2", "--mc-samples", "3",
                 "--samples", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "NLL upper bound (nats/token)" in out and "perplexity upper bound" in out
    assert "unigram entropy of 2 samples" in out and "2 sequences of 32 tokens" in out
    value = float(out.split("NLL upper bound (nats/token)")[1].split()[0])
    assert 3.0 < value < 8.0  # about log 256 for a nearly untrained byte model
    assert main(["eval", "--run", str(run), "--val-fraction", "1.5"]) == 2
    assert main(["eval", "--run", str(tmp_path / "missing")]) == 2


def test_cli_eval_gamma_run(tmp_path, capsys):
    from hdlm_reference.cli import main

    run = tmp_path / "gamma"
    assert main(["train", "--preset", "tiny", "--steps", "1", "--seq-len", "16", "--batch-size", "2",
                 "--width", "4", "--family", "gamma", "--schedule", "slide", "--config", "shifted",
                 "--out", str(run), "--no-progress", "--eval-every", "0"]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--num-batches", "1", "--batch-size", "2", "--mc-samples", "2",
                 "--samples", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "gamma family, shifted" in out and "unigram entropy of 1 samples" in out
    prior = float(out.split("prior term (nats/token)")[1].split()[0])
    assert 0 < prior < 0.05
    assert main(["eval", "--run", str(run), "--time", "discrete"]) == 2
    assert "epsilon-family runs only" in capsys.readouterr().err
