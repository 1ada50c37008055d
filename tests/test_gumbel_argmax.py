"""FP64 Gumbel-max sampling (docs/sampling-stream.md) on every backend: the reference against its direct twin,
every fused kernel bit for bit against the reference (tokens and the winning float64 scores) over dtypes,
temperatures, exclusions, vocabularies, row ids, seeds, ties, infinities, NaN, strides and row gathers;
row identity, greedy and tie rules, argument checks, the deferred entry point, torch.compile through the
custom op, the Triton kernel's sm_90 code, and the distribution: chi-square on a small vocabulary, the mass
of a far tail, and noise beyond the FP32 cap.

The Triton kernel runs in the interpreter on the CPU (about 10 ms per program), so its cases use fewer rows
and smaller vocabularies where they test the same thing; tests marked ``cuda`` cover paper-sized ones."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings, strategies as st
from sampling_checks import Target, assert_same_draw, backend_targets, calls_during, compiled_ptx_ops

import hdlm_kernels as hk
from hdlm_kernels import _extension
from hdlm_kernels.sampling import gumbel as gumbel_module
from hdlm_kernels.sampling import gumbel_argmax, gumbel_argmax_deferred, gumbel_argmax_ref, uniform53_ref
from hdlm_kernels.sampling.arguments import checked_exclude, exclude_values
from hdlm_kernels.sampling.constants import CHUNK_BYTES
from hdlm_kernels.sampling.log64 import gumbel_noise_numpy

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
TEMPERATURES = [1.0, 0.55, 2.3, 0.0]
EXCLUDES = {"none": None, "int": 5, "list": [0, 17, 299]}
SEED_MAX = 2**64 - 1
# The largest Gumbel noise float32 uniforms can give: u = 1 - 2^-24.
FP32_GUMBEL_CAP = -math.log(-math.log1p(-(2.0**-24)))  # 16.6355...
P_VALUE_FLOOR = 1e-6  # statistical tests fail with chance < 1e-6 for a correct sampler (and are seeded)

FUSED = backend_targets("gumbel_argmax", reference_cpu=False)
COMPILED = backend_targets("gumbel_argmax", reference_cpu=False, interpreted=False)
EVERY = backend_targets("gumbel_argmax")


def random_logits(rows, vocab, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)


def noise_of_row(seed, step, row_id, vocab):
    """The noise of one row, straight from the NumPy stream: g = -log64(-log64 u), float64 [V]."""
    u = uniform53_ref(seed, step, 0, row_id * vocab + torch.arange(vocab))
    return torch.from_numpy(gumbel_noise_numpy(u.numpy()))


def draw(target, logits, seed, step, row_ids=None, temperature=1.0, exclude=None, take=None):
    """(tokens, best) on the CPU of ``target``'s implementation, for already-checked arguments (the
    tensors moved to its device), as the custom op calls it."""
    device = target.device
    rows = logits.shape[0] if take is None else take.shape[0]
    row_ids = torch.arange(rows) if row_ids is None else row_ids
    exclude = exclude_values(checked_exclude(exclude, device), logits.shape[1])
    tokens, best = target.implementation(logits.to(device), None if take is None else take.to(device),
                                         row_ids.to(device), seed, step, float(temperature), exclude, 64)
    assert tokens.device.type == best.device.type == target.kind
    return tokens.cpu(), best.cpu()


REFERENCE = Target("gumbel_argmax", "reference", "cpu")


def assert_matches_reference(target, logits, seed, step, row_ids=None, temperature=1.0, exclude=None, take=None):
    """``target``'s draw equals the reference's, tokens and scores bit for bit; returns it."""
    ours = draw(target, logits, seed, step, row_ids, temperature, exclude, take)
    assert_same_draw(ours, draw(REFERENCE, logits.cpu(), seed, step, row_ids, temperature, exclude, take))
    return ours


def sample(target, logits, *args, **kwargs):
    """gumbel_argmax itself on ``target`` (logits and row_ids moved to its device), tokens on the CPU."""
    args = tuple(a.to(target.device) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: v.to(target.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    tokens = gumbel_argmax(logits.to(target.device), *args, backend=target.name, **kwargs)
    assert tokens.dtype == torch.int64 and tokens.device.type == target.kind
    return tokens.cpu()


@pytest.fixture
def small_blocks(monkeypatch):
    """8 Philox blocks (16 columns) per loop iteration of the Triton kernel: several iterations even for
    small V (a no-op for the other backends)."""
    try:
        from hdlm_kernels.sampling import triton_gumbel
    except ImportError:
        return
    monkeypatch.setattr(triton_gumbel, "INTERPRETER_BLOCK_PAIRS", 8)
    monkeypatch.setattr(triton_gumbel, "GPU_BLOCK_PAIRS", 8)


# ---------------------------------------------------------------- the reference against its twin


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("exclude", list(EXCLUDES.values()), ids=list(EXCLUDES))
def test_reference_matches_the_twin_in_any_chunking(dtype, temperature, exclude):
    rows, vocab = 23, 300
    logits = random_logits(rows, vocab, dtype, seed=rows)
    row_ids = torch.randint(0, 10**12, (rows,), generator=torch.Generator().manual_seed(1))
    expected = gumbel_argmax_ref(logits, 99, 7, row_ids, temperature, exclude)
    for chunk_rows in (1, 7, rows, None):
        got = gumbel_argmax(logits, 99, 7, row_ids, temperature, exclude, backend="reference", chunk_rows=chunk_rows)
        assert got.dtype == torch.int64 and got.shape == (rows,)
        assert torch.equal(got, expected), f"chunk_rows={chunk_rows}"


def test_chunks_bound_the_float64_temporaries(monkeypatch):
    """The reference backend never builds more than chunk_rows x V element ids / noise at once."""
    sizes = []
    real = gumbel_module.stream_uniforms

    def recording(seed, step, stream, elements):
        sizes.append(elements.numel())
        return real(seed, step, stream, elements)

    monkeypatch.setattr(gumbel_module, "stream_uniforms", recording)
    vocab = 50258
    default = max(1, CHUNK_BYTES // (8 * vocab))
    logits = torch.zeros(1, vocab).expand(2 * default + 1, vocab)
    gumbel_argmax(logits, 1, 1, backend="reference")
    assert max(sizes) * 8 <= CHUNK_BYTES and len(sizes) == 3
    sizes.clear()
    gumbel_argmax(logits[:10], 1, 1, chunk_rows=4, backend="reference")
    assert sizes == [4 * vocab, 4 * vocab, 2 * vocab]


# ---------------------------------------------------------------- every backend bit for bit


@pytest.mark.parametrize("target", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("exclude", list(EXCLUDES.values()), ids=list(EXCLUDES))
def test_every_backend_matches_the_reference_bit_for_bit(target, dtype, temperature, exclude):
    rows, vocab = (8 if target.interpreted else 23), 300
    logits = random_logits(rows, vocab, dtype, seed=rows)
    row_ids = torch.randint(0, 10**12, (rows,), generator=torch.Generator().manual_seed(1))
    tokens, _ = assert_matches_reference(target, logits, 99, 7, row_ids, temperature, exclude)
    if not target.interpreted:  # the interpreter pays per launch; its public path is checked elsewhere
        assert torch.equal(sample(target, logits, 99, 7, row_ids, temperature, exclude), tokens)


@pytest.mark.parametrize("target", EVERY)
def test_paper_sized_vocabulary(target):
    vocab = 50258
    logits = random_logits(6, vocab, torch.bfloat16, seed=3)
    row_ids = torch.tensor([0, 1, 1023, 1024, 8191, 123456789])
    if target == REFERENCE:  # against the twin
        for step in (0, 1, 2**32 + 5):
            expected = gumbel_argmax_ref(logits, SEED_MAX, step, row_ids, 1.0, exclude=50257)
            assert torch.equal(sample(target, logits, SEED_MAX, step, row_ids, exclude=50257), expected)
        return
    if target.interpreted:  # one row, one configuration
        logits, row_ids = logits[-1:], row_ids[-1:]
        configurations = [(2**32 + 5, 1.0, 50257)]
    else:
        configurations = [(step, temperature, exclude) for step in (0, 2**32 + 5)
                          for temperature, exclude in ((1.0, 50257), (0.7, [0, 50257]), (0.0, None))]
    for step, temperature, exclude in configurations:
        assert_matches_reference(target, logits, SEED_MAX, step, row_ids, temperature, exclude)


@pytest.mark.parametrize("target", FUSED)
def test_vocabularies_that_are_not_a_multiple_of_a_tile(target, small_blocks):
    """The C++ kernel walks Philox pairs in tiles of 256 columns, the CUDA kernel in strides of a block, the
    Triton kernel in iterations of 16 columns here (small_blocks): rows that start on an odd element (odd
    row_id * V) begin with half a pair, and the last tile is partial."""
    if target.interpreted:
        vocabularies, row_ids = (1, 2, 17, 61), torch.tensor([0, 1, 10**9 + 7, 2**40 + 1])
    else:
        vocabularies = (1, 2, 3, 5, 127, 255, 256, 257, 258, 511, 512, 513, 1001)
        row_ids = torch.tensor([0, 1, 2, 3, 7, 2**31 - 1, 2**32 + 1, 10**12 + 3])
    for vocab in vocabularies:
        logits = random_logits(len(row_ids), vocab, torch.float32, seed=vocab, scale=0.5)
        exclude = None if vocab < 3 else [0, vocab - 1]
        for temperature in (1.0, 0.55, 0.0):
            assert_matches_reference(target, logits, 5, 6, row_ids, temperature, exclude)


@pytest.mark.parametrize("target", FUSED)
def test_large_row_ids_and_seeds(target):
    vocab = 97 if target.interpreted else 50258
    limit = (2**63 - vocab) // vocab  # the largest row id with int64 element ids
    # Element ids around the 2^32 and 2^33 counter-word boundaries, and at the very top of int64.
    row_ids = torch.tensor([2**32 // vocab, 2**33 // vocab + 1, limit // 3, limit - 1, limit])
    logits = random_logits(5, vocab, torch.float16 if target.interpreted else torch.float32, seed=4)
    seeds = (0, 2**32 - 1, SEED_MAX) if target.interpreted else (SEED_MAX, SEED_MAX - 1, 2**32 - 1, 2**32, 0)
    for i, seed in enumerate(seeds):
        step, temperature = ((2**32 - 1, 1.3), (2**33 + 1, 0.7))[i % 2]
        assert_matches_reference(target, logits, seed, step, row_ids, temperature)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 9), vocab=st.integers(1, 600), temperature=st.sampled_from([0.0, 0.3, 1.0, 4.0]),
       dtype=st.sampled_from(DTYPES), data=st.data())
def _random_arguments(target, rows, vocab, temperature, dtype, data):
    seed = data.draw(st.integers(0, SEED_MAX))
    step = data.draw(st.integers(0, 2**40))
    row_ids = torch.tensor(data.draw(st.lists(st.integers(0, 10**13), min_size=rows, max_size=rows, unique=True)),
                           dtype=torch.int64)
    exclude = data.draw(st.lists(st.integers(0, vocab - 1), max_size=min(vocab - 1, 5)))
    scale = data.draw(st.sampled_from([0.1, 3.0]))
    logits = random_logits(rows, vocab, dtype, seed=rows * 1000 + vocab, scale=scale)
    assert_matches_reference(target, logits, seed, step, row_ids, temperature, exclude or None)


@pytest.mark.parametrize("target", COMPILED)
def test_random_arguments(target):
    _random_arguments(target)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 12), vocab=st.integers(1, 40), chunk_rows=st.integers(1, 13),
       temperature=st.sampled_from([0.0, 0.3, 1.0, 4.0]), data=st.data())
def _row_identity(target, rows, vocab, chunk_rows, temperature, data):
    seed = data.draw(st.integers(0, 2**64 - 1))
    step = data.draw(st.integers(0, 2**40))
    row_ids = torch.tensor(data.draw(st.lists(st.integers(0, 10**9), min_size=rows, max_size=rows, unique=True)))
    logits = random_logits(rows, vocab, torch.float32, seed=rows * 100 + vocab, scale=1.0)
    whole = sample(target, logits, seed, step, row_ids, temperature, chunk_rows=chunk_rows)
    assert torch.equal(whole, gumbel_argmax_ref(logits, seed, step, row_ids, temperature))
    # The same rows in another order, one at a time, or next to other rows give the same tokens.
    order = torch.tensor(data.draw(st.permutations(range(rows))))
    shuffled = sample(target, logits[order], seed, step, row_ids[order], temperature, chunk_rows=chunk_rows)
    assert torch.equal(shuffled, whole[order])
    r = data.draw(st.integers(0, rows - 1))
    assert torch.equal(sample(target, logits[r:r + 1], seed, step, row_ids[r:r + 1], temperature), whole[r:r + 1])
    others = random_logits(3, vocab, torch.float32, seed=7)
    padded = sample(target, torch.cat([others, logits]), seed, step,
                    torch.cat([torch.tensor([5, 6, 7]) + 10**10, row_ids]), temperature)
    assert torch.equal(padded[3:], whole)


@pytest.mark.parametrize("target", COMPILED)  # the reference's chunking: test_reference_matches_the_twin_in_any_chunking
def test_a_row_depends_only_on_seed_step_and_row_id(target):
    _row_identity(target)


# ---------------------------------------------------------------- greedy, ties, infinities, NaN


@pytest.mark.parametrize("target", EVERY)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_greedy_is_the_argmax_with_ties_to_the_lowest_index(target, dtype, small_blocks):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [-2.0] * 4, [0.5, -1.0, 7.0, 7.0]], dtype=dtype)
    assert sample(target, logits, 0, 0, temperature=0).tolist() == [1, 0, 2]
    assert sample(target, logits, 0, 0, temperature=0, exclude=[1, 2]).tolist() == [0, 0, 3]
    # Random rows (bf16/fp16 round many values to ties), and rows of few distinct values: ties within a
    # lane, across the two columns of a Philox block, across lanes and iterations; odd row ids shift pairs.
    g = torch.Generator().manual_seed(5)
    few = torch.randint(0, 3, (12, 45), generator=g).to(dtype)
    few[0] = 1.0  # all equal
    sets = [random_logits(8 if target.interpreted else 64, 33 if target.interpreted else 600, dtype, scale=0.5)]
    if target.interpreted and dtype in (torch.float16, torch.float64):
        sets = []  # the interpreter pays per launch: bfloat16 rounds to ties as float16 does
    if dtype == torch.float32 or not target.interpreted:
        sets.append(few)
    for logits in sets:
        for exclude in (None, 0, [0, 1, 2, 16, 17]):
            tokens = sample(target, logits, 3, 3, torch.arange(logits.shape[0]) * 7 + 1, 0.0, exclude)
            masked = logits.double()
            masked[:, [] if exclude is None else exclude] = -torch.inf
            assert tokens.tolist() == [row.index(max(row)) for row in masked.tolist()]


@pytest.mark.parametrize("target", EVERY)
def test_exact_score_ties_go_to_the_lowest_index(target, small_blocks):
    """Scores l_a + g_a and l_b + g_b tie exactly when l_a = g_b and l_b = g_a (fp64 addition commutes):
    the lower of a, b must win, also when a and b sit in different tiles, threads, warps or iterations of a
    kernel, or share a Philox pair. Every other token is at -inf."""
    if target.interpreted:
        vocab, pairs = 64, [(3, 40), (0, 63), (17, 18), (16, 17), (2, 18), (5, 21)]
    else:
        vocab, pairs = 5000, [(3, 40), (0, 4999), (17, 18), (0, 300), (255, 256), (1, 513), (600, 4000)]
    seed, step = 11, 4
    for row_id, (a, b) in enumerate(pairs):
        g = noise_of_row(seed, step, row_id, vocab)
        logits = torch.full((1, vocab), -torch.inf, dtype=torch.float64)
        logits[0, a], logits[0, b] = g[b], g[a]
        assert (logits[0, a] + g[a]) == (logits[0, b] + g[b])
        expected = gumbel_argmax_ref(logits, seed, step, torch.tensor([row_id]))
        assert expected.tolist() == [a]
        if not target.interpreted:  # the interpreter pays per launch: its draw below checks the token
            assert sample(target, logits, seed, step, torch.tensor([row_id])).tolist() == [a]
        if target != REFERENCE:
            assert_matches_reference(target, logits, seed, step, torch.tensor([row_id]))


@pytest.mark.parametrize("target", EVERY)
def test_infinite_logits(target):
    logits = torch.tensor([[0.0, torch.inf, 5.0, torch.inf], [-torch.inf, -torch.inf, 0.0, -torch.inf]])
    assert sample(target, logits, 3, 3).tolist() == [1, 2]  # +inf wins outright, first of equals
    assert sample(target, logits, 3, 3, exclude=1).tolist() == [3, 2]
    if target != REFERENCE:
        for temperature in (1.0, 0.0) if target.interpreted else (1.0, 0.5, 0.0):
            assert_matches_reference(target, logits, 3, 3, temperature=temperature)


@pytest.mark.parametrize("target", FUSED)
def test_rows_at_minus_infinity_but_one_token(target, small_blocks):
    vocab, columns = (50, [0, 49, 16, 17, 31]) if target.interpreted else (777, [0, 1, 255, 256, 511, 776])
    logits = torch.full((len(columns), vocab), -torch.inf)
    for r, column in enumerate(columns):
        logits[r, column] = -50.0 + r
    for temperature in (1.0, 0.3, 0.0):
        tokens, _ = assert_matches_reference(target, logits, 8, 1, torch.arange(len(columns)) * 3 + 1, temperature)
        assert tokens.tolist() == columns


@pytest.mark.parametrize("target", FUSED)
def test_large_and_equal_logits(target):
    """±1e4 logits (fp16's range ends at 65504): the noise barely moves the scores, so the argmax hinges on
    the last bits of large sums; and all-equal rows, where only the noise decides."""
    rows, vocab = (4, 40) if target.interpreted else (16, 300)
    g = torch.Generator().manual_seed(9)
    signs = torch.randint(0, 2, (rows, vocab), generator=g) * 2 - 1
    base = signs * 1e4 + torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 4
    base[:, 7] = 1e4  # ties in the low-precision dtypes
    base[:, 20] = 1e4
    base[0, 30:] = 9999.5
    # In the interpreter, which pays per launch, each dtype with one temperature.
    pairs = zip(DTYPES, TEMPERATURES) if target.interpreted else itertools.product(DTYPES, TEMPERATURES)
    for dtype, temperature in pairs:
        assert_matches_reference(target, base.to(dtype), 1, 2, torch.arange(rows) + 40, temperature, exclude=[3])
    assert_matches_reference(target, torch.zeros(10, 64, dtype=torch.bfloat16), 8, 1, torch.arange(10) * 3, 1.0, 7)


@pytest.mark.parametrize("target", EVERY)
def test_nan_rows_report_the_first_nan_column_and_raise(target, small_blocks):
    vocab = 40 if target.interpreted else 600
    logits = random_logits(4, vocab, torch.float32, seed=5)
    logits[0, [vocab - 7, 9, vocab - 5]] = float("nan")  # the first NaN column is 9
    logits[1, 5] = float("nan")  # excluded below: no longer a candidate, so not an error
    logits[2] = -torch.inf
    logits[3, vocab - 1] = float("nan")
    if target != REFERENCE:
        for temperature in (1.0, 0.0) if target.interpreted else (1.0, 0.4, 0.0):
            tokens, best = assert_matches_reference(target, logits, 2, 2, None, temperature, exclude=[5])
            assert tokens[[0, 2, 3]].tolist() == [9, 0, vocab - 1]
            assert best[0].isnan() and best[3].isnan() and best[2] == -torch.inf and not best[1].isnan()
    with pytest.raises(ValueError, match="must not hold NaN; row 0 does \\(2 bad row"):
        sample(target, logits[[0, 1, 3]], 2, 2, exclude=5)
    with pytest.raises(ValueError, match="must not hold NaN; row 0 does"):  # greedy too
        sample(target, logits[[0, 1, 3]], 2, 2, temperature=0, exclude=5)
    with pytest.raises(ValueError, match="row 1 has none"):
        sample(target, logits[1:3], 2, 2, exclude=5)
    with pytest.raises(ValueError, match="row 1 has none"):
        sample(target, torch.tensor([[0.0, 1.0], [0.0, -torch.inf]]), 2, 2, exclude=0)


# ---------------------------------------------------------------- layouts, gathers, inputs


@pytest.mark.parametrize("target", EVERY)
def test_non_contiguous_logits(target):
    vocab = 300 if target.interpreted else 600
    base = random_logits(30, 2 * vocab + 20, torch.float32, seed=6)
    row_ids = torch.arange(10) * 3 + 5
    views = {  # applied to the base on each device, so the strides are the same on both
        "row stride, column slice": lambda b: b[::3, 10:10 + vocab],
        "column stride 30": lambda b: b.t().contiguous().t()[5:15, :vocab],
        "column stride 2": lambda b: b[10:20, : 2 * vocab:2],
        "row stride 0": lambda b: b[0:1, :vocab].expand(10, vocab),
        "bf16 transposed": lambda b: b.to(torch.bfloat16).t().contiguous().t()[0:10, :vocab],
    }
    if target.interpreted:  # the interpreter pays per launch: one view of each kind of stride
        views = {name: views[name] for name in ("row stride, column slice", "column stride 30", "row stride 0")}
    for name, view_of in views.items():
        view, ours = view_of(base), view_of(base.to(target.device))
        assert not ours.is_contiguous() and ours.stride() == view.stride(), name
        expected = gumbel_argmax(view.contiguous(), 4, 5, row_ids, 0.8, exclude=[2], backend="reference")
        assert torch.equal(sample(target, ours, 4, 5, row_ids, 0.8, exclude=[2]), expected), name
        if target != REFERENCE and not target.interpreted:
            for temperature in (0.8, 0.0):
                assert_same_draw(draw(target, ours, 4, 5, row_ids, temperature, exclude=[2]),
                                 draw(REFERENCE, view, 4, 5, row_ids, temperature, exclude=[2]))
    # One logits row expanded to many rows (stride 0) still draws independent noise per row.
    if not target.interpreted:
        expanded = torch.zeros(1, 50, device=target.device).expand(300, 50)
        assert len(set(sample(target, expanded, 1, 2).tolist())) > 30


@pytest.mark.parametrize("target", FUSED)
def test_gathered_rows(target):
    logits = random_logits(12, 90, torch.bfloat16, seed=8)
    take = torch.tensor([11, 0, 5, 5, 7, 2])
    row_ids = torch.tensor([3, 1, 4, 10, 5, 9]) * 1000
    for temperature in (1.0, 0.0):
        assert_matches_reference(target, logits, 6, 2, row_ids, temperature, exclude=4, take=take)


@pytest.mark.parametrize("target", EVERY)
def test_empty_input_and_float64_logits_are_not_modified(target):
    assert sample(target, torch.zeros(0, 10), 1, 1).shape == (0,)
    logits = random_logits(5, 20, torch.float64).to(target.device)
    before = logits.clone()
    for temperature in (0.5, 0.0):
        gumbel_argmax(logits, 1, 1, temperature=temperature, exclude=[3], backend=target.name)
    assert torch.equal(logits, before)


def test_default_row_ids_are_the_row_numbers():
    logits = random_logits(9, 50, torch.float32)
    assert torch.equal(gumbel_argmax(logits, 1, 2), gumbel_argmax(logits, 1, 2, row_ids=torch.arange(9)))
    # int32 row ids (and Python lists) are widened: the same draw.
    assert torch.equal(gumbel_argmax(logits, 1, 2, row_ids=torch.arange(9, dtype=torch.int32)),
                       gumbel_argmax(logits, 1, 2))
    assert torch.equal(gumbel_argmax(logits, 1, 2, row_ids=list(range(9))), gumbel_argmax(logits, 1, 2))


def test_seed_and_step_change_the_draw():
    logits = torch.zeros(200, 100)  # uniform over 100 tokens: two draws agree with chance 1/100
    base = gumbel_argmax(logits, 5, 0)
    for other in (gumbel_argmax(logits, 6, 0), gumbel_argmax(logits, 5, 1)):
        assert int((other == base).sum()) < 20


@pytest.mark.parametrize(
    "exclude", [7, [7], (7, 2), np.array([2, 7]), torch.tensor([7, 2, 7]), torch.tensor(7, dtype=torch.int32)])
def test_excluded_ids_are_never_drawn(exclude):
    logits = torch.zeros(500, 8)
    logits[:, 7] = 30.0  # would win almost always
    logits[:, 2] = 29.0
    got = gumbel_argmax(logits, 1, 1, exclude=exclude)
    excluded = set(torch.as_tensor(np.asarray(exclude)).reshape(-1).tolist())
    assert not set(got.tolist()) & excluded
    assert torch.equal(got, gumbel_argmax_ref(logits, 1, 1, exclude=sorted(excluded)))
    # An empty exclude is no exclusion.
    assert torch.equal(gumbel_argmax(logits, 1, 1, exclude=[]), gumbel_argmax(logits, 1, 1))


def test_the_largest_row_id_for_int64_element_ids():
    vocab = 50258
    limit = (2**63 - vocab) // vocab
    assert limit * vocab + vocab - 1 < 2**63 <= (limit + 1) * vocab + vocab - 1
    logits = random_logits(1, vocab, torch.float32)
    row_ids = torch.tensor([limit])
    assert torch.equal(gumbel_argmax(logits, 8, 9, row_ids), gumbel_argmax_ref(logits, 8, 9, row_ids))
    with pytest.raises(ValueError, match="row_ids must be <= "):
        gumbel_argmax(logits, 8, 9, torch.tensor([limit + 1]))


def test_cpp_result_does_not_depend_on_the_thread_count():
    target = Target("gumbel_argmax", "cpp", "cpu")
    if not target.implementation.available("cpu"):
        pytest.skip(target.implementation.unavailable_reason("cpu"))
    logits = random_logits(40, 2000, torch.float32, seed=11)  # above the parallel threshold
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = draw(target, logits, 7, 7, temperature=0.9)
        torch.set_num_threads(max(2, threads))
        multi = draw(target, logits, 7, 7, temperature=0.9)
    finally:
        torch.set_num_threads(threads)
    assert_same_draw(multi, single)
    assert_same_draw(multi, draw(REFERENCE, logits, 7, 7, temperature=0.9))


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(logits=[[0.0, 1.0]]), TypeError, "logits must be a floating tensor"),
        (dict(logits=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "logits must have dtype"),
        (dict(logits=torch.zeros(6)), ValueError, r"logits must have shape \[R, V\] with V >= 1; got shape \(6,\)"),
        (dict(logits=torch.zeros(2, 0)), ValueError, "V >= 1"),
        (dict(seed=-1), ValueError, r"seed must be an int in \[0, 2\^64\)"),
        (dict(seed=2**64), ValueError, "seed must be"),
        (dict(seed=1.0), TypeError, "seed must be"),
        (dict(step=-3), ValueError, "step must be an int >= 0"),
        (dict(row_ids=torch.arange(3)), ValueError, r"row_ids must have shape \[R\] = \[2\]; got shape \(3,"),
        (dict(row_ids=torch.zeros(2)), TypeError, "row_ids must be an integer tensor"),
        (dict(row_ids=torch.tensor([0, -1])), ValueError, "row_ids must be >= 0; got a minimum of -1"),
        (dict(row_ids="ab"), TypeError, "row_ids must be an integer tensor"),
        (dict(temperature=-0.5), ValueError, "temperature must be a finite float >= 0; got -0.5"),
        (dict(temperature=float("nan")), ValueError, "temperature must be"),
        (dict(temperature=float("inf")), ValueError, "temperature must be"),
        (dict(temperature=True), TypeError, "temperature must be"),
        (dict(exclude=3), ValueError, r"exclude must hold token ids in \[0, V\) = \[0, 3\); got 3"),
        (dict(exclude=[-1]), ValueError, "exclude must hold token ids"),
        (dict(exclude=[0, 1, 2]), ValueError, "exclude removes all V = 3 tokens"),
        (dict(exclude=[0.5]), TypeError, "exclude must hold integer token ids"),
        (dict(exclude=torch.tensor([True])), TypeError, "exclude must hold integer token ids"),
        (dict(exclude="a"), TypeError, "exclude must be None, an int"),
        (dict(chunk_rows=0), ValueError, "chunk_rows must be an int >= 1"),
        (dict(backend="numpy"), ValueError, "gumbel_argmax has no backend 'numpy'; its backends are 'auto', "
                                            "'kernels', 'reference', 'cpp', 'cuda', 'triton'"),
        (dict(backend="cuda"), RuntimeError, "gumbel_argmax: backend='cuda' cannot run on cpu tensors here"),
        (dict(logits=torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 2.0]])), ValueError, "row 0 does"),
        (dict(logits=torch.tensor([[0.0, 1.0, 2.0], [-torch.inf] * 3])), ValueError, "row 1 has none"),
        (dict(logits=torch.tensor([[0.0, 1.0, 2.0], [0.0, -torch.inf, -torch.inf]]), exclude=0), ValueError,
         "row 1 has none"),
    ],
)
def test_argument_errors_name_the_argument(kwargs, error, match):
    arguments = dict(logits=torch.zeros(2, 3), seed=1, step=1)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        gumbel_argmax(**arguments)


def test_repeated_row_ids_and_huge_vocabularies_are_refused():
    logits = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="row_ids must be distinct.*; 7 appears 2 times"):
        gumbel_argmax(logits, 1, 0, row_ids=torch.tensor([7, 2, 7]))
    huge = torch.zeros(1, 2**31, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match="V < 2\\^31 tokens; got V = 2147483648"):
        gumbel_argmax(huge, 1, 0)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(logits=torch.zeros(3, 4, dtype=torch.int32)),
         "logits must have dtype float32, float64, float16 or bfloat16, got Int"),
        (dict(logits=torch.zeros(12)), r"logits must have shape \[K, V\], got shape \[12\]"),
        (dict(logits=torch.zeros(3, 0)), "logits must have 1 <= V < 2\\^31 tokens, got V = 0"),
        (dict(row_ids=torch.arange(3, dtype=torch.int32)), r"row_ids must be an int64 tensor \[n\], got Int"),
        (dict(row_ids=torch.arange(4)), r"row_ids must have shape \[K\] = \[3\] when take is None, got shape \[4\]"),
        (dict(row_ids=torch.tensor([0, -1, 2])),
         r"row_ids must be in \[0, 2305843009213693951\] for V = 4 .*got -1 at position 1"),
        (dict(row_ids=torch.tensor([0, 2**62, 2])), "row_ids must be in .*got 4611686018427387904"),
        (dict(take=torch.tensor([0, 3, 1])), r"take must hold logits rows in \[0, K\) = \[0, 3\), got 3 at position 1"),
        (dict(take=torch.tensor([0, 1])), "take and row_ids must have one entry per sampled row, got 2 and 3"),
        (dict(take=torch.tensor([0.0, 1.0, 2.0])), "take must be None or an int64 tensor"),
        (dict(exclude=torch.tensor([4])), r"exclude must hold token ids in \[0, V\) = \[0, 4\), got 4"),
        (dict(exclude=torch.tensor([[1]])), "exclude must be None or an int64 tensor \\[m\\]"),
        (dict(step=-1), "step must be >= 0, got -1"),
        (dict(temperature=-0.5), "temperature must be a finite float >= 0, got -0.5"),
        (dict(temperature=float("inf")), "temperature must be a finite float >= 0, got inf"),
        (dict(logits=torch.zeros(3, 4, device="meta")), "logits must be on CPU, got a tensor on meta"),
    ],
)
def test_cpp_operator_errors_name_the_argument(change, match):
    if _extension._C is None or not hasattr(_extension._C, "gumbel_argmax_cpu"):
        pytest.skip(f"hdlm_kernels._C has no gumbel_argmax_cpu: {_extension.missing_reason}")
    arguments = dict(logits=torch.zeros(3, 4), take=None, row_ids=torch.arange(3), seed=1, step=1, temperature=1.0,
                     exclude=None)
    arguments.update(change)
    with pytest.raises(RuntimeError, match="gumbel_argmax: " + match):
        _extension._C.gumbel_argmax_cpu(**arguments)


@pytest.mark.cuda
def test_cuda_operator_checks_devices():
    if _extension.cuda_missing_reason():
        pytest.skip(_extension.cuda_missing_reason())
    logits = torch.zeros(3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="gumbel_argmax: row_ids must be on logits' device"):
        _extension._C.gumbel_argmax_cuda(logits, None, torch.arange(3), 1, 1, 1.0, None)
    with pytest.raises(RuntimeError, match="gumbel_argmax: logits must be on CUDA, got a tensor on cpu"):
        _extension._C.gumbel_argmax_cuda(logits.cpu(), None, torch.arange(3), 1, 1, 1.0, None)


# ---------------------------------------------------------------- the deferred entry point


@pytest.mark.parametrize("target", EVERY)
def test_deferred_draw_is_the_same_draw_and_reports_bad_rows_instead_of_raising(target):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(8 if target.interpreted else 40, 300, generator=g)
    row_ids = torch.randperm(1000, generator=g)[:logits.shape[0]]
    exclude = torch.tensor([0, 299])
    device, name = target.device, target.name
    tokens, failed = gumbel_argmax_deferred(logits.to(device), 7, 2, row_ids.to(device), 0.8, exclude.to(device),
                                            backend=name)
    assert torch.equal(tokens.cpu(), gumbel_argmax(logits, 7, 2, row_ids, 0.8, exclude, backend="reference"))
    assert failed.dtype == torch.bool and failed.dim() == 0 and not bool(failed)
    logits[5, 17] = math.nan
    assert bool(gumbel_argmax_deferred(logits.to(device), 7, 2, row_ids.to(device), backend=name)[1])
    logits[5] = -math.inf
    assert bool(gumbel_argmax_deferred(logits.to(device), 7, 2, row_ids.to(device), backend=name)[1])


def test_deferred_checks_the_metadata():
    logits, row_ids = torch.zeros(40, 300), torch.arange(40)
    with pytest.raises(TypeError, match="row_ids must be an int64 tensor on cpu; got torch.int32"):
        gumbel_argmax_deferred(logits, 7, 2, row_ids.int())
    with pytest.raises(ValueError, match=r"row_ids must have shape \[R\] = \[40\]; got shape \(39,\)"):
        gumbel_argmax_deferred(logits, 7, 2, row_ids[1:])
    with pytest.raises(TypeError, match="exclude must be an int64 tensor"):
        gumbel_argmax_deferred(logits, 7, 2, row_ids, exclude=[0])
    with pytest.raises(ValueError, match="gumbel_argmax_deferred: gumbel_argmax has no backend 'x'"):
        gumbel_argmax_deferred(logits, 7, 2, row_ids, backend="x")


# ---------------------------------------------------------------- torch.compile through the custom op


def _compiles_without_graph_breaks(target):
    logits = random_logits(6, 50, torch.float32, seed=2)
    row_ids = torch.arange(6) * 11 + 3
    expected = gumbel_argmax_ref(logits, 5, 3, row_ids, 0.7, exclude=[4])

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(logits, row_ids):
        return gumbel_argmax(logits * 1.0, 5, 3, row_ids, 0.7, exclude=[4], backend=target.name) + 0

    assert torch.equal(step(logits.to(target.device), row_ids.to(target.device)).cpu(), expected)


def test_compiles_without_graph_breaks_on_the_cpu_with_the_cpp_backend():
    target = Target("gumbel_argmax", "cpp", "cpu")
    if not target.implementation.available("cpu"):
        pytest.skip(target.implementation.unavailable_reason("cpu"))
    _compiles_without_graph_breaks(target)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_compiles_without_graph_breaks_on_the_gpu(name):
    _compiles_without_graph_breaks(Target("gumbel_argmax", name, "cuda"))


def test_argument_checks_run_once_per_call():
    """The metadata checks run in gumbel_argmax, the value checks inside the op: each once per call."""
    logits = random_logits(4, 30, torch.float32)
    checkers = ("checked_logits", "checked_row_ids", "check_row_id_values", "exclude_values", "check_winners")
    counts, selected = calls_during(gumbel_module, checkers,
                                    lambda: gumbel_argmax(logits, 1, 2, torch.arange(4), exclude=[3]))
    assert counts == dict.fromkeys(checkers, 1)
    assert selected.count("gumbel_argmax") == 1


# ---------------------------------------------------------------- the Triton kernel's GPU code, compiled without a GPU

_PTX_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hdlm_kernels.sampling import triton_gumbel, triton_stream

signature = {"LOGITS": "*bf16", "TAKE": "*i64", "ROW_IDS": "*i64", "EXCLUDE": "*i8", "CONSTS": "*fp64",
             "TOKENS": "*i64", "BEST": "*fp64", "stride_row": "i32", "stride_col": "i32", "vocab": "i32",
             "key0": "i64", "key1": "i64", "step_lo": "i64", "temperature_bits": "i64",
             "HAS_TAKE": "constexpr", "HAS_EXCLUDE": "constexpr", "NOISE": "constexpr", "DIVIDE": "constexpr",
             "BLOCK_P": "constexpr"}
constexprs = {"HAS_TAKE": True, "HAS_EXCLUDE": True, "NOISE": True, "DIVIDE": True, "BLOCK_P": 512}
source = ASTSource(fn=triton_gumbel._gumbel_argmax_kernel, signature=signature, constexprs=constexprs)
kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=triton_stream.launch_options(8))
ptx = kernel.asm["ptx"]
json.dump({"f64": sorted(set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.f64\b", ptx))),
           "literals": sorted(set(re.findall(r"\b0d[0-9A-F]{16}\b", ptx)))}, sys.stdout)
"""


def test_triton_gpu_code_has_no_fma_and_only_exact_float64_literals(tmp_path):
    """Compiles the Gumbel-max kernel for sm_90 with the launch options of the module (no GPU needed: the
    PTX is built by LLVM on the CPU) and checks what bit-identity on the GPU rests on: no fused
    multiply-add, IEEE round-to-nearest float64 arithmetic and division, and no float64 constant other
    than the exact 2^-53, ±1, 2 and ±inf (log64's coefficients come from a float64 tensor)."""
    pytest.importorskip("triton")
    found = compiled_ptx_ops(_PTX_SCRIPT, tmp_path)
    assert not [op for op in found["f64"] if op.startswith("fma") or "approx" in op], found["f64"]
    arithmetic = [op for op in found["f64"] if op.split(".")[0] in ("add", "sub", "mul", "div")]
    assert "div.rn.f64" in arithmetic and all(".rn." in op for op in arithmetic), found["f64"]
    exact = {"0d3CA0000000000000", "0d3FF0000000000000", "0dBFF0000000000000", "0d4000000000000000",
             "0d7FF0000000000000", "0dFFF0000000000000", "0d7FF8000000000000", "0d0000000000000000"}
    assert set(found["literals"]) <= exact, found["literals"]


# ---------------------------------------------------------------- GPU: paper-sized batches


@pytest.mark.cuda
@pytest.mark.parametrize("target", [p for p in FUSED if p.values[0].kind == "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_paper_sized_batch_equals_the_reference_on_both_devices(target, dtype):
    rows, vocab = 512, 50258
    logits = random_logits(rows, vocab, dtype, seed=1).cuda()
    row_ids = (torch.arange(rows) * 17 + 3).cuda()
    gpu_reference = Target("gumbel_argmax", "reference", "cuda")
    for temperature, exclude in ((1.0, 50257), (0.55, [0, 50257]), (0.0, None)):
        ours = draw(target, logits, SEED_MAX, 2**32 + 9, row_ids, temperature, exclude)
        assert_same_draw(ours, draw(gpu_reference, logits, SEED_MAX, 2**32 + 9, row_ids, temperature, exclude))
        some = slice(0, 16)  # across devices: the reference on the CPU
        cpu = draw(REFERENCE, logits[some].cpu(), SEED_MAX, 2**32 + 9, row_ids[some].cpu(), temperature, exclude)
        assert_same_draw((ours[0][some], ours[1][some]), cpu)


# ---------------------------------------------------------------- the distribution


@pytest.mark.parametrize("temperature, exclude, dtype", [
    (1.0, None, torch.float32), (0.6, None, torch.bfloat16), (1.7, [0, 5], torch.float16), (1.0, None, torch.float64)])
def test_chi_square_against_softmax(temperature, exclude, dtype):
    rows = 20000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0], dtype=dtype)
    tokens = gumbel_argmax(base.expand(rows, 8), 2024, 1, temperature=temperature, exclude=exclude)
    counts = torch.bincount(tokens, minlength=8).double()
    weights = torch.exp(base.double() / temperature)  # the dtype's own values, in float64
    if exclude is not None:
        assert counts[exclude].sum() == 0
        weights[exclude] = 0.0
    keep = weights > 0
    expected = rows * weights[keep] / weights.sum()
    p_value = scipy.stats.chisquare(counts[keep].numpy(), expected.numpy()).pvalue
    assert p_value > P_VALUE_FLOOR, (counts.tolist(), expected.tolist())


def tail_counts(tail, gap, rows, row_offset, device, batch_rows=None):
    """Rows of one top token (logit 0) followed by `tail` tokens at -gap; returns how many of the rows drew a
    tail token. Rows are (row_offset + r) so that different checks use fresh noise."""
    vocab = tail + 1
    base = torch.full((vocab,), -gap, dtype=torch.float32, device=device)
    base[0] = 0.0
    batch_rows = batch_rows or rows
    hits = 0
    for start in range(0, rows, batch_rows):
        count = min(batch_rows, rows - start)
        row_ids = torch.arange(count, device=device) + row_offset + start
        tokens = gumbel_argmax(base.expand(count, vocab), 77, 0, row_ids)
        hits += int((tokens != 0).sum())
    return hits


def tail_mass(tail, gap):
    weight = tail * math.exp(-gap)
    return weight / (1 + weight)


def test_tail_mass_matches_the_true_mass():
    """One top token, 5000 tokens 12 nats below, 8000 rows (40M draws): the tail's frequency matches its
    softmax mass, 0.0298 (~238 expected hits). Float32 Gumbel noise would give 0.995x here (computed exactly
    over all 2^24 float32 uniforms), too little to see at this cost: its deficit grows to 0.76x at gap 16 and
    0.24x at 17.5, where each hit costs ~e^gap draws (see the GPU test below and
    test_noise_reaches_beyond_the_fp32_cap)."""
    tail, gap, rows = 5000, 12.0, 8000
    hits = tail_counts(tail, gap, rows, row_offset=0, device="cpu")
    p_value = scipy.stats.binomtest(hits, rows, tail_mass(tail, gap)).pvalue
    assert p_value > P_VALUE_FLOOR, (hits, rows * tail_mass(tail, gap))


def test_noise_reaches_beyond_the_fp32_cap():
    """A draw that FP32 Gumbel noise can never make. Element 127741454 of stream 0 (seed 20240917, step 3) has
    u > 1 - 2^-31 and g ≈ 21.73 (found by scanning 3e8 elements once). With V = 5001 it is token 911 of row
    25543. Put token 0 at logit 0 and every other token 18 nats below: the exact sampler must return 911 (its
    score -18 + 21.73 beats token 0's), while float32 noise, capped at 16.64, would need token 0's noise below
    16.64 - 18 < its actual value: it would return 0."""
    seed, step, vocab, element, gap = 20240917, 3, 5001, 127741454, 18.0
    row_id, token = divmod(element, vocab)
    g = noise_of_row(seed, step, row_id, vocab)  # the independent NumPy stream
    assert g[token] > 21.7 and g[token] - gap > g[0]  # the exact sampler picks `token`
    assert FP32_GUMBEL_CAP - gap < g[0]  # float32 noise could not: 16.64 - 18 + g[0]
    logits = torch.full((vocab,), -gap)
    logits[0] = 0.0
    got = gumbel_argmax(logits.expand(3, vocab), seed, step, torch.tensor([row_id - 1, row_id, row_id + 1]))
    assert got[1].item() == token
    assert got[[0, 2]].tolist() == [0, 0]  # the neighbours' noise is ordinary: the top token wins


@pytest.mark.cuda
def test_cuda_tail_mass_where_fp32_noise_visibly_undersamples():
    """Gap 17.5 (4e9 draws): 5000 tail tokens hold mass 1.255e-4, i.e. ~100 expected hits in 800k rows (the
    check accepts 55 and more); float32 Gumbel noise would give 0.244x of it (~24.5, computed exactly over all
    2^24 float32 uniforms), which passes with chance < 1e-7. Needs a GPU kernel: the NumPy stream would take
    hours."""
    tail, gap, rows = 5000, 17.5, 800_000
    hits = tail_counts(tail, gap, rows, row_offset=10**7, device="cuda", batch_rows=40_000)
    p_value = scipy.stats.binomtest(hits, rows, tail_mass(tail, gap)).pvalue
    assert p_value > P_VALUE_FLOOR, (hits, rows * tail_mass(tail, gap))


def test_hk_namespace_exports():
    assert hk.sampling.gumbel_argmax is gumbel_argmax and hk.sampling.gumbel_argmax_ref is gumbel_argmax_ref
