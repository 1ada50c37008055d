"""The compiled Gumbel-max backends (csrc/gumbel_cpu.cpp, csrc/gumbel_cuda.cu; DESIGN.md §6) bit for bit
against the reference: log64 and its constants, then gumbel_argmax(backend="cpp") against
backend="reference" (tokens and the winning float64 scores) over dtypes, temperatures, exclusions, ties,
infinities, NaN, strides, row gathers, large row ids and seeds; availability errors; and, on a GPU,
backend="cuda" against the reference, the C++ backend and the Triton backend.

The C++ tests skip (with the reason) when hdlm_kernels._C is not built; the CUDA ones when it has no
CUDA operators or there is no GPU."""

import types

import pytest
import torch
from sampling_checks import assert_same_draw
from hypothesis import given, settings, strategies as st

from hdlm_kernels import _extension
from hdlm_kernels.sampling import acs_step, gumbel_argmax, gumbel_argmax_ref, uniform53_ref
from hdlm_kernels.sampling import gumbel as gumbel_module
from hdlm_kernels.sampling.gumbel import _checked_exclude
from hdlm_kernels.sampling.log64 import LN2_HI, LN2_LO, LOG64_COEFFICIENTS, gumbel_noise, log64

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
TEMPERATURES = [1.0, 0.55, 2.3, 0.0]
EXCLUDES = {"none": None, "int": 5, "list": [0, 17, 299]}
SEED_MAX = 2**64 - 1
CPU = torch.device("cpu")


@pytest.fixture
def extension():
    if _extension._C is None:
        pytest.skip(f"hdlm_kernels._C is not available: {_extension.missing_reason}")
    if not hasattr(_extension._C, "gumbel_argmax_cpu"):
        pytest.skip("hdlm_kernels._C was built from older sources (no gumbel_argmax_cpu); reinstall")
    return _extension._C


def random_logits(rows, vocab, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)


def draw(backend, logits, seed, step, row_ids=None, temperature=1.0, exclude=None, take=None):
    """(tokens, best) of one implementation for already-checked arguments, on logits' device."""
    device = logits.device
    rows = logits.shape[0] if take is None else take.shape[0]
    row_ids = torch.arange(rows) if row_ids is None else row_ids
    implementation = gumbel_module._IMPLEMENTATIONS[backend]
    return implementation(logits, None if take is None else take.to(device), row_ids.to(device), seed, step,
                          float(temperature), _checked_exclude(exclude, logits.shape[1], device), 64)


def assert_cpp_matches_reference(logits, seed, step, row_ids=None, temperature=1.0, exclude=None, take=None):
    ours = draw("cpp", logits, seed, step, row_ids, temperature, exclude, take)
    assert_same_draw(ours, draw("reference", logits, seed, step, row_ids, temperature, exclude, take))
    return ours


# ---------------------------------------------------------------- log64


def log64_inputs():
    """Uniforms over the uniform53 range, their negated logarithms, both sides of the √2 mantissa
    boundary at many exponents, and positive normals of every magnitude."""
    g = torch.Generator().manual_seed(0)
    u = uniform53_ref(3, 4, 0, torch.arange(50000))
    sqrt2_below = float.fromhex("0x1.6a09e667f3bcdp+0")
    sqrt2_above = float.fromhex("0x1.6a09e667f3bcep+0")
    boundary = torch.tensor([v * 2.0**e for e in range(-60, 60) for v in (sqrt2_below, sqrt2_above, 1.0)],
                            dtype=torch.float64)
    ends = torch.tensor([2.0**-53, 1 - 2.0**-53, 0.5, 1 - 2.0**-52, 3 * 2.0**-52, 0.25, 0.75, 1.0, 2.0, 36.7,
                         1e-16, 2.0**-1022, 1.7976931348623157e308], dtype=torch.float64)
    wide = torch.exp2(torch.rand(20000, generator=g, dtype=torch.float64) * 2000 - 1000)
    return torch.cat([u, -torch.log(u), boundary, ends, wide])


