"""The sampling random stream (docs/sampling-stream.md) on every backend: Philox4x32-10 against Random123's
known-answer vectors, the uniform53 formula in exact rational arithmetic, every backend bit for bit against
the NumPy twin over index shapes, layouts, seeds, steps and streams, the stream's identity and statistical
properties, argument checks, and torch.compile through the custom op."""

import functools
from fractions import Fraction
from itertools import product
from unittest import mock

import numpy as np
import pytest
import scipy.stats
import torch
from sampling_checks import Target, backend_targets

from hdlm_kernels import _extension
from hdlm_kernels.sampling import philox as philox_module
from hdlm_kernels.sampling import philox4x32_10, philox4x32_10_ref, uniform53, uniform53_ref

# Random123's known-answer vectors for philox4x32_10 (counter, key, expected output).
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
U_MIN = 2.0**-53
U_MAX = 1.0 - 2.0**-53
SEEDS = [0, 1, 2**32 - 1, 2**32, 0x9E3779B97F4A7C15, 2**64 - 1]
STEPS_AND_STREAMS = [(0, 0), (1, 1), (17, 2), (2**32 - 1, 3), (2**32 + 9, 2**32 - 1), (2**50, 0)]

UNIFORM53 = backend_targets("uniform53", reference_cpu=False)
# Philox of one block is an op of its own (reference, C++); the Triton stream primitive has no op of its
# own and is checked through its module's vectorized entry point.
PHILOX = backend_targets("philox4x32_10") + [p for p in UNIFORM53 if p.values[0].name == "triton"]


def exact_uniform(word_a: int, word_b: int) -> Fraction:
    """u = (k + 0.5) * 2^-52 with k = (w_a >> 6) * 2^26 + (w_b >> 6), in exact rational arithmetic."""
    k = (word_a >> 6) * 2**26 + (word_b >> 6)
    return (Fraction(k) + Fraction(1, 2)) / 2**52


