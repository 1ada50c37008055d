"""Candidate counts per row (docs/sampling-screen.md, "Cost and candidates" and "GPU kernels"):
``gumbel_candidates`` and ``hybrid_candidates`` reach the counted kernels only through the backend registry
(ops "gumbel_candidates" and "hybrid_candidates", with the samplers' implementation names and order), the C++
counts on the CPU, Triton's in the interpreter, the reference's V; refusals name the op and its names. Marked
``cuda``: the CUDA screen with its prefilter returns the reference's tokens and the Triton kernel's counts on
rows built against the prefilter (a huge early logit that lets every later iteration skip its cheap noise,
the winner in the last chunk, a NaN in a chunk that would be skipped, ties, exclusion of the early leader,
strided rows, V = 50258), and its counted kernels draw what the uncounted ones draw."""

import math

import pytest
import torch

import hdlm_kernels as hk
from hdlm_kernels import _extension, backends
from hdlm_kernels.sampling.gumbel import _gumbel_argmax_reference
from hdlm_kernels.sampling.hybrid import _hybrid_step_reference, step_coefficients
from tests.sampling_checks import assert_same_draw

VOCAB = 50258
SEED, STEP = 0x9E3779B97F4A7C15, 12
needs_extension = pytest.mark.skipif(bool(_extension.missing_reason), reason="needs the compiled extension")


def normal_rows(num_rows: int, vocab: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab, generator=g) * 3


# ---------------------------------------------------------------- the registry (CPU)


@pytest.mark.parametrize("op, sampler", [("gumbel_candidates", "gumbel_argmax"), ("hybrid_candidates", "hybrid_step")])
def test_the_counts_are_ops_with_the_samplers_implementations_in_their_order(op, sampler):
    assert backends.names(op) == backends.names(sampler)
    for counted, drawn in zip(backends.implementations(op), backends.implementations(sampler)):
        assert counted.auto_devices == drawn.auto_devices and counted.fused == drawn.fused


@needs_extension
def test_gumbel_candidates_auto_on_cpu_is_the_cpp_screen():
    logits = normal_rows(3, 1001)
    row_ids = torch.tensor([0, 5, 7])
    counts = hk.sampling.gumbel_candidates(logits, SEED, STEP, row_ids=row_ids)
    _, _, direct = _extension._C.gumbel_argmax_counted_cpu(logits, None, row_ids, SEED, STEP, 1.0, None, True)
    assert counts.dtype == torch.int64 and torch.equal(counts, direct)
    assert torch.equal(hk.sampling.gumbel_candidates(logits, SEED, STEP, row_ids=row_ids, backend="cpp"), counts)
    assert torch.equal(hk.sampling.gumbel_candidates(logits, SEED, STEP, row_ids=row_ids, backend="kernels"), counts)


@needs_extension
def test_hybrid_candidates_auto_on_cpu_is_the_cpp_screen():
    log_score = normal_rows(4, 1001) - 10
    x = torch.tensor([3, 1000, 9, 1000])
    counts = hk.sampling.hybrid_candidates(x, log_score, 2.0, 1.95, 0.01, 1000, SEED, STEP)
    assert torch.equal(hk.sampling.hybrid_candidates(x, log_score, 2.0, 1.95, 0.01, 1000, SEED, STEP, backend="cpp"),
                       counts)
    assert counts.dtype == torch.int64 and counts.min() >= 1


def test_the_reference_scores_every_token():
    logits = normal_rows(2, 37)
    assert hk.sampling.gumbel_candidates(logits, 1, 2, backend="reference").tolist() == [37, 37]
    x = torch.tensor([0, 36])
    assert hk.sampling.hybrid_candidates(x, logits, 2.0, 1.0, 0.5, 36, 1, 2, backend="reference").tolist() == [37, 37]


@needs_extension
def test_triton_counts_in_the_interpreter_are_the_cpp_counts():
    # Rows far from the bound (normal × 3): one candidate each on both screens; the γ step's MASK rows two.
    logits = normal_rows(3, 1001)
    assert torch.equal(hk.sampling.gumbel_candidates(logits, SEED, STEP, backend="triton"),
                       hk.sampling.gumbel_candidates(logits, SEED, STEP, backend="cpp"))
    x = torch.tensor([3, 1000, 9])
    arguments = (x, logits - 10, 2.0, 1.95, 0.01, 1000, SEED, STEP)
    assert torch.equal(hk.sampling.hybrid_candidates(*arguments, backend="triton"),
                       hk.sampling.hybrid_candidates(*arguments, backend="cpp"))


