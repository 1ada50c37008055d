"""The generation loop: KV-cached generation equals uncached generation token for token, and the
sampler's bookkeeping follows MDLM / ACS (paper §3.4, App. D)."""

import math

import pytest
import torch
from scipy import stats

import hdlm_kernels as hk
from hdlm_reference.generate import generate, transfer_probability
from hdlm_reference.model import DiT, ModelConfig
from hdlm_reference.noise import GammaHybrid, LogLinearNoise

BOS = 10


@pytest.fixture(scope="module")
def model():
    # Random (not zero-initialized) weights in float64, so predictions depend on the context and
    # cached/uncached computations agree far below any sampling tie.
    torch.manual_seed(0)
    m = DiT(ModelConfig.preset("tiny", family="epsilon")).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


CASES = [(hk.schedules.block(32, 8, 4), "block_causal"), (hk.schedules.block(30, 8, 3), "causal"),
         (hk.schedules.slide(32, 8), "causal"), (hk.schedules.slide(30, 6, 3), "causal")]


@pytest.mark.parametrize("sched,context", CASES, ids=lambda v: repr(v) if not isinstance(v, str) else v)
@pytest.mark.parametrize("config", ["aligned", "shifted"])
@pytest.mark.parametrize("with_prompt", [False, True])
def test_cached_generation_equals_uncached(model, sched, context, config, with_prompt):
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(3)) if with_prompt else None
    assert_cached_equals_uncached(model, sched, 1234, method="acs", eta=0.2, context=context, config=config,
                                  bos_id=BOS, prompt=prompt)


def assert_cached_equals_uncached(model, sched, seed, prompt=None, **kwargs):
    """Same tokens and model calls with and without the KV cache, fewer rows fed with it, no MASK left,
    prompt kept; batch of 3."""
    uncached = generate(model, sched, 3, seed, kv_cache=False, prompt=prompt, **kwargs)
    cached = generate(model, sched, 3, seed, kv_cache=True, prompt=prompt, **kwargs)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert cached.model_calls == uncached.model_calls
    assert cached.rows_fed < uncached.rows_fed and cached.logit_rows == uncached.logit_rows
    assert not (cached.tokens == model.config.mask_id).any()
    if prompt is not None:
        assert torch.equal(cached.tokens[:, :prompt.shape[1]], prompt.expand(3, -1))


def test_original_sampler_unmasks_every_position_exactly_once(model):
    sched = hk.schedules.block(24, 6, 4)
    result = generate(model, sched, 2, 7, method="original", prompt=torch.tensor([[1, 2, 3]]))
    # no corrections: logits only for the masked positions, each once
    assert result.logit_rows == 2 * (24 - 3)


def test_acs_corrects_unmasked_tokens(model):
    sched = hk.schedules.block(24, 6, 6)
    original = generate(model, sched, 2, 7, method="original")
    acs = generate(model, sched, 2, 7, method="acs", eta=0.5)
    assert acs.logit_rows > original.logit_rows  # resampled already-unmasked rows too


def test_quench_is_autoregressive_sampling(model):
    sched = hk.schedules.quench(16)
    result = generate(model, sched, 2, 11, method="original", context="causal", kv_cache=True)
    assert result.model_calls == 16 and result.logit_rows == 2 * 16
    # each call feeds the newly settled cell and the new position only
    assert result.rows_fed == 2 * (1 + 2 * 15)


def test_seed_determines_the_output(model):
    sched = hk.schedules.block(16, 4, 4)
    one, two = (generate(model, sched, 2, 5).tokens for _ in range(2))
    other = generate(model, sched, 2, 6).tokens
    assert torch.equal(one, two) and not torch.equal(one, other)


def test_transfer_probability_is_mdlm_reverse_step():
    sched = hk.schedules.block(8, 4, 4)
    noise = LogLinearNoise()
    now, nxt = torch.tensor([4, 3, 1, 2]), torch.tensor([3, 3, 0, 1])
    p = transfer_probability(noise, sched, now, nxt)
    # log-linear: p_mask(t) = (1 - eps) t, so 1 - p_mask(t_next)/p_mask(t_now) = 1 - t_next/t_now
    assert torch.allclose(p, torch.tensor([1 - 3 / 4, 0.0, 1.0, 1 - 1 / 2], dtype=torch.float64))