def test_log64_constants_equal_the_python_ones(extension):
    expected = list(LOG64_COEFFICIENTS) + [LN2_HI, LN2_LO]
    assert [v.hex() for v in extension.log64_constants()] == [v.hex() for v in expected]


def test_log64_cpp_equals_torch_bit_for_bit(extension):
    x = log64_inputs()
    assert torch.equal(extension.log64_cpu(x).view(torch.int64), log64(x).view(torch.int64))
    u = x[(x > 0) & (x < 1)]
    noise = extension.log64_cpu(u, gumbel=True)
    assert torch.equal(noise.view(torch.int64), gumbel_noise(u).view(torch.int64))
    # Any shape and layout; float64 only.
    grid = x[:24].reshape(2, 3, 4).transpose(0, 2)
    assert torch.equal(extension.log64_cpu(grid), log64(grid.contiguous()))
    with pytest.raises(RuntimeError, match="log64_cpu: x must be a float64 CPU tensor, got Float"):
        extension.log64_cpu(torch.ones(3))


# ---------------------------------------------------------------- bit-exact against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("exclude", list(EXCLUDES.values()), ids=list(EXCLUDES))
def test_cpp_matches_reference_bit_exactly(extension, dtype, temperature, exclude):
    rows, vocab = 23, 300
    logits = random_logits(rows, vocab, dtype, seed=rows)
    row_ids = torch.randint(0, 10**12, (rows,), generator=torch.Generator().manual_seed(1))
    assert_cpp_matches_reference(logits, 99, 7, row_ids, temperature, exclude)
    got = gumbel_argmax(logits, 99, 7, row_ids, temperature, exclude, backend="cpp")
    assert got.dtype == torch.int64 and got.shape == (rows,)
    assert torch.equal(got, gumbel_argmax(logits, 99, 7, row_ids, temperature, exclude, backend="reference"))
    assert torch.equal(got, gumbel_argmax_ref(logits, 99, 7, row_ids, temperature, exclude))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paper_sized_vocabulary(extension, dtype):
    logits = random_logits(6, 50258, dtype, seed=3)
    row_ids = torch.tensor([0, 1, 1023, 1024, 8191, 123456789])
    for step in (0, 2**32 + 5):
        for temperature, exclude in ((1.0, 50257), (0.7, [0, 50257]), (0.0, None)):
            assert_cpp_matches_reference(logits, SEED_MAX, step, row_ids, temperature, exclude)


@pytest.mark.parametrize("vocab", [1, 2, 3, 5, 127, 255, 256, 257, 258, 511, 513, 1001])
def test_vocabularies_that_are_not_a_multiple_of_a_tile(extension, vocab):
    """The C++ kernel walks Philox pairs in tiles of 128 (256 columns): rows that start on an odd element
    (odd row_id * V) begin with half a pair, and the last tile is partial."""
    rows = 8
    logits = random_logits(rows, vocab, torch.float32, seed=vocab, scale=0.5)
    row_ids = torch.tensor([0, 1, 2, 3, 7, 2**31 - 1, 2**32 + 1, 10**12 + 3])
    for temperature in (1.0, 0.8, 0.0):
        assert_cpp_matches_reference(logits, 5, 6, row_ids, temperature)


