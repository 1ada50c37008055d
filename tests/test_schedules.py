"""Hyperschedules against the paper's definitions (§3.1) and the official implementation's schedules
(docs/official-code.md §1), replayed here from their description."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import hdlm_kernels as hk
from hdlm_kernels import schedules


# ---- the official MetaSchedule, written from docs/official-code.md §1 -------------------------------------------
class OfficialMetaSchedule:
    """Periodic `steps` after `bootstrap_steps`; call s returns (relevant levels, num_settled)."""

    def __init__(self, steps, bootstrap_steps, bootstrap_shifts):
        self.steps, self.bootstrap_steps, self.bootstrap_shifts = steps, bootstrap_steps, bootstrap_shifts
        self.worthless = max(max(s) for s in list(steps) + list(bootstrap_steps)) + 1
        self.shifts = [0]  # prefix sums of the leading zeros of each periodic step
        for step in steps:
            leading_zeros = next((k for k, v in enumerate(step) if v != 0), len(step))
            self.shifts.append(self.shifts[-1] + leading_zeros)

    def __call__(self, s):
        B, P = len(self.bootstrap_steps), len(self.steps)
        if s == 0:
            return (), 0
        if s <= B:
            return tuple(self.bootstrap_steps[s - 1]), self.bootstrap_shifts[s - 1]
        phase, cycle = (s - 1 - B) % P, (s - 1 - B) // P
        settled = self.bootstrap_shifts[-1] + self.shifts[phase] + self.shifts[-1] * cycle
        return tuple(self.steps[phase]), settled

    def full(self, s, length):
        relevant, settled = self(s)
        vec = ((0,) * settled + relevant + (self.worthless,) * length)[:length]
        return vec, settled

    def num_calls(self, length):
        # Official max_step - 1: the first call whose full vector is all zero.
        s = 1
        while any(self.full(s, length)[0]):
            s += 1
        return s


def official_block(width, tau):
    steps = [[0] * width] + [[k] * width for k in range(tau - 1, 0, -1)]
    boot = [[k] * width for k in range(tau - 1, 0, -1)]
    return OfficialMetaSchedule(steps, boot, [0] * tau)


def official_slide(width, tau):
    main = tuple(round(i * (tau - 1) / (width - 1)) for i in range(width))
    boot = [main[-k:] for k in range(1, width)]
    return OfficialMetaSchedule([main], boot, [0] * width)


def paper_levels(official, s, length):
    """Paper convention of official call s: active level k -> k + 1, settled -> 0, worthless stays."""
    vec, settled = official.full(s, length)
    return [0 if i < settled else (v if v == official.worthless else v + 1) for i, v in enumerate(vec)]


def assert_matches_official(sched, official):
    T = official.num_calls(sched.length)
    assert sched.num_steps == T
    for t in range(T):
        assert sched.levels(t).tolist() == paper_levels(official, t + 1, sched.length), f"t={t}"
    assert sched.levels(T).tolist() == [0] * sched.length


# ---- the verified official examples (docs/official-code.md §1) ------------------------------------------------
def test_block_reproduces_official_example():
    sched = hk.schedules.block(12, 4, 4)
    # Official calls s (levels of the fed state; a level-0 active block is "denoise now").
    official_rows = {
        1: ((3, 3, 3, 3) + (4,) * 8, 0), 2: ((2, 2, 2, 2) + (4,) * 8, 0), 4: ((0,) * 4 + (4,) * 8, 0),
        5: ((0,) * 4 + (3,) * 4 + (4,) * 4, 4), 8: ((0,) * 8 + (4,) * 4, 4), 9: ((0,) * 8 + (3,) * 4, 8),
        12: ((0,) * 12, 8),
    }
    assert sched.num_steps == 12  # max_step(12) = 13 in the official code
    for s, (vec, settled) in official_rows.items():
        expected = [0 if i < settled else (v if v == 4 else v + 1) for i, v in enumerate(vec)]
        assert sched.levels(s - 1).tolist() == expected
    assert_matches_official(sched, official_block(4, 4))


def test_slide_reproduces_official_example():
    sched = hk.schedules.slide(12, 4, 4)
    official_rows = {1: ((3,) + (4,) * 11, 0), 2: ((2, 3) + (4,) * 10, 0), 3: ((1, 2, 3) + (4,) * 9, 0),
                     4: ((0, 1, 2, 3) + (4,) * 8, 0), 5: ((0, 0, 1, 2, 3) + (4,) * 7, 1),
                     15: ((0,) * 12, 11)}
    assert sched.num_steps == 15 == 12 + 4 - 1  # the ω-1 warm-up steps of Fig. 3
    for s, (vec, settled) in official_rows.items():
        expected = [0 if i < settled else (v if v == 4 else v + 1) for i, v in enumerate(vec)]
        assert sched.levels(s - 1).tolist() == expected
    assert_matches_official(sched, official_slide(4, 4))


@pytest.mark.parametrize("width,tau,window", [(4, 4, (0, 1, 2, 3)), (4, 8, (0, 2, 5, 7)), (4, 2, (0, 0, 1, 1))])
def test_slide_window_levels_match_official_main_step(width, tau, window):
    sched = hk.schedules.slide(40, width, tau)
    t = sched.num_steps // 2  # well past the warm-up: the window holds main_step + 1
    a, b = sched.split(t)
    levels = sched.levels(t)
    start = int((levels == 0).sum())
    assert levels[start:start + width].tolist() == [v + 1 for v in window]


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 40), width=st.integers(1, 12), tau=st.integers(1, 12))
def test_block_equals_official_for_random_parameters(length, width, tau):
    width = min(width, length)
    assert_matches_official(hk.schedules.block(length, width, tau), official_block(width, tau))


@settings(max_examples=60, deadline=None)
@given(length=st.integers(1, 40), width=st.integers(2, 10), tau=st.integers(1, 16))
def test_slide_equals_official_for_random_parameters(length, width, tau):
    width = min(width, length)
    if width == 1:
        return
    official = official_slide(width, tau)
    sched = hk.schedules.slide(length, width, tau)
    assert_matches_official(sched, official)
    leading_zeros = official.shifts[-1]
    assert sched.rate == leading_zeros


# ---- the paper's definitions ----------------------------------------------------------------
def brute_force_width_and_splits(table, top):
    T, d = table.shape[0] - 1, table.shape[1]
    width, splits = 0, []
    for t in range(T):
        kinds = []
        for i in range(d):
            pair = (int(table[t, i]), int(table[t + 1, i]))
            kinds.append("s" if pair == (0, 0) else "w" if pair == (top, top) else "a")
        width = max(width, kinds.count("a"))
        splits.append((kinds.count("s"), d - kinds.count("w")))
    return width, splits


def all_schedules():
    yield hk.schedules.flat(10, 7)
    yield hk.schedules.quench(9)
    yield hk.schedules.block(13, 4, 3)
    yield hk.schedules.block(13, 4, 9)
    yield hk.schedules.block(8, 8, 2)
    yield hk.schedules.slide(13, 4)
    yield hk.schedules.slide(13, 5, 2)
    yield hk.schedules.slide(13, 3, 11)


@pytest.mark.parametrize("sched", list(all_schedules()), ids=repr)
def test_schedule_definition_holds(sched):
    table = sched.table
    top = sched.num_levels
    assert table.shape == (sched.num_steps + 1, sched.length) and table.dtype == torch.long
    assert (table[0] == top).all() and (table[-1] == 0).all()
    assert (table[1:] <= table[:-1]).all() and table.min() >= 0
    width, splits = brute_force_width_and_splits(table, top)
    assert sched.width == width
    assert sched.is_monotone
    for t, (a, b) in enumerate(splits):
        assert sched.split(t) == (a, b)
        # contiguity: settled prefix, worthless suffix
        now, nxt = table[t], table[t + 1]
        assert ((now[:a] == 0) & (nxt[:a] == 0)).all()
        assert ((now[b:] == top) & (nxt[b:] == top)).all()


def test_flat_and_quench_are_the_paper_schedules():
    sched = hk.schedules.flat(6, 5)
    for t in range(6):
        assert sched.levels(t).tolist() == [5 - t] * 6
    assert (sched.width, sched.num_levels, sched.num_steps) == (6, 5, 5)
    q = hk.schedules.quench(7)
    for t in range(8):
        assert q.levels(t).tolist() == [1 if i >= t else 0 for i in range(7)]
    assert (q.width, q.num_levels, q.num_steps, q.rate) == (1, 1, 7, 1.0)


@pytest.mark.parametrize("width,levels,rate", [(4, 4, 1.0), (4, 2, 2.0), (4, 8, 0.5), (6, 1, 6.0)])
def test_block_rate_regimes(width, levels, rate):
    length = 24
    sched = hk.schedules.block(length, width, levels)
    assert sched.rate == rate
    assert sched.num_steps == levels * math.ceil(length / width)
    assert sched.width == width
    # every position passes through each level exactly as its block is processed
    for i in range(length):
        assert sorted(set(sched.table[:, i].tolist())) == list(range(levels + 1))


def test_slide_quick_draft_advances_several_positions_per_step():
    sched = hk.schedules.slide(64, 8, 3)  # main_step = round(j·2/7) has 2 leading zeros
    assert sched.rate == 2.0
    a_values = [sched.split(t)[0] for t in range(sched.num_steps)]
    late = a_values[10:-4]
    assert all(b - a == 2 for a, b in zip(late, late[1:]))


def test_noise_time_and_levels_accessors():
    sched = hk.schedules.block(8, 4, 4)
    levels = sched.levels(2)
    assert levels.tolist() == [2] * 4 + [4] * 4
    levels[0] = 99  # a copy: the table is untouched
    assert sched.levels(2)[0] == 2
    assert torch.allclose(sched.noise_time(sched.levels(2)), torch.tensor([0.5] * 4 + [1.0] * 4))
    assert "block" in repr(sched) and "t=0" in sched.render()


def test_from_table_accepts_valid_and_rejects_invalid_tables():
    table = torch.tensor([[2, 2, 2], [1, 2, 2], [0, 1, 2], [0, 0, 0]])
    sched = hk.schedules.from_table(table)
    assert (sched.num_steps, sched.num_levels, sched.length, sched.kind) == (3, 2, 3, "custom")
    assert sched.split(1) == (0, 2)  # position 2 stays at (2, 2): worthless
    with pytest.raises(ValueError, match="non-increasing in t.*position 1"):
        hk.schedules.from_table(torch.tensor([[2, 2], [1, 1], [1, 2], [0, 0]]))
    with pytest.raises(ValueError, match="last row must be all zeros"):
        hk.schedules.from_table(torch.tensor([[2, 2], [1, 1]]))
    with pytest.raises(ValueError, match="first row"):
        hk.schedules.from_table(torch.tensor([[2, 1], [0, 0]]))
    with pytest.raises(ValueError, match=r"levels must lie in \[0, 2\]"):
        hk.schedules.from_table(torch.tensor([[2, 2], [3, 1], [0, 0]]))
    with pytest.raises(TypeError, match="integers"):
        hk.schedules.from_table(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"shape \[T\+1, d\]"):
        hk.schedules.from_table(torch.zeros(3, dtype=torch.long))


def test_non_monotone_custom_table_cannot_be_split():
    # Position 1 finishes before position 0: the settled positions are not a prefix.
    table = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 0]])
    sched = hk.schedules.from_table(table)
    assert not sched.is_monotone
    with pytest.raises(ValueError, match="not monotone left to right"):
        sched.split(1)


@pytest.mark.parametrize("call,match", [
    (lambda: hk.schedules.block(10, 0, 2), r"width must be in \[1, 10\], got 0"),
    (lambda: hk.schedules.block(10, 11, 2), r"width must be in \[1, 10\], got 11"),
    (lambda: hk.schedules.block(10, 2, 0), r"levels must be >= 1, got 0"),
    (lambda: hk.schedules.slide(10, -1), r"width must be in \[1, 10\], got -1"),
    (lambda: hk.schedules.slide(10, 3, 0), r"levels must be >= 1, got 0"),
    (lambda: hk.schedules.slide(10, 1, 4), r"width=1 needs levels=1"),
    (lambda: hk.schedules.flat(0, 3), r"length must be >= 1, got 0"),
    (lambda: hk.schedules.flat(4, 0), r"num_steps must be >= 1, got 0"),
    (lambda: hk.schedules.quench(0), r"length must be >= 1, got 0"),
    (lambda: hk.schedules.block(10, 2.0, 2), r"width must be an int"),
    (lambda: hk.schedules.block(8, 4, 4).levels(9), r"t must be in \[0, 8\], got 9"),
    (lambda: hk.schedules.block(8, 4, 4).split(8), r"t must be in \[0, 7\], got 8"),
    (lambda: hk.schedules.block(8, 4, 4).split(-1), r"t must be in \[0, 7\], got -1"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
