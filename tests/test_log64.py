"""log64, gumbel_noise and exp64 (docs/log64.md), the float64 logarithm and exponential every sampling backend
shares: the torch recipe accurate to a few ulp, its NumPy twin bit-identical, and every backend (C++, Triton)
bit for bit against the recipe, with the C++ constants equal to the Python ones."""

import functools
import math

import pytest
import torch
from sampling_checks import assert_same_bits, backend_targets

from hdlm_kernels import _extension
from hdlm_kernels.sampling import uniform53_ref
from hdlm_kernels.sampling.constants import (
    EXP64_INV_LN2_64,
    EXP64_LN2_64_HI,
    EXP64_LN2_64_LO,
    EXP64_TABLE_BITS,
    EXP64_TABLE_HI,
    EXP64_TABLE_LO,
)
from hdlm_kernels.sampling.log64 import (
    EXP64_COEFFICIENTS,
    EXP64_MIN,
    INV_LN2,
    LN2_HI,
    LN2_LO,
    LOG64_COEFFICIENTS,
    exp64,
    exp64_numpy,
    expm1_64,
    gumbel_noise,
    gumbel_noise_numpy,
    log64,
    log64_numpy,
)

INF = math.inf
FUNCTIONS = {"log64": log64, "gumbel_noise": gumbel_noise, "exp64": exp64}


@pytest.fixture
def extension():
    if _extension._C is None:
        pytest.skip(f"hdlm_kernels._C is not available: {_extension.missing_reason}")
    return _extension._C


