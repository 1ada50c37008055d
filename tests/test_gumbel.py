"""FP64 Gumbel-max sampling (DESIGN.md §6): bit-exact against the direct reference twin, row identity,
greedy and tie rules, exclusion, argument checks, chunking, and its distribution: chi-square on a small
vocabulary, the mass of a far tail, and noise beyond the FP32 cap (notes/kernel-landscape.md §4.2)."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings, strategies as st

import hdlm_kernels as hk
from hdlm_kernels import _extension
from hdlm_kernels.sampling import gumbel as gumbel_module
from hdlm_kernels.sampling import gumbel_argmax, gumbel_argmax_ref, uniform53_ref
from hdlm_kernels.sampling.log64 import gumbel_noise_numpy

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# The largest Gumbel noise float32 uniforms can give: u = 1 - 2^-24 (notes/kernel-landscape.md §4.2).
FP32_GUMBEL_CAP = -math.log(-math.log1p(-(2.0**-24)))  # 16.6355...
P_VALUE_FLOOR = 1e-6  # statistical tests fail with chance < 1e-6 for a correct sampler (and are seeded)


def random_logits(rows, vocab, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)


def gumbel_noise_ref(seed, step, row_id, vocab):
    """The noise of one row, straight from the NumPy stream: g = -log64(-log64 u), float64 [V]."""
    u = uniform53_ref(seed, step, 0, row_id * vocab + torch.arange(vocab))
    return torch.from_numpy(gumbel_noise_numpy(u.numpy()))


# ---------------------------------------------------------------- bit-exact against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.55, 2.3, 0.0])
@pytest.mark.parametrize("exclude", [None, 5, [0, 17, 299]], ids=["none", "int", "list"])
def test_matches_reference_bit_exactly(dtype, temperature, exclude):
    rows, vocab = 23, 300
    logits = random_logits(rows, vocab, dtype, seed=rows)
    row_ids = torch.randint(0, 10**12, (rows,), generator=torch.Generator().manual_seed(1))
    expected = gumbel_argmax_ref(logits, 99, 7, row_ids, temperature, exclude)
    for chunk_rows in (1, 7, rows, None):
        got = gumbel_argmax(logits, 99, 7, row_ids, temperature, exclude, chunk_rows=chunk_rows)
        assert got.dtype == torch.int64 and got.shape == (rows,)
        assert torch.equal(got, expected), f"chunk_rows={chunk_rows}"


def test_matches_reference_on_a_paper_sized_vocabulary():
    logits = random_logits(6, 50258, torch.bfloat16, seed=3)
    row_ids = torch.tensor([0, 1, 1023, 1024, 8191, 123456789])
    for step in (0, 1, 2**32 + 5):
        expected = gumbel_argmax_ref(logits, 2**64 - 1, step, row_ids, 1.0, exclude=50257)
        assert torch.equal(gumbel_argmax(logits, 2**64 - 1, step, row_ids, exclude=50257), expected)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    vocab=st.integers(1, 40),
    chunk_rows=st.integers(1, 13),
    temperature=st.sampled_from([0.0, 0.3, 1.0, 4.0]),
    data=st.data(),
)
def test_a_row_depends_only_on_seed_step_and_row_id(rows, vocab, chunk_rows, temperature, data):
    seed = data.draw(st.integers(0, 2**64 - 1))
    step = data.draw(st.integers(0, 2**40))
    row_ids = torch.tensor(data.draw(st.lists(st.integers(0, 10**9), min_size=rows, max_size=rows, unique=True)))
    logits = random_logits(rows, vocab, torch.float32, seed=rows * 100 + vocab, scale=1.0)
    whole = gumbel_argmax(logits, seed, step, row_ids, temperature, chunk_rows=chunk_rows)
    assert torch.equal(whole, gumbel_argmax_ref(logits, seed, step, row_ids, temperature))
    # The same rows in another order, one at a time, or next to other rows give the same tokens.
    order = torch.tensor(data.draw(st.permutations(range(rows))))
    shuffled = gumbel_argmax(logits[order], seed, step, row_ids[order], temperature, chunk_rows=chunk_rows)
    assert torch.equal(shuffled, whole[order])
    r = data.draw(st.integers(0, rows - 1))
    single = gumbel_argmax(logits[r : r + 1], seed, step, row_ids[r : r + 1], temperature)
    assert torch.equal(single, whole[r : r + 1])
    others = random_logits(3, vocab, torch.float32, seed=7)
    other_ids = torch.tensor([5, 6, 7]) + 10**10
    padded = gumbel_argmax(
        torch.cat([others, logits]), seed, step, torch.cat([other_ids, row_ids]), temperature
    )
    assert torch.equal(padded[3:], whole)


def test_default_row_ids_are_the_row_numbers():
    logits = random_logits(9, 50, torch.float32)
    assert torch.equal(gumbel_argmax(logits, 1, 2), gumbel_argmax(logits, 1, 2, row_ids=torch.arange(9)))
    # int32 row ids (and Python lists) are widened: the same draw.
    assert torch.equal(
        gumbel_argmax(logits, 1, 2, row_ids=torch.arange(9, dtype=torch.int32)), gumbel_argmax(logits, 1, 2)
    )
    assert torch.equal(gumbel_argmax(logits, 1, 2, row_ids=list(range(9))), gumbel_argmax(logits, 1, 2))


def test_seed_and_step_change_the_draw():
    logits = torch.zeros(200, 100)  # uniform over 100 tokens: two draws agree with chance 1/100
    base = gumbel_argmax(logits, 5, 0)
    for other in (gumbel_argmax(logits, 6, 0), gumbel_argmax(logits, 5, 1)):
        assert int((other == base).sum()) < 20


# ---------------------------------------------------------------- greedy, ties, exclusion, edge values


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_temperature_zero_is_the_argmax_with_ties_to_the_lowest_index(dtype):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [-2.0] * 4, [0.5, -1.0, 7.0, 7.0]], dtype=dtype)
    assert gumbel_argmax(logits, 0, 0, temperature=0).tolist() == [1, 0, 2]
    assert gumbel_argmax(logits, 0, 0, temperature=0, exclude=[1, 2]).tolist() == [0, 0, 3]
    # Random rows (bf16/fp16 round many values to ties): the first index of the maximum.
    logits = random_logits(64, 33, dtype, scale=0.5)
    first_max = [row.index(max(row)) for row in logits.double().tolist()]
    assert gumbel_argmax(logits, 0, 0, temperature=0).tolist() == first_max


def test_exact_score_ties_go_to_the_lowest_index():
    """Scores l_a + g_a and l_b + g_b tie exactly when l_a = g_b and l_b = g_a (fp64 addition
    commutes): the lower of a, b must win. Every other token is at -inf."""
    seed, step, vocab = 11, 4, 64
    for row_id, (a, b) in enumerate([(3, 40), (0, 63), (17, 18)]):
        g = gumbel_noise_ref(seed, step, row_id, vocab)
        logits = torch.full((1, vocab), -torch.inf, dtype=torch.float64)
        logits[0, a], logits[0, b] = g[b], g[a]
        assert (logits[0, a] + g[a]) == (logits[0, b] + g[b])
        got = gumbel_argmax(logits, seed, step, row_ids=torch.tensor([row_id]))
        assert got.tolist() == [a] == gumbel_argmax_ref(logits, seed, step, torch.tensor([row_id])).tolist()


def test_infinite_logits():
    logits = torch.tensor([[0.0, torch.inf, 5.0, torch.inf], [-torch.inf, -torch.inf, 0.0, -torch.inf]])
    assert gumbel_argmax(logits, 3, 3).tolist() == [1, 2]  # +inf wins outright, first of equals
    assert gumbel_argmax(logits, 3, 3, exclude=1).tolist() == [3, 2]


@pytest.mark.parametrize(
    "exclude", [7, [7], (7, 2), np.array([2, 7]), torch.tensor([7, 2, 7]), torch.tensor(7, dtype=torch.int32)]
)
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


def test_float64_logits_are_not_modified():
    logits = random_logits(5, 20, torch.float64)
    before = logits.clone()
    gumbel_argmax(logits, 1, 1, temperature=0.5, exclude=[3])
    gumbel_argmax(logits, 1, 1, temperature=0.0, exclude=[3])
    assert torch.equal(logits, before)


def test_empty_and_non_contiguous_inputs():
    assert gumbel_argmax(torch.zeros(0, 10), 1, 1).shape == (0,)
    logits = random_logits(40, 30, torch.float32)
    view = logits.t().contiguous().t()[::3]  # non-contiguous rows
    assert torch.equal(gumbel_argmax(view, 1, 2), gumbel_argmax(view.contiguous(), 1, 2))
    # One logits row expanded to many rows (stride 0) still draws independent noise per row.
    expanded = torch.zeros(1, 50).expand(300, 50)
    assert len(set(gumbel_argmax(expanded, 1, 2).tolist())) > 30


def test_the_largest_row_id_for_int64_element_ids():
    vocab = 50258
    limit = (2**63 - vocab) // vocab
    assert limit * vocab + vocab - 1 < 2**63 <= (limit + 1) * vocab + vocab - 1
    logits = random_logits(1, vocab, torch.float32)
    row_ids = torch.tensor([limit])
    assert torch.equal(gumbel_argmax(logits, 8, 9, row_ids), gumbel_argmax_ref(logits, 8, 9, row_ids))
    with pytest.raises(ValueError, match="row_ids must be <= "):
        gumbel_argmax(logits, 8, 9, torch.tensor([limit + 1]))


def test_chunks_bound_the_float64_temporaries(monkeypatch):
    """The reference backend never builds more than chunk_rows x V element ids / noise at once."""
    sizes = []
    real = gumbel_module._stream_uniforms

    def recording(seed, step, stream, elements):
        sizes.append(elements.numel())
        return real(seed, step, stream, elements)

    monkeypatch.setattr(gumbel_module, "_stream_uniforms", recording)
    vocab = 50258
    default = max(1, gumbel_module.CHUNK_BYTES // (8 * vocab))
    logits = torch.zeros(1, vocab).expand(2 * default + 1, vocab)
    gumbel_argmax(logits, 1, 1, backend="reference")  # "auto" may take a fused kernel (no chunks)
    assert max(sizes) * 8 <= gumbel_module.CHUNK_BYTES and len(sizes) == 3
    sizes.clear()
    gumbel_argmax(logits[:10], 1, 1, chunk_rows=4, backend="reference")
    assert sizes == [4 * vocab, 4 * vocab, 2 * vocab]


# ---------------------------------------------------------------- backends and argument checks


def test_backends():
    logits = random_logits(4, 10, torch.float32)
    expected = gumbel_argmax(logits, 1, 1)
    assert torch.equal(gumbel_argmax(logits, 1, 1, backend="reference"), expected)
    with pytest.raises(ValueError, match="backend must be one of"):
        gumbel_argmax(logits, 1, 1, backend="numpy")
    if _extension._C is not None:  # the C++ backend and the reference draw the same tokens
        assert torch.equal(gumbel_argmax(logits, 1, 1, backend="cpp"), expected)
    else:
        with pytest.raises(RuntimeError, match="backend='cpp' needs hdlm_kernels._C"):
            gumbel_argmax(logits, 1, 1, backend="cpp")
    with pytest.raises(RuntimeError, match="backend='cuda' runs on CUDA tensors"):
        gumbel_argmax(logits, 1, 1, backend="cuda")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(logits=[[0.0, 1.0]]), TypeError, "logits must be a floating tensor"),
        (dict(logits=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "logits must have dtype"),
        (dict(logits=torch.zeros(6)), ValueError, r"logits must have shape \[R, V\]; got shape \(6,\)"),
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


def test_nan_logits_are_reported_greedy_too():
    with pytest.raises(ValueError, match="must not hold NaN"):
        gumbel_argmax(torch.tensor([[0.0, float("nan")]]), 1, 1, temperature=0)


# ---------------------------------------------------------------- distribution


@pytest.mark.parametrize(
    "temperature, exclude, dtype",
    [
        (1.0, None, torch.float32),
        (0.6, None, torch.bfloat16),
        (1.7, [0, 5], torch.float16),
        (1.0, None, torch.float64),
    ],
)
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
    """Rows of one top token (logit 0) followed by `tail` tokens at -gap; returns how many of the
    rows drew a tail token. Rows are (row_offset + r) so that different checks use fresh noise."""
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
    """One top token, 5000 tokens 12 nats below, 8000 rows (40M draws; ~1 s here): the tail's
    frequency matches its softmax mass, 0.0298 (~238 expected hits). Float32 Gumbel noise would give
    0.995x here (computed exactly over all 2^24 float32 uniforms), too little to see at this cost: its
    deficit grows to 0.76x at gap 16 and 0.24x at 17.5, where each hit costs ~e^gap draws (see the
    GPU test below and test_noise_reaches_beyond_the_fp32_cap)."""
    tail, gap, rows = 5000, 12.0, 8000
    hits = tail_counts(tail, gap, rows, row_offset=0, device="cpu")
    p_value = scipy.stats.binomtest(hits, rows, tail_mass(tail, gap)).pvalue
    assert p_value > P_VALUE_FLOOR, (hits, rows * tail_mass(tail, gap))


def test_noise_reaches_beyond_the_fp32_cap():
    """A draw that FP32 Gumbel noise can never make. Element 127741454 of stream 0 (seed 20240917,
    step 3) has u > 1 - 2^-31 and g ≈ 21.73 (found by scanning 3e8 elements once). With V = 5001 it is
    token 911 of row 25543. Put token 0 at logit 0 and every other token 18 nats below: the exact
    sampler must return 911 (its score -18 + 21.73 beats token 0's), while float32 noise, capped at
    16.64, would need token 0's noise below 16.64 - 18 < its actual value: it would return 0."""
    seed, step, vocab, element, gap = 20240917, 3, 5001, 127741454, 18.0
    row_id, token = divmod(element, vocab)
    g = gumbel_noise_ref(seed, step, row_id, vocab)  # the independent NumPy stream
    assert g[token] > 21.7 and g[token] - gap > g[0]  # the exact sampler picks `token`
    assert FP32_GUMBEL_CAP - gap < g[0]  # float32 noise could not: 16.64 - 18 + g[0]
    logits = torch.full((vocab,), -gap)
    logits[0] = 0.0
    neighbours = torch.tensor([row_id - 1, row_id, row_id + 1])
    got = gumbel_argmax(logits.expand(3, vocab), seed, step, neighbours)
    assert got[1].item() == token
    assert got[[0, 2]].tolist() == [0, 0]  # the neighbours' noise is ordinary: the top token wins


# ---------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_tokens_equal_cpu_tokens(dtype):
    logits = random_logits(64, 50258, dtype, seed=5)
    row_ids = torch.arange(64) * 1024 + 17
    for temperature, exclude in ((1.0, 50257), (0.7, None), (0.0, [3])):
        cpu = gumbel_argmax(logits, 42, 9, row_ids, temperature, exclude)
        cuda = gumbel_argmax(logits.cuda(), 42, 9, row_ids.cuda(), temperature, exclude)
        assert cuda.device.type == "cuda"
        assert torch.equal(cuda.cpu(), cpu)


@pytest.mark.cuda
def test_cuda_tail_mass_where_fp32_noise_visibly_undersamples():
    """The kernel-landscape measurement at gap 17.5 (4e9 draws): 5000 tail tokens hold mass 1.255e-4,
    i.e. ~100 expected hits in 800k rows (the check accepts 55 and more); float32 Gumbel noise would
    give 0.244x of it (~24.5, computed exactly over all 2^24 float32 uniforms), which passes with
    chance < 1e-7. Needs the CUDA stream: the NumPy one would take hours."""
    if _extension.cuda_missing_reason():
        pytest.skip(f"the CUDA stream is not built: {_extension.cuda_missing_reason()}")
    tail, gap, rows = 5000, 17.5, 800_000
    hits = tail_counts(tail, gap, rows, row_offset=10**7, device="cuda", batch_rows=40_000)
    p_value = scipy.stats.binomtest(hits, rows, tail_mass(tail, gap)).pvalue
    assert p_value > P_VALUE_FLOOR, (hits, rows * tail_mass(tail, gap))


def test_hk_namespace_exports():
    assert hk.sampling.gumbel_argmax is gumbel_argmax and hk.sampling.gumbel_argmax_ref is gumbel_argmax_ref


def test_repeated_row_ids_and_huge_vocabularies_are_refused():
    logits = torch.zeros(3, 5)
    with pytest.raises(ValueError, match="row_ids must be distinct.*; 7 appears 2 times"):
        gumbel_argmax(logits, 1, 0, row_ids=torch.tensor([7, 2, 7]))
    huge = torch.zeros(1, 2**31, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match="V < 2\\^31 tokens; got V = 2147483648"):
        gumbel_argmax(huge, 1, 0)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_deferred_draw_is_the_same_draw_and_reports_bad_rows_instead_of_raising(backend):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 300, generator=g)
    row_ids = torch.randperm(1000, generator=g)[:40]
    exclude = torch.tensor([0, 299])
    tokens, failed = hk.sampling.gumbel_argmax_deferred(logits, 7, 2, row_ids, 0.8, exclude, backend=backend)
    assert torch.equal(tokens, gumbel_argmax(logits, 7, 2, row_ids, 0.8, exclude, backend="reference"))
    assert failed.dtype == torch.bool and failed.dim() == 0 and not bool(failed)
    logits[5, 17] = math.nan
    _, failed = hk.sampling.gumbel_argmax_deferred(logits, 7, 2, row_ids, backend=backend)
    assert bool(failed)
    logits[5] = -math.inf
    _, failed = hk.sampling.gumbel_argmax_deferred(logits, 7, 2, row_ids, backend=backend)
    assert bool(failed)
    with pytest.raises(TypeError, match="row_ids must be an int64 tensor on cpu; got torch.int32"):
        hk.sampling.gumbel_argmax_deferred(logits, 7, 2, row_ids.int())
    with pytest.raises(ValueError, match=r"row_ids must have shape \[R\] = \[40\]; got shape \(39,\)"):
        hk.sampling.gumbel_argmax_deferred(logits, 7, 2, row_ids[1:])
    with pytest.raises(TypeError, match="exclude must be an int64 tensor"):
        hk.sampling.gumbel_argmax_deferred(logits, 7, 2, row_ids, exclude=[0])
