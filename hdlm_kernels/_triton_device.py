"""Where the package's Triton kernels can run: CUDA tensors when they were compiled for the GPU, CPU
tensors when they were built for the Triton interpreter (``TRITON_INTERPRET=1`` set before their module
was imported). One check, shared by the attention and the sampling kernels."""

from __future__ import annotations

import torch


def built_for_interpreter(kernel) -> bool:
    """Whether ``@triton.jit`` made ``kernel`` for the interpreter (it decides when the module loads)."""
    return type(kernel).__name__ == "InterpretedFunction"


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
