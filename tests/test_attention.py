"""hk.attention.attention on every backend (docs/attention.md): the reference against softmax attention
written out in the test (outputs and gradients), every other backend (FlexAttention, the Triton kernels)
against the reference on masks from every constructor and on random intervals, the Triton kernel's
backward modes and log-sum-exp, FlexAttention's BlockMask against SDPA's dense mask, the harness training
with the kernels, the choice of backend and the error messages.

Tolerance (docs/testing.md, flash-attn's rule): against a float64 truth, a backend's error may be at most
twice the error of the reference computed in the backend's dtype, plus a small absolute term. On a CPU
machine the Triton kernels run in the interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``) in
float32 and float16 only: the interpreter computes bfloat16 dot products wrongly. FlexAttention on the CPU
runs eagerly and without gradients. Tests marked ``cuda`` run bfloat16 and the paper's shapes."""

import itertools
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sampling_checks import Target, backend_targets
from torch.nn.attention.flex_attention import flex_attention

import hdlm_kernels as hk
from hdlm_kernels.masks import IntervalMask
from hdlm_kernels.masks.inference import CONFIGS, CONTEXTS, WINDOWS

pytestmark = pytest.mark.usefixtures("single_thread")

ABSOLUTE = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
BACKENDS = backend_targets("attention", reference_cpu=False)  # flex and triton on the CPU; every one on a GPU
# Eager FlexAttention on the CPU (inference only) is checked on the constructors' masks by
# test_eager_flex_with_block_mask_equals_sdpa_with_dense_mask and on random intervals by
# test_random_masks_with_empty_rows; the tests of gradients and tiles take the others.
WITH_GRADS = [p for p in BACKENDS if not (p.values[0].name == "flex" and p.values[0].kind == "cpu")]
COMPILED = [p for p in BACKENDS if not p.values[0].interpreted]
REFERENCE = Target("attention", "reference", "cpu")