def test_bad_arguments_raise(model):
    sched = hk.schedules.slide(16, 4)
    with pytest.raises(ValueError, match="kv_cache=True is not exact for a slide schedule"):
        generate(model, sched, 1, 0, kv_cache=True, context="block_causal")
    with pytest.raises(ValueError, match="unknown method 'beam'"):
        generate(model, sched, 1, 0, method="beam")
    with pytest.raises(ValueError, match="config='shifted' needs bos_id"):
        generate(model, sched, 1, 0, config="shifted")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        generate(model, sched, 0, 0)
    with pytest.raises(ValueError, match="exceeds the model's max_length"):
        generate(model, hk.schedules.block(256, 8, 8), 1, 0)
    with pytest.raises(ValueError, match="prompt must have shape"):
        generate(model, sched, 2, 0, prompt=torch.zeros(3, 2, dtype=torch.long))
    gamma = DiT(ModelConfig.preset("tiny", family="gamma")).eval()
    with pytest.raises(ValueError, match="samples ε-family models"):
        generate(gamma, sched, 1, 0)


# ---------------------------------------------------------------- γ family (SEDD framework)


def random_gamma_model(gamma):
    torch.manual_seed(1)
    m = DiT(ModelConfig.preset("tiny", family="gamma", gamma=gamma)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.fixture(scope="module")
def gamma_model():
    return random_gamma_model(0.05)


GAMMA_CASES = [(hk.schedules.block(16, 4, 3), "block_causal"), (hk.schedules.block(15, 6, 2), "causal"),
               (hk.schedules.slide(16, 4), "causal")]


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("sched,context", GAMMA_CASES, ids=lambda v: repr(v) if not isinstance(v, str) else v)
@pytest.mark.parametrize("config", ["aligned", "shifted"])
@pytest.mark.parametrize("with_prompt", [False, True])
@pytest.mark.parametrize("method", ["analytic", "euler"])
def test_gamma_cached_generation_equals_uncached(gamma_model, sched, context, config, with_prompt, method):
    prompt = None
    if with_prompt:
        prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(3))
    assert_cached_equals_uncached(gamma_model, sched, 99, method=method, context=context, config=config,
                                  bos_id=BOS, prompt=prompt)


@pytest.mark.usefixtures("single_thread")
def test_gamma_model_runs_at_every_step_on_every_active_row(gamma_model):
    # time-conditioned network: no step is skipped and every active non-prompt row gets logits
    sched = hk.schedules.block(16, 4, 3)
    result = generate(gamma_model, sched, 2, 5, method="analytic", prompt=torch.tensor([[1, 2]]))
    assert result.model_calls == sched.num_steps
    active = sum(b - a for a, b in (sched.split(t) for t in range(sched.num_steps)))
    assert result.logit_rows == 2 * (active - 2 * 3)  # the 2 prompt positions sit in 3 steps
    again = generate(gamma_model, sched, 2, 5, method="analytic", prompt=torch.tensor([[1, 2]]))
    other = generate(gamma_model, sched, 2, 6, method="analytic", prompt=torch.tensor([[1, 2]]))
    assert torch.equal(result.tokens, again.tokens) and not torch.equal(result.tokens, other.tokens)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("gamma", [0.0, 1e-6])
@pytest.mark.parametrize("method", ["analytic", "euler"])
def test_flat_schedule_gamma_hybrid_is_sedd(gamma, method):
    # τ_Flat with γ = 0 is SEDD-absorb (τ-leaping / Euler); a tiny γ is the γ-hybrid next to it
    model = random_gamma_model(gamma)
    sched = hk.schedules.flat(12, 6)
    result = generate(model, sched, 2, 3, method=method)
    assert result.model_calls == 6 and result.rows_fed == 2 * 12 * 6
    assert not (result.tokens == model.config.mask_id).any()


