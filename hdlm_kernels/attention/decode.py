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

import weakref
from collections.abc import Callable

import torch

from .. import _extension, backends
from .._triton_device import triton_probe
from ..masks.interval_mask import IntervalMask
from .flex import attention_flex, flex_probe
from .reference import attention_ref, check_attention_inputs

__all__ = ["decode", "decode_ref", "DecodeErrors", "decode_errors"]


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


class DecodeErrors:
    """The value checks of :func:`decode`, kept on the device so that a call never waits for them.

    Each checked call folds its findings into ``state`` (int64 ``[4]``: flags, the largest
    ``cache_len + S`` seen, the smallest ``cache_len`` seen, the ``max_len`` of the cache that overflowed)
    with device ops only; the caller reads them once, when it can afford the wait (after a step, after
    a generation), with :meth:`check`. A call whose checks failed wrote its rows at clamped cells and
    returned rows that must not be used.
    """

    OVERFLOW = 1
    NEGATIVE_LENGTH = 2
    MASK_PAST_WRITTEN = 4

    def __init__(self, device: torch.device | str = "cpu"):
        self.state = torch.zeros(4, dtype=torch.int64, device=device)
        self.clear()

    @property
    def device(self) -> torch.device:
        return self.state.device

    def clear(self) -> None:
        self.state.copy_(torch.tensor([0, 0, torch.iinfo(torch.int64).max, 0]))

    def messages(self, context: str = "decode") -> list[str]:
        """The failed checks in words (reads the state: one host synchronization)."""
        flags, largest, smallest, max_len = self.state.tolist()
        found = []
        if flags & self.OVERFLOW:
            found.append(f"{context}: the cache overflows: cache_len + S = {largest} > max_len = {max_len}")
        if flags & self.NEGATIVE_LENGTH:
            found.append(f"{context}: cache_len must be >= 0, got a smallest value of {smallest}")
        if flags & self.MASK_PAST_WRITTEN:
            found.append(f"{context}: the mask lets a row attend past cache_len + S (cells not written yet); "
                         "rows may attend cells [0, cache_len[b] + S) only")
        return found

    def check(self, context: str = "decode") -> None:
        """Raise a ValueError naming every failed check since the last clear (one host synchronization),
        then clear."""
        found = self.messages(context)
        self.clear()
        if found:
            raise ValueError("; ".join(found))


def _record_checks(state: torch.Tensor, ends: torch.Tensor, cache_len: torch.Tensor, max_len: int,
                   mask_excess: torch.Tensor | None) -> None:
    """Fold one call's checks into a :class:`DecodeErrors` state, with device ops only."""
    largest, smallest = ends.max(), cache_len.min().long()
    overflow = largest > max_len
    flags = overflow.long() * DecodeErrors.OVERFLOW + (smallest < 0).long() * DecodeErrors.NEGATIVE_LENGTH
    if mask_excess is not None and mask_excess.numel():
        flags = flags + (mask_excess.max() > 0).long() * DecodeErrors.MASK_PAST_WRITTEN
    state.copy_(torch.stack([state[0] | flags, torch.maximum(state[1], largest), torch.minimum(state[2], smallest),
                             torch.where(overflow, max_len, state[3])]))


_ERRORS: dict[torch.device, DecodeErrors] = {}


