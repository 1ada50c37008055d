"""Fused sampling and its random stream (DESIGN.md §6).

Every sampler draws its randomness from one Philox4x32-10 stream, exposed here as ``uniform53`` so
that tests can check each backend against the independent NumPy twin ``uniform53_ref``.
"""

from .philox import philox4x32_10, philox4x32_10_ref, uniform53, uniform53_ref

__all__ = ["philox4x32_10", "philox4x32_10_ref", "uniform53", "uniform53_ref"]
