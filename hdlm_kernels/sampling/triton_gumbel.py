"""Triton backend of FP64 Gumbel-max (``gumbel_argmax``, and the draws of ``acs_apply`` /
``acs_step``), bit-identical to the reference: the twin of ``csrc/gumbel_rule.h``.

One program per sampled row, looping over the vocabulary in blocks of BLOCK_P Philox blocks
(2·BLOCK_P columns); see the kernel's comments. ``take_if_better`` and ``row_winner`` are the race's
winner rule (ties to the lowest column, a NaN wins so that the caller can report it), shared with the
γ step's kernel. The stream primitives come from :mod:`.triton_stream`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_stream import (
    check_triton_device,
    interpreted,
    double_bits,
    float64_constants,
    gumbel_noise,
    launch_block,
    launch_options,
    load_log64_constants,
    on_device,
    row_stream,
    stream_block,
    uniform53_of_words,
)
from .triton_screen import (
    largest_bound,
    raised_floor,
    reaches_floor,
    screen_bounds,
    screen_noise,
    screen_noise_bound,
    screen_scale_bits,
)

__all__ = ["gumbel_argmax_triton", "gumbel_candidates_triton", "interpreted", "row_winner", "screened",
           "take_if_better"]

# Pairs of columns (Philox blocks) per loop iteration: a GPU size, and a larger one under the
# interpreter. On sm_90 the kernel with 512 pairs and 8 warps (2 pairs, 4 columns per thread)
# compiles to 78 registers without spills (137 with 4 warps).
GPU_BLOCK_PAIRS = 512
INTERPRETER_BLOCK_PAIRS = 4096
PAIRS_PER_WARP = 64
MAX_WARPS = 8
MAX_VOCAB = 2**30  # column arithmetic is int32 (2j - parity for j up to V / 2 + BLOCK_P)


@triton.jit
def take_if_better(best_val, best_idx, score, col, valid, SENTINEL: tl.constexpr):
    # Columns reach a lane in increasing order, so a strict > keeps the lowest index among equal scores.
    # The lane's first valid column is always taken (even at -inf: a row with no candidate then reports
    # -inf, as the reference does), and a NaN score wins over every number and is kept (the caller
    # raises for it).
    take = valid & ((score > best_val) | (best_idx == SENTINEL)
                    | ((score != score) & (best_val == best_val)))
    return tl.where(take, score, best_val), tl.where(take, col, best_idx)


@triton.jit
def exact_score(x, word_a, word_b, temperature, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo,
                NOISE: tl.constexpr, DIVIDE: tl.constexpr):
    """The exact FP64 score of loaded logits x with the Philox words of their uniforms: fl64(x) / T
    (skipped at T = 1) + gumbel_noise(u) (skipped at T = 0), each operation rounded once."""
    if x.dtype == tl.float64:
        score = x
    else:  # bf16 / fp16 / fp32 -> fp32 -> fp64: exact
        score = x.to(tl.float32).to(tl.float64)
    if DIVIDE:
        score = score / temperature
    if NOISE:
        score = score + gumbel_noise(uniform53_of_words(word_a, word_b), c0, c1, c2, c3, c4, c5, c6, c7, c8, c9,
                                     c10, ln2_hi, ln2_lo)
    return score


@triton.jit
def row_winner(best_val, best_idx, SENTINEL: tl.constexpr):
    """The row's (token, score) from the lanes' bests: a NaN anywhere wins (the lowest NaN column, score
    NaN); otherwise the maximum, ties to the lowest column."""
    is_nan = best_val != best_val
    any_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
    top = tl.max(tl.where(is_nan, float("-inf"), best_val), axis=0)
    winner = tl.where(any_nan, is_nan, (best_val == top) & (best_idx != SENTINEL))
    token = tl.min(tl.where(winner, best_idx, SENTINEL), axis=0)
    return token, tl.where(any_nan, float("nan"), top)


@triton.jit(do_not_specialize=["key0", "key1", "step_lo", "temperature_bits"])
def _gumbel_argmax_kernel(
        LOGITS, TAKE, ROW_IDS, EXCLUDE, CONSTS, TOKENS, BEST,
        stride_row, stride_col, vocab,
        key0: tl.int64, key1: tl.int64, step_lo: tl.int64, temperature_bits: tl.int64,
        HAS_TAKE: tl.constexpr, HAS_EXCLUDE: tl.constexpr, NOISE: tl.constexpr, DIVIDE: tl.constexpr,
        BLOCK_P: tl.constexpr):
    # Program i samples row i: logits row TAKE[i] (or i), noise of row identity ROW_IDS[i]. Element
    # e = row_id * V + v of stream 0 uses Philox block n = e >> 1, words (w0, w1) when e is even and
    # (w2, w3) when odd. The loop walks the row's Philox blocks: lane j of an iteration owns block
    # n = (row_id * V >> 1) + j, whose even element is column 2j - parity and odd element the next
    # column (parity = row_id * V & 1), so each block is computed once and feeds two columns.
    SENTINEL: tl.constexpr = 2147483647
    i = tl.program_id(0)
    if HAS_TAKE:
        row = tl.load(TAKE + i)
    else:
        row = i.to(tl.int64)
    row_id = tl.load(ROW_IDS + i)
    row_ptr = LOGITS + row * stride_row
    element_base, parity, pair_base, num_pairs, k0, k1, step_word = row_stream(row_id, vocab, key0, key1, step_lo)
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo = load_log64_constants(CONSTS)
    temperature = temperature_bits.to(tl.int64).to(tl.float64, bitcast=True)

    lanes = tl.arange(0, BLOCK_P)
    best_val = tl.full([BLOCK_P], float("-inf"), tl.float64)
    best_idx = tl.full([BLOCK_P], SENTINEL, tl.int32)
    for start in range(0, num_pairs, BLOCK_P):
        j = start + lanes
        col_even = 2 * j - parity
        col_odd = col_even + 1
        valid_even = (col_even >= 0) & (col_even < vocab)
        valid_odd = col_odd < vocab
        x_even = tl.load(row_ptr + col_even.to(tl.int64) * stride_col, mask=valid_even, other=0.0)
        x_odd = tl.load(row_ptr + col_odd.to(tl.int64) * stride_col, mask=valid_odd, other=0.0)
        if NOISE:
            w0, w1, w2, w3 = stream_block(pair_base + j, k0, k1, 0, step_word)
        else:
            w0 = lanes.to(tl.uint32)  # not read
            w1 = w0
            w2 = w0
            w3 = w0
        s_even = exact_score(x_even, w0, w1, temperature, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10,
                             ln2_hi, ln2_lo, NOISE, DIVIDE)
        s_odd = exact_score(x_odd, w2, w3, temperature, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10,
                            ln2_hi, ln2_lo, NOISE, DIVIDE)
        if HAS_EXCLUDE:
            excluded_even = tl.load(EXCLUDE + col_even, mask=valid_even, other=0)
            excluded_odd = tl.load(EXCLUDE + col_odd, mask=valid_odd, other=0)
            s_even = tl.where(excluded_even != 0, float("-inf"), s_even)
            s_odd = tl.where(excluded_odd != 0, float("-inf"), s_odd)
        # Even before odd: the lower column first.
        best_val, best_idx = take_if_better(best_val, best_idx, s_even, col_even, valid_even, SENTINEL)
        best_val, best_idx = take_if_better(best_val, best_idx, s_odd, col_odd, valid_odd, SENTINEL)

    token, best = row_winner(best_val, best_idx, SENTINEL)
    tl.store(TOKENS + i, token.to(tl.int64))
    tl.store(BEST + i, best.to(tl.float64))


@triton.jit
def _tile_logits(row_ptr, EXCLUDE, stride_col, vocab, j, parity, HAS_EXCLUDE: tl.constexpr):
    # The columns of a tile of Philox pairs j and their logits: as loaded (x, for the exact score) and as
    # float32 for the screen (l), where absent and excluded columns are -inf (an excluded token's exact
    # score is -inf, and screen_bounds gives a -inf logit the interval [-inf, -inf]).
    col_even = 2 * j - parity
    col_odd = col_even + 1
    valid_even = (col_even >= 0) & (col_even < vocab)
    valid_odd = col_odd < vocab
    x_even = tl.load(row_ptr + col_even.to(tl.int64) * stride_col, mask=valid_even, other=float("-inf"))
    x_odd = tl.load(row_ptr + col_odd.to(tl.int64) * stride_col, mask=valid_odd, other=float("-inf"))
    l_even = x_even.to(tl.float32)
    l_odd = x_odd.to(tl.float32)
    if HAS_EXCLUDE:
        l_even = tl.where(tl.load(EXCLUDE + col_even, mask=valid_even, other=0) != 0, float("-inf"), l_even)
        l_odd = tl.where(tl.load(EXCLUDE + col_odd, mask=valid_odd, other=0) != 0, float("-inf"), l_odd)
    return col_even, col_odd, valid_even, valid_odd, x_even, x_odd, l_even, l_odd


@triton.jit(do_not_specialize=["key0", "key1", "step_lo", "temperature_bits", "scale_bits"])
def _gumbel_argmax_screened_kernel(
        LOGITS, TAKE, ROW_IDS, EXCLUDE, CONSTS, TOKENS, BEST, COUNTS,
        stride_row, stride_col, vocab,
        key0: tl.int64, key1: tl.int64, step_lo: tl.int64, temperature_bits: tl.int64, scale_bits: tl.int32,
        HAS_TAKE: tl.constexpr, HAS_EXCLUDE: tl.constexpr, DIVIDE: tl.constexpr,
        BLOCK_P: tl.constexpr, MAX_TILES: tl.constexpr, PREFILTER: tl.constexpr = True):
    # Screen, then decide (docs/sampling-screen.md), for bf16 / fp16 / fp32 logits and a temperature
    # whose float32 1/T is normal. Program i samples row i, with the pairs and columns of
    # _gumbel_argmax_kernel, in two passes over the row's tiles of BLOCK_P Philox pairs:
    #   1. float32 and integer work only. The running floor (a scalar: the largest lo so far) and per tile
    #      the prefilter: each token's upper bound from its logit and its first Philox word alone
    #      (screen_noise_bound). A tile where some such bound reaches the floor (a NaN reaches) gets the
    #      cheap noise and every column's [lo, hi]: the floor rises to its largest lo, and the tile's top is
    #      its largest hi (NaN counted as +inf). Any other tile holds no token whose exact score, lo or hi
    #      reaches the floor (lo <= score <= bound, and hi <= bound: the cheap noise stays below the noise
    #      bound): its top is -inf, below the final floor (finite, since a -inf floor skips nothing). The
    #      tops are kept in registers (MAX_TILES >= the tile count). PREFILTER=False (tests) gives every
    #      tile the cheap noise: the same floor, the same candidates.
    #   2. the tiles whose top reaches the final floor L (a branch on one scalar, so the others cost a
    #      reduction: every skipped tile is one) recompute their Philox words and intervals, and their
    #      candidates (hi >= L or NaN) get the exact FP64 score and today's winner rule, lanes in
    #      increasing column order.
    SENTINEL: tl.constexpr = 2147483647
    i = tl.program_id(0)
    if HAS_TAKE:
        row = tl.load(TAKE + i)
    else:
        row = i.to(tl.int64)
    row_id = tl.load(ROW_IDS + i)
    row_ptr = LOGITS + row * stride_row
    element_base, parity, pair_base, num_pairs, k0, k1, step_word = row_stream(row_id, vocab, key0, key1, step_lo)
    num_tiles = (num_pairs + BLOCK_P - 1) // BLOCK_P
    if DIVIDE:
        scale = scale_bits.to(tl.int32).to(tl.float32, bitcast=True)
    else:
        scale = 1.0  # T = 1: a constant, so that the screen's logit * scale folds away
    lanes = tl.arange(0, BLOCK_P)
    tiles = tl.arange(0, MAX_TILES)

    floor = tl.full([], float("-inf"), tl.float32)
    tile_top = tl.full([MAX_TILES], float("-inf"), tl.float32)
    for tile in range(0, num_tiles):
        j = tile * BLOCK_P + lanes
        (col_even, col_odd, valid_even, valid_odd, x_even, x_odd,
         l_even, l_odd) = _tile_logits(row_ptr, EXCLUDE, stride_col, vocab, j, parity, HAS_EXCLUDE)
        w0, w1, w2, w3 = stream_block(pair_base + j, k0, k1, 0, step_word)
        top = tl.full([], float("-inf"), tl.float32)  # a skipped tile's: below the final floor (see above)
        if PREFILTER:
            lo_bound_even, bound_even = screen_bounds(l_even, screen_noise_bound(w0), scale)
            lo_bound_odd, bound_odd = screen_bounds(l_odd, screen_noise_bound(w2), scale)
            reaches = reaches_floor(bound_even, bound_odd, floor)
        else:
            reaches = floor == floor
        if reaches:
            lo_even, hi_even = screen_bounds(l_even, screen_noise(w0, w1), scale)
            lo_odd, hi_odd = screen_bounds(l_odd, screen_noise(w2, w3), scale)
            floor = raised_floor(floor, lo_even, lo_odd)
            top = largest_bound(hi_even, hi_odd)
        tile_top = tl.where(tiles == tile, top, tile_top)
    row_floor = floor

    best_val = tl.full([BLOCK_P], float("-inf"), tl.float64)
    best_idx = tl.full([BLOCK_P], SENTINEL, tl.int32)
    candidates = tl.zeros([BLOCK_P], tl.int32)
    for tile in range(0, num_tiles):
        if tl.max(tl.where(tiles == tile, tile_top, float("-inf")), axis=0) >= row_floor:
            # The exact pass's FP64 constants are loaded here, in the rare tiles with a candidate, rather than
            # held in registers through the loop (26 of them: it kept the kernel at 2 CTAs per SM on sm_90).
            c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, ln2_hi, ln2_lo = load_log64_constants(CONSTS)
            temperature = temperature_bits.to(tl.int64).to(tl.float64, bitcast=True)
            j = tile * BLOCK_P + lanes
            (col_even, col_odd, valid_even, valid_odd, x_even, x_odd,
             l_even, l_odd) = _tile_logits(row_ptr, EXCLUDE, stride_col, vocab, j, parity, HAS_EXCLUDE)
            w0, w1, w2, w3 = stream_block(pair_base + j, k0, k1, 0, step_word)
            lo_even, hi_even = screen_bounds(l_even, screen_noise(w0, w1), scale)
            lo_odd, hi_odd = screen_bounds(l_odd, screen_noise(w2, w3), scale)
            keep_even = valid_even & ~(hi_even < row_floor)  # a NaN hi is a candidate
            keep_odd = valid_odd & ~(hi_odd < row_floor)
            s_even = exact_score(x_even, w0, w1, temperature, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10,
                                 ln2_hi, ln2_lo, True, DIVIDE)
            s_odd = exact_score(x_odd, w2, w3, temperature, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10,
                                ln2_hi, ln2_lo, True, DIVIDE)
            # An excluded candidate (only in a row whose floor is -inf) scores -inf, as in the full walk.
            s_even = tl.where(hi_even == float("-inf"), float("-inf"), s_even)
            s_odd = tl.where(hi_odd == float("-inf"), float("-inf"), s_odd)
            best_val, best_idx = take_if_better(best_val, best_idx, s_even, col_even, keep_even, SENTINEL)
            best_val, best_idx = take_if_better(best_val, best_idx, s_odd, col_odd, keep_odd, SENTINEL)
            candidates += keep_even.to(tl.int32) + keep_odd.to(tl.int32)

    token, best = row_winner(best_val, best_idx, SENTINEL)
    tl.store(TOKENS + i, token.to(tl.int64))
    tl.store(BEST + i, best.to(tl.float64))
    tl.store(COUNTS + i, tl.sum(candidates, axis=0).to(tl.int64))


def gumbel_argmax_triton(
    logits: torch.Tensor,
    take: torch.Tensor | None,
    row_ids: torch.Tensor,
    seed: int,
    step: int,
    temperature: float,
    exclude: torch.Tensor | None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton backend of ``gumbel_argmax``; the arguments and result of ``_gumbel_argmax_reference``
    (checked there): logits [K, V] (any strides), take None or int64 [n] rows of logits, row_ids int64
    [n], exclude None or sorted distinct int64 ids. Returns (tokens int64 [n], winning scores float64
    [n]). One program per sampled row, no float64 temporaries in memory; chunk_rows is ignored."""
    del chunk_rows  # the kernel holds one block of a row at a time
    tokens, best, _ = _draw(logits, take, row_ids, seed, step, temperature, exclude)
    return tokens, best