def test_large_row_ids_and_seeds(extension):
    vocab = 50258
    limit = (2**63 - vocab) // vocab  # the largest row id with int64 element ids
    logits = random_logits(5, vocab, torch.float32, seed=4)
    # Element ids around the 2^32 and 2^33 counter-word boundaries, and at the very top of int64.
    row_ids = torch.tensor([2**32 // vocab, 2**33 // vocab, 2**33 // vocab + 1, limit - 1, limit])
    for seed in (SEED_MAX, SEED_MAX - 1, 2**32 - 1, 2**32, 0):
        assert_cpp_matches_reference(logits, seed, 2**32 - 1, row_ids, 1.3)
    assert torch.equal(gumbel_argmax(logits, SEED_MAX, 3, row_ids, backend="cpp"),
                       gumbel_argmax(logits, SEED_MAX, 3, row_ids, backend="reference"))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 9),
    vocab=st.integers(1, 600),
    temperature=st.sampled_from([0.0, 0.3, 1.0, 4.0]),
    dtype=st.sampled_from(DTYPES),
    data=st.data(),
)
def test_random_arguments(rows, vocab, temperature, dtype, data):
    if _extension._C is None or not hasattr(_extension._C, "gumbel_argmax_cpu"):
        pytest.skip(f"hdlm_kernels._C is not available: {_extension.missing_reason}")
    seed = data.draw(st.integers(0, SEED_MAX))
    step = data.draw(st.integers(0, 2**40))
    ids = data.draw(st.lists(st.integers(0, 10**13), min_size=rows, max_size=rows, unique=True))
    row_ids = torch.tensor(ids, dtype=torch.int64)
    exclude = data.draw(st.lists(st.integers(0, vocab - 1), max_size=min(vocab - 1, 5)))
    scale = data.draw(st.sampled_from([0.1, 3.0]))
    logits = random_logits(rows, vocab, dtype, seed=rows * 1000 + vocab, scale=scale)
    assert_cpp_matches_reference(logits, seed, step, row_ids, temperature, exclude or None)


# ---------------------------------------------------------------- ties, infinities, NaN, extremes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_greedy_ties_go_to_the_lowest_index(extension, dtype):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [-2.0] * 4, [0.5, -1.0, 7.0, 7.0]], dtype=dtype)
    assert gumbel_argmax(logits, 0, 0, temperature=0, backend="cpp").tolist() == [1, 0, 2]
    assert gumbel_argmax(logits, 0, 0, temperature=0, exclude=[1, 2], backend="cpp").tolist() == [0, 0, 3]
    logits = random_logits(64, 600, dtype, scale=0.5)  # bf16/fp16 round many values to ties
    assert_cpp_matches_reference(logits, 0, 0, temperature=0.0)


def test_exact_score_ties_go_to_the_lowest_index(extension):
    """l_a + g_a == l_b + g_b when l_a = g_b and l_b = g_a: the lower of a, b wins, also when a and b sit
    in different tiles of the C++ kernel (0 and 300) or share a Philox pair (17, 18)."""
    seed, step, vocab = 11, 4, 400
    for row_id, (a, b) in enumerate([(3, 40), (0, 399), (17, 18), (0, 300), (255, 256)]):
        u = uniform53_ref(seed, step, 0, row_id * vocab + torch.arange(vocab))
        g = gumbel_noise(u)
        logits = torch.full((1, vocab), -torch.inf, dtype=torch.float64)
        logits[0, a], logits[0, b] = g[b], g[a]
        assert (logits[0, a] + g[a]) == (logits[0, b] + g[b])
        tokens, _ = assert_cpp_matches_reference(logits, seed, step, torch.tensor([row_id]))
        assert tokens.tolist() == [a]


def test_infinite_logits(extension):
    logits = torch.tensor([[0.0, torch.inf, 5.0, torch.inf], [-torch.inf, -torch.inf, 0.0, -torch.inf]])
    assert gumbel_argmax(logits, 3, 3, backend="cpp").tolist() == [1, 2]  # +inf wins, first of equals
    assert gumbel_argmax(logits, 3, 3, exclude=1, backend="cpp").tolist() == [3, 2]
    for temperature in (1.0, 0.5, 0.0):
        assert_cpp_matches_reference(logits, 3, 3, temperature=temperature)


