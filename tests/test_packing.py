"""Training interval packing (paper App. B.3, Figs 7-10): invariants, and equality of every noisy row
with the inference mask of the step its interval was drawn at."""

import itertools
from collections import Counter

import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.stats import chisquare

import hdlm_kernels as hk
from hdlm_kernels.packing import IGNORE_INDEX

BOS = 999


def make_tokens(batch, length, seed=0):
    # distinct values per position so that a token identifies its position
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 9, (batch, length), generator=g) * 100 + torch.arange(length)


def cell_contents(p, b):
    """(position, level, token) of what each packed cell holds, for sample b."""
    return list(zip(p.position_ids[b].tolist(), p.levels[b].tolist(), p.input_ids[b].tolist()))


def inference_view(sched, t, config, context, window, tokens, b):
    """For each query cell of the inference step t: the set of (position, level, token) it attends."""
    mask = hk.masks.inference(sched, t, config, context, window)
    dense = mask.to_dense()[0]
    levels = sched.levels(t)
    shifted = config == "shifted"
    contents = []
    for c in range(mask.key_length):
        i = c - 1 if shifted else c  # token held by the cell
        token = BOS if i < 0 else int(tokens[b, i])
        contents.append((c, 0 if i < 0 else int(levels[i]), token))
    return {q: {contents[k] for k in range(mask.key_length) if dense[q, k]} for q in range(mask.num_rows)}


def check_packed_batch(p, sched, config, context, window, tokens):
    shifted = config == "shifted"
    B, d = tokens.shape
    P = p.packed_length
    dense = p.mask.expand(B).to_dense()
    for b in range(B):
        contents = cell_contents(p, b)
        # clean copy: the sequence (shifted by one after the conditioning token for SHIFTED), level 0
        expected_clean = [BOS] + tokens[b, :-1].tolist() if shifted else tokens[b].tolist()
        assert p.input_ids[b, :d].tolist() == expected_clean
        assert p.target_ids[b, :d].tolist() == tokens[b].tolist()
        assert (p.levels[b, :d] == 0).all() and p.settled_positions[b, :d].all()
        assert not p.settled_positions[b, d:].any() and not p.loss_positions[b, :d].any()
        cell = d
        seen_targets = Counter()
        for m in range(p.steps.shape[1]):
            t = int(p.steps[b, m])
            if t < 0:
                assert p.intervals[b, m].tolist() == [-1, -1]
                continue
            a, e = p.intervals[b, m].tolist()
            assert sched.split(t) == (a, e)               # the interval is the active window of step t
            size = e - a + (1 if shifted else 0)
            cells = range(cell, cell + size)
            view = inference_view(sched, t, config, context, window, tokens, b)
            for j, c in enumerate(cells):
                # the row sees exactly what the inference mask of step t shows its cell
                attended = {contents[k] for k in range(P) if dense[b, c, k]}
                inference_cell = a + j  # ALIGNED and SHIFTED window cells start at a
                assert attended == view[inference_cell], (b, m, j)
                # no row sees another interval, nor the clean copy of its own interval
                keys = dense[b, c].nonzero().squeeze(1).tolist()
                assert all(k < a or k in cells for k in keys)
                # targets: the token the cell's output predicts
                if p.loss_positions[b, c]:
                    assert p.target_ids[b, c] == tokens[b, a + j]
                    assert p.target_levels[b, c] == sched.levels(t)[a + j]
                    seen_targets[a + j] += 1
                else:
                    assert shifted and j == size - 1 and p.target_ids[b, c] == IGNORE_INDEX
            if shifted:  # SHIFTED targets are the next tokens: the input of the next cell
                for c in cells[:-1]:
                    assert p.target_ids[b, c] == p.input_ids[b, c + 1]
            cell += size
        # everything after the last interval is padding, invisible and without loss
        assert not p.loss_positions[b, cell:].any()
        assert (p.target_ids[b, cell:] == IGNORE_INDEX).all()
        assert not dense[b, cell:].any() and not dense[b, :, cell:].any()
        if sched.block_size is not None:
            assert seen_targets == Counter(range(d)), "every position is a noisy target exactly once"
            assert cell == P


CASES = [(hk.schedules.block(12, 4, 4), "block_causal"), (hk.schedules.block(13, 4, 3), "causal"),
         (hk.schedules.block(10, 3, 5), "block_causal"), (hk.schedules.flat(7, 4), "full"),
         (hk.schedules.quench(6), "causal"), (hk.schedules.slide(12, 4, 4), "causal"),
         (hk.schedules.slide(15, 5, 2), "causal")]


