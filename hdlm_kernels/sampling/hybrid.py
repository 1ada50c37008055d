"""One reverse step of the γ-hybrid SEDD process: Tweedie τ-leaping ("analytic") and Euler
(paper §3.2, App. A Eq. 7g, App. B.4; DESIGN.md §5-§6).

Conventions (as ``hdlm_reference.noise``): ids ``0 .. V-1``, ``M = mask_id``, the ``N = V-1`` other
ids are real tokens. Matrices act on columns: ``e^{σQ}[y, x] = p(x_t = y | x_0 = x)``,
``Q = (1-γ)Q_A + γQ_U`` with ``Q_A[y, x] = -δ_xy + δ_yM`` (x real; column M zero) and
``Q_U[y, x] = 1/N - δ_xy`` (x, y real; row and column M zero). A row in state ``x`` at cumulative
noise ``σ̄_now`` moves to ``σ̄_next <= σ̄_now``; ``Δ = σ̄_now - σ̄_next``,
``A = e^{-(1-γ)Δ}``, ``B = e^{-γΔ}`` (so ``AB = e^{-Δ}``). The model's log-score row ``s``
gives ratios ``r_y = e^{s_y} ≈ p_t(y) / p_t(x)``; ``r_x = 1`` by definition (``s_x`` is not read)
and ``S = Σ_{z≠M} r_z``.

Exact reverse step (the derivation behind "analytic"). Marginals evolve as ``p_now = e^{ΔQ} p_next``,
so Bayes gives

    q(x_next = y | x_now = x) = e^{ΔQ}[x, y] · p_next(y) / p_now(x)
                              = e^{ΔQ}[x, y] · [e^{-ΔQ} r]_y                              (*)

because ``p_next = e^{-ΔQ} p_now`` (``e^{-ΔQ}`` is the inverse of ``e^{ΔQ}``), hence
``p_next(y) / p_now(x) = Σ_z e^{-ΔQ}[y, z] p_now(z) / p_now(x)``. ``e^{-ΔQ} r`` is the
"staggered score". (*) is exact for one token with the true ratios; with the model's ratios of a
token given the rest of the sequence, applied to every position independently, it is SEDD's Tweedie
τ-leaping. Both factors are closed forms:

* Eq. 4 (``e^{φQ*} = 1 + λ^{-1}(e^{λφ} - 1)Q*`` for ``Q*² = λQ*``) is a power series and holds for
  every real ``φ``, not only ``φ >= 0``; ``Q_A`` and ``Q_U`` commute (Eq. 6), so
  ``e^{-ΔQ} = e^{-(1-γ)ΔQ_A} e^{-γΔQ_U}`` and Eq. 7d-7g go through unchanged with ``Δ -> -Δ``:

      e^{-ΔQ} = 1 + (1 - e^{(1-γ)Δ}) Q_A + (e^{(1-γ)Δ} - e^{Δ}) Q_U                     (Eq. 7g at -Δ)

  Component-wise (``Q_A r`` is ``-r_y`` on real y and ``S`` on M; ``Q_U r`` is ``S/N - r_y`` on real
  y and 0 on M):

      [e^{-ΔQ} r]_y = e^{Δ} r_y - (e^{Δ} - e^{(1-γ)Δ}) S/N        (y real)
      [e^{-ΔQ} r]_M = r_M - (e^{(1-γ)Δ} - 1) S                     (only needed for x = M, r_M = 1)

* the forward row, Eq. 7g at +Δ: ``e^{ΔQ}[M, y] = 1 - A`` (y real), ``e^{ΔQ}[M, M] = 1``;
  for x real ``e^{ΔQ}[x, y] = A(1-B)/N + AB·δ_xy`` (y real), ``e^{ΔQ}[x, M] = 0``.

Multiplying (*) by the per-row constant ``e^{-Δ} = AB`` (and by ``1/A`` for real x) leaves the
weights this module samples from; no ``e^{Δ}`` remains, so nothing overflows for large Δ:

    x = M:    w_y = (1-A)·(r_y - (1-B)·S/N),   w_M = B·(A - (1-A)·S)
    x real:   w_y = ((1-B)/N + B·δ_xy)·(r_y - (1-B)·S/N),   w_M = 0

The official code (notes §3.1.2) instead interpolates SEDD's absorbing and uniform staggered scores
linearly with the FULL Δ in both, ``(1-γ)·stag_A(Δ) + γ·stag_U(Δ)``, which agrees with the exact
form above only to first order in Δ.

"euler" is the first-order step of the reverse CTMC: reverse rate ``Q[x, y]·r_y`` from x to y ≠ x
(``1-γ`` from M to a real y, ``γ/N`` between real tokens, 0 into M), so

    x = M:    w_y = Δ(1-γ)·r_y,           w_M = 1 - Δ(1-γ)·S
    x real:   w_y = Δ(γ/N)·r_y (y ≠ x),   w_x = 1 - Δ(γ/N)·(S - 1),   w_M = 0

Both methods: negative weights are clamped to 0 (see ``_weights``), MASK gets weight 0 on the
rows that must leave MASK (``final``, or ``σ̄_next = 0``: a clean state is never MASK), and the token
is drawn by ``gumbel_argmax`` on ``log w`` (stream 0, element ``row_id·V + y``; Gumbel-max does
not need normalized weights), so a row's draw depends only on ``(seed, step, row_id)`` and its
own inputs. γ = 0 is SEDD's absorbing sampler (a real token never changes; a MASK stays or
unmasks), γ = 1 SEDD's uniform one.

Differences from the official γ samplers (notes §5.2):

1. Exact hybrid staggered score (Eq. 7g at -Δ, ``(1-γ)Δ`` / ``γΔ`` split) instead of the linear
   interpolation of the two single-graph formulas with the full Δ.
2. ``r_x = 1`` exactly (the current token's log-score is never read, SEDD's convention and
   ``gamma_log_score``'s default); the official uses the model's own ``e^{s_x}``. The MASK column of
   the log-score is never read either (``r_M = 1`` when x = M; no weight otherwise).
3. Negative weights are clamped to 0. The official passes them to its exponential race
   ``argmax probs / Exp(1)``, where a negative weight loses to every positive one but, on a row
   without a positive weight, a negatively weighted token still wins.
4. The draw is FP64 Gumbel-max on the Philox stream keyed by row identity (DESIGN §6), only for the
   rows passed in (the active ones), in row chunks with no ``[R, V]`` float64 tensor; the official
   draws ``rand_like`` fp64 over all ``[B, L, V]`` (with ``u + 1e-10``) and discards the inactive rows.
   Weights are computed in float64 (official: fp32 from bf16 log-scores).
5. The final step excludes MASK where ``final`` or ``σ̄_next = 0``, with ``σ̄_next = 0`` exactly at
   level 0; the official keeps ``σ̄_next = σ̄(0.99·a_eps)`` (SAR: ``0.9·a_eps``) and zeroes MASK
   on its "tokens to denoise".
6. ``method="euler"`` runs; the official ``EulerPredictor`` has a signature its samplers cannot call
   (TypeError), so only ``analytic`` runs there.

``hybrid_step_ref`` is the dense twin (``[V, V]`` operators of Eq. 7g at ±Δ and matrix-vector
products, for tiny V) used by the tests; ``hybrid_probs`` / ``hybrid_probs_ref`` return the
normalized step distribution ``[R, V]`` (float64, for tests and inspection only).
"""

