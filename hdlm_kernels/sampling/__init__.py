"""Fused sampling and its random stream (docs/sampling-stream.md).

Every sampler draws its randomness from one Philox4x32-10 stream, exposed here as ``uniform53`` so
that tests can check each backend against the independent NumPy twin ``uniform53_ref``.
``gumbel_argmax`` samples tokens by FP64 Gumbel-max (stream 0); ``acs_step`` / ``acs_decisions`` are
the adaptive correction sampler's update (stream 1 decides, stream 0 samples); ``hybrid_step`` is one
reverse step of the γ-hybrid process (analytic τ-leaping or Euler, drawn on stream 0); ``corrupt`` is
the forward noise of training (stream 2). Each has a ``_ref`` twin. ``gumbel_argmax_deferred`` and
``hybrid_step_deferred`` draw the same tokens without synchronizing with the host (they report bad
rows in a device flag instead of raising), for generation loops. Every op's implementations are
registered with ``hdlm_kernels.backends``.
"""

from .acs import acs_apply, acs_decisions, acs_plan, acs_step, acs_step_ref
from .corrupt import corrupt, corrupt_deferred, corrupt_ref
from .gumbel import fused_backend, gumbel_argmax, gumbel_argmax_deferred, gumbel_argmax_ref
from .hybrid import hybrid_step, hybrid_step_deferred, hybrid_step_ref
from .screen import gumbel_candidates, hybrid_candidates
from .philox import philox4x32_10, philox4x32_10_ref, uniform53, uniform53_ref

__all__ = [
    "acs_apply",
    "acs_decisions",
    "acs_plan",
    "acs_step",
    "acs_step_ref",
    "corrupt",
    "corrupt_deferred",
    "corrupt_ref",
    "fused_backend",
    "gumbel_argmax",
    "gumbel_argmax_deferred",
    "gumbel_argmax_ref",
    "gumbel_candidates",
    "hybrid_candidates",
    "hybrid_step",
    "hybrid_step_deferred",
    "hybrid_step_ref",
    "philox4x32_10",
    "philox4x32_10_ref",
    "uniform53",
    "uniform53_ref",
]
