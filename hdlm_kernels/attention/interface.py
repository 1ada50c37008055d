"""``attention``: softmax attention over an ``IntervalMask`` (docs/attention.md), with its backends.

``attention(q, k, v, mask, scale=None, backend="auto")`` takes the flash-attn layout ``[B, S, H, D]``
and an :class:`~hdlm_kernels.masks.IntervalMask`; every backend computes the same function as
:func:`~hdlm_kernels.attention.reference.attention_ref` (its reference twin) and supports autograd
unless stated otherwise. The backends are registered with ``hdlm_kernels.backends`` as op
``attention``:

    ``"reference"``: SDPA with the dense mask (``attention_ref``); any device, any float dtype.
    ``"flex"``: FlexAttention with ``mask.to_block_mask()`` (:mod:`.flex`).
    ``"triton"``: the block-sparse flash-attention kernels of :mod:`.triton_attention` (forward and
        backward); CUDA tensors, or CPU tensors under the Triton interpreter (float32/float16).
    ``"auto"``: the fused kernel (``"triton"``) for CUDA tensors when available, the reference otherwise
        (on the CPU the Triton kernels only run in the interpreter, far slower than SDPA).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import backends
from .._triton_device import triton_probe
from ..masks.interval_mask import IntervalMask
from .flex import attention_flex, flex_probe
from .reference import attention_ref, check_attention_inputs

__all__ = ["attention"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: IntervalMask,
              scale: float | None = None, backend: str = "auto", *, deterministic: bool = True
              ) -> torch.Tensor:
    """Softmax attention where query row ``i`` sees the keys of ``mask`` row ``i`` (docs/attention.md).

    Args:
        q: ``[B, Q, H, D]`` queries (flash-attn layout).
        k: ``[B, K, H, D]`` keys; v: ``[B, K, H, Dv]`` values; same dtype and device as ``q``.
        mask: ``IntervalMask`` with ``[1 or B, Q]`` rows (``[1, Q]`` is shared by the batch) and
            ``key_length == K``, on the device of ``q``.
        scale: softmax scale, ``1/sqrt(D)`` when None.
        backend: a name of ``hdlm_kernels.backends.names("attention")`` (see the module docstring). A
            named backend that cannot run raises; there is no silent fallback.
        deterministic: for ``"triton"``, whether the backward is bit-reproducible (dQ in its own pass)
            rather than accumulated with atomics; the other backends are deterministic anyway.

    Returns:
        ``[B, Q, H, Dv]`` in the input dtype; rows whose mask row is empty are zeros.
    """
    backends.check_name("attention", backend, "attention")
    scale = check_attention_inputs(q, k, v, mask, scale, context="attention")
    implementation = backends.select("attention", backend, q.device, "attention")
    return implementation(q, k, v, mask, scale, deterministic)


def _triton_attention() -> Callable:
    from . import triton_attention  # imports triton and builds the kernels (for the interpreter or the GPU)

    return triton_attention.attention_triton


backends.register("attention", "reference", summary="SDPA with the dense mask, autograd, any device",
                  load=lambda: lambda q, k, v, mask, scale, deterministic: attention_ref(q, k, v, mask, scale))
backends.register("attention", "flex", summary="FlexAttention on the BlockMask (compiled on CUDA; CPU: eager, no "
                  "grad)", probe=flex_probe,
                  load=lambda: lambda q, k, v, mask, scale, deterministic: attention_flex(q, k, v, mask, scale))
backends.register("attention", "triton", summary="block-sparse flash-attention fwd + bwd over the tile map",
                  fused=True, auto_devices=("cuda",),
                  probe=triton_probe("hdlm_kernels.attention.triton_attention"), load=_triton_attention)
