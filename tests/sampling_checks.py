"""What the sampling tests share (pytest puts this folder on sys.path): the backends to parametrize over,
the bit-identity check of two draws, and the sm_90 PTX probe of the Triton kernels.

Every op's tests are written once, against its contract, and run on every implementation the registry
(``hdlm_kernels.backends``) has: ``backend_targets(op)`` lists them with the device each runs on here
(the Triton kernels on CPU tensors under the interpreter, which tests/conftest.py switches on without a
GPU), skipped with the registry's reason when unavailable and marked ``cuda`` on a GPU."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from hdlm_kernels import _extension, backends

# The device kinds each implementation name serves (whether it can run there on this machine is the
# registry's probe): the Triton kernels serve CPU tensors only when built for the interpreter.
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
SERVES = {"reference": ("cpu", "cuda"), "cpp": ("cpu",), "cuda": ("cuda",), "flex": ("cpu", "cuda"),
          "triton": ("cpu",) if INTERPRETER else ("cuda",)}


@dataclasses.dataclass(frozen=True)
class Target:
    """One implementation of an op on one device kind."""

    op: str
    name: str
    kind: str

    @property
    def device(self) -> torch.device:
        return torch.device(self.kind)

    @property
    def interpreted(self) -> bool:
        """Runs in the Triton interpreter (about 10 ms per program: tests keep its shapes small)."""
        return self.name == "triton" and self.kind == "cpu"

    @property
    def implementation(self) -> backends.Implementation:
        return backends.select(self.op, self.name, self.kind)

    def __str__(self) -> str:
        return f"{self.name}-{self.kind}"


def backend_targets(op: str, *, reference_cpu: bool = True, interpreted: bool = True) -> list:
    """pytest params (``Target``) of every implementation of ``op`` on every device kind it serves.

    ``reference_cpu=False`` leaves out the reference on the CPU (the oracle of tests that compare the
    others with it); ``interpreted=False`` leaves out the Triton interpreter (tests whose sizes only a
    compiled kernel affords). Unavailable implementations are skipped with the registry's reason; the
    CUDA ones are marked ``cuda`` (skipped without a GPU by tests/conftest.py)."""
    params = []
    for implementation in backends.implementations(op):
        for kind in SERVES[implementation.name]:
            target = Target(op, implementation.name, kind)
            if (not reference_cpu and str(target) == "reference-cpu") or (not interpreted and target.interpreted):
                continue
            marks = [pytest.mark.cuda] if kind == "cuda" else []
            if kind == "cpu" or torch.cuda.is_available():
                reason = implementation.unavailable_reason(kind)
                if reason:
                    marks.append(pytest.mark.skip(reason=f"{op} backend {implementation.name!r} on {kind}: {reason}"))
            params.append(pytest.param(target, marks=marks, id=str(target)))
    return params


def assert_same_draw(ours, expected):
    """Two (tokens int64, winning scores float64) pairs are the same draw: tokens equal and the scores
    bit for bit, NaN (any payload) where the expected one has NaN."""
    (tokens, best), (tokens_ref, best_ref) = ((t.cpu() for t in pair) for pair in (ours, expected))
    assert tokens.dtype == torch.int64 and best.dtype == torch.float64
    assert torch.equal(tokens, tokens_ref)
    nan = best_ref.isnan()
    assert torch.equal(best.isnan(), nan)
    assert torch.equal(best[~nan].view(torch.int64), best_ref[~nan].view(torch.int64))


def assert_same_bits(ours: torch.Tensor, expected: torch.Tensor):
    """float64 tensors equal bit for bit (NaN payloads included), shape and dtype too."""
    ours = ours.cpu()
    assert ours.dtype == expected.dtype == torch.float64 and ours.shape == expected.shape
    assert torch.equal(ours.view(torch.int64), expected.view(torch.int64))


def compiled_ptx_ops(script: str, tmp_path) -> dict:
    """Runs ``script`` (which compiles Triton kernels for sm_90 without a GPU and prints one JSON line of
    what their PTX holds) outside the interpreter, in a fresh Triton cache; skips when this triton has no
    NVIDIA backend. Returns the parsed JSON."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_isas() -> list[str]:
    """The instruction sets of the C++ screening stage this machine runs ("scalar" always, "avx2" and
    "avx512" where the CPU has them; "avx512" differs from "avx2" in the γ step's exact row sum only); leaves the extension on its automatic choice."""
    C = _extension._C
    available = ["scalar"]
    try:
        for isa in ("avx2", "avx512"):
            try:
                C.set_cpu_isa(isa)
            except RuntimeError:
                break
            available.append(isa)
    finally:
        C.set_cpu_isa("auto")
    return available


