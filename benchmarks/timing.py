"""Helpers every suite times with: a CUDA-synchronized call, and the median of a finished benchmark."""

from __future__ import annotations

from typing import Callable

import torch


def synchronized(fn: Callable, device: torch.device | str | None = None) -> Callable:
    """``fn`` followed by ``torch.cuda.synchronize()`` on a GPU (kernel launches are asynchronous, so
    an unsynchronized timing measures the launch, not the work); ``fn`` itself on the CPU."""
    on_gpu = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if not on_gpu:
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return run


def median_seconds(benchmark) -> float | None:
    """The median of a finished pytest-benchmark run, or None under ``--benchmark-disable``."""
    return benchmark.stats.stats.median if benchmark.stats else None


def time_first_calls(benchmark, fn: Callable, make_input: Callable, rounds: int):
    """Times ``fn(make_input())`` with a fresh input per round, made outside the timing.

    For functions that memoise their result on their input (``IntervalMask.tiles`` and
    ``to_block_mask`` keep what they build on the mask), timing repeated calls on one input would
    time a dictionary look-up after the first round; this times the real first call every round."""
    return benchmark.pedantic(fn, setup=lambda: ((make_input(),), {}), rounds=rounds, iterations=1,
                              warmup_rounds=1)
