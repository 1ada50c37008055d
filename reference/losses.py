"""Training losses (paper App. B.2, Eqs. 8-11; SEDD's DWDSE for the γ family; App. B.5 score scaling).

Pieces, each on rows of logits ``[n, V]`` (``V`` = vocabulary incl. MASK = ``V-1``):

* :func:`score_entropy` / :func:`dwdse` — SEDD's diffusion-weighted denoising score entropy (Lou et
  al. 2024, Thm 3.6) for :class:`~hdlm_reference.noise.Absorb`, :class:`~hdlm_reference.noise.Uniform`
  and :class:`~hdlm_reference.noise.GammaHybrid`, with the ratios ``p(y|x0)/p(x|x0)`` taken EXACTLY
  from Eq. 7g at the full σ̄. For a position in state ``x`` with clean token ``x0``::

      dwdse = dσ̄ · Σ_{y≠x} Q[x, y] · ( e^{s_y} - r_y·s_y + K(r_y) ),   r_y = p(y|x0) / p(x|x0),
      K(a) = a(log a - 1),

  ``s`` the log-scores, ``Q[x, y]`` the rate from ``y`` to ``x`` (the transposed rate). Computed in
  ``O(n·V)`` from three reductions per row and closed-form per-row scalars (derivation in
  :func:`score_entropy`).
* :func:`gamma_log_score` — the γ model's score parametrization (official ``scale_by_sigma``).
* :func:`hdce` — hybrid diffusion cross-entropy for the ε-hybrid (Eqs. 8-9) with the ``1/(1-p_mask)``
  factors.
* :func:`settled_cross_entropy`, :func:`block_weights` (Eq. 11), :func:`combine_losses` (Eq. 10).
* Training entry points that take model outputs and batch tensors (never the model):
  :func:`noise_packed_batch` + :func:`packed_loss` for interval-packed batches (App. B.3), and
  :func:`step_roles` + :func:`noise_step` + :func:`step_loss` for one hyperschedule step per batch
  (the official training style).

Normalization: every term is a per-token mean. ``L_diffusion`` = sum of the per-token diffusion
losses over the denoising targets / their number; ``L_CE`` = sum of (weighted) cross-entropies over
the settled targets / their number; ``loss = β1·L_CE + β2·L_diffusion`` (Eq. 10). For τ_Flat with
every position active this is Eq. 8's ``1/(N·d)`` normalization.

Differences from the official code (docs/official-differences.md, losses):

1. γ DWDSE is exact for ``Q_Hybrid^γ``: the ratios come from Eq. 7g (``(1-γ)σ̄`` in the absorbing
   part, ``γσ̄`` in the uniform part, and the uniform leakage ``A(1-B)/N`` of masked positions is
   kept). The official ``score_entropy`` evaluates SEDD's absorbing formula on masked positions and
   SEDD's uniform formula on unmasked ones, both with the FULL σ̄, scaled by ``(1-γ)`` / ``γ``. For
   γ = 0 and γ = 1 the two coincide (tests check this against SEDD's formulas).
2. :func:`gamma_log_score` zeroes the current token's log-score (SEDD convention: ``p(x)/p(x) = 1``);
   the official γ model does not. This does not change the DWDSE (``y = x`` is excluded) but does
   change ``Σ_y s_y`` seen by analytic samplers. It is computed in float32 with a stable
   ``log(e^{σ̄} - 1) = σ̄ + log(1 - e^{-σ̄})``; the official computes it in bf16 under autocast.
   The official ``post_process_logits`` (MASK logit ``-1000`` on the settled positions, shifted by
   one) is not reproduced: the MASK entry never enters the DWDSE, and the settled cross-entropy here
   uses the raw logits over all ``V`` ids.
3. Normalization is a per-token mean for both terms. The official γ loss sums ``dσ̄·SE`` over the
   non-settled tokens of a sequence and averages over sequences (so with β1 = β2 = 1 its CE term is
   ~1/ω as heavy as here); pass ``beta2`` = number of active tokens per sequence to recover that scale.
4. Only active positions carry a diffusion loss. The official γ loss also trains worthless positions
   (``t = 0.9999``) with weight 0.001, through fully masked attention rows.
5. Eq. 11 block weights use the sequence length ``d`` (``⌈d/ω⌉ - 1``) and apply to the settled CE of
   the per-step path, as the paper states. The official γ loss uses ``num_settled`` instead of ``d``;
   the official ε-SHIFTED annealing loss applies ``(L-1, w)`` weights to the active tokens.
   The packed path uses no block weights (App. B.3: not needed there).
6. HDCE keeps Eq. 9's ``1/(1-p_mask)`` factors on every path; the official annealing ε losses drop
   them (only its flat path has them). The settled CE term (β1) exists for the ε family too; the
   official ε code has none.
7. Settled / level-0 positions are never noised (official γ: ``σ̄(1e-4)``), and the diffusion time of
   a position at level τ is ``τ/𝒯`` (official: ``1e-3 + (τ-1)·(1-2e-3)/(𝒯-1)`` for active positions,
   ``1e-4`` settled, ``0.9999`` worthless).
8. SHIFTED is supported for both families (official: SHIFTED γ only in dead code; ε SHIFTED annealing
   crashes). The target of a SHIFTED cell is the next position, and its noisy value, σ̄ and
   corruption events are read from the NEXT cell, which holds that position's noisy token.
9. HDCE's "shuffled" is the substitution event, including substitutions by the same token (as in
   the official code). λ defaults to 1.0 (official config value; its code default is 0.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hdlm_kernels.packing import IGNORE_INDEX
from hdlm_kernels.schedules import Hyperschedule

from .noise import EpsilonHybrid, _Process, _SEDDProcess, _check_tokens

__all__ = [
    "gamma_log_score", "score_entropy", "dwdse", "hdce_weights", "hdce", "settled_cross_entropy",
    "block_weights", "combine_losses", "diffusion_token_loss",
    "NoisedBatch", "noise_packed_batch", "packed_loss", "step_roles", "noise_step", "step_loss",
]

_SCORE_PARAMETRIZATIONS = ("auto", "scale_by_sigma", "log_score")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bf16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _check_logits(name: str, logits, vocab_size: int | None, context: str) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(f"{context}: {name} must be a floating-point tensor, got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() < 1 or (vocab_size is not None and logits.shape[-1] != vocab_size):
        raise ValueError(f"{context}: {name} must have shape [..., V] with V = vocab_size = {vocab_size}, "
                         f"got {tuple(logits.shape)}")


def _check_same_shape(context: str, reference_name: str, reference: torch.Tensor, **tensors) -> None:
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(reference.shape):
            raise ValueError(f"{context}: {name} must have the shape of {reference_name} "
                             f"{tuple(reference.shape)}, got {tuple(tensor.shape)}")


def _sigma64(sigma_bar, device, context: str, check: bool = True) -> torch.Tensor:
    """σ̄ as float64 on ``device``, checked non-negative (when ``check``: that reads the values)."""
    sigma = torch.as_tensor(sigma_bar, device=device).to(torch.float64)
    if check and sigma.numel() and bool(((sigma < 0) | torch.isnan(sigma)).any()):
        raise ValueError(f"{context}: sigma_bar must be >= 0, got values in "
                         f"[{float(sigma.min())}, {float(sigma.max())}]")
    return sigma


def _k(a: torch.Tensor) -> torch.Tensor:
    """``K(a) = a(log a - 1)`` with ``K(0) = 0``."""
    return torch.xlogy(a, a) - a


# ---------------------------------------------------------------------------------------------
# score parametrization (γ family)
# ---------------------------------------------------------------------------------------------

def gamma_log_score(logits: torch.Tensor, sigma_bar: torch.Tensor, x_t: torch.Tensor | None = None, *,
                    zero_current: bool = True, check: bool = True) -> torch.Tensor:
    """Log-scores of the γ model from its logits (official ``scale_by_sigma``, docs/official-code.md §5)::

        s = logits - log(e^{σ̄} - 1) - log(V - 1),   then  s[x_t] = 0  (zero_current)

    The offset makes ``Σ_{y<N} e^{s_y}`` match the absorbing score at initialization (App. B.5's
    ``e^{-σ̄}/(1-e^{-σ̄})`` factor); ``s[x_t] = 0`` is the exact log-ratio ``log p(x_t)/p(x_t)``
    (SEDD's convention; the official γ model skips it, see the module's difference 2).

    Args:
        logits: ``[..., V]`` float tensor (any float dtype).
        sigma_bar: ``[...]`` cumulative noise of the position whose transition the row scores
            (for SHIFTED, the target's σ̄, i.e. the next cell's). Must be > 0 where the result is
            used; σ̄ = 0 is clamped to the smallest float32 normal so the result stays finite.
        x_t: ``[...]`` current (noisy) token of that position; required when ``zero_current``.
        check: validate σ̄ >= 0 and the token ids; ``False`` skips these checks, which synchronize
            with the device (for generation loops that validated their inputs once).

    Returns:
        float32 ``[..., V]`` (float64 for float64 logits). Computed in float32 rather than the
        official bf16: the offset reaches ~10.8 + |log σ̄|, where bf16 rounds by ~0.06.
    """
    context = "gamma_log_score"
    _check_logits("logits", logits, None, context)
    V = logits.shape[-1]
    if V < 2:
        raise ValueError(f"{context}: logits must have V >= 2 entries in the last dimension, got {V}")
    acc = _acc_dtype(logits.dtype)
    sigma = _sigma64(sigma_bar, logits.device, context, check).clamp_min(torch.finfo(torch.float32).tiny)
    log_expm1 = sigma + torch.log(-torch.expm1(-sigma))  # log(e^σ̄ - 1) without overflow for large σ̄
    offset = (log_expm1 + math.log(V - 1)).to(acc)
    try:
        score = logits.to(acc) - offset.unsqueeze(-1)
    except RuntimeError:
        raise ValueError(f"{context}: sigma_bar of shape {tuple(sigma.shape)} does not broadcast to the rows "
                         f"of logits {tuple(logits.shape[:-1])}") from None
    if zero_current:
        if x_t is None:
            raise ValueError(f"{context}: x_t is required when zero_current=True "
                             "(pass zero_current=False to skip)")
        if check:
            _check_tokens("x_t", x_t, V, context)
        index = x_t.long().expand(score.shape[:-1]).unsqueeze(-1)
        score = score.scatter(-1, index, 0.0)
    return score


# ---------------------------------------------------------------------------------------------
# DWDSE (γ family)
# ---------------------------------------------------------------------------------------------

def score_entropy(process: _SEDDProcess, log_score: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor,
                  sigma_bar: torch.Tensor) -> torch.Tensor:
    """SEDD's denoising score entropy of one position, exact for the process (no ``dσ̄`` factor)::

        SE = Σ_{y≠x} Q[x, y] ( e^{s_y} - r_y s_y + K(r_y) ),   r_y = p(y|x0)/p(x|x0)  (Eq. 7g at σ̄)

    With ``N = V-1`` real tokens, ``A = e^{-(1-γ)σ̄}``, ``B = e^{-γσ̄}``, Eq. 7g gives
    ``p(MASK|x0) = 1-A`` and ``p(y|x0) = A(1-B)/N + AB·δ_{y,x0}``; ``Q[x, y]`` is ``1-γ`` for
    ``x = MASK`` and real ``y``, ``γ/N`` for real ``x ≠ y``, and 0 for ``y = MASK``. Summing over the
    real ``y ≠ x`` ("kept" ids) leaves three reductions per row and closed-form scalars:

    * ``x = MASK``: ``(1-γ)[Σe^s - u·Σs - c·s_{x0} + (N-1)K(u) + K(u+c)]`` with
      ``u = (1-B)/(N(e^{(1-γ)σ̄}-1))``, ``c = B/(e^{(1-γ)σ̄}-1)``.
    * ``x = x0`` real: ``(γ/N)[Σe^s - ρ·Σs + (N-1)K(ρ)]``, ``ρ = (e^{γσ̄}-1)/(e^{γσ̄}-1+N)``.
    * ``x ≠ x0``, both real: ``(γ/N)[Σe^s - Σs - b·s_{x0} - (N-2) + K(1+b)]``, ``b = N/(e^{γσ̄}-1)``.

    Absorb (γ = 0) and Uniform (γ = 1) are the special cases; unmasked positions of Absorb and the
    (unreachable) MASK state of Uniform have zero rate and give 0.

    Args:
        process: an Absorb, Uniform or GammaHybrid.
        log_score: ``[..., V]`` float log-scores ``s`` (e.g. from :func:`gamma_log_score`). Entries
            ``y = x`` and ``y = MASK`` are not read.
        x_t: ``[...]`` current tokens ``x``; must be reachable from ``x0`` (``p(x|x0) > 0``), as every
            output of ``process.sample`` is — otherwise the value is meaningless (but finite).
        x0: ``[...]`` clean tokens.
        sigma_bar: ``[...]`` cumulative noise (> 0 for masked or substituted states).

    Returns:
        ``[...]`` float32 (float64 for float64 scores). Temporaries: one bool and three float
        ``[n, V]`` tensors (plus a float32 copy of half-precision scores); never ``[n, V, V]``.
        Per-row scalars are combined in float64 (the terms cancel heavily near the optimum).
    """
    context = "score_entropy"
    if not isinstance(process, _SEDDProcess):
        raise TypeError(f"{context}: process must be Absorb, Uniform or GammaHybrid, "
                        f"got {type(process).__name__}")
    V, N, M, gamma = process.vocab_size, process.num_tokens, process.mask_id, process.gamma
    _check_logits("log_score", log_score, V, context)
    _check_tokens("x_t", x_t, V, context)
    _check_tokens("x0", x0, V, context)
    rows = log_score.shape[:-1]
    _check_same_shape(context, "log_score[..., 0]", log_score[..., 0], x_t=x_t, x0=x0)
    sigma = _sigma64(sigma_bar, log_score.device, context).expand(rows)
    acc = _acc_dtype(log_score.dtype)
    s = log_score.to(acc)
    x_t, x0 = x_t.long(), x0.long()

    # --- the three reductions over the kept ids y < N, y != x (masking, not subtracting: exact) ---
    ids = torch.arange(V, device=s.device)
    keep = (ids < N) & (ids != x_t.unsqueeze(-1))
    # -inf before exp so that dropped entries give exp = 0 and a zero (not NaN) gradient
    sum_exp = torch.where(keep, s, float("-inf")).exp().sum(-1)
    sum_s = torch.where(keep, s, 0.0).sum(-1)
    s_x0 = s.gather(-1, x0.unsqueeze(-1)).squeeze(-1)

    # --- closed-form per-row scalars, float64 ---
    absorb, uniform = process.split_sigma(sigma)
    em_absorb = torch.expm1(absorb)            # e^{(1-γ)σ̄} - 1  (> 0 when a MASK is reachable)
    em_uniform = torch.expm1(uniform)          # e^{γσ̄} - 1      (> 0 when a substitution is reachable)
    # Unreachable branches are evaluated with harmless denominators, so they never put inf/NaN
    # into the (discarded) side of a where, which would poison the gradient.
    em_absorb_safe = torch.where(em_absorb > 0, em_absorb, 1.0)
    em_uniform_safe = torch.where(em_uniform > 0, em_uniform, 1.0)
    one_minus_b = -torch.expm1(-uniform)
    b_decay = torch.exp(-uniform)
    u = one_minus_b / (N * em_absorb_safe)
    c = b_decay / em_absorb_safe
    rho = em_uniform / (em_uniform + N)
    b_diff = N / em_uniform_safe

    is_mask = x_t == M
    x0_real = x0 != M
    same = x_t == x0
    zero = torch.zeros_like(sigma)
    coef_sum_s = torch.where(is_mask, torch.where(x0_real, u, zero),
                             torch.where(same, rho, torch.where(x0_real, 1.0, zero)))
    coef_s_x0 = torch.where(is_mask, torch.where(x0_real, c, zero),
                            torch.where(same | ~x0_real, zero, b_diff))
    constant = torch.where(is_mask, torch.where(x0_real, (N - 1) * _k(u) + _k(u + c), zero),
                           torch.where(same, (N - 1) * _k(rho),
                                       torch.where(x0_real, _k(1.0 + b_diff) - (N - 2), zero)))
    rate = torch.where(is_mask, torch.full_like(sigma, 1.0 - gamma), torch.full_like(sigma, gamma / N))

    bracket = (sum_exp.double() - coef_sum_s * sum_s.double() - coef_s_x0 * s_x0.double() + constant)
    # Zero rate (absorb: unmasked states; uniform: MASK) contributes exactly 0.
    return torch.where(rate > 0, rate * bracket, zero).to(acc)


def dwdse(process: _SEDDProcess, log_score: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor,
          sigma_bar: torch.Tensor, dsigma_bar: torch.Tensor) -> torch.Tensor:
    """Diffusion-weighted denoising score entropy (SEDD): ``dσ̄ · score_entropy(...)`` per position.

    Shapes as in :func:`score_entropy`, plus ``dsigma_bar [...]`` (``dσ̄/dt`` at the position's time).
    Its expectation over ``t ~ U(0,1)`` and ``x_t ~ p(·|x0)`` bounds the per-token NLL (for τ_Flat).
    """
    se = score_entropy(process, log_score, x_t, x0, sigma_bar)
    return torch.as_tensor(dsigma_bar, device=se.device).to(se.dtype) * se


# ---------------------------------------------------------------------------------------------
# HDCE (ε family), settled CE, Eq. 10-11
# ---------------------------------------------------------------------------------------------

def _check_fraction(name: str, value, context: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{context}: {name} must be a finite real number, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{context}: {name} must be in [0, 1], got {value}")
    return float(value)


def hdce_weights(masked: torch.Tensor, shuffled: torch.Tensor, p_mask: torch.Tensor, *, epsilon: float,
                 lam: float = 1.0) -> torch.Tensor:
    """Eq. 9 token weights (float64, shape of ``masked``)::

        masked               1 / p_mask
        unmasked, shuffled   λ(1-ε) / (1 - p_mask)
        unmasked, kept       λε / (1 - p_mask)

    ``masked``/``shuffled`` are the corruption events of :meth:`EpsilonHybrid.sample`; ``p_mask``
    the masking probability of the position (``1 - e^{-σ̄}``).
    """
    context = "hdce_weights"
    epsilon = _check_fraction("epsilon", epsilon, context)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"{context}: lam must be a finite real number >= 0, got {lam!r}")
    p = torch.as_tensor(p_mask, device=masked.device).to(torch.float64).expand(masked.shape)
    tiny = torch.finfo(torch.float64).tiny  # masked needs p > 0 and unmasked p < 1; clamp only the impossible
    numerator = torch.where(shuffled, p.new_tensor(lam * (1.0 - epsilon)), p.new_tensor(lam * epsilon))
    return torch.where(masked, 1.0 / p.clamp_min(tiny), numerator / (1.0 - p).clamp_min(tiny))


def hdce(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, shuffled: torch.Tensor,
         p_mask: torch.Tensor, *, epsilon: float, lam: float = 1.0) -> torch.Tensor:
    """Per-token HDCE term ``w · (-log p_θ(x0 | x_t))`` (Eqs. 8-9); average it for Eq. 8.

    Args:
        logits: ``[..., V]``; the cross-entropy is over all ``V`` ids (as the official ε model).
        x0: ``[...]`` clean targets. masked, shuffled: ``[...]`` bool events. p_mask: ``[...]``.
    Returns:
        float32 ``[...]`` (float64 for float64 logits).
    """
    context = "hdce"
    _check_logits("logits", logits, None, context)
    _check_tokens("x0", x0, logits.shape[-1], context)
    _check_same_shape(context, "logits[..., 0]", logits[..., 0], x0=x0, masked=masked, shuffled=shuffled)
    acc = _acc_dtype(logits.dtype)
    ce = F.cross_entropy(logits.to(acc).reshape(-1, logits.shape[-1]), x0.reshape(-1).long(),
                         reduction="none").reshape(x0.shape)
    return hdce_weights(masked, shuffled, p_mask, epsilon=epsilon, lam=lam).to(acc) * ce


def settled_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                          weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token cross-entropy on settled positions, optionally weighted (Eq. 11).

    ``logits [..., V]``, ``targets [...]`` (``IGNORE_INDEX`` gives 0), ``weights`` broadcastable to
    ``targets``. Returns float32 ``[...]`` (float64 for float64 logits).
    """
    context = "settled_cross_entropy"
    _check_logits("logits", logits, None, context)
    _check_same_shape(context, "logits[..., 0]", logits[..., 0], targets=targets)
    acc = _acc_dtype(logits.dtype)
    ce = F.cross_entropy(logits.to(acc).reshape(-1, logits.shape[-1]), targets.reshape(-1).long(),
                         ignore_index=IGNORE_INDEX, reduction="none").reshape(targets.shape)
    return ce if weights is None else ce * torch.as_tensor(weights, device=ce.device).to(acc)


def block_weights(length: int, width: int, device=None) -> torch.Tensor:
    """Eq. 11: ``w(i) = ⌊i/ω⌋ / (⌈d/ω⌉ - 1)``, float32 ``[d]``; all ones when ``⌈d/ω⌉ = 1``.

    Later blocks settle later, so their settled CE is sampled less often; the weight rises with the
    block index to compensate (the first block gets 0)."""
    for name, value in (("length", length), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"block_weights: {name} must be an int >= 1, got {value!r}")
    num_blocks = -(-length // width)
    if num_blocks == 1:
        return torch.ones(length, dtype=torch.float32, device=device)
    return (torch.arange(length, device=device) // width).to(torch.float32) / (num_blocks - 1)


def combine_losses(settled_ce: torch.Tensor, diffusion: torch.Tensor, beta1: float = 1.0,
                   beta2: float = 1.0) -> torch.Tensor:
    """Eq. 10: ``β1·L_CE + β2·L_diffusion`` (L_diffusion = DWDSE for γ, HDCE for ε)."""
    return beta1 * settled_ce + beta2 * diffusion


def _resolve_parametrization(process, score_parametrization: str) -> str:
    if score_parametrization not in _SCORE_PARAMETRIZATIONS:
        raise ValueError(f"score_parametrization must be one of {_SCORE_PARAMETRIZATIONS}, "
                         f"got {score_parametrization!r}")
    if score_parametrization == "auto":
        # scale_by_sigma is the absorbing-score offset (SEDD only uses it for absorbing graphs)
        return "scale_by_sigma" if process.gamma < 1.0 else "log_score"
    return score_parametrization


def diffusion_token_loss(process: _Process, logits: torch.Tensor, target_ids: torch.Tensor,
                         target_noisy_ids: torch.Tensor, target_sigma_bar: torch.Tensor,
                         target_dsigma_bar: torch.Tensor, target_masked: torch.Tensor,
                         target_shuffled: torch.Tensor, *, lam: float = 1.0,
                         score_parametrization: str = "auto") -> torch.Tensor:
    """Per-token diffusion loss of rows ``logits [n, V]``: DWDSE (SEDD processes, after the score
    parametrization) or HDCE (ε-hybrid). Target tensors are ``[n]`` (see :class:`NoisedBatch`).

    ``score_parametrization``: ``"scale_by_sigma"`` applies :func:`gamma_log_score` with the
    target's σ̄ and noisy token; ``"log_score"`` takes the logits as log-scores; ``"auto"`` picks the
    former for Absorb/GammaHybrid and the latter for Uniform.
    """
    if isinstance(process, EpsilonHybrid):
        return hdce(logits, target_ids, target_masked, target_shuffled, process.mask_prob(target_sigma_bar),
                    epsilon=process.epsilon, lam=lam)
    if not isinstance(process, _SEDDProcess):
        raise TypeError("diffusion_token_loss: process must be Absorb, Uniform, GammaHybrid or "
                        f"EpsilonHybrid, got {type(process).__name__}")
    if _resolve_parametrization(process, score_parametrization) == "scale_by_sigma":
        log_score = gamma_log_score(logits, target_sigma_bar, target_noisy_ids)
    else:
        log_score = logits
    return dwdse(process, log_score, target_noisy_ids, target_ids, target_sigma_bar, target_dsigma_bar)


# ---------------------------------------------------------------------------------------------
# noising a batch
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NoisedBatch:
    """Model inputs and per-target noise quantities of a noised training batch.

    Input side (one entry per model cell, ``[B, P]``):
        input_ids: int64 noisy tokens fed to the model (level-0 cells hold their clean token).
        sigma_bar: float32 σ̄ of each cell's token (exactly 0 at level 0), for σ̄-conditioned models.
        levels: int64 level of each cell's token.

    Target side (one entry per output row, ``[B, Q]``; packed: ``Q = P``, per-step: ``Q = d``):
        target_ids: int64 clean target token (``IGNORE_INDEX`` where none).
        target_noisy_ids: int64 noisy value ``x_t`` of that target, i.e. the state the DWDSE / HDCE
            sees (ALIGNED: the cell's own input; SHIFTED: the next cell's input; settled targets:
            the clean token; ``IGNORE_INDEX`` where no target).
        target_sigma_bar, target_dsigma_bar: float32 σ̄ and dσ̄/dt at the target's level (0 where
            the target is settled or absent).
        target_masked, target_shuffled: bool corruption events of the target (all processes report
            them; HDCE uses them).
    """

    input_ids: torch.Tensor
    sigma_bar: torch.Tensor
    levels: torch.Tensor
    target_ids: torch.Tensor
    target_noisy_ids: torch.Tensor
    target_sigma_bar: torch.Tensor
    target_dsigma_bar: torch.Tensor
    target_masked: torch.Tensor
    target_shuffled: torch.Tensor
    # Positions the sync-free corruption rejected (a 0-d count on the device), None with a torch.Generator:
    # reported as the metric "invalid_corruption", from which the trainer raises.
    corrupt_invalid: torch.Tensor | None = None


def _invalid_count(events) -> torch.Tensor | None:
    return None if events.invalid is None else events.invalid.sum()


def _check_levels(levels: torch.Tensor, num_levels, context: str) -> None:
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"{context}: num_levels must be an int >= 1 (the hyperschedule's 𝒯), "
                         f"got {num_levels!r}")
    if not isinstance(levels, torch.Tensor) or levels.dtype.is_floating_point or levels.dtype == torch.bool:
        raise TypeError(f"{context}: levels must be an integer tensor, "
                        f"got {getattr(levels, 'dtype', type(levels).__name__)}")
    if levels.numel() and bool(((levels < 0) | (levels > num_levels)).any()):
        raise ValueError(f"{context}: levels must lie in [0, num_levels={num_levels}], got values in "
                         f"[{int(levels.min())}, {int(levels.max())}]")


def _noise_cells(process, noise, tokens, levels, num_levels, generator, context):
    """Noise every cell at its level; level 0 stays exactly clean whatever σ̄(0) is."""
    if not isinstance(process, _Process):
        raise TypeError(f"{context}: process must be one of the hdlm_reference.noise processes, "
                        f"got {type(process).__name__}")
    _check_levels(levels, num_levels, context)
    # t = level/𝒯 as Hyperschedule.noise_time, evaluated in float64 and stored as float32
    sigma_bar, dsigma_bar = noise(levels.to(torch.float64) / num_levels)
    clean = levels == 0
    sigma_bar = torch.where(clean, 0.0, sigma_bar).to(torch.float32)
    # sample from the stored float32 σ̄, so that the loss sees the σ̄ the sample was drawn at
    dsigma_bar = dsigma_bar.to(torch.float32)
    x_t, events = process.sample(tokens, sigma_bar, generator, return_events=True)
    return x_t, sigma_bar, dsigma_bar, events


def noise_packed_batch(process: _Process, noise, packed, generator: torch.Generator | None = None, *,
                       num_levels: int, config: str) -> NoisedBatch:
    """Apply the forward process to a packed batch (``hk.packing.pack`` output) at its cell levels.

    Every cell's input token is noised at ``σ̄(levels/𝒯)`` (clean copy, SHIFTED's repeated settled
    token and padding are at level 0 and stay clean). For a cell with a denoising target, the target's
    noisy value, σ̄, dσ̄ and events come from the cell that holds the target position in the same
    interval: the cell itself for ALIGNED, the next cell for SHIFTED. Both are checked against
    ``packed.target_levels`` / ``target_ids``, so a wrong ``config`` raises.

    Args:
        process: a noise process. noise: σ̄ schedule (``LogLinearNoise``, ``GeometricNoise``).
        packed: a PackedBatch (or anything with ``input_ids, levels, target_ids, target_levels,
            loss_positions`` ``[B, P]``).
        generator: ``torch.Generator`` on the batch's device.
        num_levels: the hyperschedule's 𝒯 (``sched.num_levels``). config: ``"aligned"``/``"shifted"``.
    """
    context = "noise_packed_batch"
    if config not in ("aligned", "shifted"):
        raise ValueError(f"{context}: config must be 'aligned' or 'shifted', got {config!r}")
    levels, input_ids = packed.levels, packed.input_ids
    loss = packed.loss_positions
    target_ids = packed.target_ids
    x_t, sigma_bar, dsigma_bar, events = _noise_cells(process, noise, input_ids, levels, num_levels,
                                                      generator, context)

    if config == "shifted":
        if bool(loss[:, -1].any()):
            raise ValueError(f"{context}: config='shifted' but the last cell is a loss position (it has "
                             "no next cell); was the batch packed with config='aligned'?")

        def holder(x, fill):  # value of the next cell, for every cell
            return torch.cat([x[:, 1:], torch.full_like(x[:, :1], fill)], 1)
    else:
        def holder(x, fill):
            return x
    held_levels = holder(levels, 0)
    held_clean = holder(input_ids, IGNORE_INDEX)
    if bool((loss & ((held_levels != packed.target_levels) | (held_clean != target_ids))).any()):
        raise ValueError(f"{context}: with config={config!r} the cell holding each target does not carry the "
                         "target's token and level (packed.target_ids / target_levels); was the batch packed "
                         "with the other config?")
    # Cells without a denoising target: settled targets are clean, the rest stays IGNORE_INDEX.
    zero = torch.zeros_like(sigma_bar)
    return NoisedBatch(
        input_ids=x_t, sigma_bar=sigma_bar, levels=levels,
        target_ids=target_ids,
        target_noisy_ids=torch.where(loss, holder(x_t, IGNORE_INDEX), target_ids),
        target_sigma_bar=torch.where(loss, holder(sigma_bar, 0.0), zero),
        target_dsigma_bar=torch.where(loss, holder(dsigma_bar, 0.0), zero),
        target_masked=loss & holder(events.masked, False),
        target_shuffled=loss & holder(events.shuffled, False),
        corrupt_invalid=_invalid_count(events),
    )


# ---------------------------------------------------------------------------------------------
# training entry points
# ---------------------------------------------------------------------------------------------

def _finish(process, logits, noised, diff_cells, settled_cells, settled_weight, beta1, beta2, lam,
            score_parametrization):
    """Shared tail of both entry points: per-token means of the two terms, Eq. 10."""
    rows = logits[diff_cells]
    diff = diffusion_token_loss(
        process, rows, noised.target_ids[diff_cells], noised.target_noisy_ids[diff_cells],
        noised.target_sigma_bar[diff_cells], noised.target_dsigma_bar[diff_cells],
        noised.target_masked[diff_cells], noised.target_shuffled[diff_cells],
        lam=lam, score_parametrization=score_parametrization)
    ce = settled_cross_entropy(logits[settled_cells], noised.target_ids[settled_cells],
                               None if settled_weight is None else settled_weight[settled_cells])
    n_diff = diff_cells.sum()
    n_settled = settled_cells.sum()
    diffusion_loss = diff.sum() / n_diff.clamp_min(1)
    settled_ce = ce.sum() / n_settled.clamp_min(1)
    loss = combine_losses(settled_ce, diffusion_loss, beta1, beta2)
    metrics = {
        "loss": loss.detach(), "diffusion_loss": diffusion_loss.detach(), "settled_ce": settled_ce.detach(),
        "diffusion_tokens": n_diff.detach(), "settled_tokens": n_settled.detach(),
        "masked_fraction": (noised.target_masked[diff_cells].sum() / n_diff.clamp_min(1)).detach(),
    }
    if noised.corrupt_invalid is not None:
        metrics["invalid_corruption"] = noised.corrupt_invalid.detach()
    return loss, metrics


def packed_loss(process: _Process, logits: torch.Tensor, packed, noised: NoisedBatch, *, beta1: float = 1.0,
                beta2: float = 1.0, lam: float = 1.0,
                score_parametrization: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training loss of an interval-packed batch (App. B.3 + Eq. 10).

    Args:
        logits: ``[B, P, V]`` model outputs for ``noised.input_ids``.
        packed: the PackedBatch (uses ``loss_positions``, ``settled_positions``, ``target_ids``).
        noised: :func:`noise_packed_batch` of the same batch.
        beta1, beta2: Eq. 10 weights of the settled CE and of the diffusion term.
        lam: HDCE's λ (ε-hybrid only). score_parametrization: see :func:`diffusion_token_loss`.

    Returns:
        ``(loss, metrics)``: scalar loss; metrics ``loss``, ``diffusion_loss`` (mean over the
        denoising targets, ``packed.loss_positions``), ``settled_ce`` (mean over the clean-copy cells
        with a target, unweighted), token counts and the masked fraction of the targets (detached).
    """
    context = "packed_loss"
    _check_logits("logits", logits, process.vocab_size, context)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(packed.loss_positions.shape):
        raise ValueError(f"{context}: logits must have shape [B, P, V] = "
                         f"{tuple(packed.loss_positions.shape)} + [V], got {tuple(logits.shape)}")
    if not torch.equal(noised.target_ids, packed.target_ids):
        raise ValueError(f"{context}: noised does not belong to packed (target_ids differ); build it with "
                         "noise_packed_batch(process, noise, packed, ...)")
    diff_cells = packed.loss_positions & (packed.target_ids != IGNORE_INDEX)
    settled_cells = packed.settled_positions & (packed.target_ids != IGNORE_INDEX)
    return _finish(process, logits, noised, diff_cells, settled_cells, None, beta1, beta2, lam,
                   score_parametrization)


def step_roles(sched: Hyperschedule, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(levels, settled, active)`` for step ``t`` (``0 <= t < T``), each ``[d]``.

    ``levels = τ_t`` (int64); a position is settled when ``τ_t = 0`` (then ``τ_{t+1} = 0``),
    worthless when ``τ_{t+1} = 𝒯`` and active otherwise (paper §3.1). Active positions can sit at
    level 𝒯 (a window entering full noise), so the roles need ``τ_{t+1}``, not only ``τ_t``.
    """
    if not isinstance(sched, Hyperschedule):
        raise TypeError(f"step_roles: sched must be a Hyperschedule, got {type(sched).__name__}")
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < sched.num_steps:
        raise ValueError(f"step_roles: t must be an int in [0, {sched.num_steps - 1}], got {t!r}")
    levels = sched.table[t].clone()
    settled = levels == 0
    active = ~settled & (sched.table[t + 1] != sched.num_levels)
    return levels, settled, active


def noise_step(process: _Process, noise, x0: torch.Tensor, levels: torch.Tensor,
               generator: torch.Generator | None = None, *, num_levels: int, config: str = "aligned",
               bos_id: int | None = None) -> NoisedBatch:
    """Noise a batch of sequences at one hyperschedule step (the official training style).

    Args:
        x0: ``[B, d]`` clean tokens. levels: ``τ_t``, ``[d]`` (shared) or ``[B, d]``.
        num_levels: 𝒯. config: ``"aligned"`` (cell i holds and predicts position i, ``P = d``) or
            ``"shifted"`` (``P = d + 1`` cells: cell 0 holds ``bos_id``, cell ``i+1`` holds position
            i's noisy token; cell i predicts position i, cell d's output is discarded — paper Fig. 5b).

    Returns:
        :class:`NoisedBatch` with inputs ``[B, P]`` and targets indexed by position ``[B, d]``
        (``target_noisy_ids = x_t``): the loss is then the same for both configs, see :func:`step_loss`.
    """
    context = "noise_step"
    if not isinstance(x0, torch.Tensor) or x0.dim() != 2:
        raise ValueError(f"{context}: x0 must be a [B, d] integer tensor, got "
                         f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
    if config not in ("aligned", "shifted"):
        raise ValueError(f"{context}: config must be 'aligned' or 'shifted', got {config!r}")
    if not isinstance(levels, torch.Tensor) or levels.shape[-1] != x0.shape[1] or levels.dim() > 2:
        given = tuple(levels.shape) if isinstance(levels, torch.Tensor) else type(levels).__name__
        raise ValueError(f"{context}: levels must have shape [d] or [B, d] with d = {x0.shape[1]}, "
                         f"got {given}")
    levels = levels.to(x0.device).expand(x0.shape)
    x_t, sigma_bar, dsigma_bar, events = _noise_cells(process, noise, x0, levels, num_levels, generator,
                                                      context)
    settled = levels == 0
    zero = torch.zeros_like(sigma_bar)
    inputs, cell_sigma, cell_levels = x_t, sigma_bar, levels
    if config == "shifted":
        if isinstance(bos_id, bool) or not isinstance(bos_id, int) or not 0 <= bos_id < process.vocab_size:
            raise ValueError(f"{context}: config='shifted' needs bos_id, a token id in "
                             f"[0, {process.vocab_size - 1}] for the conditioning cell, got {bos_id!r}")
        B = x0.shape[0]
        inputs = torch.cat([torch.full((B, 1), bos_id, dtype=torch.long, device=x0.device), x_t], 1)
        cell_sigma = torch.cat([zero[:, :1], sigma_bar], 1)
        cell_levels = torch.cat([torch.zeros_like(levels[:, :1]), levels], 1)
    return NoisedBatch(
        input_ids=inputs, sigma_bar=cell_sigma, levels=cell_levels.long(),
        target_ids=x0.long(), target_noisy_ids=x_t,
        target_sigma_bar=torch.where(settled, zero, sigma_bar),
        target_dsigma_bar=torch.where(settled, zero, dsigma_bar),
        target_masked=events.masked, target_shuffled=events.shuffled,
        corrupt_invalid=_invalid_count(events),
    )


def step_loss(process: _Process, logits: torch.Tensor, noised: NoisedBatch, settled: torch.Tensor,
              active: torch.Tensor, *, beta1: float = 1.0, beta2: float = 1.0, lam: float = 1.0,
              block_width: int | None = None,
              score_parametrization: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training loss of one hyperschedule step (Eq. 10, with Eq. 11 on the settled CE).

    Args:
        logits: ``[B, d, V]`` where row i predicts position i (ALIGNED output, or SHIFTED output
            without its last row); ``[B, d+1, V]`` is accepted and the last row dropped.
        noised: :func:`noise_step` output. settled, active: bool ``[d]`` or ``[B, d]``
            (:func:`step_roles`); worthless positions (neither) carry no loss.
        block_width: ω of Eq. 11; ``None`` leaves the settled CE unweighted.

    Returns:
        ``(loss, metrics)`` as :func:`packed_loss`; ``diffusion_loss`` = mean over the ``B·#active``
        tokens, ``settled_ce`` = ``Σ w(i)·CE_i`` over the settled tokens / their number.
    """
    context = "step_loss"
    B, d = noised.target_ids.shape
    _check_logits("logits", logits, process.vocab_size, context)
    if logits.dim() != 3 or logits.shape[0] != B or logits.shape[1] not in (d, d + 1):
        raise ValueError(f"{context}: logits must have shape [B, d, V] or [B, d+1, V] with B={B}, d={d}, "
                         f"V={process.vocab_size}, got {tuple(logits.shape)}")
    logits = logits[:, :d]
    masks = []
    for name, m in (("settled", settled), ("active", active)):
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape[-1] != d or m.dim() > 2:
            raise ValueError(f"{context}: {name} must be a bool tensor of shape [d] or [B, d] with d={d}, "
                             f"got {getattr(m, 'dtype', type(m).__name__)} {tuple(getattr(m, 'shape', ()))}")
        masks.append(m.to(logits.device).expand(B, d))
    settled, active = masks
    if bool((settled & active).any()):
        raise ValueError(f"{context}: settled and active overlap; a position is settled, active or worthless")
    weight = None
    if block_width is not None:
        weight = block_weights(d, block_width, device=logits.device).expand(B, d)
    return _finish(process, logits, noised, active, settled, weight, beta1, beta2, lam, score_parametrization)
