"""What σ̄ a γ-family model is conditioned on at each hyperschedule step: ``"paper"`` or ``"official"``.

A γ model takes the total noise σ̄ of every fed cell as an input (adaLN and the weighted embedding), so
it only sees in-distribution inputs when it is fed the σ̄ values it was trained on.

``"paper"`` (this repository's training and sampling): a cell holding a token at level ``ℓ`` of a
schedule with ``𝒯`` levels is conditioned on ``σ̄(ℓ/𝒯)``; settled and prompt cells are clean (σ̄ = 0).

``"official"`` (the published checkpoints; the official sampler's ``compute_t_and_attn``): the official
call ``s`` feeds the levels ``ms(s)``, where an active position at official level ``k`` is our
``τ_{s-1}`` with level ``ℓ = k + 1`` (``hdlm_kernels.schedules``). Its time per cell is

* active (our ``ℓ >= 1``): ``1e-3 + (ℓ - 1)·(1 - 2e-3)/(𝒯 - 1)`` (``1e-3`` at the last level, ``0.999`` at
  ``ℓ = 𝒯``);
* settled (our ``ℓ = 0``, and prompt cells, which the official samplers do not have): ``1e-4``;
* worthless: ``0.9999`` (never fed here: no settled or active row attends to a worthless cell);

and σ̄ comes from the log-linear schedule with the official ``eps = 5e-3``
(``hdlm_reference.noise.OFFICIAL_LOGLINEAR_EPS``; pass that noise with this conditioning). A sampled
position moves from the σ̄ of its level now to the σ̄ of its next level (the one it will be fed at the
next step); at its last level it moves to clean with MASK excluded, which is what the official
sampler does by forcing MASK's probability to 0 on its "tokens to denoise". For τ_Block and τ_Flat
(every level visited, one per step) these are exactly the official sampler's σ̄ and Δσ̄. For τ_Slide
with ``𝒯 > ω`` a position skips levels between steps: the official sampler still moves it by one
level's Δ, here it moves to the level it is fed next.

The γ MASK post-process of the official model (MASK log-score set to -1000 on rows whose *next*
position is settled) runs only when the model is given the settled set, which happens in training and
never in the official samplers; and no sampled row has a settled next position (settled positions form
a prefix before the active window), so it cannot change a sampled token. :func:`official_log_score`
reproduces the official γ output with it, for comparisons.

The ε family has no σ̄ input: both conditionings sample it identically (its masking probabilities
``1 - p(τ_{t+1})/p(τ_t)`` are the official linear ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["CONDITIONINGS", "OFFICIAL_SETTLED_TIME", "OFFICIAL_ACTIVE_TIME", "OFFICIAL_WORTHLESS_TIME",
           "SigmaTable", "check_conditioning", "official_time", "sigma_table", "process_time",
           "official_log_score"]

CONDITIONINGS = ("paper", "official")

OFFICIAL_SETTLED_TIME = 1e-4          # annealing.sampling_eps
OFFICIAL_ACTIVE_TIME = 1e-3           # 10·eps: the time of an active position at official level 0
OFFICIAL_WORTHLESS_TIME = 1.0 - 1e-4


def check_conditioning(conditioning, context: str) -> str:
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"{context}: conditioning must be one of {', '.join(map(repr, CONDITIONINGS))}, got "
                         f"{conditioning!r}")
    return conditioning


def _official_step(num_levels: int) -> float:
    # the time between two official levels; a one-level schedule has a single active time
    return (1.0 - 2 * OFFICIAL_ACTIVE_TIME) / (num_levels - 1) if num_levels > 1 else 0.0


def official_time(levels: torch.Tensor, num_levels: int, active: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 official time of each cell from our integer ``levels`` (module docstring): ``1e-4`` at
    level 0, the active map at levels ``>= 1``, and ``0.9999`` where ``active`` (bool, same shape) is
    False at a non-zero level (a worthless cell)."""
    levels = levels.to(torch.float64)
    time = OFFICIAL_ACTIVE_TIME + (levels - 1) * _official_step(num_levels)
    if active is not None:
        time = torch.where(active, time, OFFICIAL_WORTHLESS_TIME)
    return torch.where(levels == 0, OFFICIAL_SETTLED_TIME, time)


