"""The generation loop: KV-cached generation equals uncached generation token for token, and the
sampler's bookkeeping follows MDLM / ACS (paper §3.4, App. D)."""

import importlib
import math
from collections import Counter

import pytest
import torch
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode

import hdlm_kernels as hk
from hdlm_reference.generate import generate, transfer_probability
from hdlm_reference.model import DiT, ModelConfig
from hdlm_reference.noise import GammaHybrid, LogLinearNoise
from hdlm_reference.step_graphs import StepGraphs, capture_by_rerunning

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

    def forward(self, input_ids, position_ids, mask, sigma=None, logits_rows=None, kv_cache=None, *,
                logits_index=None, check=True):
        sigma = sigma.double().expand(input_ids.shape)  # [1, S] when the batch shares it, as DiT allows
        p_mask, p_shuffle, p_keep = self.process.event_probs(sigma)
        n = self.config.vocab_size - 1
        p = p_shuffle[..., None] / n + p_keep[..., None] * self.p0
        p[..., -1] = p_mask
        log_ratio = p.log() - p.gather(-1, input_ids[..., None]).log()
        logits = log_ratio + (torch.log(torch.expm1(sigma)) + math.log(n))[..., None]
        if logits_index is not None:  # DiT.forward's row-major selection
            return logits.reshape(-1, logits.shape[-1])[logits_index]
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


# ---------------------------------------------------------------- the step loop: planned, no host syncs


class HostSyncs(TorchDispatchMode):
    """Records the ops that make the host wait for the device (a value read on the host, or an output
    whose size depends on values), once ``armed``. On the CPU nothing waits, but the same ops would."""

    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
               torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default,
               torch.ops.aten._unique2.default, torch.ops.aten.unique_dim.default,
               torch.ops.aten.unique_consecutive.default, torch.ops.aten.repeat_interleave.Tensor}
    BOOL_INDEXED = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                    torch.ops.aten.index_put_.default}

    def __init__(self):
        super().__init__()
        self.armed = False
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.armed:
            indices = args[1] if func in self.BOOL_INDEXED else ()
            if func in self.SYNCING or any(i is not None and i.dtype == torch.bool for i in indices):
                self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method,kv_cache,sampler", [("acs", True, "reference"), ("acs", False, "kernels"),
                                                     ("analytic", True, "reference"), ("euler", True, "kernels")])
def test_step_loop_never_waits_for_the_device(model, gamma_model, method, kv_cache, sampler):
    """From the first model call on, the only host synchronization is the final failure check."""
    if sampler == "kernels":
        pytest.importorskip("hdlm_kernels._C")
    m = gamma_model if method in ("analytic", "euler") else model
    detector = HostSyncs()
    hook = m.register_forward_pre_hook(lambda *_: setattr(detector, "armed", True))
    try:
        with detector:
            result = generate(m, hk.schedules.block(16, 4, 3), 2, 5, method=method, kv_cache=kv_cache,
                              context="causal", prompt=torch.tensor([[1, 2, 3]]), sampler_backend=sampler)
    finally:
        hook.remove()
    assert detector.armed and result.model_calls > 0
    assert detector.seen == [str(torch.ops.aten._local_scalar_dense.default)]


def test_planned_decisions_are_the_decisions_on_the_actual_tokens(model):
    """The plan tracks only MASK-or-not; the rows each call samples must be exactly those
    acs_decisions picks from the tokens the model actually sees (ε family, with corrections)."""
    sched = hk.schedules.block(24, 6, 4)
    calls = []
    hook = model.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((args[0].clone(), kwargs["logits_index"].clone())),
        with_kwargs=True)
    try:
        result = generate(model, sched, 3, 11, method="acs", eta=0.3, prompt=torch.tensor([[4, 5]]))
    finally:
        hook.remove()
    noise = LogLinearNoise()
    row_ids = torch.arange(3)[:, None] * 24 + torch.arange(24)
    frozen = torch.zeros(3, 24, dtype=torch.bool)
    frozen[:, :2] = True
    steps = [t for t in range(sched.num_steps) if sched.split(t)[0] != sched.split(t)[1]]
    # Replay: walk the schedule; every step with a change must be the next recorded call.
    call = checked = 0
    for t in steps:
        if call == len(calls):
            break
        a, b = sched.split(t)
        tokens = calls[call][0]  # x before step t, as the model saw it (uncached: cells [0, b))
        p = transfer_probability(noise, sched, sched.table[t, a:b], sched.table[t + 1, a:b]).expand(3, -1)
        change = hk.sampling.acs_decisions(tokens[:, a:b].reshape(-1), p.reshape(-1), 0.3, model.config.mask_id,
                                           11, t, row_ids=row_ids[:, a:b].reshape(-1),
                                           frozen=frozen[:, a:b].reshape(-1)).view(3, b - a)
        if not change.any():
            continue  # skipped step: no call recorded
        wanted = torch.zeros(3, tokens.shape[1], dtype=torch.bool)
        wanted[:, a:b] = change
        assert torch.equal(calls[call][1], wanted.reshape(-1).nonzero().squeeze(1)), f"step {t}"
        call, checked = call + 1, checked + 1
    assert checked == len(calls) == result.model_calls and checked > 5


