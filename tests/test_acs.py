"""The adaptive correction sampler update (paper §3.4, App. D; docs/sampling-stream.md) on every backend:
bit-exact against the direct twin, transfer and correction frequencies, frozen rows, MASK never drawn,
eta = 0 is MDLM's sampler, decisions without logits, logits for only the changing rows, the two-phase
plan/apply, and argument checks."""

import pytest
import scipy.stats
import torch
from sampling_checks import backend_targets

import hdlm_kernels as hk
from hdlm_kernels.sampling import acs_decisions, acs_step, acs_step_ref, gumbel_argmax, uniform53_ref

MASK = 31
VOCAB = 32
P_VALUE_FLOOR = 1e-6
EVERY = backend_targets("acs")


def make_rows(rows, masked_fraction=0.5, seed=0, vocab=VOCAB, mask_id=MASK, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab - 1, (rows,), generator=g)
    x[torch.rand(rows, generator=g) < masked_fraction] = mask_id
    logits = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2).to(dtype)
    return x, logits


def binomial_ok(successes, trials, p):
    return scipy.stats.binomtest(int(successes), int(trials), p).pvalue > P_VALUE_FLOOR


# ---------------------------------------------------------------- against the twin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("p_kind", ["scalar", "per_row"])
@pytest.mark.parametrize("eta, temperature", [(0.0, 1.0), (0.3, 1.0), (1.0, 0.5), (0.05, 0.0)])
def test_matches_reference_bit_exactly(dtype, p_kind, eta, temperature):
    rows = 300
    x, logits = make_rows(rows, dtype=dtype, seed=rows)
    g = torch.Generator().manual_seed(5)
    p = 0.4 if p_kind == "scalar" else torch.rand(rows, generator=g, dtype=torch.float64)
    row_ids = torch.randperm(10**6, generator=g)[:rows]
    frozen = torch.rand(rows, generator=g) < 0.2
    for kwargs in (dict(), dict(row_ids=row_ids), dict(row_ids=row_ids, frozen=frozen)):
        expected = acs_step_ref(x, logits, p, eta, MASK, 123, 4, temperature=temperature, **kwargs)
        got = acs_step(x, logits, p, eta, MASK, 123, 4, temperature=temperature, **kwargs)
        assert got.dtype == torch.int64 and torch.equal(got, expected)


@pytest.mark.parametrize("target", EVERY)
def test_every_backend_draws_the_twins_tokens(target):
    """acs_step, the two-phase acs_apply and the logits_rows layout on each backend against the twin
    (float16 logits, a scalar and a per-row p_transfer, corrections, frozen rows, greedy)."""
    rows, vocab, mask_id = (12 if target.interpreted else 40), 60, 59
    x = torch.full((rows,), mask_id)
    x[::3] = 7
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(rows, vocab, generator=g, dtype=torch.float64).to(torch.float16)
    row_ids = torch.arange(rows) + 500
    frozen = torch.zeros(rows, dtype=torch.bool)
    frozen[1] = True
    device, name = target.device, target.name
    for p, eta, temperature in ((0.3, 0.2, 1.0), (torch.rand(rows, generator=g, dtype=torch.float64), 0.5, 0.0)):
        expected = acs_step_ref(x, logits, p, eta, mask_id, 13, 2, row_ids, frozen, temperature)
        on = (lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)
        got = acs_step(x.to(device), logits.to(device), on(p), eta, mask_id, 13, 2, row_ids.to(device),
                       frozen.to(device), temperature, backend=name)
        assert got.device.type == target.kind and torch.equal(got.cpu(), expected)
        rows_changed = hk.sampling.acs_plan(x.to(device), on(p), eta, mask_id, 13, 2, row_ids.to(device),
                                            frozen.to(device))
        y = x.to(device, copy=True)
        hk.sampling.acs_apply(y, logits.to(device)[rows_changed], rows_changed, mask_id, 13, 2, row_ids.to(device),
                              temperature, backend=name)
        assert torch.equal(y.cpu(), expected)
        assert torch.equal(acs_step(x.to(device), logits.to(device)[rows_changed], on(p), eta, mask_id, 13, 2,
                                    row_ids.to(device), frozen.to(device), temperature, backend=name,
                                    logits_rows=rows_changed).cpu(), expected)


