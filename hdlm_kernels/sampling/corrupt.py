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

``corrupt`` rejects what the draw cannot mean (ValueError naming the argument): p_mask or p_shuffle outside
[0, 1] or NaN, p_mask + p_shuffle > 1, token ids outside [0, N) that are not MASK, and a MASK id inside
the real vocabulary. ``corrupt_deferred`` draws the same without a host synchronization and reports the
rejected positions in a device tensor instead (the training loop raises from it when it reads the loss).

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

__all__ = ["corrupt", "corrupt_deferred", "corrupt_ref", "invalid_positions"]


# p_mask + p_shuffle may exceed 1 by this much: the processes' closed forms round, and an excess of a few
# ulp of 1 changes no event (u_event < 1 always).
SUM_SLACK = 2.0 ** -50


def _checked(x0, p_mask, p_shuffle, num_tokens, mask_id, seed, step, row_ids, op="corrupt", check_values=True):
    """Checks and flattens the arguments; with ``check_values``, also their values (a host sync)."""
    if not isinstance(x0, torch.Tensor) or x0.dtype.is_floating_point or x0.dtype == torch.bool:
        raise TypeError(f"{op}: x0 must be an integer tensor of token ids, got {getattr(x0, 'dtype', type(x0))}")
    num_tokens = integer("num_tokens", num_tokens, 1, 2**31, "an int in [1, 2^31)")
    mask_id = integer("mask_id", mask_id, 0, 2**31, "an int in [0, 2^31)")
    if mask_id < num_tokens:
        raise ValueError(f"{op}: mask_id must lie outside the real vocabulary [0, num_tokens) = [0, {num_tokens}) "
                         f"(the shuffle event draws ids from it), got mask_id = {mask_id}")
    seed, step = seed_and_step(seed, step)
    probabilities = []
    for name, p in (("p_mask", p_mask), ("p_shuffle", p_shuffle)):
        if not isinstance(p, torch.Tensor) or not p.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating tensor broadcastable to x0's shape "
                            f"{tuple(x0.shape)}, got {getattr(p, 'dtype', type(p).__name__)}")
        try:
            p = torch.broadcast_to(p.to(device=x0.device, dtype=torch.float64), x0.shape)
        except RuntimeError as error:
            raise ValueError(f"{op}: {name} of shape {tuple(p.shape)} does not broadcast to x0's shape "
                             f"{tuple(x0.shape)}") from error
        probabilities.append(p.reshape(-1).contiguous())
    if row_ids is None:
        row_ids = torch.arange(x0.numel(), device=x0.device)
    else:
        row_ids = integer_tensor("row_ids", row_ids, "an integer tensor with x0's shape")
        if tuple(row_ids.shape) != tuple(x0.shape):
            raise ValueError(f"{op}: row_ids must have x0's shape {tuple(x0.shape)}, got {tuple(row_ids.shape)}")
        row_ids = row_ids.to(device=x0.device, dtype=torch.int64)
        if check_values and row_ids.numel():
            low, high = (int(v) for v in torch.aminmax(row_ids))
            if low < 0 or high >= 2**62:  # elements 2·row_id + 1 must stay below 2^63
                raise ValueError(f"{op}: row_ids must lie in [0, 2^62), got values in [{low}, {high}]")
    flat = x0.reshape(-1).to(torch.int64).contiguous()
    if check_values:
        _check_values(op, flat, probabilities[0], probabilities[1], num_tokens, mask_id)
    return flat, probabilities[0], probabilities[1], num_tokens, mask_id, seed, step, row_ids.reshape(-1).contiguous()


def _violations(x0, p_mask, p_shuffle, num_tokens, mask_id):
    """The per-position rule violations (bool tensors [n], no host sync), named by the argument at fault."""
    return (
        ("x0", (x0 < 0) | ((x0 >= num_tokens) & (x0 != mask_id))),
        ("p_mask", ~((p_mask >= 0.0) & (p_mask <= 1.0))),        # NaN fails both comparisons
        ("p_shuffle", ~((p_shuffle >= 0.0) & (p_shuffle <= 1.0))),
        ("p_mask + p_shuffle", p_mask + p_shuffle > 1.0 + SUM_SLACK),
    )


def _check_values(op, x0, p_mask, p_shuffle, num_tokens, mask_id) -> None:
    """Raises ValueError naming the first violated rule, its expected range, the value and the position."""
    for name, bad in _violations(x0, p_mask, p_shuffle, num_tokens, mask_id):
        if not bool(bad.any()):
            continue
        i = int(bad.nonzero()[0, 0])
        count = int(bad.sum())
        if name == "x0":
            expected, given = f"token ids in [0, num_tokens) = [0, {num_tokens}) or mask_id = {mask_id}", int(x0[i])
        elif name == "p_mask + p_shuffle":
            expected = "<= 1"
            given = f"{float(p_mask[i])!r} + {float(p_shuffle[i])!r} = {float(p_mask[i] + p_shuffle[i])!r}"
        else:
            expected, given = "probabilities in [0, 1] (no NaN)", float((p_mask if name == "p_mask" else p_shuffle)[i])
        raise ValueError(f"{op}: {name} must be {expected}, got {given} at flat position {i} "
                         f"({count} such position(s))")


def invalid_positions(x0, p_mask, p_shuffle, num_tokens, mask_id) -> torch.Tensor:
    """The positions ``corrupt`` would reject (flattened, checked arguments): bool [n], no host sync."""
    bad = torch.zeros_like(x0, dtype=torch.bool)
    for _, violation in _violations(x0, p_mask, p_shuffle, num_tokens, mask_id):
        bad |= violation
    return bad


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


def corrupt_deferred(x0: torch.Tensor, p_mask: torch.Tensor, p_shuffle: torch.Tensor, num_tokens: int,
                     mask_id: int, seed: int, step: int, row_ids: torch.Tensor | None = None,
                     backend: str = "auto"):
    """``corrupt`` without a host synchronization, for training loops that keep the device busy.

    Same arguments and draw as ``corrupt``; the scalars, types and shapes are still checked (``mask_id``
    outside ``[0, num_tokens)`` included), but the tensors' values are not: instead of raising, the
    positions ``corrupt`` would reject (x0 outside ``[0, num_tokens)`` and not MASK, p_mask or p_shuffle
    outside [0, 1] or NaN, p_mask + p_shuffle > 1) are reported in a device tensor. The caller guarantees
    row_ids in [0, 2^62).

    Returns:
        ``(x_t, masked, shuffled, invalid)``: int64 and three bool tensors shaped like ``x0``; ``invalid``
        marks the rejected positions (their draw is meaningless). Read ``invalid.any()`` when the caller
        synchronizes anyway (e.g. with the loss).
    """
    backends.check_name("corrupt", backend, "corrupt_deferred")
    shape = x0.shape if isinstance(x0, torch.Tensor) else None
    args = _checked(x0, p_mask, p_shuffle, num_tokens, mask_id, seed, step, row_ids, "corrupt_deferred", False)
    implementation = backends.select("corrupt", backend, x0.device, "corrupt_deferred")
    invalid = invalid_positions(args[0], args[1], args[2], num_tokens, mask_id)
    x_t, masked, shuffled = implementation(*args)
    return x_t.reshape(shape), masked.reshape(shape), shuffled.reshape(shape), invalid.reshape(shape)


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
