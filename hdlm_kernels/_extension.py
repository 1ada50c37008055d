"""The optional compiled extension ``hdlm_kernels._C``, and why it is missing when it is.

``_C`` is None when the extension was not built, failed to build, or fails to import (for example
when it was built against another torch). ``missing_reason`` then says why, in words, combining the
import error with what the build recorded in ``_build_info.json`` (see setup.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")


def load_build_info() -> dict | None:
    """What setup.py recorded about the last build of _C (a dict), or None if nothing was recorded."""
    try:
        return json.loads(BUILD_INFO_PATH.read_text())
    except (OSError, ValueError):
        return None


def _import_extension() -> tuple[ModuleType | None, str]:
    try:
        from hdlm_kernels import _C as extension
    except ImportError as error:
        build_info = load_build_info()
        if build_info is None:
            return None, f"hdlm_kernels._C is not importable ({error}) and no build was recorded"
        cpp = build_info.get("cpp", {})
        if cpp.get("status") != "built":
            outcome = "failed" if cpp.get("status") == "failed" else "was skipped"
            return (
                None,
                f"the build of hdlm_kernels._C {outcome}: {cpp.get('reason') or 'no reason recorded'}",
            )
        return None, (
            f"hdlm_kernels._C was built against torch {build_info.get('torch_version')} but does not import "
            f"with torch {torch.__version__}: {error}; reinstall hdlm-kernels"
        )
    return extension, ""


_C, missing_reason = _import_extension()


def cuda_missing_reason() -> str:
    """Why _C has no CUDA operators ("" when it has them)."""
    if _C is None:
        return missing_reason
    if getattr(_C, "with_cuda", False):
        return ""
    build_info = load_build_info() or {}
    cuda = build_info.get("cuda", {})
    outcome = "failed" if cuda.get("status") == "failed" else "was skipped"
    reason = cuda.get("reason") or "no reason recorded"
    return f"hdlm_kernels._C was built without CUDA (the CUDA build {outcome}: {reason})"


def operator_probe(operator_name: str, device_kind: str) -> Callable[[str], str]:
    """The availability probe (``hdlm_kernels.backends``) of the ``_C`` operator ``operator_name``,
    which runs tensors of ``device_kind`` ("cpu" or "cuda") only."""
    where = "CPU" if device_kind == "cpu" else "CUDA"

    def probe(kind: str) -> str:
        if kind != device_kind:
            return f"hdlm_kernels._C.{operator_name} runs on {where} tensors only"
        reason = cuda_missing_reason() if device_kind == "cuda" else missing_reason
        if reason:
            return reason
        if not hasattr(_C, operator_name):
            return (f"hdlm_kernels._C has no {operator_name} (it was built from older sources); reinstall with "
                    "`pip install --no-build-isolation .`")
        if device_kind == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        return ""

    return probe


def operator_loader(operator_name: str) -> Callable[[], Callable]:
    """The loader (``hdlm_kernels.backends``) of the ``_C`` operator ``operator_name``."""
    return lambda: getattr(_C, operator_name)
