"""Attention over an interval-packed training mask (paper App. B.3): SDPA with the dense mask,
the official code's materialized einsum + masked_fill + softmax, and compiled FlexAttention with
``to_block_mask()`` (which skips the tiles the intervals leave out). Forward only.

Shapes: on a GPU the paper's (B=8, H=12, D=64, d=1024 -> packed 2048, bf16); on a CPU a small
default (B=2, H=4, D=64, d=256 -> packed 512, fp32) so that ``make bench`` finishes in minutes.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import hdlm_kernels as hk


@pytest.fixture(scope="module")
def problem(device):
    gpu = device.type == "cuda"
    B, H, D, d, w = (8, 12, 64, 1024, 256) if gpu else (2, 4, 64, 256, 64)
    dtype = torch.bfloat16 if gpu else torch.float32
    tokens = torch.randint(0, 50257, (B, d), generator=torch.Generator().manual_seed(0))
    mask = hk.packing.pack(tokens, hk.schedules.block(d, w, w), "aligned", "block_causal", "full").mask.to(device)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, mask.num_rows, D, generator=g, device=device, dtype=dtype) for _ in range(3))
    info = dict(shape=f"B={B} H={H} D={D} d={d} w={w} packed={mask.num_rows}", dtype=str(dtype).replace("torch.", ""),
                density=round(float(mask.density()), 4))
    return q, k, v, mask, info


def synchronized(fn, device):
    if device.type != "cuda":
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.benchmark(group="packed-mask attention forward")
def test_sdpa_dense_mask(benchmark, problem, device):
    q, k, v, mask, info = problem
    dense = mask.to_dense()[:, None]
    run = synchronized(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), device)
    benchmark.pedantic(run, rounds=10, warmup_rounds=1)
    benchmark.extra_info.update(info, baseline=True)


@pytest.mark.benchmark(group="packed-mask attention forward")
def test_materialized_scores_official_style(benchmark, problem, device):
    q, k, v, mask, info = problem
    blocked = ~mask.to_dense()[:, None]

    def official():  # notes/official-implementation.md §4.2: einsum, masked_fill(-inf), softmax, einsum
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(blocked, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.einsum("bhqk,bhkd->bhqd", probs, v)

    benchmark.pedantic(synchronized(official, device), rounds=10, warmup_rounds=1)
    benchmark.extra_info.update(info)


@pytest.mark.benchmark(group="packed-mask attention forward")
def test_compiled_flex_block_mask(benchmark, problem, device):
    q, k, v, mask, info = problem
    block_mask = mask.to_block_mask(128)
    compiled = torch.compile(flex_attention, dynamic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(q, k, v, block_mask=block_mask)  # compile outside the timing
    run = synchronized(lambda: compiled(q, k, v, block_mask=block_mask), device)
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    benchmark.extra_info.update(info, tiles_skipped_pct=round(float(block_mask.sparsity()), 1))