# ---------------------------------------------------------------- CUDA graphs of the per-step forward


def test_step_graphs_replay_with_fresh_inputs_and_release_after_the_last_use():
    graphs = StepGraphs(Counter({"k": 3, "j": 1}), capture_by_rerunning)
    double = lambda inputs: inputs["a"] * 2  # noqa: E731
    outputs = [graphs(key, double, {"a": torch.tensor([float(i)])}).clone()
               for i, key in enumerate(["k", "j", "k", "k"])]
    assert [float(o) for o in outputs] == [0.0, 2.0, 4.0, 6.0]
    assert graphs.replays == 2 and graphs.graphs == {}  # "j" was never captured, "k" released
    with pytest.raises(RuntimeError, match="used more often than the plan said"):
        graphs("k", double, {"a": torch.ones(1)})


@pytest.mark.parametrize("method,context,config", [("acs", "causal", "aligned"), ("analytic", "causal", "shifted"),
                                                   ("euler", "block_causal", "aligned")])
def test_replayed_step_graphs_draw_the_same_tokens(model, gamma_model, monkeypatch, method, context, config):
    """The bookkeeping of cuda_graphs=True (keys, static inputs, replays), checked on the CPU with the
    capture twin that re-runs the captured call on the static inputs."""
    generate_module = importlib.import_module("hdlm_reference.generate")  # the package exports the function
    replays = []

    def capture(run):
        replay, output = capture_by_rerunning(run)
        return (lambda: (replays.append(1), replay())), output

    monkeypatch.setitem(generate_module._GRAPH_CAPTURE, "cpu", capture)
    m = gamma_model if method in ("analytic", "euler") else model
    args = (m, hk.schedules.block(16, 4, 3), 2, 9)
    kwargs = dict(method=method, kv_cache=True, context=context, config=config, bos_id=BOS,
                  prompt=torch.tensor([[1, 2, 3]]))
    eager = generate(*args, **kwargs)
    graphed = generate(*args, **kwargs, cuda_graphs=True)
    assert torch.equal(graphed.tokens, eager.tokens)
    assert len(replays) > 0


def test_cuda_graphs_need_a_cuda_device(model):
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device; got cpu"):
        generate(model, hk.schedules.block(16, 4, 3), 1, 0, kv_cache=True, context="causal", cuda_graphs=True)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["acs", "analytic"])
def test_cuda_graphs_draw_the_same_tokens_on_the_gpu(method):
    family = "gamma" if method == "analytic" else "epsilon"
    torch.manual_seed(0)
    m = DiT(ModelConfig.preset("tiny", family=family, attention_backend="triton")).cuda().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    args = (m, hk.schedules.block(64, 16, 8), 4, 3)
    kwargs = dict(method=method, kv_cache=True, context="causal", sampler_backend="kernels")
    eager = generate(*args, **kwargs)
    graphed = generate(*args, **kwargs, cuda_graphs=True)
    assert torch.equal(graphed.tokens, eager.tokens)


@pytest.mark.cuda
@pytest.mark.parametrize("method,attention", [("acs", "triton"), ("analytic", "triton"), ("analytic", "cuda")])
def test_step_loop_never_waits_for_the_gpu(method, attention):
    """On a GPU, CUDA's own sync detector: from the first model call on, only the final check syncs."""
    family = "gamma" if method == "analytic" else "epsilon"
    torch.manual_seed(0)
    m = DiT(ModelConfig.preset("tiny", family=family)).cuda().eval()
    hook = m.register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("warn"))
    try:
        with pytest.warns(UserWarning) as caught:
            generate(m, hk.schedules.block(64, 16, 8), 4, 3, method=method, kv_cache=True, context="causal",
                     attention_backend=attention, sampler_backend="kernels")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        hook.remove()
    assert len(syncs) == 1, [str(w.message) for w in syncs]
