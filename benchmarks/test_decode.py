"""KV-cached decode attention: one generation step of one layer (docs/attention.md, "Decode").

A step's ``S = ω`` window rows attend densely over the settled prefix of ``P`` cached cells plus the
window itself. Every contender runs on the same problem (same queries, same cache contents, same
``P`` and ``ω``), so one report group compares them side by side:

* ``ours_triton``: ``hk.attention.decode(..., backend="triton")``, our split-KV Triton kernel
  (layout ``[B, S, H, D]``; writes the window's keys/values into the cache, then attends);
* ``ours_cuda``: the same with ``backend="cuda"``, the ``_C`` kernel (when the extension has it);
* ``ours_flex``, ``ours_reference``: ``decode`` with its FlexAttention and SDPA-with-dense-mask
  backends (the only ``decode`` backends that run on a CPU);
* ``flex_decoding``: ``torch.compile(flex_attention)`` with ``q`` as ``[B, H, S, D]`` against
  transposed views of the cache ``[B, H, P + S, D]`` and no block mask (dense), as a FlexAttention
  user would call it; short queries take its FlexDecoding (split-KV) kernel. Compiled outside the
  timing on a GPU, eager on a CPU (where it materializes the scores; a semantics check, not fast);
* ``sdpa_cache``: SDPA over the cache ``[:, :P + S]`` without a mask, the baseline of the ratios;
* ``bd3lm_full_prefix_recompute``: BD3-LM style, all ``P + S`` rows as queries (the prefix rows are
  re-run every step) with SDPA and a block-causal mask (blocks of ``ω``) over the ``P + S`` keys;
  only the last ``S`` rows are the step's output. What re-encoding the cached prefix costs;
* ``flash_attn_with_kvcache``: flash-attn's fused append-and-attend (when ``flash_attn`` imports).

``ours_*`` and ``flash_attn_with_kvcache`` write the window's keys/values into the cache inside the
timed call (the same rows at the same cells each round, so the cache contents do not change);
``flex_decoding``, ``sdpa_cache`` and ``bd3lm_full_prefix_recompute`` only attend, reading a cache that
already holds them (a user of those would add the write: two small copies).

Decode is mostly bandwidth-bound, so each record carries ``kv_bytes``, the bytes of K/V one step
must read (``2 · B · H · (P + ω) · D`` elements, the same for every contender, so ``gbps`` compares
them on the same useful traffic), ``gbps`` (``kv_bytes`` over the median time; absent, like
``tflops``, under ``--benchmark-disable``), ``floor_us``, the time that traffic takes at this machine's
measured copy rate (``benchmarks/roofline.py``, recorded as ``copy_gbps``) and ``pct_of_floor`` (floor
time over the median: 100 is the floor). ``tflops`` is the rate on the step's own work,
``4 · B · H · S · (P + S) · D`` FLOPs for every contender (the prefix recompute's extra work is not
counted). The floor leaves out the q, output and new-row traffic (``4 · B · S · H · D`` elements, as
much as the K/V when P = ω), and at ω = 256 a bf16 step does ω FLOPs per K/V byte, near a Hopper
GPU's ridge point (≈180-300), so there compute, not the floor, bounds it. Each call is timed synchronized, so
microsecond-scale calls include one launch and synchronization latency (several µs on a GPU), as a
single layer's step would.

Shapes: on a GPU ω in {16, 64, 256} × P in {256, 1024, 4096} × batch in {1, 8, 32} with the paper's
H=12, D=64 in bf16 (27 groups); on a CPU a small default (ω=16, P in {256, 1024}, batch 1 and 4,
H=4, D=64, fp32) so that ``make bench`` stays fast; there the FlexAttention rows run eagerly and are
labelled ``emulated`` in the report. Triton is not timed on a CPU (only its interpreter runs there).
The cache of each problem has ``max_len = P + ω``.
"""

import itertools
import warnings
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import hdlm_kernels as hk
from benchmarks.roofline import copy_bytes_per_s, floor_info
from benchmarks.timing import median_seconds, synchronized
from hdlm_kernels import _extension

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
H, D = (12, 64) if GPU else (4, 64)
DTYPE = torch.bfloat16 if GPU else torch.float32
WINDOWS, PREFIXES, BATCHES = (((16, 64, 256), (256, 1024, 4096), (1, 8, 32)) if GPU
                              else ((16,), (256, 1024), (1, 4)))
