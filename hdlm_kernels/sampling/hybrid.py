"""One reverse step of the γ-hybrid SEDD process: Tweedie τ-leaping ("analytic") and Euler
(paper §3.2, App. A Eq. 7g, App. B.4; docs/hybrid-step.md).

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

The official code (docs/official-differences.md) instead interpolates SEDD's absorbing and uniform staggered scores
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

Differences from the official γ samplers (docs/official-differences.md):

1. Exact hybrid staggered score (Eq. 7g at -Δ, ``(1-γ)Δ`` / ``γΔ`` split) instead of the linear
   interpolation of the two single-graph formulas with the full Δ.
2. ``r_x = 1`` exactly (the current token's log-score is never read, SEDD's convention and
   ``gamma_log_score``'s default); the official uses the model's own ``e^{s_x}``. The MASK column of
   the log-score is never read either (``r_M = 1`` when x = M; no weight otherwise).
3. Negative weights are clamped to 0. The official passes them to its exponential race
   ``argmax probs / Exp(1)``, where a negative weight loses to every positive one but, on a row
   without a positive weight, a negatively weighted token still wins.
4. The draw is FP64 Gumbel-max on the Philox stream keyed by row identity (docs/sampling-stream.md), only for the
   rows passed in (the active ones), in row chunks with no ``[R, V]`` float64 tensor; the official
   draws ``rand_like`` fp64 over all ``[B, L, V]`` (with ``u + 1e-10``) and discards the inactive rows.
   Weights are computed in float64 (official: fp32 from bf16 log-scores).
5. The final step excludes MASK where ``final`` or ``σ̄_next = 0``, with ``σ̄_next = 0`` exactly at
   level 0; the official keeps ``σ̄_next = σ̄(0.99·a_eps)`` (SAR: ``0.9·a_eps``) and zeroes MASK
   on its "tokens to denoise".
6. ``method="euler"`` runs; the official ``EulerPredictor`` has a signature its samplers cannot call
   (TypeError), so only ``analytic`` runs there.

The fused form (what every backend computes, bit for bit). Per row, the wrapper computes six float64
constants ``c1..c6`` from x, Δ, γ, N and ``final`` (``step_coefficients``, with ``exp64`` and
``expm1_64`` so that they are the same bits on every device), and each backend then runs, with
``s`` the log-score row widened exactly to float64 and "read" meaning real ``y ≠ x``:

    pass 1   m = max(read s_y), max(m, 0) if x is real (r_x = 1 is a ratio too), then max(m, -708);
             a NaN or +inf read entry marks the row bad (the caller raises)
    pass 2   r'_y = exp64(s_y - m) in [0, 1];  S_o = Σ_read r'_y as a fixed-point sum (two int64
             accumulators of trunc(r'·2^32) and trunc(frac(r'·2^32)·2^31), then
             double(hi)·2^-32 + double(lo)·2^-63): the same bits in any order of additions
             u = exp64(-m) (the scaled "1");  S = S_o + c3·u
    pass 3   w_y = c1·(r'_y - c2·S)        (read y)
             w_x = c4·(c5·u - c6·S)        (the current cell, x real or x = MASK)
             w_M = 0                       (x real)
             log w = log64(w) if w >= 2^-1022 else -inf;  score_y = log w_y + g_y;  argmax

Scaling every weight of a row by ``e^{-m}`` does not change the draw, keeps every ratio in [0, 1] (so
log-scores far above 709 no longer overflow) and keeps S >= 1 whenever the row has a ratio of at
least e^{-708}, so the fixed-point sum loses nothing a float64 sum would keep. The constants:

    analytic, x = MASK:  c1 = 1-A, c2 = (1-B)/N, c3 = 0, c4 = B (0 if final), c5 = A, c6 = 1-A
    analytic, x real:    c1 = (1-B)/N, c2 = (1-B)/N, c3 = 1, c4 = (1-B)/N + B, c5 = 1, c6 = (1-B)/N
    euler:               c1 = rate, c2 = 0, c3 = 0, c4 = 1 (0 for a final MASK row), c5 = 1, c6 = rate

which are the formulas above with ``r_x = 1`` scaled to ``u``. The kernels read the log-scores three
times (max, sum, race) in their own dtype and never hold a row in float64; the torch reference
(``backend="reference"``) does the same arithmetic on float64 chunks of rows.

``hybrid_step_ref`` is the dense twin (``[V, V]`` operators of Eq. 7g at ±Δ and matrix-vector
products, for tiny V) used by the tests; ``hybrid_probs`` / ``hybrid_probs_ref`` return the
normalized step distribution ``[R, V]`` (float64, for tests and inspection only).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch

from .. import _extension, backends
from .._triton_device import triton_probe
from ..checks import integer, seed_and_step
from .arguments import (
    check_index_tensor,
    check_row_id_values,
    checked_chunk_rows,
    checked_logits,
    checked_row_ids,
    signed64,
    unsigned64,
)
from .constants import (
    EXP64_MIN,
    FIXED_HI_SCALE,
    FIXED_HI_UNIT,
    FIXED_LO_SCALE,
    FIXED_LO_UNIT,
    GUMBEL_STREAM,
    SMALLEST_WEIGHT,
)
from .gumbel import compiled_without_chunk_rows, gumbel_argmax_ref
from .log64 import exp64, expm1_64, gumbel_noise, log64
from .philox import stream_uniforms

METHODS = ("analytic", "euler")

__all__ = ["hybrid_step", "hybrid_step_deferred", "hybrid_step_ref", "hybrid_probs", "hybrid_probs_ref",
           "step_coefficients", "METHODS"]


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
        backend: a name of ``hdlm_kernels.backends.names("hybrid_step")``: "auto" (the fused kernel of
            x's device when available, else the reference), "kernels" (the fused kernel or
            RuntimeError), "reference", "cpp", "triton" or "cuda"; every backend returns the same
            tokens (the fused form of the module docstring).
        chunk_rows: rows per chunk of the reference backend (float64 temporaries of chunk_rows·V·8
            bytes); default as ``gumbel_argmax``. Does not change the result.

    Returns:
        LongTensor [R] on x's device: the tokens after the step (x is not modified).

    Raises:
        ValueError if a row has no token of positive weight (e.g. every log-score is -inf on a
        final masked row, or γ = 1 on a final masked row: MASK is unreachable for the uniform process).
    """
    x, log_score, now, nxt, gamma, mask_id, method, final = _checked_inputs(
        "hybrid_step", x, log_score, sigma_now, sigma_next, gamma, mask_id, method, final)
    seed, step = seed_and_step(seed, step)
    num_rows, vocab = log_score.shape
    row_ids = checked_row_ids(row_ids, num_rows, x.device)
    chunk_rows = checked_chunk_rows(chunk_rows, vocab)
    backends.check_name("hybrid_step", backend, "hybrid_step")
    tokens, _ = _hybrid_step_op(x, log_score, now, nxt, final, gamma, mask_id, method, signed64(seed), step, row_ids,
                                chunk_rows, backend, True)
    return tokens


