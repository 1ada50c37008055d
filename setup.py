"""Build script of hdlm-kernels (docs/architecture.md, "The compiled extension").

Metadata lives in pyproject.toml; this file adds what a static file cannot say: the optional
extension ``hdlm_kernels._C`` built against the torch that is already installed (hence
``pip install --no-build-isolation``), and the ``hdlm_reference`` package mapped onto ``reference/``.

Environment:
  HDLM_KERNELS_BUILD_CUDA  0: never compile CUDA; 1: compile CUDA or fail; auto (default): compile it
                           when torch is a CUDA build and nvcc is found (CUDA_HOME, PATH, /usr/local/cuda).
  TORCH_CUDA_ARCH_LIST     defaults to "9.0" when no GPU is visible (torch cannot guess then).
  MAX_JOBS                 parallel compile jobs (honoured by torch's ninja build).
  HDLM_KERNELS_REQUIRE_EXTENSION=1  make a failed C++ build an error instead of a warning (CI).

The C++ CPU sources are always compiled when torch and a C++ compiler are present. A failed or
skipped optional build leaves a working pure-Python package; what happened is recorded in
hdlm_kernels/_build_info.json, which hdlm_kernels.info() reports.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext as SetuptoolsBuildExt

EXTENSION_NAME = "hdlm_kernels._C"
BUILD_INFO_FILE = "_build_info.json"
CPU_SOURCES = ["csrc/bindings.cpp", "csrc/uniform53_cpu.cpp", "csrc/gumbel_cpu.cpp", "csrc/hybrid_cpu.cpp",
               "csrc/log64_cpu.cpp", "csrc/cpu_isa.cpp", "csrc/screen_cpu.cpp",
               "csrc/screen_tile_cpu.cpp", "csrc/hybrid_screen_tile_cpu.cpp", "csrc/hybrid_sum_cpu.cpp"]
CUDA_SOURCES = [
    "csrc/uniform53_cuda.cu", "csrc/gumbel_cuda.cu", "csrc/hybrid_cuda.cu", "csrc/decode_attention_cuda.cu",
]
# -ffp-contract=off: no fused multiply-add in host code (log64.h must round every operation separately).
CXX_FLAGS = ["-O3", "-ffp-contract=off"]
# No fast-math: the samplers must stay bit-identical to the CPU path. -lineinfo costs no speed.
NVCC_FLAGS = ["-O3", "-lineinfo"]
DEFAULT_ARCH_WITHOUT_GPU = "9.0"

try:
    import torch
except Exception as torch_import_error:  # noqa: BLE001 - any failure means "build without torch"
    torch = None
    TORCH_ERROR: str | None = f"torch is not importable at build time ({torch_import_error!r})"
else:
    TORCH_ERROR = None


@dataclass
class CudaPlan:
    """Whether to compile the CUDA sources, and why (or why not)."""

    mode: str  # "0", "1" or "auto"
    build: bool
    reason: str
    cuda_home: str | None = None


def _cuda_mode() -> str:
    mode = os.environ.get("HDLM_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"HDLM_KERNELS_BUILD_CUDA must be one of 0, 1, auto; got {mode!r}")
    return mode


def _is_cuda_toolkit(home: str | None) -> bool:
    return bool(home) and all(
        os.path.isfile(os.path.join(home, *part)) for part in (("bin", "nvcc"), ("include", "cuda_runtime.h"))
    )


def _find_cuda_home() -> str | None:
    """The CUDA toolkit directory (bin/nvcc and include/cuda_runtime.h), or None.

    An nvcc on PATH may be a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc), so
    its parent directory is only taken when it really holds the toolkit.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    return next((home for home in candidates if _is_cuda_toolkit(home)), None)


def _plan_cuda() -> CudaPlan:
    mode = _cuda_mode()
    if mode == "0":
        return CudaPlan(mode, False, "HDLM_KERNELS_BUILD_CUDA=0")
    if torch is None:
        return CudaPlan(mode, False, TORCH_ERROR or "torch is missing")
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    else:
        cuda_home = _find_cuda_home()
        if cuda_home is not None:
            return CudaPlan(mode, True, f"torch CUDA {torch.version.cuda}, nvcc in {cuda_home}", cuda_home)
        reason = (
            "no CUDA toolkit found (bin/nvcc and include/cuda_runtime.h under CUDA_HOME, CUDA_PATH, "
            "the nvcc on PATH or /usr/local/cuda)"
        )
    if mode == "1":
        raise SystemExit(f"HDLM_KERNELS_BUILD_CUDA=1 but the CUDA sources cannot be built: {reason}")
    return CudaPlan(mode, False, reason)


