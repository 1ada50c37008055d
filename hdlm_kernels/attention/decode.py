"""KV-cached decode attention (docs/attention.md): the rows computed this generation step attend over the
cached settled prefix plus themselves, and their keys/values are written into the cache in place.

``decode(q, k_cache, v_cache, cache_len, k_new, v_new, mask=None)`` is what
``flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=cache_len)`` does for a
dense window, generalized to an ``IntervalMask`` over the rows: a step's rows are the active window
(dense over prefix + window) and, in the same call, the rows that settled at the previous step being
re-encoded (they see the prefix causally or block-causally). The cache length is not advanced: only the
caller knows how many rows settle.

Key coordinates are cache cells: row ``i`` of sequence ``b`` may attend cells ``[0, cache_len[b] + S)``,
i.e. the valid prefix and the ``S`` rows written by this call; cells past that hold stale scratch and
are never read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _extension, backends
from .._triton_device import triton_probe
from ..masks.interval_mask import IntervalMask
from .flex import attention_flex, flex_probe
from .reference import attention_ref, check_attention_inputs

__all__ = ["decode", "decode_ref"]


def _check_decode_inputs(q, k_cache, v_cache, cache_len, k_new, v_new, mask, context: str):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{context}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{context}: {name} must have shape [B, S, H, D], got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{context}: {name} must have q's dtype and device ({q.dtype}, {q.device}), got "
                            f"{t.dtype}, {t.device}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"{context}: q must be a floating-point tensor, got dtype {q.dtype}")
    B, S, H, D = q.shape
    max_len, Dv = k_cache.shape[1], v_cache.shape[3]
    if k_cache.shape != (B, max_len, H, D):
        raise ValueError(f"{context}: k_cache must have shape [B={B}, max_len, H={H}, D={D}], got "
                         f"{tuple(k_cache.shape)}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"{context}: v_cache must have shape [{B}, {max_len}, {H}, Dv] to match k_cache, got "
                         f"{tuple(v_cache.shape)}")
    if k_new.shape != (B, S, H, D) or v_new.shape != (B, S, H, Dv):
        raise ValueError(f"{context}: k_new and v_new must have shapes [{B}, {S}, {H}, {D}] and "
                         f"[{B}, {S}, {H}, {Dv}], got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
    if (not isinstance(cache_len, torch.Tensor) or cache_len.dtype.is_floating_point
            or cache_len.dtype == torch.bool or cache_len.shape != (B,)):
        raise ValueError(f"{context}: cache_len must be an integer tensor of shape [B={B}], got "
                         f"{cache_len!r}")
    if cache_len.device != q.device:
        raise ValueError(f"{context}: cache_len is on {cache_len.device} but q is on {q.device}")
    if mask is not None:
        if not isinstance(mask, IntervalMask):
            raise TypeError(f"{context}: mask must be None or an IntervalMask, got {type(mask).__name__}")
        if mask.num_rows != S or mask.batch not in (1, B):
            raise ValueError(f"{context}: the mask must have [1 or {B}, {S}] rows (one per query row), got "
                             f"[{mask.batch}, {mask.num_rows}]")
        if mask.key_length > max_len:
            raise ValueError(f"{context}: the mask has key_length {mask.key_length}, more than the cache's "
                             f"max_len {max_len}")
        if mask.device != q.device:
            raise ValueError(f"{context}: the mask is on {mask.device} but q is on {q.device}")


def _write_and_mask(k_cache, v_cache, cache_len, k_new, v_new, mask, context: str, check: bool = True):
    """Store the new rows at cells ``[cache_len, cache_len + S)`` and return the mask over the cells
    ``[0, K)`` that the call reads (``mask`` as given, or a dense window over prefix + rows).
    ``check=False`` (with a mask) skips the validation and its host synchronization."""
    B, S = k_new.shape[:2]
    max_len = k_cache.shape[1]
    if not check:
        _write_rows(k_cache, v_cache, cache_len, k_new, v_new)
        return mask
    ends = cache_len.long() + S
    # One host sync validates both the cache bounds and the mask against the written cells.
    checks = [ends.max(), cache_len.min()]
    if mask is not None:
        row_end = torch.maximum(mask.prefix_end, mask.window_end).long()  # [1 or B, S]
        checks.append((row_end - ends[:, None]).max())
    values = torch.stack(checks).tolist()
    if values[0] > max_len:
        raise ValueError(f"{context}: the cache overflows: cache_len + S = {values[0]} > max_len = {max_len}")
    if values[1] < 0:
        raise ValueError(f"{context}: cache_len must be >= 0, got {cache_len.tolist()}")
    if mask is not None and values[2] > 0:
        raise ValueError(f"{context}: the mask lets a row attend past cache_len + S (cells not written yet); "
                         f"rows may attend cells [0, cache_len[b] + {S}) only")
    _write_rows(k_cache, v_cache, cache_len, k_new, v_new)
    if mask is not None:
        return mask
    key_length = values[0]
    prefix_end = ends[:, None].expand(B, S).to(torch.int32)
    empty = torch.zeros_like(prefix_end)
    return IntervalMask(prefix_end, empty, empty, key_length)


def _write_rows(k_cache, v_cache, cache_len, k_new, v_new) -> None:
    """k_cache[b, cache_len[b] + j] = k_new[b, j] (and v), by index, without a host synchronization."""
    B, S = k_new.shape[:2]
    if S:
        cells = cache_len.long()[:, None] + torch.arange(S, device=cache_len.device)
        batch = torch.arange(B, device=cache_len.device)[:, None]
        k_cache[batch, cells] = k_new
        v_cache[batch, cells] = v_new


def decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: torch.Tensor,
               k_new: torch.Tensor, v_new: torch.Tensor, mask: IntervalMask | None = None,
               scale: float | None = None) -> torch.Tensor:
    """Reference twin of :func:`decode`: write, then SDPA over the cache with the dense mask."""
    return decode(q, k_cache, v_cache, cache_len, k_new, v_new, mask, scale, backend="reference")


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: torch.Tensor,
           k_new: torch.Tensor, v_new: torch.Tensor, mask: IntervalMask | None = None,
           scale: float | None = None, backend: str = "auto", *, num_splits: int | None = None,
           check: bool = True) -> torch.Tensor:
    """One KV-cached attention call: write ``k_new``/``v_new`` into the cache, attend, return the rows.

    Args:
        q: ``[B, S, H, D]`` the rows computed this step (re-encoded settled rows, then the window).
        k_cache, v_cache: ``[B, max_len, H, D]`` / ``[B, max_len, H, Dv]``, one layer's cache (e.g.
            ``KVCache.k[layer]``); modified in place at cells ``[cache_len[b], cache_len[b] + S)``.
        cache_len: integer ``[B]`` on q's device: the valid cached cells of each sequence (not
            advanced here).
        k_new, v_new: ``[B, S, H, D]`` / ``[B, S, H, Dv]``, the rows' keys (after rotary) and values.
        mask: None (every row sees cells ``[0, cache_len[b] + S)``: a dense window) or an
            ``IntervalMask`` with ``[1 or B, S]`` rows over cache cells, attending only cells below
            ``cache_len[b] + S`` (checked).
        scale: softmax scale, ``1/sqrt(D)`` when None.
        backend: a name of ``hdlm_kernels.backends.names("decode")``: ``"reference"`` (SDPA with the
            dense mask), ``"flex"``, ``"triton"`` (split-KV when the rows are too few to fill the GPU),
            ``"cuda"`` (the ``_C`` kernel), ``"auto"`` (the fused kernel of q's device when available:
            triton, else cuda; the reference otherwise) or ``"kernels"``.
        num_splits: split-KV count for ``"triton"``/``"cuda"``; None chooses from the GPU's size.
        check: validate ``cache_len`` and the mask against the cache (overflow, negative lengths, rows
            that attend unwritten cells) at the cost of one host synchronization. ``False`` skips it
            and needs a ``mask``: for generation loops that track every length on the host and checked
            their masks once (``hdlm_reference.generate``); the caller then owns those guarantees.

    Returns:
        ``[B, S, H, Dv]`` in q's dtype. Inference only: no autograd.
    """
    context = "decode"
    backends.check_name("decode", backend, context)
    _check_decode_inputs(q, k_cache, v_cache, cache_len, k_new, v_new, mask, context)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_new, v_new)):
        raise RuntimeError(f"{context}: decode is inference-only (the cache is written in place); call it "
                           "under torch.no_grad()")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"{context}: num_splits must be None or an int >= 1, got {num_splits!r}")
    if not check and mask is None:
        raise ValueError(f"{context}: check=False needs a mask (without one, the key length is read from "
                         "cache_len on the host)")
    if mask is None:
        intervals, key_length = (None, None, None), 0
    else:
        intervals, key_length = (mask.prefix_end, mask.window_start, mask.window_end), mask.key_length
    return _decode_op(q, k_cache, v_cache, cache_len, k_new, v_new, *intervals, key_length, scale, backend,
                      num_splits, check)


def _decode_checked(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: torch.Tensor,
                    k_new: torch.Tensor, v_new: torch.Tensor, prefix_end: torch.Tensor | None,
                    window_start: torch.Tensor | None, window_end: torch.Tensor | None, key_length: int,
                    scale: float | None, backend: str, num_splits: int | None, check: bool) -> torch.Tensor:
    """The body of the custom op ``hdlm_kernels::decode`` (arguments' metadata checked by ``decode``)."""
    context = "decode"
    mask = None if prefix_end is None else IntervalMask.of_tensors(prefix_end, window_start, window_end, key_length)
    implementation = backends.select("decode", backend, q.device, context)
    # Refuse what the kernels cannot take (dtype, head dim, ...) before the cache is written.
    getattr(implementation.function(), "check_inputs", _no_check)(q, context=context)
    keys_mask = _write_and_mask(k_cache, v_cache, cache_len, k_new, v_new, mask, context, check)
    K = keys_mask.key_length
    return implementation(q, k_cache[:, :K], v_cache[:, :K], keys_mask, scale, num_splits)


_decode_op = torch.library.custom_op(
    "hdlm_kernels::decode", _decode_checked, mutates_args=("k_cache", "v_cache"),
    schema="(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_len, Tensor k_new, Tensor v_new, "
           "Tensor? prefix_end, Tensor? window_start, Tensor? window_end, int key_length, float? scale, "
           "str backend, int? num_splits, bool check) -> Tensor")


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_len, k_new, v_new, prefix_end, window_start, window_end, key_length, scale,
      backend, num_splits, check):
    return q.new_empty(*q.shape[:3], v_cache.shape[3])


