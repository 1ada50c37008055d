"""Hyperschedules: a noise level per position and per generation step (paper §3.1, Figs 2-3).

A hyperschedule is a table ``τ[t, i]`` of integer noise levels, ``t = 0..T`` (generation steps; step
``t`` maps the state ``x_t`` to ``x_{t+1}``) and ``i = 0..d-1`` (positions), with level ``𝒯`` = full
noise and ``0`` = clean, ``τ[0] = 𝒯`` and ``τ[T] = 0`` everywhere, and non-increasing in ``t``.

At step ``t`` a position is *settled* when ``(τ_t, τ_{t+1}) = (0, 0)``, *worthless* when it is
``(𝒯, 𝒯)`` and *active* otherwise; the width ``ω`` is the largest number of active positions in one
step. For the schedules here (all monotone left to right) the three sets are contiguous ranges
``[0, a)``, ``[a, b)``, ``[b, d)``: :meth:`Hyperschedule.split` returns ``(a, b)``.

Relation to the official implementation (docs/official-code.md §1): its model call
``s = 1..T`` feeds the state whose levels are ``ms(s)``, where an *active* position at level ``k``
is still noisy (t = 1e-3 + k·Δ) and only positions counted in ``num_settled`` are clean. In the
paper's convention used here, ``τ_{s-1}`` is ``ms(s)`` with active levels shifted by one
(``k -> k + 1``), settled positions at 0 and worthless ones at ``𝒯``; ``τ_T = 0``. The step counts
agree: block ``T = 𝒯·⌈d/ω⌉``, slide ``T = ω - 1 + ⌈d/z⌉`` (``= d + ω - 1`` for ρ = 1). The tests
replay the official schedule objects and check this mapping position by position.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Hyperschedule", "flat", "block", "slide", "quench", "from_table"]


def _check_int(name: str, value, *, minimum: int, maximum: int | None = None, context: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{context}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{context}: {name} must be {bound}, got {value}")
    return value


class Hyperschedule:
    """A validated hyperschedule table with its summary numbers.

    Build one with :func:`flat`, :func:`block`, :func:`slide`, :func:`quench` or :func:`from_table`.

    Attributes:
        table: ``LongTensor [T+1, d]`` on the CPU, ``table[t, i] = τ_t^i``. Treat as read-only.
        kind: ``"flat" | "block" | "slide" | "quench" | "custom"``.
        block_size: for block-structured schedules (flat, block, quench) the width of the blocks
            that activate one after the other; ``None`` otherwise. Training packing draws one
            interval per block for these, and block-causal context uses blocks of this size.
    """

    def __init__(self, table: torch.Tensor, *, kind: str = "custom", rate: float | None = None,
                 block_size: int | None = None):
        # Constructors hand over tables that are valid by construction; from_table validates.
        self.table = table
        self.kind = kind
        self.block_size = block_size
        self.num_steps = table.shape[0] - 1
        self.length = table.shape[1]
        self.num_levels = int(table[0, 0])
        # τ is non-increasing in t, so (τ_t, τ_{t+1}) = (0, 0) iff τ_t = 0, and = (𝒯, 𝒯) iff τ_{t+1} = 𝒯.
        settled = table[:-1] == 0
        worthless = table[1:] == self.num_levels
        num_settled = settled.sum(1)
        num_worthless = worthless.sum(1)
        self.width = int((self.length - num_settled - num_worthless).max())
        self.rate = float(rate) if rate is not None else self.length / self.num_steps
        self._splits = torch.stack([num_settled, self.length - num_worthless], dim=1)
        # splits[t] = (a, b) holds where settled/worthless are a prefix/suffix of the row; rows that
        # are non-decreasing in i (every constructor here) satisfy that without further checks.
        if bool((table[:, 1:] >= table[:, :-1]).all()):
            self._split_ok = torch.ones(self.num_steps, dtype=torch.bool)
        else:
            positions = torch.arange(self.length)
            prefix_ok = (settled == (positions < num_settled[:, None])).all(1)
            suffix_ok = (worthless == (positions >= self.length - num_worthless[:, None])).all(1)
            self._split_ok = prefix_ok & suffix_ok

    # -- per-step queries -------------------------------------------------------------------
    def levels(self, t: int) -> torch.Tensor:
        """``LongTensor [d]``: the levels ``τ_t`` of the state at step ``t`` (``0 <= t <= T``)."""
        _check_int("t", t, minimum=0, maximum=self.num_steps, context="Hyperschedule.levels")
        return self.table[t].clone()

    def split(self, t: int) -> tuple[int, int]:
        """``(a, b)``: positions ``[0, a)`` are settled, ``[a, b)`` active, ``[b, d)`` worthless
        during step ``t`` (``0 <= t < T``), judged on the pair ``(τ_t, τ_{t+1})``."""
        _check_int("t", t, minimum=0, maximum=self.num_steps - 1, context="Hyperschedule.split")
        if not bool(self._split_ok[t]):
            raise ValueError(
                f"Hyperschedule.split: step {t} of this {self.kind} schedule does not split into "
                "contiguous settled/active/worthless ranges (the schedule is not monotone left to "
                "right there), so it cannot be KV-cached or packed")
        a, b = self._splits[t].tolist()
        return a, b

    @property
    def splits(self) -> torch.Tensor:
        """``LongTensor [T, 2]``: ``split(t)`` for every step (rows of non-splittable steps are
        meaningless; :attr:`is_monotone` says whether there are any)."""
        return self._splits

    @property
    def is_monotone(self) -> bool:
        """Whether every step splits into contiguous settled / active / worthless ranges."""
        return bool(self._split_ok.all())

    def noise_time(self, levels: torch.Tensor) -> torch.Tensor:
        """Float32 tensor of the same shape: the diffusion time ``level / 𝒯`` in ``[0, 1]``."""
        if not isinstance(levels, torch.Tensor) or levels.dtype.is_floating_point or levels.dtype == torch.bool:
            raise TypeError(f"Hyperschedule.noise_time: levels must be an integer tensor, got "
                            f"{getattr(levels, 'dtype', type(levels).__name__)}")
        return levels.to(torch.float32) / self.num_levels

    # -- presentation -----------------------------------------------------------------------
    def render(self, max_steps: int = 64, max_length: int = 96) -> str:
        """Text picture in the style of paper Fig. 2: one line per step ``t``, one character per
        position (the level, ``0-9`` then ``a-z``; ``*`` above 35)."""
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"
        rows = []
        for t in range(min(self.num_steps + 1, max_steps)):
            line = "".join(digits[v] if v < len(digits) else "*" for v in self.table[t, :max_length].tolist())
            rows.append(f"t={t:<4d} {line}")
        if self.num_steps + 1 > max_steps:
            rows.append(f"... {self.num_steps + 1 - max_steps} more steps")
        return "\n".join(rows)

    def __repr__(self) -> str:
        return (f"Hyperschedule(kind={self.kind!r}, length={self.length}, width={self.width}, "
                f"num_levels={self.num_levels}, num_steps={self.num_steps}, rate={self.rate:g})")


def _block_table(length: int, width: int, levels: int) -> torch.Tensor:
    # Block k runs through levels 𝒯, 𝒯-1, ..., 0 during steps k𝒯 .. (k+1)𝒯; earlier blocks are
    # clean, later ones at full noise: τ_t^i = clamp((⌊i/ω⌋ + 1)·𝒯 - t, 0, 𝒯).
    num_blocks = -(-length // width)
    steps = torch.arange(levels * num_blocks + 1).unsqueeze(1)
    block_end = (torch.arange(length) // width + 1) * levels
    return (block_end.unsqueeze(0) - steps).clamp_(0, levels)


def block(length: int, width: int, levels: int) -> Hyperschedule:
    """τ_Block^ω (paper Fig. 2c): blocks of ``width`` positions, denoised one after the other in
    ``levels`` steps each, so ``T = levels·⌈d/ω⌉`` and ``ρ = width / levels``: ``levels < width`` is
    the "quick draft" regime (ρ > 1), ``levels > width`` "think hard" (ρ < 1)."""
    _check_int("length", length, minimum=1, context="block")
    _check_int("width", width, minimum=1, maximum=length, context="block")
    _check_int("levels", levels, minimum=1, context="block")
    return Hyperschedule(_block_table(length, width, levels), kind="block", rate=width / levels,
                         block_size=width)


def flat(length: int, num_steps: int) -> Hyperschedule:
    """τ_Flat (paper Fig. 2b, standard diffusion): every position at level ``𝒯 - t``, ``𝒯 = T``."""
    _check_int("length", length, minimum=1, context="flat")
    _check_int("num_steps", num_steps, minimum=1, context="flat")
    return Hyperschedule(_block_table(length, length, num_steps), kind="flat", rate=length / num_steps,
                         block_size=length)


def quench(length: int) -> Hyperschedule:
    """τ_Quench (paper Fig. 2a, standard autoregression): ``τ_t^i = 1`` where ``i >= t``, else 0;
    one position per step, ``ω = 1``, ``𝒯 = 1``, ``T = d``."""
    _check_int("length", length, minimum=1, context="quench")
    return Hyperschedule(_block_table(length, 1, 1), kind="quench", rate=1.0, block_size=1)


def _round_half_even(numerator: torch.Tensor, denominator: int) -> torch.Tensor:
    # Exact integer version of Python's round(numerator / denominator), which the official
    # schedule uses; float division could land on the wrong side of a .5 tie.
    quotient, remainder = numerator // denominator, numerator % denominator
    up = (2 * remainder > denominator) | ((2 * remainder == denominator) & (quotient % 2 == 1))
    return quotient + up.long()


def slide(length: int, width: int, levels: int | None = None) -> Hyperschedule:
    """τ_Slide^ω (paper Figs 2d and 3): a window of ``width`` positions slides to the right; inside
    it, the position ``j`` places from the window's left edge sits at level
    ``m_j + 1`` with ``m_j = round(j·(𝒯-1)/(ω-1))`` (the official spacing of the ``levels`` over the
    window). The window advances by ``z`` positions per step, ``z`` = the number of ``m_j`` equal to
    0, so ``ρ = z`` (1 whenever ``𝒯 >= ω``, "quick draft" for smaller ``𝒯``), after ``ω - 1`` warm-up
    steps during which it enters from the left (Fig. 3). ``levels`` defaults to ``width``.
    """
    _check_int("length", length, minimum=1, context="slide")
    _check_int("width", width, minimum=1, maximum=length, context="slide")
    levels = width if levels is None else levels
    _check_int("levels", levels, minimum=1, context="slide")
    if width == 1:
        if levels != 1:
            raise ValueError("slide: width=1 needs levels=1 (a one-position window that never reaches "
                             f"level 0 cannot slide), got levels={levels}; use block(length, 1, levels) "
                             "to denoise one position at a time over several levels")
        window_levels = torch.zeros(1, dtype=torch.long)
    else:
        window_levels = _round_half_even(torch.arange(width) * (levels - 1), width - 1)
    advance = int((window_levels == 0).sum())
    if length > advance:
        num_steps = width - 1 + -(-length // advance)
    else:
        num_steps = max(1, width + length - advance)
    # Model call s = t + 1 sees the window starting at s - ω during warm-up and at z·(s - ω) after.
    # Every row is then a slice of one pattern: settled zeros, the window levels, worthless 𝒯.
    calls = torch.arange(1, num_steps + 2)
    start = torch.where(calls <= width, calls - width, advance * (calls - width))
    pad = max(int(start.max()), 0)  # leading zeros, so that every slice start is >= 0
    pattern = torch.cat([torch.zeros(pad, dtype=torch.long), window_levels + 1,
                         torch.full((length,), levels, dtype=torch.long)])
    first = pad - start  # pattern index of position 0 at each call
    table = pattern[first.unsqueeze(1) + torch.arange(length)]
    table[-1] = 0  # the last call settles every position
    return Hyperschedule(table, kind="slide", rate=float(advance))


def from_table(levels_table: torch.Tensor) -> Hyperschedule:
    """A custom hyperschedule from its ``[T+1, d]`` integer table, validated against the definition:
    ``τ_0 = 𝒯 >= 1`` everywhere, ``τ_T = 0`` everywhere, values in ``[0, 𝒯]``, non-increasing in t."""
    if not isinstance(levels_table, torch.Tensor):
        raise TypeError(f"from_table: levels_table must be a torch.Tensor, got {type(levels_table).__name__}")
    if levels_table.dtype.is_floating_point or levels_table.dtype.is_complex or levels_table.dtype == torch.bool:
        raise TypeError(f"from_table: levels_table must hold integers, got dtype {levels_table.dtype}")
    if levels_table.dim() != 2 or levels_table.shape[0] < 2 or levels_table.shape[1] < 1:
        raise ValueError("from_table: levels_table must have shape [T+1, d] with T >= 1 and d >= 1, "
                         f"got {tuple(levels_table.shape)}")
    table = levels_table.detach().to("cpu", torch.long).contiguous()
    top = int(table[0].max())
    if int(table[0].min()) != top or top < 1:
        raise ValueError("from_table: the first row must hold the same level 𝒯 >= 1 at every position "
                         f"(τ_0 = 𝒯), got values in [{int(table[0].min())}, {top}]")
    if bool((table[-1] != 0).any()):
        raise ValueError("from_table: the last row must be all zeros (τ_T = 0), got "
                         f"{int((table[-1] != 0).sum())} nonzero positions")
    if int(table.min()) < 0 or int(table.max()) > top:
        raise ValueError(f"from_table: levels must lie in [0, {top}], got [{int(table.min())}, {int(table.max())}]")
    rising = table[1:] > table[:-1]
    if bool(rising.any()):
        t, i = (int(v) for v in rising.nonzero()[0])
        raise ValueError("from_table: levels must be non-increasing in t, but position "
                         f"{i} goes from {int(table[t, i])} at t={t} to {int(table[t + 1, i])} at t={t + 1}")
    return Hyperschedule(table, kind="custom")
