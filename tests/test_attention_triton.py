"""The Triton attention kernels (forward, both backward modes, log-sum-exp) against the reference on
masks from every constructor, and the harness training with them.

On a CPU machine these run in the Triton interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``)
in float32 and float16 only: the interpreter computes bfloat16 dot products wrongly. Tests marked
``cuda`` run the compiled kernels in bfloat16 at the paper's shapes.

Tolerance (DESIGN §9, flash-attn's rule): against a float64 truth, the kernel's error may be at most
twice the error of the reference computed in the kernel's dtype, plus a small absolute term.
"""

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hdlm_kernels as hk
from hdlm_kernels.masks import IntervalMask
from hdlm_kernels.masks.inference import CONFIGS, CONTEXTS, WINDOWS

triton_attention = pytest.importorskip("hdlm_kernels.attention.triton_attention")

pytestmark = pytest.mark.usefixtures("single_thread")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ABSOLUTE = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_within_reference_error(ours, low_reference, truth, name, atol):
    """flash-attn's rule: |ours - truth| <= 2 |reference in the low precision - truth| + atol."""
    ours_error = (ours.double() - truth).abs().max().item()
    reference_error = (low_reference.double() - truth).abs().max().item()
    assert ours_error <= 2 * reference_error + atol, (
        f"{name}: max error {ours_error:.3g} vs the low-precision reference's {reference_error:.3g}")


def random_inputs(mask, batch, heads, head_dim, dtype, seed=0, value_dim=None):
    g = torch.Generator().manual_seed(seed)
    Q, K = mask.num_rows, mask.key_length
    q = torch.randn(batch, Q, heads, head_dim, generator=g)
    k = torch.randn(batch, K, heads, head_dim, generator=g)
    v = torch.randn(batch, K, heads, value_dim or head_dim, generator=g)
    grad = torch.randn(batch, Q, heads, value_dim or head_dim, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)], grad.to(DEVICE, dtype)


def outputs_and_grads(fn, q, k, v, grad):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    return {"out": out, "dq": dq, "dk": dk, "dv": dv}


def check_against_reference(mask, batch=2, heads=2, head_dim=32, dtype=torch.float32, scale=None,
                            deterministic=True, value_dim=None, seed=0):
    mask = mask.to(DEVICE)
    (q, k, v), grad = random_inputs(mask, batch, heads, head_dim, dtype, seed, value_dim)
    ours = outputs_and_grads(
        lambda q, k, v: hk.attention.attention(q, k, v, mask, scale, backend="triton", deterministic=deterministic),
        q, k, v, grad)
    low = outputs_and_grads(lambda q, k, v: hk.attention.attention_ref(q, k, v, mask, scale), q, k, v, grad)
    truth = outputs_and_grads(lambda q, k, v: hk.attention.attention_ref(q, k, v, mask, scale),
                              q.double(), k.double(), v.double(), grad.double())
    for name in ("out", "dq", "dk", "dv"):
        assert ours[name].dtype == dtype and ours[name].shape == truth[name].shape
        assert_within_reference_error(ours[name], low[name], truth[name], name, ABSOLUTE[dtype])
    return ours


# -- masks from every constructor ------------------------------------------------------------------

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


@pytest.mark.parametrize("name", sorted(MASKS))
def test_masks_from_every_constructor_float32(name):
    check_against_reference(MASKS[name])


@pytest.mark.parametrize("name", ["inference-shifted-block_causal-full", "packed-slide-shifted",
                                  "packed-block-aligned"])
def test_float16(name):
    check_against_reference(MASKS[name], dtype=torch.float16)


def test_packed_slide_masks_differ_per_sequence():
    mask = MASKS["packed-slide-aligned"]
    assert mask.batch == 2 and not torch.equal(mask.prefix_end[0], mask.prefix_end[1])


def test_kv_cached_rows_fewer_queries_than_keys():
    # A cached call computes only the window rows over every key.
    sched = hk.schedules.block(70, 8, 4)
    mask = hk.masks.inference(sched, 20, "shifted", "causal", "full")
    a, _ = sched.split(20)
    window = mask.rows(slice(a, None))
    assert window.num_rows < window.key_length
    check_against_reference(window, batch=3, heads=1)


def test_empty_rows_give_zero_outputs_and_gradients():
    g = torch.Generator().manual_seed(3)
    Q, K = 45, 37
    prefix_end = torch.randint(0, K + 1, (2, Q), generator=g)
    start = torch.randint(0, K + 1, (2, Q), generator=g)
    end = torch.minimum(start + torch.randint(0, 9, (2, Q), generator=g), torch.tensor(K))
    empty = torch.tensor([0, 5, 31, 32, 44])
    prefix_end[:, empty], start[:, empty], end[:, empty] = 0, 7, 7
    prefix_end[1, :33] = 0  # batch 1: the whole first query tile but row 32 is empty or window-only
    start[1, :33] = end[1, :33]
    mask = IntervalMask(prefix_end, start, end, K)
    ours = check_against_reference(mask)
    assert ours["out"][:, empty].abs().max() == 0
    assert ours["dq"][:, empty].abs().max() == 0


