"""Evaluation metrics (paper App. C): the Monte-Carlo perplexity upper bound (C.1, Alg. 1, Remarks 1),
the unigram entropy of samples and the generative perplexity under a judge model (C.2).

Perplexity bound (C.1)
======================

Notation (docs/conventions.md): hyperschedule table ``τ[t, i]`` (``t = 0..T`` generation steps, ``i = 0..d-1``
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
``d`` (Alg. 1's ``N_total = B·d``) gives a bound on ``-log p_θ(y)/d``, directly comparable to an AR
model's per-token NLL (τ_Quench gives exactly the AR chain rule, see below). Interpretation: Remarks 1
does not say how the active-only losses are normalized; dividing each step's loss by its number of
active tokens instead would bound the likelihood of nothing unless every step had the same number of
active positions (τ_Slide's warm-up and tail steps do not), so each position's terms are summed and the
total divided by ``d``.

ε family (MDLM framework; HDCE-consistent). The bound of the model as an absorbing-diffusion generator
(the "original" sampler, ``η = 0``; ACS with ``η > 0`` has no tractable likelihood) whose masking
probability at level ``ℓ`` is ``p = ℓ/𝒯``::

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
``1-A``, each real token w.p. ``A/N``; the average of ``q(·|y, σ̄(1))`` over a uniform ``y``). It is
``≈ A·log N`` nats per token (about 0.005 for γ = 0.01, eps = 1e-3, N = 256), reported separately as
``prior`` and included in the bound. The repository's γ sampler starts from all MASK (the σ̄ → ∞
limit), for which the bound with a finite ``σ̄(1)`` would be infinite: the reported bound is that of
the same sampler started from ``p_base``, whose initial state differs in ``A·d`` tokens on average.
``time="discrete"`` is not defined for this family (the DWDSE is a continuous-time bound).

Monte Carlo (Alg. 1) and variance reduction. Per sequence, ``M = num_samples`` draws of the generation
time, each contributing ``T·J·Σ_i w_i(s)·loss_i`` (``T`` = the inverse density of ``s``; ``J`` below),
averaged, plus the prior; Alg. 1 then sums over sequences, divides by the token count and exponentiates.

1. Stratified time: sequence ``j`` draws ``g_{j,m} = T·(π_j(m) + U_{j,m})/M``, ``m < M``, with
   ``U ~ U(0, 1)`` and ``π_j`` a random permutation: every stratum ``[Tk/M, T(k+1)/M)`` gets exactly one
   draw per sequence, so the estimate is unbiased with at most the variance of i.i.d. draws, and ``M``
   a multiple of ``T`` visits every step equally often (which makes the τ_Quench discrete bound exact,
   not just unbiased). The permutations put the sequences of one forward pass at different times, so
   their errors are independent and the data-set estimate improves with the number of sequences too
   (a time shared by the batch, as the official code does, would correlate them).
2. Optional arcsine warp inside each step (``time_warp=True``, continuous time): with ``t = ⌊g⌋``,
   ``v = g - t``, the fraction is ``f = (1 - cos πv)/2`` with Jacobian ``J = (π/2)·sin πv =
   π·sqrt(f(1-f))`` (``J = 1`` without the warp), an importance-sampling change of variable that puts
   more draws near both ends of a step. The weights diverge there — ``1/ℓ`` as a position reaches level
   0 (ε; and the γ rates at small σ̄), ``σ̄'`` as it leaves level 𝒯 (γ) — on rare events (a masked,
   substituted or still unmasked token), so under a uniform ``f`` the per-draw variance grows without
   bound with the resolution of the draws (logarithmically for the ``1/ℓ`` weight); the warp's density
   ``∝ 1/sqrt(f(1-f))`` makes it finite (for the γ family when γ < 1/2) and the estimate's distribution
   less skewed. It is off by default: at the draw counts used in practice (M ≈ 24-32 per sequence) it
   raised the RMS error by 3-35% in our measurements (exact Markov-chain denoisers of both families on
   τ_Flat, τ_Block and τ_Quench, and a uniform model), the tail it removes costing less than the
   density it takes from the middle of the steps.

Draw ``m`` of a batch is one forward pass in which row ``j`` is fed exactly what the samplers feed at
its own step ``t_j``: cells ``[0, b_j)`` (``[0, b_j]`` SHIFTED) under
``hk.masks.inference(sched, t_j, ...)``, padded to the longest row with cells no row attends to;
worthless positions are never attended. Logits are computed for the active rows only.

Departures from the official evaluation (docs/official-code.md §7, docs/official-differences.md), on purpose: the official code always
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
from hdlm_kernels.masks import IntervalMask
from hdlm_kernels.masks.inference import CONFIGS, CONTEXTS, WINDOWS, check_choice
from hdlm_kernels.schedules import Hyperschedule

from . import conditioning as C
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
    draws: ``[B, M]`` the diffusion term of every draw (``T·J·Σ_i w_i·loss_i``), without the prior.
    prior: ``[B]`` the prior term (0 for the ε family).
    """

    total: torch.Tensor
    draws: torch.Tensor
    prior: torch.Tensor

    @property
    def mc_variance(self) -> torch.Tensor:
        """``[B]`` Monte-Carlo variance of each ``total`` (``var(draws)/M``, the i.i.d. formula, which
        overestimates it for stratified draws); zeros when ``M = 1``."""
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
        raise TypeError("prior_nll: process must be Absorb, Uniform or GammaHybrid, got "
                        f"{type(process).__name__}")
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


