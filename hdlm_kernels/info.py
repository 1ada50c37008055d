"""``hk.info()``: which backends work on this machine, and if one does not, why.

Rendered from the registry (:mod:`hdlm_kernels.backends`): per op, what ``backend="auto"`` chooses for
CPU and CUDA tensors here, and every implementation with where it runs or why it does not. Above it,
the four kinds of backend (reference, C++ extension, CUDA extension, Triton) with versions."""

from __future__ import annotations

import dataclasses
import os
import platform

import torch

from . import _extension, backends
from ._version import __version__

BACKEND_NAMES = ("reference", "cpp", "cuda", "triton")


@dataclasses.dataclass(frozen=True)
class Versions:
    hdlm_kernels: str
    torch: str
    triton: str | None  # None when triton is not importable
    cuda: str | None  # CUDA runtime torch was built with; None for a CPU build
    python: str


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    detail: str  # what it runs on when available, why not otherwise


@dataclasses.dataclass(frozen=True)
class ImplementationStatus:
    name: str
    summary: str
    runs_on: tuple[str, ...]  # device kinds ("cpu", "cuda") whose tensors it runs here
    unavailable: dict[str, str]  # device kind -> why it does not run there


@dataclasses.dataclass(frozen=True)
class OpStatus:
    op: str
    auto: dict[str, str]  # device kind -> the implementation "auto" picks there (kinds present here)
    implementations: tuple[ImplementationStatus, ...]  # in order of preference


@dataclasses.dataclass(frozen=True)
class Info:
    versions: Versions
    gpu: str | None  # name of CUDA device 0, None without a CUDA GPU
    backends: tuple[BackendStatus, ...]  # one per name in BACKEND_NAMES, in that order
    ops: tuple[OpStatus, ...] = ()  # one per registered op

    def op(self, name: str) -> OpStatus:
        for status in self.ops:
            if status.op == name:
                return status
        raise KeyError(f"op must be one of {', '.join(s.op for s in self.ops)}; got {name!r}")

    def backend(self, name: str) -> BackendStatus:
        for status in self.backends:
            if status.name == name:
                return status
        raise KeyError(f"backend must be one of {', '.join(BACKEND_NAMES)}; got {name!r}")

    def as_dict(self) -> dict:
        return {
            "versions": dataclasses.asdict(self.versions),
            "gpu": self.gpu,
            "backends": {s.name: {"available": s.available, "detail": s.detail} for s in self.backends},
            "ops": {o.op: {"auto": dict(o.auto),
                           "implementations": {i.name: {"runs_on": list(i.runs_on), "unavailable": dict(i.unavailable),
                                                        "summary": i.summary} for i in o.implementations}}
                    for o in self.ops},
        }

    def __str__(self) -> str:
        v = self.versions
        header = (
            f"hdlm_kernels {v.hdlm_kernels} | torch {v.torch} | triton {v.triton or '-'} | "
            f"CUDA {v.cuda or '-'} | python {v.python} | GPU {self.gpu or '-'}"
        )
        rows = [("backend", "available", "detail")] + [
            (s.name, "yes" if s.available else "no", s.detail) for s in self.backends
        ]
        widths = [max(len(r[column]) for r in rows) for column in range(3)]
        lines = [f"{r[0]:<{widths[0]}} | {r[1]:<{widths[1]}} | {r[2]}" for r in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return "\n".join([header, *lines, "", *self._op_lines()])

    def _op_lines(self) -> list[str]:
        """One row per op: what "auto" picks for CPU and CUDA tensors, and every implementation with the
        device kinds it runs on here (``-`` for none)."""
        rows = [("op", "auto: cpu", "auto: cuda", "implementations (runs on)")]
        for status in self.ops:
            listed = ", ".join(f"{i.name} ({'/'.join(i.runs_on) or '-'})" for i in status.implementations)
            rows.append((status.op, status.auto.get("cpu", "-"), status.auto.get("cuda", "-"), listed))
        widths = [max(len(r[column]) for r in rows) for column in range(3)]
        lines = [f"{r[0]:<{widths[0]}} | {r[1]:<{widths[1]}} | {r[2]:<{widths[2]}} | {r[3]}" for r in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths) + "-+-" + "-" * 30)
        return lines


def info() -> Info:
    """Versions, GPU, the availability of each kind of backend ("reference", "cpp", "cuda", "triton"),
    and per registered op what ``"auto"`` picks and where each implementation runs."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    triton_version, triton_error = _triton_version()
    versions = Versions(
        hdlm_kernels=__version__,
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        python=platform.python_version(),
    )
    statuses = (
        BackendStatus("reference", True, f"pure PyTorch (torch {torch.__version__}), every device"),
        _cpp_status(),
        _cuda_status(gpu),
        _triton_status(gpu, triton_error),
    )
    return Info(versions=versions, gpu=gpu, backends=statuses, ops=tuple(_op_status(op) for op in backends.ops()))


def _op_status(op: str) -> OpStatus:
    kinds = [kind for kind in backends.DEVICE_KINDS if kind != "cuda" or torch.cuda.is_available()]
    auto = {kind: backends.select(op, backends.AUTO, kind).name for kind in kinds}
    implementations = []
    for implementation in backends.implementations(op):
        reasons = {kind: implementation.unavailable_reason(kind) for kind in backends.DEVICE_KINDS}
        implementations.append(ImplementationStatus(
            implementation.name, implementation.summary,
            runs_on=tuple(kind for kind, reason in reasons.items() if not reason),
            unavailable={kind: reason for kind, reason in reasons.items() if reason}))
    return OpStatus(op, auto, tuple(implementations))


def _triton_version() -> tuple[str | None, str]:
    try:
        import triton
    except Exception as error:  # noqa: BLE001 - a broken triton install is "not available", with the reason
        return None, f"triton is not importable ({type(error).__name__}: {error})"
    return getattr(triton, "__version__", "unknown"), ""


def _cpp_status() -> BackendStatus:
    if _extension._C is None:
        return BackendStatus("cpp", False, _extension.missing_reason)
    build_info = _extension.load_build_info() or {}
    built_against = build_info.get("torch_version")
    detail = f"hdlm_kernels._C, CPU operators (built against torch {built_against or 'unknown'})"
    return BackendStatus("cpp", True, detail)


def _cuda_status(gpu: str | None) -> BackendStatus:
    reason = _extension.cuda_missing_reason()
    if reason:
        return BackendStatus("cuda", False, reason)
    arch_list = (_extension.load_build_info() or {}).get("cuda_arch_list") or "unknown"
    if gpu is None:
        return BackendStatus(
            "cuda", False, f"hdlm_kernels._C has CUDA operators (arch {arch_list}) but no CUDA GPU is visible"
        )
    return BackendStatus("cuda", True, f"hdlm_kernels._C CUDA operators (arch {arch_list}) on {gpu}")


def _triton_status(gpu: str | None, triton_error: str) -> BackendStatus:
    if triton_error:
        return BackendStatus("triton", False, triton_error)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if gpu is not None:
        note = "; TRITON_INTERPRET=1 is set, so kernels run in the interpreter" if interpreted else ""
        return BackendStatus("triton", True, f"compiled kernels on {gpu}{note}")
    if interpreted:
        return BackendStatus(
            "triton",
            False,
            "no CUDA GPU; TRITON_INTERPRET=1 runs the kernels in the interpreter on CPU (slow, for tests)",
        )
    return BackendStatus(
        "triton", False, "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels in the interpreter on CPU)"
    )