def test_decisions_are_exactly_the_rows_that_change():
    rows = 2000
    x, logits = make_rows(rows)
    change = acs_decisions(x, 0.3, 0.4, MASK, 9, 2)
    x_new = acs_step(x, logits, 0.3, 0.4, MASK, 9, 2)
    assert change.dtype == torch.bool and change.shape == (rows,)
    assert torch.equal(x_new[~change], x[~change])
    # A changed row holds the Gumbel-max draw of its own logits (stream 0, same row id), MASK excluded.
    drawn = gumbel_argmax(logits, 9, 2, exclude=MASK)
    assert torch.equal(x_new[change], drawn[change])
    # Every masked row that was chosen is unmasked; an unmasked row may redraw its own token.
    assert not bool((x_new[change] == MASK).any())
    assert bool((x_new != x).sum() < change.sum())  # some corrections redraw the same token


def test_decision_is_u1_against_the_threshold_of_the_contract():
    rows = 500
    x, _ = make_rows(rows, seed=3)
    p = torch.rand(rows, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    row_ids = torch.arange(rows) * 7 + 3
    u1 = uniform53_ref(44, 5, 1, row_ids)  # stream 1, element row_id
    threshold = torch.where(x == MASK, p, 0.25 * (1.0 - p))
    assert torch.equal(acs_decisions(x, p, 0.25, MASK, 44, 5, row_ids), u1 < threshold)


def test_decisions_need_no_logits_and_depend_only_on_the_row():
    rows = 400
    x, _ = make_rows(rows, seed=4)
    row_ids = torch.arange(rows) + 1000
    whole = acs_decisions(x, 0.5, 0.5, MASK, 1, 1, row_ids)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
    assert torch.equal(acs_decisions(x[order], 0.5, 0.5, MASK, 1, 1, row_ids[order]), whole[order])
    assert torch.equal(acs_decisions(x[:17], 0.5, 0.5, MASK, 1, 1, row_ids[:17]), whole[:17])


# ---------------------------------------------------------------- frequencies and invariants


@pytest.mark.parametrize("p, eta", [(0.3, 0.5), (0.05, 0.01), (0.9, 1.0)])
def test_transfer_and_correction_frequencies(p, eta):
    rows = 40000
    x, _ = make_rows(rows, seed=11)
    change = acs_decisions(x, p, eta, MASK, 2024, 17)
    masked = x == MASK
    assert binomial_ok(change[masked].sum(), masked.sum(), p)
    assert binomial_ok(change[~masked].sum(), (~masked).sum(), eta * (1 - p))


def test_steps_draw_fresh_decisions():
    x, _ = make_rows(20000, seed=12)
    a, b = acs_decisions(x, 0.5, 0.5, MASK, 3, 0), acs_decisions(x, 0.5, 0.5, MASK, 3, 1)
    # Independent draws with P(change) = 1/2 (masked) or 1/4: they agree on ~60% of rows, not all.
    assert 0.5 < float((a == b).double().mean()) < 0.7


def test_mask_is_never_produced_even_when_the_model_prefers_it():
    rows = 3000
    x, logits = make_rows(rows, masked_fraction=0.7, seed=13)
    logits[:, MASK] = 40.0  # the official sampler would draw MASK almost always
    x_new = acs_step(x, logits, 0.6, 0.8, MASK, 5, 5)
    change = acs_decisions(x, 0.6, 0.8, MASK, 5, 5)
    assert not bool((x_new[change] == MASK).any())
    assert torch.equal(x_new == MASK, (x == MASK) & ~change)


def test_frozen_rows_never_change():
    rows = 3000
    x, logits = make_rows(rows, seed=14)
    frozen = torch.rand(rows, generator=torch.Generator().manual_seed(2)) < 0.5
    x_new = acs_step(x, logits, 1.0, 1.0, MASK, 6, 6, frozen=frozen)  # everything else resamples
    assert torch.equal(x_new[frozen], x[frozen])  # frozen masked rows stay masked too
    assert not bool((x_new[~frozen] == MASK).any())
    assert not bool(acs_decisions(x, 1.0, 1.0, MASK, 6, 6, frozen=frozen)[frozen].any())


def test_eta_zero_is_mdlm_and_never_touches_unmasked_rows():
    rows = 5000
    x, logits = make_rows(rows, seed=15)
    unmasked = x != MASK
    for p in (0.0, 0.5, 1.0):
        x_new = acs_step(x, logits, p, 0.0, MASK, 7, 7)
        assert torch.equal(x_new[unmasked], x[unmasked])
    # p = 1 unmasks every masked row, p = 0 none (u1 lies in [2^-53, 1 - 2^-53]).
    assert not bool((acs_step(x, logits, 1.0, 0.0, MASK, 7, 7) == MASK).any())
    assert torch.equal(acs_step(x, logits, 0.0, 0.0, MASK, 7, 7), x)


def test_per_row_p_transfer():
    rows = 1000
    x = torch.full((rows,), MASK)
    _, logits = make_rows(rows, seed=16)
    p = torch.zeros(rows)
    p[::2] = 1.0
    x_new = acs_step(x, logits, p, 0.5, MASK, 8, 8)
    assert not bool((x_new[::2] == MASK).any()) and bool((x_new[1::2] == MASK).all())
    # A 0-d tensor is a scalar.
    scalar = acs_step(x, logits, 0.25, 0.5, MASK, 8, 8)
    assert torch.equal(acs_step(x, logits, torch.tensor(0.25), 0.5, MASK, 8, 8), scalar)


def test_same_seed_reproduces_and_another_seed_differs():
    x, logits = make_rows(4000, seed=17)
    first = acs_step(x, logits, 0.5, 0.2, MASK, 2**63 + 5, 3)
    assert torch.equal(acs_step(x, logits, 0.5, 0.2, MASK, 2**63 + 5, 3), first)
    assert not torch.equal(acs_step(x, logits, 0.5, 0.2, MASK, 2**63 + 6, 3), first)
    assert torch.equal(x, make_rows(4000, seed=17)[0])  # x is not modified in place


# ---------------------------------------------------------------- logits for only the changing rows


def test_logits_for_only_the_changing_rows():
    rows = 1000
    x, logits = make_rows(rows, seed=18)
    row_ids = torch.arange(rows) + 5 * 1024
    args = (0.35, 0.3, MASK, 21, 9, row_ids)
    expected = acs_step(x, logits, *args)
    change = acs_decisions(x, *args)
    selected = change.nonzero().squeeze(1)
    # The generation-loop pattern: decide, compute logits for the chosen rows only, sample.
    assert torch.equal(acs_step(x, logits[selected], *args, logits_rows=selected), expected)
    # Any order, and a superset (e.g. every row of an active window): extra logits are ignored.
    order = torch.randperm(selected.numel(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(acs_step(x, logits[selected[order]], *args, logits_rows=selected[order]), expected)
    window = torch.arange(rows // 2)
    superset = torch.unique(torch.cat([selected, window]))
    assert torch.equal(acs_step(x, logits[superset], *args, logits_rows=superset.to(torch.int32)), expected)
    # No row changes: logits may be empty.
    none = acs_step(x, logits[:0], 0.0, 0.0, MASK, 21, 9, logits_rows=torch.zeros(0, dtype=torch.int64))
    assert torch.equal(none, x)


def test_logits_rows_errors():
    rows = 200
    x, logits = make_rows(rows, seed=19)
    change = acs_decisions(x, 0.5, 0.5, MASK, 1, 1)
    selected = change.nonzero().squeeze(1)
    with pytest.raises(ValueError, match="logits_rows must include every row that changes; 1 of the"):
        acs_step(x, logits[selected[1:]], 0.5, 0.5, MASK, 1, 1, logits_rows=selected[1:])
    with pytest.raises(ValueError, match="distinct rows"):
        acs_step(x, logits[:3], 0.5, 0.5, MASK, 1, 1, logits_rows=torch.tensor([1, 1, 2]))
    with pytest.raises(ValueError, match=r"logits_rows must hold rows of x in \[0, R\) = \[0, 200\); got 2"):
        acs_step(x, logits[:1], 0.5, 0.5, MASK, 1, 1, logits_rows=torch.tensor([200]))
    with pytest.raises(ValueError, match=r"logits_rows must have shape \[K\] = \[3\]"):
        acs_step(x, logits[:3], 0.5, 0.5, MASK, 1, 1, logits_rows=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="logits_rows must be an integer tensor"):
        acs_step(x, logits[:1], 0.5, 0.5, MASK, 1, 1, logits_rows=torch.tensor([0.0]))
    with pytest.raises(ValueError, match="or pass logits_rows"):
        acs_step(x, logits[:10], 0.5, 0.5, MASK, 1, 1)


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=torch.full((2, 2), MASK)), ValueError, r"x must have shape \[R\]"),
        (dict(x=torch.zeros(4)), TypeError, "x must be an integer tensor"),
        (dict(x=[1, 2, 3, 4]), TypeError, "x must be an integer tensor"),
        (dict(p_transfer=1.5), ValueError, r"p_transfer must lie in \[0, 1\]; got 1.5"),
        (dict(p_transfer=torch.tensor([0.1, 0.2, float("nan"), 0.3])), ValueError, "row 2 holds nan"),
        (dict(p_transfer=torch.zeros(3)), ValueError, r"p_transfer must be a float or a tensor of shape"),
        (dict(p_transfer=torch.zeros(4, dtype=torch.int64)), TypeError, "p_transfer must be a float or a fl"),
        (dict(p_transfer="0.5"), TypeError, "p_transfer must be a float"),
        (dict(eta=-0.1), ValueError, "eta must be a finite float >= 0"),
        (dict(eta=None), TypeError, "eta must be a float"),
        (dict(mask_id=-1), ValueError, "mask_id must be an int >= 0"),
        (dict(mask_id=VOCAB), ValueError, r"mask_id must be a token id in \[0, V\) = \[0, 32\)"),
        (dict(seed=-1), ValueError, "seed must be"),
        (dict(step=1.5), TypeError, "step must be"),
        (dict(row_ids=torch.arange(5)), ValueError, r"row_ids must have shape \[R\] = \[4\]"),
        (dict(frozen=torch.zeros(4)), TypeError, "frozen must be None or a bool tensor"),
        (dict(frozen=torch.zeros(3, dtype=torch.bool)), ValueError, r"frozen must have shape \[R\] = \[4\]"),
        (dict(logits=torch.zeros(4, VOCAB, dtype=torch.int32)), TypeError, "logits must have dtype"),
        (dict(temperature=-1.0), ValueError, "temperature must be"),
        (dict(backend="fast"), ValueError, "acs_step: acs has no backend 'fast'; its backends are 'auto'"),
        (dict(backend="cuda"), RuntimeError, "acs_step: backend='cuda' cannot run on cpu tensors here"),
        (dict(logits=torch.full((4, VOCAB), float("nan"))), ValueError, "must not hold NaN; row 0"),
    ],
)
def test_argument_errors_name_the_argument(kwargs, error, match):
    arguments = dict(
        x=torch.full((4,), MASK), logits=torch.zeros(4, VOCAB), p_transfer=1.0, eta=0.5, mask_id=MASK, seed=1,
        step=1,
    )
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        acs_step(**arguments)
    # The checks that do not involve logits apply to acs_decisions as well.
    if not {"logits", "temperature", "backend"} & kwargs.keys() and kwargs.get("mask_id") != VOCAB:
        del arguments["logits"]
        with pytest.raises(error, match=match):
            acs_decisions(**arguments)