from __future__ import annotations

import math
import numbers

import torch

from .gumbel import (
    LOGITS_DTYPES,
    _checked_chunk_rows,
    _checked_row_ids,
    _implementation,
    gumbel_argmax_ref,
)
from .philox import SEED_LIMIT, _integer

METHODS = ("analytic", "euler")

__all__ = ["hybrid_step", "hybrid_step_ref", "hybrid_probs", "hybrid_probs_ref", "METHODS"]


def hybrid_step(
    x: torch.Tensor,
    log_score: torch.Tensor,
    sigma_now,
    sigma_next,
    gamma: float,
    mask_id: int,
    seed: int,
    step: int,
    row_ids: torch.Tensor | None = None,
    method: str = "analytic",
    final=False,
    backend: str = "auto",
    *,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """One reverse step of the γ-hybrid process for R independent rows (module docstring).

    Args:
        x: [R] integer tensor, the current tokens in [0, V).
        log_score: [R, V] bf16/fp16/fp32/fp64 log-ratios ``s_y ≈ log p_now(y) / p_now(x)`` at
            ``σ̄_now`` (e.g. ``hdlm_reference.losses.gamma_log_score``), on x's device. Entries
            ``y = x`` and ``y = mask_id`` are not read. Must not hold NaN or +inf.
        sigma_now, sigma_next: per-row cumulative noise σ̄ before and after the step: floats or
            floating tensors [R] (or 0-d), finite, with ``0 <= sigma_next <= sigma_now``.
        gamma: γ of ``Q = (1-γ)Q_Absorb + γQ_Uniform``, a float in [0, 1] (0 = SEDD absorb).
        mask_id: the MASK id in [0, V); the other V - 1 ids are the real tokens.
        seed: int in [0, 2^64). step: int >= 0, the sampler step.
        row_ids: [R] absolute row identities (e.g. ``b·d + i``); default ``arange(R)``.
        method: ``"analytic"`` (Tweedie τ-leaping, exact for one token with the true score) or
            ``"euler"`` (first order in Δ).
        final: bool or bool tensor [R]: rows that must not end on MASK (their last step, level 0
            next). Rows with ``sigma_next == 0`` are final whatever this says.
        backend: the ``gumbel_argmax`` backend of the draw ("auto", "reference", ...); the weights
            are computed with torch ops in float64 chunks.
        chunk_rows: rows per chunk (float64 temporaries of chunk_rows·V·8 bytes); default as
            ``gumbel_argmax``. Does not change the result.

    Returns:
        LongTensor [R] on x's device: the tokens after the step (x is not modified).

    Raises:
        ValueError if a row has no token of positive weight (e.g. every log-score is -inf on a
        final masked row, or γ = 1 on a final masked row: MASK is unreachable for the uniform process).
    """
    x, log_score, now, nxt, gamma, mask_id, method, final = _checked_inputs(
        "hybrid_step", x, log_score, sigma_now, sigma_next, gamma, mask_id, method, final)
    seed = _integer("seed", seed, 0, SEED_LIMIT, "an int in [0, 2^64)")
    step = _integer("step", step, 0, None, "an int >= 0")
    num_rows, vocab = log_score.shape
    row_ids = _checked_row_ids(row_ids, num_rows, vocab, x.device)
    chunk_rows = _checked_chunk_rows(chunk_rows, vocab)
    implementation = _implementation(backend, "hybrid_step", x.device)  # checked before any work
    tokens = torch.empty(num_rows, dtype=torch.int64, device=x.device)
    for start in range(0, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        part = slice(start, stop)
        weights = _weights(x[part], log_score[part], now[part], nxt[part], gamma, mask_id, method,
                           final[part], start)
        drawn, best = implementation(weights.log_(), None, row_ids[part], seed, step, 1.0, None,
                                     stop - start)
        del weights
        _check_drawn(best, start)
        tokens[part] = drawn
    return tokens


def hybrid_probs(
    x: torch.Tensor,
    log_score: torch.Tensor,
    sigma_now,
    sigma_next,
    gamma: float,
    mask_id: int,
    method: str = "analytic",
    final=False,
) -> torch.Tensor:
    """The distribution ``hybrid_step`` draws from, normalized: float64 [R, V] (allocates it; for
    tests and inspection). Same arguments as ``hybrid_step``."""
    x, log_score, now, nxt, gamma, mask_id, method, final = _checked_inputs(
        "hybrid_probs", x, log_score, sigma_now, sigma_next, gamma, mask_id, method, final)
    weights = _weights(x, log_score, now, nxt, gamma, mask_id, method, final, 0)
    return weights / weights.sum(1, keepdim=True)


def hybrid_step_ref(
    x: torch.Tensor,
    log_score: torch.Tensor,
    sigma_now,
    sigma_next,
    gamma: float,
    mask_id: int,
    seed: int,
    step: int,
    row_ids: torch.Tensor | None = None,
    method: str = "analytic",
    final=False,
) -> torch.Tensor:
    """Dense twin of ``hybrid_step`` for tiny V: ``gumbel_argmax_ref`` on the log of
    ``hybrid_probs_ref`` (no input checks)."""
    probs = hybrid_probs_ref(x, log_score, sigma_now, sigma_next, gamma, mask_id, method, final)
    return gumbel_argmax_ref(torch.log(probs), seed, step, row_ids)


def hybrid_probs_ref(
    x: torch.Tensor,
    log_score: torch.Tensor,
    sigma_now,
    sigma_next,
    gamma: float,
    mask_id: int,
    method: str = "analytic",
    final=False,
) -> torch.Tensor:
    """Dense reference of the step distribution, float64 [R, V], written from the definitions:

    builds ``Q_Absorb``, ``Q_Uniform`` and ``Q`` as [V, V] matrices and, per row, the operators
    ``e^{±ΔQ} = 1 + (1 - e^{∓(1-γ)Δ}) Q_A + (e^{∓(1-γ)Δ} - e^{∓Δ}) Q_U`` (paper Eq. 7g as printed,
    at +Δ and at -Δ), then
    analytic: ``w_y = e^{ΔQ}[x, y] · (e^{-ΔQ} r)_y`` (Bayes with the Tweedie marginal, module
    docstring (*)); euler: ``w = δ_x + Δ·(Q[x, :] ⊙ r)`` off the diagonal with the diagonal ``1 - Σ``;
    clamp at 0, MASK to 0 on final rows (or σ̄_next = 0), normalize. Nothing of the per-row scalar
    algebra of ``hybrid_step`` is reused; Eq. 7g itself is checked against matrix exponentials by
    the tests. (``torch.linalg.matrix_exp`` is not used here: for small ``ΔQ`` it is only accurate
    to ~5e-12.) O(R·V²) memory and time: tiny vocabularies only. No input checks.
    """
    device = log_score.device
    num_rows, vocab = log_score.shape
    x = x.to(device=device, dtype=torch.int64)
    now = torch.as_tensor(sigma_now, dtype=torch.float64, device=device).expand(num_rows)
    nxt = torch.as_tensor(sigma_next, dtype=torch.float64, device=device).expand(num_rows)
    final = torch.as_tensor(final, dtype=torch.bool, device=device).expand(num_rows) | (nxt == 0)
    M, N = mask_id, vocab - 1
    real = torch.ones(vocab, dtype=torch.float64, device=device)
    real[M] = 0.0
    eye = torch.eye(vocab, dtype=torch.float64, device=device)
    to_mask = torch.zeros(vocab, vocab, dtype=torch.float64, device=device)
    to_mask[M, :] = 1.0
    q_absorb = (to_mask - eye) * real[None, :]                  # column x: -δ_x + δ_M, MASK column 0
    q_uniform = (1.0 / N - eye) * real[:, None] * real[None, :]  # among real tokens only
    q = (1.0 - gamma) * q_absorb + gamma * q_uniform

    def evolution(delta):  # Eq. 7g, any real delta
        return (eye + (1.0 - math.exp(-(1.0 - gamma) * delta)) * q_absorb
                + (math.exp(-(1.0 - gamma) * delta) - math.exp(-delta)) * q_uniform)

    ratios = log_score.to(torch.float64).exp()
    probs = torch.empty(num_rows, vocab, dtype=torch.float64, device=device)
    for i in range(num_rows):
        xi = int(x[i])
        r = ratios[i].clone()
        r[xi] = 1.0
        delta = float(now[i] - nxt[i])
        if method == "analytic":
            w = evolution(delta)[xi, :] * (evolution(-delta) @ r)
        else:
            w = delta * q[xi, :] * r
            w[xi] = 0.0
            w[xi] = 1.0 - w.sum()
        w = w.clamp(min=0.0)
        if bool(final[i]):
            w[M] = 0.0
        probs[i] = w / w.sum()
    return probs


# ---------------------------------------------------------------- internals


def _weights(x, log_score, now, nxt, gamma, mask_id, method, final, offset) -> torch.Tensor:
    """Unnormalized float64 weights [c, V] of a chunk of rows (module docstring formulas).

    x int64 [c]; log_score [c, V] any float dtype; now, nxt float64 [c]; final bool [c]; offset:
    the chunk's first row, for error messages. One float64 [c, V] buffer, updated in place.
    """
    M = mask_id
    N = log_score.shape[1] - 1
    # Exact widening; a fresh buffer even for float64 input, which is then modified in place.
    r = log_score.to(torch.float64, copy=True).exp_()
    r.scatter_(1, x[:, None], 1.0)  # r_x = p(x)/p(x) = 1 by definition; s_x is not read
    r[:, M] = 0.0  # never read: S sums the real ids; the weight of MASK is set below
    total = r.sum(1)  # S
    bad = ~torch.isfinite(total)
    if bool(bad.any()):
        row = offset + int(bad.nonzero()[0, 0])
        raise ValueError(f"log_score must hold finite values or -inf (no NaN, no +inf, none above ~709 "
                         f"where exp overflows); row {row} does not")
    masked = x == M
    delta = now - nxt
    if method == "analytic":
        a = torch.exp(-(1.0 - gamma) * delta)
        one_minus_a = -torch.expm1(-(1.0 - gamma) * delta)  # expm1: accurate for small Δ
        b = torch.exp(-gamma * delta)
        spread = -torch.expm1(-gamma * delta) / N  # (1 - B)/N: the uniform share per real token
        staggered = r.sub_((spread * total)[:, None])  # e^{-Δ}(e^{-ΔQ} r)_y for real y
        w = staggered.mul_(torch.where(masked, one_minus_a, spread)[:, None])
        # x real: the kept token has B·(r_x - (1-B)S/N) on top of the uniform share
        keep = torch.where(masked, 0.0, b * (1.0 - spread * total))
        w.scatter_add_(1, x[:, None], keep[:, None])
        w[:, M] = torch.where(masked, b * (a - one_minus_a * total), 0.0)
    else:
        # Δ·Q[x, y] for real y ≠ x (float64 tensors: torch.where of two Python floats is float32)
        rate = torch.where(masked, delta.new_tensor(1.0 - gamma), delta.new_tensor(gamma / N)) * delta
        w = r.mul_(rate[:, None])
        # probability of leaving x: Δ·rate·Σ_{y≠x real} r_y; S counts r_x = 1 when x is real
        leave = rate * torch.where(masked, total, total - 1.0)
        w.scatter_(1, x[:, None], (1.0 - leave)[:, None])
    # Why clamp: with a learned score r is not a ratio of true marginals, and e^{-ΔQ} (the inverse
    # of a stochastic matrix) has negative entries, so (e^{-ΔQ} r)_y can fall below 0; Euler's
    # stay probability 1 - Δ·rate is negative when the step is too long for first order. With the
    # true score the analytic weights are Bayes' posterior and never negative, so 0 is the nearest
    # admissible value and the clamp only acts where the approximation has already failed.
    w.clamp_(min=0.0)
    # A row that reaches σ̄ = 0 is clean: p_0(MASK) = 0, whatever the approximate score says.
    w[:, M] = torch.where(final, 0.0, w[:, M])
    return w


def _check_drawn(best: torch.Tensor, offset: int) -> None:
    bad = torch.isnan(best) | (best == -torch.inf)
    if bool(bad.any()):
        row = offset + int(bad.nonzero()[0, 0])
        raise ValueError(
            f"hybrid_step: row {row} has no token of positive probability (e.g. a final MASK row "
            f"whose log-scores are all -inf, or gamma = 1 on a MASK row); {int(bad.sum())} such row(s) "
            f"in its chunk"
        )


def _checked_inputs(op, x, log_score, sigma_now, sigma_next, gamma, mask_id, method, final):
    """Validates and converts: x int64 [R], log_score [R, V] (detached), sigmas float64 [R],
    gamma float, mask_id int, method str, final bool [R] (already OR-ed with sigma_next == 0)."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"{op}: method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    if not isinstance(log_score, torch.Tensor):
        raise TypeError(f"{op}: log_score must be a floating tensor [R, V]; got {type(log_score).__name__}")
    if log_score.dtype not in LOGITS_DTYPES:
        raise TypeError(f"{op}: log_score must have dtype bfloat16, float16, float32 or float64; "
                        f"got {log_score.dtype}")
    if log_score.dim() != 2 or log_score.shape[1] < 2:
        raise ValueError(f"{op}: log_score must have shape [R, V] with V >= 2; got shape "
                         f"{tuple(log_score.shape)}")
    log_score = log_score.detach()
    num_rows, vocab = log_score.shape
    device = log_score.device
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be an integer tensor [R] of token ids; got {type(x).__name__}")
    if x.dtype == torch.bool or x.dtype.is_floating_point or x.dtype.is_complex:
        raise TypeError(f"{op}: x must be an integer tensor [R] of token ids; got dtype {x.dtype}")
    if tuple(x.shape) != (num_rows,):
        raise ValueError(f"{op}: x must have shape [R] = [{num_rows}] (one token per row of log_score); "
                         f"got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{op}: log_score must be on x's device {x.device}; got a tensor on {device}")
    x = x.to(torch.int64)
    if num_rows and (int(x.min()) < 0 or int(x.max()) >= vocab):
        raise ValueError(f"{op}: x must hold token ids in [0, V) = [0, {vocab}); got values in "
                         f"[{int(x.min())}, {int(x.max())}]")
    mask_id = _integer("mask_id", mask_id, 0, vocab, f"an int in [0, V) = [0, {vocab}) (the MASK id)")
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"{op}: gamma must be a float in [0, 1]; got {gamma!r} ({type(gamma).__name__})")
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"{op}: gamma must be a float in [0, 1]; got {gamma!r}")
    gamma = float(gamma)
    now = _checked_sigma(op, "sigma_now", sigma_now, num_rows, device)
    nxt = _checked_sigma(op, "sigma_next", sigma_next, num_rows, device)
    above = nxt > now
    if bool(above.any()):
        row = int(above.nonzero()[0, 0])
        raise ValueError(f"{op}: sigma_next must be <= sigma_now (a reverse step lowers the noise); "
                         f"row {row} has sigma_now {float(now[row])} and sigma_next {float(nxt[row])}")
    if isinstance(final, torch.Tensor):
        if final.dtype != torch.bool:
            raise TypeError(f"{op}: final must be a bool or a bool tensor [R]; got dtype {final.dtype}")
        if final.dim() == 0:
            final = final.expand(num_rows)
        if tuple(final.shape) != (num_rows,):
            raise ValueError(f"{op}: final must be a bool or a bool tensor of shape [R] = [{num_rows}]; "
                             f"got shape {tuple(final.shape)}")
        final = final.to(device)
    elif isinstance(final, bool):
        final = torch.full((num_rows,), final, dtype=torch.bool, device=device)
    else:
        raise TypeError(f"{op}: final must be a bool or a bool tensor [R]; got {type(final).__name__}")
    return x, log_score, now, nxt, gamma, mask_id, method, final | (nxt == 0)


def _checked_sigma(op, name, value, num_rows, device) -> torch.Tensor:
    """float64 [R] on device; finite and >= 0."""
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a float or a floating tensor [R]; got dtype {value.dtype}")
        if value.dim() == 0:
            value = value.expand(num_rows)
        if tuple(value.shape) != (num_rows,):
            raise ValueError(f"{op}: {name} must be a float or a tensor of shape [R] = [{num_rows}]; "
                             f"got shape {tuple(value.shape)}")
        value = value.to(device=device, dtype=torch.float64)  # exact widening
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = torch.full((num_rows,), float(value), dtype=torch.float64, device=device)
    else:
        raise TypeError(f"{op}: {name} must be a float or a floating tensor [R]; got {type(value).__name__}")
    bad = ~(torch.isfinite(value) & (value >= 0))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: {name} must be finite and >= 0; row {row} holds {float(value[row])}")
    return value
