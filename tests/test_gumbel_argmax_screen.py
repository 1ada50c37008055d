"""Screen, then decide (docs/sampling-screen.md): the screened C++ gumbel_argmax returns the reference's
tokens and winning scores bit for bit on adversarial rows (V = 50258, T near 0 and large, ±1e4 and huge
logits, ±inf, rows all -inf but one, NaN, excluded ids, strided rows, `take`), with either instruction
set of the screening stage; the screened Triton kernel (interpreter, with small tiles so that rows span
several) agrees on the same rows, on near-ties engineered at the bound, and on V = 50258; the
candidate count per row is about 1. The CUDA and GPU Triton screens run where a GPU is."""

import math

import pytest
import torch

import hdlm_kernels as hk
from hdlm_kernels import _extension
from hdlm_kernels.sampling.gumbel import _gumbel_argmax_reference
from hdlm_kernels.sampling.log64 import gumbel_noise
from tests.sampling_checks import assert_same_draw, cpu_isas

pytestmark = pytest.mark.skipif(bool(_extension.missing_reason), reason="needs the compiled extension")

INF = math.inf
VOCAB = 50258
SEED, STEP = 0x9E3779B97F4A7C15, 12


def C():
    return _extension._C




def adversarial_logits(dtype: torch.dtype, rows: int = 12, vocab: int = VOCAB) -> torch.Tensor:
    """Rows that stress the screen: normal × 3, ±1e4, a near-flat row, a row all -inf but one, a row with
    +inf twice (ties to the lower), tiny logits, huge logits near the dtype's range, top-k style -inf
    masks, and equal logits everywhere (the noise decides)."""
    g = torch.Generator().manual_seed(5)
    top = torch.finfo(dtype).max
    x = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    x[1] = torch.randn(vocab, generator=g, dtype=torch.float64) * 1e4
    x[2] = torch.randn(vocab, generator=g, dtype=torch.float64) * 1e-3
    x[3] = -INF
    x[3, vocab // 3] = -7.0
    x[4, [17, min(4000, vocab - 1)]] = INF
    x[5] = torch.randn(vocab, generator=g, dtype=torch.float64) * 1e-30
    x[6] = (torch.rand(vocab, generator=g, dtype=torch.float64) * 2 - 1) * top
    x[7, torch.randperm(vocab, generator=g)[: vocab - 40]] = -INF
    x[8] = 0.25
    x[9, : vocab // 2] = -1e4
    x[10] = torch.where(torch.rand(vocab, generator=g) < 0.5, -1e4, 1e4)
    x[11] = x[0].round()  # many exact logit ties
    return x.clamp(-top, top).where(x.isfinite(), x).to(dtype)


def cpp_draw(logits, take, row_ids, temperature, exclude, isa):
    C().set_cpu_isa(isa)
    try:
        return C().gumbel_argmax_cpu(logits, take, row_ids, SEED, STEP, temperature, exclude)
    finally:
        C().set_cpu_isa("auto")


def reference_draw(logits, take, row_ids, temperature, exclude):
    return _gumbel_argmax_reference(logits, take, row_ids, SEED, STEP, temperature, exclude, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1e-3, 1e-25, 40.0, 1e20, 1e35])
def test_adversarial_rows_match_the_reference(dtype, temperature):
    logits = adversarial_logits(dtype)
    row_ids = torch.arange(logits.shape[0]) * 3 + 1
    expected = reference_draw(logits, None, row_ids, temperature, None)
    for isa in cpu_isas():
        assert_same_draw(cpp_draw(logits, None, row_ids, temperature, None, isa), expected)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_strided_rows_take_and_exclude(temperature):
    base = adversarial_logits(torch.float32, vocab=2 * 999 + 1)[[0, 1, 3, 4, 7, 9]]
    logits = base[:, ::2]  # column stride 2, odd V
    assert not logits.is_contiguous()
    take = torch.tensor([5, 0, 3, 3, 1])
    row_ids = torch.tensor([7, 2**40, 3, 4, 123456789])  # odd and even row_id * V: both pair parities
    exclude = torch.tensor([0, 1, 17, 998])
    expected = reference_draw(logits, take, row_ids, temperature, exclude)
    for isa in cpu_isas():
        assert_same_draw(cpp_draw(logits, take, row_ids, temperature, exclude, isa), expected)
    transposed = base.t().contiguous().t()  # row stride 1, column stride R
    expected = reference_draw(transposed, None, torch.arange(6), temperature, None)
    for isa in cpu_isas():
        assert_same_draw(cpp_draw(transposed, None, torch.arange(6), temperature, None, isa), expected)


def test_nan_and_all_minus_inf_rows_report_as_the_reference():
    logits = torch.randn(4, 300)
    logits[0, [5, 200]] = math.nan
    logits[1] = -INF
    logits[2, :] = -INF
    logits[2, 299] = 1.0
    exclude = torch.tensor([299])  # row 2 then has no token left
    for ex in (None, exclude):
        expected = reference_draw(logits, None, torch.arange(4), 1.0, ex)
        for isa in cpu_isas():
            assert_same_draw(cpp_draw(logits, None, torch.arange(4), 1.0, ex, isa), expected)


def test_small_vocabularies_and_partial_tiles():
    g = torch.Generator().manual_seed(9)
    for vocab in (1, 2, 3, 255, 256, 257, 511, 513):
        logits = torch.randn(5, vocab, generator=g)
        row_ids = torch.tensor([0, 1, 2, 3, 1001])
        expected = reference_draw(logits, None, row_ids, 0.9, None)
        for isa in cpu_isas():
            assert_same_draw(cpp_draw(logits, None, row_ids, 0.9, None, isa), expected)


def test_candidates_per_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, VOCAB, generator=g) * 3
    counts = hk.sampling.gumbel_candidates(logits, SEED, STEP)
    assert counts.dtype == torch.int64 and counts.shape == (64,)
    assert 1 <= counts.float().mean().item() <= 1.1 and counts.max().item() <= 3
    # float64 logits and temperature 0 take the exact path on every token.
    assert hk.sampling.gumbel_candidates(logits[:2].double(), SEED, STEP).tolist() == [VOCAB, VOCAB]
    assert hk.sampling.gumbel_candidates(logits[:2], SEED, STEP, temperature=0.0).tolist() == [VOCAB, VOCAB]
    # Excluded tokens and -inf logits are never candidates of a row with a finite token.
    masked = logits[:4].clone()
    masked[:, 100:] = -INF
    assert hk.sampling.gumbel_candidates(masked, SEED, STEP, exclude=[0, 1]).max().item() <= 3