def test_gamma_bad_arguments_raise(model, gamma_model):
    sched = hk.schedules.block(8, 4, 2)
    with pytest.raises(ValueError, match="method 'analytic' samples γ-family models, got family 'epsilon'"):
        generate(model, sched, 1, 0, method="analytic")
    with pytest.raises(ValueError, match="method 'acs' samples ε-family models, got family 'gamma'"):
        generate(gamma_model, sched, 1, 0, method="acs")
    with pytest.raises(ValueError, match="temperature must be 1.0 for the γ methods"):
        generate(gamma_model, sched, 1, 0, method="euler", temperature=0.5)


class TrueScoreModel(torch.nn.Module):
    """A γ-family stand-in whose logits give the EXACT score of i.i.d. tokens with law ``p0``: for a
    cell holding x at σ̄, log p_σ̄(y)/p_σ̄(x) plus the offset ``gamma_log_score`` removes. ALIGNED only."""

    def __init__(self, p0, gamma):
        super().__init__()
        vocab = p0.numel()
        self.config = ModelConfig(vocab_size=vocab, hidden_size=4, num_layers=1, num_heads=1, max_length=64,
                                  family="gamma", gamma=gamma)
        self.process = GammaHybrid(vocab, gamma)
        self.register_buffer("p0", p0)
        self.dummy = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, input_ids, position_ids, mask, sigma=None, logits_rows=None, kv_cache=None):
        sigma = sigma.double()
        p_mask, p_shuffle, p_keep = self.process.event_probs(sigma)
        n = self.config.vocab_size - 1
        p = p_shuffle[..., None] / n + p_keep[..., None] * self.p0
        p[..., -1] = p_mask
        log_ratio = p.log() - p.gather(-1, input_ids[..., None]).log()
        logits = log_ratio + (torch.log(torch.expm1(sigma)) + math.log(n))[..., None]
        return logits[logits_rows]


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("sched", [hk.schedules.flat(3, 5), hk.schedules.block(4, 2, 3)], ids=repr)
def test_analytic_sampler_with_the_true_score_reproduces_the_data_law(sched):
    # Independent tokens + exact score: every τ-leaping step is the exact reverse transition, so the
    # output law is p0 (up to the all-MASK prior, which differs from p_{σ̄(1)} by < 1e-3 in TV).
    p0 = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15, 0.0], dtype=torch.float64)
    model = TrueScoreModel(p0, gamma=0.2)
    result = generate(model, sched, 3000, 17, method="analytic")
    counts = torch.bincount(result.tokens.reshape(-1), minlength=6).double()
    assert counts[-1] == 0
    expected = p0[:-1] * result.tokens.numel()
    assert stats.chisquare(counts[:-1].numpy(), expected.numpy()).pvalue > 1e-3


def test_flex_attention_backend_generates_the_same_tokens(model):
    sched = hk.schedules.block(24, 8, 4)
    reference = generate(model, sched, 2, 9, kv_cache=True, context="causal")
    flex = generate(model, sched, 2, 9, kv_cache=True, context="causal", attention_backend="flex")
    assert torch.equal(flex.tokens, reference.tokens)
    assert model.config.attention_backend == "reference"  # restored after the call


@pytest.mark.usefixtures("single_thread")
def test_skip_unchanged_false_runs_the_model_on_idle_steps_with_the_same_tokens(model):
    # More steps than positions, one sequence: many steps unmask nothing, and MDLM's caching skips them.
    sched = hk.schedules.flat(8, 32)
    for kv_cache in (False, True):
        cached = generate(model, sched, 1, 21, method="original", kv_cache=kv_cache)
        uncached = generate(model, sched, 1, 21, method="original", kv_cache=kv_cache, skip_unchanged=False)
        assert torch.equal(uncached.tokens, cached.tokens)
        assert cached.model_calls < uncached.model_calls == sched.num_steps
        assert uncached.logit_rows > cached.logit_rows == 8  # each position once, plus discarded rows
