"""Evaluation metrics (paper App. C): the Monte-Carlo perplexity upper bound (C.1, Alg. 1, Remarks 1),
the unigram entropy of samples and the generative perplexity under a judge model (C.2).

Perplexity bound (C.1)
======================

Notation (DESIGN §3): hyperschedule table ``τ[t, i]`` (``t = 0..T`` generation steps, ``i = 0..d-1``
positions, levels ``0..𝒯``, ``τ_0 = 𝒯``, ``τ_T = 0``), ``Δ_t^i = τ_t^i - τ_{t+1}^i >= 0`` the level
drop of position ``i`` during step ``t``. A *generation time* ``s ∈ [0, T)`` lies in step ``t = ⌊s⌋``
at fraction ``f = s - t``; along it every position follows the piecewise-linear level path

    ℓ_i(s) = τ_t^i - f·Δ_t^i,        u_i(s) = ℓ_i(s) / 𝒯 ∈ [0, 1]      (the diffusion time of position i).

For τ_Flat (``T = 𝒯``) every position has ``u = 1 - s/T``, uniform on (0, 1): Alg. 1's ``t ~ U(0, 1)``.
The forward process noises every position independently at its own time ``u_i``, so the continuous-time
ELBO of the factorized CTMC is a sum over positions of each position's own terms, taken while its
level moves (``Δ_t^i > 0``), i.e. while it is active. That is Remarks 1's "NLL only over the
τ_t^active tokens": settled and worthless positions have zero rate and contribute nothing, and every
position contributes its whole NLL bound during the steps where it is active, so dividing the sum by
``d`` gives a per-token NLL directly comparable to an AR model's (τ_Quench gives exactly the AR
chain rule, see below).

ε family (MDLM framework; HDCE-consistent). The bound of the model as an absorbing-diffusion generator
(the "original" sampler, ``η = 0``) whose masking probability at level ``ℓ`` is ``p = ℓ/𝒯``::

    -log p_θ(y) <= ∫_0^T Σ_i (Δ_t^i / ℓ_i(s)) · E_{x~q_s}[ 1{x^i = MASK} · -log p_θ(y^i | x) ] ds

with ``q_s``: ``x^i = MASK`` w.p. ``u_i(s)``, else ``y^i``. The weight is ``|dp_i/ds| / p_i``; for
τ_Flat this is MDLM's NELBO ``∫_0^1 (1/u) E[Σ_masked CE] du``, i.e. the masked-token term of HDCE
(Eq. 9, weight ``1/p_mask``). The other HDCE terms (unmasked tokens, weights ``λε/(1-p)``,
``λ(1-ε)/(1-p)``) train corrections and are not likelihood terms, and the ε substitutions are a
training corruption the generator never produces, so neither enters the bound. ``p = ℓ/𝒯`` (instead of
the trainer's ``1 - e^{-σ̄(ℓ/𝒯)} = (1 - 10⁻³)ℓ/𝒯``) is the schedule under which the samplers'
transfer probabilities ``1 - p_next/p_now`` are computed (the factor cancels) and which masks every
token at level 𝒯, so the all-MASK prior matches exactly (prior term 0); the ε model has no time
input, so nothing else depends on it. ``p_θ`` is the softmax over the ``N`` real tokens (the samplers
exclude MASK). With ``time="discrete"`` the estimate is instead the exact NELBO of the ``T``-step
original sampler (MDLM's discrete-time bound with per-position schedules)::

    -log p_θ(y) <= Σ_{t<T} Σ_i (Δ_t^i / τ_t^i) · E_{x~q_t}[ 1{x^i = MASK} · -log p_θ(y^i | x) ],

looser than the continuous bound (factorized steps), but for τ_Quench (``𝒯 = 1``, one position per
step, weight 1) it is exactly the autoregressive chain rule ``Σ_t -log p_θ(y^t | y^{<t})``.

γ family (SEDD framework). Denoising score entropy, diffusion-weighted per position (SEDD Thm 3.6 /
Campbell et al., with the per-position σ̄ of the hyperschedule)::

    -log p_θ(y) <= ∫_0^T Σ_i (Δ_t^i/𝒯)·σ̄'(u_i) · E_{x~q_s}[ SE_i(s_θ(x), x^i, y^i, σ̄(u_i)) ] ds
                   + Σ_i KL( q(· | y^i, σ̄(1)) ‖ p_base ),

``SE`` :func:`hdlm_reference.losses.score_entropy` (exact for ``Q_Hybrid^γ``, Eq. 7g), the log-scores
from the logits by :func:`hdlm_reference.losses.gamma_log_score`, ``q_s`` Eq. 7g at ``σ̄(u_i)`` (the
trainer's ``LogLinearNoise`` unless ``noise`` says otherwise; settled positions clean). The σ̄ schedule
is finite at ``u = 1`` (``σ̄(1) = -log eps``), so the forward process leaves a fraction
``A = e^{-(1-γ)σ̄(1)}`` of the tokens unmasked and an all-MASK prior would make the bound infinite; the
prior term uses ``p_base`` = the state at ``σ̄(1)`` of a uniformly random real token (``MASK`` w.p.
``1-A``, each real token w.p. ``A/N``), the y-independent prior of that form closest to the data. It is
``≈ A·log N`` nats per token (about 0.005 for γ = 0.01, eps = 1e-3, N = 256), reported separately as
``prior`` and included in the bound. ``time="discrete"`` is not defined for this family (the DWDSE is a
continuous-time bound).

Monte Carlo (Alg. 1). Per sequence, ``M = num_samples`` draws ``s_m = T·(m + U_m)/M``, ``m < M``
(stratified sampling of the time; each stratum gets one draw, so the estimate is unbiased and its
variance is at most that of i.i.d. draws; ``M`` a multiple of ``T`` visits every step equally often,
which makes the τ_Quench discrete bound exact). One ``s_m`` is shared by the sequences of a batch (one
forward pass, as the official code uses one time per batch), with independent noise per sequence.
Each draw contributes ``T·Σ_i w_i(s_m)·loss_i`` (``T`` = the inverse density of ``s``); the estimate of
a sequence is their mean plus the prior; Alg. 1 then sums over sequences, divides by the token count
and exponentiates. The model input at step ``t`` is exactly what the samplers feed: cells ``[0, b)``
(``[0, b]`` SHIFTED) of ``hk.masks.inference(sched, t, ...)`` — worthless positions are never fed.

Departures from the official evaluation (notes §6.1, §9.25), on purpose: the official code always
evaluates ALIGNED with no attention mask and no hyperschedule, computes the ε-style masked CE bound for
both families (feeding γ models a constant σ̄ = 1e-3), and never restricts to active tokens; here the
bound uses the run's config, hyperschedule, masks and family-specific bound, as the paper describes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

import hdlm_kernels as hk
from hdlm_kernels.masks.inference import CONFIGS, CONTEXTS, WINDOWS, check_choice
from hdlm_kernels.schedules import Hyperschedule

from . import losses as L
from . import noise as N

__all__ = [
    "TIMES", "SequenceBound", "BoundResult", "nll_bound", "perplexity_bound", "bound_options", "prior_nll",
    "token_batches", "EntropyResult", "unigram_entropy", "GenerativePerplexity", "JudgeUnavailableError",
    "generative_perplexity",
]

TIMES = ("continuous", "discrete")


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------

class SequenceBound(NamedTuple):
    """Per-sequence output of :func:`nll_bound` (all float64, nats per *sequence*).

    total: ``[B]`` the NLL upper bound (MC mean over the draws + prior).
    draws: ``[B, M]`` the diffusion term of every draw (``T·Σ_i w_i·loss_i``), without the prior.
    prior: ``[B]`` the prior term (0 for the ε family).
    """

    total: torch.Tensor
    draws: torch.Tensor
    prior: torch.Tensor

    @property
    def mc_variance(self) -> torch.Tensor:
        """``[B]`` variance of ``total`` from the draws (``var(draws)/M``, i.i.d. formula: conservative
        for stratified draws); zeros when ``M = 1``."""
        M = self.draws.shape[1]
        if M < 2:
            return torch.zeros_like(self.total)
        return self.draws.var(dim=1, unbiased=True) / M


@dataclass(frozen=True)
class BoundResult:
    """Alg. 1's output: the per-token NLL upper bound and its perplexity.

    Attributes:
        nll: bound on the NLL in nats per token (``Σ_seq total / (num_sequences·d)``).
        perplexity: ``exp(nll)``.
        mc_stderr: Monte-Carlo standard error of ``nll`` (given the data), nats per token.
        prior: the prior term's share of ``nll`` (nats per token; 0 for the ε family).
        num_sequences, num_tokens, num_samples: sizes (``num_samples`` = M draws per sequence).
        time: ``"continuous"`` or ``"discrete"``.
        per_sequence: float64 ``[num_sequences]`` total bound of every sequence (nats).
    """

    nll: float
    perplexity: float
    mc_stderr: float
    prior: float
    num_sequences: int
    num_tokens: int
    num_samples: int
    time: str
    per_sequence: torch.Tensor

    @property
    def bits_per_token(self) -> float:
        return self.nll / math.log(2.0)


# ---------------------------------------------------------------------------------------------
# the bound
# ---------------------------------------------------------------------------------------------

def _check_positive_int(name: str, value, context: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{context}: {name} must be an int >= 1, got {value!r}")
    return value


def _model_device(model) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _sedd_process(vocab_size: int, gamma: float):
    if gamma == 0.0:
        return N.Absorb(vocab_size)
    if gamma == 1.0:
        return N.Uniform(vocab_size)
    return N.GammaHybrid(vocab_size, gamma)


def prior_nll(process, sigma_bar_max: float) -> float:
    """Per-token prior term of the γ bound: ``KL(q(· | y, σ̄_max) ‖ p_base)`` in nats.

    ``q(·|y, σ̄)`` is Eq. 7g's column for a real token ``y`` (``MASK`` w.p. ``1-A``, ``y`` w.p.
    ``AB + A(1-B)/N``, any other real token w.p. ``A(1-B)/N``; ``A = e^{-(1-γ)σ̄}``, ``B = e^{-γσ̄}``) and
    ``p_base`` the same column averaged over a uniform ``y`` (``MASK`` w.p. ``1-A``, every real token
    ``A/N``). The value does not depend on ``y``::

        KL = q_y·log(q_y·N/A) + (N-1)·(A(1-B)/N)·log(1-B).

    Exactly 0 for ``σ̄_max = inf`` on an absorbing-type process (``A = 0``).
    """
    if not isinstance(process, N._SEDDProcess):
        raise TypeError(f"prior_nll: process must be Absorb, Uniform or GammaHybrid, got {type(process).__name__}")
    sigma = torch.tensor(float(sigma_bar_max), dtype=torch.float64)
    if not sigma >= 0:
        raise ValueError(f"prior_nll: sigma_bar_max must be >= 0, got {sigma_bar_max}")
    A, B = process.decays(sigma)
    if float(A) == 0.0:
        return 0.0
    n = process.num_tokens
    q_y = A * B + A * (1.0 - B) / n
    q_other = A * (1.0 - B) / n
    kl = torch.xlogy(q_y, q_y * n / A) + (n - 1) * torch.xlogy(q_other, 1.0 - B)
    return float(kl.clamp_min(0.0))


def nll_bound(model, tokens: torch.Tensor, sched: Hyperschedule, *, num_samples: int = 16, seed: int = 0,
              generator: torch.Generator | None = None, family: str | None = None, gamma: float | None = None,
              config: str = "aligned", context: str = "block_causal", window: str = "full",
              bos_id: int | None = None, time: str = "continuous", noise=None) -> SequenceBound:
    """Monte-Carlo upper bound on ``-log p_θ(y)`` of each sequence of ``tokens`` (module docstring).

    Args:
        model: an ``hdlm_reference.DiT`` or any module with its ``forward(input_ids, position_ids, mask,
            sigma=None, logits_rows=None)`` and a ``config`` with ``vocab_size`` (MASK = the last id) and,
            unless given here, ``family`` and ``gamma``. Run in eval mode under ``no_grad`` (its mode is
            restored afterwards).
        tokens: int ``[B, d]`` clean sequences, ids in ``[0, vocab_size - 1)`` (no MASK), ``d = sched.length``.
        sched: the hyperschedule the model generates with (``hk.schedules.flat(d, 𝒯)`` for standard
            diffusion: the bound does not depend on its 𝒯 in continuous time); must be monotone.
        num_samples: ``M``, Monte-Carlo draws per sequence.
        seed, generator: the draws come from ``generator`` (a CPU ``torch.Generator``) when given, else
            from a fresh one seeded with ``seed``. Noise is drawn on the CPU, so the result does not
            depend on the model's device beyond its arithmetic.
        family: ``"epsilon"`` or ``"gamma"`` (default ``model.config.family``).
        gamma: γ of the γ-hybrid process (default ``model.config.gamma``); 0 gives SEDD absorb, 1 uniform.
        config, context, window, bos_id: the inference layout, as for ``hk.masks.inference`` and
            :func:`hdlm_reference.generate.generate` (``bos_id`` is needed for SHIFTED).
        time: ``"continuous"`` (default; the bound of the sampler in the limit of fine steps along the
            hyperschedule's level path) or ``"discrete"`` (ε family only: the exact bound of the
            ``T``-step original sampler).
        noise: σ̄ schedule of the γ family (default ``LogLinearNoise()``, the trainer's); unused for ε.

    Returns:
        :class:`SequenceBound` (nats per sequence, float64, on the CPU).
    """
    context_name = "nll_bound"
    check_choice("config", config, CONFIGS, context_name)
    check_choice("context", context, CONTEXTS, context_name)
    check_choice("window", window, WINDOWS, context_name)
    check_choice("time", time, TIMES, context_name)
    _check_positive_int("num_samples", num_samples, context_name)
    if not isinstance(sched, Hyperschedule):
        raise TypeError(f"{context_name}: sched must be a Hyperschedule, got {type(sched).__name__}")
    if not sched.is_monotone:
        raise ValueError(f"{context_name}: the {sched.kind} schedule is not monotone left to right, so its steps "
                         "have no inference mask (hk.masks.inference needs contiguous settled/active ranges)")
    model_config = getattr(model, "config", None)
    V = getattr(model_config, "vocab_size", None)
    if isinstance(V, bool) or not isinstance(V, int) or V < 2:
        raise ValueError(f"{context_name}: model.config.vocab_size must be an int >= 2, got {V!r}")
    family = family if family is not None else getattr(model_config, "family", "epsilon")
    check_choice("family", family, ("epsilon", "gamma"), context_name)
    if family == "gamma" and time == "discrete":
        raise ValueError(f"{context_name}: time='discrete' is defined for the epsilon family only (the γ family's "
                         "DWDSE is a continuous-time bound), got family='gamma'")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point \
            or tokens.dtype == torch.bool:
        raise ValueError(f"{context_name}: tokens must be an integer tensor [B, d], got "
                         f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
    B, d = tokens.shape
    if d != sched.length:
        raise ValueError(f"{context_name}: tokens have length d={d} but sched.length={sched.length}")
    mask_id = V - 1
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= mask_id):
        raise ValueError(f"{context_name}: tokens must be real token ids in [0, {mask_id}) (MASK = {mask_id} "
                         f"excluded), got values in [{int(tokens.min())}, {int(tokens.max())}]")
    shifted = config == "shifted"
    if shifted and (isinstance(bos_id, bool) or not isinstance(bos_id, int) or not 0 <= bos_id < V):
        raise ValueError(f"{context_name}: config='shifted' needs bos_id, a token id in [0, {V - 1}], got {bos_id!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    elif generator.device.type != "cpu":
        raise ValueError(f"{context_name}: generator must be a CPU torch.Generator, got one on {generator.device}")

    process = None
    prior = torch.zeros(B, dtype=torch.float64)
    if family == "gamma":
        gamma = gamma if gamma is not None else getattr(model_config, "gamma", None)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
            raise ValueError(f"{context_name}: the gamma family needs gamma in [0, 1], got {gamma!r}")
        process = _sedd_process(V, float(gamma))
        noise = noise if noise is not None else N.LogLinearNoise()
        sigma_max = float(noise(torch.ones((), dtype=torch.float64))[0])
        prior += d * prior_nll(process, sigma_max)

    device = _model_device(model)
    y = tokens.detach().to("cpu", torch.long)
    table = sched.table
    T, levels_top = sched.num_steps, sched.num_levels
    M = num_samples
    offsets = torch.rand(M, generator=generator, dtype=torch.float64)
    times = T * (torch.arange(M, dtype=torch.float64) + offsets) / M
    draws = torch.zeros(B, M, dtype=torch.float64)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for m in range(M):
                s = float(times[m])
                t = min(int(math.floor(s)), T - 1)
                fraction = s - t if time == "continuous" else 0.0
                a, b = sched.split(t)
                now = table[t, :b].to(torch.float64)
                drop = now - table[t + 1, :b].to(torch.float64)               # Δ_t^i >= 0
                level = now - fraction * drop                                  # ℓ_i(s)
                moving = drop > 0                                              # only in [a, b)
                if family == "epsilon":
                    p_mask = level / levels_top
                    weight = torch.where(moving, drop / torch.where(moving, level, 1.0), 0.0)
                    masked = torch.rand(B, b, generator=generator, dtype=torch.float64) < p_mask
                    x = torch.where(masked, mask_id, y[:, :b])
                    sigma_cells = None
                else:
                    u = level / levels_top
                    sigma64, dsigma64 = noise(u)
                    # stored in float32 as the trainer does, and sampled from the stored value
                    sigma = torch.where(level == 0, 0.0, sigma64).to(torch.float32)
                    weight = torch.where(moving, drop / levels_top * dsigma64, 0.0)
                    x = process.sample(y[:, :b], sigma.expand(B, b), generator)
                    sigma_cells = torch.cat([torch.zeros(1), sigma]) if shifted else sigma
                inputs = torch.cat([torch.full((B, 1), bos_id, dtype=torch.long), x], 1) if shifted else x
                num_cells = b + 1 if shifted else b
                mask = hk.masks.inference(sched, t, config, context, window)
                positions = torch.arange(num_cells).unsqueeze(0)
                rows = torch.arange(a, b)  # cell a + j predicts position a + j in both configs
                logits = model(inputs.to(device), positions.to(device), mask.to(device),
                               sigma=None if sigma_cells is None else sigma_cells.unsqueeze(0).to(device),
                               logits_rows=rows.to(device))
                logits = logits.to("cpu", torch.float64)                      # [B, b - a, V]
                target = y[:, a:b]
                w = weight[a:b]
                if family == "epsilon":
                    log_probs = logits[..., :mask_id].log_softmax(-1)
                    nll = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                    term = torch.where(masked[:, a:b] & (w > 0), w * nll, 0.0)
                else:
                    x_rows = x[:, a:b]
                    sigma_rows = sigma[a:b].to(torch.float64).expand(B, b - a)
                    log_score = L.gamma_log_score(logits, sigma_rows, x_rows)
                    se = L.score_entropy(process, log_score, x_rows, target, sigma_rows)
                    term = torch.where(w > 0, w * se, 0.0)
                draws[:, m] = T * term.sum(-1)
    finally:
        model.train(was_training)
    return SequenceBound(draws.mean(1) + prior, draws, prior)


def perplexity_bound(model, batches: Iterable[torch.Tensor], sched: Hyperschedule, *, num_samples: int = 16,
                     seed: int = 0, progress: bool = False, **options) -> BoundResult:
    """Alg. 1: the perplexity upper bound over a data set.

    Args:
        batches: iterable of int ``[B, d]`` batches (e.g. :func:`token_batches`).
        num_samples: ``M`` draws per sequence. seed: batch ``k`` draws from a generator seeded with
            ``(seed, k)``, so a batch's estimate does not depend on the batches before it.
        progress: show a tqdm bar over the batches.
        options: passed to :func:`nll_bound` (``family``, ``gamma``, ``config``, ``context``, ``window``,
            ``bos_id``, ``time``, ``noise``; see :func:`bound_options`).

    Returns:
        :class:`BoundResult`: ``nll = Σ_seq bound / (num_sequences·d)``, ``perplexity = exp(nll)``.
    """
    _check_positive_int("num_samples", num_samples, "perplexity_bound")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"perplexity_bound: seed must be an int >= 0, got {seed!r}")
    iterator = batches
    if progress:
        from tqdm import tqdm

        iterator = tqdm(batches, desc="nll bound", unit="batch")
    totals, variances, priors = [], [], []
    for index, batch in enumerate(iterator):
        generator = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2 ** 63))
        result = nll_bound(model, batch, sched, num_samples=num_samples, generator=generator, **options)
        totals.append(result.total)
        variances.append(result.mc_variance)
        priors.append(result.prior)
    if not totals:
        raise ValueError("perplexity_bound: batches is empty")
    total = torch.cat(totals)
    n_tokens = total.numel() * sched.length
    nll = float(total.sum()) / n_tokens
    return BoundResult(nll=nll, perplexity=math.exp(nll), mc_stderr=math.sqrt(float(torch.cat(variances).sum())) / n_tokens,
                       prior=float(torch.cat(priors).sum()) / n_tokens, num_sequences=total.numel(),
                       num_tokens=n_tokens, num_samples=num_samples, time=options.get("time", "continuous"),
                       per_sequence=total)


def bound_options(objective) -> dict:
    """:func:`nll_bound` options of a trained run's ``ObjectiveConfig`` (family, γ, config, attention
    context, window, BOS); combine with ``objective.schedule_for(d)`` for the schedule."""
    return dict(family=objective.family, gamma=objective.gamma if objective.family == "gamma" else None,
                config=objective.config, context=objective.attention_context, window=objective.window,
                bos_id=objective.bos_id)


def token_batches(dataset, batch_size: int, num_batches: int | None = None) -> list[torch.Tensor]:
    """Fixed chunks of a ``TokenDataset`` (chunk ``i`` = tokens ``[i·L, (i+1)·L)``) in batches of
    ``batch_size`` (the last one may be smaller; nothing is repeated), at most ``num_batches`` of them."""
    _check_positive_int("batch_size", batch_size, "token_batches")
    if num_batches is not None:
        _check_positive_int("num_batches", num_batches, "token_batches")
    count = len(dataset)
    if num_batches is not None:
        count = min(count, num_batches * batch_size)
    if count == 0:
        raise ValueError(f"token_batches: the data set holds no whole chunk of {dataset.seq_len} tokens")
    starts = torch.arange(count) * dataset.seq_len
    return [dataset.windows(starts[i:i + batch_size].numpy()) for i in range(0, count, batch_size)]


# ---------------------------------------------------------------------------------------------
# unigram entropy of samples (C.2)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EntropyResult:
    """``mean``/``std`` (population std, as numpy's default) of the per-sample unigram entropies in nats;
    ``per_sample`` float64 ``[S]``."""

    mean: float
    std: float
    per_sample: torch.Tensor


def unigram_entropy(samples, exclude: Sequence[int] | int | None = None) -> EntropyResult:
    """Entropy of each sample's token histogram, ``H = -Σ_v p_v log p_v`` with ``p_v = count_v / length``
    (nats), and its mean and std across samples (App. C.2's diversity measure; the official
    ``compute_entropy`` computes the same on GPT-2 re-tokenized text, with ``+1e-8`` inside the log).

    Args:
        samples: int tensor ``[S, L]`` or a sequence of 1-D int sequences (lengths may differ).
        exclude: ids left out of the histogram (e.g. MASK). A sample with no token left has entropy 0.
    """
    rows = list(samples) if not isinstance(samples, torch.Tensor) else list(samples.reshape(samples.shape[0], -1)
                                                                             if samples.dim() > 1 else [samples])
    if not rows:
        raise ValueError("unigram_entropy: samples is empty")
    excluded = torch.as_tensor([] if exclude is None else ([exclude] if isinstance(exclude, int) else list(exclude)),
                               dtype=torch.long)
    values = []
    for row in rows:
        ids = torch.as_tensor(row).reshape(-1).long()
        if ids.dtype.is_floating_point:
            raise TypeError("unigram_entropy: samples must hold integer token ids")
        if excluded.numel():
            ids = ids[~torch.isin(ids, excluded)]
        if ids.numel() == 0:
            values.append(0.0)
            continue
        counts = torch.unique(ids, return_counts=True)[1].to(torch.float64)
        p = counts / counts.sum()
        values.append(float(-(p * p.log()).sum()))
    per_sample = torch.tensor(values, dtype=torch.float64)
    return EntropyResult(mean=float(per_sample.mean()), std=float(per_sample.std(unbiased=False)),
                         per_sample=per_sample)


# ---------------------------------------------------------------------------------------------
# generative perplexity (C.2, Alg. 2)
# ---------------------------------------------------------------------------------------------

class JudgeUnavailableError(RuntimeError):
    """The judge model cannot be loaded here (``transformers`` missing, or the model not available offline)."""


@dataclass(frozen=True)
class GenerativePerplexity:
    """``perplexity = exp(nll)``, ``nll`` = mean judge NLL over all scored tokens (nats, Alg. 2);
    ``per_sample_nll`` float64 ``[S]`` (mean per sample, NaN where a sample has no scored token)."""

    perplexity: float
    nll: float
    num_tokens: int
    per_sample_nll: torch.Tensor


def _hf_judge(name: str, device, batch_size: int, max_length: int | None) -> Callable[[list[str]], list[torch.Tensor]]:
    """A judge from a Hugging Face causal LM, loaded offline (``local_files_only``)."""
    try:
        import transformers  # noqa: F401  (optional dependency, imported only here)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise JudgeUnavailableError(
            f"generative_perplexity: judge={name!r} needs the optional package `transformers` (pip install "
            "transformers), which is not installed; or pass a callable judge instead") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        lm = AutoModelForCausalLM.from_pretrained(name, local_files_only=True).to(device).eval()
    except (OSError, ValueError) as error:
        raise JudgeUnavailableError(
            f"generative_perplexity: cannot load the judge model {name!r} offline ({error}); download it into the "
            "Hugging Face cache first (no network access is attempted) or pass a local directory or a callable "
            "judge") from error
    limit = max_length or getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", 1024)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def judge(texts: list[str]) -> list[torch.Tensor]:
        out = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            nlls = []
            # windows of limit - 1 tokens, each after BOS: every token is scored once
            for start in range(0, len(ids), limit - 1):
                chunk = torch.tensor([[bos] + ids[start:start + limit - 1]], device=device)
                with torch.no_grad():
                    logits = lm(chunk).logits[0, :-1].float()
                nlls.append(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="none").cpu())
            out.append(torch.cat(nlls) if nlls else torch.zeros(0))
        return out

    return judge


def generative_perplexity(samples, judge: str | Callable[[list[str]], list[torch.Tensor]] = "gpt2-large", *,
                          decode: Callable | None = None, device=None, batch_size: int = 4,
                          max_length: int | None = None) -> GenerativePerplexity:
    """Generative perplexity of samples under a judge LM (App. C.2, Alg. 2): samples are turned into text,
    re-tokenized and scored by the judge; ``PPL_gen = exp(Σ NLL / #tokens)`` over all samples (the global
    token mean of Alg. 2, not the official code's mean of per-sample perplexities, notes §6.3).

    Every generated token is active at some step of any hyperschedule, so all of a sample is scored; pass
    samples without their prompt to score the generated part only.

    Args:
        samples: texts (``list[str]``), or token sequences (int tensor ``[S, L]`` / list of lists) with
            ``decode`` (e.g. ``ByteTokenizer().decode``) turning one sequence into text.
        judge: a Hugging Face model name or local directory (needs the optional ``transformers`` package and
            the model in the local cache: nothing is downloaded; the paper uses ``"gpt2-large"``), or a
            callable ``judge(texts) -> list of 1-D float tensors`` of per-token NLLs (nats) of each text.
        device: device of the Hugging Face judge (default CPU). batch_size: texts per judge call.
        max_length: judge context length (default the model's); longer texts are scored in windows.

    Raises:
        JudgeUnavailableError: the named judge cannot be loaded here.
    """
    _check_positive_int("batch_size", batch_size, "generative_perplexity")
    if isinstance(samples, torch.Tensor):
        samples = samples.tolist() if samples.dim() > 1 else [samples.tolist()]
    samples = list(samples)
    if not samples:
        raise ValueError("generative_perplexity: samples is empty")
    texts = []
    for sample in samples:
        if isinstance(sample, str):
            texts.append(sample)
        elif decode is None:
            raise ValueError("generative_perplexity: samples hold token ids; pass decode (ids -> text), e.g. "
                             "hdlm_reference.tokenizer.ByteTokenizer().decode")
        else:
            texts.append(decode(sample))
    if isinstance(judge, str):
        judge_fn = _hf_judge(judge, torch.device(device) if device is not None else torch.device("cpu"),
                             batch_size, max_length)
    elif callable(judge):
        judge_fn = judge
    else:
        raise TypeError(f"generative_perplexity: judge must be a model name or a callable, got {type(judge).__name__}")
    per_sample = []
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        nlls = judge_fn(chunk)
        if len(nlls) != len(chunk):
            raise ValueError(f"generative_perplexity: the judge returned {len(nlls)} results for {len(chunk)} texts")
        for values in nlls:
            values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
            total += float(values.sum())
            count += values.numel()
            per_sample.append(float(values.mean()) if values.numel() else float("nan"))
    if count == 0:
        raise ValueError("generative_perplexity: the judge scored no token")
    nll = total / count
    return GenerativePerplexity(perplexity=math.exp(nll), nll=nll, num_tokens=count,
                                per_sample_nll=torch.tensor(per_sample, dtype=torch.float64))
