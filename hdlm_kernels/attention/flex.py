"""The FlexAttention backend of ``attention`` and ``decode``: ``flex_attention`` over the mask's
``BlockMask`` (built from the intervals, tiles outside them skipped). Compiled on CUDA; eager on the
CPU, where it is inference-only (PyTorch has no CPU backward for FlexAttention) and evaluates the mask
element by element (a semantics check, not fast)."""

from __future__ import annotations

import warnings

import torch

from ..masks.interval_mask import IntervalMask

_compiled_flex_attention = None


def flex_probe(device_kind: str) -> str:
    """The availability probe (``hdlm_kernels.backends``) of the FlexAttention backend."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention (torch >= 2.5)"
    return ""


def _flex_attention_fn(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        # Eager FlexAttention materializes the scores; only the compiled kernel skips masked tiles.
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention


def attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: IntervalMask,
                   scale: float) -> torch.Tensor:
    """``attention`` on FlexAttention; arguments checked by the caller (layout ``[B, S, H, D]``)."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                               or v.requires_grad):
        raise NotImplementedError(
            "attention: backend='flex' on the CPU is inference-only (PyTorch has no CPU backward for "
            "FlexAttention), but q, k or v requires grad; use backend='reference' for training on the CPU, "
            "or run under torch.no_grad()")
    flex_attention = _flex_attention_fn(q.device)
    B, Q, H, _ = q.shape
    if Q == 0 or k.shape[1] == 0:
        return q.new_zeros(B, Q, H, v.shape[3])
    with warnings.catch_warnings():
        # Eager use on the CPU is deliberate (there is no CPU kernel to compile for the backward).
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             block_mask=mask.to_block_mask(), scale=scale)
    # FlexAttention already returns zeros for rows without keys, as the contract requires.
    return out.transpose(1, 2).contiguous()
