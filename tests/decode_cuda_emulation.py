"""A CPU emulation of the tensor-core decode kernel of ``csrc/decode_attention_cuda.cu`` (namespace
``tensor_core``, float16/bfloat16 inputs), loop for loop, so that its tiling logic is tested without a GPU
(tests/test_decode_cuda_emulation.py) and its K/V traffic can be counted (``kv_traffic``).

Correspondence with the CUDA code (keep the two in step):

* constants: ``WARPS``, ``GROUP_ROWS``, ``TILE_KEYS``, ``groups_per_warp``, ``rows_per_block`` are the
  kernel's ``kWarps``, ``kGroupRows``, ``kTileKeys``, ``groups_per_warp(D)``, ``rows_per_block(D)``;
  ``MIN_TILES_PER_SPLIT``/``MAX_SPLITS`` and ``choose_num_splits`` are the host's split heuristic;
* ``block_rows`` is the kernel's prologue (mask rows clamped to ``[0, L]``, rows past S empty, the union
  ``block_prefix``/``block_window_lo``/``block_window_hi`` of the block's intervals);
* ``tile_plan`` is the kernel's ordinals: ``prefix_tiles``, ``window_first_tile``, ``window_tiles``,
  the split's balanced range ``[total·split/n, total·(split+1)/n)`` and ``tile_key0``;
* ``emulate`` runs one block per (batch, head, row block, split) in the kernel's grid order, keeps the
  online-softmax state per 16-row group (``row_max``, the softmax sum, the accumulator), visits the
  block's tiles in ordinal order, skips a tile for a group when no row of the group intersects it
  (``tile_intersects``, the kernel's ``__any_sync``), masks per element with ``key_allowed`` and keys
  ``>= L`` (zero-filled in shared memory), rescales with ``exp2((max - new_max)·|scale|·log2 e)`` (0 when
  the old max is ``-inf``), takes ``P`` rounded to the input type (``pack_pair``) times ``V``, and writes
  either the normalized rows (one split) or the partial rows, maxima and sums that ``combine`` merges as
  ``combine_splits_kernel`` does. The mma fragments are plain matrix products over the 16-row group and
  the 32-key tile: the fragment layout changes which thread holds an element, not the element's value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

WARPS = 8
GROUP_ROWS = 16
TILE_KEYS = 32
MIN_TILES_PER_SPLIT = 4
MAX_SPLITS = 64
LOG2E = 1.4426950408889634


def groups_per_warp(head_dim: int) -> int:
    return 2 if head_dim == 64 else 1


def rows_per_block(head_dim: int) -> int:
    return WARPS * groups_per_warp(head_dim) * GROUP_ROWS


def key_allowed(key, prefix_end, window_start, window_end):
    return (key < prefix_end) | ((window_start <= key) & (key < window_end))


def tile_intersects(key0: int, prefix_end: int, window_start: int, window_end: int) -> bool:
    return key0 < prefix_end or (window_start < window_end and window_start < key0 + TILE_KEYS and key0 < window_end)


def choose_num_splits(blocks_per_split: int, keys: int, resident_blocks: int) -> int:
    """The host's split heuristic (``choose_num_splits`` in the CUDA source)."""
    resident_blocks = max(resident_blocks, 1)
    if blocks_per_split * 5 >= resident_blocks * 4:
        return 1
    tiles = (keys + TILE_KEYS - 1) // TILE_KEYS
    max_splits = min(MAX_SPLITS, max(1, tiles // MIN_TILES_PER_SPLIT))

    def wave_efficiency(splits):
        blocks = blocks_per_split * splits
        waves = (blocks + resident_blocks - 1) // resident_blocks
        return blocks / (waves * resident_blocks)

    best = max(wave_efficiency(s) for s in range(1, max_splits + 1))
    return next((s for s in range(1, max_splits + 1) if wave_efficiency(s) >= 0.85 * best), 1)


@dataclass
class BlockRows:
    """A block's mask rows (clamped, rows past S empty) and the union of their intervals."""

    prefix_end: list[int]
    window_start: list[int]
    window_end: list[int]
    prefix: int
    window_lo: int
    window_hi: int


def block_rows(prefix_end: torch.Tensor, window_start: torch.Tensor, window_end: torch.Tensor, bm: int,
               first_row: int, block_size: int, keys: int) -> BlockRows:
    """The kernel's prologue for mask row ``bm`` (the sequence, or 0 when the mask is shared)."""
    rows = prefix_end.shape[1]
    pe, ws, we = [], [], []
    prefix, lo, hi = 0, keys, 0
    for r in range(block_size):
        row = first_row + r
        a = b = c = 0
        if row < rows:
            a, b, c = (min(max(int(t[bm, row]), 0), keys) for t in (prefix_end, window_start, window_end))
        pe.append(a)
        ws.append(b)
        we.append(c)
        if a > 0:
            prefix = max(prefix, a)
        if b < c:
            lo, hi = min(lo, b), max(hi, c)
    return BlockRows(pe, ws, we, prefix, lo, hi)


def tile_plan(block: BlockRows, split: int, num_splits: int) -> list[int]:
    """The first keys of the tiles a (row block, split) visits, in ordinal order."""
    prefix_tiles = (block.prefix + TILE_KEYS - 1) // TILE_KEYS
    window_first_tile = max(block.window_lo // TILE_KEYS, prefix_tiles)
    window_tiles = max(0, (block.window_hi + TILE_KEYS - 1) // TILE_KEYS - window_first_tile)
    total = prefix_tiles + window_tiles
    begin, end = total * split // num_splits, total * (split + 1) // num_splits

    def tile_key0(ordinal):
        return (ordinal if ordinal < prefix_tiles else window_first_tile + ordinal - prefix_tiles) * TILE_KEYS

    return [tile_key0(o) for o in range(begin, end)]


def emulate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_end: torch.Tensor,
            window_start: torch.Tensor, window_end: torch.Tensor, scale: float, num_splits: int,
            probability_dtype: torch.dtype | None = None, skipped: list | None = None) -> torch.Tensor:
    """The kernel's output for ``q [B, S, H, D]``, ``k``/``v [B, L, H, D]``, int masks ``[Bm, S]``, computed in
    float64 (``probability_dtype``: the type ``P`` is rounded to before ``P·V``, the kernel's input type;
    None keeps float64, which isolates the tiling logic from rounding). ``skipped`` collects
    ``(b, row block, split, key0, group)`` for every tile a group skipped."""
    B, S, H, D = q.shape
    L = k.shape[1]
    R = rows_per_block(D)
    row_blocks = (S + R - 1) // R
    sign = -1.0 if scale < 0 else 1.0
    exp_scale = abs(scale) * LOG2E
    q64, k64, v64 = (t.double() for t in (q, k, v))
    out = torch.zeros(B, S, H, D, dtype=torch.float64)
    partial_out = torch.zeros(num_splits, B, S, H, D, dtype=torch.float64)
    partial_max = torch.full((num_splits, B, S, H), -math.inf, dtype=torch.float64)
    partial_sum = torch.zeros(num_splits, B, S, H, dtype=torch.float64)
    groups_in_block = R // GROUP_ROWS
    for b in range(B):
        bm = b if prefix_end.shape[0] > 1 else 0
        for h in range(H):
            for row_block in range(row_blocks):
                first_row = row_block * R
                block = block_rows(prefix_end, window_start, window_end, bm, first_row, R, L)
                for split in range(num_splits):
                    key0s = tile_plan(block, split, num_splits)
                    # Group index gi * WARPS + warp covers block rows [16·group, 16·group + 16).
                    state = {}
                    for group in range(groups_in_block):
                        rows = range(group * GROUP_ROWS, (group + 1) * GROUP_ROWS)
                        if first_row + rows[0] >= S:
                            continue  # not live
                        q_rows = torch.zeros(GROUP_ROWS, D, dtype=torch.float64)
                        valid = [first_row + r for r in rows if first_row + r < S]
                        q_rows[:len(valid)] = sign * q64[b, valid, h]
                        state[group] = dict(q=q_rows, rows=list(rows),
                                            max=torch.full((GROUP_ROWS,), -math.inf, dtype=torch.float64),
                                            sum=torch.zeros(GROUP_ROWS, dtype=torch.float64),
                                            acc=torch.zeros(GROUP_ROWS, D, dtype=torch.float64))
                    for key0 in key0s:
                        keys = torch.arange(key0, key0 + TILE_KEYS)
                        in_range = keys < L
                        k_tile = torch.zeros(TILE_KEYS, D, dtype=torch.float64)  # zero-filled past L
                        v_tile = torch.zeros(TILE_KEYS, D, dtype=torch.float64)
                        n = int(in_range.sum())
                        k_tile[:n] = k64[b, key0:key0 + n, h]
                        v_tile[:n] = v64[b, key0:key0 + n, h]
                        for group, s in state.items():
                            pe = torch.tensor([block.prefix_end[r] for r in s["rows"]])
                            ws = torch.tensor([block.window_start[r] for r in s["rows"]])
                            we = torch.tensor([block.window_end[r] for r in s["rows"]])
                            if not any(tile_intersects(key0, int(a), int(c), int(d)) for a, c, d in zip(pe, ws, we)):
                                if skipped is not None:
                                    skipped.append((b, row_block, split, key0, group))
                                continue
                            scores = s["q"] @ k_tile.T  # [16, 32]
                            allowed = in_range[None] & key_allowed(keys[None], pe[:, None], ws[:, None], we[:, None])
                            tile_max = torch.where(allowed, scores, -math.inf).amax(1)
                            new_max = torch.maximum(s["max"], tile_max)
                            rescale = torch.where(s["max"] == -math.inf, 0.0,
                                                  torch.exp2((s["max"] - new_max) * exp_scale))
                            probs = torch.where(allowed, torch.exp2((scores - new_max[:, None]) * exp_scale), 0.0)
                            s["sum"] = s["sum"] * rescale + probs.sum(1)
                            if probability_dtype is not None:
                                probs = probs.to(probability_dtype).double()
                            s["acc"] = s["acc"] * rescale[:, None] + probs @ v_tile
                            s["max"] = new_max
                    for group, s in state.items():
                        inverse = torch.where(s["sum"] > 0, 1.0 / s["sum"], 0.0)
                        for i, r in enumerate(s["rows"]):
                            row = first_row + r
                            if row >= S:
                                continue
                            if num_splits == 1:
                                out[b, row, h] = s["acc"][i] * inverse[i]
                            else:
                                partial_out[split, b, row, h] = s["acc"][i] * inverse[i]
                                partial_max[split, b, row, h] = s["max"][i]
                                partial_sum[split, b, row, h] = s["sum"][i]
    if num_splits == 1:
        return out
    return combine(partial_out, partial_max, partial_sum, exp_scale)


def combine(partial_out: torch.Tensor, partial_max: torch.Tensor, partial_sum: torch.Tensor,
            exp_scale: float) -> torch.Tensor:
    """``combine_splits_kernel``: out = Σ_s w_s·partial_s / Σ_s w_s, w_s = sum_s·2^((max_s - M)·exp_scale)."""
    global_max = partial_max.amax(0)
    weight = torch.where(partial_max == -math.inf, 0.0,
                         partial_sum * torch.exp2((partial_max - global_max) * exp_scale))
    weight = torch.where(global_max == -math.inf, 0.0, weight)
    total = weight.sum(0)
    merged = (weight[..., None] * partial_out).sum(0)
    return merged * torch.where(total > 0, 1.0 / total, 0.0)[..., None]


# ---------------------------------------------------------------- the static K/V traffic model

def kv_traffic(prefix_end: torch.Tensor, window_start: torch.Tensor, window_end: torch.Tensor, batch: int,
               heads: int, head_dim: int, keys: int, num_splits: int, block_size: int | None = None,
               element_bytes: int = 2) -> dict:
    """Bytes of K and V that the kernel's blocks load (each visited tile's keys below L, K and V) against
    the floor (every key some row of the sequence attends, read once), with the splits' partial traffic
    (float32 rows, max and sum written by the kernel and read by the combine) when ``num_splits > 1``.
    ``block_size`` overrides the rows per block (16: the float32 kernel's row groups)."""
    R = block_size or rows_per_block(head_dim)
    rows = prefix_end.shape[1]
    row_blocks = (rows + R - 1) // R
    loaded_keys = attended_keys = 0
    for b in range(batch):
        bm = b if prefix_end.shape[0] > 1 else 0
        for row_block in range(row_blocks):
            block = block_rows(prefix_end, window_start, window_end, bm, row_block * R, R, keys)
            for split in range(num_splits):
                loaded_keys += sum(min(TILE_KEYS, keys - key0) for key0 in tile_plan(block, split, num_splits))
        c = torch.arange(keys)
        allowed = key_allowed(c[None], prefix_end[bm].long()[:, None].clamp(0, keys),
                              window_start[bm].long()[:, None].clamp(0, keys),
                              window_end[bm].long()[:, None].clamp(0, keys))
        attended_keys += int(allowed.any(0).sum())
    per_key = heads * head_dim * element_bytes * 2  # K and V
    partial = 0 if num_splits == 1 else num_splits * batch * rows * heads * (head_dim + 2) * 4 * 2
    kv, floor = loaded_keys * per_key, attended_keys * per_key
    return {"kv_bytes": kv, "floor_bytes": floor, "kv_over_floor": kv / floor if floor else float("nan"),
            "partial_bytes": partial, "total_over_floor": (kv + partial) / floor if floor else float("nan")}


def dense_window_masks(batch: int, prefix: int, window: int) -> tuple[torch.Tensor, ...]:
    """The benchmark's step (benchmarks/test_decode.py): S = ω rows over cells [0, P + ω), shared mask."""
    prefix_end = torch.full((1, window), prefix + window, dtype=torch.int32)
    empty = torch.zeros((1, window), dtype=torch.int32)
    return prefix_end, empty, empty


def generation_step_masks(prefix: int, window: int) -> tuple[torch.Tensor, ...]:
    """A generation step with re-encoding: ω settled rows re-encoded causally after P cached cells, then
    ω active rows that see everything before them and the whole window (S = 2ω, shared mask)."""
    reencoded = torch.arange(window, dtype=torch.int32)
    prefix_end = torch.cat([prefix + reencoded + 1, torch.full((window,), prefix + window, dtype=torch.int32)])
    window_start = torch.cat([torch.zeros(window, dtype=torch.int32),
                              torch.full((window,), prefix + window, dtype=torch.int32)])
    window_end = torch.cat([torch.zeros(window, dtype=torch.int32),
                            torch.full((window,), prefix + 2 * window, dtype=torch.int32)])
    return prefix_end[None], window_start[None], window_end[None]


def traffic_table(prefix: int = 4096, batch: int = 8, heads: int = 12, head_dim: int = 64,
                  sms: int = 132, blocks_per_sm: int = 1) -> list[dict]:
    """Static K/V traffic per step at the decode benchmark's shape, for the tensor-core kernel (split count
    from the host heuristic for ``sms`` SMs and ``blocks_per_sm`` resident blocks: 196 registers x 256
    threads allow one) and for 16-row groups each reading their tiles (the previous design)."""
    table = []
    for name, masks_of in (("benchmark S=w", lambda w: dense_window_masks(batch, prefix, w)),
                           ("re-encode S=2w", lambda w: generation_step_masks(prefix, w))):
        for window in (16, 64, 256):
            masks = masks_of(window)
            rows = masks[0].shape[1]
            keys = prefix + (2 * window if rows == 2 * window else window)
            row_blocks = -(-rows // rows_per_block(head_dim))
            splits = choose_num_splits(batch * heads * row_blocks, keys, sms * blocks_per_sm)
            ours = kv_traffic(*masks, batch, heads, head_dim, keys, splits)
            groups16 = kv_traffic(*masks, batch, heads, head_dim, keys, 1, block_size=GROUP_ROWS)
            table.append({"step": name, "w": window, "S": rows, "splits": splits,
                          "kv_over_floor": ours["kv_over_floor"], "total_over_floor": ours["total_over_floor"],
                          "groups16_kv_over_floor": groups16["kv_over_floor"]})
    return table


if __name__ == "__main__":
    for head_dim in (64, 128):
        print(f"P=4096 B=8 H=12 D={head_dim} bf16, static bytes model (H200: 132 SMs, 1 block/SM)")
        print("| step | w | S | splits | K/V read / floor | with split partials | 16-row groups |")
        print("|---|---|---|---|---|---|---|")
        for row in traffic_table(head_dim=head_dim):
            print(f"| {row['step']} | {row['w']} | {row['S']} | {row['splits']} | {row['kv_over_floor']:.3f} | "
                  f"{row['total_over_floor']:.3f} | {row['groups16_kv_over_floor']:.3f} |")
