"""The screen's noise functions in Triton (hdlm_kernels/sampling/triton_screen.py, run in the interpreter), the
twins of csrc/screen.h: the prefilter's bound of the first Philox word (docs/sampling-screen.md, "The
prefilter") equals the C++ bound and lies above the exact noise of every uniform with that first word; the
cheap noise is within its error of the exact noise and never above the prefilter's bound (so that a token's
cheap upper end never exceeds its prefilter bound: the candidates of a prefiltered screen are those of the
unfiltered one). Random words and extreme ones: uniforms next to 0 and 1, on both sides of 1/2, complements
at and next to every power of two."""

import math

import pytest
import torch

from hdlm_kernels import _extension
from hdlm_kernels.sampling.log64 import gumbel_noise
from hdlm_kernels.sampling.screen import SCREEN_NOISE_ERROR
from tests.test_screen_math import extreme_words, uniform_of_words

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(bool(_extension.missing_reason), reason="needs the compiled extension")

ALL_ONES = 0xFFFFFFFF


def triton_screen():
    from hdlm_kernels.sampling import triton_screen as module

    return module


def power_of_two_words() -> torch.Tensor:
    """First words whose complement A = (~w) >> 6 sits at and next to every power of two (where
    float32(A >> 2) changes exponent), with the low 6 bits clear and set."""
    steps = torch.arange(26, dtype=torch.int64)
    complements = torch.cat([(1 << steps) - 1, 1 << steps, (1 << steps) + 1, (1 << steps) + 3]).clamp(max=(1 << 26) - 1)
    return torch.cat([ALL_ONES - (complements << 6), ALL_ONES - (complements << 6) - 63])


def first_words() -> torch.Tensor:
    """extreme_words' first words and power_of_two_words."""
    return torch.cat([extreme_words()[0], power_of_two_words()])


def test_noise_bound_equals_the_cpp_bound():
    """The same operations as csrc/screen.h: the interpreter rounds each of them as the C++ build does (the
    GPU may fuse the two multiply-adds, which only removes a rounding: a bound either way)."""
    word_a = first_words()
    ours = triton_screen().screen_noise_bound_triton(word_a)
    assert ours.dtype == torch.float32 and ours.shape == word_a.shape
    assert torch.equal(ours, _extension._C.screen_noise_bound_cpu(word_a))


def test_noise_bound_is_above_the_exact_noise_of_every_second_word():
    # u grows with the second word, and the noise with u: the all-ones second word is the worst.
    word_a = first_words()
    bound = triton_screen().screen_noise_bound_triton(word_a).to(torch.float64)
    worst = gumbel_noise(uniform_of_words(word_a, torch.full_like(word_a, ALL_ONES)))
    assert bool((bound >= worst).all()), (bound - worst).min().item()
    # Tight where it matters: u > 1/2 away from 1 - 2^-24 within ln(2 ln 2) + 0.065, u < 1/2 at 0.366547.
    upper = (word_a >= 1 << 31) & (((ALL_ONES - word_a) >> 6) >= 1 << 10)
    assert bool(((bound - worst)[upper] <= math.log(2 * math.log(2)) + 0.065).all())
    assert bool((bound[word_a < 1 << 31] < 0.3666).all())
    # A' = 0 (u within 2^-24 of 1): 151 ln 2, above every noise (<= 53 ln 2).
    assert bound[word_a == ALL_ONES].min().item() > 104.6


@pytest.mark.parametrize("second", ["random", "zeros", "ones"])
def test_cheap_noise_is_within_its_error_and_below_the_bound(second):
    word_a, word_b = (words[: 1 << 18] for words in extreme_words())  # the edges and 2^18 - 2^14 random words
    word_a = torch.cat([word_a, power_of_two_words()])
    if second == "random":
        word_b = torch.cat([word_b, torch.randint(0, 2**32, (word_a.numel() - word_b.numel(),),
                                                  generator=torch.Generator().manual_seed(3), dtype=torch.int64)])
    else:
        word_b = torch.full_like(word_a, 0 if second == "zeros" else ALL_ONES)
    module = triton_screen()
    cheap = module.screen_noise_triton(word_a, word_b)
    exact = gumbel_noise(uniform_of_words(word_a, word_b))
    # The proof gives 2^-15.4 (plus the 2-ulp float32 division of the GPU); measured about 2^-19.
    assert (cheap.to(torch.float64) - exact).abs().max().item() <= SCREEN_NOISE_ERROR / 8
    # The bound exceeds the exact noise by at least 3.37e-5 = 2^-14.86 (at u -> 1/2 from below: 0.366547 -
    # (-ln ln 2); by about 2^-10 for u > 1/2) and the cheap noise errs by less, so it stays below the bound.
    gap = (module.screen_noise_bound_triton(word_a) - cheap).min().item()
    assert gap > 0, gap


def test_word_tensors_must_match():
    with pytest.raises(ValueError, match="same number of words"):
        triton_screen().screen_noise_triton(torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
