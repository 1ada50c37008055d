"""The floors the suites compare with, measured on the machine that runs them.

A floor quoted from a datasheet belongs to another machine (another HBM generation, another clock, a
CPU): the suites measure theirs once per process instead and record it with every row, so that a
record read later says what "percent of the floor" was a percent of.

* ``copy_bytes_per_s(device)``: the rate of a large device-to-device copy (read + write counted), the
  best of a few rounds: the bandwidth a kernel that streams its operands once can hope for.
* ``matmul_flops_per_s(device, dtype)``: the rate of a large square ``torch.matmul`` in the suite's
  dtype, best of a few rounds: the dense tensor-core (or CPU BLAS) rate an attention kernel is
  measured against.

Sizes are chosen so that each measurement takes well under a second: 1 GiB copies and 8192³ products
on a GPU, 64 MiB and 1024³ on the CPU. ``python -m benchmarks.roofline`` prints both.
"""

from __future__ import annotations

import functools
import time

import torch

ROUNDS = 5


def _best_seconds(fn, device: torch.device, rounds: int = ROUNDS) -> float:
    """The fastest of ``rounds`` synchronized calls, after one untimed call."""
    on_gpu = device.type == "cuda"
    fn()
    if on_gpu:
        torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        if on_gpu:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def _copy_bytes_per_s(device: torch.device) -> float:
    elements = (1 << 30 if device.type == "cuda" else 64 << 20) // 4
    source = torch.ones(elements, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    seconds = _best_seconds(lambda: target.copy_(source), device)
    return 2 * source.numel() * source.element_size() / seconds  # every byte read once and written once


@functools.cache
def _matmul_flops_per_s(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=generator, device=device).to(dtype)
    b = torch.randn(n, n, generator=generator, device=device).to(dtype)
    seconds = _best_seconds(lambda: torch.matmul(a, b), device)
    return 2 * n ** 3 / seconds


def copy_bytes_per_s(device: torch.device | str) -> float:
    """Measured copy bandwidth of ``device`` in bytes per second (read + write), cached per process."""
    return _copy_bytes_per_s(torch.device(device))


def matmul_flops_per_s(device: torch.device | str, dtype: torch.dtype) -> float:
    """Measured dense matmul rate of ``device`` in ``dtype``, FLOP per second, cached per process."""
    return _matmul_flops_per_s(torch.device(device), dtype)


def floor_info(seconds_at_floor: float, median: float | None) -> dict:
    """``floor_us`` (the time at the measured floor) and, when timed, ``pct_of_floor``
    (floor time / median time, in percent: 100 means the call runs at the floor)."""
    info = {"floor_us": float(f"{seconds_at_floor * 1e6:.3g}")}
    if median is not None:
        info["pct_of_floor"] = float(f"{100 * seconds_at_floor / median:.3g}")
    return info


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}: copy {copy_bytes_per_s(device) / 1e9:.1f} GB/s (read + write), "
          f"matmul {str(dtype).replace('torch.', '')} {matmul_flops_per_s(device, dtype) / 1e12:.2f} TFLOP/s")


if __name__ == "__main__":
    main()