def calls_during(module, names: tuple[str, ...], run) -> tuple[dict[str, int], list[str]]:
    """Runs ``run()`` with spies on ``module.<name>`` for each name and on the backend registry's
    ``select``: returns how often each name was called, and the ops ``select`` resolved, in order
    (what the "argument checks run once per call" tests of the sampling ops compare)."""
    patches = {name: mock.patch.object(module, name, wraps=getattr(module, name)) for name in names}
    spies = {name: patch.start() for name, patch in patches.items()}
    try:
        with mock.patch.object(backends, "select", wraps=backends.select) as select:
            run()
    finally:
        for patch in patches.values():
            patch.stop()
    return {name: spy.call_count for name, spy in spies.items()}, [call.args[0] for call in select.call_args_list]


# The float64 literals an exact FP64 decision path may hold: values every compiler writes exactly (powers of
# two, ±0.5, ±1, 2, ±inf, NaN, 0); the coefficients and scales come from a float64 tensor.
EXACT_FLOAT64_LITERALS = frozenset({
    "0d3CA0000000000000", "0d3FE0000000000000", "0dBFE0000000000000", "0d3FF0000000000000", "0dBFF0000000000000",
    "0d4000000000000000", "0d7FF0000000000000", "0dFFF0000000000000", "0d7FF8000000000000", "0d0000000000000000",
})

# A script for ``compiled_ptx_ops``: compiles KERNEL of MODULE (hdlm_kernels.sampling.<MODULE>) for sm_90 with
# each signature of SIGNATURES and the CONSTEXPRS, under the module's launch options with WARPS warps, and
# prints the float64 and float32 PTX operations, the float64 literals and the float64 -> integer conversions.
PTX_OPS_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hdlm_kernels.sampling import {module} as module, triton_stream

found = {{"f64": set(), "f32": set(), "literals": set(), "cvt_to_int": set()}}
for signature in {signatures!r}:
    source = ASTSource(fn=module.{kernel}, signature=signature, constexprs={constexprs!r})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=triton_stream.launch_options({warps}))
    ptx = kernel.asm["ptx"]
    found["f64"] |= set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.f64\b", ptx))
    found["f32"] |= set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.f32\b", ptx))
    found["literals"] |= set(re.findall(r"\b0d[0-9A-F]{{16}}\b", ptx))
    found["cvt_to_int"] |= set(re.findall(r"\bcvt(?:\.[a-z0-9]+)*\.[su]\d+\.f64\b", ptx))
json.dump({{k: sorted(v) for k, v in found.items()}}, sys.stdout)
"""


def ptx_ops_script(module: str, kernel: str, signatures: list, constexprs: dict, warps: int) -> str:
    """The source of ``PTX_OPS_SCRIPT`` for one kernel (see there), to run with ``compiled_ptx_ops``."""
    return PTX_OPS_SCRIPT.format(module=module, kernel=kernel, signatures=signatures, constexprs=constexprs,
                                 warps=warps)


def assert_exact_float64_path(found: dict, extra_literals=()) -> None:
    """What bit-identity of a Triton kernel's FP64 decision path rests on, from ``PTX_OPS_SCRIPT``'s output:
    no fused multiply-add and no approximate operation in float64, IEEE round-to-nearest float64
    arithmetic, truncating float64 -> integer conversions, and no float64 literal but the exact ones
    (``EXACT_FLOAT64_LITERALS`` and ``extra_literals``)."""
    assert not [op for op in found["f64"] if op.startswith("fma") or "approx" in op], found["f64"]
    arithmetic = [op for op in found["f64"] if op.split(".")[0] in ("add", "sub", "mul", "div")]
    assert arithmetic and all(".rn." in op for op in arithmetic), found["f64"]
    assert all(".rzi." in op for op in found["cvt_to_int"]), found["cvt_to_int"]
    assert set(found["literals"]) <= EXACT_FLOAT64_LITERALS | set(extra_literals), found["literals"]