def philox_blocks(target, counters: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Philox4x32-10 of each counter [n, 4] under its key [n, 2] on ``target``, as uint64 [n, 4]."""
    if target.name == "triton":
        from hdlm_kernels.sampling import triton_stream

        words = triton_stream.philox4x32_10_triton(torch.from_numpy(counters.astype(np.int64)).to(target.device),
                                                   torch.from_numpy(keys.astype(np.int64)).to(target.device))
        return words.cpu().numpy().astype(np.uint64)
    return np.array([philox4x32_10([int(w) for w in c], [int(w) for w in k], backend=target.name)
                     for c, k in zip(counters, keys)], dtype=np.uint64)


def run(target, seed, step, stream, index):
    """uniform53 on ``target`` (index moved to its device), checked to keep shape, dtype and device."""
    got = uniform53(seed, step, stream, index.to(target.device), backend=target.name)
    assert got.shape == index.shape and got.dtype == torch.float64 and got.device.type == target.kind
    return got.cpu()


# ---------------------------------------------------------------- Philox4x32-10


@pytest.mark.parametrize("target", PHILOX)
def test_philox_matches_random123_known_answers(target):
    counters = np.array([c for c, _, _ in KNOWN_ANSWERS], dtype=np.uint64)
    keys = np.array([k for _, k, _ in KNOWN_ANSWERS], dtype=np.uint64)
    assert [tuple(int(w) for w in row) for row in philox_blocks(target, counters, keys)] == \
        [expected for _, _, expected in KNOWN_ANSWERS]


@pytest.mark.parametrize("target", [p for p in PHILOX if p.values[0].name != "reference"])
def test_philox_matches_the_numpy_twin_on_random_blocks(target):
    rng = np.random.default_rng(0)
    count = 500 if target.name == "triton" else 100
    counters = rng.integers(0, 2**32, size=(count, 4), dtype=np.uint64)
    keys = rng.integers(0, 2**32, size=(count, 2), dtype=np.uint64)
    counters[:5] = 0xFFFFFFFF  # extreme words
    keys[5:10] = 0
    assert np.array_equal(philox_blocks(target, counters, keys), philox4x32_10_ref(counters, keys).astype(np.uint64))


def test_reference_is_vectorized_over_leading_dimensions():
    counters = np.array([kat[0] for kat in KNOWN_ANSWERS], dtype=np.uint64).reshape(3, 1, 4)
    keys = np.array([kat[1] for kat in KNOWN_ANSWERS], dtype=np.uint64).reshape(3, 1, 2)
    out = philox4x32_10_ref(counters, keys)
    assert out.shape == (3, 1, 4) and out.dtype == np.uint32
    assert out.reshape(3, 4).tolist() == [list(kat[2]) for kat in KNOWN_ANSWERS]
    with pytest.raises(ValueError, match=r"counter must have shape \[..., 4\] and key \[..., 2\]"):
        philox4x32_10_ref([0, 0, 0], [0, 0])


@pytest.mark.parametrize(
    "counter, key, error, match",
    [
        ((0, 0, 0), (0, 0), ValueError, r"counter must be 4 ints in \[0, 2\^32\); got 3 values"),
        ((0, 0, 0, 2**32), (0, 0), ValueError, r"counter\[3\] must be an int in \[0, 2\^32\); got 4294967296"),
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
    u = uniform53_ref(seed, step, stream, torch.tensor([2 * n, 2 * n + 1]))
    assert Fraction(u[0].item()) == exact_uniform(w0, w1)
    assert Fraction(u[1].item()) == exact_uniform(w2, w3)


def test_adjacent_even_and_odd_elements_use_the_two_halves_of_one_philox_block():
    seed, step, stream = 2**63 + 12345, 3, 0
    pairs = torch.tensor([0, 1, 40, 77, 2**30 + 1])
    u = uniform53(seed, step, stream, torch.stack([2 * pairs, 2 * pairs + 1], dim=-1))
    for row, n in enumerate(pairs.tolist()):
        w = [int(x) for x in philox4x32_10_ref((n & 0xFFFFFFFF, n >> 32, stream, step),
                                               (seed & 0xFFFFFFFF, seed >> 32))]
        assert Fraction(u[row, 0].item()) == exact_uniform(w[0], w[1])
        assert Fraction(u[row, 1].item()) == exact_uniform(w[2], w[3])
        assert u[row, 0] != u[row, 1]


def test_only_the_low_32_bits_of_step_matter():
    index = torch.arange(64)
    for step in (0, 5, 2**32 - 1):
        assert torch.equal(uniform53(9, step + 2**32, 1, index), uniform53(9, step, 1, index))
        assert torch.equal(uniform53_ref(9, step + 7 * 2**40, 1, index), uniform53(9, step, 1, index))


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


# ---------------------------------------------------------------- every backend bit for bit


def _index_cases():
    generator = torch.Generator().manual_seed(0)
    wide = torch.randint(0, 2**62, (6, 8), generator=generator)
    return {
        # small ids, both sides of the 2^32 and 2^33 counter-word boundaries, the top of int64
        "edge": torch.tensor([0, 1, 2, 3, 2**32 - 2, 2**32 - 1, 2**32, 2**32 + 1, 2**33 - 1, 2**33, 2**33 + 1,
                              2**62 - 1, 2**62, 2**63 - 2, 2**63 - 1]),
        "large": torch.randint(0, 2**62, (257,), generator=generator) * 2 + torch.randint(0, 2, (257,),
                                                                                        generator=generator),
        "small_2d": torch.arange(60).reshape(5, 12),
        "3d": torch.arange(24).view(2, 3, 4) * 1000003,
        "scalar": torch.tensor(2**45 + 1),
        "empty": torch.empty(0, dtype=torch.int64),
        "empty_3d": torch.empty(3, 0, 2, dtype=torch.int64),
        "transposed": wide.t(),
        "strided": wide[:, ::3],
        "expanded": torch.tensor([5, 6, 7]).expand(4, 3),
        "int32": torch.arange(10, dtype=torch.int32) * 7,
    }


INDEX_CASES = _index_cases()


@functools.lru_cache(maxsize=None)
def expected_of(case, seed, step, stream):
    """The NumPy twin's draws of an index case, computed once for every backend."""
    return uniform53_ref(seed, step, stream, INDEX_CASES[case])


@pytest.mark.parametrize("target", UNIFORM53)
@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_every_backend_equals_the_numpy_twin_bit_for_bit(target, case):
    index = INDEX_CASES[case]
    # Every seed with every (step, stream) on compiled backends; in the interpreter, which pays per launch,
    # each seed once, with one (step, stream) each.
    combinations = zip(SEEDS, STEPS_AND_STREAMS) if target.interpreted else product(SEEDS, STEPS_AND_STREAMS)
    for seed, (step, stream) in combinations:
        assert torch.equal(run(target, seed, step, stream, index), expected_of(case, seed, step, stream)), \
            (seed, step, stream)


@pytest.mark.parametrize("target", UNIFORM53)
def test_every_backend_equals_the_numpy_twin_on_random_arguments(target):
    rng = np.random.default_rng(1234)
    for _ in range(8 if target.interpreted else 25):
        seed = int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2))
        step = int(rng.integers(0, 2**40))
        stream = int(rng.integers(0, 2**32))
        index = torch.from_numpy(rng.integers(0, 2**62, size=int(rng.integers(1, 300))))
        assert torch.equal(run(target, seed, step, stream, index), uniform53_ref(seed, step, stream, index))


@pytest.mark.cuda
@pytest.mark.parametrize("target", [p for p in UNIFORM53 if p.values[0].kind == "cuda"])
def test_cuda_backends_on_many_elements(target):
    big = torch.arange(3_000_000)  # more elements than one grid-stride pass covers
    assert torch.equal(run(target, 1, 2, 0, big), uniform53(1, 2, 0, big, backend="cpp"))
    g = torch.Generator().manual_seed(4)
    index = torch.randint(0, 2**62, (2_000_000,), generator=g)
    assert torch.equal(run(target, 2**64 - 1, 77, 1, index), uniform53(2**64 - 1, 77, 1, index, backend="cpp"))


