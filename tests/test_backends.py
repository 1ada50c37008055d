"""The backend registry (hdlm_kernels/backends.py): one rule for "auto", "kernels" and explicit names on
every op; refusals that name the op, the knob and the names it has; no silent fallback when a named
implementation is missing (no extension, a stale one, one without CUDA, a broken triton, kernels built
for the other device); and every implementation of every op reached only through the registry."""

import pathlib
import re
import sys
import types

import pytest
import torch

import hdlm_kernels as hk
from hdlm_kernels import _extension, backends
from hdlm_kernels.masks import IntervalMask
from hdlm_kernels.sampling import log64 as log64_module

SAMPLING_OPS = ("gumbel_argmax", "acs", "hybrid_step", "uniform53", "corrupt", "log64", "exp64", "gumbel_noise",
                "philox4x32_10")
ALL_OPS = ("attention", "decode") + SAMPLING_OPS
ROOT = pathlib.Path(__file__).resolve().parents[1]


def extension_with(name):
    if _extension._C is None or not hasattr(_extension._C, name):
        pytest.skip(f"hdlm_kernels._C has no {name}: {_extension.missing_reason or 'built from older sources'}")


# ---------------------------------------------------------------- the registry's contents and rule


def test_every_op_is_registered_with_a_reference_first():
    assert set(ALL_OPS) <= set(backends.ops())
    for op in backends.ops():
        implementations = backends.implementations(op)
        assert implementations[0].name == "reference" and not implementations[0].fused, op
        assert backends.names(op) == ("auto", "kernels") + tuple(i.name for i in implementations)
        for implementation in implementations:
            assert implementation.op == op and implementation.summary
            assert set(implementation.auto_devices) <= {"cpu", "cuda"}
            assert implementation.fused or not implementation.auto_devices
            assert implementation.available("cpu") == (implementation.unavailable_reason("cpu") == "")


@pytest.mark.parametrize("op", ALL_OPS)
def test_auto_is_the_first_available_fused_kernel_of_the_device_else_the_reference(op):
    for kind in ("cpu", "cuda"):
        candidates = [i for i in backends.implementations(op) if kind in i.auto_devices and i.available(kind)]
        expected = candidates[0] if candidates else backends.implementations(op)[0]
        assert backends.select(op, "auto", kind) is expected
        if candidates:
            assert backends.select(op, "kernels", kind) is expected
        else:
            with pytest.raises(RuntimeError, match=rf"{op}: backend='kernels' needs a fused {op} kernel for "
                                                   rf"{kind} tensors, and there is none here .*use backend='auto' "
                                                   r"or 'reference'"):
                backends.select(op, "kernels", kind)


def test_auto_never_picks_the_triton_interpreter():
    # Triton runs CPU tensors under the interpreter when asked by name, but "auto" on the CPU picks C++ or
    # the reference.
    for op in backends.ops():
        for implementation in backends.implementations(op):
            if implementation.name == "triton":
                assert implementation.auto_devices == ("cuda",), op
        assert backends.select(op, "auto", "cpu").name in ("cpp", "reference"), op


@pytest.mark.parametrize("op", ALL_OPS)
def test_a_name_the_op_does_not_have_is_refused_naming_the_op_the_knob_and_its_names(op):
    names = ", ".join(map(repr, backends.names(op)))
    with pytest.raises(ValueError, match=re.escape(f"sampler_backend: {op} has no backend 'fast'; its backends "
                                                   f"are {names}")):
        backends.check_name(op, "fast", "sampler_backend")
    with pytest.raises(ValueError, match=re.escape(f"{op} has no backend 7")):
        backends.select(op, 7, "cpu")
    assert backends.check_name(op, "auto") == "auto" and backends.check_name(op, "reference") == "reference"
    with pytest.raises(ValueError, match="no op named 'matmul'; the ops are 'decode', 'attention'"):
        backends.names("matmul")


