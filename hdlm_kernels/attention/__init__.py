"""Attention over hyperschedule masks (docs/attention.md): one entry point with pluggable backends
(:func:`attention`, in :mod:`.interface`), and its KV-cached inference form (:func:`decode`, in
:mod:`.decode`). The backends are registered with ``hdlm_kernels.backends`` as ops ``attention`` and
``decode``; each has a reference twin (``attention_ref``, ``decode_ref``)."""

from .. import backends
from .decode import DecodeErrors, decode, decode_errors, decode_ref
from .interface import attention
from .reference import attention_lse_ref, attention_ref

__all__ = ["attention", "attention_ref", "attention_lse_ref", "BACKENDS", "decode", "decode_ref",
           "DecodeErrors", "decode_errors", "DECODE_BACKENDS"]

BACKENDS = backends.names("attention")
"""Backend names ``attention`` accepts (kept for compatibility; ``hdlm_kernels.backends`` is the source)."""
DECODE_BACKENDS = backends.names("decode")
"""Backend names ``decode`` accepts (kept for compatibility; ``hdlm_kernels.backends`` is the source)."""