ROUNDS, WARMUP_ROUNDS = (20, 3) if GPU else (10, 2)

# One compiled FlexAttention shared by the problems; each (B, P, ω) is one more static-shape graph, so
# leave room above dynamo's default of 8 rather than fall back to eager (materializing) silently.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
compiled_flex_attention = torch.compile(flex_attention, dynamic=False) if GPU else flex_attention

# Eager FlexAttention on the CPU is deliberate (see the module docstring); keep its warning out of the log.
pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")


@dataclass(frozen=True)
class Problem:
    """One decode step: queries and new keys/values ``[B, ω, H, D]``, a cache ``[B, P + ω, H, D]`` whose
    cells ``[0, P)`` hold the prefix and ``[P, P + ω)`` the window's keys/values, ``cache_len = P``."""

    batch: int
    prefix: int  # P
    window: int  # ω = S, the rows computed this step
    q: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_len: torch.Tensor  # LongTensor [B] on the device, all P

    @property
    def name(self) -> str:
        return f"w={self.window} P={self.prefix} B={self.batch}"

    @property
    def shape(self) -> str:
        return f"B={self.batch} H={H} D={D} P={self.prefix} w={self.window}"

    @property
    def keys(self) -> int:  # cells each row reads: the prefix and the window
        return self.prefix + self.window

    @property
    def flops(self) -> int:  # the step's useful work: S rows against P + S keys, QK^T and PV
        return 4 * self.batch * H * self.window * self.keys * D

    @property
    def kv_bytes(self) -> int:
        return 2 * self.batch * H * self.keys * D * self.k_cache.element_size()

    def cache_heads_first(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, H, P + S, D]`` views of the cache (no copy), for SDPA and FlexAttention."""
        return (self.k_cache[:, :self.keys].transpose(1, 2), self.v_cache[:, :self.keys].transpose(1, 2))


@dataclass(frozen=True)
class Case:
    """A contender ready to run: ``run()`` is one decode step on the problem."""

    run: Callable[[], torch.Tensor]
    notes: dict = field(default_factory=dict)  # contender-specific extra_info


GRID = list(itertools.product(WINDOWS, PREFIXES, BATCHES))


@pytest.fixture(scope="module", params=GRID, ids=lambda p: f"w{p[0]}_P{p[1]}_B{p[2]}")
def problem(request) -> Problem:
    window, prefix, batch = request.param
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def randn(length: int) -> torch.Tensor:
        return torch.randn(batch, length, H, D, generator=g, device=DEVICE, dtype=DTYPE)

    q, k_new, v_new = randn(window), randn(window), randn(window)
    k_cache, v_cache = randn(prefix + window), randn(prefix + window)  # max_len = P + ω
    k_cache[:, prefix:] = k_new  # the cells decode writes: every contender reads the same cache
    v_cache[:, prefix:] = v_new
    cache_len = torch.full((batch,), prefix, dtype=torch.long, device=DEVICE)
    return Problem(batch, prefix, window, q, k_new, v_new, k_cache, v_cache, cache_len)


def ours(p: Problem, backend: str) -> Case:
    return Case(lambda: hk.attention.decode(p.q, p.k_cache, p.v_cache, p.cache_len, p.k_new, p.v_new,
                                            backend=backend))


# -- contenders: problem -> Case ----------------------------------------------------------------------
def ours_triton(p: Problem) -> Case:
    if not GPU:
        pytest.skip("Triton runs on CPU only in the interpreter, which is not a speed measurement")
    return ours(p, "triton")


def ours_cuda(p: Problem) -> Case:
    if not GPU:
        pytest.skip("the CUDA kernel needs a CUDA GPU")
    if _extension._C is None or not getattr(_extension._C, "with_cuda", False):
        pytest.skip(f"no CUDA extension: {_extension.cuda_missing_reason() or _extension.missing_reason}")
    if not hasattr(_extension._C, "decode_attention_cuda"):
        pytest.skip("hdlm_kernels._C has no decode_attention_cuda (built before it existed)")
    return ours(p, "cuda")


def ours_flex(p: Problem) -> Case:
    return ours(p, "flex")


def ours_reference(p: Problem) -> Case:
    return ours(p, "reference")


def flex_decoding(p: Problem) -> Case:
    q = p.q.transpose(1, 2)  # [B, H, S, D] view
    k, v = p.cache_heads_first()
    return Case(lambda: compiled_flex_attention(q, k, v), dict(compiled=GPU))


def sdpa_cache(p: Problem) -> Case:
    q = p.q.transpose(1, 2)
    k, v = p.cache_heads_first()
    return Case(lambda: F.scaled_dot_product_attention(q, k, v))


def bd3lm_full_prefix_recompute(p: Problem) -> Case:
    g = torch.Generator(device=DEVICE).manual_seed(1)
    # Queries of every cached row (the prefix re-encoded) followed by the window's own rows.
    q_prefix = torch.randn(p.batch, H, p.prefix, D, generator=g, device=DEVICE, dtype=DTYPE)
    q = torch.cat([q_prefix, p.q.transpose(1, 2)], dim=2)
    k, v = p.cache_heads_first()
    blocks = torch.arange(p.keys, device=DEVICE) // p.window
    block_causal = blocks[None, :] <= blocks[:, None]  # [P + S, P + S]: key block <= query block
    return Case(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal)[:, :, p.prefix:],
                dict(query_rows=p.keys))


def flash_attn_with_kvcache(p: Problem) -> Case:
    try:
        from flash_attn import flash_attn_with_kvcache as fa_with_kvcache
    except ImportError as error:
        pytest.skip(f"flash_attn is not importable ({error})")
    if not GPU:
        pytest.skip("flash-attn runs on CUDA GPUs only")
    cache_seqlens = p.cache_len.int()
    return Case(lambda: fa_with_kvcache(p.q, p.k_cache, p.v_cache, k=p.k_new, v=p.v_new,
                                        cache_seqlens=cache_seqlens, causal=False))


CONTENDERS = [ours_triton, ours_cuda, ours_flex, ours_reference, flex_decoding, sdpa_cache,
              bd3lm_full_prefix_recompute, flash_attn_with_kvcache]
BASELINE = sdpa_cache
# FlexAttention without torch.compile (the CPU rows) materializes the scores and evaluates the mask
# element by element: a stand-in for the compiled kernel, labelled so in the report.
EAGER_FLEX = (ours_flex, flex_decoding)
EAGER_FLEX_MEASURES = ("FlexAttention's eager CPU fallback (scores materialized, mask evaluated per "
                       "element): checks the call runs, says nothing about the compiled kernel's speed")


def side(contender) -> str:
    """``"ours"`` for this package's ``decode`` backends, ``"baseline"`` for every other contender."""
    return "ours" if contender.__name__.startswith("ours") else "baseline"




