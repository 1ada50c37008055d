"""IntervalMask and the inference masks, each rule written from the paper as a brute-force check."""

import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.nn.attention.flex_attention import create_block_mask

import hdlm_kernels as hk
from hdlm_kernels.masks import IntervalMask


# ---- random masks ---------------------------------------------------------------------------
@st.composite
def interval_masks(draw, max_rows=40, max_keys=40):
    batch = draw(st.sampled_from([1, 2, 3]))
    rows = draw(st.integers(0, max_rows))
    keys = draw(st.integers(0, max_keys))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    prefix_end = torch.randint(0, keys + 1, (batch, rows), generator=g)
    window_start = torch.randint(0, keys + 1, (batch, rows), generator=g)
    window_end = torch.minimum(window_start + torch.randint(0, keys + 1, (batch, rows), generator=g),
                               torch.tensor(keys))
    # make some windows adjacent to / overlapping the prefix, and some rows empty
    if rows:
        pick = torch.rand(batch, rows, generator=g)
        window_start = torch.where(pick < 0.2, torch.minimum(prefix_end, window_start), window_start)
        prefix_end = torch.where(pick > 0.9, 0, prefix_end)
        window_end = torch.where(pick > 0.9, window_start, window_end)
    return IntervalMask(prefix_end, window_start, window_end, keys)


def dense_by_definition(mask):
    out = torch.zeros(mask.batch, mask.num_rows, mask.key_length, dtype=torch.bool)
    for b, q, k in itertools.product(range(mask.batch), range(mask.num_rows), range(mask.key_length)):
        out[b, q, k] = (k < mask.prefix_end[b, q]) or (mask.window_start[b, q] <= k < mask.window_end[b, q])
    return out


@settings(max_examples=40, deadline=None)
@given(mask=interval_masks(max_rows=12, max_keys=12))
def test_to_dense_and_num_pairs_follow_the_definition(mask):
    dense = mask.to_dense()
    assert dense.dtype == torch.bool and dense.shape == (mask.batch, mask.num_rows, mask.key_length)
    assert torch.equal(dense, dense_by_definition(mask))
    assert torch.equal(mask.num_pairs(), dense.sum((1, 2)))


def assert_block_mask_equals_create_block_mask(mask, block_m, block_n):
    ours = mask.to_block_mask((block_m, block_n))
    theirs = create_block_mask(mask.mask_mod, mask.batch if mask.batch > 1 else None, None, mask.num_rows,
                               mask.key_length, device="cpu", BLOCK_SIZE=(block_m, block_n))
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert ours.seq_lengths == (mask.num_rows, mask.key_length)
    # The transposed lists the dK/dV kernels walk are FlexAttention's too.
    tiles = mask.tiles(block_m, block_n)
    for mine, flex in (("q_count", "q_num_blocks"), ("q_index", "q_indices"),
                       ("full_q_count", "full_q_num_blocks"), ("full_q_index", "full_q_indices")):
        assert torch.equal(getattr(tiles, mine), getattr(theirs, flex)[:, 0]), mine


def assert_tiles_consistent_with_dense(mask, block_m, block_n):
    """Every attended element lies in a listed tile; full tiles are entirely attended; partial tiles
    are neither empty nor entirely attended (padding past the edge counts as blocked)."""
    tiles = mask.tiles(block_m, block_n)
    dense = mask.to_dense()
    Q, K = mask.num_rows, mask.key_length
    for b, qt in itertools.product(range(mask.batch), range(tiles.num_q_tiles)):
        partial = set(tiles.kv_index[b, qt, :tiles.kv_count[b, qt]].tolist())
        full = set(tiles.full_kv_index[b, qt, :tiles.full_kv_count[b, qt]].tolist())
        assert not partial & full
        rows = slice(qt * block_m, (qt + 1) * block_m)
        for kt in range(tiles.num_kv_tiles):
            tile = dense[b, rows, kt * block_n:(kt + 1) * block_n]
            complete = tile.shape == (block_m, block_n)
            if kt in full:
                assert complete and tile.all()
            elif kt in partial:
                assert tile.any() and not (complete and tile.all())
            else:
                assert not tile.any()
            partial_q = set(tiles.q_index[b, kt, :tiles.q_count[b, kt]].tolist())
            full_q = set(tiles.full_q_index[b, kt, :tiles.full_q_count[b, kt]].tolist())
            assert (qt in partial_q) == (kt in partial)
            assert (qt in full_q) == (kt in full)
    # the bounds enclose every row of their tile
    bounds = tiles.bounds
    for b, q in itertools.product(range(mask.batch), range(Q)):
        qt = q // block_m
        assert bounds.prefix_end_min[b, qt] <= mask.prefix_end[b, q] <= bounds.prefix_end_max[b, qt]
        if mask.window_start[b, q] < mask.window_end[b, q]:
            assert bounds.window_start_min[b, qt] <= mask.window_start[b, q] <= bounds.window_start_max[b, qt]
            assert bounds.window_end_min[b, qt] <= mask.window_end[b, q] <= bounds.window_end_max[b, qt]