def test_unknown_names_and_unavailable_backends_are_refused_naming_the_op():
    logits = normal_rows(2, 5)
    x = torch.tensor([0, 4])
    for op, call in (("gumbel_candidates", lambda b: hk.sampling.gumbel_candidates(logits, 1, 2, backend=b)),
                     ("hybrid_candidates", lambda b: hk.sampling.hybrid_candidates(x, logits, 2.0, 1.0, 0.5, 4, 1,
                                                                                   2, backend=b))):
        names = ", ".join(map(repr, backends.names(op)))
        with pytest.raises(ValueError, match=f"{op} has no backend 'numpy'; its backends are {names}"):
            call("numpy")
        with pytest.raises(RuntimeError, match=rf"{op}: backend='cuda' cannot run on cpu tensors here"):
            call("cuda")


def test_the_arguments_are_checked_as_the_samplers_check_them():
    logits = normal_rows(2, 5)
    with pytest.raises(ValueError, match=r"exclude must hold token ids in \[0, V\) = \[0, 5\); got 9"):
        hk.sampling.gumbel_candidates(logits, 1, 2, exclude=[9])
    with pytest.raises(ValueError, match="seed"):
        hk.sampling.gumbel_candidates(logits, -1, 2)
    with pytest.raises(ValueError, match=r"hybrid_candidates: x must hold token ids in \[0, V\)"):
        hk.sampling.hybrid_candidates(torch.tensor([0, 8]), logits, 2.0, 1.0, 0.5, 4, 1, 2)


