"""Training attention over interval-packed masks (paper App. B.3), forward and forward+backward.

Each packed mask (one per schedule) is the input of every contender, so one report group compares
them side by side on the same (query, key) pairs:

* ``ours_triton``: ``hk.attention.attention(..., backend="triton")``, our Triton kernel, which
  iterates only the key tiles the row intervals touch (layout ``[B, S, H, D]``);
* ``ours_triton_atomic_dq``: the same with ``deterministic=False`` (fwd+bwd only);
* ``flex_compiled``: ``torch.compile(flex_attention)`` on ``mask.to_block_mask(128)``, which skips
  the same tiles (compiled outside the timing);
* ``sdpa_dense_mask``: SDPA with the dense boolean mask, the baseline of the ratios;
* ``einsum_official``: the official code's materialized einsum + masked_fill + softmax + einsum;
* ``sdpa_causal_Lc``: SDPA ``is_causal=True`` without a mask over the length ``L_c`` whose causal
  triangle ``L_c (L_c + 1) / 2`` matches the mask's mean attended pairs per sequence: what a
  tuned dense causal kernel does with the same work, a speed-of-light reference.

``tflops`` in each record is the achieved rate on the *attended* pairs only (forward
``4 · pairs · D · B · H`` FLOPs, forward+backward 3.5x that), so kernels that skip masked tiles and
kernels that compute the dense scores are scored on the same useful work; ``pct_of_matmul`` puts it
against this machine's measured dense matmul rate in the same dtype (``benchmarks/roofline.py``,
recorded as ``matmul_tflops``). ``gbps`` is the bytes a call must move (q, k, v read and the output
written once; with the backward also dO read and dq, dk, dv written) over the median, and
``pct_of_copy`` that rate against the measured copy rate (``copy_gbps``): the forward at small ω
moves little per FLOP, so both floors are shown.

Shapes: on a GPU the paper's (B=8, H=12, D=64, d=1024 -> packed 2048, bf16) with τ_Block for
ω in {4, 16, 64, 256} (block-causal context) and τ_Slide ω=256 (causal context, as the trainer
uses); on a CPU a small default (B=2, H=4, D=64, d=256 -> packed 512, fp32) and two schedules, so
that ``make bench`` stays fast. Triton is not timed on a CPU (only its interpreter runs there), nor
is FlexAttention's backward (PyTorch has none on the CPU).
"""

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import hdlm_kernels as hk
from benchmarks.roofline import copy_bytes_per_s, matmul_flops_per_s
from benchmarks.timing import median_seconds, synchronized

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
B, H, D, LENGTH = (8, 12, 64, 1024) if GPU else (2, 4, 64, 256)
DTYPE = torch.bfloat16 if GPU else torch.float32
SCHEDULES = ([("block", 4), ("block", 16), ("block", 64), ("block", 256), ("slide", 256)] if GPU
             else [("block", 16), ("slide", 64)])
ROUNDS, WARMUP_ROUNDS = (10, 2) if GPU else (5, 1)
FWD_BWD_FLOPS = 3.5  # forward + backward over forward FLOPs (the backward does 2.5x the matmuls)

# One compiled FlexAttention shared by every test; each mask layout (shared [1, ...] or per-sequence
# [B, ...] BlockMask) and grad mode is one more graph, so leave room above dynamo's default of 8
# rather than fall back to eager silently.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
compiled_flex_attention = torch.compile(flex_attention, dynamic=False)


@dataclass(frozen=True)
class Problem:
    """One packed mask and what every record on it reports."""

    name: str  # "block w=16"
    mask: hk.masks.IntervalMask
    pairs: float  # mean attended (query, key) pairs per sequence

    @property
    def shape(self) -> str:
        return f"B={B} H={H} D={D} d={LENGTH} packed={self.mask.num_rows}"


@dataclass(frozen=True)
class Case:
    """A contender ready to run: ``run()`` is one attention call on ``inputs``."""

    run: Callable[[], torch.Tensor]
    inputs: tuple[torch.Tensor, ...]
    pairs: float  # attended pairs per sequence of this call
    length: int  # its query (= key) length
    shape: str
    notes: dict = field(default_factory=dict)  # contender-specific extra_info


@pytest.fixture(scope="module", params=SCHEDULES, ids=lambda s: f"{s[0]}_w{s[1]}")
def problem(request) -> Problem:
    kind, width = request.param
    if kind == "block":
        sched, context = hk.schedules.block(LENGTH, width, width), "block_causal"
    else:
        sched, context = hk.schedules.slide(LENGTH, width), "causal"
    tokens = torch.randint(0, 50257, (B, LENGTH), generator=torch.Generator().manual_seed(0))
    mask = hk.packing.pack(tokens, sched, "aligned", context, "full",
                           generator=torch.Generator().manual_seed(0)).mask.to(DEVICE)
    return Problem(f"{kind} w={width}", mask, float(mask.num_pairs().double().mean()))