def test_gumbel_argmax_cpp_matches_reference_through_the_op():
    logits = adversarial_logits(torch.bfloat16, rows=12, vocab=4099)[[0, 1, 2, 5, 6, 8, 9, 10, 11]]
    for temperature in (1.0, 0.3):
        ours = hk.sampling.gumbel_argmax(logits, SEED, STEP, temperature=temperature, backend="cpp")
        assert torch.equal(ours, hk.sampling.gumbel_argmax(logits, SEED, STEP, temperature=temperature,
                                                           backend="reference"))


def triton_draw(logits, take, row_ids, temperature, exclude, counted=False):
    pytest.importorskip("triton")
    from hdlm_kernels.sampling import triton_gumbel

    if counted:
        return triton_gumbel._draw(logits, take, row_ids, SEED, STEP, temperature, exclude)
    return triton_gumbel.gumbel_argmax_triton(logits, None if take is None else take, row_ids, SEED, STEP,
                                              temperature, exclude)


@pytest.fixture
def small_triton_tiles(monkeypatch):
    """Tiles of 128 Philox pairs in the interpreter, so that a row of a few thousand tokens spans several
    tiles and the screened kernel's tile skipping is exercised (the interpreter's cost is per tile)."""
    pytest.importorskip("triton")
    from hdlm_kernels.sampling import triton_gumbel

    monkeypatch.setattr(triton_gumbel, "INTERPRETER_BLOCK_PAIRS", 128)