@pytest.mark.parametrize("sched,context", CASES, ids=lambda v: repr(v) if not isinstance(v, str) else v)
@pytest.mark.parametrize("config", ["aligned", "shifted"])
@pytest.mark.parametrize("window", ["full", "causal"])
def test_packed_rows_equal_inference_rows(sched, context, config, window):
    tokens = make_tokens(3, sched.length)
    g = torch.Generator().manual_seed(1)
    p = hk.packing.pack(tokens, sched, config, context, window, generator=g, bos_id=BOS)
    check_packed_batch(p, sched, config, context, window, tokens)


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 24), width=st.integers(1, 8), levels=st.integers(1, 6),
       kind=st.sampled_from(["block", "slide"]), config=st.sampled_from(["aligned", "shifted"]),
       context=st.sampled_from(["causal", "block_causal", "full"]), window=st.sampled_from(["full", "causal"]),
       seed=st.integers(0, 1000))
def test_packing_properties_for_random_schedules(length, width, levels, kind, config, context, window, seed):
    width = min(width, length)
    if kind == "slide" and width == 1:
        levels = 1
    sched = getattr(hk.schedules, kind)(length, width, levels)
    tokens = make_tokens(2, length, seed)
    p = hk.packing.pack(tokens, sched, config, context, window, generator=torch.Generator().manual_seed(seed),
                        bos_id=BOS)
    check_packed_batch(p, sched, config, context, window, tokens)


def test_packed_lengths_and_shared_masks():
    tokens = make_tokens(4, 16)
    block = hk.packing.pack(tokens, hk.schedules.block(16, 4, 8), generator=torch.Generator().manual_seed(0))
    assert block.packed_length == 32 and block.mask.batch == 1  # the layout is shared, levels differ
    assert not torch.equal(block.levels[0], block.levels[1])
    shifted = hk.packing.pack(tokens, hk.schedules.block(16, 4, 8), "shifted", bos_id=BOS)
    assert shifted.packed_length == 32 + 4
    slide = hk.packing.pack(tokens, hk.schedules.slide(16, 4), generator=torch.Generator().manual_seed(0))
    assert slide.packed_length == 32 and slide.mask.batch == 4  # intervals differ per sample
    for p in (block, shifted, slide):
        assert all(t.shape == (4, p.packed_length) for t in (p.input_ids, p.position_ids, p.levels, p.target_ids,
                                                             p.target_levels, p.loss_positions))
        assert p.clean_length == 16


def test_block_packing_draws_steps_uniformly_over_the_active_steps():
    sched = hk.schedules.block(8, 4, 5)  # each block active during 5 steps
    tokens = make_tokens(2000, 8)
    p = hk.packing.pack(tokens, sched, generator=torch.Generator().manual_seed(123))
    for k in range(2):
        counts = torch.bincount(p.steps[:, k] - 5 * k, minlength=5)
        assert counts.sum() == 2000 and counts.numel() == 5
        assert chisquare(counts.numpy()).pvalue > 1e-4


def test_packing_is_reproducible_with_a_generator_and_varies_without():
    tokens = make_tokens(3, 20)
    sched = hk.schedules.slide(20, 4)
    one = hk.packing.pack(tokens, sched, generator=torch.Generator().manual_seed(7))
    two = hk.packing.pack(tokens, sched, generator=torch.Generator().manual_seed(7))
    other = hk.packing.pack(tokens, sched, generator=torch.Generator().manual_seed(8))
    assert torch.equal(one.input_ids, two.input_ids) and torch.equal(one.steps, two.steps)
    assert not torch.equal(one.steps, other.steps)


def test_packing_density_is_about_a_quarter_of_dense_attention():
    # τ_Block with N = d/ω = 8 blocks: d²/2·(1+1/N) pairs per half, out of (2d)².
    d, w = 256, 32
    p = hk.packing.pack(make_tokens(1, d), hk.schedules.block(d, w, w))
    n = d // w
    expected = 2 * (d * d / 2 * (1 + 1 / n)) / (2 * d) ** 2
    assert abs(float(p.mask.density()) - expected) < 1e-9


def test_packing_rejects_bad_input():
    sched = hk.schedules.block(8, 4, 4)
    tokens = make_tokens(2, 8)
    with pytest.raises(ValueError, match=r"shape \[B, d\] with B >= 1 and d = sched.length = 8, got \(2, 7\)"):
        hk.packing.pack(tokens[:, :7], sched)
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        hk.packing.pack(tokens.float(), sched)
    with pytest.raises(ValueError, match="config='shifted' needs bos_id"):
        hk.packing.pack(tokens, sched, "shifted")
    with pytest.raises(ValueError, match="unknown config 'left'"):
        hk.packing.pack(tokens, sched, "left")
    with pytest.raises(ValueError, match="unknown context 'none'"):
        hk.packing.pack(tokens, sched, context="none")
    with pytest.raises(ValueError, match="unknown window 'x'"):
        hk.packing.pack(tokens, sched, window="x")
    with pytest.raises(TypeError, match="sched must be a Hyperschedule"):
        hk.packing.pack(tokens, "block")
    non_monotone = hk.schedules.from_table(torch.tensor([[1, 1], [1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="not monotone left to right"):
        hk.packing.pack(make_tokens(1, 2), non_monotone)