def naive_attention(q, k, v, mask, scale=None):
    """Softmax over the allowed keys of each row, spelled out; rows without keys give zeros."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed = mask.expand(q.shape[0]).to_dense()[:, None]  # [B, 1, Q, K]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    weights = torch.exp(scores) * allowed  # inputs are small: no max subtraction needed in float64
    total = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(total > 0, total, torch.ones_like(total))
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def random_mask(num_rows, key_length, batch, generator, empty_rows=(0,)):
    """Random intervals (some overlapping, some empty windows), with the rows ``empty_rows`` empty."""
    def draw():
        return torch.randint(0, key_length + 1, (batch, num_rows), generator=generator)

    prefix_end, x, y = draw(), draw(), draw()
    start, end = torch.minimum(x, y), torch.maximum(x, y)
    for row in empty_rows:
        if row < num_rows:
            prefix_end[:, row], start[:, row], end[:, row] = 0, 3 % (key_length + 1), 3 % (key_length + 1)
    return IntervalMask(prefix_end, start, end, key_length)


def random_qkv(B, Q, K, H, D, dtype=torch.float64, seed=0, Dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Q, H, D, generator=g, dtype=dtype)
    k = torch.randn(B, K, H, D, generator=g, dtype=dtype)
    v = torch.randn(B, K, H, D if Dv is None else Dv, generator=g, dtype=dtype)
    return q, k, v


def dtypes_of(target):
    """The dtypes a backend is checked in: the interpreter's float32 / float16, eager FlexAttention's
    float32 / float64, and bfloat16 too on a GPU."""
    if target.kind == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float64] if target.name == "flex" else [torch.float32, torch.float16]


def with_grads(target):
    return not (target.name == "flex" and target.kind == "cpu")  # eager FlexAttention is inference-only


def outputs(fn, q, k, v, grad):
    """{out, dq, dk, dv} of fn (out only when grad is None)."""
    if grad is None:
        with torch.no_grad():
            return {"out": fn(q, k, v)}
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    return {"out": out, "dq": dq, "dk": dk, "dv": dv}


def check_against_reference(target, mask, batch=2, heads=2, head_dim=32, dtype=torch.float32, scale=None,
                            deterministic=True, value_dim=None, seed=0):
    """``target``'s output (and gradients where it has them) against the reference: flash-attn's rule against a
    float64 truth in the low precisions; in float32 / float64 on eager FlexAttention (no gradients) the
    reference in the same dtype within torch's default tolerance. Returns the target's tensors."""
    mask = mask.to(target.device)
    g = torch.Generator().manual_seed(seed)
    Q, K, Dv = mask.num_rows, mask.key_length, value_dim or head_dim
    q, k, v = (torch.randn(batch, n, heads, d, generator=g) for n, d in ((Q, head_dim), (K, head_dim), (K, Dv)))
    grad = torch.randn(batch, Q, heads, Dv, generator=g)
    q, k, v, grad = (t.to(target.device, dtype) for t in (q, k, v, grad))
    grad = grad if with_grads(target) else None

    def run(q, k, v):
        return hk.attention.attention(q, k, v, mask, scale, backend=target.name, deterministic=deterministic)

    ours = outputs(run, q, k, v, grad)
    low = outputs(lambda q, k, v: hk.attention.attention_ref(q, k, v, mask, scale), q, k, v, grad)
    if not with_grads(target):
        assert ours["out"].dtype == dtype
        torch.testing.assert_close(ours["out"], low["out"])
        return ours
    truth = outputs(lambda q, k, v: hk.attention.attention_ref(q, k, v, mask, scale), q.double(), k.double(),
                    v.double(), grad.double())
    for name in ("out", "dq", "dk", "dv"):
        assert ours[name].dtype == dtype and ours[name].shape == truth[name].shape
        ours_error = (ours[name].double() - truth[name]).abs().max().item()
        reference_error = (low[name].double() - truth[name]).abs().max().item()
        assert ours_error <= 2 * reference_error + ABSOLUTE[dtype], (
            f"{name}: max error {ours_error:.3g} vs the low-precision reference's {reference_error:.3g}")
    return ours


# ---------------------------------------------------------------- the reference is the oracle

SHAPES = [(7, 7), (5, 13), (16, 9), (1, 1)]  # (Q, K), including K != Q


@pytest.mark.parametrize("mask_batch", ["shared", "per_batch"])
@pytest.mark.parametrize("num_rows,key_length", SHAPES)
def test_reference_equals_naive_softmax(mask_batch, num_rows, key_length):
    B, H, D = 3, 2, 8
    g = torch.Generator().manual_seed(num_rows * 100 + key_length)
    mask = random_mask(num_rows, key_length, 1 if mask_batch == "shared" else B, g, empty_rows=(0, 4))
    q, k, v = random_qkv(B, num_rows, key_length, H, D)
    out = hk.attention.attention(q, k, v, mask, backend="reference")
    assert out.shape == (B, num_rows, H, D) and out.dtype == torch.float64
    torch.testing.assert_close(out, naive_attention(q, k, v, mask), rtol=1e-12, atol=1e-12)
    empty = ~mask.expand(B).to_dense().any(-1)  # [B, Q]
    assert empty.any()
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))


def test_reference_float32_value_head_dim_and_scale():
    g = torch.Generator().manual_seed(1)
    mask = random_mask(6, 10, 2, g)
    q, k, v = random_qkv(2, 6, 10, 3, 8, dtype=torch.float32, Dv=5)
    out = hk.attention.attention(q, k, v, mask, scale=0.37)
    assert out.shape == (2, 6, 3, 5) and out.dtype == torch.float32
    expected = naive_attention(q.double(), k.double(), v.double(), mask, scale=0.37)
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    # The scale matters (otherwise the test above would say nothing about it).
    assert not torch.allclose(out, hk.attention.attention(q, k, v, mask))


def test_reference_low_precision_is_computed_in_the_input_dtype():
    g = torch.Generator().manual_seed(2)
    mask = random_mask(8, 8, 1, g)
    q, k, v = random_qkv(2, 8, 8, 2, 16, dtype=torch.float32)
    out = hk.attention.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), naive_attention(q.double(), k.double(), v.double(), mask).float(),
                               rtol=0.05, atol=0.05)


@pytest.mark.parametrize("mask_batch", ["shared", "per_batch"])
def test_reference_gradients_equal_naive_gradients(mask_batch):
    B, Q, K, H, D = 2, 6, 9, 2, 4
    g = torch.Generator().manual_seed(5)
    mask = random_mask(Q, K, 1 if mask_batch == "shared" else B, g, empty_rows=(2,))
    inputs = random_qkv(B, Q, K, H, D)
    grad_out = torch.randn(B, Q, H, D, generator=g, dtype=torch.float64)

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        return torch.autograd.grad(fn(*leaves, mask), leaves, grad_out)

    ours = grads(lambda q, k, v, m: hk.attention.attention(q, k, v, m))
    theirs = grads(naive_attention)
    for name, a, b in zip("qkv", ours, theirs):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d{name}")
    assert torch.equal(ours[0][:, 2], torch.zeros_like(ours[0][:, 2]))  # the empty row's query


def test_reference_passes_gradcheck():
    g = torch.Generator().manual_seed(6)
    mask = random_mask(3, 5, 1, g)
    q, k, v = (t.requires_grad_(True) for t in random_qkv(1, 3, 5, 1, 2))
    assert torch.autograd.gradcheck(lambda q, k, v: hk.attention.attention(q, k, v, mask), (q, k, v))


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), Q=st.integers(1, 12), K=st.integers(1, 12), H=st.integers(1, 3),
       D=st.sampled_from([1, 2, 8]), shared=st.booleans(), seed=st.integers(0, 2**16))
def test_reference_equals_naive_on_random_shapes(B, Q, K, H, D, shared, seed):
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(Q, K, 1 if shared else B, g, empty_rows=())
    q, k, v = random_qkv(B, Q, K, H, D, seed=seed)
    torch.testing.assert_close(hk.attention.attention(q, k, v, mask), naive_attention(q, k, v, mask),
                               rtol=1e-12, atol=1e-12)


def test_a_full_mask_is_dropped_with_the_same_result():
    """A mask under which every row sees every key runs SDPA without a mask (its fast kernels) and gives what
    the dense-mask path gives."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 9, 3, 16, generator=g, dtype=torch.float64) for _ in range(3))
    full = IntervalMask(torch.full((1, 9), 9), torch.zeros(1, 9, dtype=torch.int32),
                        torch.zeros(1, 9, dtype=torch.int32), 9)
    assert full.attends_all
    also_full = IntervalMask(torch.full((1, 9), 4), torch.full((1, 9), 4), torch.full((1, 9), 9), 9)
    assert not also_full.attends_all  # the flag is a cheap sufficient test, not an exact one
    reference = hk.attention.attention_ref
    torch.testing.assert_close(reference(q, k, v, full), reference(q, k, v, also_full), rtol=0, atol=1e-14)


