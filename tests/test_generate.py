"""The generation loop: KV-cached generation equals uncached generation token for token, and the
sampler's bookkeeping follows MDLM / ACS (paper §3.4, App. D)."""

import pytest
import torch

import hdlm_kernels as hk
from hdlm_reference.generate import generate, transfer_probability
from hdlm_reference.model import DiT, ModelConfig
from hdlm_reference.noise import LogLinearNoise

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
    kwargs = dict(method="acs", eta=0.2, context=context, config=config, bos_id=BOS, prompt=prompt)
    uncached = generate(model, sched, 3, 1234, kv_cache=False, **kwargs)
    cached = generate(model, sched, 3, 1234, kv_cache=True, **kwargs)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert cached.model_calls == uncached.model_calls
    assert cached.rows_fed < uncached.rows_fed and cached.logit_rows == uncached.logit_rows
    assert not (cached.tokens == model.config.mask_id).any()
    if prompt is not None:
        assert torch.equal(cached.tokens[:, :5], prompt.expand(3, -1))


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
