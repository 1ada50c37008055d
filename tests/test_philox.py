"""The sampling random stream (DESIGN.md §6): Philox4x32-10 known answers, the uniform53 formula,
backends bit-exact against the NumPy reference, and the stream's statistical and identity properties."""

from fractions import Fraction

import numpy as np
import pytest
import scipy.stats
import torch

from hdlm_kernels import _extension
from hdlm_kernels.sampling import philox4x32_10, philox4x32_10_ref, uniform53, uniform53_ref

# Random123's known-answer vectors for philox4x32_10 (counter, key, expected output).
KNOWN_ANSWERS = [
    (
        (0x00000000, 0x00000000, 0x00000000, 0x00000000),
        (0x00000000, 0x00000000),
        (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8),
    ),
    (
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

U_MIN = 2.0**-53
U_MAX = 1.0 - 2.0**-53


@pytest.fixture
def extension():
    if _extension._C is None:
        pytest.skip(f"hdlm_kernels._C is not available: {_extension.missing_reason}")
    return _extension._C


def exact_uniform(word_a: int, word_b: int) -> Fraction:
    """u = (k + 0.5) * 2^-52 with k = (w_a >> 6) * 2^26 + (w_b >> 6), in exact rational arithmetic."""
    k = (word_a >> 6) * 2**26 + (word_b >> 6)
    return (Fraction(k) + Fraction(1, 2)) / 2**52


# ---------------------------------------------------------------- Philox4x32-10 known answers


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_reference_matches_random123_known_answers(counter, key, expected):
    assert tuple(int(w) for w in philox4x32_10_ref(counter, key)) == expected


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_cpp_matches_random123_known_answers(extension, counter, key, expected):
    assert tuple(extension.philox4x32_10(list(counter), list(key))) == expected
    assert philox4x32_10(counter, key, backend="cpp") == expected


def test_reference_is_vectorized_over_leading_dimensions():
    counters = np.array([kat[0] for kat in KNOWN_ANSWERS], dtype=np.uint64).reshape(3, 1, 4)
    keys = np.array([kat[1] for kat in KNOWN_ANSWERS], dtype=np.uint64).reshape(3, 1, 2)
    out = philox4x32_10_ref(counters, keys)
    assert out.shape == (3, 1, 4) and out.dtype == np.uint32
    assert out.reshape(3, 4).tolist() == [list(kat[2]) for kat in KNOWN_ANSWERS]


@pytest.mark.parametrize(
    "counter, key, error, match",
    [
        ((0, 0, 0), (0, 0), ValueError, r"counter must be 4 ints in \[0, 2\^32\); got 3 values"),
        (
            (0, 0, 0, 2**32),
            (0, 0),
            ValueError,
            r"counter\[3\] must be an int in \[0, 2\^32\); got 4294967296",
        ),
        ((0, 0, 0, 0), (0, -1), ValueError, r"key\[1\] must be an int in \[0, 2\^32\); got -1"),
        ((0, 0, 0, 0.5), (0, 0), TypeError, r"counter\[3\] must be an int in \[0, 2\^32\); got 0.5"),
        (7, (0, 0), TypeError, r"counter must be 4 ints in \[0, 2\^32\); got int"),
    ],
)
def test_philox4x32_10_rejects_bad_words(counter, key, error, match):
    with pytest.raises(error, match=match):
        philox4x32_10(counter, key)


# ---------------------------------------------------------------- the uniform53 formula


def test_first_elements_of_stream_zero_derive_from_the_all_zero_known_answer():
    # seed 0, step 0, stream 0, n = 0 is exactly the all-zero KAT counter and key.
    w0, w1, w2, w3 = KNOWN_ANSWERS[0][2]
    u = uniform53_ref(0, 0, 0, torch.tensor([0, 1]))
    assert Fraction(u[0].item()) == exact_uniform(w0, w1)
    assert Fraction(u[1].item()) == exact_uniform(w2, w3)
    assert u[0].item() == pytest.approx(0.3990, abs=1e-4)  # 0x6627e8d5 / 2^32: a readable sanity anchor


def test_uniform_is_built_from_the_counter_and_key_of_the_contract():
    seed, step, stream, n = 0x0123456789ABCDEF, 7, 2, 2**40 + 5
    counter = (n & 0xFFFFFFFF, n >> 32, stream, step)
    key = (seed & 0xFFFFFFFF, seed >> 32)
    w0, w1, w2, w3 = (int(w) for w in philox4x32_10_ref(counter, key))
    for backend in ["reference"] + (["cpp"] if _extension._C is not None else []):
        u = uniform53(seed, step, stream, torch.tensor([2 * n, 2 * n + 1]), backend=backend)
        assert Fraction(u[0].item()) == exact_uniform(w0, w1), backend
        assert Fraction(u[1].item()) == exact_uniform(w2, w3), backend


def test_adjacent_even_and_odd_elements_use_the_two_halves_of_one_philox_block():
    seed, step, stream = 2**63 + 12345, 3, 0
    pairs = torch.tensor([0, 1, 40, 77, 2**30 + 1])
    elements = torch.stack([2 * pairs, 2 * pairs + 1], dim=-1)
    u = uniform53(seed, step, stream, elements)
    for row, n in enumerate(pairs.tolist()):
        w = [
            int(x)
            for x in philox4x32_10_ref(
                (n & 0xFFFFFFFF, n >> 32, stream, step), (seed & 0xFFFFFFFF, seed >> 32)
            )
        ]
        assert Fraction(u[row, 0].item()) == exact_uniform(w[0], w[1])
        assert Fraction(u[row, 1].item()) == exact_uniform(w[2], w[3])
        assert u[row, 0] != u[row, 1]


def test_only_the_low_32_bits_of_step_matter():
    index = torch.arange(64)
    for step in (0, 5, 2**32 - 1):
        assert torch.equal(uniform53(9, step + 2**32, 1, index), uniform53(9, step, 1, index))
        assert torch.equal(
            uniform53(9, step + 7 * 2**40, 1, index, backend="reference"), uniform53(9, step, 1, index)
        )


def test_values_are_odd_multiples_of_two_to_the_minus_53_within_the_contract_range():
    u = uniform53(20240601, 11, 0, torch.arange(1 << 20))
    assert u.dtype == torch.float64
    assert U_MIN <= u.min().item() and u.max().item() <= U_MAX
    scaled = u * 2.0**53  # exact: a power-of-two scaling of values below 1
    assert torch.equal(scaled, scaled.round())
    assert bool((scaled.to(torch.int64) % 2 == 1).all())


def test_extreme_words_map_to_the_ends_of_the_range():
    assert float(exact_uniform(0, 0)) == U_MIN
    assert float(exact_uniform(0xFFFFFFFF, 0xFFFFFFFF)) == U_MAX


# ---------------------------------------------------------------- backends bit-exact


def _index_cases():
    generator = torch.Generator().manual_seed(0)
    large = torch.randint(0, 2**62, (257,), generator=generator)
    edge = torch.tensor(
        [0, 1, 2, 3, 2**32 - 1, 2**32, 2**32 + 1, 2**33, 2**33 + 1, 2**62 - 1, 2**62, 2**63 - 1]
    )
    wide = torch.randint(0, 2**62, (6, 8), generator=generator)
    return {
        "edge": edge,
        "large": large,
        "small_2d": torch.arange(60).reshape(5, 12),
        "scalar": torch.tensor(2**45 + 1),
        "empty": torch.empty(0, dtype=torch.int64),
        "empty_3d": torch.empty(3, 0, 2, dtype=torch.int64),
        "transposed": wide.t(),
        "strided": wide[:, ::3],
        "expanded": torch.tensor([5, 6, 7]).expand(4, 3),
    }


INDEX_CASES = _index_cases()
SEEDS = [0, 1, 2**32 - 1, 2**32, 0x9E3779B97F4A7C15, 2**64 - 1]
STEPS_AND_STREAMS = [(0, 0), (1, 1), (17, 2), (2**32 - 1, 3), (2**32 + 9, 2**32 - 1), (2**50, 0)]


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
@pytest.mark.parametrize("seed", SEEDS)
def test_cpp_equals_reference_bit_for_bit(extension, case, seed):
    index = INDEX_CASES[case]
    for step, stream in STEPS_AND_STREAMS:
        expected = uniform53_ref(seed, step, stream, index)
        got = uniform53(seed, step, stream, index, backend="cpp")
        assert got.shape == index.shape and got.dtype == torch.float64 and got.device == index.device
        assert torch.equal(got, expected), (case, seed, step, stream)


def test_cpp_equals_reference_on_random_arguments(extension):
    rng = np.random.default_rng(1234)
    for _ in range(25):
        seed = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        step = int(rng.integers(0, 2**40))
        stream = int(rng.integers(0, 2**32))
        index = torch.from_numpy(rng.integers(0, 2**62, size=int(rng.integers(1, 300))))
        assert torch.equal(
            uniform53(seed, step, stream, index, backend="cpp"), uniform53_ref(seed, step, stream, index)
        )


def test_auto_backend_on_cpu_matches_reference():
    index = torch.arange(1000).reshape(10, 100)
    assert torch.equal(uniform53(5, 6, 0, index), uniform53(5, 6, 0, index, backend="reference"))


def test_int32_index_is_widened():
    index = torch.arange(50, dtype=torch.int32)
    assert torch.equal(uniform53(3, 1, 1, index), uniform53(3, 1, 1, index.long()))


@pytest.mark.cuda
def test_cuda_equals_cpp_bit_for_bit(extension):
    if not extension.with_cuda:
        pytest.skip(f"_C has no CUDA operators: {_extension.cuda_missing_reason()}")
    for case, index in INDEX_CASES.items():
        for seed in SEEDS:
            for step, stream in STEPS_AND_STREAMS:
                got = uniform53(seed, step, stream, index.cuda(), backend="cuda")
                assert got.is_cuda and got.shape == index.shape and got.dtype == torch.float64
                assert torch.equal(got.cpu(), uniform53(seed, step, stream, index, backend="cpp")), (
                    case,
                    seed,
                )
    big = torch.arange(3_000_000, device="cuda")  # more elements than one grid-stride pass covers
    assert torch.equal(uniform53(1, 2, 0, big).cpu(), uniform53(1, 2, 0, big.cpu(), backend="cpp"))


# ---------------------------------------------------------------- stream properties


def test_draws_do_not_depend_on_the_other_indices_in_the_call():
    seed, step, stream = 77, 4, 0
    full = uniform53(seed, step, stream, torch.arange(4096))
    generator = torch.Generator().manual_seed(3)
    subset = torch.randperm(4096, generator=generator)[:300]
    for backend in ["reference"] + (["cpp"] if _extension._C is not None else []):
        assert torch.equal(uniform53(seed, step, stream, subset, backend=backend), full[subset])
        assert torch.equal(
            uniform53(seed, step, stream, subset.view(20, 15), backend=backend), full[subset].view(20, 15)
        )
        single = uniform53(seed, step, stream, torch.tensor([1234]), backend=backend)
        assert torch.equal(single, full[1234:1235])


def test_streams_steps_and_seeds_give_different_draws():
    index = torch.arange(256)
    base = uniform53(1, 1, 0, index)
    for other in (
        uniform53(1, 1, 1, index),
        uniform53(1, 2, 0, index),
        uniform53(2, 1, 0, index),
        uniform53(1 + 2**32, 1, 0, index),
    ):
        assert not bool((other == base).any())


def test_chi_square_uniformity_of_high_and_low_bits():
    # Fixed seed, so the outcome is deterministic; a p-value threshold of 1e-6 means a correct
    # generator would fail it for about one seed in a million.
    bins = 1024
    u = uniform53(0x5EED, 0, 0, torch.arange(1 << 20)).numpy()
    high_bins = np.floor(u * bins).astype(np.int64)
    k = ((u * 2.0**53).astype(np.int64) - 1) // 2
    low_bins = k % bins  # the lowest 10 of the 52 bits
    for binned in (high_bins, low_bins):
        counts = np.bincount(binned, minlength=bins)
        assert counts.shape == (bins,)
        statistic, p_value = scipy.stats.chisquare(counts)
        assert p_value > 1e-6, (statistic, p_value)


# ---------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"seed": -1}, ValueError, r"seed must be an int in \[0, 2\^64\); got -1"),
        ({"seed": 2**64}, ValueError, r"seed must be an int in \[0, 2\^64\); got 18446744073709551616"),
        ({"seed": 1.0}, TypeError, r"seed must be an int in \[0, 2\^64\); got 1.0 \(float\)"),
        ({"seed": "1"}, TypeError, r"seed must be an int in \[0, 2\^64\); got '1' \(str\)"),
        ({"seed": True}, TypeError, r"seed must be an int in \[0, 2\^64\); got True \(bool\)"),
        ({"step": -1}, ValueError, r"step must be an int >= 0; got -1"),
        ({"step": 2.5}, TypeError, r"step must be an int >= 0; got 2.5 \(float\)"),
        ({"stream": -1}, ValueError, r"stream must be an int in \[0, 2\^32\); got -1"),
        ({"stream": 2**32}, ValueError, r"stream must be an int in \[0, 2\^32\); got 4294967296"),
        (
            {"index": torch.tensor([0.0, 1.0])},
            TypeError,
            r"index must be an integer tensor .*got dtype torch.float32",
        ),
        (
            {"index": torch.tensor([True])},
            TypeError,
            r"index must be an integer tensor .*got dtype torch.bool",
        ),
        ({"index": 3}, TypeError, r"index must be an integer tensor of element ids; got int"),
        (
            {"index": torch.tensor([4, -2, 1])},
            ValueError,
            r"index must hold element ids >= 0; got a minimum of -2",
        ),
        (
            {"backend": "gpu"},
            ValueError,
            r"backend must be one of 'auto', 'cpp', 'cuda', 'reference', 'triton'; got 'gpu'",
        ),
        ({"backend": "cuda"}, ValueError, r"index must be on cuda for backend='cuda'; got a tensor on cpu"),
    ],
)
def test_uniform53_rejects_bad_arguments(kwargs, error, match):
    arguments = {"seed": 1, "step": 0, "stream": 0, "index": torch.arange(4), "backend": "auto"} | kwargs
    with pytest.raises(error, match=match):
        uniform53(**arguments)


def test_numpy_integers_are_accepted_as_scalars():
    index = torch.arange(8)
    assert torch.equal(
        uniform53(np.uint64(2**64 - 1), np.int64(3), np.uint32(1), index), uniform53(2**64 - 1, 3, 1, index)
    )


def test_requested_backend_that_is_missing_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "missing_reason", "the build of hdlm_kernels._C was skipped: testing")
    with pytest.raises(
        RuntimeError, match=r"uniform53 with backend='cpp' needs hdlm_kernels._C.*was skipped: testing"
    ):
        uniform53(1, 0, 0, torch.arange(4), backend="cpp")
    # auto on CPU without the extension is the reference, by contract (DESIGN §5).
    assert torch.equal(uniform53(1, 0, 0, torch.arange(4)), uniform53_ref(1, 0, 0, torch.arange(4)))