# ---------------------------------------------------------------- every backend against the reference


def inference_masks():
    sched = hk.schedules.block(40, 8, 4)
    for config, context, window in itertools.product(CONFIGS, CONTEXTS, WINDOWS):
        yield f"inference-{config}-{context}-{window}", hk.masks.inference(sched, 13, config, context, window)


def packed_masks():
    tokens = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    layouts = [("block", hk.schedules.block(40, 8, 4), "block_causal", "full"),
               ("block-causal-window", hk.schedules.block(40, 16, 16), "causal", "causal"),
               ("slide", hk.schedules.slide(40, 6), "causal", "full")]
    for (name, sched, context, window), config in itertools.product(layouts, CONFIGS):
        packed = hk.packing.pack(tokens, sched, config, context, window, generator=torch.Generator().manual_seed(1),
                                 bos_id=0)
        yield f"packed-{name}-{config}", packed.mask


MASKS = dict(itertools.chain(inference_masks(), packed_masks()))
LOW_PRECISION_MASKS = ["inference-shifted-block_causal-full", "packed-slide-shifted", "packed-block-aligned"]


@pytest.mark.parametrize("target", WITH_GRADS)
@pytest.mark.parametrize("name", sorted(MASKS))
def test_masks_from_every_constructor(target, name):
    check_against_reference(target, MASKS[name])


@pytest.mark.parametrize("target", WITH_GRADS)
@pytest.mark.parametrize("name", LOW_PRECISION_MASKS)
def test_masks_in_the_other_dtypes(target, name):
    for dtype in dtypes_of(target)[1:]:
        check_against_reference(target, MASKS[name], dtype=dtype)


