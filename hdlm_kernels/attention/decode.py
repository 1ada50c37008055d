"""KV-cached decode attention (DESIGN §7): the rows computed this generation step attend over the
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

import torch

from ..masks.interval_mask import IntervalMask

__all__ = ["decode", "decode_ref", "DECODE_BACKENDS"]

DECODE_BACKENDS = ("auto", "reference", "flex", "triton", "cuda")
"""Backend names ``decode`` accepts."""


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
        backend: ``"reference"`` (SDPA with the dense mask), ``"flex"``, ``"triton"`` (split-KV when
            the rows are too few to fill the GPU), ``"cuda"`` (the ``_C`` kernel), or ``"auto"``
            (triton on CUDA tensors when importable, the reference otherwise).
        num_splits: split-KV count for ``"triton"``/``"cuda"``; None chooses from the GPU's size.
        check: validate ``cache_len`` and the mask against the cache (overflow, negative lengths, rows
            that attend unwritten cells) at the cost of one host synchronization. ``False`` skips it
            and needs a ``mask``: for generation loops that track every length on the host and checked
            their masks once (``hdlm_reference.generate``); the caller then owns those guarantees.

    Returns:
        ``[B, S, H, Dv]`` in q's dtype. Inference only: no autograd.
    """
    from . import _triton_importable, _triton_module, attention

    context = "decode"
    if not isinstance(backend, str) or backend not in DECODE_BACKENDS:
        raise ValueError(f"{context}: unknown backend {backend!r}; expected one of "
                         f"{', '.join(map(repr, DECODE_BACKENDS))}")
    _check_decode_inputs(q, k_cache, v_cache, cache_len, k_new, v_new, mask, context)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_new, v_new)):
        raise RuntimeError(f"{context}: decode is inference-only (the cache is written in place); call it "
                           "under torch.no_grad()")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"{context}: num_splits must be None or an int >= 1, got {num_splits!r}")
    if backend == "auto":
        backend = "triton" if q.device.type == "cuda" and _triton_importable() else "reference"
    if backend == "cuda":
        cuda_decode = _cuda_decode_fn(q)
    if backend == "triton":
        _triton_module().check_triton_inputs(q, context=context)
    if not check and mask is None:
        raise ValueError(f"{context}: check=False needs a mask (without one, the key length is read from "
                         "cache_len on the host)")
    keys_mask = _write_and_mask(k_cache, v_cache, cache_len, k_new, v_new, mask, context, check)
    K = keys_mask.key_length
    keys, values = k_cache[:, :K], v_cache[:, :K]
    if backend == "cuda":
        return cuda_decode(q, keys, values, keys_mask, scale, num_splits)
    if backend == "triton":
        return _triton_module().attention_split_kv_triton(q, keys, values, keys_mask, scale, num_splits)[0]
    return attention(q, keys, values, keys_mask, scale, backend=backend)  # "reference" or "flex"


def _cuda_decode_fn(q: torch.Tensor):
    """The CUDA kernel's launcher, or a clear error saying why it cannot run here."""
    from .._extension import require_extension

    if q.device.type != "cuda":
        raise RuntimeError(f"decode: backend='cuda' needs CUDA tensors, got {q.device}")
    _C = require_extension("decode attention (backend='cuda')", "cuda")
    if not hasattr(_C, "decode_attention_cuda"):
        raise RuntimeError("decode: backend='cuda' needs an hdlm_kernels._C with decode_attention_cuda; this "
                           "build predates it, reinstall hdlm-kernels")

    def run(q, keys, values, mask: IntervalMask, scale, num_splits):
        from .reference import check_attention_inputs

        scale = check_attention_inputs(q, keys, values, mask, scale, context="decode")
        return _C.decode_attention_cuda(q, keys, values, mask.prefix_end, mask.window_start, mask.window_end,
                                        scale, 0 if num_splits is None else num_splits)

    return run
