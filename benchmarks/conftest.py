"""Records what a benchmark ran on: device, library versions (machine_info) and, per benchmark,
shapes and dtypes (``extra_info``, set by the suites)."""

import platform

import pytest
import torch


def environment() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})",
            "cpu_threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["hdlm_kernels"] = environment()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def on_gpu(device) -> bool:
    return device.type == "cuda"


@pytest.fixture(scope="module")
def threads(device) -> int:
    """One intra-op thread on the CPU for the suites that time whole model steps (on a loaded 2-core
    machine, oversubscribed threads make such timings swing by 10x); the default on a GPU. Restored
    afterwards. Yields the thread count in use."""
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    yield torch.get_num_threads()
    torch.set_num_threads(previous)