@pytest.mark.parametrize("target", COMPILED)
@pytest.mark.parametrize("mask_batch", ["shared", "per_batch"])
@pytest.mark.parametrize("num_rows,key_length", [(7, 7), (5, 13), (16, 9)])
def test_random_masks_with_empty_rows(target, mask_batch, num_rows, key_length):
    g = torch.Generator().manual_seed(num_rows + key_length)
    mask = random_mask(num_rows, key_length, 1 if mask_batch == "shared" else 2, g, empty_rows=(1,))
    eager_flex = target.name == "flex" and target.kind == "cpu"
    for dtype in (dtypes_of(target) if eager_flex else [torch.float32]):
        ours = check_against_reference(target, mask, head_dim=16, dtype=dtype)
        assert ours["out"][:, 1].abs().max() == 0


def test_packed_slide_masks_differ_per_sequence():
    mask = MASKS["packed-slide-aligned"]
    assert mask.batch == 2 and not torch.equal(mask.prefix_end[0], mask.prefix_end[1])


@pytest.mark.parametrize("target", WITH_GRADS)
def test_kv_cached_rows_fewer_queries_than_keys(target):
    # A cached call computes only the window rows over every key.
    sched = hk.schedules.block(70, 8, 4)
    mask = hk.masks.inference(sched, 20, "shifted", "causal", "full")
    a, _ = sched.split(20)
    window = mask.rows(slice(a, None))
    assert window.num_rows < window.key_length
    check_against_reference(target, window, batch=3, heads=1)


@pytest.mark.parametrize("target", WITH_GRADS)
def test_empty_rows_give_zero_outputs_and_gradients(target):
    g = torch.Generator().manual_seed(3)
    Q, K = 45, 37
    prefix_end = torch.randint(0, K + 1, (2, Q), generator=g)
    start = torch.randint(0, K + 1, (2, Q), generator=g)
    end = torch.minimum(start + torch.randint(0, 9, (2, Q), generator=g), torch.tensor(K))
    empty = torch.tensor([0, 5, 31, 32, 44])
    prefix_end[:, empty], start[:, empty], end[:, empty] = 0, 7, 7
    prefix_end[1, :33] = 0  # batch 1: the whole first query tile but row 32 is empty or window-only
    start[1, :33] = end[1, :33]
    ours = check_against_reference(target, IntervalMask(prefix_end, start, end, K))
    assert ours["out"][:, empty].abs().max() == 0
    if "dq" in ours:
        assert ours["dq"][:, empty].abs().max() == 0


@pytest.mark.parametrize("target", WITH_GRADS)
@pytest.mark.parametrize("head_dim,value_dim", [(64, 64), (24, 40)])
def test_head_dims_and_a_value_dim_that_differs(target, head_dim, value_dim):
    check_against_reference(target, MASKS["packed-block-aligned"], heads=1, head_dim=head_dim, value_dim=value_dim)


@pytest.mark.parametrize("target", WITH_GRADS)
def test_scale_and_shared_mask_over_a_larger_batch(target):
    mask = MASKS["inference-aligned-causal-causal"]
    assert mask.batch == 1
    check_against_reference(target, mask, batch=3, heads=1, scale=0.3)


@pytest.mark.parametrize("target", WITH_GRADS)
def test_non_contiguous_inputs(target):
    mask = MASKS["packed-block-shifted"].to(target.device)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, mask.num_rows, 3, 2, 32, generator=g).to(target.device)  # [B, S, 3, H, D]: a fused
    q, k, v = qkv.unbind(2)                                                         # projection's layout
    assert not q.is_contiguous()
    grad = torch.randn(2, mask.num_rows, 2, 32, generator=g).to(target.device) if with_grads(target) else None
    ours = outputs(lambda q, k, v: hk.attention.attention(q, k, v, mask, backend=target.name), q, k, v, grad)
    ref = outputs(lambda q, k, v: hk.attention.attention_ref(q, k, v, mask), q, k, v, grad)
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), Q=st.integers(1, 80), K=st.integers(1, 80), H=st.integers(1, 2),
       head_dim=st.sampled_from([16, 32]), shared=st.booleans(), deterministic=st.booleans(),
       seed=st.integers(0, 2**16))
