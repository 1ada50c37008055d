"""Triton attention over an ``IntervalMask``, forward and backward (docs/attention.md, paper App. B.3).

Flash-attention-2 style kernels that walk a FlexAttention-format tile map
(:class:`hdlm_kernels.masks.MaskTiles`) instead of the dense key range:

* forward: one program per (query tile, batch·head); online softmax in base 2 over the *full* key tiles
  (no element mask) and then the *partial* ones (element mask from the rows' two intervals); writes the
  output and the natural-log log-sum-exp ``[B, H, Q]`` (``-inf`` for rows without keys, whose output is 0);
* backward, dK/dV: one program per (key tile, batch·head) over the query tiles of the transposed map;
* backward, dQ: one program per (query tile, batch·head) over the key tiles of a map like the forward's,
  on a tile of its own (``backward_dq_config``; deterministic: no atomics), or, with
  ``deterministic=False``, accumulated by the dK/dV programs with float32 atomics (one matmul fewer
  per tile pair; the summation order then varies run to run).

The reference twin is :func:`hdlm_kernels.attention.reference.attention_ref` (and
:func:`~hdlm_kernels.attention.reference.attention_lse_ref` for the log-sum-exp).

On the CPU the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before this
module is imported), in float32 and float16: the interpreter computes bfloat16 dot products wrongly, so
bfloat16 there is refused rather than answered wrongly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .._triton_device import built_for_interpreter, check_triton_device
from ..masks.interval_mask import IntervalMask

__all__ = ["attention_triton", "attention_forward_triton", "attention_split_kv_triton", "split_count",
           "choose_splits", "forward_config", "backward_config", "window_class", "dispatchable_launches",
           "backward_dq_config",
           "interpreted", "check_triton_inputs", "backward_delta_triton", "tma_eligible", "tma_device"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------

@triton.jit
def _attends(keys, prefix_end, window_start, window_end):
    # docs/conventions.md (masks): key k is visible to a row iff k < prefix_end or window_start <= k < window_end.
    return (keys < prefix_end) | ((keys >= window_start) & (keys < window_end))


@triton.jit
def _load_rows(X, b, h, start, stride_b, stride_s, stride_h, num_rows, dim,
               BLOCK: tl.constexpr, BLOCK_DIM: tl.constexpr, TMA: tl.constexpr):
    # Rows [start, start + BLOCK) of head h of sequence b of a [B, S, H, D] tensor as a [BLOCK, BLOCK_DIM]
    # tile, zero past the last row and past D. With TMA, X is a tensor descriptor over the whole
    # [B, S, H, D] tensor with block [1, BLOCK, 1, BLOCK_DIM]: the copy engine writes the tile into shared
    # memory (zero-filled out of bounds) and the dot products read it there; otherwise X is a pointer.
    if TMA:
        return X.load([b, start, h, 0]).reshape([BLOCK, BLOCK_DIM])
    else:
        offs = start + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_DIM)
        return tl.load(X + b * stride_b + h * stride_h + offs[:, None] * stride_s + offs_d[None, :],
                       mask=(offs[:, None] < num_rows) & (offs_d[None, :] < dim), other=0.0)


@triton.jit
def _forward_tile(acc, m_i, l_i, q, K, V, b, h, start_n, prefix_end, window_start, window_end,
                  qk_scale, num_keys, head_dim, head_dim_v, stride_kb, stride_ks, stride_kh,
                  stride_vb, stride_vs, stride_vh,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K, b, h, start_n, stride_kb, stride_ks, stride_kh, num_keys, head_dim, BLOCK_N, BLOCK_D, TMA)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        # Keys past num_keys are never attended: every interval end is <= num_keys.
        allowed = _attends(offs_n[None, :], prefix_end[:, None], window_start[:, None], window_end[:, None])
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; shifting by 0 instead keeps exp2 free of NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(V, b, h, start_n, stride_vb, stride_vs, stride_vh, num_keys, head_dim_v, BLOCK_N, BLOCK_DV,
                   TMA)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _store_output(O, LSE, out, lse, b, h, bh, offs_m, offs_dv, row_ok, stride_ob, stride_os, stride_oh, num_rows,
                  head_dim_v):
    # The final output [B, Q, H, Dv] in O's dtype and the log-sum-exp [B, H, Q] in float32.
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    tl.store(LSE + bh * num_rows + offs_m, lse, mask=row_ok)


@triton.jit
def _arrive_and_merge(O, LSE, O_PARTIAL, LSE_PARTIAL, ARRIVALS, out, lse, tile_m, b, h, bh, split, offs_m, offs_dv,
                      row_ok, stride_ob, stride_os, stride_oh, num_rows, head_dim_v, num_splits,
                      BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    # Split-KV with the merge fused (docs/attention.md, "Split-KV (flash-decoding)"): every split writes
    # its float32 partial (out [S, B·H, Q, Dv], lse [S, B·H, Q], contiguous) and arrives on the counter
    # of its (query tile, b·h); the split that arrives last merges all of them and writes the output.
    num_bh = tl.num_programs(1)
    tile_ok = row_ok[:, None] & (offs_dv[None, :] < head_dim_v)
    partial = O_PARTIAL + (bh * num_rows + offs_m[:, None]) * head_dim_v + offs_dv[None, :]
    split_stride = num_bh.to(tl.int64) * num_rows * head_dim_v
    tl.store(partial + split * split_stride, out, mask=tile_ok)
    partial_lse = LSE_PARTIAL + bh * num_rows + offs_m
    tl.store(partial_lse + split * num_bh * num_rows, lse, mask=row_ok)
    # Release: the barrier orders every thread's partial stores before the one atomic, whose release at
    # GPU scope publishes them to the program that acquires the counter's last value.
    tl.debug_barrier()
    counter = ARRIVALS + bh * tl.num_programs(0) + tile_m
    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if arrived == num_splits - 1:
        # Last to arrive (in any order of arrival): merge in split order 0..S-1, so the result does not
        # depend on which split came last. Online log-sum-exp over the splits: lse = log Σ_s exp(lse_s),
        # out = Σ_s exp(lse_s - lse) out_s; a split without keys (lse_s = -inf) weighs 0, a row without
        # any key keeps out = 0 and lse = -inf. The loads skip L1 (.cg): each partial is read once.
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for s in range(num_splits):
            lse_s = tl.load(partial_lse + s * num_bh * num_rows, mask=row_ok, other=float("-inf"),
                            cache_modifier=".cg")
            out_s = tl.load(partial + s * split_stride, mask=tile_ok, other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m, lse_s)
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_shift)
            weight = tl.exp(lse_s - m_shift)
            total = total * alpha + weight
            acc = acc * alpha[:, None] + weight[:, None] * out_s
            m = m_new
        has_key = total > 0.0
        merged = acc / tl.where(has_key, total, 1.0)[:, None]
        merged_lse = tl.where(has_key, m + tl.log(tl.where(has_key, total, 1.0)), float("-inf"))
        _store_output(O, LSE, merged, merged_lse, b, h, bh, offs_m, offs_dv, row_ok, stride_ob, stride_os, stride_oh,
                      num_rows, head_dim_v)
        # Every split has arrived, so nothing else touches the counter in this launch: back to 0 for the
        # next launch on the stream, which starts after this one ends (no memset per call).
        tl.store(counter, 0)


@triton.jit(do_not_specialize=["num_splits"])
def _attention_forward_kernel(
        Q, K, V, O, LSE, O_PARTIAL, LSE_PARTIAL, ARRIVALS, PREFIX_END, WINDOW_START, WINDOW_END,
        FULL_COUNT, FULL_INDEX, PARTIAL_COUNT, PARTIAL_INDEX,
        sm_scale,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
        stride_mask_b, stride_count_b, stride_index_b, stride_index_t,
        num_heads, num_rows, num_keys, head_dim, head_dim_v, num_splits,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        DOT_PRECISION: tl.constexpr, TMA: tl.constexpr, SPLIT_KV: tl.constexpr):
    # With SPLIT_KV (split-KV, flash-decoding) and num_splits > 1, program `split` takes every
    # num_splits-th tile of each list, and the last split of each (query tile, b·h) to finish merges the
    # partials in the same launch (_arrive_and_merge). num_splits is a runtime argument: one compiled
    # kernel serves every split count (not specialized: 1 would otherwise compile apart); with 1 the
    # program writes the output directly. Without SPLIT_KV (training) the merge is not compiled in and
    # O_PARTIAL, LSE_PARTIAL and ARRIVALS are unused.
    tile_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // num_heads
    h = bh % num_heads
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < num_rows

    q = _load_rows(Q, b, h, tile_m * BLOCK_M, stride_qb, stride_qs, stride_qh, num_rows, head_dim, BLOCK_M,
                   BLOCK_D, TMA)
    mask_rows = b * stride_mask_b + offs_m
    prefix_end = tl.load(PREFIX_END + mask_rows, mask=row_ok, other=0)
    window_start = tl.load(WINDOW_START + mask_rows, mask=row_ok, other=0)
    window_end = tl.load(WINDOW_END + mask_rows, mask=row_ok, other=0)

    qk_scale = sm_scale * 1.4426950408889634  # base-2 softmax: exp(x) = exp2(x · log2 e)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    full_index = FULL_INDEX + b * stride_index_b + tile_m * stride_index_t
    for j in range(split, tl.load(FULL_COUNT + b * stride_count_b + tile_m), num_splits):
        start_n = tl.load(full_index + j) * BLOCK_N
        acc, m_i, l_i = _forward_tile(acc, m_i, l_i, q, K, V, b, h, start_n, prefix_end, window_start,
                                      window_end, qk_scale, num_keys, head_dim, head_dim_v, stride_kb, stride_ks,
                                      stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_N, BLOCK_D, BLOCK_DV,
                                      False, DOT_PRECISION, TMA)
    partial_index = PARTIAL_INDEX + b * stride_index_b + tile_m * stride_index_t
    for j in range(split, tl.load(PARTIAL_COUNT + b * stride_count_b + tile_m), num_splits):
        start_n = tl.load(partial_index + j) * BLOCK_N
        acc, m_i, l_i = _forward_tile(acc, m_i, l_i, q, K, V, b, h, start_n, prefix_end, window_start,
                                      window_end, qk_scale, num_keys, head_dim, head_dim_v, stride_kb, stride_ks,
                                      stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_N, BLOCK_D, BLOCK_DV,
                                      True, DOT_PRECISION, TMA)

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]  # rows without keys: acc = 0, so out = 0
    lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    if SPLIT_KV:
        if num_splits > 1:
            _arrive_and_merge(O, LSE, O_PARTIAL, LSE_PARTIAL, ARRIVALS, out, lse, tile_m, b, h, bh, split, offs_m,
                              offs_dv, row_ok, stride_ob, stride_os, stride_oh, num_rows, head_dim_v, num_splits,
                              BLOCK_M, BLOCK_DV)
        else:
            _store_output(O, LSE, out, lse, b, h, bh, offs_m, offs_dv, row_ok, stride_ob, stride_os, stride_oh,
                          num_rows, head_dim_v)
    else:
        _store_output(O, LSE, out, lse, b, h, bh, offs_m, offs_dv, row_ok, stride_ob, stride_os, stride_oh, num_rows,
                      head_dim_v)


@triton.jit
def _backward_delta_kernel(O, DO, DELTA, stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
                           num_heads, num_rows, head_dim_v, BLOCK_Q: tl.constexpr, BLOCK_DV: tl.constexpr):
    # The backward's row term Δ_i = Σ_d O_id dO_id (= Σ_j P_ij dP_ij), [B, H, Q] float32 like the lse:
    # O and dO are read once in their own dtype and multiplied in float32 in registers, with no float32
    # copies of them in memory.
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_q < num_rows
    tile_ok = row_ok[:, None] & (offs_dv[None, :] < head_dim_v)
    out = tl.load(O + b * stride_ob + h * stride_oh + offs_q[:, None] * stride_os + offs_dv[None, :], mask=tile_ok,
                  other=0.0)
    dout = tl.load(DO + b * stride_dob + h * stride_doh + offs_q[:, None] * stride_dos + offs_dv[None, :],
                   mask=tile_ok, other=0.0)
    delta = tl.sum(out.to(tl.float32) * dout.to(tl.float32), 1)
    tl.store(DELTA + bh * num_rows + offs_q, delta, mask=row_ok)


@triton.jit
def _backward_kv_tile(dk, dv, k, v, Q, DO, b, h, dq_base, lse_base, delta_base, mask_rows_base,
                      PREFIX_END, WINDOW_START, WINDOW_END, start_m, offs_n,
                      qk_scale, sm_scale, num_rows, head_dim, head_dim_v, stride_qb, stride_qs, stride_qh,
                      stride_dob, stride_dos, stride_doh, stride_dqs,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                      MASKED: tl.constexpr, ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      TMA: tl.constexpr):
    # Scores are held transposed, [BLOCK_N, BLOCK_M], so dV += Pᵀ dO and dK += dSᵀ Q need no transpose.
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < num_rows
    q = _load_rows(Q, b, h, start_m, stride_qb, stride_qs, stride_qh, num_rows, head_dim, BLOCK_M, BLOCK_D, TMA)
    do = _load_rows(DO, b, h, start_m, stride_dob, stride_dos, stride_doh, num_rows, head_dim_v, BLOCK_M,
                    BLOCK_DV, TMA)
    # lse = -inf marks a row without keys; +inf makes all its probabilities exp2(-inf) = 0.
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    p_t = tl.math.exp2(s_t - lse[None, :])
    if MASKED:
        prefix_end = tl.load(PREFIX_END + mask_rows_base + offs_m, mask=row_ok, other=0)
        window_start = tl.load(WINDOW_START + mask_rows_base + offs_m, mask=row_ok, other=0)
        window_end = tl.load(WINDOW_END + mask_rows_base + offs_m, mask=row_ok, other=0)
        allowed = _attends(offs_n[:, None], prefix_end[None, :], window_start[None, :], window_end[None, :])
        p_t = tl.where(allowed, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION) * sm_scale
        tl.atomic_add(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], dq,
                      mask=row_ok[:, None] & (offs_d[None, :] < head_dim))
    return dk, dv


@triton.jit
def _attention_backward_kv_kernel(
        Q, K, V, DO, DQ, DK, DV, LSE, DELTA, PREFIX_END, WINDOW_START, WINDOW_END,
        FULL_COUNT, FULL_INDEX, PARTIAL_COUNT, PARTIAL_INDEX,
        sm_scale,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
        stride_dqb, stride_dqs, stride_dqh, stride_dkb, stride_dks, stride_dkh,
        stride_dvb, stride_dvs, stride_dvh,
        stride_mask_b, stride_count_b, stride_index_b, stride_index_t,
        num_heads, num_rows, num_keys, head_dim, head_dim_v,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    # Every program writes its whole dK/dV tile, zeros for keys no row attends: the buffers need no fill.
    tile_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_ok = offs_n < num_keys
    k = _load_rows(K, b, h, tile_n * BLOCK_N, stride_kb, stride_ks, stride_kh, num_keys, head_dim, BLOCK_N,
                   BLOCK_D, TMA)
    v = _load_rows(V, b, h, tile_n * BLOCK_N, stride_vb, stride_vs, stride_vh, num_keys, head_dim_v, BLOCK_N,
                   BLOCK_DV, TMA)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    dq_base = DQ + b * stride_dqb + h * stride_dqh
    lse_base = LSE + bh * num_rows
    delta_base = DELTA + bh * num_rows
    mask_rows_base = b * stride_mask_b
    qk_scale = sm_scale * 1.4426950408889634

    full_index = FULL_INDEX + b * stride_index_b + tile_n * stride_index_t
    for j in range(tl.load(FULL_COUNT + b * stride_count_b + tile_n)):
        start_m = tl.load(full_index + j) * BLOCK_M
        dk, dv = _backward_kv_tile(dk, dv, k, v, Q, DO, b, h, dq_base, lse_base, delta_base, mask_rows_base,
                                   PREFIX_END, WINDOW_START, WINDOW_END, start_m, offs_n, qk_scale, sm_scale,
                                   num_rows, head_dim, head_dim_v, stride_qb, stride_qs, stride_qh,
                                   stride_dob, stride_dos, stride_doh, stride_dqs,
                                   BLOCK_M, BLOCK_D, BLOCK_DV, False, ATOMIC_DQ, DOT_PRECISION, TMA)
    partial_index = PARTIAL_INDEX + b * stride_index_b + tile_n * stride_index_t
    for j in range(tl.load(PARTIAL_COUNT + b * stride_count_b + tile_n)):
        start_m = tl.load(partial_index + j) * BLOCK_M
        dk, dv = _backward_kv_tile(dk, dv, k, v, Q, DO, b, h, dq_base, lse_base, delta_base, mask_rows_base,
                                   PREFIX_END, WINDOW_START, WINDOW_END, start_m, offs_n, qk_scale, sm_scale,
                                   num_rows, head_dim, head_dim_v, stride_qb, stride_qs, stride_qh,
                                   stride_dob, stride_dos, stride_doh, stride_dqs,
                                   BLOCK_M, BLOCK_D, BLOCK_DV, True, ATOMIC_DQ, DOT_PRECISION, TMA)

    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None] & (offs_d[None, :] < head_dim))
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvs + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None] & (offs_dv[None, :] < head_dim_v))


@triton.jit
def _backward_q_tile(dq, q, do, lse, delta, K, V, b, h, start_n, prefix_end, window_start, window_end,
                     qk_scale, num_keys, head_dim, head_dim_v, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K, b, h, start_n, stride_kb, stride_ks, stride_kh, num_keys, head_dim, BLOCK_N, BLOCK_D, TMA)
    v = _load_rows(V, b, h, start_n, stride_vb, stride_vs, stride_vh, num_keys, head_dim_v, BLOCK_N, BLOCK_DV,
                   TMA)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        allowed = _attends(offs_n[None, :], prefix_end[:, None], window_start[:, None], window_end[:, None])
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attention_backward_q_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, PREFIX_END, WINDOW_START, WINDOW_END,
        FULL_COUNT, FULL_INDEX, PARTIAL_COUNT, PARTIAL_INDEX,
        sm_scale,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
        stride_dqb, stride_dqs, stride_dqh,
        stride_mask_b, stride_count_b, stride_index_b, stride_index_t,
        num_heads, num_rows, num_keys, head_dim, head_dim_v,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        DOT_PRECISION: tl.constexpr, TMA: tl.constexpr):
    # Every program writes its whole dQ tile, zeros for rows without keys: the buffer needs no fill.
    tile_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < num_rows
    q = _load_rows(Q, b, h, tile_m * BLOCK_M, stride_qb, stride_qs, stride_qh, num_rows, head_dim, BLOCK_M,
                   BLOCK_D, TMA)
    do = _load_rows(DO, b, h, tile_m * BLOCK_M, stride_dob, stride_dos, stride_doh, num_rows, head_dim_v, BLOCK_M,
                    BLOCK_DV, TMA)
    lse = tl.load(LSE + bh * num_rows + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + bh * num_rows + offs_m, mask=row_ok, other=0.0)
    mask_rows = b * stride_mask_b + offs_m
    prefix_end = tl.load(PREFIX_END + mask_rows, mask=row_ok, other=0)
    window_start = tl.load(WINDOW_START + mask_rows, mask=row_ok, other=0)
    window_end = tl.load(WINDOW_END + mask_rows, mask=row_ok, other=0)

    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_index = FULL_INDEX + b * stride_index_b + tile_m * stride_index_t
    for j in range(tl.load(FULL_COUNT + b * stride_count_b + tile_m)):
        start_n = tl.load(full_index + j) * BLOCK_N
        dq = _backward_q_tile(dq, q, do, lse, delta, K, V, b, h, start_n, prefix_end, window_start,
                              window_end, qk_scale, num_keys, head_dim, head_dim_v, stride_kb, stride_ks,
                              stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_N, BLOCK_D, BLOCK_DV, False,
                              DOT_PRECISION, TMA)
    partial_index = PARTIAL_INDEX + b * stride_index_b + tile_m * stride_index_t
    for j in range(tl.load(PARTIAL_COUNT + b * stride_count_b + tile_m)):
        start_n = tl.load(partial_index + j) * BLOCK_N
        dq = _backward_q_tile(dq, q, do, lse, delta, K, V, b, h, start_n, prefix_end, window_start,
                              window_end, qk_scale, num_keys, head_dim, head_dim_v, stride_kb, stride_ks,
                              stride_kh, stride_vb, stride_vs, stride_vh, BLOCK_N, BLOCK_D, BLOCK_DV, True,
                              DOT_PRECISION, TMA)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < head_dim))


# --------------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------------

def interpreted() -> bool:
    """Whether the kernels of this module were built for the Triton interpreter (CPU tensors)."""
    return built_for_interpreter(_attention_forward_kernel)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile shapes and launch parameters of one pass. The tile map is built for ``(block_m, block_n)``,
    so these are fixed per problem rather than autotuned."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


# Interpreter: per-program overhead dominates, and tests want several tiles per problem.
_INTERPRETER_CONFIG = LaunchConfig(32, 32)


DECODE_WINDOW_CLASSES = (16, 32)
"""Query-row counts of the decode tiles: a KV-cached call with at most 32 rows (the window, plus the
re-encoded rows) takes a tile of 16 or 32 rows instead of the training tile of 128, most of which
would be padding."""


def window_class(rows: int | None) -> int | None:
    """The decode tile height for a call with ``rows`` query rows (None: the training tile)."""
    if rows is None:
        return None
    return next((c for c in DECODE_WINDOW_CLASSES if rows <= c), None)


def forward_config(head_dim: int, dtype: torch.dtype, on_gpu: bool = True, rows: int | None = None
                   ) -> LaunchConfig:
    """The forward pass's configuration for a head dim, dtype and (for split-KV decoding) number of
    query rows, on the GPU; the interpreter's when not ``on_gpu``."""
    if not on_gpu:
        return _INTERPRETER_CONFIG
    block_m = window_class(rows)
    if block_m is not None:
        return _decode_config(block_m, head_dim, dtype)
    if head_dim <= 64:
        return LaunchConfig(128, 64, num_warps=4, num_stages=3)
    if dtype == torch.float32 and head_dim > 128:
        # Two stages of 64-key float32 tiles need about 290 KB of shared memory (sm_90 allows 227 KB).
        return LaunchConfig(64, 32, num_warps=8, num_stages=2)
    return LaunchConfig(128, 64, num_warps=8, num_stages=2)


