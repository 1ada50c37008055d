"""Triton backend of the fused γ step (``hybrid_step``), bit-identical to the reference: the twin of
``csrc/hybrid_rule.h`` and, for bf16 / fp16 / fp32 log-scores, of the screened race of
``csrc/hybrid_cpu.cpp`` (docs/sampling-screen.md, "The γ step").

One program per row and three passes over it (docs/hybrid-step.md): the maximum of the read
log-scores, the exact fixed-point sum of the scaled ratios, then the weights and the Gumbel race
with the Gumbel-max kernel's pairing of columns and its winner rule. ``_hybrid_step_kernel`` runs the
race in FP64 on every token (float64 log-scores); ``_hybrid_step_screened_kernel`` screens it in float32
and scores exactly only the current cell and the candidates, and takes the exact race, by a branch
inside the kernel, on the rows the screen does not apply to.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gumbel import INTERPRETER_BLOCK_PAIRS, MAX_VOCAB, MAX_WARPS, max_tiles, row_winner, take_if_better
from .triton_hybrid_screen import float_at_most, hybrid_screen_bounds, hybrid_screen_row
from .triton_screen import largest_bound, raised_floor, reaches_floor, screen_noise, screen_noise_bound
from .triton_stream import (
    check_triton_device,
    interpreted,
    exp64,
    float64_constants,
    gumbel_noise,
    launch_block,
    launch_options,
    load_exp64_constants,
    load_log64_constants,
    log64,
    on_device,
    row_stream,
    stream_block,
    uniform53_of_words,
    widen,
)

__all__ = ["hybrid_candidates_triton", "hybrid_step_triton", "interpreted", "screened"]

# The kernel holds more per pair than Gumbel-max's (the weight, its log and exp64 of the log-score
# besides the noise): on sm_90 256 pairs and 8 warps (1 pair per thread) compile to 92 registers
# without spills, where 2 pairs per thread need 128-159 and spill for fp32 input.
GPU_BLOCK_PAIRS = 256
PAIRS_PER_WARP = 32


@triton.jit
def _row_sums(row_ptr, stride_col, vocab, mask_id, x, coefficients, CONSTS, BLOCK_P: tl.constexpr):
    # Passes 1 and 2 of row (log-scores at row_ptr, current token x, its 6 coefficients): returns
    # (good, bad, m, c1, c2·S, the current cell's weight). "Read" columns are the real tokens other than x.
    BLOCK_C: tl.constexpr = 2 * BLOCK_P  # columns per iteration
    e2, e3, e4, e5, inv_ln2_64, ln2_64_hi, ln2_64_lo, exp_min = load_exp64_constants(CONSTS)
    hi_scale = tl.load(CONSTS + 21)
    lo_scale = tl.load(CONSTS + 22)
    hi_unit = tl.load(CONSTS + 23)
    lo_unit = tl.load(CONSTS + 24)
    c1 = tl.load(coefficients + 0)
    c2 = tl.load(coefficients + 1)
    c3 = tl.load(coefficients + 2)
    c4 = tl.load(coefficients + 3)
    c5 = tl.load(coefficients + 4)
    c6 = tl.load(coefficients + 5)

    # Pass 1: m over the read entries; a NaN or +inf there marks the row bad, and a bad row continues
    # with every read entry at -inf, as the reference's masked row does (its score becomes NaN at the end).
    columns = tl.arange(0, BLOCK_C)
    top = tl.full([BLOCK_C], float("-inf"), tl.float64)
    broken = tl.zeros([BLOCK_C], tl.int32)
    for start in range(0, vocab, BLOCK_C):
        col = start + columns
        read = (col < vocab) & (col != mask_id) & (col != x)
        s = widen(tl.load(row_ptr + col.to(tl.int64) * stride_col, mask=read, other=float("-inf")))
        invalid = read & ((s != s) | (s == float("inf")))
        broken = broken | invalid.to(tl.int32)
        top = tl.maximum(top, tl.where(invalid, float("-inf"), s))  # no NaN reaches tl.maximum
    bad = tl.max(broken, axis=0) > 0
    good = tl.max(broken, axis=0) == 0
    m = tl.where(bad, float("-inf"), tl.max(top, axis=0))
    m = tl.where(x != mask_id, tl.maximum(m, 0.0), m)  # r_x = 1 is a ratio of the row too
    m = tl.maximum(m, exp_min)  # -inf (nothing read) included: exp64(-m) stays finite
    # (m's sign at 0 does not matter: exp64(±0) and s - (±0) give the same bits downstream.)

    # Pass 2: S_o as two int64 sums (exact, so the order of additions is free), then S.
    high_sum = tl.zeros([BLOCK_C], tl.int64)
    low_sum = tl.zeros([BLOCK_C], tl.int64)
    for start in range(0, vocab, BLOCK_C):
        col = start + columns
        read = (col < vocab) & (col != mask_id) & (col != x) & good
        s = widen(tl.load(row_ptr + col.to(tl.int64) * stride_col, mask=read, other=float("-inf")))
        # in [0, 1]; 0 off the read columns (exp64(-inf))
        ratio = exp64(s - m, e2, e3, e4, e5, inv_ln2_64, ln2_64_hi, ln2_64_lo, exp_min, CONSTS)
        scaled = ratio * hi_scale
        high = scaled.to(tl.int64)  # truncation = floor for r' >= 0; exact
        low = ((scaled - high.to(tl.float64)) * lo_scale).to(tl.int64)
        high_sum += high
        low_sum += low
    others = (tl.sum(high_sum, axis=0).to(tl.float64) * hi_unit
              + tl.sum(low_sum, axis=0).to(tl.float64) * lo_unit)
    u = exp64(-m, e2, e3, e4, e5, inv_ln2_64, ln2_64_hi, ln2_64_lo, exp_min, CONSTS)
    total = others + c3 * u
    c2_total = c2 * total
    current = c4 * (c5 * u - c6 * total)  # the weight of y = x
    return good, bad, m, c1, c2_total, current


@triton.jit
def _read_score(s, word_a, word_b, m, c1, c2_total, CONSTS):
    # The exact score of read tokens with widened log-scores s (float64; -inf where not read) and the
    # Philox words of their uniforms: log64(w) + g, w = (exp64(s - m) - c2·S)·c1, -inf where w < 2^-1022.
    l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, ln2_hi, ln2_lo = load_log64_constants(CONSTS)
    e2, e3, e4, e5, inv_ln2_64, ln2_64_hi, ln2_64_lo, exp_min = load_exp64_constants(CONSTS)
    smallest_weight = tl.load(CONSTS + 25)
    ratio = exp64(s - m, e2, e3, e4, e5, inv_ln2_64, ln2_64_hi, ln2_64_lo, exp_min, CONSTS)
    weight = (ratio - c2_total) * c1
    return _score_of_weight(weight, word_a, word_b, smallest_weight, l0, l1, l2, l3, l4, l5, l6, l7, l8, l9,
                            l10, ln2_hi, ln2_lo)


@triton.jit
def _score_of_weight(weight, word_a, word_b, smallest_weight, l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10,
                     ln2_hi, ln2_lo):
    # log64(weight) + the Gumbel noise of the words; a weight below 2^-1022 (subnormal, <= 0, NaN) scores -inf.
    positive = weight >= smallest_weight
    log_weight = log64(tl.where(positive, weight, 1.0), l0, l1, l2, l3, l4, l5, l6, l7, l8, l9,
                       l10, ln2_hi, ln2_lo)
    score = tl.where(positive, log_weight, float("-inf"))
    return score + gumbel_noise(uniform53_of_words(word_a, word_b), l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10,
                                ln2_hi, ln2_lo)


@triton.jit
def _exact_race(row_ptr, stride_col, vocab, mask_id, x, good, m, c1, c2_total, current, CONSTS,
                pair_base, parity, num_pairs, k0, k1, step_word, BLOCK_P: tl.constexpr):
    # Pass 3 on every token: the race, walking the row's Philox blocks as _gumbel_argmax_kernel does (lane
    # j owns block (row_id * V >> 1) + j: columns 2j - parity and 2j - parity + 1), so the noise is that
    # kernel's. Returns the lanes' best (score, column) per lane.
    SENTINEL: tl.constexpr = 2147483647
    l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, ln2_hi, ln2_lo = load_log64_constants(CONSTS)
    e2, e3, e4, e5, inv_ln2_64, ln2_64_hi, ln2_64_lo, exp_min = load_exp64_constants(CONSTS)
    smallest_weight = tl.load(CONSTS + 25)
    lanes = tl.arange(0, BLOCK_P)
    best_val = tl.full([BLOCK_P], float("-inf"), tl.float64)
    best_idx = tl.full([BLOCK_P], SENTINEL, tl.int32)
    for start in range(0, num_pairs, BLOCK_P):
        j = start + lanes
        w0, w1, w2, w3 = stream_block(pair_base + j, k0, k1, 0, step_word)
        for half in tl.static_range(2):  # even column (w0, w1) before odd (w2, w3): the lower first
            if half == 0:
                col = 2 * j - parity
                valid = (col >= 0) & (col < vocab)
                word_a = w0
                word_b = w1
            else:
                col = 2 * j - parity + 1
                valid = col < vocab
                word_a = w2
                word_b = w3
            read = valid & (col != mask_id) & (col != x) & good
            s = widen(tl.load(row_ptr + col.to(tl.int64) * stride_col, mask=read, other=float("-inf")))
            ratio = exp64(s - m, e2, e3, e4, e5, inv_ln2_64, ln2_64_hi, ln2_64_lo, exp_min, CONSTS)
            weight = (ratio - c2_total) * c1
            weight = tl.where(col == mask_id, 0.0, weight)
            weight = tl.where(col == x, current, weight)  # after MASK: x = MASK keeps its own weight
            score = _score_of_weight(weight, word_a, word_b, smallest_weight, l0, l1, l2, l3, l4, l5, l6, l7, l8,
                                     l9, l10, ln2_hi, ln2_lo)
            best_val, best_idx = take_if_better(best_val, best_idx, score, col, valid, SENTINEL)
    return row_winner(best_val, best_idx, SENTINEL)  # no NaN score here: bad rows are flagged


@triton.jit(do_not_specialize=["mask_id", "key0", "key1", "step_lo"])
def _hybrid_step_kernel(
        LOG_SCORE, X, COEFFICIENTS, ROW_IDS, CONSTS, TOKENS, BEST,
        stride_row, stride_col, vocab, mask_id,
        key0: tl.int64, key1: tl.int64, step_lo: tl.int64,
        BLOCK_P: tl.constexpr):
    # Program i steps row i (the fused form, docs/hybrid-step.md): pass 1 the maximum m of the read entries,
    # pass 2 the fixed-point sum of r' = exp64(s - m), pass 3 the weights and the Gumbel race on every
    # token. The log-scores are loaded three times in their own dtype and widened in registers; nothing of
    # the row is kept in memory between the passes.
    i = tl.program_id(0)
    row_ptr = LOG_SCORE + i.to(tl.int64) * stride_row
    x = tl.load(X + i)
    row_id = tl.load(ROW_IDS + i)
    good, bad, m, c1, c2_total, current = _row_sums(row_ptr, stride_col, vocab, mask_id, x,
                                                    COEFFICIENTS + i.to(tl.int64) * 6, CONSTS, BLOCK_P)
    element_base, parity, pair_base, num_pairs, k0, k1, step_word = row_stream(row_id, vocab, key0, key1, step_lo)
    token, best = _exact_race(row_ptr, stride_col, vocab, mask_id, x, good, m, c1, c2_total, current, CONSTS,
                              pair_base, parity, num_pairs, k0, k1, step_word, BLOCK_P)
    best = tl.where(bad, float("nan"), best)
    tl.store(TOKENS + i, token.to(tl.int64))
    tl.store(BEST + i, best.to(tl.float64))


@triton.jit
def _tile_scores(row_ptr, stride_col, vocab, mask_id, x, j, parity):
    # The columns of a tile of Philox pairs j and their read log-scores as float32 (-inf where not read:
    # absent columns, MASK and the current cell, whose interval is then [-inf, -inf]).
    col_even = 2 * j - parity
    col_odd = col_even + 1
    read_even = (col_even >= 0) & (col_even < vocab) & (col_even != mask_id) & (col_even != x)
    read_odd = (col_odd < vocab) & (col_odd != mask_id) & (col_odd != x)
    s_even = tl.load(row_ptr + col_even.to(tl.int64) * stride_col, mask=read_even, other=float("-inf"))
    s_odd = tl.load(row_ptr + col_odd.to(tl.int64) * stride_col, mask=read_odd, other=float("-inf"))
    return col_even, col_odd, read_even, read_odd, s_even.to(tl.float32), s_odd.to(tl.float32)


@triton.jit
def _screened_race(row_ptr, stride_col, vocab, mask_id, x, element_base, m, c1, c2_total, current, no_read, shift,
                   log_c1, log_k, k_zero, CONSTS, pair_base, parity, num_pairs, k0, k1, step_word,
                   BLOCK_P: tl.constexpr, MAX_TILES: tl.constexpr, PREFILTER: tl.constexpr):
    # Screen, then decide (docs/sampling-screen.md, "The γ step") on a good row: returns (token, score,
    # number of exact scores). The current cell is scored exactly first; its score rounded down to float32
    # is the first floor. Then, in two walks over the row's tiles of BLOCK_P Philox pairs:
    #   1. float32 and integer work only: the running floor (a scalar) and per tile the prefilter, each read
    #      token's upper bound from the K = 0 form of its interval (φ = 0, an upper bound of φ for every K)
    #      with the first Philox word's noise bound (screen_noise_bound) in place of the cheap noise. A tile
    #      where some such bound reaches the floor gets the cheap noise and every read column's [lo, hi]:
    #      the floor rises to its largest lo, the tile's top is its largest hi; any other tile's top is -inf
    #      (none of its tokens can raise the floor or win, and the final floor is finite when a tile is
    #      skipped). Tops kept in registers (MAX_TILES >= the tile count).
    #      A row without read weight (c1 = 0) has no tile to walk; PREFILTER=False (tests) gives every tile
    #      the cheap noise;
    #   2. the tiles whose top reaches the final floor L (a branch on one scalar) recompute their words and
    #      intervals, and their candidates (hi >= L) get the exact score and today's winner rule.
    SENTINEL: tl.constexpr = 2147483647
    l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, ln2_hi, ln2_lo = load_log64_constants(CONSTS)
    smallest_weight = tl.load(CONSTS + 25)
    # The current cell (element row_id * V + x: words (w0, w1) of its Philox block when even, (w2, w3) when odd).
    element = element_base + x
    c_w0, c_w1, c_w2, c_w3 = stream_block(element >> 1, k0, k1, 0, step_word)
    odd = (element & 1) != 0
    current_offered = current >= smallest_weight  # else its score is -inf: not offered
    current_score = _score_of_weight(current, tl.where(odd, c_w2, c_w0), tl.where(odd, c_w3, c_w1),
                                     smallest_weight, l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, ln2_hi, ln2_lo)
    floor = tl.where(current_offered, float_at_most(current_score), float("-inf"))

    lanes = tl.arange(0, BLOCK_P)
    tiles = tl.arange(0, MAX_TILES)
    num_tiles = tl.where(no_read, 0, (num_pairs + BLOCK_P - 1) // BLOCK_P)
    tile_top = tl.full([MAX_TILES], float("-inf"), tl.float32)
    for tile in range(0, num_tiles):
        j = tile * BLOCK_P + lanes
        col_even, col_odd, read_even, read_odd, s_even, s_odd = _tile_scores(row_ptr, stride_col, vocab, mask_id, x,
                                                                             j, parity)
        w0, w1, w2, w3 = stream_block(pair_base + j, k0, k1, 0, step_word)
        top = tl.full([], float("-inf"), tl.float32)  # a skipped tile's: below the final floor
        if PREFILTER:
            lo_bound_even, bound_even = hybrid_screen_bounds(s_even, screen_noise_bound(w0), shift, log_c1, 0.0, True)
            lo_bound_odd, bound_odd = hybrid_screen_bounds(s_odd, screen_noise_bound(w2), shift, log_c1, 0.0, True)
            reaches = reaches_floor(bound_even, bound_odd, floor)
        else:
            reaches = floor == floor
        if reaches:
            lo_even, hi_even = hybrid_screen_bounds(s_even, screen_noise(w0, w1), shift, log_c1, log_k, k_zero)
            lo_odd, hi_odd = hybrid_screen_bounds(s_odd, screen_noise(w2, w3), shift, log_c1, log_k, k_zero)
            floor = raised_floor(floor, lo_even, lo_odd)
            top = largest_bound(hi_even, hi_odd)
        tile_top = tl.where(tiles == tile, top, tile_top)
    row_floor = floor

    best_val = tl.full([BLOCK_P], float("-inf"), tl.float64)
    best_idx = tl.full([BLOCK_P], SENTINEL, tl.int32)
    candidates = tl.zeros([BLOCK_P], tl.int32)
    for tile in range(0, num_tiles):
        if tl.max(tl.where(tiles == tile, tile_top, float("-inf")), axis=0) >= row_floor:
            j = tile * BLOCK_P + lanes
            col_even, col_odd, read_even, read_odd, s_even, s_odd = _tile_scores(row_ptr, stride_col, vocab,
                                                                                 mask_id, x, j, parity)
            w0, w1, w2, w3 = stream_block(pair_base + j, k0, k1, 0, step_word)
            lo_even, hi_even = hybrid_screen_bounds(s_even, screen_noise(w0, w1), shift, log_c1, log_k, k_zero)
            lo_odd, hi_odd = hybrid_screen_bounds(s_odd, screen_noise(w2, w3), shift, log_c1, log_k, k_zero)
            keep_even = read_even & ~(hi_even < row_floor)
            keep_odd = read_odd & ~(hi_odd < row_floor)
            score_even = _read_score(s_even.to(tl.float64), w0, w1, m, c1, c2_total, CONSTS)
            score_odd = _read_score(s_odd.to(tl.float64), w2, w3, m, c1, c2_total, CONSTS)
            best_val, best_idx = take_if_better(best_val, best_idx, score_even, col_even, keep_even, SENTINEL)
            best_val, best_idx = take_if_better(best_val, best_idx, score_odd, col_odd, keep_odd, SENTINEL)
            candidates += keep_even.to(tl.int32) + keep_odd.to(tl.int32)

    # The candidates' winner against the current cell with the same rule (the larger score, ties to the
    # lower column); nothing of positive weight: -inf at column 0, as the full race.
    token, best = row_winner(best_val, best_idx, SENTINEL)
    take_current = current_offered & ((token == SENTINEL) | (current_score > best)
                                      | ((current_score == best) & (x < token)))
    token = tl.where(take_current, x.to(tl.int32), token)
    best = tl.where(take_current, current_score, best)
    nothing = (token == SENTINEL) | (best == float("-inf"))
    token = tl.where(nothing, 0, token)
    best = tl.where(nothing, float("-inf"), best)
    return token, best, 1 + tl.sum(candidates, axis=0)


@triton.jit(do_not_specialize=["mask_id", "key0", "key1", "step_lo"])
def _hybrid_step_screened_kernel(
        LOG_SCORE, X, COEFFICIENTS, ROW_IDS, CONSTS, TOKENS, BEST, COUNTS,
        stride_row, stride_col, vocab, mask_id,
        key0: tl.int64, key1: tl.int64, step_lo: tl.int64,
        BLOCK_P: tl.constexpr, MAX_TILES: tl.constexpr, PREFILTER: tl.constexpr = True):
    # The γ step for bf16 / fp16 / fp32 log-scores: passes 1 and 2 as _hybrid_step_kernel, then the race
    # screened (_screened_race) when the row is good and its constants are in the screen's range
    # (c1 and K = c2·S in [2^-100, 2^100], K = 0 allowed, or c1 = 0: no read weight at all), else the exact
    # race on every token (_exact_race): a branch per row inside the kernel. COUNTS[i]: the tokens scored
    # exactly (the current cell plus the candidates, or V).
    i = tl.program_id(0)
    row_ptr = LOG_SCORE + i.to(tl.int64) * stride_row
    x = tl.load(X + i)
    row_id = tl.load(ROW_IDS + i)
    good, bad, m, c1, c2_total, current = _row_sums(row_ptr, stride_col, vocab, mask_id, x,
                                                    COEFFICIENTS + i.to(tl.int64) * 6, CONSTS, BLOCK_P)
    element_base, parity, pair_base, num_pairs, k0, k1, step_word = row_stream(row_id, vocab, key0, key1, step_lo)
    l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, ln2_hi, ln2_lo = load_log64_constants(CONSTS)
    applies, shift, log_c1, log_k, k_zero = hybrid_screen_row(m, c1, c2_total, l0, l1, l2, l3, l4, l5, l6, l7, l8,
                                                              l9, l10, ln2_hi, ln2_lo)
    no_read = (c1 == 0.0) & (tl.abs(c2_total) < float("inf"))  # 0 times a finite r' - K: no read weight
    if good & (no_read | applies):
        token, best, exact = _screened_race(row_ptr, stride_col, vocab, mask_id, x, element_base, m, c1, c2_total,
                                            current, no_read, shift, log_c1, log_k, k_zero, CONSTS, pair_base,
                                            parity, num_pairs, k0, k1, step_word, BLOCK_P, MAX_TILES,
                                            PREFILTER)
    else:
        token, best = _exact_race(row_ptr, stride_col, vocab, mask_id, x, good, m, c1, c2_total, current, CONSTS,
                                  pair_base, parity, num_pairs, k0, k1, step_word, BLOCK_P)
        best = tl.where(bad, float("nan"), best)
        exact = vocab
    tl.store(TOKENS + i, token.to(tl.int64))
    tl.store(BEST + i, best.to(tl.float64))
    tl.store(COUNTS + i, exact.to(tl.int64))


def screened(log_score: torch.Tensor) -> bool:
    """Whether the γ step takes the screened kernel: bf16 / fp16 / fp32 log-scores (float32 holds them
    exactly). Which rows of it are screened is decided inside the kernel, per row."""
    return log_score.dtype != torch.float64


def hybrid_step_triton(
    log_score: torch.Tensor,
    x: torch.Tensor,
    coefficients: torch.Tensor,
    row_ids: torch.Tensor,
    mask_id: int,
    seed: int,
    step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton backend of ``hybrid_step``; the arguments and result of ``_hybrid_step_reference``
    (checked by ``hybrid_step``): log_score [R, V] bf16/fp16/fp32/fp64 (any strides), x int64 [R],
    coefficients float64 [R, 6] (``step_coefficients``), row_ids int64 [R]. Returns (tokens int64 [R],
    winning scores float64 [R]: NaN for a row with a NaN or +inf read log-score, -inf for a row without a
    positive weight). One program per row, no float64 copy of the log-scores."""
    tokens, best, _ = _draw(log_score, x, coefficients, row_ids, mask_id, seed, step)
    return tokens, best


