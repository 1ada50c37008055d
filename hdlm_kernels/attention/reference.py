"""Reference attention over an ``IntervalMask``: SDPA with the dense mask (docs/attention.md).

This is the correctness oracle the kernels are compared with (the ``_ref`` twin of
:func:`hdlm_kernels.attention.attention`). It materializes the dense ``[B, Q, K]`` mask, so it costs
O(Q·K) memory per sequence whatever the mask's sparsity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..masks.interval_mask import IntervalMask

__all__ = ["attention_ref", "attention_lse_ref", "attention_delta_ref", "check_attention_inputs"]


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: IntervalMask,
                           scale, context: str = "attention") -> float:
    """Validate the ``[B, S, H, D]`` layout, dtypes, devices and mask; return the softmax scale.

    Raises TypeError / ValueError naming the argument, what was expected and what was given.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{context}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{context}: {name} must have shape [B, S, H, D] (flash-attn layout), got "
                             f"{tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{context}: {name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{context}: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{context}: q, k and v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    B, _, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"{context}: k must have shape [B={B}, K, H={H}, D={D}] to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{context}: v must have shape [B, K, H, Dv] = [{k.shape[0]}, {k.shape[1]}, "
                         f"{k.shape[2]}, Dv] to match k, got {tuple(v.shape)}")
    if not isinstance(mask, IntervalMask):
        raise TypeError(f"{context}: mask must be an hdlm_kernels.masks.IntervalMask, got "
                        f"{type(mask).__name__}")
    mask.check_shapes(q.shape[1], k.shape[1], B, context=context)
    if mask.device != q.device:
        raise ValueError(f"{context}: the mask is on {mask.device} but q is on {q.device}; move it with "
                         "mask.to(q.device)")
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{context}: scale must be a float or None, got {type(scale).__name__} ({scale!r})")
    return float(scale)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: IntervalMask,
                  scale: float | None = None) -> torch.Tensor:
    """Softmax attention where query row ``i`` sees the keys of ``mask`` row ``i`` (docs/conventions.md, masks).

    Args:
        q: ``[B, Q, H, D]`` queries.
        k: ``[B, K, H, D]`` keys; v: ``[B, K, H, Dv]`` values; same dtype and device as ``q``.
        mask: ``IntervalMask`` with ``[1 or B, Q]`` rows and ``key_length == K``.
        scale: softmax scale, ``1/sqrt(D)`` when None.

    Returns:
        ``[B, Q, H, Dv]`` in the input dtype (computed in it; no float32 accumulation for bf16/fp16).
        Rows without any key are zeros (flash-attn's convention, not the official code's uniform
        attention); their gradients are zeros too. Differentiable in q, k and v.
    """
    scale = check_attention_inputs(q, k, v, mask, scale, context="attention_ref")
    B, Q, H, _ = q.shape
    if Q == 0 or k.shape[1] == 0:
        return q.new_zeros(B, Q, H, v.shape[3])
    if mask.attends_all:  # no mask at all: SDPA may then take its flash / memory-efficient kernels
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             scale=scale)
        return out.transpose(1, 2).contiguous()
    allowed = mask.to_dense()  # [B or 1, Q, K]
    has_key = allowed.any(-1, keepdim=True)
    # Let empty rows attend to every key and zero them afterwards: a row of -inf scores would give
    # NaN (or, depending on the torch version, zero) probabilities and NaN gradients through softmax.
    allowed = allowed | ~has_key
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=allowed[:, None], scale=scale)
    out = torch.where(has_key[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.transpose(1, 2).contiguous()


def attention_lse_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: IntervalMask,
                      scale: float | None = None) -> torch.Tensor:
    """Float32 ``[B, H, Q]`` natural-log log-sum-exp of each row's scaled scores over its keys
    (``-inf`` for rows without keys): the second output of the Triton forward, computed densely in
    float32. ``v`` is unused (kept so the signature matches the kernel's)."""
    scale = check_attention_inputs(q, k, v, mask, scale, context="attention_lse_ref")
    B, Q, H, _ = q.shape
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    scores = scores.masked_fill(~mask.to_dense()[:, None], float("-inf"))
    if k.shape[1] == 0:
        return scores.new_full((B, H, Q), float("-inf"))
    return torch.logsumexp(scores, dim=-1)


def attention_delta_ref(out: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """The attention backward's row term ``Δ[b, h, q] = Σ_d out[b, q, h, d] · dout[b, q, h, d]`` in float32
    (``[B, H, Q]``, the layout of the log-sum-exp): with ``P`` the softmax and ``dP = dO Vᵀ``,
    ``Δ_q = Σ_k P_qk dP_qk``, so ``dS = P ∘ (dP - Δ)``. Twin of the Triton backward's fused preprocess."""
    return (out.float() * dout.float()).sum(-1).transpose(1, 2).contiguous()