def test_rows_at_minus_infinity_but_one_token(extension):
    vocab = 777
    logits = torch.full((6, vocab), -torch.inf)
    for r, column in enumerate([0, 1, 255, 256, 511, vocab - 1]):
        logits[r, column] = -50.0 + r
    for temperature in (1.0, 0.3, 0.0):
        tokens, _ = assert_cpp_matches_reference(logits, 8, 1, torch.arange(6) * 3 + 1, temperature)
        assert tokens.tolist() == [0, 1, 255, 256, 511, vocab - 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits(extension, dtype):
    """±1e4 logits (fp16's range ends at 65504): the noise barely moves the scores, so the argmax hinges
    on the last bits of large sums."""
    g = torch.Generator().manual_seed(9)
    signs = torch.randint(0, 2, (16, 300), generator=g) * 2 - 1
    logits = (signs * 1e4 + torch.randn(16, 300, generator=g, dtype=torch.float64) * 4).to(dtype)
    logits[:, 7] = 1e4  # ties in the low-precision dtypes
    logits[:, 200] = 1e4
    for temperature in (1.0, 0.55, 2.3, 0.0):
        assert_cpp_matches_reference(logits, 1, 2, torch.arange(16) + 40, temperature, exclude=[3])


def test_nan_rows_report_the_first_nan_column_and_raise_like_the_reference(extension):
    logits = random_logits(4, 600, torch.float32, seed=5)
    logits[0, [310, 9, 500]] = float("nan")  # the first NaN column is 9 (in the first tile)
    logits[1, 5] = float("nan")  # excluded below: no longer a candidate, so not an error
    logits[2] = -torch.inf
    logits[3, 450] = float("nan")
    for temperature in (1.0, 0.4, 0.0):
        tokens, best = assert_cpp_matches_reference(logits, 2, 2, None, temperature, exclude=[5])
        assert tokens[[0, 2, 3]].tolist() == [9, 0, 450]
        assert best[0].isnan() and best[3].isnan() and best[2] == -torch.inf and not best[1].isnan()
    for backend in ("cpp", "reference"):
        with pytest.raises(ValueError, match="must not hold NaN; row 0 does \\(2 bad row"):
            gumbel_argmax(logits[[0, 1, 3]], 2, 2, exclude=5, backend=backend)
        with pytest.raises(ValueError, match="row 1 has none"):
            gumbel_argmax(logits[1:3], 2, 2, exclude=5, backend=backend)
        with pytest.raises(ValueError, match="row 1 has none"):
            gumbel_argmax(torch.tensor([[0.0, 1.0], [0.0, -torch.inf]]), 2, 2, exclude=0, backend=backend)


# ---------------------------------------------------------------- layouts, gathers, callers


def test_non_contiguous_logits(extension):
    base = random_logits(30, 620, torch.float32, seed=6)
    row_ids = torch.arange(10) * 3 + 5
    views = {
        "row stride 1860, column slice": base[::3, 10:610],
        "column stride 30": base.t().contiguous().t()[5:15, :600],
        "column stride 2": base[10:20, ::2],
        "row stride 0": base[0:1, :600].expand(10, 600),
        "bf16 transposed": base.to(torch.bfloat16).t().contiguous().t()[0:10],
    }
    for name, view in views.items():
        assert not view.is_contiguous(), name
        for temperature in (0.8, 0.0):
            assert_cpp_matches_reference(view, 4, 5, row_ids, temperature, exclude=[2])
            got = gumbel_argmax(view, 4, 5, row_ids, temperature, exclude=[2], backend="cpp")
            assert torch.equal(got, gumbel_argmax(view.contiguous(), 4, 5, row_ids, temperature, exclude=[2],
                                                  backend="reference")), name


def test_gathered_rows(extension):
    logits = random_logits(12, 90, torch.bfloat16, seed=8)
    take = torch.tensor([11, 0, 5, 5, 7, 2])
    row_ids = torch.tensor([3, 1, 4, 10, 5, 9]) * 1000
    for temperature in (1.0, 0.0):
        assert_cpp_matches_reference(logits, 6, 2, row_ids, temperature, exclude=4, take=take)


def test_acs_step_and_hybrid_step_with_the_cpp_backend(extension):
    import hdlm_kernels as hk

    vocab, mask_id = 60, 59
    x = torch.full((40,), mask_id)
    x[::3] = 7
    logits = random_logits(40, vocab, torch.float16, seed=10)
    kwargs = dict(p_transfer=0.3, eta=0.2, mask_id=mask_id, seed=13, step=2, row_ids=torch.arange(40) + 500)
    expected = acs_step(x, logits, backend="reference", **kwargs)
    assert torch.equal(acs_step(x, logits, backend="cpp", **kwargs), expected)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 8, (50,), generator=g)
    log_score = torch.randn(50, 8, generator=g, dtype=torch.float64)
    now, nxt = torch.full((50,), 0.9, dtype=torch.float64), torch.full((50,), 0.4, dtype=torch.float64)
    args = (x, log_score, now, nxt, 0.1, 7, 77, 3)
    expected = hk.sampling.hybrid_step(*args, backend="reference")
    assert torch.equal(hk.sampling.hybrid_step(*args, backend="cpp"), expected)