@settings(max_examples=60, deadline=None)
@given(mask=interval_masks(), block_m=st.sampled_from([1, 2, 3, 4, 8, 16]), block_n=st.sampled_from([1, 2, 4, 5, 8, 16]))
def test_block_mask_equals_flex_create_block_mask(mask, block_m, block_n):
    if mask.num_rows == 0 or mask.key_length == 0:
        return
    assert_block_mask_equals_create_block_mask(mask, block_m, block_n)


@settings(max_examples=30, deadline=None)
@given(mask=interval_masks(max_rows=20, max_keys=20), block_m=st.sampled_from([1, 2, 4, 8]),
       block_n=st.sampled_from([1, 3, 4, 8]))
def test_tile_map_is_consistent_with_the_dense_mask(mask, block_m, block_n):
    if mask.num_rows == 0 or mask.key_length == 0:
        return
    assert_tiles_consistent_with_dense(mask, block_m, block_n)


def test_tile_bounds_of_a_tile_without_windows_are_empty():
    mask = IntervalMask(torch.tensor([[1, 2, 3, 4]]), torch.zeros(1, 4, dtype=torch.long),
                        torch.zeros(1, 4, dtype=torch.long), 6)
    bounds = mask.tiles(2, 2).bounds
    assert bounds.prefix_end_min.tolist() == [[1, 3]] and bounds.prefix_end_max.tolist() == [[2, 4]]
    assert bounds.window_start_min.tolist() == [[6, 6]] and bounds.window_end_max.tolist() == [[0, 0]]