def _decode_config(block_m: int, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    if dtype == torch.float32 and head_dim > 128:
        return LaunchConfig(block_m, 32, num_warps=4, num_stages=2)
    # A 16-row tile at D <= 64 spilled 24 bytes with 3 stages (the sm_90 gate); 2 stages keep it at 64
    # registers without spills.
    stages = 2 if head_dim > 128 or (block_m == 16 and head_dim <= 64) else 3
    return LaunchConfig(block_m, 64, num_warps=4, num_stages=stages)


def backward_config(head_dim: int, dtype: torch.dtype, on_gpu: bool = True) -> LaunchConfig:
    """The backward dK/dV pass's configuration (and the dQ pass's where :func:`backward_dq_config`
    returns the same tile: then both passes walk one tile map)."""
    if not on_gpu:
        return _INTERPRETER_CONFIG
    if head_dim <= 64:
        return LaunchConfig(64, 64, num_warps=4, num_stages=2)
    if dtype == torch.float32 and head_dim > 128:
        return LaunchConfig(32, 32, num_warps=8, num_stages=1)
    # 32 query rows per inner tile keep the dK/dV pass at D = 96/128 under 180 registers without
    # spilling (64 rows and one stage reached 255 registers and spilled); two stages overlap the loads.
    return LaunchConfig(32, 64, num_warps=8, num_stages=2)


def backward_dq_config(head_dim: int, dtype: torch.dtype, on_gpu: bool = True) -> LaunchConfig:
    """The deterministic backward's dQ pass: its own tile, with its own tile map, where the dK/dV
    pass's tile would keep its products off wgmma."""
    if not on_gpu or head_dim <= 64 or dtype == torch.float32:
        return backward_config(head_dim, dtype, on_gpu)
    # The dK/dV pass holds scores transposed, [keys, rows], so its products have M = 64 keys; the dQ
    # pass's have M = query rows, and wgmma needs 64 rows per warp group: 32-row tiles took mma.sync.
    # By the sm_90 gate: 64 x 64 in one warp group with two stages keeps D = 96/128 spill-free at 219
    # registers and 2 CTAs per SM (8 warps: 188 registers, 1 CTA; three stages: 1 CTA by shared memory).
    if head_dim <= 128:
        return LaunchConfig(64, 64, num_warps=4, num_stages=2)
    # D = 256: 64 x 64 spilled (a 528-byte stack with one stage); 32 keys per tile stay in 250 registers.
    return LaunchConfig(64, 32, num_warps=8, num_stages=2)


# --------------------------------------------------------------------------------------------------
# opt-in autotuning (HDLM_KERNELS_AUTOTUNE=1)
# --------------------------------------------------------------------------------------------------

AUTOTUNE_ENV = "HDLM_KERNELS_AUTOTUNE"
AUTOTUNE_WARPS = (4, 8)
AUTOTUNE_STAGES = (1, 2, 3)


def autotune_enabled() -> bool:
    """Whether launches on a GPU time their candidates first (``HDLM_KERNELS_AUTOTUNE=1``, read per call)."""
    return os.environ.get(AUTOTUNE_ENV) == "1"


def shared_memory_estimate(block_m: int, block_n: int, block_d: int, block_dv: int, element_size: int,
                           stages: int) -> int:
    """Bytes of shared memory a pass pipelines: ``stages`` buffers of a K and a V tile plus the query
    tile (the layout conversions the compiler adds are left out: the gate measures the real figure)."""
    return max(stages, 1) * block_n * (block_d + block_dv) * element_size + block_m * block_d * element_size


def prune_autotune_configs(configs, named_args, **kwargs):
    """Triton's ``early_config_prune``: keep the candidates whose shared memory fits the limit the sm_90
    gate enforces (``_kernel_launch.SMEM_PER_BLOCK``); the tiles are fixed by the tile map, so only warps
    and stages vary. Falls back to the smallest pipeline when none fits."""
    from .._kernel_launch import SMEM_PER_BLOCK

    values = {**named_args, **kwargs}
    query = values["Q"]
    element_size = (query.base if isinstance(query, TensorDescriptor) else query).element_size()
    fitting = [c for c in configs
               if shared_memory_estimate(values["BLOCK_M"], values["BLOCK_N"], values["BLOCK_D"], values["BLOCK_DV"],
                                         element_size, c.num_stages) <= SMEM_PER_BLOCK]
    return fitting or [min(configs, key=lambda c: (c.num_stages, c.num_warps))]


_TUNED: dict = {}


def _tuned(kernel, reset_to_zero: tuple[str, ...] = ()):
    """``kernel`` wrapped in ``triton.autotune`` over warps x stages, keyed on the head dims and the tile
    (window class) and, as Triton does for every tensor argument, the dtypes."""
    if kernel not in _TUNED:
        configs = [triton.Config({}, num_warps=w, num_stages=s) for w in AUTOTUNE_WARPS for s in AUTOTUNE_STAGES]
        _TUNED[kernel] = triton.autotune(configs, key=["head_dim", "head_dim_v", "BLOCK_M", "BLOCK_N"],
                                         prune_configs_by={"early_config_prune": prune_autotune_configs},
                                         reset_to_zero=list(reset_to_zero) or None)(kernel)
    return _TUNED[kernel]


def _launch(kernel, grid, args: tuple, constexprs: dict, config: LaunchConfig, on_gpu: bool,
            reset_to_zero: tuple[str, ...] = ()) -> None:
    """Launch with the configuration the tables chose, or, opted in on a GPU, the fastest candidate."""
    if on_gpu and autotune_enabled():
        _tuned(kernel, reset_to_zero)[grid](*args, **constexprs)
    else:
        kernel[grid](*args, **constexprs, num_warps=config.num_warps, num_stages=config.num_stages)


def _block_dim(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))  # tl.dot needs every dimension >= 16


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs must not be rounded to tf32 by the tensor cores: the contract is fp32 accuracy.
    return "ieee" if dtype == torch.float32 else "tf32"


