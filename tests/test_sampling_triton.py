"""The Triton sampling kernels (hdlm_kernels/sampling/triton_sampling.py, DESIGN.md §6) bit for bit
against the references: Philox4x32-10 known answers, uniform53 against the NumPy twin, log64 against
the torch recipe, and gumbel_argmax(backend="triton") against backend="reference" (tokens and the
winning float64 scores), with its tie, NaN, exclusion, stride and row-gather rules.

Without a GPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), at
about 10 ms per program, so the shapes here stay small; tests marked ``cuda`` cover paper-sized ones."""

import sys

import numpy as np
import pytest
import torch
from sampling_checks import compiled_ptx_ops

pytest.importorskip("triton")

import hdlm_kernels.sampling  # noqa: E402

from hdlm_kernels.sampling import acs_step, gumbel_argmax, uniform53, uniform53_ref  # noqa: E402
from hdlm_kernels.sampling import gumbel as gumbel_module  # noqa: E402
from hdlm_kernels.sampling import triton_sampling  # noqa: E402
from hdlm_kernels.sampling.gumbel import _checked_exclude, _gumbel_argmax_reference  # noqa: E402
from hdlm_kernels.sampling.log64 import gumbel_noise, log64  # noqa: E402
from hdlm_kernels.sampling.philox import philox4x32_10_ref  # noqa: E402