# ---- inference masks from the paper's rules -------------------------------------------------------
def inference_rule(sched, t, config, context, window):
    """Dense mask written from paper §3.3 / App. B and docs/conventions.md (masks), one (row, key) pair at a time."""
    a, b = sched.split(t)
    block = sched.block_size or sched.width
    shifted = config == "shifted"
    cells = b + 1 if shifted else b
    dense = torch.zeros(cells, cells, dtype=torch.bool)
    for q, k in itertools.product(range(cells), range(cells)):
        if q < a:  # settled row: only settled keys, by the context rule
            allowed = k < a and {"causal": k <= q, "block_causal": k // block <= q // block, "full": True}[context]
        else:      # window row: the whole settled prefix and the window
            in_window = a <= k < cells
            if window == "causal":
                in_window = in_window and k <= q + (1 if shifted else 0)  # SHIFTED: next-position key
            allowed = k < a or in_window
        dense[q, k] = allowed
    return dense


SCHEDULES = [hk.schedules.block(12, 4, 4), hk.schedules.block(10, 4, 2), hk.schedules.slide(12, 4, 4),
             hk.schedules.slide(11, 4, 2), hk.schedules.flat(6, 3), hk.schedules.quench(5)]


@pytest.mark.parametrize("sched", SCHEDULES, ids=repr)
@pytest.mark.parametrize("config", ["aligned", "shifted"])
@pytest.mark.parametrize("context", ["causal", "block_causal", "full"])
@pytest.mark.parametrize("window", ["full", "causal"])
def test_inference_mask_follows_the_paper_rules(sched, config, context, window):
    for t in range(sched.num_steps):
        mask = hk.masks.inference(sched, t, config, context, window)
        a, b = sched.split(t)
        assert mask.batch == 1 and mask.key_length == mask.num_rows == (b + 1 if config == "shifted" else b)
        assert torch.equal(mask.to_dense()[0], inference_rule(sched, t, config, context, window)), t


@pytest.mark.parametrize("sched,context", [(hk.schedules.block(16, 4, 3), "block_causal"),
                                           (hk.schedules.block(16, 4, 3), "causal"),
                                           (hk.schedules.slide(16, 4, 4), "causal"),
                                           (hk.schedules.quench(8), "causal")])
@pytest.mark.parametrize("config", ["aligned", "shifted"])
def test_settled_rows_never_change_so_they_can_be_kv_cached(sched, context, config):
    """A cell's row, once settled, is the same at every later step: its keys/values are cacheable."""
    assert settled_rows_are_stable(sched, config, context)


def settled_rows_are_stable(sched, config, context):
    """Brute force: does every settled cell keep the same row at every later step?"""
    first_seen = {}
    for t in range(sched.num_steps):
        mask = hk.masks.inference(sched, t, config, context, "full")
        a, _ = sched.split(t)
        for q in range(a):
            row = (int(mask.prefix_end[0, q]), int(mask.window_start[0, q]), int(mask.window_end[0, q]))
            if first_seen.setdefault(q, row) != row:
                return False
    return True


@pytest.mark.parametrize("sched", SCHEDULES + [hk.schedules.slide(16, 4, 2), hk.schedules.block(16, 4, 3)], ids=repr)
@pytest.mark.parametrize("config", ["aligned", "shifted"])
@pytest.mark.parametrize("context", ["causal", "block_causal", "full"])
def test_kv_cacheable_agrees_with_brute_force(sched, config, context):
    stable = settled_rows_are_stable(sched, config, context)
    assert hk.masks.kv_cacheable(sched, config, context) == stable
    if context == "causal":
        assert stable
    if sched.kind == "slide" and context == "block_causal" and sched.length > sched.width:
        assert not stable


def test_inference_renders_like_the_official_pictures():
    # docs/official-code.md §3: ALIGNED, τ_Block w=4, 𝒯=4, L=12, official step 6.
    mask = hk.masks.inference(hk.schedules.block(12, 4, 4), 5, "aligned", "block_causal", "full")
    assert mask.render().splitlines() == [
        "  01234567",
        "0 ####....", "1 ####....", "2 ####....", "3 ####....",
        "4 ########", "5 ########", "6 ########", "7 ########",
    ]


def test_window_rows_are_the_kv_cached_call():
    sched = hk.schedules.block(12, 4, 4)
    mask = hk.masks.inference(sched, 5, "aligned", "block_causal", "full")
    window = mask.rows(slice(4, None))
    assert (window.num_rows, window.key_length) == (4, 8)
    assert torch.equal(window.to_dense(), mask.to_dense()[:, 4:])
    both = IntervalMask.cat([mask.rows(slice(0, 4)), window])
    assert torch.equal(both.to_dense(), mask.to_dense())


@pytest.mark.parametrize("block", [(4, 4), (2, 8), (8, 2)])
def test_inference_block_masks_equal_create_block_mask(block):
    for sched, config, context, window in itertools.product(SCHEDULES[:3], ["aligned", "shifted"],
                                                            ["causal", "block_causal"], ["full", "causal"]):
        for t in range(0, sched.num_steps, 3):
            mask = hk.masks.inference(sched, t, config, context, window)
            assert_block_mask_equals_create_block_mask(mask, *block)


# ---- API details and errors ----------------------------------------------------------------------
def test_expand_to_and_device():
    mask = hk.masks.inference(hk.schedules.block(8, 4, 2), 2)
    wide = mask.expand(3)
    assert wide.batch == 3 and torch.equal(wide.to_dense()[2], mask.to_dense()[0])
    assert mask.to("cpu").device.type == "cpu"
    assert mask.prefix_end.dtype == torch.int32
    with pytest.raises(ValueError, match="cannot expand a mask of batch 3 to 2"):
        wide.expand(2)
    assert "IntervalMask(batch=1" in repr(mask)


def test_check_shapes_names_what_does_not_match():
    mask = hk.masks.inference(hk.schedules.block(8, 4, 2), 2)  # 8 rows, 8 keys
    mask.check_shapes(8, 8, batch=5)
    with pytest.raises(ValueError, match="key_length 8, but the keys have length 7"):
        mask.check_shapes(8, 7)
    with pytest.raises(ValueError, match="8 query rows, but the queries have 6"):
        mask.check_shapes(6, 8)
    with pytest.raises(ValueError, match="the mask has batch 3, expected 1 or 2"):
        mask.expand(3).check_shapes(8, 8, batch=2)


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), 4), "prefix_end must be an integer tensor"),
    ((torch.zeros(3, dtype=torch.int32),) * 3 + (4,), r"must have shape \[B, Q\]"),
    ((torch.zeros(1, 3, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32),
      torch.zeros(1, 2, dtype=torch.int32), 4), "must have the same shape"),
    ((torch.tensor([[5]]), torch.tensor([[0]]), torch.tensor([[0]]), 4), r"prefix_end must lie in \[0, key_length=4\]"),
    ((torch.tensor([[1]]), torch.tensor([[3]]), torch.tensor([[2]]), 4), "window_start must be <= window_end"),
    ((torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([[0]]), -1), "key_length must be an int >= 0"),
])
def test_interval_mask_rejects_bad_input(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        IntervalMask(*args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(config="sideways"), "unknown config 'sideways'"),
    (dict(context="bidirectional"), "unknown context 'bidirectional'"),
    (dict(window="diagonal"), "unknown window 'diagonal'"),
    (dict(t=12), r"t must be in \[0, 11\], got 12"),
])
def test_inference_rejects_bad_arguments(kwargs, match):
    args = dict(sched=hk.schedules.block(12, 4, 4), t=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        hk.masks.inference(**args)
    with pytest.raises(TypeError, match="sched must be a Hyperschedule"):
        hk.masks.inference("block", 0)
