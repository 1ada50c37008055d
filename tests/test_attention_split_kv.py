"""Split-KV attention with the merge fused into the forward launch (docs/attention.md, "Split-KV
(flash-decoding)"): the last split of each (query tile, batch·head) to arrive merges every split's
partial. Checked against the reference twin (attention_ref / attention_lse_ref) for many split counts,
splits and rows without keys, per-sequence masks and a row count that is not a multiple of the tile;
against the log-sum-exp of each split's own partial; and the arrival counters' reuse."""

import pytest
import torch

from hdlm_kernels.attention.reference import attention_lse_ref, attention_ref
from hdlm_kernels.masks import IntervalMask

ta = pytest.importorskip("hdlm_kernels.attention.triton_attention")

pytestmark = pytest.mark.usefixtures("single_thread")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, Q, H, D, K = 2, 40, 1, 32, 150  # 40 rows: a full and a partial query tile in the interpreter's 32 x 32


def problem(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, n, H, D, generator=g).to(DEVICE, dtype) for n in (Q, K, K))
    rows = torch.arange(Q)
    # Sequence 0: a causal prefix growing with the row; rows 0 and 1 attend nothing, so in their query
    # tile the splits past the first key tiles see no key. Sequence 1: a short prefix and a sliding window
    # near the end of the keys, so most splits of its tiles have no key for most rows.
    prefix_end = torch.stack([torch.where(rows < 2, 0, 20 + 3 * rows), torch.full_like(rows, 5)])
    window_start = torch.stack([torch.zeros_like(rows), 90 + rows])
    window_end = torch.stack([torch.zeros_like(rows), 100 + rows])
    mask = IntervalMask(prefix_end.int(), window_start.int(), window_end.int(), K).to(DEVICE)
    return q, k, v, mask


# float16 at three of the counts: the interpreter's programs are slow.
@pytest.mark.parametrize("dtype,num_splits", [*((torch.float32, n) for n in (1, 2, 3, 7, 16)),
                                              *((torch.float16, n) for n in (1, 3, 16))], ids=str)
def test_fused_merge_computes_the_reference(dtype, num_splits):
    q, k, v, mask = problem(dtype, seed=num_splits)
    out, lse = ta.attention_split_kv_triton(q, k, v, mask, num_splits=num_splits)
    assert out.shape == (B, Q, H, D) and out.dtype == dtype and lse.shape == (B, H, Q)
    assert torch.isfinite(out).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out, attention_ref(q, k, v, mask), rtol=1e-5, atol=1e-5)
    else:  # the tolerance rule (docs/testing.md): within twice the float16 reference's error, plus 1e-4
        truth = attention_ref(q.double(), k.double(), v.double(), mask)
        reference_error = (attention_ref(q, k, v, mask).double() - truth).abs().max().item()
        assert (out.double() - truth).abs().max().item() <= 2 * reference_error + 1e-4
    torch.testing.assert_close(lse, attention_lse_ref(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert torch.isneginf(lse[0, :, :2]).all() and (out[0, :2] == 0).all()  # rows without any key


def split_partials(q, k, v, mask, num_splits, block_m, block_n):
    """Each split's (out, lse) in float64 from the reference, over the key tiles split ``s`` takes:
    every num_splits-th tile of each of its query tile's two lists, starting at ``s``."""
    tiles = mask.tiles(block_m, block_n)
    dense = mask.to_dense().expand(B, Q, K)
    outs, lses = [], []
    for s in range(num_splits):
        taken = torch.zeros(B, Q, K, dtype=torch.bool)
        for b in range(B):
            for t in range(tiles.num_q_tiles):
                for count, index in ((tiles.full_kv_count, tiles.full_kv_index), (tiles.kv_count, tiles.kv_index)):
                    for j in range(s, int(count[b, t]), num_splits):
                        start = int(index[b, t, j]) * block_n
                        taken[b, t * block_m:(t + 1) * block_m, start:start + block_n] = True
        allowed = dense & taken
        scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * D ** -0.5
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        lse = torch.logsumexp(scores, -1)
        probs = torch.exp(scores - lse.where(torch.isfinite(lse), 0.0)[..., None])
        outs.append(torch.einsum("bhqk,bkhd->bqhd", probs, v.double()))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's 32 x 32 tiles define the split here")
def test_the_merge_is_the_log_sum_exp_of_the_splits_partials():
    """Out = Σ_s exp(lse_s - lse) out_s with lse = logsumexp_s lse_s, over the key tiles each split
    takes; a split without keys for a row (lse_s = -inf) weighs 0 and brings no NaN."""
    q, k, v, mask = problem(torch.float32, seed=5)
    num_splits = 3
    outs, lses = split_partials(q, k, v, mask, num_splits, 32, 32)
    assert torch.isneginf(lses).any() and not torch.isneginf(lses).all(0).all()  # some splits without keys
    total = torch.logsumexp(lses, 0)
    weight = torch.where(torch.isneginf(lses), 0.0, torch.exp(lses - total.where(torch.isfinite(total), 0.0)))
    want = (weight.permute(0, 1, 3, 2)[..., None] * outs).sum(0)
    out, lse = ta.attention_split_kv_triton(q, k, v, mask, num_splits=num_splits)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), total, rtol=1e-5, atol=1e-6)


def test_arrival_counters_are_restored_to_zero_and_reused():
    q, k, v, mask = problem(torch.float32, seed=9)
    first, first_lse = ta.attention_split_kv_triton(q, k, v, mask, num_splits=4)
    counters = ta._arrival_counters(q.device, 1)
    assert counters.dtype == torch.int32 and (counters == 0).all()
    again, again_lse = ta.attention_split_kv_triton(q, k, v, mask, num_splits=4)
    assert ta._arrival_counters(q.device, 1).data_ptr() == counters.data_ptr()  # no new buffer per call
    assert torch.equal(first, again) and torch.equal(first_lse, again_lse)
    # A launch with more (query tile, b·h) counters than the buffer holds gets a larger zeroed one.
    grown = ta._arrival_counters(q.device, counters.numel() + 1)
    assert grown.numel() > counters.numel() and (grown == 0).all()
    assert ta._arrival_counters(q.device, 1).data_ptr() == grown.data_ptr()