def _step_mask(cache: dict, sched: Hyperschedule, t: int, config: str, context: str,
               window: str) -> IntervalMask:
    if t not in cache:
        cache[t] = hk.masks.inference(sched, t, config, context, window)
    return cache[t]


def _row_masks(step_masks: list[IntervalMask], num_cells: int) -> IntervalMask:
    """One ``[B, num_cells]`` mask from per-sequence inference masks ``[1, K_j]`` (``K_j <= num_cells``): the
    extra cells of a shorter sequence are padding that attends to nothing, and no row of it reaches them."""
    def padded(value):
        return torch.nn.functional.pad(value, (0, num_cells - value.shape[1]))

    return IntervalMask(torch.cat([padded(m.prefix_end) for m in step_masks]),
                        torch.cat([padded(m.window_start) for m in step_masks]),
                        torch.cat([padded(m.window_end) for m in step_masks]), num_cells)


def nll_bound(model, tokens: torch.Tensor, sched: Hyperschedule, *, num_samples: int = 16, seed: int = 0,
              generator: torch.Generator | None = None, family: str | None = None, gamma: float | None = None,
              config: str = "aligned", context: str = "block_causal", window: str = "full",
              bos_id: int | None = None, time: str = "continuous", time_warp: bool = False,
              noise=None, conditioning: str | None = None) -> SequenceBound:
    """Monte-Carlo upper bound on ``-log p_θ(y)`` of each sequence of ``tokens`` (module docstring).

    Args:
        model: an ``hdlm_reference.DiT`` or any module with its ``forward(input_ids, position_ids, mask,
            sigma=None, logits_rows=None)`` and a ``config`` with ``vocab_size`` (MASK = the last id) and,
            unless given here, ``family`` and ``gamma``. Run in eval mode under ``no_grad`` (its mode is
            restored afterwards).
        tokens: int ``[B, d]`` clean sequences, ids in ``[0, vocab_size - 1)`` (no MASK),
            ``d = sched.length``.
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
        time_warp: draw the time inside each step through the arcsine change of variable (module
            docstring: finite variance, less skew, but a larger error at small M); ``False`` (default)
            draws it uniformly. Both are unbiased.
        noise: σ̄ schedule of the γ family (default: the model's recorded ``model.noise``, else
            ``LogLinearNoise()``, the trainer's); unused for ε.
        conditioning: ``"paper"`` or ``"official"`` (default: the model's recorded
            ``model.conditioning``, else ``"paper"``): the γ family's time along the level path and the
            σ̄ fed to clean cells (:func:`hdlm_reference.conditioning.process_time`); the official map
            gives the bound of the official sampler's path. Unused for ε.

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
        raise ValueError(f"{context_name}: the {sched.kind} schedule is not monotone left to right, so its "
                         "steps have no inference mask (hk.masks.inference needs contiguous settled/active "
                         "ranges)")
    model_config = getattr(model, "config", None)
    V = getattr(model_config, "vocab_size", None)
    if isinstance(V, bool) or not isinstance(V, int) or V < 2:
        raise ValueError(f"{context_name}: model.config.vocab_size must be an int >= 2, got {V!r}")
    family = family if family is not None else getattr(model_config, "family", "epsilon")
    check_choice("family", family, ("epsilon", "gamma"), context_name)
    if family == "gamma" and time == "discrete":
        raise ValueError(f"{context_name}: time='discrete' is defined for the epsilon family only (the γ "
                         "family's DWDSE is a continuous-time bound), got family='gamma'")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point \
            or tokens.dtype == torch.bool:
        given = f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}"
        raise ValueError(f"{context_name}: tokens must be an integer tensor [B, d], got {given}")
    B, d = tokens.shape
    if B == 0:
        raise ValueError(f"{context_name}: tokens must hold at least one sequence, got shape "
                         f"{tuple(tokens.shape)}")
    if d != sched.length:
        raise ValueError(f"{context_name}: tokens have length d={d} but sched.length={sched.length}")
    mask_id = V - 1
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= mask_id):
        raise ValueError(f"{context_name}: tokens must be real token ids in [0, {mask_id}) (MASK = {mask_id} "
                         f"excluded), got values in [{int(tokens.min())}, {int(tokens.max())}]")
    shifted = config == "shifted"
    if shifted and (isinstance(bos_id, bool) or not isinstance(bos_id, int) or not 0 <= bos_id < V):
        raise ValueError(f"{context_name}: config='shifted' needs bos_id, a token id in [0, {V - 1}], "
                         f"got {bos_id!r}")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    elif generator.device.type != "cpu":
        raise ValueError(f"{context_name}: generator must be a CPU torch.Generator, got one on "
                         f"{generator.device}")

    process = None
    prior = torch.zeros(B, dtype=torch.float64)
    if family == "gamma":
        gamma = gamma if gamma is not None else getattr(model_config, "gamma", None)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
            raise ValueError(f"{context_name}: the gamma family needs gamma in [0, 1], got {gamma!r}")
        process = _sedd_process(V, float(gamma))
        if noise is None:
            noise = getattr(model, "noise", None) or N.LogLinearNoise()
        if conditioning is None:
            conditioning = getattr(model, "conditioning", "paper")
        top = torch.tensor(float(sched.num_levels), dtype=torch.float64)
        sigma_max = float(noise(C.process_time(conditioning, top, sched.num_levels)[0])[0])
        clean_sigma = C.sigma_table(conditioning, noise, sched.num_levels).clean
        prior += d * prior_nll(process, sigma_max)

    device = _model_device(model)
    y = tokens.detach().to("cpu", torch.long)
    table, splits = sched.table, sched.splits
    T, levels_top, M = sched.num_steps, sched.num_levels, num_samples
    # stratified times, strata visited in a random order per sequence (module docstring)
    order = torch.rand(B, M, generator=generator).argsort(1)
    offsets = torch.rand(B, M, generator=generator, dtype=torch.float64)
    times = T * (order.to(torch.float64) + offsets) / M
    masks: dict[int, IntervalMask] = {}
    draws = torch.zeros(B, M, dtype=torch.float64)
    batch_rows = torch.arange(B)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for m in range(M):
                s = times[:, m]
                t = s.floor().long().clamp(max=T - 1)                          # [B]
                jacobian = torch.ones(B, dtype=torch.float64)
                fraction = torch.zeros(B, dtype=torch.float64)
                if time == "continuous":
                    fraction = s - t
                    if time_warp:  # arcsine change of variable inside the step
                        jacobian = 0.5 * math.pi * torch.sin(math.pi * fraction)
                        fraction = 0.5 * (1.0 - torch.cos(math.pi * fraction))
                a, b = splits[t, 0], splits[t, 1]                              # [B] each
                width = int(b.max())                                           # positions fed
                now = table[t, :width].to(torch.float64)                       # [B, width]
                drop = now - table[t + 1, :width].to(torch.float64)            # Δ_t^i >= 0
                level = now - fraction[:, None] * drop                         # ℓ_i(s)
                moving = drop > 0                                              # only inside [a, b)
                if family == "epsilon":
                    weight = torch.where(moving, drop / torch.where(moving, level, 1.0), 0.0)
                    uniform = torch.rand(B, width, generator=generator, dtype=torch.float64)
                    masked = uniform < level / levels_top
                    x = torch.where(masked, mask_id, y[:, :width])
                    sigma_cells = None
                else:
                    if conditioning == "paper":
                        sigma64, dsigma64 = noise(level / levels_top)
                        weight = torch.where(moving, drop / levels_top * dsigma64, 0.0)
                    else:
                        time64, rate = C.process_time(conditioning, level, levels_top)
                        sigma64, dsigma64 = noise(time64)
                        weight = torch.where(moving, drop * rate * dsigma64, 0.0)
                    # stored in float32 as the trainer does, and sampled from the stored value
                    sigma = torch.where(level == 0, 0.0, sigma64).to(torch.float32)
                    x = process.sample(y[:, :width], sigma, generator)
                    # clean cells are fed the conditioning's clean σ̄ (0 for "paper")
                    sigma_cells = torch.where(level == 0, clean_sigma, sigma).to(torch.float32)
                    if shifted:
                        sigma_cells = torch.cat([torch.full((B, 1), clean_sigma, dtype=torch.float32), sigma_cells], 1)
                inputs = torch.cat([torch.full((B, 1), bos_id, dtype=torch.long), x], 1) if shifted else x
                num_cells = width + 1 if shifted else width
                step_masks = [_step_mask(masks, sched, int(step), config, context, window) for step in t]
                mask = _row_masks(step_masks, num_cells)
                cells = torch.arange(num_cells)
                # cell a + j predicts position a + j in both configs; rows past a sequence's own cells
                # (padding) and its settled rows get no logits
                rows = (cells >= a[:, None]) & (cells < b[:, None])
                logits = model(inputs.to(device), cells.unsqueeze(0).to(device), mask.to(device),
                               sigma=None if sigma_cells is None else sigma_cells.to(device),
                               logits_rows=rows.to(device))
                logits = logits.to("cpu", torch.float64)                       # [R, V], rows row-major
                row_of = batch_rows[:, None].expand(B, num_cells)[rows]
                target = y[:, :width][rows[:, :width]]
                w = weight[rows[:, :width]]
                if family == "epsilon":
                    log_probs = logits[:, :mask_id].log_softmax(-1)
                    nll = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                    term = torch.where(masked[rows[:, :width]] & (w > 0), w * nll, 0.0)
                else:
                    x_rows = x[rows[:, :width]]
                    sigma_rows = sigma[rows[:, :width]].to(torch.float64)
                    log_score = L.gamma_log_score(logits, sigma_rows, x_rows)
                    se = L.score_entropy(process, log_score, x_rows, target, sigma_rows)
                    term = torch.where(w > 0, w * se, 0.0)
                draws[:, m].index_add_(0, row_of, term)
                draws[:, m] *= T * jacobian
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
            ``bos_id``, ``time``, ``time_warp``, ``noise``; see :func:`bound_options`).

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
    totals, priors, variance = [], [], 0.0
    for index, batch in enumerate(iterator):
        generator = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2 ** 63))
        result = nll_bound(model, batch, sched, num_samples=num_samples, generator=generator, **options)
        totals.append(result.total)
        variance += float(result.mc_variance.sum())
        priors.append(result.prior)
    if not totals:
        raise ValueError("perplexity_bound: batches is empty")
    total = torch.cat(totals)
    n_tokens = total.numel() * sched.length
    nll = float(total.sum()) / n_tokens
    return BoundResult(nll=nll, perplexity=math.exp(nll), mc_stderr=math.sqrt(variance) / n_tokens,
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
    if isinstance(samples, torch.Tensor):
        rows = [samples] if samples.dim() == 1 else list(samples.reshape(samples.shape[0], -1))
    else:
        rows = list(samples)
    if not rows:
        raise ValueError("unigram_entropy: samples is empty")
    excluded = [] if exclude is None else ([exclude] if isinstance(exclude, int) else list(exclude))
    excluded = torch.as_tensor(excluded, dtype=torch.long)
    values = []
    for row in rows:
        ids = torch.as_tensor(row).reshape(-1)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"unigram_entropy: samples must hold integer token ids, got {ids.dtype}")
        ids = ids.long()
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
    """The judge model cannot be loaded here (``transformers`` missing, or the model not available
    offline)."""


@dataclass(frozen=True)
class GenerativePerplexity:
    """``perplexity = exp(nll)``, ``nll`` = mean judge NLL over all scored tokens (nats, Alg. 2);
    ``per_sample_nll`` float64 ``[S]`` (mean per sample, NaN where a sample has no scored token)."""

    perplexity: float
    nll: float
    num_tokens: int
    per_sample_nll: torch.Tensor


def _hf_judge(name: str, device, max_length: int | None) -> Callable[[list[str]], list[torch.Tensor]]:
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
    except Exception as error:  # what transformers / huggingface_hub raise for a model not available offline
        raise JudgeUnavailableError(
            f"generative_perplexity: cannot load the judge model {name!r} offline ({error}); download it "
            "into the Hugging Face cache first (no network access is attempted) or pass a local directory "
            "or a callable judge") from error
    limit = (max_length or getattr(lm.config, "n_positions", None)
             or getattr(lm.config, "max_position_embeddings", 1024))
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
    token mean of Alg. 2, not the official code's mean of per-sample perplexities, docs/official-code.md §7).

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
                             max_length)
    elif callable(judge):
        judge_fn = judge
    else:
        raise TypeError("generative_perplexity: judge must be a model name or a callable, got "
                        f"{type(judge).__name__}")
    per_sample = []
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        nlls = judge_fn(chunk)
        if len(nlls) != len(chunk):
            raise ValueError(f"generative_perplexity: the judge returned {len(nlls)} results for "
                             f"{len(chunk)} texts")
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