def hybrid_step_deferred(
    x: torch.Tensor,
    log_score: torch.Tensor,
    sigma_now: torch.Tensor,
    sigma_next: torch.Tensor,
    gamma: float,
    mask_id: int,
    seed: int,
    step: int,
    row_ids: torch.Tensor,
    method: str = "analytic",
    final=False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``hybrid_step`` without a host synchronization, for generation loops that keep the device busy.

    Same arguments and tokens as ``hybrid_step``, but nothing that needs a tensor's values on the host
    is checked (types, dtypes, shapes and devices still are): the caller guarantees what
    ``hybrid_step`` would check, namely x in [0, V), finite 0 <= sigma_next <= sigma_now, and row_ids
    (required here) int64 on x's device, distinct, >= 0 and with row_id·V + V - 1 < 2^63. The rows
    ``hybrid_step`` rejects (a NaN or +inf log-score, no token of positive weight) are reported instead
    of raised.

    Returns:
        (tokens LongTensor [R], failed): ``failed`` is a 0-d bool tensor on x's device, True when some
        row would have raised in ``hybrid_step`` (its token is then meaningless); read it when the
        caller synchronizes anyway, e.g. at the end of generation.
    """
    x, log_score, now, nxt, gamma, mask_id, method, final = _checked_inputs(
        "hybrid_step_deferred", x, log_score, sigma_now, sigma_next, gamma, mask_id, method, final)
    seed, step = seed_and_step(seed, step)
    check_index_tensor("row_ids", row_ids, x.device, x.shape[0])
    backends.check_name("hybrid_step", backend, "hybrid_step_deferred")
    tokens, best = _hybrid_step_op(x, log_score, now, nxt, final, gamma, mask_id, method, signed64(seed), step,
                                   row_ids, checked_chunk_rows(None, log_score.shape[1]), backend, False)
    return tokens, (torch.isnan(best) | (best == -torch.inf)).any()


def _hybrid_step_checked(x: torch.Tensor, log_score: torch.Tensor, sigma_now: torch.Tensor,
                         sigma_next: torch.Tensor, final: torch.Tensor, gamma: float, mask_id: int, method: str,
                         seed: int, step: int, row_ids: torch.Tensor, chunk_rows: int, backend: str,
                         check: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The body of the custom op ``hdlm_kernels::hybrid_step``: the value checks (when ``check``), the
    per-row constants, the implementation, and the check of the drawn rows."""
    implementation = backends.select("hybrid_step", backend, x.device, "hybrid_step")  # before any work
    vocab = log_score.shape[1]
    if check:
        _check_values("hybrid_step", x, vocab, sigma_now, sigma_next)
        check_row_id_values(row_ids, vocab)
    final = final | (sigma_next == 0)
    coefficients = step_coefficients(x, sigma_now, sigma_next, gamma, mask_id, vocab, method, final)
    tokens, best = implementation(log_score, x, coefficients, row_ids, mask_id, unsigned64(seed), step, chunk_rows)
    if check:
        _check_drawn(best)
    return tokens, best


_hybrid_step_op = torch.library.custom_op(
    "hdlm_kernels::hybrid_step", _hybrid_step_checked, mutates_args=(),
    schema="(Tensor x, Tensor log_score, Tensor sigma_now, Tensor sigma_next, Tensor final, float gamma, "
           "int mask_id, str method, int seed, int step, Tensor row_ids, int chunk_rows, str backend, bool check) "
           "-> (Tensor, Tensor)")


@_hybrid_step_op.register_fake
def _(x, log_score, sigma_now, sigma_next, final, gamma, mask_id, method, seed, step, row_ids, chunk_rows,
      backend, check):
    return (torch.empty(x.shape[0], dtype=torch.int64, device=x.device),
            torch.empty(x.shape[0], dtype=torch.float64, device=x.device))


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
    _check_values("hybrid_probs", x, log_score.shape[1], now, nxt)
    final = final | (nxt == 0)
    coefficients = step_coefficients(x, now, nxt, gamma, mask_id, log_score.shape[1], method, final)
    weights, bad = _weights(log_score, x, coefficients, mask_id)
    _check_drawn(torch.where(bad, torch.nan, weights.sum(1)).log())  # NaN or -inf (no weight) rows raise
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


def step_coefficients(x: torch.Tensor, sigma_now: torch.Tensor, sigma_next: torch.Tensor, gamma: float,
                      mask_id: int, vocab: int, method: str, final: torch.Tensor) -> torch.Tensor:
    """The per-row constants ``c1..c6`` of the fused form (module docstring), float64 [R, 6] on x's
    device. Arguments as checked by ``hybrid_step`` (x int64 [R], sigmas float64 [R], final bool [R]
    already including ``sigma_next == 0``). Built from ``exp64`` / ``expm1_64`` and single correctly
    rounded torch operations, so the bits do not depend on the device."""
    device = x.device
    masked = x == mask_id
    delta = sigma_now - sigma_next
    # 0-d operands on the device: PyTorch's CUDA division by a CPU scalar multiplies by the reciprocal
    count = torch.tensor(float(vocab - 1), dtype=torch.float64, device=device)
    zero, one = torch.zeros_like(delta), torch.ones_like(delta)
    if method == "analytic":
        a = exp64(-((1.0 - gamma) * delta))
        one_minus_a = -expm1_64(-((1.0 - gamma) * delta))  # accurate for small Δ
        b = exp64(-(gamma * delta))
        spread = -expm1_64(-(gamma * delta)) / count       # (1 - B)/N: the uniform share per real token
        columns = (
            torch.where(masked, one_minus_a, spread),
            spread,
            torch.where(masked, zero, one),
            torch.where(masked, torch.where(final, zero, b), spread + b),
            torch.where(masked, a, one),
            torch.where(masked, one_minus_a, spread),
        )
    else:
        # Δ·Q[x, y] for real y ≠ x
        rate = torch.where(masked, (1.0 - gamma) * delta, (gamma / (vocab - 1)) * delta)
        columns = (rate, zero, zero, torch.where(masked & final, zero, one), one, rate)
    return torch.stack(columns, 1)


def _weights(log_score: torch.Tensor, x: torch.Tensor, coefficients: torch.Tensor,
             mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused form's weights of a chunk of rows (module docstring), scaled by ``e^{-m}``:
    (float64 [c, V] with entries below 2^-1022 set to 0, bad [c] bool: a NaN or +inf read entry).

    Why clamp at 0: with a learned score r is not a ratio of true marginals, and e^{-ΔQ} (the
    inverse of a stochastic matrix) has negative entries, so (e^{-ΔQ} r)_y can fall below 0; Euler's
    stay probability 1 - Δ·rate is negative when the step is too long for first order. With the true
    score the analytic weights are Bayes' posterior and never negative, so 0 is the nearest
    admissible value and the clamp only acts where the approximation has already failed.
    """
    num_rows, vocab = log_score.shape
    columns = torch.arange(vocab, device=log_score.device)
    read = (columns != mask_id)[None, :] & (columns[None, :] != x[:, None])
    # Exact widening; a fresh buffer even for float64 input, which is then modified in place.
    s = log_score.to(torch.float64, copy=True)
    bad = ((torch.isnan(s) | (s == torch.inf)) & read).any(1)
    s.masked_fill_(~read | bad[:, None], -torch.inf)
    m = s.amax(1) if vocab else s.new_zeros(num_rows)
    m = torch.where(x != mask_id, m.clamp(min=0.0), m).clamp(min=EXP64_MIN)
    u = exp64(-m)
    ratios = exp64(s.sub_(m[:, None]))  # r' in [0, 1]; unread entries are exp64(-inf) = 0
    del s
    scaled = ratios * FIXED_HI_SCALE
    high = scaled.to(torch.int64)  # truncation = floor for r' >= 0; exact
    low = ((scaled - high.to(torch.float64)) * FIXED_LO_SCALE).to(torch.int64)
    del scaled
    # Integer sums: exact in any order, so every backend gets the same S_o.
    others = (high.sum(1).to(torch.float64) * FIXED_HI_UNIT + low.sum(1).to(torch.float64) * FIXED_LO_UNIT)
    del high, low
    c1, c2, c3, c4, c5, c6 = coefficients.unbind(1)
    total = others + c3 * u
    w = ratios.sub_((c2 * total)[:, None]).mul_(c1[:, None])
    w[:, mask_id] = 0.0
    w.scatter_(1, x[:, None], (c4 * (c5 * u - c6 * total))[:, None])
    w.masked_fill_(w < SMALLEST_WEIGHT, 0.0)
    return w, bad


def _hybrid_step_reference(log_score, x, coefficients, row_ids, mask_id, seed, step, chunk_rows):
    """The reference backend: the fused form on float64 chunks of ``chunk_rows`` rows (arguments
    already checked). Returns (tokens int64 [R], winning scores float64 [R]: NaN for a bad row, -inf
    for a row without a positive weight), as the compiled and Triton backends do."""
    device = log_score.device
    num_rows, vocab = log_score.shape
    tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    best = torch.empty(num_rows, dtype=torch.float64, device=device)
    columns = torch.arange(vocab, dtype=torch.int64, device=device)
    for start in range(0, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        part = slice(start, stop)
        weights, bad = _weights(log_score[part], x[part], coefficients[part], mask_id)
        positive = weights > 0
        scores = torch.where(positive, log64(weights.masked_fill_(~positive, 1.0)), -torch.inf)
        del weights, positive
        elements = row_ids[part, None] * vocab + columns
        scores.add_(gumbel_noise(stream_uniforms(seed, step, GUMBEL_STREAM, elements)))
        del elements
        torch.max(scores, dim=1, out=(best[part], tokens[part]))  # ties to the lowest id
        best[part].masked_fill_(bad, torch.nan)
        del scores
    return tokens, best


def _hybrid_step_triton() -> Callable:
    from . import triton_hybrid  # imports triton and builds the kernels (for the interpreter or the GPU)

    return lambda *arguments: triton_hybrid.hybrid_step_triton(*arguments[:-1])


# The implementations of hybrid_step, named as gumbel_argmax's; each takes the reference backend's
# arguments and returns the same pair.
backends.register("hybrid_step", "reference", summary="torch float64 in chunks of rows, any device",
                  load=lambda: _hybrid_step_reference)
backends.register("hybrid_step", "cpp", summary="C++ (csrc/hybrid_cpu.cpp): OpenMP over rows", fused=True,
                  auto_devices=("cpu",), probe=_extension.operator_probe("hybrid_step_cpu", "cpu"),
                  load=compiled_without_chunk_rows("hybrid_step_cpu"))
backends.register("hybrid_step", "cuda", summary="CUDA (csrc/hybrid_cuda.cu): one thread block per row", fused=True,
                  auto_devices=("cuda",), probe=_extension.operator_probe("hybrid_step_cuda", "cuda"),
                  load=compiled_without_chunk_rows("hybrid_step_cuda"))
backends.register("hybrid_step", "triton", summary="Triton (hdlm_kernels/sampling/triton_hybrid.py): one program "
                  "per row, three passes", fused=True, auto_devices=("cuda",),
                  probe=triton_probe("hdlm_kernels.sampling.triton_hybrid"), load=_hybrid_step_triton)


def _check_drawn(best: torch.Tensor) -> None:
    """Raises for rows whose winning score is NaN (a NaN or +inf log-score) or -inf (no weight)."""
    nan = torch.isnan(best)
    if bool(nan.any()):
        row = int(nan.nonzero()[0, 0])
        raise ValueError(f"log_score must hold finite values or -inf (no NaN, no +inf) at the real tokens "
                         f"other than x; row {row} does not ({int(nan.sum())} such row(s))")
    bad = best == -torch.inf
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"hybrid_step: row {row} has no token of positive probability (e.g. a final MASK row "
            f"whose log-scores are all -inf, or gamma = 1 on a MASK row); {int(bad.sum())} such row(s)"
        )


def _checked_inputs(op, x, log_score, sigma_now, sigma_next, gamma, mask_id, method, final):
    """Checks the metadata and converts: x int64 [R], log_score [R, V] (detached), sigmas float64 [R],
    gamma float, mask_id int, method str, final bool [R]. The tensors' values (token range, σ̄ order
    and finiteness) are checked by ``_check_values``, inside the op."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"{op}: method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    log_score = checked_logits(log_score, "log_score", op, min_vocab=2)
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
    mask_id = integer("mask_id", mask_id, 0, vocab, f"an int in [0, V) = [0, {vocab}) (the MASK id)")
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"{op}: gamma must be a float in [0, 1]; got {gamma!r} ({type(gamma).__name__})")
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"{op}: gamma must be a float in [0, 1]; got {gamma!r}")
    gamma = float(gamma)
    now = _checked_sigma(op, "sigma_now", sigma_now, num_rows, device)
    nxt = _checked_sigma(op, "sigma_next", sigma_next, num_rows, device)
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
    return x, log_score, now, nxt, gamma, mask_id, method, final


def _check_values(op, x: torch.Tensor, vocab: int, now: torch.Tensor, nxt: torch.Tensor) -> None:
    """The value checks of the γ step (one host synchronization each): tokens in [0, V), σ̄ finite and
    >= 0, sigma_next <= sigma_now."""
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
        raise ValueError(f"{op}: x must hold token ids in [0, V) = [0, {vocab}); got values in "
                         f"[{int(x.min())}, {int(x.max())}]")
    for name, value in (("sigma_now", now), ("sigma_next", nxt)):
        bad = ~(torch.isfinite(value) & (value >= 0))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: {name} must be finite and >= 0; row {row} holds {float(value[row])}")
    above = nxt > now
    if bool(above.any()):
        row = int(above.nonzero()[0, 0])
        raise ValueError(f"{op}: sigma_next must be <= sigma_now (a reverse step lowers the noise); "
                         f"row {row} has sigma_now {float(now[row])} and sigma_next {float(nxt[row])}")


def _checked_sigma(op, name, value, num_rows, device) -> torch.Tensor:
    """float64 [R] on device (its values are checked by ``_check_values``)."""
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
    return value
