"""The adaptive correction sampler (ACS) update, one step over flattened rows (docs/sampling-stream.md).

Paper §3.4 and App. D, Alg. 4 (Alg. 3, MDLM's original sampler, is eta = 0). Per row r, with one
uniform u1 from stream 1 of the sampling stream at element row_ids[r]:

    frozen row:                  never changes, masked or not
    masked row (x == mask_id):   resampled when u1 < p_transfer
    unmasked row:                resampled when u1 < eta * (1 - p_transfer)      (the correction)

(The rows a caller freezes, prompt and settled positions, are never masked, and a frozen row that
changed would not be frozen.)

A resampled row draws a token from the model's prediction at that row, softmax(logits / temperature)
with MASK removed, by ``gumbel_argmax`` (stream 0, same row_id); every other row keeps its token. The
official ``full_diff`` ACS does the same with two separate FP64 draws (docs/official-differences.md);
one draw per row suffices because a row is either masked or not. Unlike the official code, MASK
is never sampled.

The decisions do not depend on the logits, so a generation loop computes logits only for the rows
that change, in two phases::

    rows = acs_plan(x, p, eta, mask_id, seed, step, row_ids, frozen)       # int64 [K], before logits
    logits = lm_head(hidden[rows])                                         # [K, V]
    changed = acs_apply(x, logits, rows, mask_id, seed, step, row_ids)     # x[rows] updated in place

or in one call with every row's logits (``acs_step``, which returns a new tensor), or from a bool
mask (``acs_decisions``) with ``acs_step(..., logits_rows=rows)``.

``acs_step_ref`` is the direct twin used by the tests. The draws run on the Gumbel-max
implementations, registered with ``hdlm_kernels.backends`` under op ``acs`` too.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from .. import backends
from ..checks import integer, seed_and_step
from .arguments import (
    check_row_id_values,
    check_winners,
    checked_chunk_rows,
    checked_logits,
    checked_row_ids,
    checked_temperature,
)
from .constants import DECISION_STREAM
from .gumbel import draw as gumbel_draw
from .gumbel import gumbel_argmax_ref, register_draw_backends
from .philox import stream_uniforms, uniform53_ref

__all__ = ["acs_apply", "acs_decisions", "acs_plan", "acs_step", "acs_step_ref"]


def acs_decisions(
    x: torch.Tensor,
    p_transfer,
    eta: float,
    mask_id: int,
    seed: int,
    step: int,
    row_ids: torch.Tensor | None = None,
    frozen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which rows one ACS step resamples (docs/sampling-stream.md); needs no logits.

    Args:
        x: [R] integer tensor, the current tokens of the flattened rows (e.g. [B, d] flattened).
        p_transfer: the probability that a masked row is unmasked this step (paper §3.4; MDLM's
            1 - s/t): a float in [0, 1] or a floating tensor [R] of them (per row, e.g. from a
            hyperschedule). Compared in float64.
        eta: the correction strength, a float >= 0 (paper Table 9 uses 0.001-0.25); an unmasked row
            is resampled with probability eta * (1 - p_transfer) (capped at 1). 0 = MDLM's sampler.
        mask_id: the MASK token id, an int.
        seed: int in [0, 2^64).
        step: int >= 0, the sampler step.
        row_ids: [R] integer tensor of absolute row identities >= 0 (e.g. b * d + i); default
            arange(R). The decision of a row depends only on (seed, step, row_id) and its own inputs.
        frozen: None or bool tensor [R]; True rows (prompt, settled positions) never change, masked
            or not.

    Returns:
        bool tensor [R] on x's device: True where ``acs_step`` replaces the token.
    """
    x = _checked_tokens(x)
    seed, step = seed_and_step(seed, step)
    mask_id = _checked_mask_id(mask_id)
    eta = _checked_eta(eta)
    p_transfer = _checked_p_transfer(p_transfer, x.shape[0], x.device)
    # The decision uses only u1, so its Gumbel elements can be checked later against the real V.
    row_ids = checked_row_ids(row_ids, x.shape[0], x.device)
    check_row_id_values(row_ids, 1)
    frozen = _checked_frozen(frozen, x.shape[0], x.device)
    return _decisions(x, p_transfer, eta, mask_id, seed, step, row_ids, frozen)