def qkv(length: int, requires_grad: bool, heads_first: bool = True) -> tuple[torch.Tensor, ...]:
    """Seeded q, k, v of ``[B, H, S, D]`` (SDPA, flex) or ``[B, S, H, D]`` (``hk.attention``)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    shape = (B, H, length, D) if heads_first else (B, length, H, D)
    return tuple(torch.randn(shape, generator=g, device=DEVICE, dtype=DTYPE).requires_grad_(requires_grad)
                 for _ in range(3))


def on_mask(p: Problem, run: Callable[[], torch.Tensor], inputs, **notes) -> Case:
    return Case(run, inputs, p.pairs, p.mask.num_rows, p.shape, notes)


# -- contenders: (problem, requires_grad) -> Case -----------------------------------------------------
def ours_triton(p: Problem, requires_grad: bool) -> Case:
    if not GPU:
        pytest.skip("Triton runs on CPU only in the interpreter, which is not a speed measurement")
    q, k, v = qkv(p.mask.num_rows, requires_grad, heads_first=False)
    # The mask caches its tile map, so the untimed warm-up call builds it, as flex's BlockMask is
    # built outside the timing; the backward is the default deterministic one.
    return on_mask(p, lambda: hk.attention.attention(q, k, v, p.mask, backend="triton"), (q, k, v))


def ours_triton_atomic_dq(p: Problem, requires_grad: bool) -> Case:
    if not requires_grad:
        pytest.skip("the forward is ours_triton's; only the backward differs")
    if not GPU:
        pytest.skip("Triton runs on CPU only in the interpreter, which is not a speed measurement")
    q, k, v = qkv(p.mask.num_rows, requires_grad, heads_first=False)
    # dQ accumulated with float32 atomics inside the dK/dV pass: one matmul fewer per tile pair.
    return on_mask(p, lambda: hk.attention.attention(q, k, v, p.mask, backend="triton", deterministic=False),
                   (q, k, v))


def flex_compiled(p: Problem, requires_grad: bool) -> Case:
    if requires_grad and not GPU:
        pytest.skip("PyTorch has no CPU backward for FlexAttention")
    q, k, v = qkv(p.mask.num_rows, requires_grad)
    block_mask = p.mask.to_block_mask(128)
    return on_mask(p, lambda: compiled_flex_attention(q, k, v, block_mask=block_mask), (q, k, v),
                   tiles_skipped_pct=round(float(block_mask.sparsity()), 1))


def sdpa_dense_mask(p: Problem, requires_grad: bool) -> Case:
    q, k, v = qkv(p.mask.num_rows, requires_grad)
    dense = p.mask.to_dense()[:, None]
    return on_mask(p, lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), (q, k, v))


def einsum_official(p: Problem, requires_grad: bool) -> Case:
    q, k, v = qkv(p.mask.num_rows, requires_grad)
    blocked = ~p.mask.to_dense()[:, None]

    def official():  # docs/official-code.md §4: einsum, masked_fill(-inf), softmax, einsum
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * D ** -0.5
        scores = scores.masked_fill(blocked, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.einsum("bhqk,bhkd->bhqd", probs, v)

    return on_mask(p, official, (q, k, v))


def sdpa_causal_Lc(p: Problem, requires_grad: bool) -> Case:
    length = round((math.sqrt(8 * p.pairs + 1) - 1) / 2)  # L (L + 1) / 2 ≈ pairs
    q, k, v = qkv(length, requires_grad)
    return Case(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v),
                length * (length + 1) / 2, length, f"B={B} H={H} D={D} causal L_c={length}")


CONTENDERS = [ours_triton, ours_triton_atomic_dq, flex_compiled, sdpa_dense_mask, einsum_official, sdpa_causal_Lc]
BASELINE = sdpa_dense_mask


def side(contender) -> str:
    """``"ours"`` for this package's kernels, ``"baseline"`` for every other contender."""
    return "ours" if contender.__name__.startswith("ours") else "baseline"




def measure(benchmark, problem: Problem, contender, backward: bool) -> None:
    case = contender(problem, backward)
    benchmark.group = f"packed attention {'fwd+bwd' if backward else 'forward'} ({problem.name})"
    if backward:
        grad = torch.randn(case.run().shape, generator=torch.Generator(device=DEVICE).manual_seed(1),
                           device=DEVICE, dtype=DTYPE)

        def clear_grads():  # untimed: fresh gradients each round rather than accumulating into old ones
            for tensor in case.inputs:
                tensor.grad = None

        def forward_backward():
            case.run().backward(grad)

        setup, target = clear_grads, synchronized(forward_backward)
    else:
        setup, target = None, synchronized(case.run)
    with warnings.catch_warnings():  # compile, autotune and allocate outside the timing
        warnings.simplefilter("ignore")
        target()
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)

    flops = 4 * case.pairs * D * B * H * (FWD_BWD_FLOPS if backward else 1)
    info = dict(shape=case.shape, dtype=str(DTYPE).replace("torch.", ""), side=side(contender),
                schedule=problem.name, density=round(case.pairs / case.length ** 2, 4), pairs=int(case.pairs),
                **case.notes)
    element_size = torch.empty((), dtype=DTYPE).element_size()
    tensors_moved = 8 if backward else 4  # q, k, v, out (+ dout, dq, dk, dv)
    moved_bytes = tensors_moved * B * H * case.length * D * element_size
    matmul_rate, copy_rate = matmul_flops_per_s(DEVICE, DTYPE), copy_bytes_per_s(DEVICE)
    info.update(matmul_tflops=float(f"{matmul_rate / 1e12:.4g}"), copy_gbps=float(f"{copy_rate / 1e9:.4g}"),
                moved_bytes=moved_bytes)
    median = median_seconds(benchmark)
    if median is not None:  # None under --benchmark-disable
        info["tflops"] = float(f"{flops / median / 1e12:.4g}")
        info["pct_of_matmul"] = float(f"{100 * flops / median / matmul_rate:.3g}")
        info["gbps"] = float(f"{moved_bytes / median / 1e9:.4g}")
        info["pct_of_copy"] = float(f"{100 * moved_bytes / median / copy_rate:.3g}")
    if contender is BASELINE:
        info["baseline"] = True
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("contender", CONTENDERS, ids=lambda c: c.__name__)
def test_forward(benchmark, problem, contender):
    measure(benchmark, problem, contender, backward=False)


@pytest.mark.parametrize("contender", CONTENDERS, ids=lambda c: c.__name__)
def test_fwd_bwd(benchmark, problem, contender):
    measure(benchmark, problem, contender, backward=True)
