"""Noise schedules σ̄(t) and the per-token forward noise processes (paper §2.2, §3.2, App. A).

Conventions. Vocabulary ids ``0 .. V-1``; the LAST id ``V-1`` is MASK and ``N = V-1`` ids are real
tokens (official: ``V = 50258``, MASK ``= 50257``). A position at hyperschedule level ``τ`` has time
``t = τ/𝒯`` in ``[0, 1]`` and cumulative noise ``σ̄(t)``; level 0 is clean. Transition matrices use
the paper's convention: column ``x0`` of ``e^{σ̄ Q}`` is the distribution of ``x_t`` given
``x_0 = x0`` (``Q[y, x]`` is the rate from ``x`` to ``y``; columns of ``Q`` sum to zero).

Generators (App. A, Eq. 2, in the form the official ``QGamma`` graph uses, docs/official-code.md §5):

* ``Q_Absorb[y, x] = -δ_xy + δ_{y,MASK}`` for ``x < N``; column MASK is zero (MASK absorbs).
* ``Q_Uniform[y, x] = 1/N - δ_xy`` for ``x, y < N``; MASK row and column are zero, so the uniform
  part moves real tokens among the ``N`` real tokens and never touches MASK.

Both satisfy ``Q² = -Q`` and commute (Eqs. 3, 6), which gives the closed forms implemented here:

* :class:`Absorb`     ``e^{ΔQ_A} = 1 + (1 - e^{-Δ}) Q_A``                                     (Eq. 5a)
* :class:`Uniform`    ``e^{ΔQ_U} = 1 + (1 - e^{-Δ}) Q_U``                                     (Eq. 5b)
* :class:`GammaHybrid` ``e^{ΔQ_γ} = 1 + (1 - e^{-(1-γ)Δ}) Q_A + (e^{-(1-γ)Δ} - e^{-Δ}) Q_U``  (Eq. 7g)
* :class:`EpsilonHybrid` (§3.2): for ``τ > 0`` column ``x0`` of ``(1 + εQ_U)(1 + (1-α)Q_A)`` with
  ``α = e^{-σ̄}``; at level 0 ``x_t = x_0`` exactly.

Every process reduces to three events per position: *mask* (``x_t = MASK``), *shuffle* (``x_t`` drawn
uniformly among the ``N`` real tokens, possibly equal to ``x_0``) and *keep*. With
``A = e^{-(1-γ)σ̄}``, ``B = e^{-γσ̄}`` the SEDD processes have ``P(mask) = 1 - A``,
``P(shuffle) = A(1 - B)``, ``P(keep) = AB`` (Absorb: γ = 0, Uniform: γ = 1); ε-hybrid has
``P(mask) = 1 - α``, ``P(shuffle) = αε``, ``P(keep) = α(1 - ε)``. Samplers draw one float64 uniform
and one ``randint`` per position, so they never allocate ``[..., V]`` tensors.

Differences from the official code (docs/official-differences.md, noise):

1. ``LogLinearNoise`` defaults to ``eps = 1e-3`` (SEDD's default; the paper builds on SEDD and states
   no other value) where the official ``get_noise`` hard-codes ``5e-3`` and ignores the configured
   ``sigma_min``/``sigma_max``. The smaller eps leaves the full-noise level closer to the all-MASK
   prior the samplers start from (``P(mask | t=1) = 0.999`` instead of ``0.995``). Pass
   ``eps=OFFICIAL_LOGLINEAR_EPS`` to reproduce the official σ̄ range, e.g. to condition a published
   γ checkpoint on the σ̄ values it was trained on (``σ̄(1) = 5.30`` instead of ``6.91``).
2. Level-0 positions are exactly clean in every process (paper §3.1-3.2: ``τ = 0`` gives ``x = y``).
   The official code noises settled positions with ``σ̄(t=1e-4)`` in γ training; its ε masking uses
   ``p = (1-eps)·t + eps`` on the flat path, never exactly zero. Here ε-hybrid masks with
   ``p_mask = 1 - e^{-σ̄}`` (``= (1-eps)·t`` under ``LogLinearNoise``) and treats ``σ̄ = 0`` as level 0.
3. ``sample_prior`` of the γ-hybrid (and absorb, ε-hybrid) is the σ̄ → ∞ limit, all MASK, which is the
   stationary distribution of the process. The official ``sample_limit`` mixes in uniform tokens at a
   hard-coded ``σ_max = 4`` (``P(MASK) = 0.99924`` for γ = 0.01), which matches neither its training
   worthless level nor the limit.
4. The random stream differs (same distribution): one float64 uniform decides mask / shuffle / keep
   for each position and a replacement token is drawn for every position, whether used or not,
   without host synchronization; the official code draws replacement tokens only for the shuffled
   positions (with a ``.item()`` sync). ``sample`` draws them from a ``torch.Generator``, or, given a
   :class:`PhiloxStream`, from stream 2 of the sampling stream through ``hk.sampling.corrupt`` (docs/sampling-stream.md,
   streams), which the Triton kernel reproduces bit for bit on the device; the training objectives use that.
5. :class:`Uniform` lives on the same ``V``-id vocabulary with the MASK row and column zero, as the
   official ``QGamma`` uses ``Q_Uniform``; SEDD's standalone uniform graph has no MASK id at all.
   The two agree on the ``N`` real tokens; here MASK is simply never produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

import hdlm_kernels as hk

__all__ = [
    "PhiloxStream", "LogLinearNoise", "GeometricNoise", "OFFICIAL_LOGLINEAR_EPS",
    "NoiseEvents", "Absorb", "Uniform", "GammaHybrid", "EpsilonHybrid",
]

@dataclass(frozen=True)
class PhiloxStream:
    """A counter-based randomness source for :meth:`sample`, in place of a ``torch.Generator``: the
    events of position ``i`` of the call (flat index) come from stream 2 at row id ``i`` under
    ``(seed, step)`` (``hk.sampling.corrupt``), so they are reproducible on any device and backend.
    ``backend``: ``hk.sampling.corrupt``'s, a name of ``hk.backends.names("corrupt")`` (``"auto"``:
    the fused Triton kernel on CUDA tensors when available, else the reference)."""

    seed: int
    step: int
    backend: str = "auto"

    def __post_init__(self):
        hk.backends.check_name("corrupt", self.backend, "PhiloxStream.backend")


OFFICIAL_LOGLINEAR_EPS = 5e-3
"""The eps the official ``get_noise('loglinear')`` hard-codes (docs/official-code.md §2)."""


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------

def _check_real(name: str, value, context: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{context}: {name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{context}: {name} must be finite, got {value}")
    return value


def _check_time(t, context: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.float64)
    if not t.dtype.is_floating_point:
        raise TypeError(f"{context}: t must be a floating-point tensor, got dtype {t.dtype}")
    if t.numel() and bool(((t < 0) | (t > 1) | torch.isnan(t)).any()):
        raise ValueError(f"{context}: t must lie in [0, 1], got values in "
                         f"[{float(t.min())}, {float(t.max())}]")
    return t


def _check_tokens(name: str, x: torch.Tensor, vocab_size: int, context: str) -> None:
    if (not isinstance(x, torch.Tensor) or x.dtype.is_floating_point or x.dtype.is_complex
            or x.dtype == torch.bool):
        raise TypeError(f"{context}: {name} must be an integer tensor of token ids, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.numel() and bool(((x < 0) | (x >= vocab_size)).any()):
        raise ValueError(f"{context}: {name} token ids must lie in [0, {vocab_size - 1}] (vocab_size="
                         f"{vocab_size}, MASK={vocab_size - 1}), got values in "
                         f"[{int(x.min())}, {int(x.max())}]")


def _check_sigma(sigma_bar, shape, context: str, device) -> torch.Tensor:
    """σ̄ as a float64 tensor broadcast to ``shape`` (non-negative, not NaN; +inf allowed)."""
    if not isinstance(sigma_bar, torch.Tensor):
        sigma_bar = torch.as_tensor(sigma_bar, dtype=torch.float64)
    if not sigma_bar.dtype.is_floating_point:
        raise TypeError(f"{context}: sigma_bar must be a floating-point tensor, got dtype {sigma_bar.dtype}")
    sigma_bar = sigma_bar.to(device=device, dtype=torch.float64)
    if sigma_bar.numel() and bool(((sigma_bar < 0) | torch.isnan(sigma_bar)).any()):
        raise ValueError(f"{context}: sigma_bar must be >= 0, got values in "
                         f"[{float(sigma_bar.min())}, {float(sigma_bar.max())}]")
    try:
        return sigma_bar.expand(shape) if shape is not None else sigma_bar
    except RuntimeError:
        raise ValueError(f"{context}: sigma_bar of shape {tuple(sigma_bar.shape)} does not broadcast to "
                         f"the token shape {tuple(shape)}") from None


def _check_vocab(vocab_size, context: str) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"{context}: vocab_size must be an int, got "
                        f"{type(vocab_size).__name__} ({vocab_size!r})")
    if vocab_size < 2:
        raise ValueError(f"{context}: vocab_size must be >= 2 (at least one real token plus MASK = "
                         f"vocab_size-1), got {vocab_size}")
    return vocab_size


# ---------------------------------------------------------------------------------------------
# noise schedules σ̄(t)
# ---------------------------------------------------------------------------------------------

class LogLinearNoise:
    """``σ̄(t) = -log(1 - (1-eps)·t)``, ``dσ̄/dt = (1-eps) / (1 - (1-eps)·t)`` (SEDD, MDLM).

    ``1 - e^{-σ̄(t)} = (1-eps)·t``: the absorbing process masks a fraction ``(1-eps)·t`` of the
    tokens, linear in t, and ``dσ̄ / (e^{σ̄} - 1) = 1/t`` (the MDLM weight). ``σ̄(0) = 0`` exactly.

    Call with a float tensor ``t`` of any shape (per-token times) in ``[0, 1]``; returns
    ``(sigma_bar, dsigma_bar)`` of the same shape and dtype, computed in float64 (in float32,
    ``1 - (1-eps)·t`` near ``t = 1`` loses ~1e-5 of ``dσ̄`` to cancellation). ``eps`` in ``(0, 1)``
    keeps ``σ̄(1)`` finite (``= -log(eps)``). See the module docstring for the choice of the default.
    """

    def __init__(self, eps: float = 1e-3):
        eps = _check_real("eps", eps, "LogLinearNoise")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"LogLinearNoise: eps must be in (0, 1), got {eps}")
        self.eps = eps

    def sigma_bar(self, t: torch.Tensor) -> torch.Tensor:
        return self(t)[0]

    def dsigma_bar(self, t: torch.Tensor) -> torch.Tensor:
        return self(t)[1]

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = _check_time(t, "LogLinearNoise")
        t64 = t.to(torch.float64)
        # 1 - (1-eps)t written as (1 - t) + eps·t: exact cancellation-free near t = 1
        remaining = (1.0 - t64) + self.eps * t64
        sigma_bar = -torch.log1p(-(1.0 - self.eps) * t64)
        return sigma_bar.to(t.dtype), ((1.0 - self.eps) / remaining).to(t.dtype)

    def __repr__(self) -> str:
        return f"LogLinearNoise(eps={self.eps:g})"


class GeometricNoise:
    """SEDD's geometric schedule: ``σ̄(t) = σ_min^{1-t} σ_max^t``, ``dσ̄/dt = σ̄(t)·log(σ_max/σ_min)``.

    Defaults are SEDD's (``1e-4``, ``20``). Note ``σ̄(0) = σ_min > 0``: level-0 positions are still
    kept exactly clean by :func:`hdlm_reference.losses.noise_packed_batch` / ``noise_step``.
    """

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0):
        sigma_min = _check_real("sigma_min", sigma_min, "GeometricNoise")
        sigma_max = _check_real("sigma_max", sigma_max, "GeometricNoise")
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"GeometricNoise: need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}")
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self._log_ratio = math.log(sigma_max) - math.log(sigma_min)

    def sigma_bar(self, t: torch.Tensor) -> torch.Tensor:
        return self(t)[0]

    def dsigma_bar(self, t: torch.Tensor) -> torch.Tensor:
        return self(t)[1]

    def __call__(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = _check_time(t, "GeometricNoise")
        sigma_bar = torch.exp(math.log(self.sigma_min) + t.to(torch.float64) * self._log_ratio)
        return sigma_bar.to(t.dtype), (sigma_bar * self._log_ratio).to(t.dtype)

    def __repr__(self) -> str:
        return f"GeometricNoise(sigma_min={self.sigma_min:g}, sigma_max={self.sigma_max:g})"


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------

class NoiseEvents(NamedTuple):
    """What happened to each position during :meth:`sample` (bool tensors shaped like ``x0``).

    ``masked``: replaced by MASK. ``shuffled``: replaced by a uniformly drawn real token, which may
    equal the original one (the paper's "shuffled", Eq. 9; the official code flags it the same way).
    Neither is set for positions that stay as they are, nor for MASK inputs (MASK absorbs).
    """

    masked: torch.Tensor
    shuffled: torch.Tensor
    # With a PhiloxStream: the positions hk.sampling.corrupt_deferred rejected (bool, shaped like x0; the draw
    # there is meaningless), read without a host synchronization by the losses; None with a torch.Generator.
    invalid: torch.Tensor | None = None


class _Process:
    """Shared machinery: the mask / shuffle / keep event model described in the module docstring."""

    name = "process"

    def __init__(self, vocab_size: int):
        self.vocab_size = _check_vocab(vocab_size, type(self).__name__)

    @property
    def mask_id(self) -> int:
        """The MASK id, always ``vocab_size - 1``."""
        return self.vocab_size - 1

    @property
    def num_tokens(self) -> int:
        """``N = vocab_size - 1``: the number of real (non-MASK) tokens."""
        return self.vocab_size - 1

    # subclasses: event probabilities as float64 tensors, from a float64 σ̄ tensor
    def _events(self, sigma_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def event_probs(self, sigma_bar) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(p_mask, p_shuffle, p_keep)`` float64 tensors shaped like ``sigma_bar``, summing to 1.

        For a real token ``x0``: ``p(MASK|x0) = p_mask``, ``p(y|x0) = p_shuffle/N`` for a real
        ``y ≠ x0`` and ``p(x0|x0) = p_keep + p_shuffle/N``. A MASK input stays MASK.
        """
        return self._events(_check_sigma(sigma_bar, None, f"{type(self).__name__}.event_probs", None))

    def mask_prob(self, sigma_bar) -> torch.Tensor:
        """``p_mask`` (float64), the probability that a real token is MASK at cumulative noise σ̄."""
        return self.event_probs(sigma_bar)[0]

    def transition_prob(self, x0: torch.Tensor, sigma_bar) -> torch.Tensor:
        """``p(x_t = · | x_0 = x0)``: float64 ``[..., V]`` for ``x0`` of shape ``[...]``.

        Dense over the vocabulary: meant for tiny vocabularies (tests, brute-force checks); losses
        and samplers use the closed-form scalars of :meth:`event_probs` instead.
        """
        context = f"{type(self).__name__}.transition_prob"
        _check_tokens("x0", x0, self.vocab_size, context)
        sigma_bar = _check_sigma(sigma_bar, x0.shape, context, x0.device)
        p_mask, p_shuffle, p_keep = self._events(sigma_bar)
        V, N = self.vocab_size, self.num_tokens
        probs = (p_shuffle / N).unsqueeze(-1).expand(*x0.shape, V).clone()
        probs[..., self.mask_id] = p_mask
        probs.scatter_add_(-1, x0.unsqueeze(-1), p_keep.unsqueeze(-1))
        is_mask = (x0 == self.mask_id).unsqueeze(-1)
        absorbed = torch.zeros_like(probs)
        absorbed[..., self.mask_id] = 1.0
        return torch.where(is_mask, absorbed, probs)

    def transition_matrix(self, sigma_bar) -> torch.Tensor:
        """Dense float64 ``[V, V]`` matrix whose column ``x0`` is ``p(x_t = · | x_0 = x0)`` at the
        scalar cumulative noise ``sigma_bar`` (the paper's ``e^{σ̄Q}`` for the SEDD processes)."""
        sigma_bar = _check_sigma(sigma_bar, None, f"{type(self).__name__}.transition_matrix", None)
        if sigma_bar.numel() != 1:
            raise ValueError(f"{type(self).__name__}.transition_matrix: sigma_bar must be a scalar, "
                             f"got shape {tuple(sigma_bar.shape)}")
        x0 = torch.arange(self.vocab_size)
        return self.transition_prob(x0, sigma_bar.reshape(())).T.contiguous()

    def sample(self, x0: torch.Tensor, sigma_bar, generator: torch.Generator | None = None,
               return_events: bool = False):
        """Draw ``x_t ~ p(· | x_0)`` independently per position.

        Args:
            x0: integer tensor of token ids in ``[0, V)``, any shape.
            sigma_bar: float tensor broadcastable to ``x0.shape`` (per-position σ̄ >= 0).
            generator: ``torch.Generator`` on ``x0``'s device (``None``: the global RNG), or a
                :class:`PhiloxStream`.
            return_events: also return :class:`NoiseEvents` (needed by the HDCE loss).

        Returns:
            ``x_t`` (int64, shape of ``x0``), or ``(x_t, NoiseEvents)``. Draws two random numbers per
            position (a float64 uniform and a replacement token) and allocates nothing of size V.
        """
        context = f"{type(self).__name__}.sample"
        _check_tokens("x0", x0, self.vocab_size, context)
        sigma_bar = _check_sigma(sigma_bar, x0.shape, context, x0.device)
        p_mask, p_shuffle, _ = self._events(sigma_bar)
        if isinstance(generator, PhiloxStream):
            row_ids = torch.arange(x0.numel(), device=x0.device).reshape(x0.shape)
            x_t, masked, shuffled, invalid = hk.sampling.corrupt_deferred(
                x0.long(), p_mask, p_shuffle, self.num_tokens, self.mask_id, generator.seed, generator.step, row_ids,
                generator.backend)
            return (x_t, NoiseEvents(masked, shuffled, invalid)) if return_events else x_t
        u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=torch.float64)
        replacement = torch.randint(0, self.num_tokens, x0.shape, generator=generator, device=x0.device)
        real = x0 != self.mask_id
        masked = real & (u < p_mask)
        shuffled = real & ~masked & (u < p_mask + p_shuffle)
        x_t = torch.where(masked, self.mask_id, torch.where(shuffled, replacement, x0.long()))
        return (x_t, NoiseEvents(masked, shuffled)) if return_events else x_t

    def sample_prior(self, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """The fully-noised state (σ̄ → ∞): all MASK (int64 tensor of ``shape``)."""
        return torch.full(tuple(shape), self.mask_id, dtype=torch.long, device=device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class _SEDDProcess(_Process):
    """``e^{σ̄Q}`` for ``Q = (1-γ)Q_Absorb + γQ_Uniform`` (Eq. 7g); γ = 0 absorb, γ = 1 uniform."""

    gamma: float = 0.0

    def split_sigma(self, sigma_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``((1-γ)σ̄, γσ̄)``: the absorbing and uniform shares of σ̄ (exact zeros for γ = 0 or 1,
        so that ``σ̄ = inf`` gives no ``0·inf``)."""
        absorb = sigma_bar * (1.0 - self.gamma) if self.gamma != 1.0 else torch.zeros_like(sigma_bar)
        uniform = sigma_bar * self.gamma if self.gamma != 0.0 else torch.zeros_like(sigma_bar)
        return absorb, uniform

    def decays(self, sigma_bar) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B) = (e^{-(1-γ)σ̄}, e^{-γσ̄})`` as float64 tensors: a real token is unmasked with
        probability ``A`` and, given that, untouched by the uniform part with probability ``B``."""
        sigma_bar = _check_sigma(sigma_bar, None, f"{type(self).__name__}.decays", None)
        absorb, uniform = self.split_sigma(sigma_bar)
        return torch.exp(-absorb), torch.exp(-uniform)

    def _events(self, sigma_bar):
        # Column x0 of Eq. 7g: MASK gets 1 - A; every real y gets A(1-B)/N; x0 gets AB on top.
        # expm1 keeps the small-σ̄ probabilities accurate.
        absorb, uniform = self.split_sigma(sigma_bar)
        p_mask = -torch.expm1(-absorb)
        a = torch.exp(-absorb)
        p_shuffle = a * -torch.expm1(-uniform)
        p_keep = a * torch.exp(-uniform)
        return p_mask, p_shuffle, p_keep

    def rate_matrix(self) -> torch.Tensor:
        """Dense float64 ``[V, V]`` generator ``Q`` (column convention: ``Q[y, x]`` = rate x → y)."""
        V, N, M = self.vocab_size, self.num_tokens, self.mask_id
        q_absorb = torch.zeros(V, V, dtype=torch.float64)
        q_absorb[:N, :N] = -torch.eye(N, dtype=torch.float64)
        q_absorb[M, :N] = 1.0
        q_uniform = torch.zeros(V, V, dtype=torch.float64)
        q_uniform[:N, :N] = 1.0 / N - torch.eye(N, dtype=torch.float64)
        return (1.0 - self.gamma) * q_absorb + self.gamma * q_uniform


class Absorb(_SEDDProcess):
    """SEDD absorbing process (Eq. 5a): a real token becomes MASK with probability ``1 - e^{-σ̄}``."""

    gamma = 0.0
    name = "absorb"


class Uniform(_SEDDProcess):
    """SEDD uniform process over the ``N`` real tokens (Eq. 5b, Q_Uniform as the official QGamma uses
    it): ``x_t = x0`` w.p. ``e^{-σ̄}``, else a uniform real token (possibly ``x0``). Never MASK."""

    gamma = 1.0
    name = "uniform"

    def sample_prior(self, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """The stationary distribution: uniform real tokens (int64 tensor of ``shape``)."""
        return torch.randint(0, self.num_tokens, tuple(shape), generator=generator, device=device)


class GammaHybrid(_SEDDProcess):
    """γ-hybrid (paper §3.2, App. A): ``Q = (1-γ)Q_Absorb + γQ_Uniform`` with ``0 < γ < 1``,
    evolution operator in closed form Eq. 7g. Its limit (σ̄ → ∞) is all MASK."""

    name = "gamma_hybrid"

    def __init__(self, vocab_size: int, gamma: float):
        super().__init__(vocab_size)
        gamma = _check_real("gamma", gamma, "GammaHybrid")
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"GammaHybrid: gamma must be in (0, 1) (use Absorb for 0, Uniform for 1), "
                             f"got {gamma}")
        self.gamma = gamma

    def __repr__(self) -> str:
        return f"GammaHybrid(vocab_size={self.vocab_size}, gamma={self.gamma:g})"


class EpsilonHybrid(_Process):
    """ε-hybrid (paper §3.2): unless the level is 0 (``σ̄ = 0``, then ``x_t = x_0``), ``x_t`` follows
    column ``x0`` of ``(1 + εQ_Uniform)(1 + (1-α)Q_Absorb)``, ``α = e^{-σ̄}``: mask with probability
    ``p_mask = 1 - α``, otherwise shuffle to a uniform real token (possibly ``x0``) with probability ε,
    otherwise keep. ``0 <= ε <= 1``. The HDCE loss needs the events: ``sample(..., return_events=True)``.
    """

    name = "epsilon_hybrid"

    def __init__(self, vocab_size: int, epsilon: float):
        super().__init__(vocab_size)
        epsilon = _check_real("epsilon", epsilon, "EpsilonHybrid")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"EpsilonHybrid: epsilon must be in [0, 1], got {epsilon}")
        self.epsilon = epsilon

    def _events(self, sigma_bar):
        # Level 0 is special-cased (paper §3.2): at σ̄ = 0 the product above would still shuffle
        # with probability ε, but a clean position must stay clean.
        clean = sigma_bar == 0
        p_mask = -torch.expm1(-sigma_bar)
        alpha = torch.exp(-sigma_bar)
        p_shuffle = torch.where(clean, 0.0, alpha * self.epsilon)
        p_keep = torch.where(clean, 1.0, alpha * (1.0 - self.epsilon))
        return p_mask, p_shuffle, p_keep

    def __repr__(self) -> str:
        return f"EpsilonHybrid(vocab_size={self.vocab_size}, epsilon={self.epsilon:g})"