def hybrid_candidates_triton(log_score: torch.Tensor, x: torch.Tensor, coefficients: torch.Tensor,
                             row_ids: torch.Tensor, mask_id: int, seed: int, step: int) -> torch.Tensor:
    """The number of tokens per row whose exact FP64 score decides the Triton draw: the current cell plus
    the screen's candidates, or V for a row on the exact race (float64 log-scores, a bad row, constants
    outside the screen's range). Arguments as ``hybrid_step_triton``; int64 [R]."""
    return _draw(log_score, x, coefficients, row_ids, mask_id, seed, step)[2]


def _draw(log_score, x, coefficients, row_ids, mask_id, seed, step, prefilter=True):
    # prefilter=False: the screened race without its prefilter (tests compare the two).
    check_triton_device(log_score, "hybrid_step")
    device = log_score.device
    num_rows, vocab = log_score.shape
    if vocab > MAX_VOCAB:
        raise ValueError(f"hybrid_step: backend='triton' supports V <= 2^30; got V = {vocab}")
    tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    best = torch.empty(num_rows, dtype=torch.float64, device=device)
    if num_rows == 0:
        return tokens, best, torch.empty(0, dtype=torch.int64, device=device)
    x = x.to(device=device, dtype=torch.int64).contiguous()
    coefficients = coefficients.to(device=device, dtype=torch.float64).contiguous()
    row_ids = row_ids.to(device=device, dtype=torch.int64).contiguous()
    # Pass 3 spans at most V // 2 + 1 Philox blocks; passes 1 and 2 take 2 * block_pairs columns at a time.
    block_pairs = min(launch_block(GPU_BLOCK_PAIRS, INTERPRETER_BLOCK_PAIRS),
                      triton.next_power_of_2(vocab // 2 + 1))
    options = launch_options(max(1, min(MAX_WARPS, block_pairs // PAIRS_PER_WARP)))
    arguments = (log_score, x, coefficients, row_ids, float64_constants(device), tokens, best)
    scalars = (log_score.stride(0), log_score.stride(1), vocab, mask_id, seed & 0xFFFFFFFF, seed >> 32,
               step & 0xFFFFFFFF)
    with on_device(log_score):
        if screened(log_score):
            counts = torch.empty(num_rows, dtype=torch.int64, device=device)
            _hybrid_step_screened_kernel[(num_rows,)](
                *arguments, counts, *scalars, BLOCK_P=block_pairs, MAX_TILES=max_tiles(vocab, block_pairs),
                PREFILTER=prefilter, **options)
        else:
            counts = torch.full((num_rows,), vocab, dtype=torch.int64, device=device)
            _hybrid_step_kernel[(num_rows,)](*arguments, *scalars, BLOCK_P=block_pairs, **options)
    return tokens, best, counts
