"""The floors the benchmark suites measure on their own machine (benchmarks/roofline.py)."""

import torch

from benchmarks import roofline


def test_copy_and_matmul_rates_are_measured_positive_and_cached():
    copy = roofline.copy_bytes_per_s("cpu")
    flops = roofline.matmul_flops_per_s("cpu", torch.float32)
    assert 1e8 < copy < 1e13 and 1e8 < flops < 1e14  # a CPU of this century, not a constant
    assert roofline.copy_bytes_per_s(torch.device("cpu")) == copy  # measured once per process
    assert roofline.matmul_flops_per_s("cpu", torch.float32) == flops


def test_floor_info_gives_the_floor_and_the_share_of_it_reached():
    assert roofline.floor_info(2e-4, 8e-4) == {"floor_us": 200.0, "pct_of_floor": 25.0}
    assert roofline.floor_info(2e-4, None) == {"floor_us": 200.0}  # untimed (--benchmark-disable)