def test_result_does_not_depend_on_the_thread_count(extension):
    logits = random_logits(40, 2000, torch.float32, seed=11)  # above the parallel threshold
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = draw("cpp", logits, 7, 7, temperature=0.9)
        torch.set_num_threads(max(2, threads))
        multi = draw("cpp", logits, 7, 7, temperature=0.9)
    finally:
        torch.set_num_threads(threads)
    assert_same_draw(multi, single)
    assert_same_draw(multi, draw("reference", logits, 7, 7, temperature=0.9))


def test_empty_input_and_float64_logits_are_not_modified(extension):
    assert gumbel_argmax(torch.zeros(0, 10), 1, 1, backend="cpp").shape == (0,)
    logits = random_logits(3, 20, torch.float64)
    before = logits.clone()
    gumbel_argmax(logits, 1, 1, temperature=0.5, exclude=[3], backend="cpp")
    assert torch.equal(logits, before)


# ---------------------------------------------------------------- argument checks of the operator


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(logits=torch.zeros(3, 4, dtype=torch.int32)),
         "logits must have dtype float32, float64, float16 or bfloat16, got Int"),
        (dict(logits=torch.zeros(12)), r"logits must have shape \[K, V\], got shape \[12\]"),
        (dict(logits=torch.zeros(3, 0)), "logits must have 1 <= V < 2\\^31 tokens, got V = 0"),
        (dict(row_ids=torch.arange(3, dtype=torch.int32)), r"row_ids must be an int64 tensor \[n\], got Int"),
        (dict(row_ids=torch.arange(4)),
         r"row_ids must have shape \[K\] = \[3\] when take is None, got shape \[4\]"),
        (dict(row_ids=torch.tensor([0, -1, 2])),
         r"row_ids must be in \[0, 2305843009213693951\] for V = 4 .*got -1 at position 1"),
        (dict(row_ids=torch.tensor([0, 2**62, 2])), "row_ids must be in .*got 4611686018427387904"),
        (dict(take=torch.tensor([0, 3, 1])),
         r"take must hold logits rows in \[0, K\) = \[0, 3\), got 3 at position 1"),
        (dict(take=torch.tensor([0, 1])),
         "take and row_ids must have one entry per sampled row, got 2 and 3"),
        (dict(take=torch.tensor([0.0, 1.0, 2.0])), "take must be None or an int64 tensor"),
        (dict(exclude=torch.tensor([4])), r"exclude must hold token ids in \[0, V\) = \[0, 4\), got 4"),
        (dict(exclude=torch.tensor([[1]])), "exclude must be None or an int64 tensor \\[m\\]"),
        (dict(step=-1), "step must be >= 0, got -1"),
        (dict(temperature=-0.5), "temperature must be a finite float >= 0, got -0.5"),
        (dict(temperature=float("inf")), "temperature must be a finite float >= 0, got inf"),
        (dict(logits=torch.zeros(3, 4, device="meta")), "logits must be on CPU, got a tensor on meta"),
    ],
)
def test_operator_errors_name_the_argument(extension, change, match):
    arguments = dict(logits=torch.zeros(3, 4), take=None, row_ids=torch.arange(3), seed=1, step=1,
                     temperature=1.0, exclude=None)
    arguments.update(change)
    with pytest.raises(RuntimeError, match="gumbel_argmax: " + match):
        extension.gumbel_argmax_cpu(**arguments)


