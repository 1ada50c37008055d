"""The tensor-core CUDA decode kernel's tiling logic, tested on the CPU through its emulation
(tests/decode_cuda_emulation.py: same constants, block plan, skip rule, online softmax and merge) against
a float64 reference, on adversarial masks. The kernel itself runs in the `cuda`-marked tests of
tests/test_decode.py; the constants below are read from the CUDA source so the two cannot drift apart."""

import importlib.util
import math
import re
from pathlib import Path

import pytest
import torch

import hdlm_kernels as hk
from hdlm_kernels.masks import IntervalMask
from tests import decode_cuda_emulation as emu

pytestmark = pytest.mark.usefixtures("single_thread")

SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "decode_attention_cuda.cu"


def reference(q, k, v, prefix_end, window_start, window_end, scale):
    """float64 softmax over the allowed keys of each row (docs/conventions.md, masks); rows without keys
    are zeros."""
    B, S, H, D = q.shape
    c = torch.arange(k.shape[1])
    pe, ws, we = (t.long()[..., None] for t in (prefix_end, window_start, window_end))
    allowed = ((c < pe) | ((ws <= c) & (c < we))).expand(B, S, -1)
    scores = torch.einsum("bshd,blhd->bhsl", q.double(), k.double()) * scale
    probs = torch.softmax(scores.masked_fill(~allowed[:, None], -math.inf), -1).nan_to_num(0.0)
    return torch.einsum("bhsl,blhd->bshd", probs, v.double()), allowed


def random_qkv(B, S, L, H, D, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, H, D, generator=g).to(dtype) for n in (S, L, L)]


def adversarial_masks(bm, S, L, seed):
    """Every row kind: prefix and window (overlapping or not), window only, prefix only, no keys at all,
    empty windows (start == end, start > end), one-key windows, and values outside [0, L] (clamped)."""
    g = torch.Generator().manual_seed(seed)
    shape = (bm, S)
    prefix_end = torch.randint(-3, L + 4, shape, generator=g)
    window_start = torch.randint(-3, L + 4, shape, generator=g)
    window_end = window_start + torch.randint(-5, L + 1, shape, generator=g)
    kind = torch.randint(0, 7, shape, generator=g)
    prefix_end = torch.where((kind == 1) | (kind == 3) | (kind == 5), 0, prefix_end)   # no prefix
    window_end = torch.where((kind == 2) | (kind == 3), window_start, window_end)      # empty window
    window_end = torch.where(kind == 5, window_start + 1, window_end)                   # one key
    window_end = torch.where(kind == 6, window_start - 2, window_end)                   # start > end
    return [t.to(torch.int32) for t in (prefix_end, window_start, window_end)]


# -- the emulation is the kernel: constants read from the CUDA source -----------------------------------

def test_emulation_constants_are_the_kernels():
    source = SOURCE.read_text()
    tensor_core = source[source.index("namespace tensor_core {"):source.index("}  // namespace tensor_core")]
    assert re.search(rf"constexpr int kWarps = {emu.WARPS};", tensor_core)
    assert re.search(rf"constexpr int kGroupRows = {emu.GROUP_ROWS};", tensor_core)
    assert re.search(rf"constexpr int kTileKeys = {emu.TILE_KEYS};", source)
    assert re.search(r"groups_per_warp\(int head_dim\) \{ return head_dim == 64 \? (\d) : (\d); \}",
                     tensor_core).groups() == (str(emu.groups_per_warp(64)), str(emu.groups_per_warp(128)))
    assert re.search(rf"constexpr int kMinTilesPerSplit = {emu.MIN_TILES_PER_SPLIT};", source)
    assert re.search(rf"constexpr int kMaxSplits = {emu.MAX_SPLITS};", source)
    # The tile skip and the element mask are the same expressions.
    assert "key0 < prefix_end ||\n         (window_start < window_end && window_start < key0 + kTileKeys && " \
           "key0 < window_end)" in source
    assert "return key < prefix_end || (window_start <= key && key < window_end);" in source
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in tensor_core
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in tensor_core


