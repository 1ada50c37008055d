"""Tile maps of an ``IntervalMask``: which key tiles each query tile must visit, and which of them
need no element mask, computed from the intervals in O(rows + tiles) without a dense mask.

Conventions follow FlexAttention's ``BlockMask`` exactly (so :meth:`MaskTiles.to_block_mask` equals
``create_block_mask``): a tile is *full* when every one of its ``block_m × block_n`` elements is
attended (tiles that stick out past the last query or key are padded with blocked elements, so they
are never full), *partial* when some but not all are, and index lists hold the tile numbers in
ascending order followed by the unused ones.

The functions take an ``IntervalMask`` (they read its interval tensors, ``num_rows`` and
``key_length``) but do not import it: the mask imports this module to build and keep its tile maps,
and imports flow one way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MaskTiles", "TileBounds"]


def _cdiv(a: torch.Tensor | int, b: int):
    return -(-a // b)


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Count and list of the set entries of the last dimension, set ones first in ascending order.
    counts = dense.sum(-1, dtype=torch.int32)
    indices = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    # Kernels read each list as a contiguous row (argsort keeps the layout of a transposed input).
    indices = indices.contiguous()
    return counts, indices


@dataclass(frozen=True)
class TileBounds:
    """Per query tile, the range of each interval end over the tile's rows (``[B or 1, num_q_tiles]``
    int32 each). A kernel visits key tiles ``[0, ⌈prefix_end_max/BN⌉)`` and
    ``[⌊window_start_min/BN⌋, ⌈window_end_max/BN⌉)``, and may skip the element mask on tiles below
    ``⌊prefix_end_min/BN⌋`` and inside ``[⌈window_start_max/BN⌉, ⌊window_end_min/BN⌋)``. Rows with an
    empty window are left out of the window bounds; a tile without any window has
    ``window_start_min = key_length`` and ``window_end_max = 0`` (an empty range)."""

    block_m: int
    prefix_end_min: torch.Tensor
    prefix_end_max: torch.Tensor
    window_start_min: torch.Tensor
    window_start_max: torch.Tensor
    window_end_min: torch.Tensor
    window_end_max: torch.Tensor


@dataclass(frozen=True)
class MaskTiles:
    """Tile map of a mask for ``block_m × block_n`` tiles, shapes ``[B or 1, num_q_tiles, ...]``.

    Forward / dQ pass (per query tile, the key tiles to visit):
        ``kv_count``, ``kv_index``: partial tiles (need the element mask);
        ``full_kv_count``, ``full_kv_index``: full tiles (no element mask).
    dK / dV pass (per key tile, the query tiles that touch it; the transposed map,
    ``[B or 1, num_kv_tiles, ...]``):
        ``q_count``, ``q_index``: partial tiles; ``full_q_count``, ``full_q_index``: full tiles.
    ``bounds``: the per-query-tile interval ranges (:class:`TileBounds`).
    """

    block_m: int
    block_n: int
    num_rows: int
    key_length: int
    kv_count: torch.Tensor
    kv_index: torch.Tensor
    full_kv_count: torch.Tensor
    full_kv_index: torch.Tensor
    q_count: torch.Tensor
    q_index: torch.Tensor
    full_q_count: torch.Tensor
    full_q_index: torch.Tensor
    bounds: TileBounds

    @staticmethod
    def from_mask(mask: "IntervalMask", block_m: int = 128, block_n: int = 128) -> "MaskTiles":
        for name, value in (("block_m", block_m), ("block_n", block_n)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MaskTiles: {name} must be a positive int, got {value!r}")
        touched, full = _tile_occupancy(mask, block_m, block_n)
        kv_count, kv_index = _ordered(touched & ~full)
        full_kv_count, full_kv_index = _ordered(full)
        q_count, q_index = _ordered((touched & ~full).transpose(-1, -2))
        full_q_count, full_q_index = _ordered(full.transpose(-1, -2))
        return MaskTiles(block_m, block_n, mask.num_rows, mask.key_length, kv_count, kv_index,
                         full_kv_count, full_kv_index, q_count, q_index, full_q_count, full_q_index,
                         _tile_bounds(mask, block_m))

    @property
    def num_q_tiles(self) -> int:
        return self.kv_count.shape[1]

    @property
    def num_kv_tiles(self) -> int:
        return self.q_count.shape[1]

    def visited_fraction(self) -> torch.Tensor:
        """Float64 ``[B or 1]``: visited tiles (partial + full) over all tiles."""
        visited = (self.kv_count + self.full_kv_count).sum(-1).double()
        return visited / max(self.num_q_tiles * self.num_kv_tiles, 1)

    def to_block_mask(self, mask_mod):
        """FlexAttention ``BlockMask`` (heads broadcast) with this tile map and ``mask_mod``."""
        from torch.nn.attention.flex_attention import BlockMask

        return BlockMask.from_kv_blocks(
            self.kv_count[:, None], self.kv_index[:, None],
            self.full_kv_count[:, None], self.full_kv_index[:, None],
            BLOCK_SIZE=(self.block_m, self.block_n), mask_mod=mask_mod,
            seq_lengths=(self.num_rows, self.key_length))


def _canonical_intervals(mask: "IntervalMask"):
    # Rewrite each row as two disjoint intervals [0, p) and [s, e) with s > p unless empty, so that
    # a tile covered by the two intervals together is recognised as covered.
    p = mask.prefix_end.long()
    s, e = mask.window_start.long(), mask.window_end.long()
    has_window = s < e
    merged = has_window & (s <= p)
    p = torch.where(merged, torch.maximum(p, e), p)
    keep = has_window & ~merged
    zero = torch.zeros_like(s)
    return p, torch.where(keep, s, zero), torch.where(keep, e, zero), keep


def _tile_occupancy(mask: "IntervalMask", block_m: int, block_n: int):
    """Bool ``[B or 1, num_q_tiles, num_kv_tiles]`` twice: tiles touched by some row, and tiles fully
    covered by every one of their ``block_m`` rows."""
    B, Q = mask.prefix_end.shape
    num_q_tiles, num_kv_tiles = _cdiv(Q, block_m), _cdiv(mask.key_length, block_n)
    p, s, e, has_window = _canonical_intervals(mask)
    # Per row: [first, last) key-tile ranges, touched and fully covered, for both intervals.
    ranges_touched = [(torch.zeros_like(p), _cdiv(p, block_n)),
                      (s // block_n, torch.where(has_window, _cdiv(e, block_n), s // block_n))]
    ranges_full = [(torch.zeros_like(p), p // block_n),
                   (_cdiv(s, block_n), torch.where(has_window, torch.maximum(e // block_n, _cdiv(s, block_n)),
                                                    _cdiv(s, block_n)))]
    row_tile = (torch.arange(Q, device=p.device) // block_m).expand(B, Q)
    batch = torch.arange(B, device=p.device).unsqueeze(1).expand(B, Q)

    def count(ranges):
        # Difference array over key tiles, one +1/-1 pair per row interval, then a prefix sum.
        diff = torch.zeros(B, num_q_tiles, num_kv_tiles + 1, dtype=torch.int32, device=p.device)
        ones = torch.ones(B, Q, dtype=torch.int32, device=p.device)
        for first, last in ranges:
            diff.index_put_((batch, row_tile, first), ones, accumulate=True)
            diff.index_put_((batch, row_tile, last), -ones, accumulate=True)
        return diff.cumsum(-1)[..., :num_kv_tiles]

    touched = count(ranges_touched) > 0
    full = count(ranges_full) == block_m
    return touched, full


def _tile_bounds(mask: "IntervalMask", block_m: int) -> TileBounds:
    B, Q = mask.prefix_end.shape
    num_q_tiles = _cdiv(Q, block_m)
    padded = num_q_tiles * block_m

    def tiled(x: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((B, padded), fill, dtype=torch.int32, device=x.device)
        out[:, :Q] = x
        return out.view(B, num_q_tiles, block_m)

    K = mask.key_length
    big, small = torch.iinfo(torch.int32).max, torch.iinfo(torch.int32).min
    has_window = mask.window_start < mask.window_end
    ws_lo = torch.where(has_window, mask.window_start, K)
    ws_hi = torch.where(has_window, mask.window_start, 0)
    we_lo = torch.where(has_window, mask.window_end, K)
    we_hi = torch.where(has_window, mask.window_end, 0)
    return TileBounds(
        block_m=block_m,
        prefix_end_min=tiled(mask.prefix_end, big).amin(-1),
        prefix_end_max=tiled(mask.prefix_end, small).amax(-1),
        window_start_min=tiled(ws_lo, K).amin(-1),
        window_start_max=tiled(ws_hi, 0).amax(-1),
        window_end_min=tiled(we_lo, K).amin(-1),
        window_end_max=tiled(we_hi, 0).amax(-1),
    )
