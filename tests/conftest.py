"""Shared pytest configuration: tests marked `cuda` are skipped on machines without a CUDA GPU, and
without one the Triton kernels run in the Triton interpreter."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the import of any @triton.jit kernel (they are built for the interpreter or the GPU
    # when their module is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_without_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_without_gpu)


@pytest.fixture
def single_thread():
    """One intra-op thread for tests of tiny tensors: their ops are so small that OpenMP hand-offs cost
    more than the work, and on a loaded 2-core machine oversubscribed threads slow them 10-100x.
    Restored afterwards for the other tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
