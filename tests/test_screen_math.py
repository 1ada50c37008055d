"""The screening bound of the exact samplers (docs/sampling-screen.md): the cheap float32 noise is within
SCREEN_NOISE_ERROR of the exact FP64 Gumbel noise, and the interval [lo, hi] of csrc/screen.h holds the exact
FP64 score of every token (temperatures near 0 and large, logits up to ±1e4 and up to the float32 range,
±inf, uniforms next to 0 and 1). Adversarial rows whose runner-up sits exactly at the bound are decided as
the reference decides them."""

import math

import pytest
import torch

import hdlm_kernels as hk
from hdlm_kernels import _extension
from hdlm_kernels.sampling.gumbel import _gumbel_argmax_reference
from hdlm_kernels.sampling.log64 import gumbel_noise
from hdlm_kernels.sampling.screen import SCREEN_ABSOLUTE, SCREEN_NOISE_ERROR, SCREEN_RELATIVE
from tests.sampling_checks import assert_same_draw, cpu_isas

pytestmark = pytest.mark.skipif(bool(_extension.missing_reason), reason="needs the compiled extension")

INF = math.inf


def C():
    return _extension._C


def uniform_of_words(word_a: torch.Tensor, word_b: torch.Tensor) -> torch.Tensor:
    """uniform53_from_words (csrc/philox.h) of int64 tensors holding uint32 words: (2k + 1) 2^-53, exact."""
    k = ((word_a >> 6) << 26) | (word_b >> 6)
    return (2 * k + 1).to(torch.float64) * 2.0 ** -53


def extreme_words() -> tuple[torch.Tensor, torch.Tensor]:
    """Words of uniforms next to 0, next to 1 and on both sides of 1/2 (where the cheap noise switches
    between -log u and -log(1 - (1 - u))), plus random ones."""
    top = torch.arange(1 << 12, dtype=torch.int64) << 6
    edges_a = torch.cat([top, 0xFFFFFFFF - top, 0x80000000 + top, 0x7FFFFFFF - top])
    edges_b = torch.cat([torch.zeros_like(top), torch.full_like(top, 0xFFFFFFFF)] * 2)
    g = torch.Generator().manual_seed(0)
    random_a = torch.randint(0, 2**32, (1 << 20,), generator=g, dtype=torch.int64)
    random_b = torch.randint(0, 2**32, (1 << 20,), generator=g, dtype=torch.int64)
    return torch.cat([edges_a, random_a]), torch.cat([edges_b, random_b])


def exact_scores(logit32: torch.Tensor, noise64: torch.Tensor, temperature: float) -> torch.Tensor:
    """The reference's score: float64(logit) / T (no division at T = 1) + noise, each correctly rounded."""
    x = logit32.to(torch.float64)
    if temperature != 1.0:
        x = x / temperature
    return x + noise64


def screen(word_a, word_b, logit32, temperature, atanh=False):
    scale = 1.0 if temperature == 1.0 else float(torch.tensor(1.0 / temperature, dtype=torch.float32))
    return C().screen_scores_cpu(word_a, word_b, logit32, scale, atanh)


@pytest.mark.parametrize("atanh", [False, True], ids=["polynomial", "atanh"])
def test_cheap_noise_within_its_bound(atanh):
    word_a, word_b = extreme_words()
    u = uniform_of_words(word_a, word_b)
    assert u.min() == 2.0 ** -53 and u.max() == 1 - 2.0 ** -53
    exact = gumbel_noise(u)
    cheap, _, _ = screen(word_a, word_b, torch.zeros(u.shape), 1.0, atanh)
    error = (cheap.to(torch.float64) - exact).abs().max().item()
    # The proof gives 2^-15.4; the measured worst case is about 2^-19.
    assert error <= SCREEN_NOISE_ERROR / 8, error