@pytest.mark.slow
def test_triton_screened_full_vocabulary_rows():
    # V = 50258 in the interpreter: a subset of the adversarial rows (normal x 3, ±1e4, all -inf but one,
    # +inf twice, top-k style -inf masks, the ±1e4 halves), odd and even row_id * V, in a column-major
    # layout (column stride = rows).
    logits = adversarial_logits(torch.float32)[[0, 1, 3, 4, 7, 10]].t().contiguous().t()
    assert logits.stride() == (1, 6)
    row_ids = torch.tensor([1, 4, 7, 2**33 + 1, 9, 12])
    for temperature in (1.0, 1e-3):
        expected = reference_draw(logits, None, row_ids, temperature, None)
        tokens, best, counts = triton_draw(logits, None, row_ids, temperature, None, counted=True)
        assert_same_draw((tokens, best), expected)
        assert int(counts.min()) >= 1
        if temperature == 1.0:
            assert int(counts.max()) <= 3, counts
        else:
            # At T = 1e-3 the ±1e4 row scales to ±1e7, where float32's spacing (1) exceeds the noise's
            # spread: the bound (2^-20 |a| ≈ 9.5) keeps every token at +1e7 a candidate.
            assert int(counts[-1]) == int((logits[-1] == logits[-1].max()).sum()), counts


@pytest.mark.slow
@pytest.mark.parametrize("dtype,temperature", [(torch.float32, t) for t in (1.0, 0.6, 1e-3, 1e-25, 40.0, 1e20, 1e35)]
                         + [(torch.bfloat16, 1.0), (torch.float16, 1e-3)])
def test_triton_adversarial_rows_across_tiles(dtype, temperature, small_triton_tiles):
    logits = adversarial_logits(dtype, vocab=1001)
    row_ids = torch.arange(logits.shape[0]) * 3 + 1
    expected = reference_draw(logits, None, row_ids, temperature, None)
    assert_same_draw(triton_draw(logits, None, row_ids, temperature, None), expected)


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_triton_strided_rows_take_and_exclude(temperature, small_triton_tiles):
    base = adversarial_logits(torch.float32, vocab=2 * 999 + 1)[[0, 1, 3, 4, 7, 9]]
    logits = base[:, ::2]  # column stride 2, odd V
    take = torch.tensor([5, 0, 3, 3, 1])
    row_ids = torch.tensor([7, 2**40, 3, 4, 123456789])
    exclude = torch.tensor([0, 1, 17, 998])
    expected = reference_draw(logits, take, row_ids, temperature, exclude)
    assert_same_draw(triton_draw(logits, take, row_ids, temperature, exclude), expected)
    transposed = base.t().contiguous().t()
    expected = reference_draw(transposed, None, torch.arange(6), temperature, None)
    assert_same_draw(triton_draw(transposed, None, torch.arange(6), temperature, None), expected)


def test_triton_nan_and_all_minus_inf_rows(small_triton_tiles):
    logits = torch.randn(4, 300)
    logits[0, [5, 200]] = math.nan
    logits[1] = -INF
    logits[2, :] = -INF
    logits[2, 299] = 1.0
    for ex in (None, torch.tensor([299])):
        expected = reference_draw(logits, None, torch.arange(4), 1.0, ex)
        assert_same_draw(triton_draw(logits, None, torch.arange(4), 1.0, ex), expected)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 1.0), (torch.float32, 1e-20), (torch.float32, 50.0),
                                               (torch.bfloat16, 1.0), (torch.float16, 0.37)])
def test_triton_near_ties_exactly_at_the_bound(dtype, temperature, small_triton_tiles):
    from tests.test_screen_math import near_tie_rows

    logits, row_ids, seed, step = near_tie_rows(2048, temperature, dtype)
    expected = _gumbel_argmax_reference(logits, None, row_ids, seed, step, temperature, None, 16)
    from hdlm_kernels.sampling import triton_gumbel

    tokens, best, counts = triton_gumbel._draw(logits, None, row_ids, seed, step, temperature, None)
    assert_same_draw((tokens, best), expected)
    # Triton's float32 bits may differ from the C++ screen's near the bound: one or both tokens are candidates.
    assert set(counts.tolist()) <= {1, 2}, counts


