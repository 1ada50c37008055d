"""log64 and exp64, the float64 logarithm and exponential every sampling backend shares: accurate to a
few ulp, and the torch and NumPy twins bit-identical (the compiled twins are checked against them in the
backend tests)."""

import math

import pytest
import torch

from hdlm_kernels.sampling.log64 import (
    EXP64_MIN,
    exp64,
    exp64_numpy,
    expm1_64,
    gumbel_noise,
    gumbel_noise_numpy,
    log64,
    log64_numpy,
)


def sampler_inputs(n=200_000, seed=0):
    """Uniforms over the uniform53 range, their negated logs, and the edges."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, dtype=torch.float64, generator=g) * (1 - 2.0**-52) + 2.0**-53
    edges = torch.tensor([2.0**-53, 1 - 2.0**-53, 0.5, 1.0, 2.0, math.sqrt(2), math.sqrt(0.5), 36.7, 1e-16,
                          float.fromhex("0x1.6a09e667f3bcdp+0"), float.fromhex("0x1.6a09e667f3bcep+0")],
                         dtype=torch.float64)
    return torch.cat([u, -torch.log(u), edges])


def test_within_three_ulp_of_the_true_logarithm():
    x = sampler_inputs()
    ours = log64(x)
    exact = torch.tensor([math.log(v) for v in x.tolist()], dtype=torch.float64)
    ulp = torch.tensor([math.ulp(v) for v in exact.tolist()], dtype=torch.float64)
    error = ((ours - exact).abs() / ulp.clamp_min(math.ulp(0.0)))
    assert float(error.max()) <= 3.0
    assert log64(torch.tensor([1.0], dtype=torch.float64)).item() == 0.0


def test_torch_and_numpy_twins_are_bit_identical():
    x = sampler_inputs(seed=1)
    assert torch.equal(log64(x), torch.from_numpy(log64_numpy(x.numpy())))
    u = x[(x > 0) & (x < 1)]
    assert torch.equal(gumbel_noise(u), torch.from_numpy(gumbel_noise_numpy(u.numpy())))


def test_noise_reaches_past_the_float32_cap():
    assert gumbel_noise(torch.tensor([1 - 2.0**-53], dtype=torch.float64)).item() == pytest.approx(36.74, abs=0.01)


def test_needs_float64():
    with pytest.raises(TypeError, match="x must be float64, got torch.float32"):
        log64(torch.ones(3))


def exp_inputs(n=200_000, seed=0):
    """The γ step's arguments: differences to a row maximum (<= 0) and negated maxima up to 708."""
    g = torch.Generator().manual_seed(seed)
    wide = (torch.rand(n, dtype=torch.float64, generator=g) * 2 - 1) * 708
    near = torch.randn(n // 4, dtype=torch.float64, generator=g) * 1e-3
    edges = torch.tensor([0.0, -0.0, 708.0, EXP64_MIN, 1.0, -1.0, math.log(2) / 2, -math.log(2) / 2, 1e-300,
                          -745.0, -math.inf], dtype=torch.float64)
    return torch.cat([wide, near, edges])


def test_exp64_within_one_ulp_and_flushed_below_its_range():
    x = exp_inputs()
    ours = exp64(x)
    live = x >= EXP64_MIN
    exact = torch.tensor([math.exp(v) for v in x[live].tolist()], dtype=torch.float64)
    ulp = torch.tensor([math.ulp(v) for v in exact.tolist()], dtype=torch.float64)
    assert float(((ours[live] - exact).abs() / ulp).max()) <= 1.0
    assert (ours[~live] == 0).all() and exp64(torch.tensor([0.0], dtype=torch.float64)).item() == 1.0
    assert torch.equal(ours, torch.from_numpy(exp64_numpy(x.numpy())))


def test_expm1_64_is_accurate_near_zero():
    x = exp_inputs(seed=1)
    x = x[x >= -700]
    ours = expm1_64(x)
    exact = torch.tensor([math.expm1(v) for v in x.tolist()], dtype=torch.float64)
    ulp = torch.tensor([math.ulp(v) for v in exact.tolist()], dtype=torch.float64).clamp_min(math.ulp(0.0))
    # 4 ulp just past |x| = ln 2 / 2, where exp64(x) - 1 loses two bits to cancellation
    assert float(((ours - exact).abs() / ulp).max()) <= 4.0
    tiny = torch.tensor([1e-18, -1e-18], dtype=torch.float64)
    assert torch.equal(expm1_64(tiny), tiny)  # where exp(x) - 1 would give 0
