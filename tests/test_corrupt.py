"""hk.sampling.corrupt, the forward noise of training on stream 2: every backend bit-identical to the
reference, the events at their probabilities, row identity, the harness's processes through it, and
argument checks."""

import pytest
import scipy.stats
import torch
from sampling_checks import backend_targets

import hdlm_kernels as hk
from hdlm_reference import noise as nz

pytestmark = pytest.mark.usefixtures("single_thread")

FUSED = backend_targets("corrupt", reference_cpu=False)


def problem(shape=(6, 70), vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, vocab, shape, generator=g)
    x0.view(-1)[::9] = vocab  # some MASK inputs (mask_id = vocab)
    p_mask = torch.rand(shape, generator=g, dtype=torch.float64) * 0.7
    p_shuffle = torch.rand(shape, generator=g, dtype=torch.float64) * (1 - p_mask)
    return x0, p_mask, p_shuffle


@pytest.mark.parametrize("target", FUSED)
@pytest.mark.parametrize("seed,step", [(0, 0), (2**64 - 1, 2**40 + 3), (12345, 7)])
def test_every_backend_equals_the_reference_bit_for_bit(target, seed, step):
    x0, p_mask, p_shuffle = problem()
    row_ids = torch.randperm(x0.numel(), generator=torch.Generator().manual_seed(1)).reshape(x0.shape) * 1000
    reference = hk.sampling.corrupt_ref(x0, p_mask, p_shuffle, 100, 100, seed, step, row_ids)
    ours = hk.sampling.corrupt(*(t.to(target.device) for t in (x0, p_mask, p_shuffle)), 100, 100, seed, step,
                               row_ids.to(target.device), backend=target.name)
    for got, expected in zip(ours, reference):
        assert got.device.type == target.kind and torch.equal(got.cpu(), expected)


def test_the_three_events_of_the_contract():
    x0, p_mask, p_shuffle = problem()
    x_t, masked, shuffled = hk.sampling.corrupt_ref(x0, p_mask, p_shuffle, 100, 100, 12345, 7)
    assert x_t.dtype == torch.int64 and masked.dtype == torch.bool and x_t.shape == x0.shape
    mask_inputs = x0 == 100
    assert (x_t[mask_inputs] == 100).all() and not (masked | shuffled)[mask_inputs].any()
    assert torch.equal(x_t == 100, masked | mask_inputs)
    assert ((x_t[shuffled] >= 0) & (x_t[shuffled] < 100)).all()
    assert torch.equal(x_t[~(masked | shuffled)], x0[~(masked | shuffled)])
    # u_event of element 2·row_id and u_token of element 2·row_id + 1 of stream 2, as the docstring says.
    row_ids = torch.arange(x0.numel())
    u_event = hk.sampling.uniform53_ref(12345, 7, 2, 2 * row_ids).view(x0.shape)
    u_token = hk.sampling.uniform53_ref(12345, 7, 2, 2 * row_ids + 1).view(x0.shape)
    real = ~mask_inputs
    assert torch.equal(masked, real & (u_event < p_mask))
    assert torch.equal(shuffled, real & ~masked & (u_event < p_mask + p_shuffle))
    assert torch.equal(x_t[shuffled], (u_token[shuffled] * 100).floor().long().clamp(max=99))


@pytest.mark.parametrize("target", backend_targets("corrupt"))
def test_a_position_depends_only_on_its_row_id(target):
    x0, p_mask, p_shuffle = (t.to(target.device) for t in problem())
    row_ids = torch.arange(x0.numel(), device=target.device).reshape(x0.shape) + 10**9
    whole = hk.sampling.corrupt(x0, p_mask, p_shuffle, 100, 100, 3, 4, row_ids, backend=target.name)
    part = hk.sampling.corrupt(x0[2:4, 5:9], p_mask[2:4, 5:9], p_shuffle[2:4, 5:9], 100, 100, 3, 4,
                               row_ids[2:4, 5:9], backend=target.name)
    for a, b in zip(part, whole):
        assert torch.equal(a, b[2:4, 5:9])


def test_events_and_replacements_have_their_probabilities():
    n, N = 200_000, 7
    x0 = torch.zeros(n, dtype=torch.long)
    p_mask, p_shuffle = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.45, dtype=torch.float64)
    x_t, masked, shuffled = hk.sampling.corrupt(x0, p_mask, p_shuffle, N, N, 99, 1)
    counts = [int(masked.sum()), int(shuffled.sum()), n - int(masked.sum()) - int(shuffled.sum())]
    assert scipy.stats.chisquare(counts, [0.3 * n, 0.45 * n, 0.25 * n]).pvalue > 1e-6
    tokens = torch.bincount(x_t[shuffled], minlength=N).tolist()
    assert scipy.stats.chisquare(tokens).pvalue > 1e-6  # uniform over the N real tokens


@pytest.mark.parametrize("target", FUSED)
@pytest.mark.parametrize("process", [nz.GammaHybrid(50, 0.1), nz.EpsilonHybrid(50, 0.2), nz.Absorb(50)],
                         ids=lambda p: type(p).__name__)
def test_the_harness_processes_draw_through_it_on_every_backend(target, process):
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 49, (3, 40), generator=g)
    sigma = torch.rand(3, 40, generator=g) * 3
    expected = process.sample(x0, sigma, nz.PhiloxStream(17, 2, "reference"), return_events=True)
    ours = process.sample(x0.to(target.device), sigma.to(target.device), nz.PhiloxStream(17, 2, target.name),
                          return_events=True)
    assert torch.equal(ours[0].cpu(), expected[0])
    assert torch.equal(ours[1].masked.cpu(), expected[1].masked)
    assert torch.equal(ours[1].shuffled.cpu(), expected[1].shuffled)
    again = process.sample(x0, sigma, nz.PhiloxStream(17, 2))
    assert torch.equal(again, expected[0])
    assert not torch.equal(process.sample(x0, sigma, nz.PhiloxStream(17, 3)), again)


@pytest.mark.parametrize("change,error,message", [
    (dict(x0=torch.zeros(3)), TypeError, "x0 must be an integer tensor"),
    (dict(p_mask=torch.zeros(4, dtype=torch.float64)), ValueError, "p_mask of shape \\(4,\\) does not broadcast"),
    (dict(p_shuffle=torch.zeros(3, dtype=torch.long)), TypeError, "p_shuffle must be a floating tensor"),
    (dict(row_ids=torch.tensor([0, 1, -1])), ValueError, "row_ids must lie in \\[0, 2\\^62\\)"),
    (dict(row_ids=torch.tensor([0, 1])), ValueError, "row_ids must have x0's shape"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(num_tokens=0), ValueError, r"num_tokens must be an int in \[1, 2\^31\)"),
    (dict(backend="cuda"), ValueError, "corrupt has no backend 'cuda'; its backends are 'auto', 'kernels', "
                                       "'reference', 'triton'"),
])
def test_invalid_arguments(change, error, message):
    args = dict(x0=torch.zeros(3, dtype=torch.long), p_mask=torch.zeros(3, dtype=torch.float64),
                p_shuffle=torch.zeros(3, dtype=torch.float64), num_tokens=5, mask_id=5, seed=1, step=0,
                row_ids=None, backend="reference")
    args.update(change)
    with pytest.raises(error, match=message):
        hk.sampling.corrupt(**args)