def test_empty_rows():
    x = torch.zeros(0, dtype=torch.int64)
    assert acs_decisions(x, 0.5, 0.5, MASK, 1, 1).shape == (0,)
    assert acs_step(x, torch.zeros(0, VOCAB), 0.5, 0.5, MASK, 1, 1).shape == (0,)


def test_hk_namespace_exports():
    assert hk.sampling.acs_step is acs_step and hk.sampling.acs_decisions is acs_decisions


def test_two_phase_plan_and_apply_equal_one_acs_step():
    g = torch.Generator().manual_seed(5)
    R, V, mask_id = 64, 40, 39
    x = torch.randint(0, V, (R,), generator=g)
    x[::3] = mask_id
    frozen = torch.zeros(R, dtype=torch.bool)
    frozen[:4] = True
    p = torch.rand(R, generator=g, dtype=torch.float64)
    row_ids = torch.arange(R) * 7 + 3
    logits = torch.randn(R, V, generator=g)
    expected = hk.sampling.acs_step(x, logits, p, 0.3, mask_id, 11, 2, row_ids, frozen)
    rows = hk.sampling.acs_plan(x, p, 0.3, mask_id, 11, 2, row_ids, frozen)
    assert rows.dtype == torch.int64 and not frozen[rows].any()
    assert torch.equal(rows, acs_decisions(x, p, 0.3, mask_id, 11, 2, row_ids, frozen).nonzero().squeeze(1))
    assert set((expected != x).nonzero().squeeze(1).tolist()) <= set(rows.tolist())
    y = x.clone()
    changed = hk.sampling.acs_apply(y, logits[rows], rows, mask_id, 11, 2, row_ids)
    assert torch.equal(y, expected)
    assert changed == int((expected != x).sum())
    with pytest.raises(ValueError, match="logits_rows must hold distinct rows"):
        hk.sampling.acs_apply(y, logits[:2], torch.tensor([1, 1]), mask_id, 11, 2, row_ids)
    with pytest.raises(TypeError, match="x must be an int64 tensor"):
        hk.sampling.acs_apply(y.int(), logits[rows], rows, mask_id, 11, 2, row_ids)