def test_the_sm90_gate_knows_the_kernels_launch():
    """scripts/sm90_check.py computes the tensor-core kernel's occupancy from its block size and dynamic
    shared memory (stages(D) K and V tiles of 32 keys x (D + 8) 16-bit elements), read here from the source."""
    spec = importlib.util.spec_from_file_location("sm90_check", SOURCE.parent.parent / "scripts" / "sm90_check.py")
    sm90_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sm90_check)

    tensor_core = SOURCE.read_text()
    stages = re.search(r"stages\(int head_dim\) \{ return head_dim == 64 \? (\d+) : (\d+); \}", tensor_core).groups()
    for (source, kernel), size in sm90_check.CUDA_DYNAMIC_SMEM.items():
        head_dim = int(re.search(r", (\d+)>", kernel).group(1))
        assert source == SOURCE.name
        assert size == 2 * int(stages[0 if head_dim == 64 else 1]) * emu.TILE_KEYS * (head_dim + 8) * 2
    record = {"kernel": SOURCE.name, "config": "hdlm::tensor_core::decode_attention_kernel<__half, 64>"}
    assert sm90_check._cuda_launch_constant(sm90_check.CUDA_THREADS, record, 0) == emu.WARPS * 32


# -- the tiling logic against the float64 reference (P kept in float64: only the tiling is tested) -----

@pytest.mark.parametrize("num_splits", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("shared_mask", [True, False], ids=["shared", "per_sequence"])
def test_adversarial_masks(shared_mask, head_dim, num_splits):
    B, S, L, H = 2, 37, 300, 1
    q, k, v = random_qkv(B, S, L, H, head_dim, seed=num_splits + head_dim)
    masks = adversarial_masks(1 if shared_mask else B, S, L, seed=num_splits * 3 + head_dim)
    truth, allowed = reference(q, k, v, *masks, 0.125)
    out = emu.emulate(q, k, v, *masks, 0.125, num_splits)
    torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)
    assert (out[~allowed.any(-1)] == 0).all()


@pytest.mark.parametrize("window", [1, 16, 17, 64, 256])
def test_generation_steps_over_per_sequence_cache_lengths(window):
    """decode() as the generation loop calls it: per-sequence cache lengths (one of them empty), the
    previous step's ω rows re-encoded block-causally, then the active window; the emulation over the
    written cache against the reference backend of decode()."""
    cache_lens = [0, 45, 203]
    B, H, D = len(cache_lens), 1, 64
    S = 2 * window
    max_len = max(cache_lens) + S + 5
    q, k_new, v_new = random_qkv(B, S, S, H, D, seed=window)
    k_cache, v_cache = random_qkv(B, 1, max_len, H, D, seed=window + 2)[1:]
    prefix_end, window_start, window_end = [], [], []
    for cached in cache_lens:
        prefix_end.append([cached + window] * window + [cached + window] * window)  # block-causal re-encode
        window_start.append([0] * window + [cached + window] * window)
        window_end.append([0] * window + [cached + S] * window)
    masks = [torch.tensor(t, dtype=torch.int32) for t in (prefix_end, window_start, window_end)]
    mask = IntervalMask(*masks, max_len)
    with torch.no_grad():
        expected = hk.attention.decode(q.double(), k_cache.double(), v_cache.double(),
                                       torch.tensor(cache_lens), k_new.double(), v_new.double(), mask,
                                       backend="reference")
    # The cache as the kernel reads it: written rows at [cache_len, cache_len + S).
    for b, cached in enumerate(cache_lens):
        k_cache[b, cached:cached + S], v_cache[b, cached:cached + S] = k_new[b], v_new[b]
    for num_splits in (1, 3):
        out = emu.emulate(q, k_cache, v_cache, *masks, D ** -0.5, num_splits)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", [-0.3, 0.0, 2.0])
def test_negative_zero_and_large_scales(scale):
    q, k, v = random_qkv(1, 20, 150, 1, 64, seed=7)
    masks = adversarial_masks(1, 20, 150, seed=7)
    truth, _ = reference(q, k, v, *masks, scale)
    for num_splits in (1, 4):
        torch.testing.assert_close(emu.emulate(q, k, v, *masks, scale, num_splits), truth, rtol=1e-10, atol=1e-10)


