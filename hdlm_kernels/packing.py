"""Interval packing for training (paper App. B.3, Figs 7-10).

Training on the inference mask of one step trains only ``ω`` positions per sequence while
processing ``~d/2`` context tokens. Packing lays out, per sequence, a *clean copy* of the tokens
(causal or block-causal over itself; its keys and values are what the KV cache holds at inference)
followed by several *noisy intervals*. Each interval is the active window ``[a, b)`` of one step
``t`` of the hyperschedule, with the levels ``τ_t`` of that step, and attends to the clean prefix
before it and to itself (fully or causally), exactly as the window rows of
:func:`hdlm_kernels.masks.inference` do at step ``t``. No row sees another interval, nor the clean
copy of its own interval.

How the intervals are drawn:

* block-structured schedules (``block``, ``flat``, ``quench``; τ_Block packing, Fig. 8): one interval
  per block (intervals start at multiples of ``ω``), each at a step drawn uniformly among the steps in
  which that block is active; every position is a noisy target exactly once.
* other schedules (``slide``, custom; τ_Slide packing, Fig. 7): steps are drawn uniformly and their
  windows placed one after the other until the next one does not fit; the rest is padding.

SHIFTED (Figs 9-10): cell ``c`` of the clean copy holds ``x^{c-1}`` (cell 0 the conditioning token
``bos_id``) and predicts ``x^c``. An interval for window ``[a, b)`` takes ``b - a + 1`` cells: the
settled token ``x^{a-1}`` repeated, then ``x^a .. x^{b-1}``; cell ``j`` predicts ``x^{a+j}`` and the
last cell's output is discarded.

Packed lengths and attended pairs. ALIGNED uses ``2d`` cells, SHIFTED ``2d + ⌈d/ω⌉``. For τ_Block
with ``N = d/ω`` blocks and block-causal context, the attended pairs are about ``d²/2·(1 + 1/N)`` for
the clean copy plus ``d²/2·(1 + 1/N)`` for the intervals, i.e. about 25-31% of dense attention over
``2d`` cells (``IntervalMask.density`` gives the exact figure; the benchmarks print it for the paper
shape). A block-sparse kernel skips the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import CONFIGS, CONTEXTS, WINDOWS, check_choice
from .masks.inference import context_block_size, prefix_ends
from .masks.interval_mask import IntervalMask
from .schedules import Hyperschedule

__all__ = ["PackedBatch", "pack", "IGNORE_INDEX"]

IGNORE_INDEX = -100
"""``target_ids`` value of cells without a target (padding, SHIFTED's discarded last outputs)."""


@dataclass(frozen=True)
class PackedBatch:
    """A packed training batch; every tensor is ``[B, P]`` on the device of the input tokens.

    Attributes:
        input_ids: clean token ids in the packed layout (the noise process is applied by the trainer
            according to ``levels``); padding cells hold ``pad_id``.
        position_ids: position of each cell's token in the original sequence, for rotary embeddings
            (SHIFTED: the cell index of the clean copy, i.e. token index + 1).
        levels: noise level of each cell's input token (0 on the clean copy and on SHIFTED's
            repeated settled token).
        target_ids: token that each cell's output predicts, ``IGNORE_INDEX`` where none.
        target_levels: noise level of that target token in the interval's step.
        loss_positions: bool, cells whose output is a denoising target (the noisy intervals).
        settled_positions: bool, clean-copy cells (their targets serve the settled cross-entropy).
        intervals: ``[B, M, 2]`` int64 ``(a, b)`` windows in token positions, ``-1`` when unused.
        steps: ``[B, M]`` int64 step of each interval, ``-1`` when unused.
        mask: ``IntervalMask`` over the ``P`` cells, ``[1, P]`` when the layout is shared by the batch.
        clean_length: number of clean-copy cells at the start (``d``).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    levels: torch.Tensor
    target_ids: torch.Tensor
    target_levels: torch.Tensor
    loss_positions: torch.Tensor
    settled_positions: torch.Tensor
    intervals: torch.Tensor
    steps: torch.Tensor
    mask: IntervalMask
    clean_length: int

    @property
    def packed_length(self) -> int:
        return self.input_ids.shape[1]


def _block_windows(sched: Hyperschedule, batch: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One step per block, uniform among the steps whose window is that block."""
    splits = sched.splits
    block_size = sched.block_size
    num_blocks = -(-sched.length // block_size)
    starts = torch.arange(num_blocks) * block_size
    ends = torch.clamp(starts + block_size, max=sched.length)
    block_of_step = splits[:, 0] // block_size
    # Steps of block-structured schedules come block after block; each window is its whole block.
    if not (torch.equal(splits[:, 0], starts[block_of_step]) and torch.equal(splits[:, 1], ends[block_of_step])):
        raise ValueError(f"pack: the {sched.kind} schedule claims blocks of {block_size} but its active "
                         "windows are not those blocks")
    count = torch.bincount(block_of_step, minlength=num_blocks)
    first = torch.cumsum(count, 0) - count
    draw = torch.rand(batch, num_blocks, generator=generator, dtype=torch.float64)
    steps = first + (draw * count).long().clamp_(max=count - 1)
    intervals = torch.stack([starts, ends], 1).expand(batch, -1, -1)
    return steps, intervals


def _random_windows(sched: Hyperschedule, batch: int, budget: int, extra: int, generator):
    """Uniformly drawn steps whose windows (plus ``extra`` cells each) fill ``budget`` cells."""
    sizes = sched.splits[:, 1] - sched.splits[:, 0]
    candidates = (sizes > 0).nonzero().squeeze(1)
    most = budget // int((sizes[candidates] + extra).min())
    pick = (torch.rand(batch, most, generator=generator, dtype=torch.float64) * len(candidates)).long()
    steps = candidates[pick.clamp_(max=len(candidates) - 1)]
    fits = torch.cumsum(sizes[steps] + extra, 1) <= budget  # sizes > 0, so this keeps a prefix
    steps = torch.where(fits, steps, -1)
    intervals = torch.where(fits[..., None], sched.splits[steps.clamp(min=0)], -1)
    return steps, intervals


def pack(tokens: torch.Tensor, sched: Hyperschedule, config: str = "aligned", context: str = "block_causal",
         window: str = "full", generator: torch.Generator | None = None, *, bos_id: int | None = None,
         pad_id: int = 0) -> PackedBatch:
    """Pack a batch of sequences into the interval layout of App. B.3 (see the module docstring).

    Args:
        tokens: ``LongTensor [B, d]`` with ``d = sched.length``.
        sched: a hyperschedule that is monotone left to right.
        config: ``"aligned"`` or ``"shifted"``.
        context: attention of the clean copy: ``"causal"``, ``"block_causal"`` (blocks of
            ``sched.block_size``, or ``sched.width``) or ``"full"``.
        window: attention inside an interval: ``"full"`` or ``"causal"``.
        generator: CPU ``torch.Generator`` for the random steps (and interval starts).
        bos_id: the conditioning token ``x̂^{-1}``; required for SHIFTED.
        pad_id: input id of padding cells.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise TypeError(f"pack: tokens must be an integer tensor, got {getattr(tokens, 'dtype', type(tokens).__name__)}")
    if not isinstance(sched, Hyperschedule):
        raise TypeError(f"pack: sched must be a Hyperschedule, got {type(sched).__name__}")
    if tokens.dim() != 2 or tokens.shape[1] != sched.length or tokens.shape[0] < 1:
        raise ValueError(f"pack: tokens must have shape [B, d] with B >= 1 and d = sched.length = {sched.length}, "
                         f"got {tuple(tokens.shape)}")
    check_choice("config", config, CONFIGS, "pack")
    check_choice("context", context, CONTEXTS, "pack")
    check_choice("window", window, WINDOWS, "pack")
    shifted = config == "shifted"
    if shifted and (isinstance(bos_id, bool) or not isinstance(bos_id, int)):
        raise ValueError(f"pack: config='shifted' needs bos_id, the token id of the conditioning token x̂^-1 "
                         f"(e.g. GPT-2's 50256), got {bos_id!r}")
    if not sched.is_monotone:
        raise ValueError(f"pack: the {sched.kind} schedule is not monotone left to right (some step does not "
                         "split into settled/active/worthless ranges), so it cannot be packed")

    device = tokens.device
    x = tokens.detach().to("cpu", torch.long)
    B, d = x.shape
    extra = 1 if shifted else 0
    block_structured = sched.block_size is not None
    if block_structured:
        steps, intervals = _block_windows(sched, B, generator)
        budget = d + extra * intervals.shape[1]
    else:
        budget = d + extra * -(-d // sched.width)
        steps, intervals = _random_windows(sched, B, budget, extra, generator)
    packed_length = d + budget

    # ---- noisy region: cell n of the budget belongs to window m at offset j ----
    used = steps >= 0
    sizes = torch.where(used, intervals[..., 1] - intervals[..., 0] + extra, 0)
    ends = torch.cumsum(sizes, 1)
    ends_for_search = torch.where(used, ends, budget + 1)
    cell = torch.arange(budget).expand(B, -1).contiguous()
    window_id = torch.searchsorted(ends_for_search, cell, right=True)
    is_pad = window_id >= steps.shape[1]
    window_id = window_id.clamp_(max=steps.shape[1] - 1)
    is_pad |= ~used.gather(1, window_id)
    size = sizes.gather(1, window_id)
    window_first = ends.gather(1, window_id) - size          # first cell of the window, in the budget
    j = cell - window_first
    a = intervals[..., 0].gather(1, window_id)
    step = steps.gather(1, window_id).clamp(min=0)
    token_index = a - extra + j                                # token held by the cell (-1 = bos)
    target_index = a + j                                       # token predicted by the cell
    has_target = ~is_pad & (j < size - extra)
    rows = torch.arange(B).unsqueeze(1)
    table = sched.table
    token_clamped = token_index.clamp(0, d - 1)                # padding cells index anything valid
    level = table[step, token_clamped]
    if shifted:
        level = torch.where(j == 0, 0, level)                  # the repeated settled token is clean
    noisy_input = x[rows, token_clamped]
    if shifted:
        noisy_input = torch.where(token_index < 0, bos_id, noisy_input)
    target_clamped = target_index.clamp(0, d - 1)
    noisy_target = torch.where(has_target, x[rows, target_clamped], IGNORE_INDEX)
    noisy_target_level = torch.where(has_target, table[step, target_clamped], 0)

    first_cell = d + window_first
    if window == "full":
        noisy_window_end = first_cell + size
    else:
        noisy_window_end = torch.minimum(d + cell + 1 + extra, first_cell + size)
    zeros = torch.zeros_like(cell)
    noisy_prefix_end = torch.where(is_pad, zeros, a)
    noisy_window_start = torch.where(is_pad, zeros, first_cell)
    noisy_window_end = torch.where(is_pad, zeros, noisy_window_end)

    # ---- clean copy ----
    clean = torch.arange(d)
    if shifted:
        clean_input = torch.cat([torch.full((B, 1), bos_id, dtype=torch.long), x[:, :-1]], 1)
    else:
        clean_input = x
    clean_prefix_end = prefix_ends(clean, d, context, context_block_size(sched)).expand(B, -1)
    clean_zeros = torch.zeros(B, d, dtype=torch.long)

    def join(clean_part, noisy_part):
        return torch.cat([clean_part.expand(B, -1), noisy_part], 1)

    input_ids = join(clean_input, torch.where(is_pad, pad_id, noisy_input))
    position_ids = join(clean, torch.where(is_pad, 0, token_index + extra))
    levels = join(clean_zeros, torch.where(is_pad, 0, level))
    target_ids = join(x, noisy_target)
    target_levels = join(clean_zeros, noisy_target_level)
    loss_positions = join(torch.zeros(B, d, dtype=torch.bool), has_target)
    settled_positions = join(torch.ones(B, d, dtype=torch.bool), torch.zeros_like(has_target))
    prefix_end = join(clean_prefix_end, noisy_prefix_end)
    window_start = join(clean_zeros, noisy_window_start)
    window_end = join(clean_zeros, noisy_window_end)
    if block_structured:
        # Every sequence has the same intervals; only their levels differ.
        prefix_end, window_start, window_end = prefix_end[:1], window_start[:1], window_end[:1]
    mask = IntervalMask(prefix_end, window_start, window_end, packed_length).to(device)
    return PackedBatch(
        input_ids=input_ids.to(device), position_ids=position_ids.to(device), levels=levels.to(device),
        target_ids=target_ids.to(device), target_levels=target_levels.to(device),
        loss_positions=loss_positions.to(device), settled_positions=settled_positions.to(device),
        intervals=intervals.contiguous().to(device), steps=steps.to(device), mask=mask, clean_length=d)
