"""``IntervalMask``: every hyperschedule attention mask as two key intervals per query row
(docs/conventions.md, "Masks").

Row ``q`` may attend key ``k`` iff ``k < prefix_end[q]`` or ``window_start[q] <= k < window_end[q]``.
That covers causal and block-causal prefixes, the dense active window over the settled prefix,
SHIFTED's next-position key, and every interval of the packed training layout (paper App. B.3).
"""

from __future__ import annotations

import weakref
from typing import Callable, Sequence

import torch

from .tiles import MaskTiles

__all__ = ["IntervalMask"]


class IntervalMask:
    """Per-row key intervals ``[0, prefix_end) ∪ [window_start, window_end)``.

    Args:
        prefix_end, window_start, window_end: integer tensors of shape ``[B, Q]`` or ``[1, Q]`` (a
            mask shared by the batch), stored as int32; ``0 <= prefix_end <= key_length`` and
            ``0 <= window_start <= window_end <= key_length`` (an empty window has start == end).
        key_length: number of keys ``K``.

        check: validate the values (one host synchronization, since they are read on the host). ``False``
            skips it, for masks whose bounds hold by construction (:meth:`dense`, a generation plan
            checked once); ``attends_all`` then stays False.

    A row whose two intervals are empty attends to nothing; attention outputs zeros there.
    """

    def __init__(self, prefix_end: torch.Tensor, window_start: torch.Tensor, window_end: torch.Tensor,
                 key_length: int, *, check: bool = True):
        tensors = {"prefix_end": prefix_end, "window_start": window_start, "window_end": window_end}
        for name, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"IntervalMask: {name} must be a torch.Tensor, got {type(value).__name__}")
            if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
                raise TypeError(f"IntervalMask: {name} must be an integer tensor, got dtype {value.dtype}")
            if value.dim() != 2:
                raise ValueError(f"IntervalMask: {name} must have shape [B, Q] (or [1, Q]), got "
                                 f"{tuple(value.shape)}")
        if not (prefix_end.shape == window_start.shape == window_end.shape):
            raise ValueError("IntervalMask: prefix_end, window_start and window_end must have the same shape, "
                             f"got {tuple(prefix_end.shape)}, {tuple(window_start.shape)}, "
                             f"{tuple(window_end.shape)}")
        if not (prefix_end.device == window_start.device == window_end.device):
            raise ValueError("IntervalMask: the three tensors must be on one device, got "
                             f"{prefix_end.device}, {window_start.device}, {window_end.device}")
        if isinstance(key_length, bool) or not isinstance(key_length, int) or key_length < 0:
            raise ValueError(f"IntervalMask: key_length must be an int >= 0, got {key_length!r}")
        self.prefix_end = prefix_end.to(torch.int32).contiguous()
        self.window_start = window_start.to(torch.int32).contiguous()
        self.window_end = window_end.to(torch.int32).contiguous()
        self.key_length = key_length
        self._tiles = {}  # (block_m, block_n) -> MaskTiles, and the BlockMasks; see tiles()
        # Whether every row attends every key (a full mask, e.g. flat inference): known on the host
        # from the bounds check, so attention can drop the mask without reading it.
        self.attends_all = False
        if not isinstance(check, bool):
            raise TypeError(f"IntervalMask: check must be a bool, got {check!r}")
        if check and self.prefix_end.numel():
            self._check_bounds()
        _LIVE_MASKS[id(self.prefix_end)] = self

    @classmethod
    def of_tensors(cls, prefix_end: torch.Tensor, window_start: torch.Tensor, window_end: torch.Tensor,
                   key_length: int) -> "IntervalMask":
        """The live mask that holds exactly these tensors (with its tile maps and BlockMasks), or a new
        one built from them. Custom ops take a mask's tensors, not the mask: this finds the mask again
        on the other side, so that its caches survive the crossing."""
        mask = _LIVE_MASKS.get(id(prefix_end))
        if (mask is not None and mask.prefix_end is prefix_end and mask.window_start is window_start
                and mask.window_end is window_end and mask.key_length == key_length):
            return mask
        # The caller built (and checked) the mask before the crossing: no second check, no host wait.
        return cls(prefix_end, window_start, window_end, key_length, check=False)

    @classmethod
    def dense(cls, ends: torch.Tensor, num_rows: int, key_length: int) -> "IntervalMask":
        """The dense window of KV-cached decoding: every one of ``num_rows`` rows of sequence ``b`` sees
        keys ``[0, ends[b])``. Built without reading ``ends`` on the host (no synchronization); the
        caller guarantees ``0 <= ends <= key_length`` (``decode`` flags violations on the device)."""
        if not isinstance(ends, torch.Tensor) or ends.dim() != 1:
            raise ValueError(f"IntervalMask.dense: ends must be a 1-d tensor [B], got {ends!r}")
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
            raise ValueError(f"IntervalMask.dense: num_rows must be an int >= 0, got {num_rows!r}")
        prefix_end = ends.to(torch.int32)[:, None].expand(ends.shape[0], num_rows)
        empty = torch.zeros((1, 1), dtype=torch.int32, device=ends.device).expand(ends.shape[0], num_rows)
        return cls(prefix_end, empty, empty, key_length, check=False)

    def _check_bounds(self) -> None:
        K = self.key_length
        for name, value in (("prefix_end", self.prefix_end), ("window_start", self.window_start),
                            ("window_end", self.window_end)):
            lo, hi = int(value.min()), int(value.max())
            if lo < 0 or hi > K:
                raise ValueError(f"IntervalMask: {name} must lie in [0, key_length={K}], got values in [{lo}, {hi}]")
            if name == "prefix_end":
                self.attends_all = lo == K
        inverted = self.window_start > self.window_end
        if bool(inverted.any()):
            b, q = (int(v) for v in inverted.nonzero()[0])
            raise ValueError(f"IntervalMask: window_start must be <= window_end, but row {q} of batch {b} has "
                             f"window [{int(self.window_start[b, q])}, {int(self.window_end[b, q])})")

    # -- shape -----------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        """Leading dimension: the batch size, or 1 for a mask shared by every sequence."""
        return self.prefix_end.shape[0]

    @property
    def num_rows(self) -> int:
        return self.prefix_end.shape[1]

    @property
    def device(self) -> torch.device:
        return self.prefix_end.device

    def check_shapes(self, num_rows: int, key_length: int, batch: int | None = None, *,
                     context: str = "attention") -> None:
        """Raise a ValueError naming what differs if the mask does not fit ``num_rows`` queries,
        ``key_length`` keys and ``batch`` sequences."""
        if num_rows != self.num_rows:
            raise ValueError(f"{context}: the mask has {self.num_rows} query rows, but the queries have "
                             f"{num_rows}")
        if key_length != self.key_length:
            raise ValueError(f"{context}: the mask has key_length {self.key_length}, but the keys have "
                             f"length {key_length}")
        if batch is not None and self.batch not in (1, batch):
            raise ValueError(f"{context}: the mask has batch {self.batch}, expected 1 or {batch}")

    # -- transformations ---------------------------------------------------------------------
    def to(self, device) -> "IntervalMask":
        return IntervalMask(self.prefix_end.to(device), self.window_start.to(device),
                            self.window_end.to(device), self.key_length)

    def rows(self, index) -> "IntervalMask":
        """The mask restricted to some query rows (a slice, or an index tensor/list); the keys are
        unchanged. E.g. ``m.rows(slice(a, None))`` keeps the active window of an inference mask,
        which is what a KV-cached call computes."""
        return IntervalMask(self.prefix_end[:, index], self.window_start[:, index],
                            self.window_end[:, index], self.key_length)

    def expand(self, batch: int) -> "IntervalMask":
        """A ``[batch, Q]`` mask (a shared ``[1, Q]`` mask repeated; a per-batch mask unchanged)."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(f"IntervalMask.expand: cannot expand a mask of batch {self.batch} to {batch}")
        return IntervalMask(self.prefix_end.expand(batch, -1), self.window_start.expand(batch, -1),
                            self.window_end.expand(batch, -1), self.key_length)

    @staticmethod
    def cat(masks: Sequence["IntervalMask"]) -> "IntervalMask":
        """Stack the rows of masks over the same keys (e.g. re-encoded rows next to window rows)."""
        if not masks:
            raise ValueError("IntervalMask.cat: masks must not be empty")
        key_length = masks[0].key_length
        if any(m.key_length != key_length for m in masks):
            raise ValueError("IntervalMask.cat: all masks must have the same key_length, got "
                             f"{[m.key_length for m in masks]}")
        batch = max(m.batch for m in masks)
        masks = [m.expand(batch) for m in masks]
        return IntervalMask(torch.cat([m.prefix_end for m in masks], 1),
                            torch.cat([m.window_start for m in masks], 1),
                            torch.cat([m.window_end for m in masks], 1), key_length)

    # -- converters ---------------------------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """Bool ``[B or 1, Q, K]``, True = attend: the reference rendering for SDPA and tests."""
        keys = torch.arange(self.key_length, device=self.device, dtype=torch.int32)
        return ((keys < self.prefix_end[..., None])
                | ((keys >= self.window_start[..., None]) & (keys < self.window_end[..., None])))

    @property
    def mask_mod(self) -> Callable:
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` equivalent to this mask."""
        prefix_end, window_start, window_end = self.prefix_end, self.window_start, self.window_end
        if self.batch == 1:
            # A shared mask is called with every b of the batch: index row 0 whatever b is.
            prefix_end, window_start, window_end = prefix_end[0], window_start[0], window_end[0]

            def mask_mod(b, h, q_idx, kv_idx):
                return (kv_idx < prefix_end[q_idx]) | (
                    (kv_idx >= window_start[q_idx]) & (kv_idx < window_end[q_idx]))
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return (kv_idx < prefix_end[b, q_idx]) | (
                    (kv_idx >= window_start[b, q_idx]) & (kv_idx < window_end[b, q_idx]))
        return mask_mod

    def tiles(self, block_m: int = 128, block_n: int = 128):
        """The tile map for kernels and FlexAttention (see :class:`hdlm_kernels.masks.MaskTiles`).

        Computed once per tile shape and kept: a model calls attention with one mask in every layer,
        forward and backward. (Masks are values: do not modify their tensors in place.)"""
        key = (block_m, block_n)
        if key not in self._tiles:
            self._tiles[key] = MaskTiles.from_mask(self, block_m, block_n)
        return self._tiles[key]

    def to_block_mask(self, block_size: int | tuple[int, int] = 128):
        """FlexAttention ``BlockMask`` built from the intervals in O(tiles); equal (indices and
        counts) to ``create_block_mask(self.mask_mod, ...)``, which evaluates every element."""
        block_m, block_n = (block_size, block_size) if isinstance(block_size, int) else block_size
        key = ("block_mask", block_m, block_n)
        if key not in self._tiles:  # kept like the tile map: every layer's call reuses it
            self._tiles[key] = self.tiles(block_m, block_n).to_block_mask(self.mask_mod)
        return self._tiles[key]

    # -- statistics and pictures ------------------------------------------------------------------
    def num_pairs(self) -> torch.Tensor:
        """Int64 ``[B or 1]``: attended (query, key) pairs per sequence; ``num_pairs / (Q·K)`` is the
        fraction of dense attention a block-sparse kernel has to compute."""
        prefix = self.prefix_end.long()
        window = (self.window_end - self.window_start).long()
        overlap = (torch.minimum(self.prefix_end, self.window_end)
                   - self.window_start).clamp(min=0).long()
        return (prefix + window - overlap).sum(1)

    def density(self) -> torch.Tensor:
        """Float64 ``[B or 1]``: attended pairs over ``Q·K``."""
        total = max(self.num_rows * self.key_length, 1)
        return self.num_pairs().double() / total

    def render(self, batch: int = 0, attend: str = "#", blocked: str = ".", row_labels=None) -> str:
        """Text picture of one sequence's mask in the style of the paper's Figs 6-10: one line per
        query row, one character per key. ``row_labels`` optionally names each row."""
        dense = self.to_dense()[min(batch, self.batch - 1)].cpu()
        width = max(len(str(self.num_rows - 1)), 1)
        if row_labels is not None:
            width = max(width, *(len(str(label)) for label in row_labels))
        header = " " * (width + 1) + "".join(str(k % 10) for k in range(self.key_length))
        lines = [header]
        for q in range(self.num_rows):
            label = str(row_labels[q]) if row_labels is not None else str(q)
            lines.append(f"{label:>{width}} " + "".join(attend if v else blocked for v in dense[q].tolist()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"IntervalMask(batch={self.batch}, num_rows={self.num_rows}, key_length={self.key_length}, "
                f"device={self.device})")


# Every mask by the id of its prefix_end tensor, for IntervalMask.of_tensors. Weak: a mask lives as long
# as its owner keeps it, and an id reused after its death is caught by the identity checks.
_LIVE_MASKS: "weakref.WeakValueDictionary[int, IntervalMask]" = weakref.WeakValueDictionary()