def check_triton_inputs(q: torch.Tensor, context: str = "attention") -> None:
    """Raise a clear error when these tensors cannot run on the Triton backend here."""
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{context}: backend='triton' takes float16, bfloat16 or float32 tensors, got {q.dtype}")
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"{context}: backend='triton' supports head dims up to {_MAX_HEAD_DIM}, got "
                         f"{q.shape[-1]}")
    check_triton_device(q, context, interpreted())
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        raise TypeError(f"{context}: backend='triton' under the Triton interpreter cannot take bfloat16 (the "
                        "interpreter computes bfloat16 dot products wrongly); use float16 or float32 on the "
                        "CPU, or bfloat16 on a GPU")


def _strides_bsh(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _head_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels index [B, S, H] by stride and the head dim as contiguous.
    return t if t.stride(-1) == 1 else t.contiguous()


def _map_strides(mask: IntervalMask, tiles) -> tuple[int, int, int, int]:
    # A shared [1, Q] mask (and its tile map) is read by every batch entry: batch stride 0.
    shared = mask.batch == 1
    return (0 if shared else mask.prefix_end.stride(0),
            0 if shared else tiles.kv_count.stride(0),
            0 if shared else tiles.kv_index.stride(0),
            tiles.kv_index.stride(1))


# --------------------------------------------------------------------------------------------------
# TMA: tensor descriptors for the tiles the passes load
# --------------------------------------------------------------------------------------------------

TMA_ALIGNMENT = 16
"""Bytes to which a TMA descriptor's base address and every stride but the last must be aligned."""

TMA_DTYPES = (torch.float16, torch.bfloat16)
"""Dtypes whose tiles the passes load through TMA. float32 tiles feed IEEE-precision dot products on the
FMA units from registers, where staging them in shared memory only adds a round trip (the sm_90 gate
measured stack frames of 4.5 to 11 KB on the float32 D = 128 passes with descriptors, against at most
2.8 KB with pointer loads), so float32 loads through pointers."""

_TMA_CAPABLE: dict[int, bool] = {}


def tma_device(device: torch.device) -> bool:
    """Whether loads on ``device`` may go through tensor descriptors: a GPU of compute capability 9.0 or
    later (the copy engine TMA), or the interpreter on the CPU, which runs the same descriptor loads so
    the tests check the code path the GPU runs."""
    if device.type != "cuda":
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _TMA_CAPABLE:
        _TMA_CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _TMA_CAPABLE[index]


def tma_eligible(*tensors: torch.Tensor) -> bool:
    """Whether every ``[B, S, H, D]`` tensor can be described for TMA: a non-empty tensor with a
    contiguous last dim and its base address and other strides multiples of 16 bytes (e.g. a head dim
    of 20 in float16, 40-byte rows, cannot; the pass then loads through pointers: same kernel,
    ``TMA=False``)."""
    for t in tensors:
        size = t.element_size()
        if (t.numel() == 0 or t.stride(-1) != 1 or t.data_ptr() % TMA_ALIGNMENT
                or any(stride * size % TMA_ALIGNMENT for stride in t.stride()[:-1])):
            return False
    return True


def _use_tma(*tensors: torch.Tensor) -> bool:
    # The dispatch rule (docs/attention.md, "Hopper path"): descriptors for 16-bit tiles on a device with
    # TMA when the layout allows; otherwise the same kernels with pointer loads.
    return tensors[0].dtype in TMA_DTYPES and tma_device(tensors[0].device) and tma_eligible(*tensors)


def _tile_operand(t: torch.Tensor, block_rows: int, block_dim: int, tma: bool):
    """What a pass takes for a tensor it loads by tiles: a descriptor with block ``[1, block_rows, 1,
    block_dim]`` (out-of-bounds rows and head dims read as zeros) when ``tma``, else the tensor."""
    if not tma:
        return t
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, block_rows, 1, block_dim])