def test_triton_exact_path_where_the_screen_does_not_apply():
    from hdlm_kernels.sampling import triton_gumbel

    logits = adversarial_logits(torch.float32, vocab=513)[:4]
    row_ids = torch.arange(4)
    assert triton_gumbel.screened(logits, 1.0) and triton_gumbel.screened(logits.half(), 1e-25)
    for x, temperature in ((logits.double(), 1.0), (logits, 0.0), (logits, 1e-35), (logits, 1e35)):
        assert not triton_gumbel.screened(x, temperature)
        expected = reference_draw(x, None, row_ids, temperature, None)
        tokens, best, counts = triton_draw(x, None, row_ids, temperature, None, counted=True)
        assert_same_draw((tokens, best), expected)
        assert counts.tolist() == [513] * 4


_SCREENED_PTX_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hdlm_kernels.sampling import triton_gumbel, triton_stream

signature = {"LOGITS": "*bf16", "TAKE": "*i64", "ROW_IDS": "*i64", "EXCLUDE": "*i8", "CONSTS": "*fp64",
             "TOKENS": "*i64", "BEST": "*fp64", "COUNTS": "*i64", "stride_row": "i32", "stride_col": "i32",
             "vocab": "i32", "key0": "i64", "key1": "i64", "step_lo": "i64", "temperature_bits": "i64",
             "scale_bits": "i32", "HAS_TAKE": "constexpr", "HAS_EXCLUDE": "constexpr", "DIVIDE": "constexpr",
             "BLOCK_P": "constexpr", "MAX_TILES": "constexpr", "PREFILTER": "constexpr"}
