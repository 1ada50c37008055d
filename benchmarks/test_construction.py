"""Construction cost of the host-side structures every kernel call depends on, at the paper's
sequence length d = 1024 (schedules, inference masks, block masks and tile maps, packing).

A mask keeps its tile maps and FlexAttention ``BlockMask`` once built (every layer of a model call
reuses them), so a second ``mask.tiles(...)`` or ``mask.to_block_mask(...)`` on the same mask is a
dictionary look-up. The tile-map and block-mask rows therefore time the first call on a fresh copy of
the mask every round (``time_first_calls``), which is the cost a new mask pays once.

Every row is ours except ``block_mask_by_create_block_mask``, FlexAttention's own constructor on the
same mask (``create_block_mask`` evaluates ``mask_mod`` at every element), the baseline of its group.
"""

import pytest
import torch

import hdlm_kernels as hk
from benchmarks.timing import time_first_calls
from hdlm_kernels.masks import IntervalMask

D = 1024
FIRST_CALL_ROUNDS = 5


@pytest.mark.benchmark(group="schedule construction (d=1024)")
@pytest.mark.parametrize("kind,args", [("block", (D, 256, 256)), ("block", (D, 16, 16)), ("slide", (D, 256, None)),
                                       ("slide", (D, 256, 1024)), ("flat", (D, 1024)), ("quench", (D,))],
                         ids=["block w256", "block w16", "slide w256", "slide w256 L1024", "flat T1024", "quench"])
def test_schedule(benchmark, kind, args):
    sched = benchmark(getattr(hk.schedules, kind), *args)
    benchmark.extra_info.update(shape=f"d={D} T={sched.num_steps} w={sched.width}", dtype="int64",
                                side="ours")


@pytest.mark.benchmark(group="mask construction (d=1024, w=256)")
@pytest.mark.parametrize("config", ["aligned", "shifted"])
def test_inference_mask(benchmark, config):
    sched = hk.schedules.block(D, 256, 256)
    t = sched.num_steps - 100
    mask = benchmark(hk.masks.inference, sched, t, config, "block_causal", "full")
    benchmark.extra_info.update(shape=f"rows={mask.num_rows} keys={mask.key_length}", dtype="int32",
                                side="ours")


@pytest.fixture(scope="module")
def packed_mask():
    tokens = torch.randint(0, 50257, (8, D), generator=torch.Generator().manual_seed(0))
    return hk.packing.pack(tokens, hk.schedules.slide(D, 256), "aligned", "causal", "full",
                           generator=torch.Generator().manual_seed(0)).mask


def fresh_copy(mask: IntervalMask):
    """A maker of new masks with ``mask``'s intervals and nothing built on them yet."""
    def make() -> IntervalMask:
        return IntervalMask(mask.prefix_end.clone(), mask.window_start.clone(), mask.window_end.clone(),
                            mask.key_length)

    return make


@pytest.mark.benchmark(group="FlexAttention BlockMask construction (B=8, packed 2048)")
def test_block_mask_from_intervals(benchmark, packed_mask):
    time_first_calls(benchmark, lambda mask: mask.to_block_mask(128), fresh_copy(packed_mask),
                     FIRST_CALL_ROUNDS)
    benchmark.extra_info.update(shape=f"B=8 packed {packed_mask.num_rows}x{packed_mask.key_length} tiles 128",
                                dtype="int32", side="ours", first_call=True)


@pytest.mark.benchmark(group="FlexAttention BlockMask construction (B=8, packed 2048)")
def test_block_mask_by_create_block_mask(benchmark, packed_mask):
    from torch.nn.attention.flex_attention import create_block_mask

    benchmark.pedantic(create_block_mask, args=(packed_mask.mask_mod, 8, None, packed_mask.num_rows,
                                                packed_mask.key_length), kwargs=dict(device="cpu"),
                       rounds=3, iterations=1)
    benchmark.extra_info.update(shape=f"B=8 packed {packed_mask.num_rows}x{packed_mask.key_length} tiles 128",
                                dtype="bool (dense)", side="baseline", baseline=True)


@pytest.mark.benchmark(group="mask construction (d=1024, w=256)")
def test_tile_map(benchmark, packed_mask):
    time_first_calls(benchmark, lambda mask: mask.tiles(64, 64), fresh_copy(packed_mask), FIRST_CALL_ROUNDS)
    benchmark.extra_info.update(shape=f"B=8 packed {packed_mask.num_rows}x{packed_mask.key_length} tiles 64",
                                dtype="int32", side="ours", first_call=True)


@pytest.mark.benchmark(group="packing (B=8, d=1024)")
@pytest.mark.parametrize("kind,config", [("block", "aligned"), ("block", "shifted"), ("slide", "aligned"),
                                         ("slide", "shifted")])
def test_pack(benchmark, kind, config):
    sched = getattr(hk.schedules, kind)(D, 256, 256)
    tokens = torch.randint(0, 50257, (8, D), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    p = benchmark(hk.packing.pack, tokens, sched, config, "block_causal" if kind == "block" else "causal",
                  "full", g, bos_id=50256)
    benchmark.extra_info.update(shape=f"B=8 d={D} w=256 packed={p.packed_length}", dtype="int64", side="ours",
                                density=round(float(p.mask.density().mean()), 4))
