"""hk.info(): versions and the availability of every backend, with reasons."""

import os

import pytest
import torch

import hdlm_kernels as hk
from hdlm_kernels import _extension
from hdlm_kernels.info import BACKEND_NAMES


def test_info_lists_every_backend_with_a_detail():
    info = hk.info()
    assert (
        tuple(status.name for status in info.backends)
        == BACKEND_NAMES
        == ("reference", "cpp", "cuda", "triton")
    )
    text = str(info)
    for name in BACKEND_NAMES:
        assert name in text
        assert info.backend(name).detail
    assert info.backend("reference").available


def test_as_dict_has_versions_gpu_and_backends():
    as_dict = hk.info().as_dict()
    assert as_dict["versions"]["hdlm_kernels"] == hk.__version__
    assert as_dict["versions"]["torch"] == torch.__version__
    assert as_dict["versions"]["cuda"] == torch.version.cuda
    assert as_dict["versions"]["python"]
    assert "triton" in as_dict["versions"]
    assert set(as_dict["backends"]) == set(BACKEND_NAMES)
    assert set(as_dict["ops"]) == set(hk.backends.ops())
    assert all(set(b) == {"available", "detail"} for b in as_dict["backends"].values())
    assert as_dict["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def test_info_renders_every_op_of_the_registry():
    info = hk.info()
    assert {status.op for status in info.ops} == set(hk.backends.ops()) >= {
        "attention", "decode", "gumbel_argmax", "acs", "hybrid_step", "uniform53", "corrupt", "log64", "exp64"}
    text = str(info)
    for status in info.ops:
        assert status.op in text
        assert [i.name for i in status.implementations] == [i.name for i in hk.backends.implementations(status.op)]
        # "auto" on the CPU is what the registry's rule picks, and it runs there
        assert status.auto["cpu"] == hk.backends.select(status.op, "auto", "cpu").name
        chosen = next(i for i in status.implementations if i.name == status.auto["cpu"])
        assert "cpu" in chosen.runs_on
        for implementation in status.implementations:
            assert set(implementation.runs_on) | set(implementation.unavailable) == {"cpu", "cuda"}
            assert all(implementation.unavailable.values())  # every "no" says why
    assert "reference" in info.op("attention").auto.values()
    with pytest.raises(KeyError, match="op must be one of"):
        info.op("matmul")


def test_unknown_backend_name_is_a_key_error_listing_the_names():
    with pytest.raises(KeyError, match="backend must be one of reference, cpp, cuda, triton; got 'tpu'"):
        hk.info().backend("tpu")


def test_gpu_backends_are_unavailable_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    info = hk.info()
    assert info.gpu is None
    assert not info.backend("cuda").available
    assert not info.backend("triton").available


def test_triton_detail_mentions_the_interpreter(monkeypatch):
    if hk.info().versions.triton is None or torch.cuda.is_available():
        pytest.skip("needs triton importable and no GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET=1" in hk.info().backend("triton").detail


def test_cpp_backend_is_available_when_ci_requires_it():
    cpp = hk.info().backend("cpp")
    if os.environ.get("HDLM_KERNELS_REQUIRE_EXTENSION") != "1":
        pytest.skip(f"HDLM_KERNELS_REQUIRE_EXTENSION is not 1 (cpp backend available: {cpp.available})")
    assert cpp.available, f"the C++ extension is required here but unavailable: {cpp.detail}"


def test_missing_extension_is_explained(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(
        _extension, "missing_reason", "the build of hdlm_kernels._C failed: compiler exploded"
    )
    info = hk.info()
    assert not info.backend("cpp").available and "compiler exploded" in info.backend("cpp").detail
    assert not info.backend("cuda").available and "compiler exploded" in info.backend("cuda").detail
    with pytest.raises(RuntimeError, match=r"gumbel_argmax: backend='cpp' cannot run on cpu tensors here: the "
                                           r"build of hdlm_kernels._C failed: compiler exploded"):
        hk.sampling.gumbel_argmax(torch.zeros(1, 3), 0, 0, backend="cpp")
    status = info.op("gumbel_argmax")
    assert status.auto["cpu"] == "reference"  # no C++ kernel, so "auto" takes the reference
    cpp = next(i for i in status.implementations if i.name == "cpp")
    assert cpp.runs_on == () and "compiler exploded" in cpp.unavailable["cpu"]


def test_reference_harness_imports_under_its_own_name():
    import hdlm_reference

    assert hdlm_reference.__doc__ and "hdlm_reference" in hdlm_reference.__doc__