CUDA_PLAN = _plan_cuda()
if CUDA_PLAN.build:
    # torch.utils.cpp_extension reads both variables when it is imported, so set them first.
    os.environ["CUDA_HOME"] = CUDA_PLAN.cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_WITHOUT_GPU

if torch is not None:
    from torch.utils.cpp_extension import BuildExtension as BaseBuildExt
    from torch.utils.cpp_extension import CppExtension, CUDAExtension, is_ninja_available
else:
    BaseBuildExt = SetuptoolsBuildExt


def make_extension(with_cuda: bool) -> Extension:
    """The hdlm_kernels._C extension, with or without the CUDA sources."""
    if torch is None:
        # Never compiled (OptionalBuildExt skips it); it only makes setuptools run build_ext,
        # which records why the extension is missing.
        return Extension(EXTENSION_NAME, sources=list(CPU_SOURCES))
    include_dirs = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")]
    if with_cuda:
        return CUDAExtension(
            EXTENSION_NAME,
            sources=CPU_SOURCES + CUDA_SOURCES,
            include_dirs=include_dirs,
            define_macros=[("HDLM_WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS + _openmp_flags(), "nvcc": list(NVCC_FLAGS)},
            extra_link_args=_openmp_flags(),
        )
    return CppExtension(
        EXTENSION_NAME,
        sources=list(CPU_SOURCES),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": CXX_FLAGS + _openmp_flags()},
        extra_link_args=_openmp_flags(),
    )


def _compiler_missing_reason() -> str | None:
    cxx = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]
    if shutil.which(cxx[0]) is None:
        return f"no C++ compiler found ({cxx[0]!r} is not on PATH; set CXX)"
    return None


_OPENMP_PROBE: list[list[str]] = []


def _openmp_flags() -> list[str]:
    """["-fopenmp"] when the C++ compiler builds an OpenMP program (the CPU sampler then runs its rows in
    parallel), else [] (the sources guard their pragmas with _OPENMP and run serially)."""
    if not _OPENMP_PROBE:
        cxx = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]
        with tempfile.TemporaryDirectory() as directory:
            source = os.path.join(directory, "probe.cpp")
            with open(source, "w") as f:
                f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
            try:
                result = subprocess.run(cxx + ["-fopenmp", source, "-o", os.path.join(directory, "probe")],
                                        capture_output=True, timeout=120)
                works = result.returncode == 0
            except (OSError, subprocess.SubprocessError):
                works = False
        _OPENMP_PROBE.append(["-fopenmp"] if works else [])
    return list(_OPENMP_PROBE[0])


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())[:500]
    return f"{type(error).__name__}: {text} (the compiler output is in the build log: pip install -v)"