@dataclass(frozen=True)
class SigmaTable:
    """σ̄ a conditioning feeds at one schedule: ``active[ℓ]`` (float64 ``[𝒯 + 1]``) for a cell being
    denoised whose token is at level ``ℓ >= 1`` (``active[0] = 0``: a position's clean target), and
    ``clean`` for settled and prompt cells. Values are float32 numbers widened to float64: the model
    is fed float32 σ̄ and the sampler steps from the same values."""

    active: torch.Tensor
    clean: float

    def of_cells(self, levels: torch.Tensor) -> torch.Tensor:
        """Float64 σ̄ of cells whose tokens sit at ``levels`` (0 = clean / settled / prompt)."""
        return torch.where(levels == 0, self.clean, self.active[levels])


def _stored(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.to(torch.float32).to(torch.float64)


def sigma_table(conditioning: str, noise, num_levels: int) -> SigmaTable:
    """The :class:`SigmaTable` of ``conditioning`` for a schedule with ``num_levels`` levels under the σ̄
    schedule ``noise`` (called on float64 times)."""
    check_conditioning(conditioning, "sigma_table")
    levels = torch.arange(num_levels + 1)
    if conditioning == "paper":
        sigma, _ = noise(levels.to(torch.float64) / num_levels)
        return SigmaTable(_stored(torch.where(levels == 0, 0.0, sigma)), 0.0)
    sigma, _ = noise(official_time(levels, num_levels))
    clean, _ = noise(torch.tensor(OFFICIAL_SETTLED_TIME, dtype=torch.float64))
    return SigmaTable(_stored(torch.where(levels == 0, 0.0, sigma)), float(_stored(clean)))


def process_time(conditioning: str, levels: torch.Tensor, num_levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(time, dtime/dlevel)`` (float64) along a continuous level path, for the perplexity bound.

    ``"paper"``: ``ℓ/𝒯``. ``"official"``: the active map above for ``ℓ >= 1`` and the straight line from
    0 to ``1e-3`` on ``ℓ ∈ [0, 1]`` (the official sampler's last move, from level 0's time to clean).
    """
    check_conditioning(conditioning, "process_time")
    levels = levels.to(torch.float64)
    if conditioning == "paper":
        return levels / num_levels, torch.full_like(levels, 1.0 / num_levels)
    step = _official_step(num_levels)
    upper = levels >= 1
    time = torch.where(upper, OFFICIAL_ACTIVE_TIME + (levels - 1) * step, levels * OFFICIAL_ACTIVE_TIME)
    rate = torch.where(upper, step, OFFICIAL_ACTIVE_TIME)
    return time, rate


def official_log_score(logits: torch.Tensor, sigma: torch.Tensor, settled: torch.Tensor | None = None) -> torch.Tensor:
    """The official γ model's output from its logits ``[B, S, V]``: ``scale_by_sigma``
    (``logits - log(e^σ̄ - 1) - log(V - 1)``, σ̄ ``[B, S]``) then, when ``settled`` (bool ``[B, S]``) is
    given, MASK (the last id) set to -1000 on every row ``i`` whose next position ``i + 1`` is settled.
    Float64, for comparisons (the official code computes it in bf16)."""
    V = logits.shape[-1]
    sigma = sigma.to(torch.float64)
    score = logits.to(torch.float64) - (torch.log(torch.expm1(sigma)) + math.log(V - 1))[..., None]
    if settled is not None:
        next_settled = torch.zeros_like(settled)
        next_settled[:, :-1] = settled[:, 1:]
        score[..., -1] = torch.where(next_settled, -1000.0, score[..., -1])
    return score