def _random_intervals_and_shapes(target, B, Q, K, H, head_dim, shared, deterministic, seed):
    # Arbitrary overlapping, empty and full intervals: tiles of every kind, at every edge.
    g = torch.Generator().manual_seed(seed)
    rows = 1 if shared else B
    draw = lambda: torch.randint(0, K + 1, (rows, Q), generator=g)  # noqa: E731
    prefix_end, x, y = draw(), draw(), draw()
    prefix_end = torch.where(torch.rand(rows, Q, generator=g) < 0.2, 0, prefix_end)
    mask = IntervalMask(prefix_end, torch.minimum(x, y), torch.maximum(x, y), K)
    check_against_reference(target, mask, batch=B, heads=H, head_dim=head_dim, deterministic=deterministic,
                            seed=seed)


@pytest.mark.parametrize("target", WITH_GRADS)
def test_random_intervals_and_shapes(target):
    _random_intervals_and_shapes(target)


@pytest.mark.parametrize("target", backend_targets("attention"))
def test_no_queries_or_no_keys_give_empty_or_zero_outputs(target):
    zeros = lambda n: torch.zeros(1, n, dtype=torch.int32)  # noqa: E731
    dtype = torch.float32
    q, k, v = (t.to(target.device, dtype) for t in random_qkv(2, 0, 4, 2, 32))
    mask = IntervalMask(zeros(0), zeros(0), zeros(0), 4).to(target.device)
    assert hk.attention.attention(q, k, v, mask, backend=target.name).shape == (2, 0, 2, 32)
    q, k, v = (t.to(target.device, dtype) for t in random_qkv(2, 3, 0, 2, 32))
    mask = IntervalMask(zeros(3), zeros(3), zeros(3), 0).to(target.device)
    backward = target.name == "triton"  # the reference's zeros of no keys are a constant, FlexAttention's too
    if backward:
        q.requires_grad_(True)
    out = hk.attention.attention(q, k, v, mask, backend=target.name)
    assert torch.equal(out, torch.zeros(2, 3, 2, 32, dtype=dtype, device=target.device))
    if backward:
        out.sum().backward()
        assert torch.equal(q.grad, torch.zeros_like(q))


# ---------------------------------------------------------------- the Triton kernels' backward modes and lse


def triton_target():
    """The Triton kernels where they run here: the GPU, or the interpreter on the CPU."""
    target = Target("attention", "triton", "cuda" if torch.cuda.is_available() else "cpu")
    reason = hk.backends.implementations("attention")[2].unavailable_reason(target.kind)
    if reason:
        pytest.skip(f"attention backend 'triton' on {target.kind}: {reason}")
    return target


def test_triton_atomic_dq_matches_the_reference():
    check_against_reference(triton_target(), MASKS["packed-slide-aligned"], deterministic=False)


