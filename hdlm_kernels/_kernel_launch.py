"""The launch configurations a kernel module's dispatch can choose, written down once so that the sm_90
compile gate (``scripts/sm90_check.py``) compiles exactly what the dispatcher launches.

A kernel module builds its launches from the same configuration tables its dispatch code reads and
registers a function that lists them (:func:`register`); the gate calls :func:`dispatchable` and
compiles each :class:`KernelLaunch` for the target GPU with ``kernel.warmup`` (compiles, runs nothing).
Pointer arguments are given as their ``torch.dtype`` (Triton's warmup accepts a dtype in place of a
tensor); scalar arguments as representative values (they decide Triton's integer specializations only).

This module imports neither triton nor a kernel module: the registry is filled by the kernel modules when
they are imported, and the gate imports the ones it checks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KernelLaunch", "register", "dispatchable", "registered_modules", "SMEM_PER_BLOCK", "MAX_REGISTERS"]

# The sm_90 limits the compile gate enforces (CUDA programming guide, compute capability 9.0), shared
# with the autotuning that prunes its candidates by them.
SMEM_PER_BLOCK = 227 * 1024
MAX_REGISTERS = 255


@dataclass(frozen=True)
class KernelLaunch:
    """One compilation of one kernel, as its dispatch would launch it.

    Attributes:
        name: the kernel's role, e.g. ``"attention.forward"``.
        kernel: the ``@triton.jit`` function.
        args: positional arguments (``torch.dtype`` for pointers, numbers for scalars).
        constexprs: the ``tl.constexpr`` arguments by name.
        options: launch options (``num_warps``, ``num_stages``, ``enable_fp_fusion``).
        config: labels that say which dispatch choice this is (head dim, dtype, window class, ...).
        fp64_allowed: whether FP64 instructions are part of the design (the float64 sampling kernels).
        spill_free: whether a register spill fails the gate (bf16/fp16 attention with D <= 128).
        min_blocks_per_sm: the fewest blocks (CTAs) per SM the gate accepts by its occupancy model
            (2 for the bf16/fp16 training attention passes at D = 64, so that one block's softmax or
            epilogue overlaps another's matrix products; 1, any, elsewhere).
    """

    name: str
    kernel: Any
    args: tuple
    constexprs: dict
    options: dict
    config: dict = field(default_factory=dict)
    fp64_allowed: bool = False
    spill_free: bool = False
    min_blocks_per_sm: int = 1

    def label(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.config.items())


_REGISTRY: dict[str, Callable[[], Iterable[KernelLaunch]]] = {}


def register(module: str, launches: Callable[[], Iterable[KernelLaunch]]) -> None:
    """Declare the function that lists the dispatchable launches of kernel module ``module``."""
    _REGISTRY[module] = launches


def registered_modules() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def dispatchable(module: str | None = None) -> list[KernelLaunch]:
    """Every registered launch (of ``module`` only, when given)."""
    modules = [module] if module is not None else list(_REGISTRY)
    missing = [name for name in modules if name not in _REGISTRY]
    if missing:
        raise KeyError(f"dispatchable: no launches registered for {missing}; registered: {sorted(_REGISTRY)}")
    return [launch for name in modules for launch in _REGISTRY[name]()]