def test_without_the_extension_auto_counts_the_reference_and_cpp_is_refused(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    monkeypatch.setattr(_extension, "missing_reason", "the build of hdlm_kernels._C was skipped: testing")
    logits = normal_rows(2, 5)
    assert hk.sampling.gumbel_candidates(logits, 1, 2).tolist() == [5, 5]
    with pytest.raises(RuntimeError, match="gumbel_candidates: backend='cpp' cannot run on cpu tensors here: the "
                                           "build of hdlm_kernels._C was skipped: testing"):
        hk.sampling.gumbel_candidates(logits, 1, 2, backend="cpp")


# ---------------------------------------------------------------- the CUDA prefilter (GPU)


def prefilter_rows(dtype: torch.dtype, vocab: int = VOCAB) -> torch.Tensor:
    """Rows against the CUDA prefilter, on a normal × 3 background: 0 a huge logit in the first chunk (the
    floor then skips every later iteration's cheap noise); 1 the winner in the row's last chunk; 2 the huge
    early logit and a NaN in a chunk the floor would skip (NaN reaches: it wins); 3 two equal huge logits in
    far apart chunks; 4 all logits equal (the noise decides); 5 -inf everywhere but a few columns; 6 the
    background alone."""
    rows = normal_rows(7, vocab, seed=9)
    rows[0, 3] = 40.0
    rows[1, vocab - 1] = 40.0
    rows[2, 3] = 40.0
    rows[2, vocab // 2 + 5] = math.nan
    rows[3, [10, vocab - 20]] = 30.0
    rows[4] = 1.5
    rows[5] = -math.inf
    rows[5, [7, vocab // 3, vocab - 2]] = torch.tensor([-3.0, 2.0, -1.0])
    return rows.to(dtype)


def gpu_gumbel(backend, logits, take, row_ids, temperature, exclude):
    implementation = hk.backends.select("gumbel_argmax", backend, "cuda", "test").function()
    return implementation(logits, take, row_ids, SEED, STEP, temperature, exclude, 4)


def gpu_gumbel_counts(backend, logits, take, row_ids, temperature, exclude):
    implementation = hk.backends.select("gumbel_candidates", backend, "cuda", "test").function()
    return implementation(logits, take, row_ids, SEED, STEP, temperature, exclude)


def check_gumbel_rows(logits, take, row_ids, temperature, exclude):
    expected = _gumbel_argmax_reference(logits.cpu(), None if take is None else take.cpu(), row_ids.cpu(), SEED,
                                        STEP, temperature, None if exclude is None else exclude.cpu(), 4)
    assert_same_draw(gpu_gumbel("cuda", logits, take, row_ids, temperature, exclude), expected)
    tokens, best, counts = _extension._C.gumbel_argmax_counted_cuda(logits, take, row_ids, SEED, STEP, temperature,
                                                                    exclude, True)
    assert_same_draw((tokens, best), expected)  # the counted kernels draw the same
    triton_counts = gpu_gumbel_counts("triton", logits, take, row_ids, temperature, exclude)
    assert torch.equal(counts.cpu(), triton_counts.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cuda_prefilter_rows_match_the_reference_and_triton_counts(dtype, temperature):
    logits = prefilter_rows(dtype).cuda()
    row_ids = torch.arange(logits.shape[0], device="cuda") * 5 + 1
    check_gumbel_rows(logits, None, row_ids, temperature, None)


@pytest.mark.cuda
def test_cuda_prefilter_with_the_early_leader_excluded_and_strided_rows():
    base = prefilter_rows(torch.bfloat16, VOCAB + 1).cuda()
    take = torch.tensor([0, 2, 1, 3, 0, 6], device="cuda")
    row_ids = torch.tensor([7, 2**40, 3, 4, 123456789, 0], device="cuda")
    for logits in (base[:, :VOCAB], base[:, 1:], base[:, ::2], base.t().contiguous().t()):
        for exclude in (None, torch.tensor([2, 3, 10], device="cuda")):
            check_gumbel_rows(logits, take, row_ids, 1.0, exclude)


@pytest.mark.cuda
def test_cuda_counts_on_the_exact_path_are_v():
    logits = prefilter_rows(torch.float32, 1001).cuda()
    row_ids = torch.arange(logits.shape[0], device="cuda")
    for dtype, temperature in ((torch.float64, 1.0), (torch.float32, 0.0), (torch.float32, 1e-35)):
        counts = hk.sampling.gumbel_candidates(logits.to(dtype)[4:5], SEED, STEP, row_ids=row_ids[:1],
                                               temperature=temperature, backend="cuda")
        assert counts.tolist() == [1001]


@pytest.mark.cuda
def test_cuda_auto_counts_the_cuda_kernel():
    logits = prefilter_rows(torch.bfloat16).cuda()
    assert torch.equal(hk.sampling.gumbel_candidates(logits, SEED, STEP),
                       hk.sampling.gumbel_candidates(logits, SEED, STEP, backend="cuda"))


def hybrid_prefilter_rows(vocab: int = VOCAB):
    """γ-step rows (every other one MASK) against the prefilter: a huge early log-score, the best read token
    in the last chunk, two equal huge log-scores, and the background (normal × 3 - 10)."""
    log_score = normal_rows(8, vocab, seed=4) - 10
    log_score[0:2, 5] = 25.0
    log_score[2:4, vocab - 3] = 25.0
    log_score[4:6, [11, vocab - 30]] = 25.0
    x = torch.randint(0, vocab - 1, (8,), generator=torch.Generator().manual_seed(2))
    x[1::2] = vocab - 1  # MASK
    return log_score, x


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method, gamma", [("analytic", 0.01), ("analytic", 0.5), ("euler", 0.05)])
def test_cuda_hybrid_prefilter_rows_match_the_reference_and_triton_counts(dtype, method, gamma):
    log_score, x = hybrid_prefilter_rows()
    log_score = log_score.to(dtype)
    mask_id = VOCAB - 1
    now = torch.full((8,), 2.0, dtype=torch.float64)
    nxt = torch.full((8,), 1.95, dtype=torch.float64)
    coefficients = step_coefficients(x, now, nxt, gamma, mask_id, VOCAB, method, nxt == 0)
    row_ids = torch.arange(8) * 3 + 2
    expected = _hybrid_step_reference(log_score, x, coefficients, row_ids, mask_id, SEED, STEP, 2)
    device = (log_score.cuda(), x.cuda(), coefficients.cuda(), row_ids.cuda())
    draw = hk.backends.select("hybrid_step", "cuda", "cuda", "test").function()
    assert_same_draw(draw(*device, mask_id, SEED, STEP, 2), expected)
    tokens, best, counts = _extension._C.hybrid_step_counted_cuda(*device, mask_id, SEED, STEP, True)
    assert_same_draw((tokens, best), expected)
    triton_counts = hk.backends.select("hybrid_candidates", "triton", "cuda", "test").function()(
        *device, mask_id, SEED, STEP)
    assert torch.equal(counts.cpu(), triton_counts.cpu())
    assert torch.equal(hk.sampling.hybrid_candidates(x.cuda(), log_score.cuda(), now.cuda(), nxt.cuda(), gamma,
                                                     mask_id, SEED, STEP, row_ids=row_ids.cuda(), method=method,
                                                     backend="cuda").cpu(), counts.cpu())