def test_triton_deterministic_backward_is_bitwise_reproducible():
    target = triton_target()
    mask = MASKS["packed-block-aligned"].to(target.device)
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, mask.num_rows, 2, 32, generator=g).to(target.device) for _ in range(4))
    run = lambda q, k, v: hk.attention.attention(q, k, v, mask, backend="triton", deterministic=True)  # noqa: E731
    first, second = outputs(run, q, k, v, grad), outputs(run, q, k, v, grad)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_triton_log_sum_exp_matches_the_reference_and_is_minus_infinity_on_empty_rows():
    target = triton_target()
    from hdlm_kernels.attention import triton_attention

    mask = IntervalMask(torch.tensor([[0, 3, 9, 0]]), torch.tensor([[0, 0, 2, 5]]), torch.tensor([[0, 0, 4, 9]]), 9)
    mask = mask.to(target.device)
    q, k, v = (t.to(target.device, torch.float32) for t in random_qkv(2, 4, 9, 3, 32))
    out, lse = triton_attention.attention_forward_triton(q, k, v, mask)
    assert lse.shape == (2, 3, 4) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, hk.attention.attention_lse_ref(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert torch.isneginf(lse[:, :, 0]).all() and out[:, 0].abs().max() == 0


def test_triton_lse_merges_attention_over_disjoint_key_sets():
    # Attention over [0, K) equals the lse-weighted merge of attention over [0, s) and [s, K).
    target = triton_target()
    from hdlm_kernels.attention import triton_attention

    K, s = 50, 19
    rows = torch.arange(40)[None]
    whole = IntervalMask(torch.full_like(rows, K), torch.zeros_like(rows), torch.zeros_like(rows), K)
    left = IntervalMask(torch.full_like(rows, s), torch.zeros_like(rows), torch.zeros_like(rows), K)
    right = IntervalMask(torch.zeros_like(rows), torch.full_like(rows, s), torch.full_like(rows, K), K)
    whole, left, right = (m.to(target.device) for m in (whole, left, right))
    q, k, v = (t.to(target.device, torch.float32) for t in random_qkv(1, 40, K, 2, 32))
    forward = triton_attention.attention_forward_triton
    (o1, l1), (o2, l2) = forward(q, k, v, left), forward(q, k, v, right)
    lse = torch.logaddexp(l1, l2)
    w1, w2 = (torch.exp(l - lse).transpose(1, 2)[..., None] for l in (l1, l2))
    torch.testing.assert_close(w1 * o1 + w2 * o2, forward(q, k, v, whole)[0], rtol=1e-5, atol=1e-6)


def test_triton_bfloat16_is_refused_in_the_interpreter():
    target = triton_target()
    if target.kind == "cuda":
        pytest.skip("the Triton kernels were built for the GPU, where bfloat16 is supported")
    mask = MASKS["packed-block-aligned"]
    q, k, v = (t.bfloat16() for t in random_qkv(2, mask.num_rows, mask.key_length, 1, 32))
    with pytest.raises(TypeError, match="interpreter cannot take bfloat16"):
        hk.attention.attention(q, k, v, mask, backend="triton")


@pytest.mark.parametrize("dtype,head_dim,error,message", [
    (torch.float64, 32, TypeError, "float16, bfloat16 or float32 tensors, got torch.float64"),
    (torch.float32, 288, ValueError, "head dims up to 256, got 288"),
])
def test_triton_refuses_unsupported_inputs(dtype, head_dim, error, message):
    target = triton_target()
    from hdlm_kernels.attention import triton_attention

    mask = MASKS["packed-block-aligned"].to(target.device)
    q, k, v = (t.to(target.device, dtype) for t in random_qkv(1, mask.num_rows, mask.key_length, 1, head_dim))
    with pytest.raises(error, match=message):
        hk.attention.attention(q, k, v, mask, backend="triton")
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        triton_attention.attention_forward_triton(q.float()[..., :32], k.float()[..., :32], v.float()[..., :32],
                                                  mask, deterministic="yes")


def test_triton_tiny_training_run_matches_the_reference_step_by_step(tmp_path):
    from hdlm_reference.data import TokenDataset, bundled_corpus_path, load_tokens
    from hdlm_reference.model import DiT, ModelConfig
    from hdlm_reference.objective import ObjectiveConfig, PackedObjective
    from hdlm_reference.tokenizer import ByteTokenizer
    from hdlm_reference.trainer import TrainConfig, train

    target = triton_target()
    data = TokenDataset(load_tokens(bundled_corpus_path(), ByteTokenizer())[:4096], 32)
    losses = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = DiT(ModelConfig.preset("tiny", family="epsilon", attention_backend=backend))
        objective = PackedObjective(ObjectiveConfig(schedule="block", width=8), model.config.vocab_size, 32, seed=5)
        config = TrainConfig(lr=3e-3, warmup_steps=1, total_steps=3, batch_size=2, seq_len=32, log_every=1,
                             out_dir=str(tmp_path / backend), seed=11, progress=False, device=target.kind,
                             bf16=False)
        train(model, objective, data, config)
        records = [line for line in (tmp_path / backend / "metrics.jsonl").read_text().splitlines()
                   if '"loss"' in line]
        losses[backend] = [json.loads(line)["loss"] for line in records]
    assert len(losses["triton"]) == 3
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["reference"]), rtol=1e-4,
                               atol=1e-5)


# ---------------------------------------------------------------- FlexAttention: BlockMask against the dense mask


