"""FlexAttention with ``to_block_mask()`` computes the same attention as SDPA with ``to_dense()``.

Eager FlexAttention on the CPU evaluates ``mask_mod`` on every element, so it checks the mask
semantics; compiled FlexAttention skips the tiles the ``BlockMask`` leaves out, so it also checks the
tile lists (test_masks.py checks those index for index against ``create_block_mask``)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import hdlm_kernels as hk


def sdpa_reference(q, k, v, mask):
    """SDPA over the dense mask; rows without keys are zero (flash-attn's convention)."""
    dense = mask.expand(q.shape[0]).to_dense()[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    return torch.where(dense.any(-1, keepdim=True), out, torch.zeros_like(out))


def constructor_masks():
    b = hk.schedules.block(24, 8, 3)
    s = hk.schedules.slide(20, 6)
    tokens = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(0))
    for sched, t in ((b, 4), (b, 8), (s, 9)):
        for config in ("aligned", "shifted"):
            yield f"inference-{sched.kind}-{config}-t{t}", hk.masks.inference(sched, t, config, "causal", "causal")
            yield (f"inference-{sched.kind}-{config}-t{t}-block",
                   hk.masks.inference(sched, t, config, "block_causal", "full"))
    for sched, toks in ((b, tokens), (s, tokens[:, :20])):
        for config in ("aligned", "shifted"):
            packed = hk.packing.pack(toks, sched, config, "causal", "full",
                                     generator=torch.Generator().manual_seed(1), bos_id=7)
            yield f"packed-{sched.kind}-{config}", packed.mask


@pytest.mark.parametrize("name,mask", list(constructor_masks()), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_flex_with_block_mask_equals_sdpa_with_dense_mask(name, mask, dtype):
    g = torch.Generator().manual_seed(0)
    B, H, D = 2, 3, 16
    q = torch.randn(B, H, mask.num_rows, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, H, mask.key_length, D, generator=g, dtype=dtype) for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=mask.to_block_mask(8))
    torch.testing.assert_close(out, sdpa_reference(q, k, v, mask))


@pytest.mark.slow
def test_compiled_flex_uses_the_tile_lists_and_matches_sdpa():
    sched = hk.schedules.block(192, 32, 8)
    tokens = torch.randint(0, 50, (2, 192), generator=torch.Generator().manual_seed(0))
    mask = hk.packing.pack(tokens, sched, "aligned", "block_causal", "full",
                           generator=torch.Generator().manual_seed(0)).mask
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, mask.num_rows, 32, generator=g) for _ in range(3))
    block_mask = mask.to_block_mask(64)
    assert block_mask.sparsity() > 30  # percent of tiles skipped
    compiled = torch.compile(flex_attention, dynamic=False)
    torch.testing.assert_close(compiled(q, k, v, block_mask=block_mask), sdpa_reference(q, k, v, mask))