# ---------------------------------------------------------------- availability


def test_cpp_and_cuda_are_registered_backends():
    assert gumbel_module._IMPLEMENTATIONS["cpp"] is gumbel_module._gumbel_argmax_cpp
    assert gumbel_module._IMPLEMENTATIONS["cuda"] is gumbel_module._gumbel_argmax_cuda


def test_wrong_devices_raise_a_clear_error():
    with pytest.raises(RuntimeError, match="backend='cpp' runs on CPU tensors; got logits on meta"):
        gumbel_argmax(torch.zeros(2, 5, device="meta"), 1, 1, backend="cpp")
    with pytest.raises(RuntimeError, match="backend='cuda' runs on CUDA tensors; got logits on cpu"):
        gumbel_argmax(torch.zeros(2, 5), 1, 1, backend="cuda")


def test_a_missing_extension_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "missing_reason", "the build of hdlm_kernels._C was skipped: testing")
    match = r"with backend='cpp' needs hdlm_kernels._C.*skipped: testing.*Use backend='reference'"
    with pytest.raises(RuntimeError, match=match):
        gumbel_argmax(torch.zeros(2, 5), 1, 1, backend="cpp")


def test_a_missing_cuda_extension_raises_instead_of_falling_back(monkeypatch):
    # As if the tensors were on a GPU (a "cuda" backend that accepts CPU tensors), with a _C built without CUDA.
    as_if_on_gpu = gumbel_module._compiled_backend("cuda", "cpu", "gumbel_argmax_cuda", "test")
    monkeypatch.setitem(gumbel_module._IMPLEMENTATIONS, "cuda", as_if_on_gpu)
    monkeypatch.setattr(_extension, "cuda_missing_reason", lambda: "_C was built without CUDA (test)")
    match = r"backend='cuda' needs hdlm_kernels._C built with CUDA.*without CUDA \(test\)"
    with pytest.raises(RuntimeError, match=match):
        gumbel_argmax(torch.zeros(2, 5), 1, 1, backend="cuda")


def test_a_stale_extension_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(_extension, "_C", types.ModuleType("hdlm_kernels._C"))
    monkeypatch.setattr(_extension, "missing_reason", "")
    match = r"hdlm_kernels._C has no gumbel_argmax_cpu \(it was built from older sources\); reinstall"
    with pytest.raises(RuntimeError, match=match):
        gumbel_argmax(torch.zeros(2, 5), 1, 1, backend="cpp")


def test_triton_interpreter_agrees_with_cpp(extension):
    """On the CPU the Triton kernel runs in the interpreter (tests/conftest.py): a small cross-check of the
    two fused kernels (the GPU tests below compare them at scale)."""
    pytest.importorskip("triton")
    from hdlm_kernels.sampling import triton_sampling

    if not triton_sampling.interpreted():
        pytest.skip("the Triton kernels were built for the GPU")
    logits = random_logits(5, 301, torch.float16, seed=12)
    row_ids = torch.tensor([0, 1, 2**32 + 7, 999, 10**12])
    for temperature in (1.0, 0.55, 0.0):
        assert_same_draw(draw("cpp", logits, SEED_MAX, 9, row_ids, temperature, [0, 300]),
                         draw("triton", logits, SEED_MAX, 9, row_ids, temperature, [0, 300]))


# ---------------------------------------------------------------- GPU


def require_cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if _extension.cuda_missing_reason():
        pytest.skip(_extension.cuda_missing_reason())
    if not hasattr(_extension._C, "gumbel_argmax_cuda"):
        pytest.skip("hdlm_kernels._C was built from older sources (no gumbel_argmax_cuda); reinstall")