def gumbel_candidates_triton(logits: torch.Tensor, take: torch.Tensor | None, row_ids: torch.Tensor, seed: int,
                             step: int, temperature: float, exclude: torch.Tensor | None) -> torch.Tensor:
    """The number of tokens per row whose exact FP64 score decides the Triton draw (the screen's
    candidates, docs/sampling-screen.md), or V for a row on the exact path (float64 logits, temperature
    0, 1/T outside [2^-100, 2^100]). Arguments as ``gumbel_argmax_triton``; int64 [n]."""
    return _draw(logits, take, row_ids, seed, step, temperature, exclude)[2]


def screened(logits: torch.Tensor, temperature: float) -> bool:
    """Whether the draw takes the screened kernel: bf16 / fp16 / fp32 logits and a temperature whose
    float32 1/T is normal (not 0)."""
    return logits.dtype != torch.float64 and screen_scale_bits(temperature) is not None


def _draw(logits, take, row_ids, seed, step, temperature, exclude, prefilter=True):
    # prefilter=False: the screened kernel without its prefilter (every tile gets the cheap noise), for the
    # tests that compare the two (same tokens, same candidates).
    check_triton_device(logits, "gumbel_argmax")
    device = logits.device
    vocab = logits.shape[1]
    if vocab > MAX_VOCAB:
        raise ValueError(f"gumbel_argmax: backend='triton' supports V <= 2^30; got V = {vocab}")
    num_rows = row_ids.shape[0]
    tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    best = torch.empty(num_rows, dtype=torch.float64, device=device)
    if num_rows == 0:
        return tokens, best, torch.empty(0, dtype=torch.int64, device=device)
    row_ids = row_ids.to(device=device, dtype=torch.int64).contiguous()
    if take is not None:
        take = take.to(device=device, dtype=torch.int64).contiguous()
    if exclude is not None:
        excluded = torch.zeros(vocab, dtype=torch.int8, device=device)
        excluded[exclude.to(device)] = 1
    else:
        excluded = tokens  # never read (HAS_EXCLUDE=False)
    noise = temperature != 0
    # A row spans at most V // 2 + 1 Philox blocks (V + 1 slots when row_id * V is odd).
    block_pairs = min(launch_block(GPU_BLOCK_PAIRS, INTERPRETER_BLOCK_PAIRS),
                      triton.next_power_of_2(vocab // 2 + 1))
    options = launch_options(max(1, min(MAX_WARPS, block_pairs // PAIRS_PER_WARP)))
    arguments = (logits, row_ids if take is None else take, row_ids, excluded, float64_constants(device), tokens,
                 best)
    scalars = (logits.stride(0), logits.stride(1), vocab, seed & 0xFFFFFFFF, seed >> 32, step & 0xFFFFFFFF,
               double_bits(temperature))
    with on_device(logits):
        if screened(logits, temperature):
            counts = torch.empty(num_rows, dtype=torch.int64, device=device)
            _gumbel_argmax_screened_kernel[(num_rows,)](
                *arguments, counts, *scalars, screen_scale_bits(temperature),
                HAS_TAKE=take is not None, HAS_EXCLUDE=exclude is not None, DIVIDE=temperature != 1.0,
                BLOCK_P=block_pairs, MAX_TILES=max_tiles(vocab, block_pairs), PREFILTER=prefilter, **options)
        else:
            counts = torch.full((num_rows,), vocab, dtype=torch.int64, device=device)
            _gumbel_argmax_kernel[(num_rows,)](
                *arguments, *scalars,
                HAS_TAKE=take is not None, HAS_EXCLUDE=exclude is not None, NOISE=noise,
                DIVIDE=noise and temperature != 1.0, BLOCK_P=block_pairs, **options)
    return tokens, best, counts


def max_tiles(vocab: int, block_pairs: int) -> int:
    """The screened kernel's register slots for its tiles' largest upper bounds: a power of two at least
    the tile count of a row of V columns (at most V // 2 + 1 Philox pairs)."""
    return triton.next_power_of_2(triton.cdiv(vocab // 2 + 1, block_pairs))