def acs_plan(
    x: torch.Tensor,
    p_transfer,
    eta: float,
    mask_id: int,
    seed: int,
    step: int,
    row_ids: torch.Tensor | None = None,
    frozen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Phase 1 of a two-phase ACS step: the rows (int64 ``[K]``, ascending positions in x) that this
    step resamples, before any logits exist. Arguments as ``acs_decisions``."""
    return acs_decisions(x, p_transfer, eta, mask_id, seed, step, row_ids, frozen).nonzero().squeeze(1)


def acs_apply(
    x: torch.Tensor,
    logits: torch.Tensor,
    rows: torch.Tensor,
    mask_id: int,
    seed: int,
    step: int,
    row_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
) -> int:
    """Phase 2 of a two-phase ACS step: draw the tokens of ``rows`` (from ``acs_plan``) and write them
    into ``x`` in place.

    Args:
        x: int64 tensor [R], updated in place at ``rows``.
        logits: [K, V], row k being the logits of row ``rows[k]`` of x.
        rows: int64 [K], distinct positions in x (``acs_plan``'s result).
        mask_id, seed, step, row_ids, temperature, backend: as ``acs_step`` (row_ids indexes all of x).

    Returns:
        The number of rows whose token differs from before (a resampled row may draw its own token).
    """
    x = _checked_tokens(x)
    if x.dtype != torch.int64:
        raise TypeError(f"x must be an int64 tensor [R] (updated in place); got dtype {x.dtype}")
    draw = _checked_draw("acs_apply", x, logits, mask_id, seed, step, row_ids, temperature, backend)
    _logits_row_lookup(rows, draw.logits.shape[0], x.shape[0], x.device)  # shape, range and distinctness
    rows = rows.to(device=x.device, dtype=torch.int64)
    if rows.numel() == 0:
        return 0
    tokens = _draw_rows(draw, rows, take=None)
    changed = int((x[rows] != tokens).sum())
    x[rows] = tokens
    return changed


def acs_step(
    x: torch.Tensor,
    logits: torch.Tensor,
    p_transfer,
    eta: float,
    mask_id: int,
    seed: int,
    step: int,
    row_ids: torch.Tensor | None = None,
    frozen: torch.Tensor | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    *,
    logits_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """One ACS update of the flattened rows x (paper §3.4, App. D Alg. 4; docs/sampling-stream.md).

    The rows chosen by ``acs_decisions`` (same arguments) get a token drawn by ``gumbel_argmax`` from
    their logits with MASK excluded (noise from stream 0 at element row_id * V + v, so a row's token
    depends only on (seed, step, row_id) and its own inputs); the other rows keep their token.

    Args:
        x, p_transfer, eta, mask_id, seed, step, row_ids, frozen: as in ``acs_decisions``.
        logits: the model's logits, bf16/fp16/fp32/fp64 on x's device, in one of two layouts:
            - logits_rows None: [R, V], one row per row of x (rows that do not change are never read);
            - logits_rows given: [K, V], row k being the logits of row logits_rows[k] of x.
        temperature: float >= 0 of the Gumbel-max draw; 0 = greedy.
        backend: a name of ``hdlm_kernels.backends.names("acs")`` (the Gumbel-max implementations:
            "auto", "kernels", "reference", "cpp", "triton", "cuda").
        logits_rows: None, or an integer tensor [K] of distinct row numbers in [0, R) of x (not
            row_ids) that ``logits`` holds, in any order; it must include every row that changes
            (``acs_decisions(...).nonzero().squeeze(1)`` is the smallest choice) and may include more,
            e.g. all the rows of an active window, whose extra logits are ignored.

    Returns:
        int64 tensor [R] on x's device, the new tokens (x itself is not modified). mask_id is
        never produced for a resampled row.
    """
    x = _checked_tokens(x)
    num_rows = x.shape[0]
    draw = _checked_draw("acs_step", x, logits, mask_id, seed, step, row_ids, temperature, backend)
    eta = _checked_eta(eta)
    p_transfer = _checked_p_transfer(p_transfer, num_rows, x.device)
    frozen = _checked_frozen(frozen, num_rows, x.device)
    take_of_row = _logits_row_lookup(logits_rows, draw.logits.shape[0], num_rows, x.device)

    change = _decisions(x, p_transfer, eta, draw.mask_id, draw.seed, draw.step, draw.row_ids, frozen)
    rows = change.nonzero().squeeze(1)
    x_new = x.to(torch.int64, copy=True)
    if rows.numel() == 0:
        return x_new
    if take_of_row is None:
        take = rows
    else:
        take = take_of_row[rows]
        missing = take < 0
        if bool(missing.any()):
            raise ValueError(
                f"logits_rows must include every row that changes; {int(missing.sum())} of the "
                f"{rows.numel()} changing rows are missing, e.g. row {int(rows[missing][0])}"
            )
    x_new[rows] = _draw_rows(draw, rows, take)
    return x_new


def acs_step_ref(
    x: torch.Tensor,
    logits: torch.Tensor,
    p_transfer,
    eta: float,
    mask_id: int,
    seed: int,
    step: int,
    row_ids: torch.Tensor | None = None,
    frozen: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Reference twin of ``acs_step`` with logits [R, V] for every row, written out directly: the
    NumPy stream for u1, ``gumbel_argmax_ref`` over all rows, then a select. No input checks."""
    num_rows = x.shape[0]
    device = x.device
    if row_ids is None:
        row_ids = torch.arange(num_rows, device=device)
    row_ids = torch.as_tensor(row_ids, device=device).to(torch.int64)
    p = torch.as_tensor(p_transfer, dtype=torch.float64, device=device).expand(num_rows)
    u1 = uniform53_ref(seed, step, DECISION_STREAM, row_ids)
    masked = x == mask_id
    threshold = torch.where(masked, p, eta * (1.0 - p))
    change = u1 < threshold
    if frozen is not None:
        change &= ~torch.as_tensor(frozen, dtype=torch.bool, device=device)
    sampled = gumbel_argmax_ref(logits, seed, step, row_ids, temperature, exclude=mask_id)
    return torch.where(change, sampled, x.to(torch.int64))


# ---------------------------------------------------------------- internals


class _Draw(NamedTuple):
    """The checked arguments of the Gumbel-max draw of ``acs_step`` / ``acs_apply``."""

    logits: torch.Tensor
    mask_id: int
    seed: int
    step: int
    row_ids: torch.Tensor
    temperature: float
    exclude: torch.Tensor
    backend: str


def _checked_draw(op, x, logits, mask_id, seed, step, row_ids, temperature, backend) -> _Draw:
    """The checks ``acs_step`` and ``acs_apply`` share, all made before any work (the backend too)."""
    seed, step = seed_and_step(seed, step)
    mask_id = _checked_mask_id(mask_id)
    logits = checked_logits(logits)
    if logits.device != x.device:
        raise ValueError(f"logits must be on x's device {x.device}; got a tensor on {logits.device}")
    vocab = logits.shape[1]
    row_ids = checked_row_ids(row_ids, x.shape[0], x.device)
    check_row_id_values(row_ids, vocab)
    temperature = checked_temperature(temperature)
    if not 0 <= mask_id < vocab:
        raise ValueError(f"mask_id must be a token id in [0, V) = [0, {vocab}) of logits; got {mask_id}")
    exclude = torch.tensor([mask_id], dtype=torch.int64, device=x.device)  # in [0, V), just checked
    backends.select("acs", backend, x.device, op)  # refuses a backend that cannot run, before any work
    return _Draw(logits, mask_id, seed, step, row_ids, temperature, exclude, backend)


def _draw_rows(draw: _Draw, rows: torch.Tensor, take: torch.Tensor | None) -> torch.Tensor:
    """Tokens of ``rows`` of x (positions), from logits rows ``take`` (None: logits row k is rows[k])."""
    tokens, best = gumbel_draw(draw.logits, take, draw.row_ids[rows], draw.seed, draw.step, draw.temperature,
                               draw.exclude, checked_chunk_rows(None, draw.logits.shape[1]), draw.backend,
                               check=False)
    check_winners(best, positions=rows)
    return tokens


def _decisions(x, p_transfer, eta, mask_id, seed, step, row_ids, frozen) -> torch.Tensor:
    """bool [R]; arguments checked. p_transfer: float or float64 [R] on x's device."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    u1 = stream_uniforms(seed, step, DECISION_STREAM, row_ids)
    masked = x == mask_id
    # The thresholds, in float64 and in this order ((1 - p) rounded, then times eta), are part of
    # the contract: every backend must form them the same way to make identical decisions. u1 lies
    # in [2^-53, 1 - 2^-53], so p = 1 always and p = 0 never passes.
    if isinstance(p_transfer, float):
        correct = eta * (1.0 - p_transfer)
        threshold = torch.where(
            masked,
            torch.tensor(p_transfer, dtype=torch.float64, device=x.device),
            torch.tensor(correct, dtype=torch.float64, device=x.device),
        )
    else:
        threshold = torch.where(masked, p_transfer, (1.0 - p_transfer) * eta)
    change = u1 < threshold
    if frozen is not None:
        change &= ~frozen
    return change


def _logits_row_lookup(logits_rows, num_logits: int, num_rows: int, device) -> torch.Tensor | None:
    """None when logits has one row per row of x; else int64 [R]: the logits row of each row of x
    (-1 where logits_rows does not list it)."""
    if logits_rows is None:
        if num_logits != num_rows:
            raise ValueError(
                f"logits must have shape [R, V] with R = {num_rows} rows of x (or pass logits_rows for "
                f"logits of only some rows); got {num_logits} rows"
            )
        return None
    if not isinstance(logits_rows, torch.Tensor):
        raise TypeError(
            f"logits_rows must be an integer tensor [K] or None; got {type(logits_rows).__name__}"
        )
    if logits_rows.dtype == torch.bool or logits_rows.dtype.is_floating_point or logits_rows.dtype.is_complex:
        raise TypeError(
            f"logits_rows must be an integer tensor [K] of rows of x; got dtype {logits_rows.dtype}"
        )
    if tuple(logits_rows.shape) != (num_logits,):
        raise ValueError(
            f"logits_rows must have shape [K] = [{num_logits}] (one entry per row of logits); "
            f"got shape {tuple(logits_rows.shape)}"
        )
    logits_rows = logits_rows.to(device=device, dtype=torch.int64)
    if num_logits > 0:
        smallest, largest = (int(v) for v in torch.aminmax(logits_rows))
        if smallest < 0 or largest >= num_rows:
            bad = smallest if smallest < 0 else largest
            raise ValueError(f"logits_rows must hold rows of x in [0, R) = [0, {num_rows}); got {bad}")
    lookup = torch.full((num_rows,), -1, dtype=torch.int64, device=device)
    lookup[logits_rows] = torch.arange(num_logits, dtype=torch.int64, device=device)
    if int((lookup >= 0).sum()) != num_logits:
        raise ValueError("logits_rows must hold distinct rows of x; got a repeated row")
    return lookup


def _checked_tokens(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be an integer tensor [R] of token ids; got {type(x).__name__}")
    if x.dtype == torch.bool or x.dtype.is_floating_point or x.dtype.is_complex:
        raise TypeError(f"x must be an integer tensor [R] of token ids; got dtype {x.dtype}")
    if x.dim() != 1:
        raise ValueError(
            f"x must have shape [R] (flatten [B, d] to [B * d] and pass row_ids); got shape {tuple(x.shape)}"
        )
    return x


def _checked_mask_id(mask_id) -> int:
    return integer("mask_id", mask_id, 0, None, "an int >= 0 (the MASK token id)")


def _checked_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise TypeError(f"eta must be a float >= 0; got {eta!r} ({type(eta).__name__})")
    eta = float(eta)
    if not (0.0 <= eta < float("inf")):
        raise ValueError(f"eta must be a finite float >= 0; got {eta}")
    return eta


def _checked_p_transfer(p_transfer, num_rows: int, device) -> float | torch.Tensor:
    """A float in [0, 1], or float64 [num_rows] on device."""
    if isinstance(p_transfer, torch.Tensor):
        if not p_transfer.dtype.is_floating_point:
            raise TypeError(
                f"p_transfer must be a float or a floating tensor [R]; got dtype {p_transfer.dtype}"
            )
        if p_transfer.dim() == 0:
            p_transfer = p_transfer.expand(num_rows)
        if tuple(p_transfer.shape) != (num_rows,):
            raise ValueError(
                f"p_transfer must be a float or a tensor of shape [R] = [{num_rows}]; "
                f"got shape {tuple(p_transfer.shape)}"
            )
        p_transfer = p_transfer.to(device=device, dtype=torch.float64)  # exact widening
        outside = ~((p_transfer >= 0) & (p_transfer <= 1))  # NaN included
        if bool(outside.any()):
            row = int(outside.nonzero()[0, 0])
            raise ValueError(f"p_transfer must lie in [0, 1]; row {row} holds {float(p_transfer[row])}")
        return p_transfer
    if isinstance(p_transfer, bool) or not isinstance(p_transfer, numbers.Real):
        raise TypeError(
            f"p_transfer must be a float in [0, 1] or a tensor [R]; got {type(p_transfer).__name__}"
        )
    p_transfer = float(p_transfer)
    if not 0.0 <= p_transfer <= 1.0:
        raise ValueError(f"p_transfer must lie in [0, 1]; got {p_transfer}")
    return p_transfer


def _checked_frozen(frozen, num_rows: int, device) -> torch.Tensor | None:
    if frozen is None:
        return None
    if not isinstance(frozen, torch.Tensor) or frozen.dtype != torch.bool:
        what = f"dtype {frozen.dtype}" if isinstance(frozen, torch.Tensor) else type(frozen).__name__
        raise TypeError(f"frozen must be None or a bool tensor [R]; got {what}")
    if tuple(frozen.shape) != (num_rows,):
        raise ValueError(f"frozen must have shape [R] = [{num_rows}]; got shape {tuple(frozen.shape)}")
    return frozen.to(device)


register_draw_backends("acs")