def test_auto_on_the_cpu_and_int32_indices():
    index = torch.arange(1000).reshape(10, 100)
    assert torch.equal(uniform53(5, 6, 0, index), uniform53(5, 6, 0, index, backend="reference"))
    index = torch.arange(50, dtype=torch.int32)
    assert torch.equal(uniform53(3, 1, 1, index), uniform53(3, 1, 1, index.long()))


# ---------------------------------------------------------------- stream properties


@pytest.mark.parametrize("target", backend_targets("uniform53"))
def test_draws_do_not_depend_on_the_other_indices_in_the_call(target):
    seed, step, stream = 77, 4, 0
    full = uniform53_ref(seed, step, stream, torch.arange(4096))
    subset = torch.randperm(4096, generator=torch.Generator().manual_seed(3))[:300]
    assert torch.equal(run(target, seed, step, stream, subset), full[subset])
    assert torch.equal(run(target, seed, step, stream, subset.view(20, 15)), full[subset].view(20, 15))
    assert torch.equal(run(target, seed, step, stream, torch.tensor([1234])), full[1234:1235])


def test_streams_steps_and_seeds_give_different_draws():
    index = torch.arange(256)
    base = uniform53(1, 1, 0, index)
    for other in (uniform53(1, 1, 1, index), uniform53(1, 2, 0, index), uniform53(2, 1, 0, index),
                  uniform53(1 + 2**32, 1, 0, index)):
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


# ---------------------------------------------------------------- argument checks


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
        ({"index": torch.tensor([0.0, 1.0])}, TypeError, r"index must be an integer tensor .*got dtype torch.float32"),
        ({"index": torch.tensor([True])}, TypeError, r"index must be an integer tensor .*got dtype torch.bool"),
        ({"index": 3}, TypeError, r"index must be an integer tensor of element ids; got int"),
        ({"index": torch.tensor([4, -2, 1])}, ValueError, r"index must hold element ids in \[0, 2\^63\); got a "
                                                          r"minimum of -2$"),
        ({"backend": "gpu"}, ValueError, r"uniform53 has no backend 'gpu'; its backends are 'auto', 'kernels', "
                                         r"'reference', 'cpp', 'cuda', 'triton'"),
        ({"backend": "cuda"}, RuntimeError, r"uniform53: backend='cuda' cannot run on cpu tensors here"),
    ],
)
def test_uniform53_rejects_bad_arguments(kwargs, error, match):
    arguments = {"seed": 1, "step": 0, "stream": 0, "index": torch.arange(4), "backend": "auto"} | kwargs
    with pytest.raises(error, match=match):
        uniform53(**arguments)


def test_ids_from_2_to_the_63_are_refused_also_as_uint64():
    index = torch.tensor([4, 2**63], dtype=torch.uint64)
    with pytest.raises(ValueError, match=r"got a minimum of -9223372036854775808 \(ids >= 2\^63 read as negative "
                                         r"int64\)"):
        uniform53(1, 0, 0, index)
    with pytest.raises(ValueError, match="index must hold element ids >= 0; got a minimum of -2"):
        uniform53_ref(1, 0, 0, torch.tensor([4, -2, 1]))


def test_numpy_integers_are_accepted_as_scalars():
    index = torch.arange(8)
    assert torch.equal(uniform53(np.uint64(2**64 - 1), np.int64(3), np.uint32(1), index),
                       uniform53(2**64 - 1, 3, 1, index))


# ---------------------------------------------------------------- torch.compile through the custom op


def _compiles_without_graph_breaks(target):
    index = torch.arange(40).view(4, 10) * 7919

    @torch.compile(fullgraph=True, backend="aot_eager")
    def draws(index):
        return uniform53(2**64 - 3, 9, 2, index * 2 + 1, backend=target.name) * 2.0

    got = draws(index.to(target.device))
    assert torch.equal(got.cpu(), uniform53_ref(2**64 - 3, 9, 2, index * 2 + 1) * 2.0)


def test_compiles_without_graph_breaks_on_the_cpu_with_the_cpp_backend():
    if _extension._C is None:
        pytest.skip(f"hdlm_kernels._C is not available: {_extension.missing_reason}")
    _compiles_without_graph_breaks(Target("uniform53", "cpp", "cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_compiles_without_graph_breaks_on_the_gpu(name):
    _compiles_without_graph_breaks(Target("uniform53", name, "cuda"))


def test_argument_checks_run_once_per_call():
    index = torch.arange(12)
    with mock.patch.object(philox_module, "integer_tensor", wraps=philox_module.integer_tensor) as checker, \
            mock.patch.object(philox_module, "seed_and_step", wraps=philox_module.seed_and_step) as seeds:
        uniform53(5, 1, 0, index)
    assert checker.call_count == 1 and seeds.call_count == 1
    with mock.patch.object(philox_module.backends, "select", wraps=philox_module.backends.select) as select:
        uniform53(5, 1, 0, index)
    assert [call.args[0] for call in select.call_args_list].count("uniform53") == 1