def test_one_key_returns_its_value_exactly():
    """A row with one key: its probability is 2^0 = 1 exactly, so even with P rounded to bfloat16 the row
    is the key's value (the property the GPU test checks bit for bit)."""
    q, k, v = random_qkv(1, 6, 200, 1, 128, seed=11)
    key_of_row = torch.tensor([[0, 5, 31, 32, 150, 199]], dtype=torch.int32)
    zeros = torch.zeros_like(key_of_row)
    for num_splits in (1, 3):
        out = emu.emulate(q, k, v, zeros, key_of_row, key_of_row + 1, 0.3, num_splits,
                          probability_dtype=torch.bfloat16)
        assert torch.equal(out, v[:, key_of_row[0].long()].double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rounding_P_to_the_input_type_meets_the_tolerance_rule(dtype):
    """With P rounded to the input type before P·V (what the mma consumes), the error against the float64
    truth stays within test_decode.py's rule: twice the same dense reference's error in that type plus
    the absolute term."""
    q, k, v = random_qkv(2, 40, 400, 1, 64, seed=21, dtype=dtype)
    masks = adversarial_masks(2, 40, 400, seed=21)
    truth, allowed = reference(q, k, v, *masks, 0.125)
    scores = torch.einsum("bshd,blhd->bhsl", q, k) * 0.125
    probs = torch.softmax(scores.masked_fill(~allowed[:, None], -math.inf), -1).nan_to_num(0.0)
    low = torch.einsum("bhsl,blhd->bshd", probs, v)
    absolute = {torch.float16: 1e-4, torch.bfloat16: 1e-3}[dtype]
    for num_splits in (1, 3):
        out = emu.emulate(q, k, v, *masks, 0.125, num_splits, probability_dtype=dtype).to(dtype)
        assert (out.double() - truth).abs().max() <= 2 * (low.double() - truth).abs().max() + absolute


# -- the plan: every allowed key visited once, skips never drop a key ----------------------------------

@pytest.mark.parametrize("head_dim", [64, 128])
def test_splits_partition_the_tiles_and_skips_drop_no_allowed_key(head_dim):
    S, L = 300, 700
    masks = adversarial_masks(1, S, L, seed=5)
    R = emu.rows_per_block(head_dim)
    for num_splits in (1, 2, 7, 40):
        for row_block in range(-(-S // R)):
            block = emu.block_rows(*masks, 0, row_block * R, R, L)
            plans = [emu.tile_plan(block, split, num_splits) for split in range(num_splits)]
            visited = [key0 for plan in plans for key0 in plan]
            assert len(visited) == len(set(visited)), "a tile is read by two splits"
            for r in range(R):
                pe, ws, we = block.prefix_end[r], block.window_start[r], block.window_end[r]
                keys = {c for c in range(L) if c < pe or ws <= c < we}
                assert keys <= {c for key0 in visited for c in range(key0, key0 + emu.TILE_KEYS)}
                for key0 in set(range(0, L, emu.TILE_KEYS)) - {key0 for key0 in visited
                                                               if emu.tile_intersects(key0, pe, ws, we)}:
                    assert not keys & set(range(key0, key0 + emu.TILE_KEYS)), "a skipped tile holds a key"


def test_emulation_skips_tiles_outside_a_groups_intervals():
    """Rows 0-15 see keys [0, 40), rows 16-31 only [600, 640) (tiles 576 and 608): each group skips the
    other's tiles, and the result is still the reference."""
    S, L = 32, 640
    prefix_end = torch.tensor([[40] * 16 + [0] * 16], dtype=torch.int32)
    window_start = torch.tensor([[0] * 16 + [600] * 16], dtype=torch.int32)
    window_end = torch.tensor([[0] * 16 + [640] * 16], dtype=torch.int32)
    q, k, v = random_qkv(1, S, L, 1, 64, seed=3)
    skipped = []
    out = emu.emulate(q, k, v, prefix_end, window_start, window_end, 0.125, 1, skipped=skipped)
    truth, _ = reference(q, k, v, prefix_end, window_start, window_end, 0.125)
    torch.testing.assert_close(out, truth, rtol=1e-12, atol=1e-12)
    assert {(key0, group) for *_, key0, group in skipped} == {(0, 1), (32, 1), (576, 0), (608, 0)}


# -- the static traffic model ---------------------------------------------------------------------------

@pytest.mark.parametrize("head_dim", [64, 128])
def test_one_read_per_tile_for_the_whole_step(head_dim):
    """Up to rows_per_block(D) rows, every K/V tile is loaded once per (sequence, head) whatever the split
    count, so the K/V bytes read equal the floor; 16-row groups read it once per group."""
    for window in (16, 64, emu.rows_per_block(head_dim)):
        masks = emu.dense_window_masks(8, 4096, window)
        for num_splits in (1, 4):
            model = emu.kv_traffic(*masks, 8, 12, head_dim, 4096 + window, num_splits)
            assert model["kv_bytes"] == model["floor_bytes"]
        groups = emu.kv_traffic(*masks, 8, 12, head_dim, 4096 + window, 1, block_size=emu.GROUP_ROWS)
        assert groups["kv_bytes"] == -(-window // emu.GROUP_ROWS) * groups["floor_bytes"]
