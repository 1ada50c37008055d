"""The argument checks the sampling ops share (logits, row ids, temperature, excluded ids, winners).

Two kinds, so that a call checks each argument once: *metadata* checks (types, dtypes, shapes,
devices, Python scalars) run in the public functions, where ``torch.compile`` traces them; *value*
checks read tensor values on the host and run inside the custom ops (``hdlm_kernels::*``), which
``torch.compile`` treats as opaque, and only when the caller asked for checks (the ``*_deferred``
entry points do not).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch

from ..checks import integer, integer_tensor
from .constants import CHUNK_BYTES, ELEMENT_LIMIT, LOGITS_DTYPES

__all__ = ["check_index_tensor", "check_row_id_values", "check_winners", "checked_chunk_rows", "checked_exclude",
           "checked_logits", "checked_row_ids", "checked_temperature", "exclude_values", "signed64",
           "unsigned64"]


def checked_logits(logits, name: str = "logits", op: str | None = None, min_vocab: int = 1) -> torch.Tensor:
    """A detached floating [R, V] tensor of a sampling dtype, with min_vocab <= V < 2^31."""
    where = f"{op}: " if op else ""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{where}{name} must be a floating tensor [R, V]; got {type(logits).__name__}")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"{where}{name} must have dtype bfloat16, float16, float32 or float64; got {logits.dtype}")
    if logits.dim() != 2 or logits.shape[1] < min_vocab:
        raise ValueError(f"{where}{name} must have shape [R, V] with V >= {min_vocab}; got shape "
                         f"{tuple(logits.shape)}")
    if logits.shape[1] >= 2**31:  # the kernels index a row's tokens with int32
        raise ValueError(f"{where}{name} must have V < 2^31 tokens; got V = {logits.shape[1]}")
    return logits.detach()  # sampling is not differentiable; keep autograd out of the temporaries


def checked_row_ids(row_ids, num_rows: int, device: torch.device) -> torch.Tensor:
    """int64 [num_rows] on device (default ``arange``); the values are checked by ``check_row_id_values``."""
    if row_ids is None:
        return torch.arange(num_rows, dtype=torch.int64, device=device)
    row_ids = integer_tensor("row_ids", row_ids, "an integer tensor [R] (int64)")
    if row_ids.dtype == torch.uint64:
        raise TypeError("row_ids must be an integer tensor [R] (int64); got dtype torch.uint64")
    if tuple(row_ids.shape) != (num_rows,):
        raise ValueError(f"row_ids must have shape [R] = [{num_rows}]; got shape {tuple(row_ids.shape)}")
    return row_ids.to(device=device, dtype=torch.int64)


def check_row_id_values(row_ids: torch.Tensor, vocab: int) -> None:
    """Ids >= 0, distinct, and row_id * V + V - 1 < 2^63 (one host synchronization).

    Distinct because a row's randomness is keyed by its id: two rows with one id would draw the same
    noise, which is never what a caller sampling independent positions wants."""
    num_rows = row_ids.shape[0]
    if num_rows == 0:
        return
    smallest, largest = (int(v) for v in torch.aminmax(row_ids))
    if smallest < 0:
        raise ValueError(f"row_ids must be >= 0; got a minimum of {smallest}")
    limit = (ELEMENT_LIMIT - vocab) // vocab  # largest row id with row_id * V + V - 1 < 2^63
    if largest > limit:
        raise ValueError(f"row_ids must be <= {limit} for V = {vocab} (element ids row_id * V + v must stay "
                         f"below 2^63); got a maximum of {largest}")
    if num_rows > 1 and bool((row_ids[1:] > row_ids[:-1]).all()):
        return  # increasing, hence distinct: the usual case, without a sort
    distinct = torch.unique(row_ids)
    if distinct.numel() != num_rows:
        counts = torch.bincount(torch.searchsorted(distinct, row_ids))
        repeated = int(distinct[counts > 1][0])
        raise ValueError(f"row_ids must be distinct (a row's noise is keyed by its id); {repeated} "
                         f"appears {int(counts.max())} times")


def check_index_tensor(name: str, value, device: torch.device, length: int | None = None) -> None:
    """Metadata-only check of an int64 [length] tensor on ``device`` (the deferred entry points)."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.int64 or value.device != device:
        raise TypeError(f"{name} must be an int64 tensor on {device}; got "
                        f"{getattr(value, 'dtype', type(value).__name__)} on {getattr(value, 'device', '-')}")
    if value.dim() != 1 or (length is not None and value.shape[0] != length):
        expected = "[R]" if length is None else f"[R] = [{length}]"
        raise ValueError(f"{name} must have shape {expected}; got shape {tuple(value.shape)}")