def test_flex_on_the_cpu_refuses_to_record_gradients():
    g = torch.Generator().manual_seed(4)
    q, k, v = random_qkv(1, 4, 4, 1, 8)
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="inference-only.*backend='reference'"):
        hk.attention.attention(q, k, v, random_mask(4, 4, 1, g), backend="flex")


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
    """Eager FlexAttention on the CPU evaluates ``mask_mod`` on every element, so it checks the mask semantics
    of ``to_block_mask()``."""
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
    """Compiled FlexAttention skips the tiles the ``BlockMask`` leaves out, so it also checks the tile lists
    (test_masks.py checks those index for index against ``create_block_mask``)."""
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


# ---------------------------------------------------------------- choice of backend and errors


def test_auto_is_triton_on_cuda_and_the_reference_on_the_cpu():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mask = MASKS["packed-block-aligned"].to(device)
    q, k, v = (t.to(device, torch.float32) for t in random_qkv(2, mask.num_rows, mask.key_length, 1, 32))
    expected = "triton" if device.type == "cuda" else "reference"
    auto = hk.attention.attention(q, k, v, mask)
    assert torch.equal(auto, hk.attention.attention(q, k, v, mask, backend=expected))
    assert torch.equal(hk.attention.attention_ref(q, k, v, mask), hk.attention.attention(q, k, v, mask,
                                                                                       backend="reference"))


def _inputs():
    g = torch.Generator().manual_seed(7)
    return random_qkv(2, 4, 6, 2, 8), random_mask(4, 6, 1, g)


def test_unknown_and_unimplemented_backends_name_the_choices():
    (q, k, v), mask = _inputs()
    with pytest.raises(ValueError, match="attention has no backend 'fast'; its backends are 'auto', 'kernels', "
                                         "'reference', 'flex', 'triton'"):
        hk.attention.attention(q, k, v, mask, backend="fast")
    # "cuda" is a decode backend, not an attention one
    with pytest.raises(ValueError, match="attention has no backend 'cuda'"):
        hk.attention.attention(q, k, v, mask, backend="cuda")


@pytest.mark.parametrize("change,error,message", [
    (lambda q, k, v, m: (q[0], k, v, m), ValueError, r"q must have shape \[B, S, H, D\]"),
    (lambda q, k, v, m: (q, k[:, :, :1], v, m), ValueError, "k must have shape"),
    (lambda q, k, v, m: (q, k, v[:, :5], m), ValueError, "v must have shape"),
    (lambda q, k, v, m: (q, k, v.float(), m), TypeError, "one dtype"),
    (lambda q, k, v, m: (q.long(), k, v, m), TypeError, "floating-point"),
    (lambda q, k, v, m: (q, k, v, m.to_dense()), TypeError, "mask must be an .*IntervalMask"),
    (lambda q, k, v, m: (q[:, :3], k, v, m), ValueError, "the mask has 4 query rows, but the queries have 3"),
    (lambda q, k, v, m: (q, k[:, :5], v[:, :5], m), ValueError, "key_length 6, but the keys have length 5"),
    (lambda q, k, v, m: (q, k, v, m.expand(3)), ValueError, "the mask has batch 3, expected 1 or 2"),
])
def test_invalid_inputs_raise_clear_errors(change, error, message):
    (q, k, v), mask = _inputs()
    with pytest.raises(error, match=message):
        hk.attention.attention(*change(q, k, v, mask))


def test_invalid_scale_raises():
    (q, k, v), mask = _inputs()
    with pytest.raises(TypeError, match="scale must be a float or None"):
        hk.attention.attention(q, k, v, mask, scale="0.1")


# ---------------------------------------------------------------- GPU: bfloat16 at the paper's shapes


@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("schedule", ["block", "slide"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_paper_shapes_on_gpu(head_dim, schedule, dtype):
    d = 1024
    sched = hk.schedules.block(d, 16, 16) if schedule == "block" else hk.schedules.slide(d, 256)
    context = "block_causal" if schedule == "block" else "causal"
    tokens = torch.randint(0, 50257, (4, d), generator=torch.Generator().manual_seed(0))
    mask = hk.packing.pack(tokens, sched, "aligned", context, "full", generator=torch.Generator().manual_seed(1)).mask
    for deterministic in (True, False):
        check_against_reference(Target("attention", "triton", "cuda"), mask, batch=4, heads=12, head_dim=head_dim,
                                dtype=dtype, deterministic=deterministic)
