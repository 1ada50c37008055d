"""Attention over hyperschedule masks (DESIGN §5, §7): one entry point, pluggable backends
(:func:`attention`), and its KV-cached inference form (:func:`decode`, in :mod:`.decode`).

``attention(q, k, v, mask, scale=None, backend="auto")`` takes the flash-attn layout ``[B, S, H, D]``
and an :class:`~hdlm_kernels.masks.IntervalMask`; every backend computes the same function as
:func:`attention_ref` (its reference twin) and supports autograd unless stated otherwise.

Backends:
    ``"reference"``: SDPA with the dense mask (``attention_ref``); any device, any float dtype.
    ``"flex"``: FlexAttention with ``mask.to_block_mask()`` (tiles outside the intervals skipped).
        Compiled on CUDA; eager on the CPU, where it is inference-only (PyTorch has no CPU backward
        for FlexAttention) and evaluates the mask element by element (a semantics check, not fast).
    ``"triton"``: the block-sparse flash-attention kernels of :mod:`.triton_attention` (forward and
        backward); CUDA tensors, or CPU tensors under the Triton interpreter (float32/float16).
    ``"auto"``: ``"triton"`` for CUDA tensors when triton is importable, ``"reference"`` otherwise.
"""

from __future__ import annotations

import warnings

import torch

from ..masks.interval_mask import IntervalMask
from .decode import DECODE_BACKENDS, decode, decode_ref
from .reference import attention_lse_ref, attention_ref, check_attention_inputs

__all__ = ["attention", "attention_ref", "attention_lse_ref", "BACKENDS", "decode", "decode_ref",
           "DECODE_BACKENDS"]

BACKENDS = ("auto", "reference", "flex", "triton")
"""Backend names ``attention`` accepts."""

_PLANNED_BACKENDS = ("cuda",)  # named in DESIGN §5; CUDA kernels exist for decoding only (issue 5)

_compiled_flex_attention = None


def _flex_attention_fn(device: torch.device):
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as error:  # torch < 2.5
        raise RuntimeError("attention: backend='flex' needs torch.nn.attention.flex_attention "
                           f"(torch >= 2.5), which torch {torch.__version__} lacks; use backend='reference'"
                           ) from error
    if device.type != "cuda":
        return flex_attention
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        # Eager FlexAttention materializes the scores; only the compiled kernel skips masked tiles.
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention


def _attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: IntervalMask,
                    scale: float) -> torch.Tensor:
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


def _triton_module():
    """The Triton kernels, imported on first use (so ``TRITON_INTERPRET`` may be set until then)."""
    try:
        from . import triton_attention
    except ImportError as error:
        raise RuntimeError(f"attention: backend='triton' needs triton, which is not importable ({error}); "
                           "pip install triton, or use backend='reference'") from error
    return triton_attention


def _triton_importable() -> bool:
    try:
        _triton_module()
    except RuntimeError:
        return False
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: IntervalMask,
              scale: float | None = None, backend: str = "auto", *, deterministic: bool = True
              ) -> torch.Tensor:
    """Softmax attention where query row ``i`` sees the keys of ``mask`` row ``i`` (DESIGN §4-5).

    Args:
        q: ``[B, Q, H, D]`` queries (flash-attn layout).
        k: ``[B, K, H, D]`` keys; v: ``[B, K, H, Dv]`` values; same dtype and device as ``q``.
        mask: ``IntervalMask`` with ``[1 or B, Q]`` rows (``[1, Q]`` is shared by the batch) and
            ``key_length == K``, on the device of ``q``.
        scale: softmax scale, ``1/sqrt(D)`` when None.
        backend: one of :data:`BACKENDS` (see the module docstring). A requested backend that is not
            available raises; there is no silent fallback.
        deterministic: for ``"triton"``, whether the backward is bit-reproducible (dQ in its own pass)
            rather than accumulated with atomics; the other backends are deterministic anyway.

    Returns:
        ``[B, Q, H, Dv]`` in the input dtype; rows whose mask row is empty are zeros.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        if backend in _PLANNED_BACKENDS:
            raise NotImplementedError(f"attention: backend={backend!r} is not implemented yet; available "
                                      f"backends: {', '.join(map(repr, BACKENDS))}")
        raise ValueError(f"attention: unknown backend {backend!r}; expected one of "
                         f"{', '.join(map(repr, BACKENDS))}")
    scale = check_attention_inputs(q, k, v, mask, scale, context="attention")
    if backend == "auto":
        # On the CPU the Triton kernels only run in the interpreter, which is far slower than SDPA.
        backend = "triton" if q.device.type == "cuda" and _triton_importable() else "reference"
    if backend == "triton":
        return _triton_module().attention_triton(q, k, v, mask, scale, deterministic)
    if backend == "flex":
        return _attention_flex(q, k, v, mask, scale)
    return attention_ref(q, k, v, mask, scale)