def checked_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float >= 0; got {temperature!r} ({type(temperature).__name__})")
    temperature = float(temperature)
    if not (0.0 <= temperature < float("inf")):
        raise ValueError(f"temperature must be a finite float >= 0; got {temperature}")
    return temperature


def checked_exclude(exclude, device: torch.device) -> torch.Tensor | None:
    """The excluded ids as an int64 tensor on device (None when there are none); their values are
    checked by ``exclude_values`` inside the op."""
    if exclude is None:
        return None
    if isinstance(exclude, torch.Tensor):
        if exclude.dtype == torch.bool or exclude.dtype.is_floating_point or exclude.dtype.is_complex:
            raise TypeError(f"exclude must hold integer token ids; got a tensor of dtype {exclude.dtype}")
        ids = exclude.detach().reshape(-1).to(device=device, dtype=torch.int64)
        return ids if ids.numel() else None
    if isinstance(exclude, numbers.Integral) and not isinstance(exclude, bool):
        values = [int(exclude)]
    elif isinstance(exclude, (Sequence, np.ndarray)) and not isinstance(exclude, (str, bytes)):
        values = list(exclude)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"exclude must hold integer token ids; got {value!r} ({type(value).__name__})")
    else:
        raise TypeError(f"exclude must be None, an int, a sequence of ints or an integer tensor; "
                        f"got {type(exclude).__name__}")
    return torch.tensor([int(v) for v in values], dtype=torch.int64, device=device) if values else None


def exclude_values(exclude: torch.Tensor | None, vocab: int) -> torch.Tensor | None:
    """The sorted distinct excluded ids of an int64 tensor, checked to lie in [0, V) and to leave a
    token (one host synchronization)."""
    if exclude is None or exclude.numel() == 0:
        return None
    smallest, largest = (int(v) for v in torch.aminmax(exclude))
    if smallest < 0 or largest >= vocab:
        bad = smallest if smallest < 0 else largest
        raise ValueError(f"exclude must hold token ids in [0, V) = [0, {vocab}); got {bad}")
    distinct = torch.unique(exclude)  # sorted
    if distinct.numel() == vocab:
        raise ValueError(f"exclude removes all V = {vocab} tokens; at least one token must remain")
    return distinct


def checked_chunk_rows(chunk_rows, vocab: int) -> int:
    if chunk_rows is None:
        return max(1, CHUNK_BYTES // (8 * vocab))
    return integer("chunk_rows", chunk_rows, 1, None, "an int >= 1 or None")


def check_winners(best: torch.Tensor, positions: torch.Tensor | None = None) -> None:
    """Raises ValueError for rows whose winning score is NaN (NaN logits) or -inf (no candidate).

    best: float64 [n] winning scores; positions: the caller's row number of each (default arange(n))."""
    if best.numel() == 0:
        return
    nan = torch.isnan(best)
    bad = nan | (best == -torch.inf)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        row = first if positions is None else int(positions[first])
        count = int(bad.sum())
        if bool(nan[first]):
            raise ValueError(f"logits must not hold NaN; row {row} does ({count} bad row(s) in all)")
        raise ValueError(f"every row of logits needs a token with a logit > -inf outside exclude; row {row} has "
                         f"none ({count} bad row(s) in all)")


def signed64(value: int) -> int:
    """An int in [0, 2^64) as the int64 of the same bits (custom ops take int64 arguments)."""
    return value - 2**64 if value >= 2**63 else value


def unsigned64(value: int) -> int:
    """The inverse of ``signed64``."""
    return value + 2**64 if value < 0 else value