def decode_errors(device: torch.device | str = "cpu") -> DecodeErrors:
    """The per-device :class:`DecodeErrors` that checked :func:`decode` calls record into by default."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    errors = _ERRORS.get(device)
    if errors is None:
        errors = _ERRORS[device] = DecodeErrors(device)
    return errors


# The dense-window mask of the last calls by (cache_len tensor, its in-place version, S, max_len): every
# layer of a step calls decode with the same cache_len, and the mask and its tile maps are built once.
_DENSE_MASKS: dict[tuple, tuple] = {}
_DENSE_MASKS_KEPT = 8


def _dense_window(cache_len: torch.Tensor, rows: int, max_len: int) -> IntervalMask:
    key = (id(cache_len), cache_len._version, rows, max_len, cache_len.device)
    hit = _DENSE_MASKS.get(key)
    if hit is not None and hit[0]() is cache_len:
        return hit[1]
    mask = IntervalMask.dense(cache_len + rows, rows, max_len)
    if len(_DENSE_MASKS) >= _DENSE_MASKS_KEPT:
        _DENSE_MASKS.pop(next(iter(_DENSE_MASKS)))
    _DENSE_MASKS[key] = (weakref.ref(cache_len), mask)
    return mask


def _write_and_mask(k_cache, v_cache, cache_len, k_new, v_new, mask, errors: torch.Tensor | None):
    """Store the new rows at cells ``[cache_len, cache_len + S)`` and return the mask over the cells
    ``[0, max_len)`` that the call reads (``mask`` as given, or the dense window over prefix + rows).
    With ``errors`` (a :class:`DecodeErrors` state), the bounds of the lengths and of the mask are recorded
    there on the device;
    nothing here waits for the device."""
    S = k_new.shape[1]
    max_len = k_cache.shape[1]
    if errors is not None and cache_len.numel():
        ends = cache_len.long() + S
        excess = None
        if mask is not None:
            row_end = torch.maximum(mask.prefix_end, mask.window_end).long()  # [1 or B, S]
            excess = row_end - ends[:, None]
        _record_checks(errors, ends, cache_len, max_len, excess)
    _write_rows(k_cache, v_cache, cache_len, k_new, v_new)
    return mask if mask is not None else _dense_window(cache_len, S, max_len)


def _write_rows(k_cache, v_cache, cache_len, k_new, v_new) -> None:
    """k_cache[b, cache_len[b] + j] = k_new[b, j] (and v), by index, without a host synchronization.
    Cells are clamped into the cache: a length that overflows is flagged by the checks, never written
    out of bounds."""
    B, S = k_new.shape[:2]
    if S:
        cells = (cache_len.long()[:, None] + torch.arange(S, device=cache_len.device)).clamp(0, k_cache.shape[1] - 1)
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
           check: bool = True, errors: DecodeErrors | None = None) -> torch.Tensor:
    """One KV-cached attention call: write ``k_new``/``v_new`` into the cache, attend, return the rows.

    Nothing here waits for the device: the value checks are recorded on the device (``errors``) and the
    keys read are the cache's cells ``[0, max_len)`` under a mask, whatever the lengths' values.

    Args:
        q: ``[B, S, H, D]`` the rows computed this step (re-encoded settled rows, then the window).
        k_cache, v_cache: ``[B, max_len, H, D]`` / ``[B, max_len, H, Dv]``, one layer's cache (e.g.
            ``KVCache.k[layer]``); modified in place at cells ``[cache_len[b], cache_len[b] + S)``.
        cache_len: integer ``[B]`` on q's device: the valid cached cells of each sequence (not
            advanced here).
        k_new, v_new: ``[B, S, H, D]`` / ``[B, S, H, Dv]``, the rows' keys (after rotary) and values.
        mask: None (every row sees cells ``[0, cache_len[b] + S)``: a dense window, built once per
            ``cache_len`` tensor and value version and reused by every layer) or an ``IntervalMask`` with
            ``[1 or B, S]`` rows over cache cells, attending only cells below ``cache_len[b] + S``.
        scale: softmax scale, ``1/sqrt(D)`` when None.
        backend: a name of ``hdlm_kernels.backends.names("decode")``: ``"reference"`` (SDPA with the
            dense mask), ``"flex"``, ``"triton"`` (split-KV when the rows are too few to fill the GPU),
            ``"cuda"`` (the ``_C`` kernel), ``"auto"`` (the fused kernel of q's device when available:
            triton, else cuda; the reference otherwise) or ``"kernels"``.
        num_splits: split-KV count for ``"triton"``/``"cuda"``; None chooses from the GPU's size.
        check: record the value checks (overflow, negative lengths, rows that attend unwritten cells)
            in ``errors`` on the device; ``False`` skips them (generation loops that checked their plan).
        errors: the :class:`DecodeErrors` to record into; None uses ``decode_errors(q.device)``. Read
            it once with ``errors.check()``: it raises a ValueError naming every failed check.

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
    if not isinstance(check, bool):
        raise TypeError(f"{context}: check must be a bool, got {check!r}")
    if q.shape[1] > k_cache.shape[1]:  # known from the shapes: every length overflows
        raise ValueError(f"{context}: the cache overflows: S = {q.shape[1]} rows > max_len = {k_cache.shape[1]}")
    state = None
    if check:
        if errors is None:
            errors = decode_errors(q.device)
        if not isinstance(errors, DecodeErrors) or errors.device != q.device:
            raise TypeError(f"{context}: errors must be a DecodeErrors on {q.device}, got {errors!r}")
        state = errors.state
    if mask is None:
        intervals, key_length = (None, None, None), 0
    else:
        intervals, key_length = (mask.prefix_end, mask.window_start, mask.window_end), mask.key_length
    return _decode_op(q, k_cache, v_cache, cache_len, k_new, v_new, *intervals, key_length, scale, backend,
                      num_splits, state)


def _decode_checked(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_len: torch.Tensor,
                    k_new: torch.Tensor, v_new: torch.Tensor, prefix_end: torch.Tensor | None,
                    window_start: torch.Tensor | None, window_end: torch.Tensor | None, key_length: int,
                    scale: float | None, backend: str, num_splits: int | None,
                    errors: torch.Tensor | None) -> torch.Tensor:
    """The body of the custom op ``hdlm_kernels::decode`` (arguments' metadata checked by ``decode``)."""
    context = "decode"
    mask = None if prefix_end is None else IntervalMask.of_tensors(prefix_end, window_start, window_end, key_length)
    implementation = backends.select("decode", backend, q.device, context)
    # Refuse what the kernels cannot take (dtype, head dim, ...) before the cache is written.
    getattr(implementation.function(), "check_inputs", _no_check)(q, context=context)
    keys_mask = _write_and_mask(k_cache, v_cache, cache_len, k_new, v_new, mask, errors)
    K = keys_mask.key_length
    return implementation(q, k_cache[:, :K], v_cache[:, :K], keys_mask, scale, num_splits)


_decode_op = torch.library.custom_op(
    "hdlm_kernels::decode", _decode_checked, mutates_args=("k_cache", "v_cache", "errors"),
    schema="(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_len, Tensor k_new, Tensor v_new, "
           "Tensor? prefix_end, Tensor? window_start, Tensor? window_end, int key_length, float? scale, "
           "str backend, int? num_splits, Tensor(c!)? errors) -> Tensor")


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_len, k_new, v_new, prefix_end, window_start, window_end, key_length, scale,
      backend, num_splits, errors):
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

    run.check_inputs = _check_cuda_inputs
    return run


def _check_cuda_inputs(q: torch.Tensor, context: str) -> None:
    """What the CUDA kernels take (float16/bfloat16 on tensor cores, float32 on CUDA cores; D = 64 or 128),
    refused before the cache is written."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{context}: backend='cuda' takes float16, bfloat16 or float32 tensors, got {q.dtype}")
    if q.shape[-1] not in (64, 128):
        raise ValueError(f"{context}: backend='cuda' takes head dim D = 64 or 128, got {q.shape[-1]}")


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