def sampler_inputs(n=200_000, seed=0):
    """Uniforms over the uniform53 range, their negated logs, and the edges."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, dtype=torch.float64, generator=g) * (1 - 2.0**-52) + 2.0**-53
    edges = torch.tensor([2.0**-53, 1 - 2.0**-53, 0.5, 1.0, 2.0, math.sqrt(2), math.sqrt(0.5), 36.7, 1e-16,
                          float.fromhex("0x1.6a09e667f3bcdp+0"), float.fromhex("0x1.6a09e667f3bcep+0")],
                         dtype=torch.float64)
    return torch.cat([u, -torch.log(u), edges])


def log64_inputs():
    """The stream's uniforms and their negated logarithms (the sampler's inputs), both sides of the √2
    mantissa boundary at many exponents, the ends of the ranges, and positive normals of every magnitude."""
    g = torch.Generator().manual_seed(0)
    u = uniform53_ref(3, 4, 0, torch.arange(20000))
    sqrt2_bits = 0x3FF6A09E667F3BCD
    boundary = torch.tensor([sqrt2_bits - 1, sqrt2_bits, sqrt2_bits + 1, 1023 << 52]).view(torch.float64)
    boundary = (boundary[None, :] * torch.exp2(torch.arange(-60, 60, dtype=torch.float64))[:, None]).reshape(-1)
    ends = torch.tensor([2.0**-53, 1 - 2.0**-53, 0.5, 1 - 2.0**-52, 3 * 2.0**-52, 0.25, 0.75, 1.0, 2.0, 36.7, 36.8,
                         1e-16, 2.0**-1022, 1.7976931348623157e308], dtype=torch.float64)
    minus_log_u = torch.logspace(-16, math.log10(36.8), 3000, dtype=torch.float64)
    wide = torch.exp2(torch.rand(5000, generator=g, dtype=torch.float64) * 2000 - 1000)
    return torch.cat([u, -log64(u), boundary, ends, minus_log_u, wide])


def exp64_inputs():
    """exp64's domain and beyond its lower end: uniform, small magnitudes, both sides of every rounding
    half point of k, the step's differences to a row maximum, the -708 cut-off from both sides, signed
    zeros, subnormals, -inf and NaN."""
    g = torch.Generator().manual_seed(0)
    wide = torch.rand(50_000, generator=g, dtype=torch.float64) * 1430 - 722
    small = torch.randn(5000, generator=g, dtype=torch.float64) * torch.exp2(
        -torch.randint(0, 70, (5000,), generator=g).double())
    halves = (torch.arange(-1021, 1022, dtype=torch.float64) + 0.5) / INV_LN2
    halves = halves[halves.abs() <= 708]
    halves = torch.cat([halves, torch.nextafter(halves, torch.full_like(halves, INF)),
                        torch.nextafter(halves, torch.full_like(halves, -INF))])
    scores = torch.randn(200, 50, generator=g, dtype=torch.float64) * 3
    ratios = (scores - scores.amax(1, keepdim=True)).flatten()
    ends = torch.tensor([EXP64_MIN, -708.0000001, math.nextafter(EXP64_MIN, -INF), math.nextafter(EXP64_MIN, INF),
                         0.0, -0.0, 708.0, 707.9, -INF, math.nan, -1e300, 1e-300, -1e-300, 5e-324, -5e-324, 1e-17,
                         -1e-17, 1.0, -1.0, math.log(2) / 2, -math.log(2) / 2, 709.0, -709.0, -745.2],
                        dtype=torch.float64)
    return torch.cat([wide, small, halves, ratios, ends])


@functools.lru_cache(maxsize=None)
def inputs_of(function):
    if function == "exp64":
        return exp64_inputs()
    x = log64_inputs()
    return x[(x > 0) & (x < 1)] if function == "gumbel_noise" else x


# ---------------------------------------------------------------- the recipe: accuracy and its twin


def test_log64_within_three_ulp_of_the_true_logarithm():
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
    x = exp64_inputs()
    assert_same_bits(torch.from_numpy(exp64_numpy(x.numpy())), exp64(x))


def test_noise_reaches_past_the_float32_cap():
    assert gumbel_noise(torch.tensor([1 - 2.0**-53], dtype=torch.float64)).item() == pytest.approx(36.74, abs=0.01)


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


def test_exp64_within_one_ulp_of_the_exact_exponential():
    """Against e^x to 60 digits (not the platform's exp, itself rounded): the table form's error budget is
    the final rounding (1/2 ulp), the cut series (r^6 / 720 <= 0.3 ulp where the result falls below 1) and
    smaller roundings. Inputs: the worst reductions (|r| near ln 2 / 128, j = 0 and 63) and random ones."""
    from decimal import Decimal, localcontext

    g = torch.Generator().manual_seed(7)
    step = math.log(2) / 64
    k = torch.randint(-65000, 65000, (3000,), generator=g).to(torch.float64)
    edge = torch.cat([k * step + step / 2 * (1 - 1e-9), k * step - step / 2 * (1 - 1e-9),
                      torch.tensor([-step / 2, step / 2, 63.5 * step, -0.5 * step], dtype=torch.float64)])
    x = torch.cat([edge, (torch.rand(3000, dtype=torch.float64, generator=g) * 2 - 1) * 708])
    x = x[(x >= EXP64_MIN) & (x <= 708)]
    ours = exp64(x)
    worst = Decimal(0)
    with localcontext() as context:
        context.prec = 60
        for value, got in zip(x.tolist(), ours.tolist()):
            exact = Decimal(value).exp()
            worst = max(worst, abs(Decimal(got) - exact) / Decimal(math.ulp(float(exact))))
    assert worst < 1


def test_exp64_table_is_two_to_the_j_over_64():
    """2^(j/64) = high + low to 2^-100 relative, the high part the correctly rounded double, the low part
    below half an ulp of it; and the exact scalings by 64 of the reduction's constants."""
    from decimal import Decimal, localcontext

    assert len(EXP64_TABLE_HI) == len(EXP64_TABLE_LO) == 1 << EXP64_TABLE_BITS
    with localcontext() as context:
        context.prec = 60
        for j, (high, low) in enumerate(zip(EXP64_TABLE_HI, EXP64_TABLE_LO)):
            exact = (Decimal(j) / 64 * Decimal(2).ln()).exp()
            assert abs(Decimal(high) + Decimal(low) - exact) < exact * Decimal(2) ** -100
            assert abs(Decimal(low)) <= Decimal(math.ulp(high)) / 2
    assert EXP64_INV_LN2_64 == INV_LN2 * 64 and EXP64_LN2_64_HI * 64 == LN2_HI and EXP64_LN2_64_LO * 64 == LN2_LO


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
    with pytest.raises(TypeError, match="expm1_64: x must be float64, got torch.float32"):
        expm1_64(torch.ones(2))


# ---------------------------------------------------------------- every backend bit for bit


TARGETS = [pytest.param(function, *param.values, marks=param.marks, id=f"{function}-{param.id}")
           for function in sorted(FUNCTIONS) for param in backend_targets(function, reference_cpu=False)]


@pytest.mark.parametrize("function,target", TARGETS)
def test_every_backend_equals_the_recipe_bit_for_bit(function, target):
    x = inputs_of(function)
    got = FUNCTIONS[function](x.to(target.device), backend=target.name)
    assert got.device.type == target.kind
    assert_same_bits(got, FUNCTIONS[function](x))
    # Any shape and layout: a transposed block keeps its shape; an empty one too.
    block = x[:24].reshape(2, 3, 4).transpose(0, 2)
    assert_same_bits(FUNCTIONS[function](block.to(target.device), backend=target.name),
                     FUNCTIONS[function](block.contiguous()))
    empty = torch.zeros(0, 3, dtype=torch.float64, device=target.device)
    assert FUNCTIONS[function](empty, backend=target.name).shape == (0, 3)


def test_exp64_edges():
    x = exp64_inputs()
    ours = exp64(x)
    assert ours[x < EXP64_MIN].eq(0).all() and ours[x.isnan()].eq(0).all()  # below EXP64_MIN, -inf, NaN: 0
    assert exp64(torch.tensor([0.0, -0.0], dtype=torch.float64)).tolist() == [1.0, 1.0]
    assert math.isfinite(exp64(torch.tensor([708.0], dtype=torch.float64)).item())


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_float64_only(function, backend):
    with pytest.raises(TypeError, match=f"{function}: x must be a float64 tensor, got torch.float32"):
        FUNCTIONS[function](torch.ones(3), backend=backend)


def test_cpp_constants_equal_the_python_ones(extension):
    expected = list(LOG64_COEFFICIENTS) + [LN2_HI, LN2_LO]
    assert [v.hex() for v in extension.log64_constants()] == [v.hex() for v in expected]
    expected = (list(EXP64_COEFFICIENTS[2:6]) + [EXP64_INV_LN2_64, EXP64_LN2_64_HI, EXP64_LN2_64_LO, EXP64_MIN]
                + list(EXP64_TABLE_HI) + list(EXP64_TABLE_LO))
    assert [v.hex() for v in extension.exp64_constants()] == [v.hex() for v in expected]


def test_cpp_operators_check_their_input(extension):
    with pytest.raises(RuntimeError, match="log64_cpu: x must be a float64 CPU tensor, got Float"):
        extension.log64_cpu(torch.ones(3))
    with pytest.raises(RuntimeError, match="exp64_cpu: x must be a float64 CPU tensor, got Float"):
        extension.exp64_cpu(torch.ones(3))


@pytest.mark.cuda
def test_triton_on_many_elements():
    u = uniform53_ref(9, 9, 0, torch.arange(4_000_000))
    assert_same_bits(gumbel_noise(u.cuda(), backend="triton"), gumbel_noise(u))
    x = torch.rand(4_000_000, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 1458 - 750
    x = torch.cat([x, exp64_inputs()])
    assert_same_bits(exp64(x.cuda(), backend="triton"), exp64(x))
