"""Triton backend of the fused γ step (``hybrid_step``), bit-identical to the reference: the twin of
``csrc/hybrid_rule.h``.

One program per row and three passes over it (docs/hybrid-step.md): the maximum of the read
log-scores, the exact fixed-point sum of the scaled ratios, then the weights and the Gumbel race
with the Gumbel-max kernel's pairing of columns and its winner rule.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gumbel import INTERPRETER_BLOCK_PAIRS, MAX_VOCAB, MAX_WARPS, row_winner, take_if_better
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
    stream_block,
    uniform53_of_words,
    widen,
)

__all__ = ["hybrid_step_triton", "interpreted"]

# The kernel holds more per pair than Gumbel-max's (the weight, its log and exp64 of the log-score
# besides the noise): on sm_90 256 pairs and 8 warps (1 pair per thread) compile to 92 registers
# without spills, where 2 pairs per thread need 128-159 and spill for fp32 input.
GPU_BLOCK_PAIRS = 256
PAIRS_PER_WARP = 32


@triton.jit(do_not_specialize=["mask_id", "key0", "key1", "step_lo"])
def _hybrid_step_kernel(
        LOG_SCORE, X, COEFFICIENTS, ROW_IDS, CONSTS, TOKENS, BEST,
        stride_row, stride_col, vocab, mask_id,
        key0: tl.int64, key1: tl.int64, step_lo: tl.int64,
        BLOCK_P: tl.constexpr):
    # Program i steps row i (the fused form, docs/hybrid-step.md): pass 1 the maximum m of the read entries,
    # pass 2 the fixed-point sum of r' = exp64(s - m), pass 3 the weights and the Gumbel race. "Read"
    # columns are the real tokens other than x. The log-scores are loaded three times in their own dtype
    # and widened in registers; nothing of the row is kept in memory between the passes.
    SENTINEL: tl.constexpr = 2147483647
    BLOCK_C: tl.constexpr = 2 * BLOCK_P  # columns per iteration of passes 1 and 2
    i = tl.program_id(0)
    row_ptr = LOG_SCORE + i.to(tl.int64) * stride_row
    x = tl.load(X + i)
    row_id = tl.load(ROW_IDS + i)
    coefficients = COEFFICIENTS + i.to(tl.int64) * 6
    c1 = tl.load(coefficients + 0)
    c2 = tl.load(coefficients + 1)
    c3 = tl.load(coefficients + 2)
    c4 = tl.load(coefficients + 3)
    c5 = tl.load(coefficients + 4)
    c6 = tl.load(coefficients + 5)
    l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, ln2_hi, ln2_lo = load_log64_constants(CONSTS)
    (e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13,
     inv_ln2, exp_min) = load_exp64_constants(CONSTS)
    hi_scale = tl.load(CONSTS + 29)
    lo_scale = tl.load(CONSTS + 30)
    hi_unit = tl.load(CONSTS + 31)
    lo_unit = tl.load(CONSTS + 32)
    smallest_weight = tl.load(CONSTS + 33)

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
        ratio = exp64(s - m, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, inv_ln2, ln2_hi,
                       ln2_lo, exp_min)  # in [0, 1]; 0 off the read columns (exp64(-inf))
        scaled = ratio * hi_scale
        high = scaled.to(tl.int64)  # truncation = floor for r' >= 0; exact
        low = ((scaled - high.to(tl.float64)) * lo_scale).to(tl.int64)
        high_sum += high
        low_sum += low
    others = (tl.sum(high_sum, axis=0).to(tl.float64) * hi_unit
              + tl.sum(low_sum, axis=0).to(tl.float64) * lo_unit)
    u = exp64(-m, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, inv_ln2, ln2_hi, ln2_lo,
               exp_min)
    total = others + c3 * u
    shift = c2 * total
    current = c4 * (c5 * u - c6 * total)  # the weight of y = x

    # Pass 3: the race, walking the row's Philox blocks as _gumbel_argmax_kernel does (lane j owns block
    # (row_id * V >> 1) + j: columns 2j - parity and 2j - parity + 1), so the noise is that kernel's.
    k0 = key0.to(tl.uint32)
    k1 = key1.to(tl.uint32)
    step_word = step_lo.to(tl.uint32)
    element_base = row_id * vocab
    parity = (element_base & 1).to(tl.int32)
    pair_base = element_base >> 1
    num_pairs = (vocab + parity + 1) // 2
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
            ratio = exp64(s - m, e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, inv_ln2,
                           ln2_hi, ln2_lo, exp_min)
            weight = (ratio - shift) * c1
            weight = tl.where(col == mask_id, 0.0, weight)
            weight = tl.where(col == x, current, weight)  # after MASK: x = MASK keeps its own weight
            positive = weight >= smallest_weight  # subnormal, <= 0 (and NaN) weights count as 0
            log_weight = log64(tl.where(positive, weight, 1.0), l0, l1, l2, l3, l4, l5, l6, l7, l8, l9,
                                l10, ln2_hi, ln2_lo)
            score = tl.where(positive, log_weight, float("-inf"))
            score = score + gumbel_noise(uniform53_of_words(word_a, word_b), l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10,
                                    ln2_hi, ln2_lo)
            best_val, best_idx = take_if_better(best_val, best_idx, score, col, valid, SENTINEL)

    token, best = row_winner(best_val, best_idx, SENTINEL)  # no NaN score here: bad rows are flagged
    best = tl.where(bad, float("nan"), best)
    tl.store(TOKENS + i, token.to(tl.int64))
    tl.store(BEST + i, best.to(tl.float64))


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
    check_triton_device(log_score, "hybrid_step")
    device = log_score.device
    num_rows, vocab = log_score.shape
    if vocab > MAX_VOCAB:
        raise ValueError(f"hybrid_step: backend='triton' supports V <= 2^30; got V = {vocab}")
    tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    best = torch.empty(num_rows, dtype=torch.float64, device=device)
    if num_rows == 0:
        return tokens, best
    x = x.to(device=device, dtype=torch.int64).contiguous()
    coefficients = coefficients.to(device=device, dtype=torch.float64).contiguous()
    row_ids = row_ids.to(device=device, dtype=torch.int64).contiguous()
    # Pass 3 spans at most V // 2 + 1 Philox blocks; passes 1 and 2 take 2 * block_pairs columns at a time.
    block_pairs = min(launch_block(GPU_BLOCK_PAIRS, INTERPRETER_BLOCK_PAIRS),
                      triton.next_power_of_2(vocab // 2 + 1))
    with on_device(log_score):
        _hybrid_step_kernel[(num_rows,)](
            log_score, x, coefficients, row_ids, float64_constants(device), tokens, best,
            log_score.stride(0), log_score.stride(1), vocab, mask_id,
            seed & 0xFFFFFFFF, seed >> 32, step & 0xFFFFFFFF, BLOCK_P=block_pairs,
            **launch_options(max(1, min(MAX_WARPS, block_pairs // PAIRS_PER_WARP))))
    return tokens, best
