"""Triton backend of the forward corruption of training (``corrupt``), one fused pass, bit-identical to
the reference (docs/sampling-stream.md, "Corruption").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_stream import (
    GPU_BLOCK,
    INTERPRETER_BLOCK,
    check_triton_device,
    interpreted,
    launch_block,
    launch_options,
    on_device,
    stream_block,
    uniform53_of_words,
)

__all__ = ["corrupt_triton", "interpreted"]


@triton.jit(do_not_specialize=["key0", "key1", "step_lo"])
def _corrupt_kernel(X0, P_MASK, P_SHUFFLE, ROW_IDS, XT, MASKED, SHUFFLED, numel, num_tokens, mask_id,
                    key0: tl.int64, key1: tl.int64, step_lo: tl.int64, STREAM: tl.constexpr,
                    BLOCK: tl.constexpr):
    # One Philox block per position (pair n = row_id of stream 2): (w0, w1) decide the event,
    # (w2, w3) pick the replacement token; see hdlm_kernels.sampling.corrupt.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    row_id = tl.load(ROW_IDS + offs, mask=ok, other=0)
    w0, w1, w2, w3 = stream_block(row_id, key0.to(tl.uint32), key1.to(tl.uint32),
                                   tl.full([], STREAM, tl.uint32), step_lo.to(tl.uint32))
    u_event = uniform53_of_words(w0, w1)
    u_token = uniform53_of_words(w2, w3)
    x0 = tl.load(X0 + offs, mask=ok, other=0)
    p_mask = tl.load(P_MASK + offs, mask=ok, other=0.0)
    p_shuffle = tl.load(P_SHUFFLE + offs, mask=ok, other=0.0)
    real = x0 != mask_id
    masked = real & (u_event < p_mask)
    shuffled = real & (u_event >= p_mask) & (u_event < p_mask + p_shuffle)
    replacement = tl.minimum((u_token * num_tokens.to(tl.float64)).to(tl.int64), num_tokens - 1)
    x_t = tl.where(masked, mask_id, tl.where(shuffled, replacement, x0))
    tl.store(XT + offs, x_t, mask=ok)
    tl.store(MASKED + offs, masked.to(tl.int8), mask=ok)
    tl.store(SHUFFLED + offs, shuffled.to(tl.int8), mask=ok)


def corrupt_triton(x0: torch.Tensor, p_mask: torch.Tensor, p_shuffle: torch.Tensor, num_tokens: int,
                   mask_id: int, seed: int, step: int, row_ids: torch.Tensor, stream: int):
    """The forward corruption of :func:`hdlm_kernels.sampling.corrupt` in one pass; arguments already
    validated and flattened (x0, row_ids int64 [n]; p_mask, p_shuffle float64 [n]). Returns
    (x_t int64 [n], masked bool [n], shuffled bool [n])."""
    check_triton_device(x0, "corrupt")
    numel = x0.numel()
    x_t = torch.empty_like(x0)
    masked = torch.empty(numel, dtype=torch.int8, device=x0.device)
    shuffled = torch.empty(numel, dtype=torch.int8, device=x0.device)
    if numel:
        block = launch_block(GPU_BLOCK, INTERPRETER_BLOCK)
        with on_device(x0):
            _corrupt_kernel[(triton.cdiv(numel, block),)](
                x0, p_mask, p_shuffle, row_ids, x_t, masked, shuffled, numel, num_tokens, mask_id,
                seed & 0xFFFFFFFF, seed >> 32, step & 0xFFFFFFFF, STREAM=stream, BLOCK=block,
                **launch_options())
    return x_t, masked.bool(), shuffled.bool()
