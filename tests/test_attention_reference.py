"""hk.attention.attention: the reference backend against softmax attention written out in the test,
FlexAttention against the reference, autograd, and the error messages."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hdlm_kernels as hk
from hdlm_kernels.masks import IntervalMask


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


def test_float32_and_value_head_dim_and_scale():
    g = torch.Generator().manual_seed(1)
    mask = random_mask(6, 10, 2, g)
    q, k, v = random_qkv(2, 6, 10, 3, 8, dtype=torch.float32, Dv=5)
    out = hk.attention.attention(q, k, v, mask, scale=0.37)
    assert out.shape == (2, 6, 3, 5) and out.dtype == torch.float32
    expected = naive_attention(q.double(), k.double(), v.double(), mask, scale=0.37)
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    # The scale matters (otherwise the test above would say nothing about it).
    assert not torch.allclose(out, hk.attention.attention(q, k, v, mask))


def test_low_precision_is_computed_in_the_input_dtype():
    g = torch.Generator().manual_seed(2)
    mask = random_mask(8, 8, 1, g)
    q, k, v = random_qkv(2, 8, 8, 2, 16, dtype=torch.float32)
    out = hk.attention.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), naive_attention(q.double(), k.double(), v.double(), mask).float(),
                               rtol=0.05, atol=0.05)


def test_auto_and_ref_alias_are_the_reference():
    g = torch.Generator().manual_seed(3)
    mask = random_mask(5, 9, 2, g)
    q, k, v = random_qkv(2, 5, 9, 2, 4)
    expected = hk.attention.attention(q, k, v, mask, backend="reference")
    assert torch.equal(hk.attention.attention(q, k, v, mask), expected)
    assert torch.equal(hk.attention.attention_ref(q, k, v, mask), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_batch", ["shared", "per_batch"])
@pytest.mark.parametrize("num_rows,key_length", [(7, 7), (5, 13), (16, 9)])
def test_flex_equals_reference_on_cpu_without_grad(dtype, mask_batch, num_rows, key_length):
    B = 2
    g = torch.Generator().manual_seed(num_rows + key_length)
    mask = random_mask(num_rows, key_length, 1 if mask_batch == "shared" else B, g, empty_rows=(1,))
    q, k, v = random_qkv(B, num_rows, key_length, 2, 16, dtype=dtype)
    with torch.no_grad():
        out = hk.attention.attention(q, k, v, mask, backend="flex")
    assert out.shape == (B, num_rows, 2, 16) and out.dtype == dtype
    torch.testing.assert_close(out, hk.attention.attention(q, k, v, mask, backend="reference"))


def test_flex_on_cpu_refuses_to_record_gradients():
    g = torch.Generator().manual_seed(4)
    mask = random_mask(4, 4, 1, g)
    q, k, v = random_qkv(1, 4, 4, 1, 8)
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="inference-only.*backend='reference'"):
        hk.attention.attention(q, k, v, mask, backend="flex")


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


@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_no_queries_or_no_keys_give_empty_or_zero_outputs(backend):
    q, k, v = random_qkv(2, 0, 4, 2, 8)
    mask = IntervalMask(torch.zeros(1, 0, dtype=torch.int32), torch.zeros(1, 0, dtype=torch.int32),
                        torch.zeros(1, 0, dtype=torch.int32), 4)
    assert hk.attention.attention(q, k, v, mask, backend=backend).shape == (2, 0, 2, 8)
    q, k, v = random_qkv(2, 3, 0, 2, 8)
    zeros = torch.zeros(1, 3, dtype=torch.int32)
    out = hk.attention.attention(q, k, v, IntervalMask(zeros, zeros, zeros, 0), backend=backend)
    assert torch.equal(out, torch.zeros(2, 3, 2, 8, dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), Q=st.integers(1, 12), K=st.integers(1, 12), H=st.integers(1, 3),
       D=st.sampled_from([1, 2, 8]), shared=st.booleans(), seed=st.integers(0, 2**16))
def test_reference_equals_naive_on_random_shapes(B, Q, K, H, D, shared, seed):
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(Q, K, 1 if shared else B, g, empty_rows=())
    q, k, v = random_qkv(B, Q, K, H, D, seed=seed)
    torch.testing.assert_close(hk.attention.attention(q, k, v, mask), naive_attention(q, k, v, mask),
                               rtol=1e-12, atol=1e-12)


# -- errors ---------------------------------------------------------------------------------------
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


def test_a_full_mask_is_dropped_with_the_same_result():
    """A mask under which every row sees every key runs SDPA without a mask (its fast kernels) and
    gives what the dense-mask path gives."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 9, 3, 16, generator=g, dtype=torch.float64) for _ in range(3))
    full = IntervalMask(torch.full((1, 9), 9), torch.zeros(1, 9, dtype=torch.int32),
                        torch.zeros(1, 9, dtype=torch.int32), 9)
    assert full.attends_all
    also_full = IntervalMask(torch.full((1, 9), 4), torch.full((1, 9), 4), torch.full((1, 9), 9), 9)
    assert not also_full.attends_all  # the flag is a cheap sufficient test, not an exact one
    reference = hk.attention.attention_ref
    torch.testing.assert_close(reference(q, k, v, full), reference(q, k, v, also_full), rtol=0, atol=1e-14)