constexprs = {"HAS_TAKE": True, "HAS_EXCLUDE": True, "DIVIDE": True, "BLOCK_P": 512, "MAX_TILES": 64, "PREFILTER": True}
source = ASTSource(fn=triton_gumbel._gumbel_argmax_screened_kernel, signature=signature, constexprs=constexprs)
kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=triton_stream.launch_options(8))
ptx = kernel.asm["ptx"]
json.dump({"f64": sorted(set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.f64\b", ptx))),
           "f32": sorted(set(re.findall(r"\b[a-z]+(?:\.[a-z0-9]+)*\.f32\b", ptx))),
           "literals": sorted(set(re.findall(r"\b0d[0-9A-F]{16}\b", ptx)))}, sys.stdout)
"""


def test_triton_screened_kernel_decides_without_fma(tmp_path):
    """The screened kernel compiled for sm_90 (no GPU): its exact FP64 pass has no fused multiply-add and
    only IEEE round-to-nearest float64 arithmetic and exact float64 literals, as the exact kernel; its
    float32 screen does use fused multiply-adds (written as tl.fma: allowed by the proof)."""
    from tests.sampling_checks import compiled_ptx_ops

    found = compiled_ptx_ops(_SCREENED_PTX_SCRIPT, tmp_path)
    assert not [op for op in found["f64"] if op.startswith("fma") or "approx" in op], found["f64"]
    arithmetic = [op for op in found["f64"] if op.split(".")[0] in ("add", "sub", "mul", "div")]
    assert "div.rn.f64" in arithmetic and all(".rn." in op for op in arithmetic), found["f64"]
    exact = {"0d3CA0000000000000", "0d3FF0000000000000", "0dBFF0000000000000", "0d4000000000000000",
             "0d7FF0000000000000", "0dFFF0000000000000", "0d7FF8000000000000", "0d0000000000000000"}
    assert set(found["literals"]) <= exact, found["literals"]
    assert "fma.rn.f32" in found["f32"], found["f32"]


def test_avx2_philox_words_are_philox():
    try:
        words = C().screen_philox_words_cpu(SEED, STEP, 0, 2**32 - 5)  # the counter's low word wraps
    except RuntimeError:
        pytest.skip("no AVX2 on this processor")
    key = [SEED & 0xFFFFFFFF, SEED >> 32]
    for p in (0, 4, 5, 6, 127):
        n = 2**32 - 5 + p
        expected = hk.sampling.philox4x32_10_ref([n & 0xFFFFFFFF, n >> 32, 0, STEP], key)
        assert [int(w) for w in words[:, p]] == [int(w) for w in expected]


def test_set_cpu_isa_rejects_unknown_names():
    with pytest.raises(RuntimeError, match="isa must be one of"):
        C().set_cpu_isa("sse9")
    assert C().cpu_isa() in ("scalar", "avx2", "avx512")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_match_the_reference_on_adversarial_rows(backend):
    implementation = hk.backends.select("gumbel_argmax", backend, "cuda", "test").function()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        logits = adversarial_logits(dtype).cuda()
        row_ids = torch.arange(logits.shape[0], device="cuda") * 3 + 1
        for temperature in (1.0, 0.6, 1e-3, 1e-25, 40.0, 1e20, 1e35):
            expected = reference_draw(logits.cpu(), None, row_ids.cpu(), temperature, None)
            assert_same_draw(implementation(logits, None, row_ids, SEED, STEP, temperature, None, 4), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_screen_on_strided_misaligned_and_excluded_rows(backend):
    # The CUDA screen loads 16-byte vectors only from contiguous, aligned rows: a column slice starting at
    # column 1 (misaligned), a column stride of 2 and a transposed layout take the column-by-column loads.
    implementation = hk.backends.select("gumbel_argmax", backend, "cuda", "test").function()
    base = adversarial_logits(torch.bfloat16, vocab=VOCAB + 1).cuda()
    take = torch.tensor([5, 0, 3, 3, 1, 11], device="cuda")
    row_ids = torch.tensor([7, 2**40, 3, 4, 123456789, 0], device="cuda")
    exclude = torch.tensor([0, 1, 17, 998, VOCAB - 1], device="cuda")
    for logits in (base[:, 1:], base[:, :VOCAB], base[:, ::2], base.t().contiguous().t()):
        for temperature in (1.0, 0.5):
            for ex in (None, exclude[exclude < logits.shape[1]]):
                expected = reference_draw(logits.cpu(), take.cpu(), row_ids.cpu(), temperature,
                                          None if ex is None else ex.cpu())
                assert_same_draw(implementation(logits, take, row_ids, SEED, STEP, temperature, ex, 4), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_near_ties_exactly_at_the_bound(backend, dtype):
    from tests.test_screen_math import near_tie_rows

    implementation = hk.backends.select("gumbel_argmax", backend, "cuda", "test").function()
    for temperature in (1.0, 0.37, 1e-20, 50.0):
        logits, row_ids, seed, step = near_tie_rows(VOCAB, temperature, dtype)
        expected = _gumbel_argmax_reference(logits, None, row_ids, seed, step, temperature, None, 16)
        assert_same_draw(implementation(logits.cuda(), None, row_ids.cuda(), seed, step, temperature, None, 4),
                         expected)


# ---------------------------------------------------------------- the prefilter of the Triton screen

PREFILTER_VOCAB = 1501  # 6 tiles of 128 Philox pairs (small_triton_tiles)
HUGE = 2.0 ** 70  # the noise vanishes in fl64(l + g): equal huge logits tie exactly


def prefilter_rows(dtype: torch.dtype, vocab: int = PREFILTER_VOCAB) -> torch.Tensor:
    """Rows where the prefilter (docs/sampling-screen.md, "The prefilter") decides which tiles get the cheap
    noise: normal × 3 logits with
    0. a huge logit early: the floor is high after the first tile, and every later tile is skipped;
    1. the winner in the last tile, the floor already high from the first;
    2. two equal huge logits in the first and the last tile, skipped tiles between: an exact tie of the
       scores, the lower column wins (fp16 cannot hold 2^70: +inf, a tie too);
    3. a NaN logit in a middle tile that the floor of an early huge logit would skip: the NaN wins;
    4. +inf twice, far apart, and a huge finite logit: the lower +inf wins;
    5. every logit -inf but two, far apart;
    6. runner-ups 0.1 below an early leader in a middle tile (their tile reaches the floor, the leader wins);
    7. plain normal × 3 (the tiles after the first few are skipped)."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(8, vocab, generator=g, dtype=torch.float64) * 3
    x[0, 3] = 60.0
    x[1, 5] = 45.0
    x[1, vocab - 2] = 60.0
    x[2, [7, vocab - 3]] = HUGE
    x[3, 9] = 60.0
    x[3, vocab // 2] = math.nan
    x[4, [11, vocab - 1]] = INF
    x[4, 20] = 60.0
    x[5] = -INF
    x[5, [2, vocab - 1]] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    x[6, 1] = 60.0
    x[6, vocab // 2: vocab // 2 + 10] = 59.9
    return x.to(dtype)


def skipped_tiles(row: torch.Tensor, row_id: int, seed: int, step: int, temperature: float,
                  tile_pairs: int = 128) -> int:
    """How many tiles of a row (float32 logits) a prefiltered screen skips, replayed on the CPU with the C++
    rule (screen_noise_bound_cpu, screen_scores_cpu with the atanh form): a check that a test row exercises
    the prefilter (the Triton kernel's float32 bits may differ in the last place, not the count on these rows)."""
    from tests.test_screen_math import words_of

    vocab = row.numel()
    parity = (row_id * vocab) & 1
    word_a, word_b = words_of(seed, step, row_id * vocab + torch.arange(vocab))
    scale = 1.0 if temperature == 1.0 else float(torch.tensor(1.0 / temperature, dtype=torch.float32))
    a = row.float() * scale
    bound = (a + C().screen_noise_bound_cpu(word_a)) + (a.abs() * 2.0 ** -20 + 2.0 ** -13)
    bound = torch.where(row.float() == -INF, -INF, bound)
    floor, skipped = -INF, 0
    for start in range(-parity, vocab, 2 * tile_pairs):
        tile = slice(max(start, 0), start + 2 * tile_pairs)
        if not bool((~(bound[tile] < floor)).any()):
            skipped += 1
            continue
        _, lo, _ = C().screen_scores_cpu(word_a[tile], word_b[tile], row[tile].float(), scale, True)
        lo = lo[~lo.isnan()]
        floor = max(floor, lo.max().item()) if lo.numel() else floor
    return skipped


def assert_prefilter_changes_nothing(logits, take, row_ids, temperature, exclude, seed=SEED, step=STEP):
    """The prefiltered Triton draw equals the reference's, and the unfiltered screen's draw and candidate
    counts (docs/sampling-screen.md, "GPU kernels": same floor, same candidates). Returns the counts."""
    from hdlm_kernels.sampling import triton_gumbel

    expected = _gumbel_argmax_reference(logits, take, row_ids, seed, step, temperature, exclude, 4)
    tokens, best, counts = triton_gumbel._draw(logits, take, row_ids, seed, step, temperature, exclude)
    assert_same_draw((tokens, best), expected)
    tokens_all, best_all, counts_all = triton_gumbel._draw(logits, take, row_ids, seed, step, temperature, exclude,
                                                           prefilter=False)
    assert_same_draw((tokens_all, best_all), expected)
    assert torch.equal(counts, counts_all), (counts, counts_all)
    return counts


def test_triton_prefilter_rows(small_triton_tiles):
    logits = prefilter_rows(torch.float32)
    row_ids = torch.arange(8) * 5 + 2  # odd and even row_id · V
    counts = assert_prefilter_changes_nothing(logits, None, row_ids, 1.0, None)
    # Both tied tokens are candidates; in row 4 also the huge finite logit, whose lo is the floor (+inf's is NaN).
    assert counts.tolist()[2] == 2 and counts.tolist()[4] == 3, counts
    # The rows do skip tiles: all after the first in row 0, most of them in row 7.
    assert skipped_tiles(logits[0], 2, SEED, STEP, 1.0) == 5
    assert skipped_tiles(logits[7], 37, SEED, STEP, 1.0) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("dtype,temperature", [(torch.float32, t) for t in (1e-3, 1e-25, 1e20)]
                         + [(torch.bfloat16, 0.3), (torch.float16, 1.0)])
def test_triton_prefilter_rows_across_temperatures_and_dtypes(dtype, temperature, small_triton_tiles):
    logits = prefilter_rows(dtype)
    assert_prefilter_changes_nothing(logits, None, torch.arange(8) * 5 + 2, temperature, None)


@pytest.mark.slow
def test_triton_prefilter_with_exclude_take_and_strides(small_triton_tiles):
    # Excluded: row 0's early leader (the floor then comes from the normal logits), row 1's last-tile winner,
    # and columns of the tiles the prefilter skips.
    base = prefilter_rows(torch.float32, vocab=2 * PREFILTER_VOCAB)
    logits = base[:, ::2]  # column stride 2
    exclude = torch.tensor([0, 3, 700, 701, 1400, PREFILTER_VOCAB - 2])
    take = torch.tensor([0, 1, 3, 6, 7, 0])
    row_ids = torch.tensor([7, 2**40, 3, 4, 123456789, 8])
    assert_prefilter_changes_nothing(logits, take, row_ids, 1.0, exclude)
    transposed = prefilter_rows(torch.bfloat16).t().contiguous().t()  # column stride 8
    assert_prefilter_changes_nothing(transposed, None, torch.arange(8), 0.5, None)


def prefilter_near_tie_rows(vocab: int, offsets=range(-2, 3)):
    """A leader (logit 0) in the first tile and a challenger in the last tile whose exact score is within a
    few float32 steps of the leader's: its logit is fl32(g_leader - g_challenger) moved by `offsets` steps, so
    that the challenger wins some rows and loses others by a hair. Its prefilter bound is then as close to the
    floor as a winner's can be (its exact score plus the bound's slack), and a tile skipped by mistake would
    lose the row. The challenger is the last-tile token whose noise bound is tightest (u just below 1/2 or
    the words nearest the bound). Every other token is -inf. Returns (logits [len(offsets), V] fp32,
    row ids, seed, step)."""
    from tests.test_screen_math import words_of

    seed, step, row_id = 5, 8, 4
    elements = row_id * vocab + torch.arange(vocab)
    noise = gumbel_noise(hk.sampling.uniform53_ref(seed, step, 0, elements))
    word_a, _ = words_of(seed, step, elements)
    slack = C().screen_noise_bound_cpu(word_a).to(torch.float64) - noise
    leader = 1
    last = torch.arange(vocab - 128, vocab)
    challenger = int(last[slack[last].argmin()])
    at = torch.tensor([noise[leader] - noise[challenger]], dtype=torch.float32)
    rows = []
    for offset in offsets:
        logits = torch.full((vocab,), -INF)
        logits[leader] = 0.0
        logits[challenger] = step_float32(at, offset)[0]
        rows.append(logits)
    return torch.stack(rows), torch.full((len(rows),), row_id), seed, step


def step_float32(value: torch.Tensor, steps: int) -> torch.Tensor:
    direction = 1 if value.item() >= 0 else -1
    return (value.view(torch.int32) + direction * steps).view(torch.float32)


def test_triton_prefilter_near_tie_across_tiles(small_triton_tiles):
    logits, row_ids, seed, step = prefilter_near_tie_rows(PREFILTER_VOCAB)
    expected = _gumbel_argmax_reference(logits, None, row_ids, seed, step, 1.0, None, 4)
    assert len(set(expected[0].tolist())) == 2, expected  # the challenger wins some rows, the leader others
    assert_prefilter_changes_nothing(logits, None, row_ids, 1.0, None, seed, step)


@pytest.mark.slow
def test_triton_prefilter_full_vocabulary_row():
    # V = 50258 with the interpreter's own tiles: a huge logit early and a NaN-free normal row, odd row_id · V.
    logits = prefilter_rows(torch.float32, vocab=VOCAB)[[0, 7]]
    counts = assert_prefilter_changes_nothing(logits, None, torch.tensor([3, 2**33 + 1]), 1.0, None)
    assert counts.tolist()[0] == 1, counts