def test_a_named_implementation_that_cannot_run_raises_with_its_reason_instead_of_falling_back():
    # A CUDA kernel asked for CPU tensors (or on a machine without a GPU) never runs the reference instead.
    with pytest.raises(RuntimeError, match=r"gumbel_argmax: backend='cuda' cannot run on cpu tensors here: "
                                           r"hdlm_kernels._C.gumbel_argmax_cuda runs on CUDA tensors only"):
        backends.select("gumbel_argmax", "cuda", "cpu")
    with pytest.raises(RuntimeError, match="uniform53: backend='cpp' cannot run on meta tensors here"):
        backends.select("uniform53", "cpp", torch.device("meta"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cannot run on cuda tensors here: no CUDA GPU is visible"):
            backends.select("hybrid_step", "reference", "cuda:0")


def test_register_refuses_selectors_auto_for_non_fused_and_duplicates():
    with pytest.raises(ValueError, match="'auto' is a selector, not an implementation name"):
        backends.register("log64", "auto", summary="x", load=lambda: None)
    with pytest.raises(ValueError, match="only fused kernels may be chosen by 'auto'"):
        backends.register("log64", "other", summary="x", load=lambda: None, auto_devices=("cpu",))
    with pytest.raises(ValueError, match="log64 already has an implementation named 'cpp'"):
        backends.register("log64", "cpp", summary="x", load=lambda: None)
    assert "other" not in backends.names("log64")


# ---------------------------------------------------------------- every public entry point refuses alike


def _calls():
    """One call per public entry point with a ``backend`` knob, as (op, function of the backend name)."""
    logits = torch.zeros(2, 5)
    x, s = torch.tensor([0, 4]), torch.zeros(2, 5)
    q = torch.zeros(1, 2, 1, 8)
    mask = IntervalMask(torch.tensor([[1, 2]]), torch.zeros(1, 2, dtype=torch.int32),
                        torch.zeros(1, 2, dtype=torch.int32), 2)
    zeros = torch.zeros(4, dtype=torch.float64)
    return {
        "gumbel_argmax": ("gumbel_argmax", lambda b: hk.sampling.gumbel_argmax(logits, 1, 1, backend=b)),
        "gumbel_argmax_deferred": ("gumbel_argmax", lambda b: hk.sampling.gumbel_argmax_deferred(
            logits, 1, 1, torch.arange(2), backend=b)),
        "acs_step": ("acs", lambda b: hk.sampling.acs_step(torch.tensor([4, 4]), logits, 1.0, 0.5, 4, 1, 1,
                                                           backend=b)),
        "acs_apply": ("acs", lambda b: hk.sampling.acs_apply(torch.tensor([4, 4]), logits, torch.arange(2), 4, 1,
                                                             1, backend=b)),
        "hybrid_step": ("hybrid_step", lambda b: hk.sampling.hybrid_step(x, s, 1.0, 0.5, 0.1, 4, 0, 0, backend=b)),
        "gumbel_candidates": ("gumbel_candidates", lambda b: hk.sampling.gumbel_candidates(logits, 1, 1, backend=b)),
        "hybrid_candidates": ("hybrid_candidates", lambda b: hk.sampling.hybrid_candidates(x, s, 1.0, 0.5, 0.1, 4, 0,
                                                                                           0, backend=b)),
        "hybrid_step_deferred": ("hybrid_step", lambda b: hk.sampling.hybrid_step_deferred(
            x, s, torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), 0.1, 4, 0, 0,
            torch.arange(2), backend=b)),
        "uniform53": ("uniform53", lambda b: hk.sampling.uniform53(1, 0, 0, torch.arange(4), backend=b)),
        "corrupt": ("corrupt", lambda b: hk.sampling.corrupt(torch.zeros(4, dtype=torch.long), zeros, zeros, 5, 5,
                                                             1, 0, backend=b)),
        "philox4x32_10": ("philox4x32_10", lambda b: hk.sampling.philox4x32_10((0, 0, 0, 0), (0, 0), backend=b)),
        "log64": ("log64", lambda b: log64_module.log64(torch.ones(3, dtype=torch.float64), backend=b)),
        "exp64": ("exp64", lambda b: log64_module.exp64(torch.ones(3, dtype=torch.float64), backend=b)),
        "gumbel_noise": ("gumbel_noise", lambda b: log64_module.gumbel_noise(torch.full((3,), 0.5,
                                                                                        dtype=torch.float64),
                                                                             backend=b)),
        "attention": ("attention", lambda b: hk.attention.attention(q, q, q, mask, backend=b)),
    }


CALLS = _calls()


@pytest.mark.parametrize("entry", sorted(CALLS))
def test_every_entry_point_refuses_an_unknown_name_naming_its_op_and_names(entry):
    op, call = CALLS[entry]
    names = ", ".join(map(repr, backends.names(op)))
    with pytest.raises(ValueError, match=re.escape(f"{op} has no backend 'numpy'; its backends are {names}")):
        call("numpy")


@pytest.mark.parametrize("entry", sorted(CALLS))
def test_every_entry_point_runs_the_registry_implementation_it_names(entry, monkeypatch):
    """Each entry point reaches its implementations only through the registry: replacing what the registry
    loaded for a name is what the entry point runs with that name (here, for every implementation that
    runs on CPU tensors)."""
    op, call = CALLS[entry]
    # acs_step / acs_apply check their name against op "acs" and draw with the Gumbel-max op's implementation
    # of that name (the same kernels, registered under both ops).
    runs = "gumbel_argmax" if op == "acs" else op
    for implementation in backends.implementations(runs):
        if not implementation.available("cpu"):
            continue
        real, seen = implementation.function(), []

        def spy(*args, real=real, seen=seen, **kwargs):
            seen.append(True)
            return real(*args, **kwargs)

        monkeypatch.setitem(backends._LOADED, id(implementation), spy)
        call(implementation.name)
        assert seen, f"{entry} with backend={implementation.name!r} did not run the registered {runs} implementation"
        monkeypatch.setitem(backends._LOADED, id(implementation), real)


def test_no_module_chooses_a_backend_by_comparing_names():
    """Dispatch lives in backends.select alone: no other module of the package or the harness compares a
    backend name with a string or keeps a table of implementations."""
    pattern = re.compile(r"\bbackend\w*\s*(==|!=|\bin\s*[\(\[\{])\s*['\"]|_IMPLEMENTATIONS\b")
    offenders = []
    for path in sorted((ROOT / "hdlm_kernels").rglob("*.py")) + sorted((ROOT / "reference").rglob("*.py")):
        if path.name == "backends.py" and path.parent.name == "hdlm_kernels":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


# ---------------------------------------------------------------- missing implementations never fall back


def test_a_missing_extension_is_refused_by_name_and_auto_takes_the_reference(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "missing_reason", "the build of hdlm_kernels._C was skipped: testing")
    logits = torch.zeros(2, 5)
    for op, call in (("gumbel_argmax", lambda b: hk.sampling.gumbel_argmax(logits, 1, 1, backend=b)),
                     ("uniform53", lambda b: hk.sampling.uniform53(1, 0, 0, torch.arange(4), backend=b))):
        with pytest.raises(RuntimeError, match=rf"{op}: backend='cpp' cannot run on cpu tensors here: the build of "
                                               r"hdlm_kernels._C was skipped: testing"):
            call("cpp")
        with pytest.raises(RuntimeError, match=rf"backend='kernels' needs a fused {op} kernel for cpu tensors.*"
                                               r"cpp: the build of hdlm_kernels._C was skipped: testing"):
            call("kernels")
    # "auto" on the CPU without the extension is the reference, which draws the same tokens.
    assert torch.equal(hk.sampling.gumbel_argmax(logits, 1, 0), hk.sampling.gumbel_argmax_ref(logits, 1, 0))
    assert torch.equal(hk.sampling.uniform53(1, 0, 0, torch.arange(4)),
                       hk.sampling.uniform53_ref(1, 0, 0, torch.arange(4)))
    with pytest.raises(RuntimeError, match="fused_backend: backend='kernels' needs a fused gumbel_argmax kernel"):
        hk.sampling.fused_backend("cpu")


def test_a_stale_extension_is_refused_with_a_reinstall_hint(monkeypatch):
    monkeypatch.setattr(_extension, "_C", types.ModuleType("hdlm_kernels._C"))
    monkeypatch.setattr(_extension, "missing_reason", "")
    for op, operator in (("gumbel_argmax", "gumbel_argmax_cpu"), ("hybrid_step", "hybrid_step_cpu"),
                         ("uniform53", "uniform53_cpu"), ("exp64", "exp64_cpu")):
        with pytest.raises(RuntimeError, match=rf"hdlm_kernels._C has no {operator} \(it was built from older "
                                               r"sources\); reinstall"):
            backends.select(op, "cpp", "cpu")


def test_an_extension_without_cuda_says_why(monkeypatch):
    monkeypatch.setattr(_extension, "cuda_missing_reason", lambda: "_C was built without CUDA (test)")
    for op in ("gumbel_argmax", "hybrid_step", "uniform53", "decode"):
        cuda = next(i for i in backends.implementations(op) if i.name == "cuda")
        assert cuda.probe("cuda") == "_C was built without CUDA (test)"


def test_a_broken_triton_install_is_refused_instead_of_falling_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # the next `import triton` raises ImportError
    for op in ("gumbel_argmax", "hybrid_step", "uniform53", "corrupt", "log64", "attention"):
        with pytest.raises(RuntimeError, match=rf"{op}: backend='triton' cannot run on cpu tensors here: triton is "
                                               r"not importable \((ModuleNotFoundError|ImportError)"):
            backends.select(op, "triton", "cpu")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run on cpu tensors here: triton is not"):
        hk.sampling.gumbel_argmax(torch.zeros(2, 5), 1, 1, backend="triton")


@pytest.mark.parametrize("op,module", [("gumbel_argmax", "triton_gumbel"), ("hybrid_step", "triton_hybrid"),
                                       ("uniform53", "triton_stream"), ("corrupt", "triton_corrupt")])
def test_triton_kernels_built_for_the_gpu_refuse_cpu_tensors(op, module, monkeypatch):
    kernels = pytest.importorskip(f"hdlm_kernels.sampling.{module}")
    monkeypatch.setattr(kernels, "interpreted", lambda: False)  # as if built for the GPU
    with pytest.raises(RuntimeError, match=rf"{op}: backend='triton' cannot run on cpu tensors here: runs on CUDA "
                                           r"tensors, or on CPU tensors under the Triton interpreter"):
        backends.select(op, "triton", "cpu")
    monkeypatch.setattr(kernels, "interpreted", lambda: True)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors \\(or CPU tensors under the interpreter\\), not on "
                                           "meta"):
        backends.select(op, "triton", "meta")


# ---------------------------------------------------------------- the harness samples through the registry


@pytest.mark.parametrize("method,family", [("acs", "epsilon"), ("analytic", "gamma")])
def test_generation_with_the_fused_kernels_equals_the_reference(method, family):
    from hdlm_reference.generate import generate
    from hdlm_reference.model import DiT, ModelConfig

    extension_with("gumbel_argmax_cpu")
    assert hk.sampling.fused_backend("cpu") == "cpp"
    torch.manual_seed(0)
    model = DiT(ModelConfig.preset("tiny", family=family, dropout=0.0)).eval()
    sched = hk.schedules.block(24, 8, 3)
    runs = {backend: generate(model, sched, 3, 5, method=method, kv_cache=True, sampler_backend=backend)
            for backend in ("reference", "kernels")}
    assert torch.equal(runs["kernels"].tokens, runs["reference"].tokens)
    assert runs["kernels"].model_calls == runs["reference"].model_calls