# --------------------------------------------------------------------------------------------------
# forward / backward drivers
# --------------------------------------------------------------------------------------------------

def _forward(q, k, v, mask: IntervalMask, scale: float, num_splits: int = 1, decoding: bool = False):
    B, Q, H, D = q.shape
    K, Dv = k.shape[1], v.shape[3]
    out = torch.empty((B, Q, H, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Q), dtype=torch.float32, device=q.device)
    if Q == 0:
        return out, lse
    if K == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    config = forward_config(D, q.dtype, q.device.type == "cuda", Q if decoding else None)
    tiles = mask.tiles(config.block_m, config.block_n)
    stride_mask_b, stride_count_b, stride_index_b, stride_index_t = _map_strides(mask, tiles)
    grid = (tiles.num_q_tiles, B * H, num_splits)
    block_d, block_dv = _block_dim(D), _block_dim(Dv)
    tma = _use_tma(q, k, v)
    if num_splits > 1:
        # Float32 partials of every split, merged in the launch by the last split to finish.
        out_partial = torch.empty((num_splits, B * H, Q, Dv), dtype=torch.float32, device=q.device)
        lse_partial = torch.empty((num_splits, B * H, Q), dtype=torch.float32, device=q.device)
        arrivals = _arrival_counters(q.device, tiles.num_q_tiles * B * H)
    else:
        # Not read with one split; tensors of the same dtypes keep one compiled kernel for every count.
        out_partial, lse_partial, arrivals = lse, lse, tiles.kv_count
    _launch(_attention_forward_kernel, grid, (
        _tile_operand(q, config.block_m, block_d, tma), _tile_operand(k, config.block_n, block_d, tma),
        _tile_operand(v, config.block_n, block_dv, tma), out, lse, out_partial, lse_partial, arrivals,
        mask.prefix_end, mask.window_start, mask.window_end,
        tiles.full_kv_count, tiles.full_kv_index, tiles.kv_count, tiles.kv_index,
        scale, *_strides_bsh(q), *_strides_bsh(k), *_strides_bsh(v), *_strides_bsh(out),
        stride_mask_b, stride_count_b, stride_index_b, stride_index_t,
        H, Q, K, D, Dv, num_splits),
        dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
             DOT_PRECISION=_dot_precision(q.dtype), TMA=tma, SPLIT_KV=decoding), config, q.device.type == "cuda")
    return out, lse