def test_noise_bound_of_the_first_word():
    """The prefilter's bound (docs/sampling-screen.md, "The prefilter") is at least the exact noise of every
    uniform with that first word: u grows with the second word, so the all-ones second word is the worst."""
    word_a, _ = extreme_words()
    steps = torch.arange(26, dtype=torch.int64)
    # Complements A = (~word_a) >> 6 at and next to every power of two (where float32(A >> 2) changes exponent).
    complements = torch.cat([(1 << steps) - 1, 1 << steps, (1 << steps) + 1, (1 << steps) + 3]).clamp(max=(1 << 26) - 1)
    word_a = torch.cat([word_a, 0xFFFFFFFF - (complements << 6), 0xFFFFFFFF - (complements << 6) - 63])
    worst = gumbel_noise(uniform_of_words(word_a, torch.full_like(word_a, 0xFFFFFFFF)))
    bound = C().screen_noise_bound_cpu(word_a).to(torch.float64)
    assert bool((bound >= worst).all()), (bound - worst).min().item()
    # And it is close where it matters, for u > 1/2 away from 1 - 2^-24: within ln(2 ln 2) + 0.06 (the
    # ratio -ln u / (1 - u) up to u = 1/2, and log2 m >= m - 1).
    complement = (0xFFFFFFFF - word_a) >> 6
    upper = (word_a >= 1 << 31) & (complement >= 1 << 10)
    assert bool(((bound - worst)[upper] <= math.log(2 * math.log(2)) + 0.065).all())
    assert bool((bound[word_a < 1 << 31] < 0.3666).all())


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1e-3, 1e-25, 7.0, 1e20])
@pytest.mark.parametrize("scale", [3.0, 1e4, 1e-6, 3e38])
def test_interval_holds_the_exact_score(temperature, scale):
    word_a, word_b = extreme_words()
    n = word_a.shape[0]
    g = torch.Generator().manual_seed(1)
    logit = (torch.randn(n, generator=g, dtype=torch.float64) * scale).clamp(-3.4e38, 3.4e38).to(torch.float32)
    logit[:8] = torch.tensor([0.0, -0.0, INF, -INF, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45])
    exact = exact_scores(logit, gumbel_noise(uniform_of_words(word_a, word_b)), temperature)
    _, lo, hi = screen(word_a, word_b, logit, temperature)
    lo, hi = lo.to(torch.float64), hi.to(torch.float64)
    # A NaN bound means "unknown" on that side (the candidate rule keeps the token; a NaN lower bound is
    # ignored); every other bound must hold.
    assert bool(((lo <= exact) | lo.isnan()).all())
    assert bool(((hi >= exact) | hi.isnan()).all())
    finite = torch.isfinite(logit) & torch.isfinite(exact)
    a = (logit.to(torch.float64) * (1.0 if temperature == 1.0 else 1.0 / temperature)).abs()
    moderate = finite & (a < 1e30)
    # Where nothing overflows, the interval is no wider than twice the stated bound, plus the roundings of
    # c - B and c + B (half a float32 ulp of |c| <= |a| + 37 each).
    width = (hi - lo)[moderate]
    slack = 2.0 ** -23 * (a[moderate] + 40.0)
    assert bool((width <= 2 * (SCREEN_RELATIVE * a[moderate] + SCREEN_ABSOLUTE) * 1.0001 + slack).all())
    # -inf logits score exactly -inf: lo = hi = -inf, so they never become candidates of a finite row.
    none = logit == -INF
    assert bool((lo[none] == -INF).all() and (hi[none] == -INF).all())


def test_nan_logit_is_always_a_candidate():
    word_a, word_b = extreme_words()
    _, lo, hi = screen(word_a[:64], word_b[:64], torch.full((64,), math.nan), 1.0)
    assert bool(hi.isnan().all() and lo.isnan().all())