if not torch.cuda.is_available() and not triton_sampling.interpreted():
    pytest.skip("no CUDA GPU and the Triton kernels were not built for the interpreter "
                "(set TRITON_INTERPRET=1 before importing hdlm_kernels)", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not triton_sampling.interpreted() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
TEMPERATURES = [1.0, 0.55, 2.3, 0.0]
EXCLUDES = {"none": None, "int": 5, "list": [0, 17, 299]}

KNOWN_ANSWERS = [  # Random123's known-answer vectors for philox4x32_10: (counter, key, expected)
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def random_logits(rows, vocab, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)


def both_backends(logits, seed, step, row_ids=None, temperature=1.0, exclude=None, take=None):
    """(tokens, best) of the triton and the reference implementations, on the CPU, for the same
    already-checked arguments (logits on DEVICE for triton, on the CPU for the reference)."""
    rows = logits.shape[0] if take is None else take.shape[0]
    if row_ids is None:
        row_ids = torch.arange(rows)
    vocab = logits.shape[1]
    ours = triton_sampling.gumbel_argmax_triton(
        logits.to(DEVICE), None if take is None else take.to(DEVICE), row_ids.to(DEVICE), seed, step,
        float(temperature), _checked_exclude(exclude, vocab, DEVICE), None)
    expected = _gumbel_argmax_reference(
        logits.cpu(), None if take is None else take.cpu(), row_ids.cpu(), seed, step, float(temperature),
        _checked_exclude(exclude, vocab, torch.device("cpu")), 64)
    return tuple(t.cpu() for t in ours), expected


def assert_same_draw(ours, expected):
    (tokens, best), (tokens_ref, best_ref) = ours, expected
    assert tokens.dtype == torch.int64 and best.dtype == torch.float64
    assert torch.equal(tokens, tokens_ref)
    # The winning scores bit for bit (NaN where the reference has NaN).
    assert torch.equal(best.view(torch.int64), best_ref.view(torch.int64)) or (
        torch.equal(best.isnan(), best_ref.isnan())
        and torch.equal(best[~best.isnan()], best_ref[~best_ref.isnan()])
    )


@pytest.fixture
def small_blocks(monkeypatch):
    """8 Philox blocks (16 columns) per loop iteration: several iterations even for small V."""
    monkeypatch.setattr(triton_sampling, "_INTERPRETER_BLOCK_PAIRS", 8)
    monkeypatch.setattr(triton_sampling, "_GPU_BLOCK_PAIRS", 8)


# ---------------------------------------------------------------- Philox and uniform53


def test_philox_matches_random123_known_answers():
    counter = torch.tensor([c for c, _, _ in KNOWN_ANSWERS], device=DEVICE)
    key = torch.tensor([k for _, k, _ in KNOWN_ANSWERS], device=DEVICE)
    words = triton_sampling.philox4x32_10_triton(counter, key).cpu().tolist()
    assert [tuple(w) for w in words] == [expected for _, _, expected in KNOWN_ANSWERS]


def test_philox_matches_the_numpy_twin_on_random_blocks():
    rng = np.random.default_rng(0)
    counter = rng.integers(0, 2**32, size=(500, 4), dtype=np.uint64)
    key = rng.integers(0, 2**32, size=(500, 2), dtype=np.uint64)
    counter[:5] = 0xFFFFFFFF  # extreme words
    key[5:10] = 0
    got = triton_sampling.philox4x32_10_triton(torch.from_numpy(counter.astype(np.int64)).to(DEVICE),
                                               torch.from_numpy(key.astype(np.int64)).to(DEVICE))
    expected = philox4x32_10_ref(counter, key).astype(np.uint64)
    assert np.array_equal(got.cpu().numpy().astype(np.uint64), expected)


def random_element_ids(count, seed=0):
    """Element ids of every magnitude: small, around 2^32 and 2^33 (the counter's word boundary), huge."""
    g = torch.Generator().manual_seed(seed)
    edges = torch.tensor([0, 1, 2, 3, 2**32 - 2, 2**32 - 1, 2**32, 2**32 + 1, 2**33 - 1, 2**33, 2**33 + 1,
                          2**62, 2**63 - 2, 2**63 - 1])
    parts = [edges, torch.randint(0, 2**20, (count,), generator=g),
             torch.randint(0, 2**62, (count,), generator=g) * 2 + torch.randint(0, 2, (count,), generator=g)]
    return torch.cat(parts)


@pytest.mark.parametrize(
    "seed, step, stream",
    [(0, 0, 0), (1, 1, 1), (2**32 - 1, 2**32 - 1, 2), (2**32, 5, 0), (2**64 - 1, 2**32 + 7, 2**32 - 1),
     (0x0123456789ABCDEF, 2**40 + 3, 12345)],
)
def test_uniform53_triton_equals_the_numpy_twin_bit_for_bit(seed, step, stream):
    index = random_element_ids(300, seed=stream)
    got = uniform53(seed, step, stream, index.to(DEVICE), backend="triton")
    assert got.dtype == torch.float64 and got.device.type == DEVICE.type
    assert torch.equal(got.cpu(), uniform53_ref(seed, step, stream, index))


def test_uniform53_triton_keeps_the_index_shape():
    index = torch.arange(24).view(2, 3, 4) * 1000003
    got = uniform53(7, 3, 1, index.to(DEVICE), backend="triton")
    assert got.shape == (2, 3, 4)
    assert torch.equal(got.cpu(), uniform53_ref(7, 3, 1, index))
    # Non-contiguous, int32 and empty indices.
    for other in (index.transpose(0, 2), torch.arange(10, dtype=torch.int32)):
        got = uniform53(7, 3, 1, other.to(DEVICE), backend="triton")
        assert torch.equal(got.cpu(), uniform53_ref(7, 3, 1, other))
    empty = torch.zeros(0, 5, dtype=torch.int64, device=DEVICE)
    assert uniform53(7, 3, 1, empty, backend="triton").shape == (0, 5)


# ---------------------------------------------------------------- log64


def sampler_range_inputs():
    """The inputs log64 sees in the sampler: uniforms u in [2^-53, 1 - 2^-53], and -log u in
    [1.1e-16, 36.8]; plus both sides of the √2 mantissa boundary at many exponents."""
    u = uniform53_ref(3, 4, 0, torch.arange(20000))
    ends = torch.tensor([2.0**-53, 1 - 2.0**-53, 0.5, 1 - 2.0**-52, 2.0**-52 * 3, 0.25, 0.75])
    sqrt2_bits = 0x3FF6A09E667F3BCD
    boundary = torch.tensor([sqrt2_bits - 1, sqrt2_bits, sqrt2_bits + 1]).view(torch.float64)
    scales = torch.tensor([2.0**k for k in range(-54, 7)], dtype=torch.float64)
    boundary = boundary[None, :] * scales[:, None]
    minus_log_u = torch.logspace(-16, np.log10(36.8), 3000, dtype=torch.float64)
    return torch.cat([u, ends, boundary.reshape(-1), minus_log_u, -log64(u)])


def test_log64_triton_equals_the_torch_recipe_bit_for_bit():
    x = sampler_range_inputs()
    got = triton_sampling.log64_triton(x.to(DEVICE)).cpu()
    assert torch.equal(got.view(torch.int64), log64(x).view(torch.int64))


def test_gumbel_noise_triton_equals_the_torch_recipe_bit_for_bit():
    u = torch.cat([uniform53_ref(11, 0, 0, torch.arange(20000)),
                   torch.tensor([2.0**-53, 1 - 2.0**-53], dtype=torch.float64)])
    got = triton_sampling.gumbel_noise_triton(u.to(DEVICE)).cpu()
    assert torch.equal(got.view(torch.int64), gumbel_noise(u).view(torch.int64))


# ---------------------------------------------------------------- gumbel_argmax against the reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("exclude", EXCLUDES.values(), ids=EXCLUDES.keys())
def test_gumbel_argmax_triton_equals_reference(dtype, temperature, exclude):
    rows, vocab = 8, 300
    logits = random_logits(rows, vocab, dtype, seed=rows)
    row_ids = torch.randint(0, 10**12, (rows,), generator=torch.Generator().manual_seed(1))
    expected = gumbel_argmax(logits, 99, 7, row_ids, temperature, exclude, backend="reference")
    got = gumbel_argmax(logits.to(DEVICE), 99, 7, row_ids.to(DEVICE), temperature, exclude, backend="triton")
    assert got.dtype == torch.int64 and got.shape == (rows,) and got.device.type == DEVICE.type
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("temperature", [1.0, 0.55, 0.0])
def test_scores_and_tokens_over_several_blocks(small_blocks, temperature):
    # V not a multiple of the 16 columns per iteration; odd and even row_id * V (the pair parity).
    for vocab in (1, 2, 17, 61):
        logits = random_logits(4, vocab, torch.float32, seed=vocab)
        row_ids = torch.tensor([0, 1, 10**9 + 7, 2**40 + 1])
        exclude = None if vocab < 3 else [0, vocab - 1]
        assert_same_draw(*both_backends(logits, 5, 6, row_ids, temperature, exclude))


def test_paper_sized_vocabulary():
    logits = random_logits(1, 50258, torch.bfloat16, seed=3)
    assert_same_draw(*both_backends(logits, 2**64 - 1, 2**32 + 5, torch.tensor([123456789]), 1.0,
                                    exclude=50257))


def test_large_row_ids_and_seeds():
    vocab = 97
    limit = (2**63 - vocab) // vocab  # the largest row id with int64 element ids
    row_ids = torch.tensor([limit, limit - 1, 2**62 // vocab, 10**15, 0])
    logits = random_logits(5, vocab, torch.float16, seed=2)
    for seed in (0, 2**32 - 1, 2**64 - 1):
        assert_same_draw(*both_backends(logits, seed, 2**33 + 1, row_ids, 0.7))


def test_extreme_logits():
    g = torch.Generator().manual_seed(4)
    values = torch.tensor([1e4, -1e4, 0.0, 9999.0, -9999.5])
    logits = values[torch.randint(0, 5, (4, 40), generator=g)]
    for dtype, temperature in ((torch.float16, 1.0), (torch.bfloat16, 2.3), (torch.float32, 0.0),
                               (torch.float64, 0.55)):
        assert_same_draw(*both_backends(logits.to(dtype), 1, 2, None, temperature, exclude=[3]))


# ---------------------------------------------------------------- ties, -inf, NaN


def test_greedy_ties_go_to_the_lowest_index(small_blocks):
    # Few distinct values: many ties, within a lane, across the even/odd columns of a Philox block,
    # across lanes and across loop iterations; odd row ids shift the pairs by one column.
    g = torch.Generator().manual_seed(5)
    logits = torch.randint(0, 3, (12, 45), generator=g).to(torch.float32)
    logits[0] = 1.0  # all equal
    row_ids = torch.arange(12) * 7 + 1
    for exclude in (None, 0, [0, 1, 2, 16, 17]):
        ours, expected = both_backends(logits, 3, 3, row_ids, 0.0, exclude)
        assert_same_draw(ours, expected)
        masked = logits.clone()
        masked[:, [] if exclude is None else exclude] = -torch.inf
        assert ours[0].tolist() == [row.index(max(row)) for row in masked.tolist()]


def test_all_equal_rows_with_noise():
    logits = torch.zeros(10, 64, dtype=torch.bfloat16)
    assert_same_draw(*both_backends(logits, 8, 1, torch.arange(10) * 3, 1.0, exclude=7))


def test_exact_score_ties_go_to_the_lowest_index(small_blocks):
    """l_a + g_a == l_b + g_b exactly when l_a = g_b and l_b = g_a; everything else at -inf."""
    seed, step, vocab = 11, 4, 64
    for row_id, (a, b) in enumerate([(3, 40), (0, 63), (17, 18), (16, 17), (2, 18), (5, 21)]):
        u = uniform53_ref(seed, step, 0, row_id * vocab + torch.arange(vocab))
        noise = gumbel_noise(u)
        logits = torch.full((1, vocab), -torch.inf, dtype=torch.float64)
        logits[0, a], logits[0, b] = noise[b], noise[a]
        assert (logits[0, a] + noise[a]) == (logits[0, b] + noise[b])
        ours, expected = both_backends(logits, seed, step, torch.tensor([row_id]))
        assert_same_draw(ours, expected)
        assert ours[0].tolist() == [a]


def test_rows_with_a_single_finite_logit(small_blocks):
    vocab = 50
    logits = torch.full((5, vocab), -torch.inf)
    for r, v in enumerate([0, 49, 16, 17, 31]):
        logits[r, v] = 3.0 - r
    for temperature in (1.0, 0.3, 0.0):
        ours, expected = both_backends(logits, 1, 1, torch.arange(5) + 1001, temperature)
        assert_same_draw(ours, expected)
        assert ours[0].tolist() == [0, 49, 16, 17, 31]
    # +inf wins outright, the first of several.
    logits = torch.tensor([[0.0, torch.inf, 5.0, torch.inf], [-torch.inf, -torch.inf, 0.0, -torch.inf]])
    assert gumbel_argmax(logits.to(DEVICE), 3, 3, backend="triton").tolist() == [1, 2]
    assert gumbel_argmax(logits.to(DEVICE), 3, 3, exclude=1, backend="triton").tolist() == [3, 2]


def test_nan_and_empty_rows_are_reported_like_the_reference(small_blocks):
    logits = random_logits(4, 40, torch.float32, seed=9)
    logits[0, 33] = float("nan")
    logits[0, 35] = float("nan")
    logits[1, 5] = float("nan")  # excluded below: no longer a candidate, so not an error
    logits[2] = -torch.inf
    for temperature in (1.0, 0.0):
        ours, expected = both_backends(logits, 2, 2, None, temperature, exclude=[5])
        assert_same_draw(ours, expected)  # the first NaN column, the -inf row's column 0
        assert ours[1][0].isnan() and ours[1][2] == -torch.inf
    with pytest.raises(ValueError, match="must not hold NaN; row 0 does"):
        gumbel_argmax(logits.to(DEVICE), 2, 2, temperature=0, backend="triton")
    with pytest.raises(ValueError, match="row 1 has none"):  # logits row 2
        gumbel_argmax(logits[1:].to(DEVICE), 2, 2, exclude=5, backend="triton")
    with pytest.raises(ValueError, match="row 1 has none"):
        gumbel_argmax(torch.tensor([[0.0, 1.0], [0.0, -torch.inf]], device=DEVICE), 2, 2, exclude=0,
                      backend="triton")


# ---------------------------------------------------------------- layouts and the row gather


def test_non_contiguous_rows():
    base = random_logits(30, 320, torch.float32, seed=6)
    row_ids = torch.arange(10) * 3 + 5
    for view in (base[::3, 10:310],                      # row stride 960, a column slice
                 base.t().contiguous().t()[5:15, :300],  # column stride 30
                 base[0:1, :300].expand(10, 300)):       # row stride 0
        got = gumbel_argmax(view.to(DEVICE), 4, 5, row_ids.to(DEVICE), 0.8, exclude=[2], backend="triton")
        assert torch.equal(got.cpu(), gumbel_argmax(view.contiguous(), 4, 5, row_ids, 0.8, exclude=[2]))


def test_gathered_rows_match_the_reference():
    logits = random_logits(12, 90, torch.bfloat16, seed=8)
    take = torch.tensor([11, 0, 5, 5, 7, 2])
    row_ids = torch.tensor([3, 1, 4, 1, 5, 9]) * 1000
    for temperature in (1.0, 0.0):
        assert_same_draw(*both_backends(logits, 6, 2, row_ids, temperature, exclude=4, take=take))


def test_acs_step_with_the_triton_backend():
    vocab, mask_id = 60, 59
    x = torch.full((40,), mask_id)
    x[::3] = 7
    logits = random_logits(40, vocab, torch.float16, seed=10)
    kwargs = dict(p_transfer=0.3, eta=0.2, mask_id=mask_id, seed=13, step=2, row_ids=torch.arange(40) + 500)
    expected = acs_step(x, logits, backend="reference", **kwargs)
    kwargs["row_ids"] = kwargs["row_ids"].to(DEVICE)
    got = acs_step(x.to(DEVICE), logits.to(DEVICE), backend="triton", **kwargs)
    assert torch.equal(got.cpu(), expected)


def test_empty_input_and_float64_logits_are_not_modified():
    assert gumbel_argmax(torch.zeros(0, 10, device=DEVICE), 1, 1, backend="triton").shape == (0,)
    logits = random_logits(3, 20, torch.float64).to(DEVICE)
    before = logits.clone()
    gumbel_argmax(logits, 1, 1, temperature=0.5, exclude=[3], backend="triton")
    assert torch.equal(logits, before)


# ---------------------------------------------------------------- backend availability


def test_triton_is_a_registered_backend():
    assert gumbel_module._IMPLEMENTATIONS["triton"] is gumbel_module._gumbel_argmax_triton


def test_unsupported_devices_raise_a_clear_error(monkeypatch):
    logits = torch.zeros(2, 5)
    monkeypatch.setattr(triton_sampling, "interpreted", lambda: False)  # as if built for the GPU
    with pytest.raises(RuntimeError, match="backend='triton' runs on CUDA tensors, or on CPU tensors under "
                                           "the Triton interpreter"):
        gumbel_argmax(logits, 1, 1, backend="triton")
    with pytest.raises(RuntimeError, match="uniform53: backend='triton' runs on CUDA tensors"):
        uniform53(1, 1, 0, torch.arange(4), backend="triton")
    monkeypatch.setattr(triton_sampling, "interpreted", lambda: True)
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        gumbel_argmax(torch.zeros(2, 5, device="meta"), 1, 1, backend="triton")


def test_a_broken_triton_install_raises_instead_of_falling_back(monkeypatch):
    # The next `from . import triton_sampling` raises ImportError.
    monkeypatch.delattr(hdlm_kernels.sampling, "triton_sampling")
    monkeypatch.setitem(sys.modules, "hdlm_kernels.sampling.triton_sampling", None)
    with pytest.raises(RuntimeError, match="gumbel_argmax with backend='triton' needs triton"):
        gumbel_argmax(torch.zeros(2, 5), 1, 1, backend="triton")
    with pytest.raises(RuntimeError, match="uniform53 with backend='triton' needs triton"):
        uniform53(1, 1, 0, torch.arange(4), backend="triton")


# ---------------------------------------------------------------- the GPU code, compiled without a GPU

_PTX_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hdlm_kernels.sampling import triton_sampling as ts

signature = {"LOGITS": "*bf16", "TAKE": "*i64", "ROW_IDS": "*i64", "EXCLUDE": "*i8", "CONSTS": "*fp64",
             "TOKENS": "*i64", "BEST": "*fp64", "stride_row": "i32", "stride_col": "i32", "vocab": "i32",
             "key0": "i64", "key1": "i64", "step_lo": "i64", "temperature_bits": "i64",
             "HAS_TAKE": "constexpr", "HAS_EXCLUDE": "constexpr", "NOISE": "constexpr", "DIVIDE": "constexpr",
             "BLOCK_P": "constexpr"}
constexprs = {"HAS_TAKE": True, "HAS_EXCLUDE": True, "NOISE": True, "DIVIDE": True, "BLOCK_P": 512}
source = ASTSource(fn=ts._gumbel_argmax_kernel, signature=signature, constexprs=constexprs)
kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=ts._launch_options(8))
ptx = kernel.asm["ptx"]
json.dump({"f64": sorted(set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.f64\b", ptx))),
           "literals": sorted(set(re.findall(r"\b0d[0-9A-F]{16}\b", ptx)))}, sys.stdout)
"""


def test_gpu_code_has_no_fma_and_only_exact_float64_literals(tmp_path):
    """Compiles the Gumbel-max kernel for sm_90 with the launch options of the module (no GPU needed: the
    PTX is built by LLVM and ptxas on the CPU) and checks what bit-identity on the GPU rests on: no
    fused multiply-add, IEEE round-to-nearest float64 arithmetic and division, and no float64 constant
    other than the exact 2^-53, ±1, 2 and ±inf (log64's coefficients come from a float64 tensor)."""
    found = compiled_ptx_ops(_PTX_SCRIPT, tmp_path)
    assert not [op for op in found["f64"] if op.startswith("fma") or "approx" in op], found["f64"]
    arithmetic = [op for op in found["f64"] if op.split(".")[0] in ("add", "sub", "mul", "div")]
    assert "div.rn.f64" in arithmetic and all(".rn." in op for op in arithmetic), found["f64"]
    exact = {"0d3CA0000000000000", "0d3FF0000000000000", "0dBFF0000000000000", "0d4000000000000000",
             "0d7FF0000000000000", "0dFFF0000000000000", "0d7FF8000000000000", "0d0000000000000000"}
    assert set(found["literals"]) <= exact, found["literals"]


# ---------------------------------------------------------------- GPU: paper-sized shapes


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_paper_sized_batch_equals_reference(dtype):
    rows, vocab = 512, 50258
    logits = random_logits(rows, vocab, dtype, seed=1).cuda()
    row_ids = (torch.arange(rows) * 17 + 3).cuda()
    for temperature, exclude in ((1.0, 50257), (0.55, [0, 50257]), (0.0, None)):
        got = gumbel_argmax(logits, 2**64 - 1, 2**32 + 9, row_ids, temperature, exclude, backend="triton")
        expected = gumbel_argmax(logits, 2**64 - 1, 2**32 + 9, row_ids, temperature, exclude,
                                 backend="reference")
        assert torch.equal(got, expected)
    # A CPU reference for a few rows (cross-device bit identity).
    some = slice(0, 8)
    expected = gumbel_argmax(logits[some].cpu(), 5, 6, row_ids[some].cpu(), 1.3, backend="reference")
    got = gumbel_argmax(logits[some], 5, 6, row_ids[some], 1.3, backend="triton")
    assert torch.equal(got.cpu(), expected)


@pytest.mark.cuda
def test_cuda_scores_bit_for_bit():
    logits = random_logits(256, 32000, torch.float32, seed=2).cuda()
    row_ids = torch.randint(0, 10**12, (256,), generator=torch.Generator().manual_seed(3)).cuda()
    for temperature in (1.0, 0.7):
        ours = triton_sampling.gumbel_argmax_triton(logits, None, row_ids, 42, 3, temperature, None, None)
        expected = _gumbel_argmax_reference(logits, None, row_ids, 42, 3, temperature, None, 16)
        assert torch.equal(ours[0], expected[0])
        assert torch.equal(ours[1].view(torch.int64), expected[1].view(torch.int64))


@pytest.mark.cuda
def test_cuda_uniform53_and_log64_on_many_elements():
    index = random_element_ids(2_000_000, seed=4)
    got = uniform53(2**64 - 1, 77, 1, index.cuda(), backend="triton").cpu()
    assert torch.equal(got, uniform53_ref(2**64 - 1, 77, 1, index))
    u = uniform53_ref(9, 9, 0, torch.arange(4_000_000))
    assert torch.equal(triton_sampling.gumbel_noise_triton(u.cuda()).cpu().view(torch.int64),
                       gumbel_noise(u).view(torch.int64))
