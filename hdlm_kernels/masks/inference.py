"""Inference masks for one generation step (paper §3.3, Figs 5-6, App. B.3-B.4).

Cells and what they hold, for step ``t`` with ``(a, b) = sched.split(t)`` (settled ``[0, a)``,
active ``[a, b)``; worthless positions are never fed to the model):

* ALIGNED: cell ``c`` holds token ``x^c`` and predicts position ``c``; cells ``[0, b)``. The
  prefix cells ``[0, a)`` attend causally, block-causally or fully *among settled cells only*; the
  window cells ``[a, b)`` attend the whole prefix plus the window (fully, or causally).
* SHIFTED: cell ``c`` holds ``x^{c-1}`` (cell 0 holds the conditioning token ``x̂^{-1}``) and predicts
  position ``c``; cells ``[0, b]``. The prefix is cells ``[0, a)`` (tokens ``x^{-1} .. x^{a-2}``); the
  window is cells ``[a, b]``: the last settled token ``x^{a-1}`` repeated as the window's first input,
  then the active tokens, exactly as each interval of the packed training layout (Figs 9-10); the
  output of the last window cell (it would predict position ``b``) is discarded. With
  ``window="causal"`` window cell ``c`` also sees the next cell ``c+1``, which holds the current noisy
  value of the token it predicts.

Prefix rows never see the window, so their keys and values depend on settled tokens only and can be
cached (exactly so for causal context, and for block-causal context when the settled prefix always
ends on a block boundary, as with block schedules). ``mask.rows(slice(a, None))`` is the part a
KV-cached step computes. Block-causal context uses blocks of ``sched.block_size`` (``sched.width``
for schedules without blocks).
"""

from __future__ import annotations

import torch

from ..checks import CONFIGS, CONTEXTS, WINDOWS, check_choice
from ..schedules import Hyperschedule
from .interval_mask import IntervalMask

# CONFIGS, CONTEXTS, WINDOWS and check_choice live in hdlm_kernels.checks; the names stay importable here.
__all__ = ["inference", "kv_cacheable", "CONFIGS", "CONTEXTS", "WINDOWS", "check_choice",
           "context_block_size", "prefix_ends"]


def context_block_size(sched: Hyperschedule) -> int:
    """Block size of block-causal context for ``sched``."""
    return sched.block_size if sched.block_size is not None else sched.width


def prefix_ends(cells: torch.Tensor, limit, context: str, block_size: int) -> torch.Tensor:
    """``prefix_end`` of settled cells attending among the cells ``[0, limit)``: causal ``c + 1``,
    block-causal the end of ``c``'s block, full ``limit`` (all clamped to ``limit``)."""
    if context == "full":
        return torch.zeros_like(cells) + limit
    if context == "causal":
        ends = cells + 1
    else:
        ends = (cells // block_size + 1) * block_size
    return torch.minimum(ends, torch.as_tensor(limit, dtype=ends.dtype))


def inference(sched: Hyperschedule, t: int, config: str = "aligned", context: str = "block_causal",
              window: str = "full") -> IntervalMask:
    """The attention mask of generation step ``t`` over the fed cells (see the module docstring).

    Args:
        sched: the hyperschedule; must split step ``t`` into contiguous ranges.
        t: the step, ``0 <= t < sched.num_steps``.
        config: ``"aligned"`` or ``"shifted"``.
        context: how settled cells attend each other: ``"causal"``, ``"block_causal"`` or ``"full"``.
        window: how window cells attend each other: ``"full"`` or ``"causal"``.

    Returns:
        ``IntervalMask`` of shape ``[1, K]`` with ``K`` keys: ``b`` cells (ALIGNED) or ``b + 1``
        (SHIFTED); rows ``[a, K)`` are the window.
    """
    if not isinstance(sched, Hyperschedule):
        raise TypeError(f"inference: sched must be a Hyperschedule, got {type(sched).__name__}")
    check_choice("config", config, CONFIGS, "inference")
    check_choice("context", context, CONTEXTS, "inference")
    check_choice("window", window, WINDOWS, "inference")
    a, b = sched.split(t)
    shifted = config == "shifted"
    num_cells = b + 1 if shifted else b
    cells = torch.arange(num_cells)
    in_window = cells >= a
    # Causal window rows see themselves, and in SHIFTED also the next cell (their own position's token).
    causal_end = torch.clamp(cells + (2 if shifted else 1), max=num_cells)
    window_end = causal_end if window == "causal" else torch.full_like(cells, num_cells)
    prefix_end = torch.where(in_window, a, prefix_ends(cells, a, context, context_block_size(sched)))
    zeros = torch.zeros_like(cells)
    return IntervalMask(prefix_end[None], torch.where(in_window, a, zeros)[None],
                        torch.where(in_window, window_end, zeros)[None], num_cells)


def kv_cacheable(sched: Hyperschedule, config: str = "aligned", context: str = "block_causal") -> bool:
    """Whether caching the keys and values of settled cells is exact for these inference masks: every
    settled cell's row must stay the same from the step it settles on (its K/V are computed once).

    True for causal context on any monotone schedule, and for block-causal context when the settled
    prefix always ends on a block boundary (block schedules); False e.g. for slide with block-causal
    context, whose prefix grows inside a block, or for full context.
    """
    if not isinstance(sched, Hyperschedule):
        raise TypeError(f"kv_cacheable: sched must be a Hyperschedule, got {type(sched).__name__}")
    check_choice("config", config, CONFIGS, "kv_cacheable")
    check_choice("context", context, CONTEXTS, "kv_cacheable")
    if not sched.is_monotone:
        return False
    settled_end = sched.splits[:, 0].unsqueeze(1)                       # [T, 1]: a_t
    cells = torch.arange(sched.length + (1 if config == "shifted" else 0))
    ends = prefix_ends(cells.expand(sched.num_steps, -1), settled_end, context, context_block_size(sched))
    settled = cells < settled_end                                       # [T, cells]
    big = torch.iinfo(ends.dtype).max
    highest = torch.where(settled, ends, -1).amax(0)
    lowest = torch.where(settled, ends, big).amin(0)
    ever = settled.any(0)
    return bool((highest[ever] == lowest[ever]).all())
