"""The argument-check vocabulary every module of the package speaks.

Errors name the argument, what was expected and what was given. The mask and packing vocabulary
(``CONFIGS``, ``CONTEXTS``, ``WINDOWS``) lives here too, so that the masks, the packing and the
harness refuse the same names with the same words. This module imports nothing of the package.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["CONFIGS", "CONTEXTS", "WINDOWS", "SEED_LIMIT", "check_choice", "integer", "integer_tensor", "real",
           "seed_and_step"]

CONFIGS = ("aligned", "shifted")
"""ALIGNED: cell c predicts position c; SHIFTED: cell c holds x^{c-1} and predicts position c."""
CONTEXTS = ("causal", "block_causal", "full")
"""How settled cells attend each other."""
WINDOWS = ("full", "causal")
"""How the active window's cells attend each other."""

SEED_LIMIT = 2**64
"""Seeds of the sampling stream are ints in [0, 2^64) (the two 32-bit words of the Philox key)."""


def check_choice(name: str, value, choices, context: str) -> str:
    """``value`` when it is one of ``choices``; otherwise ValueError naming ``context``'s ``name``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{context}: unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def integer(name: str, value, low: int, high: int | None, expected: str) -> int:
    """``value`` as a Python int in ``[low, high)`` (``high`` None: no upper bound).

    Bools, floats and tensors are refused even where ``operator.index`` would take them (a 0-d int
    tensor would make the caller read a device value on the host)."""
    if isinstance(value, (bool, float, torch.Tensor)):
        raise TypeError(f"{name} must be {expected}; got {value!r} ({type(value).__name__})")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {expected}; got {value!r} ({type(value).__name__})") from None
    if value < low or (high is not None and value >= high):
        raise ValueError(f"{name} must be {expected}; got {value}")
    return value


def real(name: str, value, expected: str, low: float = float("-inf"), high: float = float("inf")) -> float:
    """``value`` as a finite float in ``[low, high]``; bools and non-numbers are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}; got {value!r} ({type(value).__name__})")
    value = float(value)
    if not (low <= value <= high) or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be {expected}; got {value}")
    return value


def integer_tensor(name: str, value, expected: str) -> torch.Tensor:
    """``value`` as a tensor of an integer dtype: tensors pass through, arrays and sequences are
    converted; anything else, or a bool/floating/complex dtype, raises a TypeError naming ``name``."""
    if not isinstance(value, torch.Tensor):
        if isinstance(value, np.ndarray) or (isinstance(value, Sequence) and not isinstance(value, (str, bytes))):
            value = torch.as_tensor(np.asarray(value))
        else:
            raise TypeError(f"{name} must be {expected}; got {type(value).__name__}")
    if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
        raise TypeError(f"{name} must be {expected}; got dtype {value.dtype}")
    return value


def seed_and_step(seed, step) -> tuple[int, int]:
    """The (seed, step) of a draw from the sampling stream: seed in [0, 2^64), step >= 0."""
    return (integer("seed", seed, 0, SEED_LIMIT, "an int in [0, 2^64)"),
            integer("step", step, 0, None, "an int >= 0"))