_ARRIVALS: dict[tuple[str, int], torch.Tensor] = {}
_RETIRED_ARRIVALS: list[torch.Tensor] = []


def _arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least ``count`` int32 arrival counters of a split-KV launch (one per query tile and batch·head),
    all zero: one buffer per device and stream, zeroed once when allocated (or grown) and restored to
    zero by each launch's last splits, so a call costs no memset. Kept per stream because two launches
    sharing counters must not overlap: on one stream each starts after the previous one ended."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (str(device), stream)
    counters = _ARRIVALS.get(key)
    if counters is None or counters.numel() < count:
        if counters is not None:
            # Kept, not freed: a captured CUDA graph may still launch on it (its replays restore it to
            # zero too). Sizes double, so the retired buffers hold fewer counters than the current one.
            _RETIRED_ARRIVALS.append(counters)
        counters = torch.zeros(triton.next_power_of_2(count), dtype=torch.int32, device=device)
        _ARRIVALS[key] = counters
    return counters


def choose_splits(programs: int, key_tiles: int, multiprocessors: int) -> int:
    """Split-KV count: enough programs (``programs`` per split) to fill ``multiprocessors`` SMs about
    twice (264 on a 132-SM H200), at most one split per key tile and at most 16."""
    if programs >= multiprocessors:
        return 1
    return max(1, min(triton.cdiv(2 * multiprocessors, programs), key_tiles, 16))