def measure(benchmark, problem: Problem, contender) -> None:
    case = contender(problem)
    benchmark.group = f"decode {problem.name}"
    target = synchronized(case.run)
    with torch.no_grad():  # decode is inference-only
        with warnings.catch_warnings():  # compile, autotune and allocate outside the timing
            warnings.simplefilter("ignore")
            target()
        benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)

    kv_bytes = problem.kv_bytes
    copy_rate = copy_bytes_per_s(DEVICE)
    median = median_seconds(benchmark)
    info = dict(shape=problem.shape, dtype=str(DTYPE).replace("torch.", ""), side=side(contender),
                kv_bytes=kv_bytes, copy_gbps=float(f"{copy_rate / 1e9:.4g}"),
                **floor_info(kv_bytes / copy_rate, median), **case.notes)
    if not GPU and contender in EAGER_FLEX:
        info.update(execution="emulated", measures=EAGER_FLEX_MEASURES)
    if median is not None:  # None under --benchmark-disable
        info["gbps"] = float(f"{kv_bytes / median / 1e9:.4g}")
        info["tflops"] = float(f"{problem.flops / median / 1e12:.4g}")
    if contender is BASELINE:
        info["baseline"] = True
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("contender", CONTENDERS, ids=lambda c: c.__name__)
def test_decode(benchmark, problem, contender):
    measure(benchmark, problem, contender)