class OptionalBuildExt(BaseBuildExt):
    """build_ext whose failure leaves a pure-Python package (unless CUDA was forced), and which
    records the outcome in hdlm_kernels/_build_info.json next to where _C would be."""

    def __init__(self, *args, **kwargs):
        if torch is not None:
            kwargs.setdefault("use_ninja", is_ninja_available())
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        started = time.monotonic()
        cpp = {"status": "skipped", "reason": ""}
        cuda = {"status": "skipped", "reason": CUDA_PLAN.reason}
        with_cuda = False
        skip_reason = TORCH_ERROR or _compiler_missing_reason()
        if skip_reason is not None:
            cpp["reason"] = skip_reason
            if CUDA_PLAN.build:
                cuda["reason"] = skip_reason
            self._warn(f"hdlm_kernels._C not built: {skip_reason}")
        else:
            outcome = self._try_build()
            if outcome is None:
                cpp = {"status": "built", "reason": ""}
                with_cuda = CUDA_PLAN.build
                if with_cuda:
                    cuda = {"status": "built", "reason": CUDA_PLAN.reason}
            elif CUDA_PLAN.build:
                cuda = {"status": "failed", "reason": outcome}
                if CUDA_PLAN.mode == "1":
                    self._write_build_info(
                        cpp | {"status": "failed", "reason": outcome}, cuda, False, started
                    )
                    raise SystemExit(f"HDLM_KERNELS_BUILD_CUDA=1 and the CUDA build failed: {outcome}")
                self._warn(f"CUDA build of hdlm_kernels._C failed ({outcome}); retrying without CUDA")
                self._replace_extension(make_extension(with_cuda=False))
                cpu_outcome = self._try_build()
                cpp = (
                    {"status": "built", "reason": ""}
                    if cpu_outcome is None
                    else {"status": "failed", "reason": cpu_outcome}
                )
            else:
                cpp = {"status": "failed", "reason": outcome}
            if cpp["status"] == "failed":
                self._remove_stale_extension()
                self._warn(
                    f"hdlm_kernels._C not built ({cpp['reason']}); the pure-Python backends still work"
                )
        self._write_build_info(cpp, cuda, with_cuda, started)
        if cpp["status"] != "built" and os.environ.get("HDLM_KERNELS_REQUIRE_EXTENSION") == "1":
            # CI sets this: a broken C++ build must fail loudly (pip then shows the compiler output).
            raise SystemExit(f"HDLM_KERNELS_REQUIRE_EXTENSION=1 but hdlm_kernels._C was not built: {cpp['reason']}")

    def _try_build(self) -> str | None:
        """Builds the extensions; returns None on success, else why it failed."""
        # build_ext.run() replaces the compiler name by a compiler object (which a second run()
        # rejects) and leaves inplace cleared when the build raises: restore both for a retry.
        inplace, compiler = self.inplace, self.compiler
        try:
            super().run()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # noqa: BLE001 - compilers fail in many ways; all mean "not built"
            return _describe(error)
        finally:
            self.inplace, self.compiler = inplace, compiler
        return None

    def _replace_extension(self, extension: Extension) -> None:
        """Swaps in `extension` (same name) after finalize_options, keeping setuptools' per-extension
        bookkeeping (private attributes such as _full_name and _needs_stub), which depends on the
        name only."""
        (previous,) = self.extensions
        for attribute, value in vars(previous).items():
            if attribute.startswith("_") and not hasattr(extension, attribute):
                setattr(extension, attribute, value)
        self.extensions = [extension]
        self.ext_map = {key: extension if value is previous else value for key, value in self.ext_map.items()}

    def _remove_stale_extension(self) -> None:
        """Deletes a _C left by an earlier build, so that it cannot contradict the recorded failure."""
        inplace = self.inplace
        try:
            for build_location_is_source in (False, True):
                self.inplace = build_location_is_source
                path = self.get_ext_fullpath(EXTENSION_NAME)
                if os.path.exists(path):
                    os.remove(path)
        finally:
            self.inplace = inplace

    def _write_build_info(self, cpp: dict, cuda: dict, with_cuda: bool, started: float) -> None:
        info = {
            "cpp": cpp,
            "cuda": cuda,
            "with_cuda": with_cuda,
            "torch_version": None if torch is None else torch.__version__,
            "torch_cuda_version": None if torch is None else torch.version.cuda,
            "cuda_home": CUDA_PLAN.cuda_home,
            "cuda_arch_list": (os.environ.get("TORCH_CUDA_ARCH_LIST") or "torch default (visible GPUs)")
            if CUDA_PLAN.build
            else None,
            "build_cuda_mode": CUDA_PLAN.mode,
            "python_version": platform.python_version(),
            "build_seconds": round(time.monotonic() - started, 1),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        directory = os.path.dirname(self.get_ext_fullpath(EXTENSION_NAME))
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, BUILD_INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")

    @staticmethod
    def _warn(message: str) -> None:
        print(f"\nWARNING (hdlm-kernels): {message}\n", file=sys.stderr, flush=True)


REFERENCE_PACKAGES = ["hdlm_reference"] + [f"hdlm_reference.{p}" for p in find_packages(where="reference")]

setup(
    packages=find_packages(include=["hdlm_kernels", "hdlm_kernels.*"]) + REFERENCE_PACKAGES,
    package_dir={"hdlm_reference": "reference"},
    ext_modules=[make_extension(with_cuda=CUDA_PLAN.build)],
    cmdclass={"build_ext": OptionalBuildExt},
    zip_safe=False,
)