_MULTIPROCESSORS: dict[int, int] = {}


def _multiprocessors(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _MULTIPROCESSORS:
        _MULTIPROCESSORS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _MULTIPROCESSORS[index]


def split_count(q: torch.Tensor, mask: IntervalMask, key_length: int) -> int:
    """Number of key splits for a forward-only call on q's GPU (:func:`choose_splits` with the decode
    tile of q's row count); 1 elsewhere."""
    if q.device.type != "cuda":
        return 1
    config = forward_config(q.shape[-1], q.dtype, rows=q.shape[1])
    programs = triton.cdiv(q.shape[1], config.block_m) * q.shape[0] * q.shape[2]
    return choose_splits(programs, triton.cdiv(key_length, config.block_n), _multiprocessors(q.device))


def attention_split_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: IntervalMask,
                              scale: float | None = None, num_splits: int | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward-only attention with the key tiles split over ``num_splits`` programs per query tile
    (flash-decoding), for calls with few query rows such as KV-cached decoding.

    Args: as :func:`attention_forward_triton`; ``num_splits`` None chooses :func:`split_count`.

    Returns:
        ``(out, lse)`` as :func:`attention_forward_triton`; not differentiable.
    """
    from .reference import check_attention_inputs

    scale = check_attention_inputs(q, k, v, mask, scale, context="attention_split_kv_triton")
    check_triton_inputs(q, context="attention_split_kv_triton")
    if num_splits is None:
        num_splits = split_count(q, mask, k.shape[1])
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"attention_split_kv_triton: num_splits must be an int >= 1, got {num_splits!r}")
    q, k, v = _head_contiguous(q), _head_contiguous(k), _head_contiguous(v)
    with torch.no_grad():
        return _forward(q, k, v, mask, scale, num_splits, decoding=True)


def delta_block_q(head_dim_v: int) -> int:
    """Query rows per program of the fused delta preprocess: about 4096 elements of O and of dO each."""
    return max(16, min(64, 4096 // _block_dim(head_dim_v)))


_DELTA_WARPS = 4


def _backward_delta(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    B, Q, H, Dv = out.shape
    delta = torch.empty((B, H, Q), dtype=torch.float32, device=out.device)
    if delta.numel() == 0:
        return delta
    if Dv == 0:
        return delta.zero_()
    block_q = delta_block_q(Dv)
    _backward_delta_kernel[(triton.cdiv(Q, block_q), B * H)](
        out, dout, delta, *_strides_bsh(out), *_strides_bsh(dout), H, Q, Dv,
        BLOCK_Q=block_q, BLOCK_DV=_block_dim(Dv), num_warps=_DELTA_WARPS)
    return delta


def backward_delta_triton(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """The backward's fused preprocess, twin of :func:`~hdlm_kernels.attention.reference.attention_delta_ref`:
    ``Δ [B, H, Q]`` float32 from ``out`` and ``dout`` ``[B, Q, H, Dv]`` (same shape and dtype), each read
    once, with no float32 copies in memory."""
    for name, t in (("out", out), ("dout", dout)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"backward_delta_triton: {name} must be a [B, Q, H, Dv] tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if out.shape != dout.shape or out.dtype != dout.dtype:
        raise ValueError(f"backward_delta_triton: out and dout must have the same shape and dtype, got "
                         f"{tuple(out.shape)} {out.dtype} and {tuple(dout.shape)} {dout.dtype}")
    check_triton_inputs(out, context="backward_delta_triton")
    return _backward_delta(_head_contiguous(out), _head_contiguous(dout))


def _backward(dout, q, k, v, out, lse, mask: IntervalMask, scale: float, deterministic: bool):
    B, Q, H, D = q.shape
    K, Dv = k.shape[1], v.shape[3]
    if Q == 0 or K == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # The kernels write every element of dQ, dK and dV (zeros where no pair is attended): no zero-fill.
    dq = torch.empty_like(q) if deterministic else None
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dout = _head_contiguous(dout)
    delta = _backward_delta(out, dout)
    config = backward_config(D, q.dtype, q.device.type == "cuda")
    tiles = mask.tiles(config.block_m, config.block_n)
    stride_mask_b, stride_count_b, stride_index_b, stride_index_t = _map_strides(mask, tiles)
    block_d, block_dv = _block_dim(D), _block_dim(Dv)
    tma = _use_tma(q, k, v, dout)
    shared = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d,
                  BLOCK_DV=block_dv, DOT_PRECISION=_dot_precision(q.dtype), TMA=tma)
    q_rows, do_rows = _tile_operand(q, config.block_m, block_d, tma), _tile_operand(dout, config.block_m, block_dv, tma)
    k_rows, v_rows = _tile_operand(k, config.block_n, block_d, tma), _tile_operand(v, config.block_n, block_dv, tma)
    on_gpu = q.device.type == "cuda"
    # Atomics accumulate dQ in float32 whatever the input dtype, from zero.
    dq_accumulator = dq if deterministic else torch.zeros(B, Q, H, D, dtype=torch.float32, device=q.device)
    map_stride_t = tiles.q_index.stride(1)
    _launch(_attention_backward_kv_kernel, (tiles.num_kv_tiles, B * H), (
        q_rows, k_rows, v_rows, do_rows, dq_accumulator, dk, dv, lse, delta, mask.prefix_end, mask.window_start, mask.window_end,
        tiles.full_q_count, tiles.full_q_index, tiles.q_count, tiles.q_index,
        scale, *_strides_bsh(q), *_strides_bsh(k), *_strides_bsh(v), *_strides_bsh(dout),
        *_strides_bsh(dq_accumulator), *_strides_bsh(dk), *_strides_bsh(dv),
        stride_mask_b, 0 if mask.batch == 1 else tiles.q_count.stride(0),
        0 if mask.batch == 1 else tiles.q_index.stride(0), map_stride_t,
        H, Q, K, D, Dv), dict(ATOMIC_DQ=not deterministic, **shared), config, on_gpu,
        reset_to_zero=("DQ",))  # autotuning reruns the pass: the atomics must restart from zero
    if not deterministic:
        return dq_accumulator.to(q.dtype), dk, dv
    # The dQ pass has its own tile (backward_dq_config) and so its own tile map, kept by the mask like
    # the first one (built once per tile shape, on the device, without host syncs).
    dq_config = backward_dq_config(D, q.dtype, on_gpu)
    if (dq_config.block_m, dq_config.block_n) != (config.block_m, config.block_n):
        tiles = mask.tiles(dq_config.block_m, dq_config.block_n)
        stride_mask_b, stride_count_b, stride_index_b, stride_index_t = _map_strides(mask, tiles)
        shared = dict(shared, BLOCK_M=dq_config.block_m, BLOCK_N=dq_config.block_n)
        q_rows = _tile_operand(q, dq_config.block_m, block_d, tma)
        do_rows = _tile_operand(dout, dq_config.block_m, block_dv, tma)
        k_rows = _tile_operand(k, dq_config.block_n, block_d, tma)
        v_rows = _tile_operand(v, dq_config.block_n, block_dv, tma)
    _launch(_attention_backward_q_kernel, (tiles.num_q_tiles, B * H), (
        q_rows, k_rows, v_rows, do_rows, dq, lse, delta, mask.prefix_end, mask.window_start, mask.window_end,
        tiles.full_kv_count, tiles.full_kv_index, tiles.kv_count, tiles.kv_index,
        scale, *_strides_bsh(q), *_strides_bsh(k), *_strides_bsh(v), *_strides_bsh(dout), *_strides_bsh(dq),
        stride_mask_b, stride_count_b, stride_index_b, stride_index_t,
        H, Q, K, D, Dv), shared, dq_config, on_gpu)
    return dq, dk, dv


class _IntervalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, deterministic):
        q, k, v = _head_contiguous(q), _head_contiguous(k), _head_contiguous(v)
        out, lse = _forward(q, k, v, mask, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.deterministic = mask, scale, deterministic
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        # The lse output is for merging partial attentions and for inspection; it is not differentiated.
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, ctx.mask, ctx.scale, ctx.deterministic)
        return dq, dk, dv, None, None, None


def attention_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: IntervalMask,
                             scale: float | None = None, deterministic: bool = True
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and log-sum-exp; differentiable in q, k, v through the output.

    Args: as :func:`attention_triton`.

    Returns:
        ``out`` ``[B, Q, H, Dv]`` in the input dtype (zeros for rows without keys) and ``lse``
        ``[B, H, Q]`` float32, the natural-log log-sum-exp of each row's scaled scores (``-inf`` for
        rows without keys), with which partial attentions over disjoint key sets merge exactly.
    """
    from .reference import check_attention_inputs

    scale = check_attention_inputs(q, k, v, mask, scale, context="attention_forward_triton")
    check_triton_inputs(q, context="attention_forward_triton")
    if not isinstance(deterministic, bool):
        raise TypeError(f"attention_forward_triton: deterministic must be a bool, got {deterministic!r}")
    out, lse = _IntervalAttention.apply(q, k, v, mask, scale, deterministic)
    return out, lse


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: IntervalMask,
                     scale: float | None = None, deterministic: bool = True) -> torch.Tensor:
    """Softmax attention over ``mask`` with the Triton kernels (twin of ``attention_ref``).

    Args:
        q: ``[B, Q, H, D]``; k: ``[B, K, H, D]``; v: ``[B, K, H, Dv]``; float16, bfloat16 or float32
            (bfloat16 only on a GPU), D and Dv up to 256.
        mask: ``IntervalMask`` with ``[1 or B, Q]`` rows and ``key_length == K``.
        scale: softmax scale, ``1/sqrt(D)`` when None.
        deterministic: True (default) computes dQ in its own pass, bit-reproducible run to run;
            False accumulates dQ with float32 atomics inside the dK/dV pass.

    Returns:
        ``[B, Q, H, Dv]`` in the input dtype; differentiable in q, k and v.
    """
    return attention_forward_triton(q, k, v, mask, scale, deterministic)[0]



