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
    stream_block,
    uniform53_of_words,
)

__all__ = ["gumbel_argmax_triton", "interpreted", "row_winner", "take_if_better"]

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
    element_base = row_id * vocab
    parity = (element_base & 1).to(tl.int32)
    pair_base = element_base >> 1
    num_pairs = (vocab + parity + 1) // 2

    k0 = key0.to(tl.uint32)
    k1 = key1.to(tl.uint32)
    step_word = step_lo.to(tl.uint32)
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
        if LOGITS.dtype.element_ty == tl.float64:
            s_even = x_even
            s_odd = x_odd
        else:  # bf16 / fp16 / fp32 -> fp32 -> fp64: exact
            s_even = x_even.to(tl.float32).to(tl.float64)
            s_odd = x_odd.to(tl.float32).to(tl.float64)
        if DIVIDE:
            s_even = s_even / temperature
            s_odd = s_odd / temperature
        if NOISE:
            w0, w1, w2, w3 = stream_block(pair_base + j, k0, k1, 0, step_word)
            s_even = s_even + gumbel_noise(uniform53_of_words(w0, w1), c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10,
                                      ln2_hi, ln2_lo)
            s_odd = s_odd + gumbel_noise(uniform53_of_words(w2, w3), c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10,
                                    ln2_hi, ln2_lo)
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
    check_triton_device(logits, "gumbel_argmax")
    device = logits.device
    vocab = logits.shape[1]
    if vocab > MAX_VOCAB:
        raise ValueError(f"gumbel_argmax: backend='triton' supports V <= 2^30; got V = {vocab}")
    num_rows = row_ids.shape[0]
    tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    best = torch.empty(num_rows, dtype=torch.float64, device=device)
    if num_rows == 0:
        return tokens, best
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
    with on_device(logits):
        _gumbel_argmax_kernel[(num_rows,)](
            logits, row_ids if take is None else take, row_ids, excluded, float64_constants(device), tokens, best,
            logits.stride(0), logits.stride(1), vocab,
            seed & 0xFFFFFFFF, seed >> 32, step & 0xFFFFFFFF, double_bits(temperature),
            HAS_TAKE=take is not None, HAS_EXCLUDE=exclude is not None, NOISE=noise,
            DIVIDE=noise and temperature != 1.0, BLOCK_P=block_pairs,
            **launch_options(max(1, min(MAX_WARPS, block_pairs // PAIRS_PER_WARP))))
    return tokens, best