def _no_check(q: torch.Tensor, context: str) -> None:
    """Implementations without input checks of their own."""


# ---------------------------------------------------------------- implementations
# Each takes (q, keys, values, mask over the keys, scale, num_splits) after the rows were written.


def _decode_reference(q, keys, values, mask: IntervalMask, scale, num_splits):
    return attention_ref(q, keys, values, mask, check_attention_inputs(q, keys, values, mask, scale, "decode"))


def _decode_flex(q, keys, values, mask: IntervalMask, scale, num_splits):
    return attention_flex(q, keys, values, mask, check_attention_inputs(q, keys, values, mask, scale, "decode"))


def _decode_triton() -> Callable:
    from . import triton_attention  # imports triton and builds the kernels (for the interpreter or the GPU)

    def run(q, keys, values, mask: IntervalMask, scale, num_splits):
        return triton_attention.attention_split_kv_triton(q, keys, values, mask, scale, num_splits)[0]

    run.check_inputs = triton_attention.check_triton_inputs
    return run


def _decode_cuda() -> Callable:
    operator = _extension.operator_loader("decode_attention_cuda")()

    def run(q, keys, values, mask: IntervalMask, scale, num_splits):
        scale = check_attention_inputs(q, keys, values, mask, scale, context="decode")
        return operator(q, keys, values, mask.prefix_end, mask.window_start, mask.window_end, scale,
                        0 if num_splits is None else num_splits)

    return run


backends.register("decode", "reference", summary="write, then SDPA over the cache with the dense mask, any device",
                  load=lambda: _decode_reference)
backends.register("decode", "flex", summary="FlexAttention over the cache (compiled on CUDA)", probe=flex_probe,
                  load=lambda: _decode_flex)
backends.register("decode", "triton", summary="split-KV flash-decoding over the tile map", fused=True,
                  auto_devices=("cuda",), probe=triton_probe("hdlm_kernels.attention.triton_attention"),
                  load=_decode_triton)
backends.register("decode", "cuda", summary="CUDA (csrc/decode_attention_cuda.cu)", fused=True,
                  auto_devices=("cuda",), probe=_extension.operator_probe("decode_attention_cuda", "cuda"),
                  load=_decode_cuda)