# --------------------------------------------------------------------------------------------------
# the launches the dispatch above can choose, for the sm_90 compile gate (scripts/sm90_check.py)
# --------------------------------------------------------------------------------------------------

GATE_HEAD_DIMS = (32, 64, 96, 128, 256)
"""Head dims the gate compiles: the common ones and the largest accepted (``_MAX_HEAD_DIM``)."""

GATE_POINTER_LOADS = ((64, torch.bfloat16), (128, torch.bfloat16))
"""(head dim, dtype) at which the gate also compiles the training passes with pointer loads
(``TMA=False``: a layout TMA cannot describe, or a GPU before sm_90)."""


def _gate_operand(dtype: torch.dtype, shape: tuple, block_rows: int, block_dim: int, tma: bool):
    # A pointer argument is given to warmup as its dtype; a descriptor over a stand-in tensor (Triton's
    # MockTensor: a dtype and a shape, no memory) with the dispatch's block shape.
    if not tma:
        return dtype
    from triton.runtime.jit import MockTensor

    return _tile_operand(MockTensor(dtype, list(shape)), block_rows, block_dim, True)


def dispatchable_launches():
    """Every (kernel, configuration) this module's dispatch can launch on a GPU, built from the
    configuration functions that dispatch reads (forward_config, backward_config)."""
    from .._kernel_launch import KernelLaunch

    launches = []
    int32, fp32 = torch.int32, torch.float32
    heads, rows = 12, 2048
    for head_dim in GATE_HEAD_DIMS:
        stride = (rows * heads * head_dim, heads * head_dim, head_dim)
        mask_and_map = (int32,) * 7
        for dtype in _SUPPORTED_DTYPES:
            spill_free = dtype != torch.float32 and head_dim <= 128
            # Two blocks per SM at D = 64 in 16-bit: one block's softmax overlaps the other's products.
            training_blocks = 2 if dtype != torch.float32 and head_dim == 64 else 1
            common = dict(BLOCK_D=_block_dim(head_dim), BLOCK_DV=_block_dim(head_dim),
                          DOT_PRECISION=_dot_precision(dtype))
            labels = dict(D=head_dim, dtype=str(dtype).replace("torch.", ""))
            launches.append(KernelLaunch(
                "attention.backward_delta", _backward_delta_kernel,
                (dtype, dtype, fp32, *stride, *stride, heads, rows, head_dim),
                dict(BLOCK_Q=delta_block_q(head_dim), BLOCK_DV=_block_dim(head_dim)), dict(num_warps=_DELTA_WARPS),
                labels, spill_free=spill_free))
            tma_choices = ((True, False) if (head_dim, dtype) in GATE_POINTER_LOADS else
                           (True,) if dtype in TMA_DTYPES else (False,))
            # The training forward; split-KV decoding (the merge fused in) with more rows than a window
            # class, and with the decode tiles.
            first = tma_choices[0]
            forward_kinds = [(None, False, first), (None, True, first), *((w, True, first) for w in DECODE_WINDOW_CLASSES)]
            forward_kinds += [(None, False, False)] * (len(tma_choices) > 1)
            for window, split, tma in forward_kinds:
                config = forward_config(head_dim, dtype, rows=window)
                q_rows = window or rows
                name = "attention.forward" if not split else (
                    "attention.forward_split_kv" if window is None else "attention.decode_forward")
                block_d = _block_dim(head_dim)
                q_shape, kv_shape = (8, q_rows, heads, head_dim), (8, rows, heads, head_dim)
                launches.append(KernelLaunch(
                    name, _attention_forward_kernel,
                    (_gate_operand(dtype, q_shape, config.block_m, block_d, tma),
                     _gate_operand(dtype, kv_shape, config.block_n, block_d, tma),
                     _gate_operand(dtype, kv_shape, config.block_n, block_d, tma),
                     dtype, fp32, fp32, fp32, int32, *mask_and_map[:3],
                     int32, int32, int32, int32, 0.125, *stride, *stride, *stride, *stride,
                     q_rows, 1, rows // 64, 64, heads, q_rows, rows, head_dim, head_dim, 4 if split else 1),
                    dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, TMA=tma, SPLIT_KV=split, **common),
                    dict(num_warps=config.num_warps, num_stages=config.num_stages),
                    dict(labels, block=f"{config.block_m}x{config.block_n}", tma="yes" if tma else "no"),
                    spill_free=spill_free, min_blocks_per_sm=1 if split else training_blocks))
            shape = (8, rows, heads, head_dim)
            for tma in tma_choices:
                # The dK/dV pass (both forms) with backward_config, the dQ pass with backward_dq_config.
                for name, config in (("attention.backward_dkdv", backward_config(head_dim, dtype)),
                                     ("attention.backward_dkdv_atomic_dq", backward_config(head_dim, dtype)),
                                     ("attention.backward_dq", backward_dq_config(head_dim, dtype))):
                    rows_operand = _gate_operand(dtype, shape, config.block_m, _block_dim(head_dim), tma)
                    keys_operand = _gate_operand(dtype, shape, config.block_n, _block_dim(head_dim), tma)
                    tile = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, TMA=tma, **common)
                    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
                    tile_labels = dict(labels, block=f"{config.block_m}x{config.block_n}",
                                       tma="yes" if tma else "no")
                    if name == "attention.backward_dq":
                        kernel, args = _attention_backward_q_kernel, (
                            rows_operand, keys_operand, keys_operand, rows_operand, dtype, fp32, fp32, int32,
                            int32, int32, int32, int32, int32, int32, 0.125, *stride * 5, rows,
                            rows // config.block_m, rows, 64, heads, rows, rows, head_dim, head_dim)
                    else:
                        atomic = name.endswith("_atomic_dq")
                        kernel, args = _attention_backward_kv_kernel, (
                            rows_operand, keys_operand, keys_operand, rows_operand, fp32 if atomic else dtype,
                            dtype, dtype, fp32, fp32, int32, int32, int32, int32, int32, int32, int32, 0.125,
                            *stride * 7, rows, rows // config.block_n, rows, 64, heads, rows, rows, head_dim,
                            head_dim)
                        tile["ATOMIC_DQ"] = atomic
                    launches.append(KernelLaunch(name, kernel, args, tile, options, tile_labels,
                                                 spill_free=spill_free, min_blocks_per_sm=training_blocks))
    return launches


def _register_launches() -> None:
    from .. import _kernel_launch

    _kernel_launch.register(__name__, dispatchable_launches)


_register_launches()