def triton_on_gpu():
    try:
        from hdlm_kernels.sampling import triton_sampling
    except ImportError:
        return False
    return not triton_sampling.interpreted()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("exclude", list(EXCLUDES.values()), ids=list(EXCLUDES))
def test_cuda_matches_reference_bit_exactly(dtype, temperature, exclude):
    require_cuda_backend()
    rows, vocab = 23, 300
    logits = random_logits(rows, vocab, dtype, seed=rows)
    row_ids = torch.randint(0, 10**12, (rows,), generator=torch.Generator().manual_seed(1))
    expected = draw("reference", logits, 99, 7, row_ids, temperature, exclude)  # on the CPU
    assert_same_draw(draw("cuda", logits.cuda(), 99, 7, row_ids, temperature, exclude), expected)
    assert_same_draw(draw("reference", logits.cuda(), 99, 7, row_ids, temperature, exclude), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_paper_sized_batch_equals_reference_cpp_and_triton(dtype):
    require_cuda_backend()
    rows, vocab = 512, 50258
    logits = random_logits(rows, vocab, dtype, seed=1).cuda()
    row_ids = (torch.arange(rows) * 17 + 3).cuda()
    for temperature, exclude in ((1.0, 50257), (0.55, [0, 50257]), (0.0, None)):
        ours = draw("cuda", logits, SEED_MAX, 2**32 + 9, row_ids, temperature, exclude)
        assert_same_draw(ours, draw("reference", logits, SEED_MAX, 2**32 + 9, row_ids, temperature, exclude))
        if triton_on_gpu():
            assert_same_draw(ours, draw("triton", logits, SEED_MAX, 2**32 + 9, row_ids, temperature, exclude))
        some = slice(0, 16)  # across devices: the C++ backend on the CPU
        cpu = draw("cpp", logits[some].cpu(), SEED_MAX, 2**32 + 9, row_ids[some].cpu(), temperature, exclude)
        assert_same_draw((ours[0][some], ours[1][some]), cpu)


@pytest.mark.cuda
def test_cuda_edge_cases_match_the_reference():
    require_cuda_backend()
    cases = []
    for vocab in (1, 2, 3, 255, 256, 257, 511, 512, 513, 1001):  # partial last strides, odd row starts
        logits = random_logits(8, vocab, torch.float32, seed=vocab, scale=0.5)
        cases.append((logits, torch.tensor([0, 1, 2, 3, 7, 2**31 - 1, 2**32 + 1, 10**12 + 3]), None))
    nan = random_logits(4, 600, torch.float32, seed=5)
    nan[0, [310, 9, 500]] = float("nan")
    nan[1, 5] = float("nan")
    nan[2] = -torch.inf
    nan[3, 599] = float("nan")
    cases.append((nan, torch.arange(4), [5]))
    big = (torch.randint(0, 2, (16, 300)) * 2e4 - 1e4).to(torch.float16)
    cases.append((big, torch.arange(16) + 40, [3]))
    ties = torch.zeros(4, 700, dtype=torch.bfloat16)
    cases.append((ties, torch.arange(4), None))
    for logits, row_ids, exclude in cases:
        for temperature in (1.0, 0.4, 0.0):
            expected = draw("reference", logits, 2, 2, row_ids, temperature, exclude)
            assert_same_draw(draw("cuda", logits.cuda(), 2, 2, row_ids, temperature, exclude), expected)
    # Exact score ties across threads, warps and strides: the lower column wins.
    seed, step, vocab = 11, 4, 5000
    for row_id, (a, b) in enumerate([(3, 40), (0, 4999), (17, 18), (1, 513), (600, 4000)]):
        g = gumbel_noise(uniform53_ref(seed, step, 0, row_id * vocab + torch.arange(vocab)))
        logits = torch.full((1, vocab), -torch.inf, dtype=torch.float64)
        logits[0, a], logits[0, b] = g[b], g[a]
        tokens, _ = draw("cuda", logits.cuda(), seed, step, torch.tensor([row_id]))
        assert tokens.cpu().tolist() == [a]


@pytest.mark.cuda
def test_cuda_layouts_gathers_and_callers():
    require_cuda_backend()
    base = random_logits(30, 620, torch.float32, seed=6)
    row_ids = torch.arange(10) * 3 + 5
    for view in (base[::3, 10:610], base.t().contiguous().t()[5:15, :600], base[10:20, ::2],
                 base[0:1, :600].expand(10, 600)):
        expected = draw("reference", view, 4, 5, row_ids, 0.8, [2])
        assert_same_draw(draw("cuda", view.cuda(), 4, 5, row_ids, 0.8, [2]), expected)
    logits = random_logits(12, 90, torch.bfloat16, seed=8)
    take = torch.tensor([11, 0, 5, 5, 7, 2])
    take_ids = torch.tensor([3, 1, 4, 10, 5, 9]) * 1000
    assert_same_draw(draw("cuda", logits.cuda(), 6, 2, take_ids, 1.0, 4, take),
                     draw("reference", logits, 6, 2, take_ids, 1.0, 4, take))
    vocab, mask_id = 60, 59
    x = torch.full((40,), mask_id)
    x[::3] = 7
    logits = random_logits(40, vocab, torch.float16, seed=10)
    kwargs = dict(p_transfer=0.3, eta=0.2, mask_id=mask_id, seed=13, step=2, row_ids=torch.arange(40) + 500)
    expected = acs_step(x, logits, backend="reference", **kwargs)
    kwargs["row_ids"] = kwargs["row_ids"].cuda()
    assert torch.equal(acs_step(x.cuda(), logits.cuda(), backend="cuda", **kwargs).cpu(), expected)
    with pytest.raises(ValueError, match="must not hold NaN; row 0 does"):
        gumbel_argmax(torch.tensor([[0.0, float("nan")]], device="cuda"), 1, 1, temperature=0, backend="cuda")
    assert gumbel_argmax(torch.zeros(0, 10, device="cuda"), 1, 1, backend="cuda").shape == (0,)


@pytest.mark.cuda
def test_cuda_operator_checks_devices():
    require_cuda_backend()
    C = _extension._C
    logits = torch.zeros(3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="gumbel_argmax: row_ids must be on logits' device"):
        C.gumbel_argmax_cuda(logits, None, torch.arange(3), 1, 1, 1.0, None)
    with pytest.raises(RuntimeError, match="gumbel_argmax: logits must be on CUDA, got a tensor on cpu"):
        C.gumbel_argmax_cuda(logits.cpu(), None, torch.arange(3), 1, 1, 1.0, None)



# ---------------------------------------------------------------- the harness samples through the kernels


@pytest.mark.parametrize("method,family", [("acs", "epsilon"), ("analytic", "gamma")])
def test_generation_with_the_fused_kernels_equals_the_reference(extension, method, family):
    from hdlm_reference.generate import generate
    from hdlm_reference.model import DiT, ModelConfig
    import hdlm_kernels as hk

    assert hk.sampling.fused_backend("cpu") == "cpp"
    torch.manual_seed(0)
    model = DiT(ModelConfig.preset("tiny", family=family, dropout=0.0)).eval()
    sched = hk.schedules.block(24, 8, 3)
    runs = {backend: generate(model, sched, 3, 5, method=method, kv_cache=True, sampler_backend=backend)
            for backend in ("reference", "kernels")}
    assert torch.equal(runs["kernels"].tokens, runs["reference"].tokens)
    assert runs["kernels"].model_calls == runs["reference"].model_calls


def test_kernels_backend_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    with pytest.raises(RuntimeError, match="no fused sampling kernel for cpu tensors"):
        gumbel_argmax(torch.zeros(2, 5), 1, 0, backend="kernels")
    # "auto" falls back to the reference instead, which draws the same tokens.
    assert torch.equal(gumbel_argmax(torch.zeros(2, 5), 1, 0), gumbel_argmax_ref(torch.zeros(2, 5), 1, 0))
