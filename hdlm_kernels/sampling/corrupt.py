"""Forward corruption for training, drawn from stream 2 of the sampling stream (docs/sampling-stream.md).

Every noise process of the paper (absorb, uniform, the γ-hybrid of Eq. 7g, the ε-hybrid of §3.2)
reduces, per position, to three events with per-position probabilities: *mask* (x_t = MASK),
*shuffle* (x_t uniform over the N real tokens) and *keep* (``hdlm_reference.noise``). ``corrupt``
draws them from one Philox block per position, keyed by the position's absolute row id:

    (w0, w1, w2, w3) = Philox(counter = (row_id lo, row_id hi, 2, step lo), key = seed)
    u_event = uniform53 of (w0, w1)        (element 2·row_id of stream 2)
    u_token = uniform53 of (w2, w3)        (element 2·row_id + 1)
    masked   = x0 ≠ MASK and u_event < p_mask
    shuffled = x0 ≠ MASK and p_mask <= u_event < p_mask + p_shuffle      (float64 sum)
    x_t = MASK if masked, min(⌊u_token · N⌋, N - 1) if shuffled, else x0

Every operation is exact or correctly rounded, so the torch reference and the Triton kernel (one pass,
no host synchronisation) return the same bits, and a position's draw does not depend on the other
positions in the call. The probabilities come from the caller (the process's closed forms), computed
once in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import backends
from .._triton_device import triton_probe
from ..checks import integer, integer_tensor, seed_and_step
from .constants import CORRUPTION_STREAM
from .philox import stream_uniforms

__all__ = ["corrupt", "corrupt_ref"]


def _checked(x0, p_mask, p_shuffle, num_tokens, mask_id, seed, step, row_ids):
    if not isinstance(x0, torch.Tensor) or x0.dtype.is_floating_point or x0.dtype == torch.bool:
        raise TypeError(f"corrupt: x0 must be an integer tensor of token ids, got {getattr(x0, 'dtype', type(x0))}")
    num_tokens = integer("num_tokens", num_tokens, 1, 2**31, "an int in [1, 2^31)")
    mask_id = integer("mask_id", mask_id, 0, 2**31, "an int in [0, 2^31)")
    seed, step = seed_and_step(seed, step)
    probabilities = []
    for name, p in (("p_mask", p_mask), ("p_shuffle", p_shuffle)):
        if not isinstance(p, torch.Tensor) or not p.dtype.is_floating_point:
            raise TypeError(f"corrupt: {name} must be a floating tensor broadcastable to x0's shape "
                            f"{tuple(x0.shape)}, got {getattr(p, 'dtype', type(p).__name__)}")
        try:
            p = torch.broadcast_to(p.to(device=x0.device, dtype=torch.float64), x0.shape)
        except RuntimeError as error:
            raise ValueError(f"corrupt: {name} of shape {tuple(p.shape)} does not broadcast to x0's shape "
                             f"{tuple(x0.shape)}") from error
        probabilities.append(p.reshape(-1).contiguous())
    if row_ids is None:
        row_ids = torch.arange(x0.numel(), device=x0.device)
    else:
        row_ids = integer_tensor("row_ids", row_ids, "an integer tensor with x0's shape")
        if tuple(row_ids.shape) != tuple(x0.shape):
            raise ValueError(f"corrupt: row_ids must have x0's shape {tuple(x0.shape)}, got {tuple(row_ids.shape)}")
        row_ids = row_ids.to(device=x0.device, dtype=torch.int64)
        if row_ids.numel():
            low, high = (int(v) for v in torch.aminmax(row_ids))
            if low < 0 or high >= 2**62:  # elements 2·row_id + 1 must stay below 2^63
                raise ValueError(f"corrupt: row_ids must lie in [0, 2^62), got values in [{low}, {high}]")
    flat = x0.reshape(-1).to(torch.int64).contiguous()
    return flat, probabilities[0], probabilities[1], num_tokens, mask_id, seed, step, row_ids.reshape(-1).contiguous()


def corrupt(x0: torch.Tensor, p_mask: torch.Tensor, p_shuffle: torch.Tensor, num_tokens: int, mask_id: int,
            seed: int, step: int, row_ids: torch.Tensor | None = None, backend: str = "auto"):
    """Draw ``x_t`` from ``x0`` by the three-event forward process (module docstring).

    Args:
        x0: integer tensor of token ids, any shape; MASK entries stay MASK.
        p_mask, p_shuffle: float tensors broadcastable to ``x0.shape``, per-position probabilities of
            the mask and shuffle events (compared in float64).
        num_tokens: N, the real tokens (ids ``[0, N)``); mask_id: the MASK id.
        seed: int in [0, 2^64); step: int >= 0 (e.g. the optimizer step).
        row_ids: integer tensor shaped like x0 of absolute position identities (default: the flat
            index); a position's draw depends only on (seed, step, row_id) and its own inputs.
        backend: a name of ``hdlm_kernels.backends.names("corrupt")``: ``"reference"`` (torch + the
            Philox stream), ``"triton"`` (one fused pass; CUDA tensors, or CPU tensors under the Triton
            interpreter), ``"auto"`` (the fused kernel of x0's device when available, else the
            reference) or ``"kernels"``.

    Returns:
        ``(x_t, masked, shuffled)``: int64 and two bool tensors shaped like ``x0``.
    """
    backends.check_name("corrupt", backend, "corrupt")
    shape = x0.shape if isinstance(x0, torch.Tensor) else None
    args = _checked(x0, p_mask, p_shuffle, num_tokens, mask_id, seed, step, row_ids)
    implementation = backends.select("corrupt", backend, x0.device, "corrupt")
    x_t, masked, shuffled = implementation(*args)
    return x_t.reshape(shape), masked.reshape(shape), shuffled.reshape(shape)


def _corrupt_reference(x0, p_mask, p_shuffle, num_tokens, mask_id, seed, step, row_ids):
    u_event = stream_uniforms(seed, step, CORRUPTION_STREAM, 2 * row_ids)
    u_token = stream_uniforms(seed, step, CORRUPTION_STREAM, 2 * row_ids + 1)
    real = x0 != mask_id
    masked = real & (u_event < p_mask)
    shuffled = real & ~masked & (u_event < p_mask + p_shuffle)
    replacement = torch.floor(u_token * float(num_tokens)).to(torch.int64).clamp_(max=num_tokens - 1)
    x_t = torch.where(masked, mask_id, torch.where(shuffled, replacement, x0))
    return x_t, masked, shuffled


def corrupt_ref(x0: torch.Tensor, p_mask: torch.Tensor, p_shuffle: torch.Tensor, num_tokens: int,
                mask_id: int, seed: int, step: int, row_ids: torch.Tensor | None = None):
    """Reference twin of :func:`corrupt` (the torch path); same arguments without ``backend``."""
    return corrupt(x0, p_mask, p_shuffle, num_tokens, mask_id, seed, step, row_ids, backend="reference")


def _corrupt_triton() -> Callable:
    from . import triton_corrupt  # imports triton and builds the kernels (for the interpreter or the GPU)

    return lambda *arguments: triton_corrupt.corrupt_triton(*arguments, CORRUPTION_STREAM)


backends.register("corrupt", "reference", summary="torch and the Philox stream, any device",
                  load=lambda: _corrupt_reference)
backends.register("corrupt", "triton", summary="Triton (hdlm_kernels/sampling/triton_corrupt.py): one fused pass",
                  fused=True, auto_devices=("cuda",), probe=triton_probe("hdlm_kernels.sampling.triton_corrupt"),
                  load=_corrupt_triton)