def words_of(seed: int, step: int, elements: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The words' 26-bit halves (shifted back into place) of the uniforms of stream 0 at `elements`."""
    u = hk.sampling.uniform53_ref(seed, step, 0, elements)
    k = ((u * 2.0 ** 53 - 1) / 2).to(torch.int64)  # u = (2k + 1) 2^-53 exactly
    return (k >> 26) << 6, (k & ((1 << 26) - 1)) << 6


def step_values(value: torch.Tensor, steps: int) -> torch.Tensor:
    """`value` (one element of a floating dtype) moved by `steps` representable values of its dtype."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[value.dtype]
    direction = 1 if value.item() >= 0 else -1
    return (value.view(bits) + direction * steps).view(value.dtype)


def near_tie_rows(vocab: int, temperature: float, dtype: torch.dtype, offsets=range(-3, 4)):
    """Rows where a token's upper bound sits exactly at the leader's lower bound (its logit found by
    bisection over the dtype's values), then moved by `offsets` representable values: the runner-up is at,
    just inside or just outside the candidate set, and the exact pass decides. The two tokens are the pair
    of the row with the closest noises (so that the runner-up's logit is small and the dtype's grid, scaled
    by 1/T, is finer than the tie window); every other token is -inf.
    Returns (logits [len(offsets), V] of `dtype`, row ids, seed, step)."""
    seed, step, row_id = 7, 3, 11
    noise = gumbel_noise(hk.sampling.uniform53_ref(seed, step, 0, row_id * vocab + torch.arange(vocab)))
    order = noise.argsort()
    gaps = noise[order[1:]] - noise[order[:-1]]
    pair = int(gaps.argmin())
    leader, runner = int(order[pair + 1]), int(order[pair])  # leader has the larger noise
    word_a, word_b = words_of(seed, step, row_id * vocab + torch.tensor([leader, runner]))
    _, lo, _ = screen(word_a[:1], word_b[:1], torch.zeros(1), temperature)
    target = lo[0].item()
    low, high = -1.0, 1.0  # hi of the runner is increasing in its logit
    for _ in range(100):
        mid = (low + high) / 2
        _, _, hi = screen(word_a[1:], word_b[1:], torch.tensor([mid]).to(dtype).float(), temperature)
        low, high = (mid, high) if hi[0].item() < target else (low, mid)
    at_bound = torch.tensor([high]).to(dtype)
    rows = []
    for offset in offsets:
        logits = torch.full((vocab,), -INF)
        logits[leader] = 0.0
        logits[runner] = step_values(at_bound, offset).float()[0]
        rows.append(logits.to(dtype))
    return torch.stack(rows), torch.full((len(rows),), row_id), seed, step




@pytest.mark.parametrize("temperature", [1.0, 0.37, 1e-20, 50.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_near_ties_exactly_at_the_bound(dtype, temperature):
    logits, row_ids, seed, step = near_tie_rows(4096, temperature, dtype)
    expected = _gumbel_argmax_reference(logits, None, row_ids, seed, step, temperature, None, 16)
    for isa in cpu_isas():
        C().set_cpu_isa(isa)
        try:
            tokens, best, count = C().gumbel_argmax_counted_cpu(logits, None, row_ids, seed, step, temperature, None,
                                                                True)
        finally:
            C().set_cpu_isa("auto")
        assert_same_draw((tokens, best), expected)
        # At the bound (offset 0, row 3) both tokens are candidates; every row has one or both.
        assert int(count[3]) == 2 and set(count.tolist()) <= {1, 2}, count


# The polynomial of screen_noise_fast (csrc/screen.h, screen_detail::kP0..kP7): ln(1 + f) = f P(f).
LOG1P_COEFFICIENTS = ["0x1.fffffep-1", "-0x1.00007ap-1", "0x1.555ap-2", "-0x1.ff6316p-3", "0x1.9785cap-3",
                      "-0x1.613806p-3", "0x1.4c79e8p-3", "-0x1.9f174ap-4"]


def test_log1p_polynomial_over_every_float32_mantissa():
    """docs/sampling-screen.md, "The division-free form": f P(f) evaluated in float32 (Horner, no FMA, as the
    CPU build) is within 2^-21.7 relative of ln(1 + f) for every float32 f = m - 1, m in (√2/2, √2], and
    the exact polynomial within 2^-22.3 (dense float64 grid)."""
    coefficients = [float.fromhex(c) for c in LOG1P_COEFFICIENTS]
    ones = torch.arange(0x3F800001, 0x3FB504F4, dtype=torch.int64)   # m in (1, √2]
    below = torch.arange(0x3F3504F4, 0x3F800000, dtype=torch.int64)  # m in (√2/2, 1)
    m = torch.cat([ones, below]).to(torch.int32).view(torch.float32)
    f = m - 1.0  # exact (Sterbenz)
    p = torch.full_like(f, coefficients[-1])
    for c in coefficients[-2::-1]:
        p = p * f + c  # float32 multiply, then add: two roundings
    cheap = (f * p).double()
    exact = torch.log1p(f.double())
    assert ((cheap / exact - 1).abs().max().item()) <= 2.0 ** -21.7
    grid = torch.linspace(math.sqrt(0.5) - 1, math.sqrt(2) - 1, 1_000_001, dtype=torch.float64)
    grid = grid[grid != 0]
    value = torch.zeros_like(grid)
    for c in coefficients[::-1]:
        value = value * grid + c
    assert ((grid * value / torch.log1p(grid) - 1).abs().max().item()) <= 2.0 ** -22.3
