"""The CUDA decode-attention kernel ``_C.decode_attention_cuda`` (DESIGN §4, §7) against a dense float64
reference written here: softmax over the allowed keys of each row, zeros for rows without keys.

Covered: float32/float16/bfloat16, head dims 64 and 128, masks shared by the batch (Bm = 1) and per
sequence, empty rows, K/V as strided views of a larger cache buffer (row-major, head-major, and
misaligned ones that take the element-wise load path), strided q, forced split-KV (1 and 3 splits,
the combine kernel) and the automatic choice, S from 1 to 300 and L up to 5000, and the error messages.

Tolerance (DESIGN §9, flash-attn's rule): against the float64 truth, the kernel's error may be at most
twice the error of the same dense reference computed in the kernel's dtype, plus a small absolute term.

All tests need a GPU and an ``hdlm_kernels._C`` built with CUDA; elsewhere they are skipped.
"""

import math

import pytest
import torch

from hdlm_kernels._extension import _C

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(_C is None or not hasattr(_C, "decode_attention_cuda"),
                       reason="hdlm_kernels._C has no decode_attention_cuda (not built with CUDA)"),
]

DEVICE = torch.device("cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ABSOLUTE = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


# -- the reference -------------------------------------------------------------------------------------

def allowed_keys(prefix_end, window_start, window_end, batch, keys):
    """Bool [B, S, L]: row i of sequence b may attend key c (the definition of DESIGN §4)."""
    c = torch.arange(keys, device=prefix_end.device)
    pe, ws, we = (t.long()[..., None] for t in (prefix_end, window_start, window_end))
    allowed = (c < pe) | ((ws <= c) & (c < we))
    return allowed.expand(batch, -1, -1)


def dense_attention(q, k, v, allowed, scale, dtype):
    """Dense masked softmax attention computed in `dtype`; rows without keys are zeros."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    scores = torch.einsum("bshd,blhd->bhsl", q, k) * scale
    mask = allowed[:, None]  # [B, 1, S, L], broadcast over heads
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    probs = torch.where(mask, probs, torch.zeros((), dtype=dtype, device=probs.device))  # NaN rows -> 0
    return torch.einsum("bhsl,blhd->bshd", probs, v)


def run_kernel(q, k, v, masks, scale, num_splits):
    out = _C.decode_attention_cuda(q, k, v, *masks, scale, num_splits)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert out.is_contiguous()
    return out


def check_against_reference(q, k, v, masks, scale, num_splits):
    """Runs the kernel and asserts the DESIGN §9 tolerance, exact zeros on empty rows and no NaN."""
    out = run_kernel(q, k, v, masks, scale, num_splits)
    allowed = allowed_keys(*masks, q.shape[0], k.shape[1])
    truth = dense_attention(q, k, v, allowed, scale, torch.float64)
    low = dense_attention(q, k, v, allowed, scale, q.dtype)
    assert torch.isfinite(out).all(), "the kernel returned NaN or inf"
    empty = ~allowed.any(-1)  # [B, S]
    assert (out[empty] == 0).all(), "rows without keys must be zeros"
    ours_error = (out.double() - truth).abs().max().item() if out.numel() else 0.0
    reference_error = (low.double() - truth).abs().max().item() if out.numel() else 0.0
    assert ours_error <= 2 * reference_error + ABSOLUTE[q.dtype], (
        f"max error {ours_error:.3g} vs the {q.dtype} reference's {reference_error:.3g} "
        f"(num_splits={num_splits})")
    return out


# -- inputs --------------------------------------------------------------------------------------------

def random_qkv(batch, rows, keys, heads, head_dim, dtype, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, heads, head_dim, generator=g) * spread for n in (rows, keys, keys))
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def random_masks(mask_batch, rows, keys, seed=0):
    """Random intervals mixing every row kind: prefix and window (possibly overlapping), window only,
    prefix only, short windows, and rows without keys."""
    g = torch.Generator().manual_seed(seed + 1000)
    shape = (mask_batch, rows)
    prefix_end = torch.randint(0, keys + 1, shape, generator=g)
    window_start = torch.randint(0, keys + 1, shape, generator=g)
    window_end = (window_start + torch.randint(0, keys + 1, shape, generator=g)).clamp(max=keys)
    short_end = (window_start + torch.randint(1, 40, shape, generator=g)).clamp(max=keys)
    kind = torch.randint(0, 6, shape, generator=g)
    prefix_end = torch.where((kind == 1) | (kind == 3) | (kind == 4), 0, prefix_end)  # window only / none
    window_end = torch.where((kind == 2) | (kind == 3), window_start, window_end)    # prefix only / none
    window_end = torch.where(kind == 4, short_end, window_end)                         # short window
    return [t.to(DEVICE, torch.int32).contiguous() for t in (prefix_end, window_start, window_end)]


def decode_step_masks(cache_lens, reencoded, window):
    """The masks of one sampler step per sequence: `reencoded` settled rows re-encoded causally after
    the cache, then `window` active rows that see everything before them plus the whole window."""
    prefix_end, window_start, window_end = [], [], []
    for cached in cache_lens:
        pe = [cached + i + 1 for i in range(reencoded)] + [cached + reencoded] * window
        ws = [0] * reencoded + [cached + reencoded] * window
        we = [0] * reencoded + [cached + reencoded + window] * window
        prefix_end.append(pe)
        window_start.append(ws)
        window_end.append(we)
    return [torch.tensor(t, dtype=torch.int32, device=DEVICE) for t in (prefix_end, window_start, window_end)]


def cache_view(kind, batch, keys, heads, head_dim, dtype, seed):
    """K or V as the kernel sees them when decoding: a [B, L, H, D] view of a larger buffer."""
    g = torch.Generator().manual_seed(seed)
    max_len = keys + 37
    if kind == "row_major":  # KVCache layout [B, max_len, H, D], sliced to the first L cells
        buffer = torch.randn(batch, max_len, heads, head_dim, generator=g).to(DEVICE, dtype)
        return buffer[:, :keys]
    if kind == "head_major":  # [B, H, max_len, D] transposed: dims 1 and 2 swap strides
        buffer = torch.randn(batch, heads, max_len, head_dim, generator=g).to(DEVICE, dtype)
        return buffer.transpose(1, 2)[:, :keys]
    if kind == "padded_rows":  # rows of D + 1 elements: no 16-byte alignment, element-wise loads
        buffer = torch.randn(batch, max_len, heads, head_dim + 1, generator=g).to(DEVICE, dtype)
        return buffer[:, :keys, :, :head_dim]
    if kind == "offset_base":  # base pointer one element past a 16-byte boundary
        numel = batch * max_len * heads * head_dim
        flat = torch.randn(numel + 1, generator=g).to(DEVICE, dtype)
        return flat[1:].view(batch, max_len, heads, head_dim)[:, :keys]
    raise ValueError(kind)


# -- correctness ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("shared_mask", [True, False], ids=["shared", "per_batch"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, head_dim, shared_mask, num_splits):
    batch, rows, keys, heads = 3, 37, 700, 2
    q, k, v = random_qkv(batch, rows, keys, heads, head_dim, dtype)
    masks = random_masks(1 if shared_mask else batch, rows, keys)
    check_against_reference(q, k, v, masks, 1 / math.sqrt(head_dim), num_splits)


@pytest.mark.parametrize("keys", [1, 31, 32, 33, 5000])
@pytest.mark.parametrize("rows", [1, 2, 15, 16, 17, 64, 300])
def test_shapes(rows, keys):
    """Partial row groups (16 rows) and partial key tiles (32 keys), up to S = 300 and L = 5000."""
    q, k, v = random_qkv(2, rows, keys, 2, 128, torch.bfloat16, seed=rows * 7 + keys)
    masks = random_masks(2, rows, keys, seed=rows + keys)
    for num_splits in (0, 1, 3):
        check_against_reference(q, k, v, masks, 1 / math.sqrt(128), num_splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_long_keys_one_row(dtype, head_dim):
    """Plain autoregressive decoding: one row over 5000 keys, where the automatic choice splits."""
    q, k, v = random_qkv(1, 1, 5000, 4, head_dim, dtype, seed=3)
    masks = [torch.tensor([[x]], dtype=torch.int32, device=DEVICE) for x in (4990, 4990, 5000)]
    for num_splits in (0, 1, 3):
        check_against_reference(q, k, v, masks, 1 / math.sqrt(head_dim), num_splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_step_masks(dtype):
    """A realistic step: per-sequence cache lengths, re-encoded rows (causal) and an active window."""
    cache_lens = [1000, 37, 4000]
    reencoded, window = 8, 32
    masks = decode_step_masks(cache_lens, reencoded, window)
    keys = max(cache_lens) + reencoded + window
    q, k, v = random_qkv(len(cache_lens), reencoded + window, keys, 3, 64, dtype, seed=5)
    for num_splits in (0, 1, 3):
        check_against_reference(q, k, v, masks, 0.125, num_splits)


@pytest.mark.parametrize("kind", ["row_major", "head_major", "padded_rows", "offset_base"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_cache_views(kind, dtype):
    batch, rows, keys, heads, head_dim = 2, 20, 777, 3, 64
    k = cache_view(kind, batch, keys, heads, head_dim, dtype, seed=1)
    v = cache_view(kind, batch, keys, heads, head_dim, dtype, seed=2)
    assert not k.is_contiguous() and k.stride(-1) == 1
    q = random_qkv(batch, rows, 1, heads, head_dim, dtype, seed=4)[0]
    masks = random_masks(batch, rows, keys, seed=9)
    for num_splits in (0, 1, 3):
        out = check_against_reference(q, k, v, masks, 0.125, num_splits)
        # The element-wise load path must compute exactly what the 16-byte path computes.
        same = run_kernel(q, k.contiguous(), v.contiguous(), masks, 0.125, num_splits)
        assert torch.equal(out, same)


def test_strided_queries():
    batch, rows, keys, heads, head_dim = 2, 24, 300, 4, 128
    _, k, v = random_qkv(batch, 1, keys, heads, head_dim, torch.float16, seed=6)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(batch, heads, rows, head_dim + 8, generator=g).to(DEVICE, torch.float16)[..., :head_dim]
    q = q.transpose(1, 2)  # [B, S, H, D] with arbitrary strides in dims 0-2
    masks = random_masks(1, rows, keys, seed=6)
    out = check_against_reference(q, k, v, masks, 0.1, 0)
    assert torch.equal(out, run_kernel(q.contiguous(), k, v, masks, 0.1, 0))


@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_rows_without_keys_are_zeros(num_splits):
    q, k, v = random_qkv(2, 19, 100, 2, 64, torch.float32, seed=8)
    zeros = torch.zeros(1, 19, dtype=torch.int32, device=DEVICE)
    empty_window = torch.full_like(zeros, 50)  # window_start == window_end: empty
    out = run_kernel(q, k, v, [zeros, empty_window, empty_window], 0.125, num_splits)
    assert torch.equal(out, torch.zeros_like(out))


def test_no_keys_at_all():
    q, _, _ = random_qkv(2, 5, 1, 2, 64, torch.bfloat16)
    k = v = torch.empty(2, 0, 2, 64, device=DEVICE, dtype=torch.bfloat16)
    zeros = torch.zeros(2, 5, dtype=torch.int32, device=DEVICE)
    for num_splits in (0, 1, 3):
        out = run_kernel(q, k, v, [zeros, zeros, zeros], 0.125, num_splits)
        assert torch.equal(out, torch.zeros_like(out))


def test_empty_query():
    _, k, v = random_qkv(2, 1, 10, 2, 64, torch.float16)
    q = torch.empty(2, 0, 2, 64, device=DEVICE, dtype=torch.float16)
    zeros = torch.zeros(1, 0, dtype=torch.int32, device=DEVICE)
    assert run_kernel(q, k, v, [zeros, zeros, zeros], 0.125, 0).shape == (2, 0, 2, 64)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_key_returns_its_value_exactly(dtype, num_splits):
    """A row that sees a single key outputs that key's value bit for bit (weight exactly 1)."""
    batch, rows, keys, heads = 2, 6, 200, 2
    q, k, v = random_qkv(batch, rows, keys, heads, 128, dtype, seed=11)
    key_of_row = torch.tensor([[0, 5, 31, 32, 150, 199]], dtype=torch.int32, device=DEVICE)
    zeros = torch.zeros_like(key_of_row)
    out = run_kernel(q, k, v, [zeros, key_of_row, key_of_row + 1], 0.3, num_splits)
    expected = v[:, key_of_row[0].long()]  # [B, S, H, D]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_scores_stay_finite(dtype):
    """Scores in the hundreds: the online max keeps exp2f in range."""
    q, k, v = random_qkv(2, 17, 900, 2, 64, dtype, seed=12, spread=4.0)
    masks = random_masks(2, 17, 900, seed=12)
    for num_splits in (0, 1, 3):
        check_against_reference(q, k, v, masks, 1.0, num_splits)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_negative_and_zero_scale(scale):
    """A negative scale flips which keys dominate; scale 0 averages the allowed values."""
    q, k, v = random_qkv(2, 21, 400, 2, 64, torch.float32, seed=15)
    masks = random_masks(1, 21, 400, seed=15)
    for num_splits in (0, 1, 3):
        check_against_reference(q, k, v, masks, scale, num_splits)


def test_split_counts_agree():
    """Any split count gives the same function (up to float32 rounding), including more splits than tiles."""
    q, k, v = random_qkv(1, 9, 2000, 2, 64, torch.float32, seed=13)
    masks = random_masks(1, 9, 2000, seed=13)
    single = run_kernel(q, k, v, masks, 0.125, 1)
    for num_splits in (0, 2, 7, 64, 100):
        split = run_kernel(q, k, v, masks, 0.125, num_splits)
        torch.testing.assert_close(split, single, rtol=1e-5, atol=1e-6)


def test_deterministic():
    q, k, v = random_qkv(2, 40, 3000, 2, 128, torch.bfloat16, seed=14)
    masks = random_masks(2, 40, 3000, seed=14)
    for num_splits in (0, 1, 3):
        first = run_kernel(q, k, v, masks, 0.1, num_splits)
        assert torch.equal(first, run_kernel(q, k, v, masks, 0.1, num_splits))


# -- errors --------------------------------------------------------------------------------------------

def valid_args(batch=2, rows=3, keys=10, heads=2, head_dim=64, dtype=torch.float16):
    q, k, v = random_qkv(batch, rows, keys, heads, head_dim, dtype)
    masks = random_masks(batch, rows, keys)
    return {"q": q, "k": k, "v": v, "prefix_end": masks[0], "window_start": masks[1], "window_end": masks[2],
            "scale": 0.125, "num_splits": 0}


def call(args):
    return _C.decode_attention_cuda(args["q"], args["k"], args["v"], args["prefix_end"], args["window_start"],
                                    args["window_end"], args["scale"], args["num_splits"])


ERROR_CASES = {
    "q_on_cpu": (lambda a: a.update(q=a["q"].cpu()), r"q must be a CUDA tensor"),
    "k_on_cpu": (lambda a: a.update(k=a["k"].cpu()), r"k must be a CUDA tensor"),
    "q_3_dims": (lambda a: a.update(q=a["q"][0]), r"q must have 4 dims \[B, S, H, D\], got 3"),
    "v_5_dims": (lambda a: a.update(v=a["v"][None]), r"v must have 4 dims \[B, L, H, D\], got 5"),
    "q_float64": (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()),
                  r"q must be float32, float16 or bfloat16, got Double"),
    "head_dim_32": (lambda a: a.update(q=a["q"][..., :32], k=a["k"][..., :32], v=a["v"][..., :32]),
                    r"head dim D must be 64 or 128, got 32"),
    "k_dtype": (lambda a: a.update(k=a["k"].float()), r"k must have q's dtype Half, got Float"),
    "k_heads": (lambda a: a.update(k=a["k"][:, :, :1]),
                r"k must have shape \[B, L, H, D\] = \[2, L, 2, 64\]"),
    "k_batch": (lambda a: a.update(k=a["k"][:1], v=a["v"][:1]), r"k must have shape"),
    "v_shape": (lambda a: a.update(v=a["v"][:, :5]), r"v must have k's shape"),
    "k_stride": (lambda a: a.update(k=a["k"].transpose(2, 3).contiguous().transpose(2, 3)),
                 r"k must have stride\(-1\) == 1"),
    "q_stride": (lambda a: a.update(q=a["q"].transpose(2, 3).contiguous().transpose(2, 3)),
                 r"q must have stride\(-1\) == 1"),
    "mask_dtype": (lambda a: a.update(prefix_end=a["prefix_end"].long()),
                   r"prefix_end must be an int32 tensor, got Long"),
    "mask_device": (lambda a: a.update(window_start=a["window_start"].cpu()),
                    r"window_start must be on q's device"),
    "mask_dims": (lambda a: a.update(window_end=a["window_end"][0]),
                  r"window_end must have 2 dims \[Bm, S\]"),
    "mask_rows": (lambda a: a.update(prefix_end=a["prefix_end"][:, :2]),
                  r"prefix_end must have S = 3 columns"),
    "mask_batch": (lambda a: a.update(window_start=torch.cat([a["window_start"]] * 2)),
                   r"window_start must have Bm = 1 \(shared by the batch\) or Bm = B = 2 rows"),
    "mask_contiguous": (lambda a: a.update(window_end=a["window_end"].t().contiguous().t()),
                        r"window_end must be contiguous"),
    "mask_bm_mismatch": (lambda a: a.update(prefix_end=a["prefix_end"][:1]), r"must have the same Bm"),
    "negative_splits": (lambda a: a.update(num_splits=-1),
                        r"num_splits must be >= 0 \(0 = automatic\), got -1"),
    "scale_nan": (lambda a: a.update(scale=float("nan")), r"scale must be finite"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_messages(case):
    mutate, message = ERROR_CASES[case]
    args = valid_args()
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        call(args)


def test_valid_args_run():
    """The baseline of the error cases is itself valid."""
    call(valid_args())