@pytest.mark.parametrize("head_dim,value_dim", [(64, 64), (24, 40)])
def test_head_dims_and_a_value_dim_that_differs(head_dim, value_dim):
    check_against_reference(MASKS["packed-block-aligned"], heads=1, head_dim=head_dim, value_dim=value_dim)


def test_scale_and_shared_mask_over_a_larger_batch():
    mask = MASKS["inference-aligned-causal-causal"]
    assert mask.batch == 1
    check_against_reference(mask, batch=3, heads=1, scale=0.3)


def test_non_contiguous_inputs():
    mask = MASKS["packed-block-shifted"].to(DEVICE)
    (q, k, v), grad = random_inputs(mask, 2, 2, 32, torch.float32)
    qkv = torch.stack([q, k, v], dim=2)  # [B, S, 3, H, D] as a fused projection produces
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    ours = outputs_and_grads(lambda q, k, v: hk.attention.attention(q, k, v, mask, backend="triton"),
                             q, k, v, grad)
    ref = outputs_and_grads(lambda q, k, v: hk.attention.attention_ref(q, k, v, mask), q, k, v, grad)
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), Q=st.integers(1, 80), K=st.integers(1, 80), H=st.integers(1, 2),
       head_dim=st.sampled_from([16, 32]), shared=st.booleans(), deterministic=st.booleans(),
       seed=st.integers(0, 2**16))
def test_random_intervals_and_shapes(B, Q, K, H, head_dim, shared, deterministic, seed):
    # Arbitrary overlapping, empty and full intervals: tiles of every kind, at every edge.
    g = torch.Generator().manual_seed(seed)
    rows = 1 if shared else B
    draw = lambda: torch.randint(0, K + 1, (rows, Q), generator=g)  # noqa: E731
    prefix_end, x, y = draw(), draw(), draw()
    prefix_end = torch.where(torch.rand(rows, Q, generator=g) < 0.2, 0, prefix_end)
    mask = IntervalMask(prefix_end, torch.minimum(x, y), torch.maximum(x, y), K)
    check_against_reference(mask, batch=B, heads=H, head_dim=head_dim, deterministic=deterministic, seed=seed)


# -- backward modes and the log-sum-exp ----------------------------------------------------------------

def test_atomic_dq_matches_the_reference():
    check_against_reference(MASKS["packed-slide-aligned"], deterministic=False)


