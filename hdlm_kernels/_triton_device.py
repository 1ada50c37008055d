"""Where the package's Triton kernels can run: CUDA tensors when they were compiled for the GPU, CPU
tensors when they were built for the Triton interpreter (``TRITON_INTERPRET=1`` set before their module
was imported). One check and one availability probe, shared by the attention and the sampling kernels."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable

import torch


def built_for_interpreter(kernel) -> bool:
    """Whether ``@triton.jit`` made ``kernel`` for the interpreter (it decides when the module loads).
    Every kernel module asks before launching, so the interpreter's shims are applied here."""
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    if interpreted:
        _shim_interpreter_index()
    return interpreted


def _shim_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with ``int(array)`` on a one-element
    NumPy array, which NumPy 2 refuses ("only 0-dimensional arrays can be converted"): a runtime loop
    bound or step (``range(n)`` with ``n`` a kernel argument) then fails. Triton 3.8 squeezes the array
    first; this applies the same conversion once, and only to an interpreter that lacks it, so that the
    GPU machine's triton 3.6.0 runs the CPU suite as the pinned version does."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_hdlm_index_shim", None) is not None:
        return
    original = interpreter._patch_lang_tensor
    try:
        needed = "int(self.handle.data)" in inspect.getsource(original)
    except (OSError, TypeError):
        needed = False
    interpreter._hdlm_index_shim = needed
    if not needed:
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


def check_triton_device(tensor: torch.Tensor, context: str, interpreted: bool) -> None:
    """Raise a clear RuntimeError when kernels built for the interpreter (``interpreted``) or for the
    GPU cannot take ``tensor``; never let a call fall back to another backend."""
    if tensor.device.type == "cuda":
        if interpreted:
            raise RuntimeError(f"{context}: the Triton kernels were built for the interpreter "
                               "(TRITON_INTERPRET=1), which runs CPU tensors only, but the tensors are on "
                               f"{tensor.device}; unset TRITON_INTERPRET to run them on the GPU")
        return
    if tensor.device.type != "cpu" or not interpreted:
        raise RuntimeError(f"{context}: backend='triton' runs on CUDA tensors, or on CPU tensors under the "
                           "Triton interpreter (set TRITON_INTERPRET=1 before the first backend='triton' "
                           f"call); the tensors are on {tensor.device}")


def triton_probe(module_name: str) -> Callable[[str], str]:
    """The availability probe (``hdlm_kernels.backends``) of the Triton kernels in ``module_name``.

    The kernels are built for the GPU or for the interpreter when their module is imported; until then
    the environment decides, so the probe does not import them (importing the package never imports
    triton)."""

    def probe(kind: str) -> str:
        try:
            import triton  # noqa: F401
        except Exception as error:  # noqa: BLE001 - a broken triton install is "unavailable", with the reason
            return f"triton is not importable ({type(error).__name__}: {error})"
        module = sys.modules.get(module_name)
        if module is not None:
            interpreted = module.interpreted()
        else:
            interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if kind == "cuda":
            if not torch.cuda.is_available():
                return "no CUDA GPU is visible"
            if interpreted:
                return ("the Triton kernels were built for the interpreter (TRITON_INTERPRET=1), which runs CPU "
                        "tensors only")
            return ""
        if kind == "cpu":
            return "" if interpreted else ("runs on CUDA tensors, or on CPU tensors under the Triton interpreter "
                                           "(set TRITON_INTERPRET=1 before the first use)")
        return f"runs on CUDA tensors (or CPU tensors under the interpreter), not on {kind}"

    return probe

