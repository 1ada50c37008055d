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