def test_deterministic_backward_is_bitwise_reproducible():
    mask = MASKS["packed-block-aligned"].to(DEVICE)
    (q, k, v), grad = random_inputs(mask, 2, 2, 32, torch.float32)
    run = lambda q, k, v: hk.attention.attention(q, k, v, mask, backend="triton", deterministic=True)  # noqa: E731
    first, second = outputs_and_grads(run, q, k, v, grad), outputs_and_grads(run, q, k, v, grad)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_log_sum_exp_matches_the_reference_and_is_minus_infinity_on_empty_rows():
    mask = IntervalMask(torch.tensor([[0, 3, 9, 0]]), torch.tensor([[0, 0, 2, 5]]), torch.tensor([[0, 0, 4, 9]]), 9)
    mask = mask.to(DEVICE)
    (q, k, v), _ = random_inputs(mask, 2, 3, 32, torch.float32)
    out, lse = triton_attention.attention_forward_triton(q, k, v, mask)
    assert lse.shape == (2, 3, 4) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, hk.attention.attention_lse_ref(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert torch.isneginf(lse[:, :, 0]).all() and out[:, 0].abs().max() == 0


def test_lse_merges_attention_over_disjoint_key_sets():
    # Attention over [0, K) equals the lse-weighted merge of attention over [0, s) and [s, K).
    K, s = 50, 19
    rows = torch.arange(40)[None]
    whole = IntervalMask(torch.full_like(rows, K), torch.zeros_like(rows), torch.zeros_like(rows), K).to(DEVICE)
    left = IntervalMask(torch.full_like(rows, s), torch.zeros_like(rows), torch.zeros_like(rows), K).to(DEVICE)
    right = IntervalMask(torch.zeros_like(rows), torch.full_like(rows, s), torch.full_like(rows, K), K).to(DEVICE)
    (q, k, v), _ = random_inputs(whole, 1, 2, 32, torch.float32)
    forward = triton_attention.attention_forward_triton
    (o1, l1), (o2, l2) = forward(q, k, v, left), forward(q, k, v, right)
    lse = torch.logaddexp(l1, l2)
    w1, w2 = (torch.exp(l - lse).transpose(1, 2)[..., None] for l in (l1, l2))
    torch.testing.assert_close(w1 * o1 + w2 * o2, forward(q, k, v, whole)[0], rtol=1e-5, atol=1e-6)


def test_no_queries_or_no_keys():
    zeros = lambda n: torch.zeros(1, n, dtype=torch.int32)  # noqa: E731
    mask = IntervalMask(zeros(0), zeros(0), zeros(0), 4).to(DEVICE)
    q = torch.randn(2, 0, 2, 32, device=DEVICE)
    k = torch.randn(2, 4, 2, 32, device=DEVICE)
    assert hk.attention.attention(q, k, k, mask, backend="triton").shape == (2, 0, 2, 32)
    mask = IntervalMask(zeros(3), zeros(3), zeros(3), 0).to(DEVICE)
    q = torch.randn(2, 3, 2, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 0, 2, 32, device=DEVICE, requires_grad=True)
    out = hk.attention.attention(q, k, k, mask, backend="triton")
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


# -- choice of backend and errors ---------------------------------------------------------------------

def test_auto_uses_triton_on_cuda_and_the_reference_on_cpu():
    mask = MASKS["packed-block-aligned"]
    (q, k, v), _ = random_inputs(mask.to(DEVICE), 2, 1, 32, torch.float32)
    expected = "triton" if DEVICE.type == "cuda" else "reference"
    auto = hk.attention.attention(q, k, v, mask.to(DEVICE))
    assert torch.equal(auto, hk.attention.attention(q, k, v, mask.to(DEVICE), backend=expected))


@pytest.mark.skipif(not triton_attention.interpreted(), reason="the interpreter's bfloat16 limitation")
def test_bfloat16_is_refused_in_the_interpreter():
    mask = MASKS["packed-block-aligned"]
    (q, k, v), _ = random_inputs(mask, 2, 1, 32, torch.bfloat16)
    with pytest.raises(TypeError, match="interpreter cannot take bfloat16"):
        hk.attention.attention(q, k, v, mask, backend="triton")


@pytest.mark.parametrize("dtype,head_dim,error,message", [
    (torch.float64, 32, TypeError, "float16, bfloat16 or float32 tensors, got torch.float64"),
    (torch.float32, 288, ValueError, "head dims up to 256, got 288"),
])
def test_unsupported_inputs_are_refused(dtype, head_dim, error, message):
    mask = MASKS["packed-block-aligned"].to(DEVICE)
    (q, k, v), _ = random_inputs(mask, 1, 1, head_dim, dtype)
    with pytest.raises(error, match=message):
        hk.attention.attention(q, k, v, mask, backend="triton")
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        triton_attention.attention_forward_triton(q.float()[..., :32], k.float()[..., :32], v.float()[..., :32],
                                                  mask, deterministic="yes")


# -- the harness trains with the kernels ---------------------------------------------------------------

def test_tiny_training_run_matches_the_reference_step_by_step(tmp_path):
    from hdlm_reference.data import TokenDataset, bundled_corpus_path, load_tokens
    from hdlm_reference.model import DiT, ModelConfig
    from hdlm_reference.objective import ObjectiveConfig, PackedObjective
    from hdlm_reference.tokenizer import ByteTokenizer
    from hdlm_reference.trainer import TrainConfig, train

    data = TokenDataset(load_tokens(bundled_corpus_path(), ByteTokenizer())[:4096], 32)
    losses = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = DiT(ModelConfig.preset("tiny", family="epsilon", attention_backend=backend))
        objective = PackedObjective(ObjectiveConfig(schedule="block", width=8), model.config.vocab_size, 32, seed=5)
        config = TrainConfig(lr=3e-3, warmup_steps=1, total_steps=3, batch_size=2, seq_len=32, log_every=1,
                             out_dir=str(tmp_path / backend), seed=11, progress=False, device=DEVICE.type,
                             bf16=False)
        train(model, objective, data, config)
        records = [line for line in (tmp_path / backend / "metrics.jsonl").read_text().splitlines()
                   if '"loss"' in line]
        losses[backend] = [json.loads(line)["loss"] for line in records]
    assert len(losses["triton"]) == 3
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["reference"]),
                               rtol=1e-4, atol=1e-5)


# -- GPU: bfloat16 at the paper's shapes ---------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("schedule", ["block", "slide"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paper_shapes_on_gpu(head_dim, schedule, dtype):
    d = 1024
    sched = hk.schedules.block(d, 16, 16) if schedule == "block" else hk.schedules.slide(d, 256)
    context = "block_causal" if schedule == "block" else "causal"
    tokens = torch.randint(0, 50257, (4, d), generator=torch.Generator().manual_seed(0))
    mask = hk.packing.pack(tokens, sched, "aligned", context, "full", generator=torch.Generator().manual_seed(1)).mask
    for deterministic in (True, False):
        check_against_reference(mask, batch=4, heads=12, head_dim=head_dim, dtype=dtype,
                                deterministic=deterministic)
