"""hk.attention.decode: the cache write, the Triton split-KV path against the reference (interpreter on
a CPU machine, fp32/fp16), the errors and the device-side checks, no host synchronization, cached
generation through the Triton backend, torch.compile; and, on a GPU, both fused kernels (CUDA and
Triton) against a dense float64 reference by one contract."""

import math

import pytest
import torch

import hdlm_kernels as hk
from hdlm_kernels._extension import _C
from hdlm_kernels.masks import IntervalMask
from hdlm_reference.generate import generate
from hdlm_reference.model import DiT, ModelConfig
from host_syncs import HostSyncs

pytest.importorskip("hdlm_kernels.attention.triton_attention")

pytestmark = pytest.mark.usefixtures("single_thread")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ABSOLUTE = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def decode_problem(B=3, S=7, H=2, D=32, max_len=120, cache_len=(5, 40, 97), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache, v_cache = (torch.randn(B, max_len, H, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    q, k_new, v_new = (torch.randn(B, S, H, D, generator=g).to(DEVICE, dtype) for _ in range(3))
    return q, k_cache, v_cache, torch.tensor(cache_len, device=DEVICE), k_new, v_new


def naive_decode(q, k_cache, v_cache, cache_len, k_new, v_new, mask=None):
    """float64 softmax per sequence over cells [0, cache_len + S) of the written cache (or the mask)."""
    B, S = q.shape[:2]
    outs = []
    for b in range(B):
        n = int(cache_len[b])
        keys = torch.cat([k_cache[b, :n], k_new[b]]).double()
        values = torch.cat([v_cache[b, :n], v_new[b]]).double()
        allowed = torch.ones(S, n + S, dtype=torch.bool, device=q.device)
        if mask is not None:
            allowed = mask.to_dense()[min(b, mask.batch - 1), :, :n + S]
        scores = torch.einsum("shd,khd->hsk", q[b].double(), keys) * q.shape[-1] ** -0.5
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        outs.append(torch.einsum("hsk,khd->shd", probs, values))
    return torch.stack(outs)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_dense_window_over_per_sequence_prefixes(backend, num_splits):
    q, k_cache, v_cache, cache_len, k_new, v_new = decode_problem()
    truth = naive_decode(q, k_cache, v_cache, cache_len, k_new, v_new)
    with torch.no_grad():
        out = hk.attention.decode(q, k_cache, v_cache, cache_len, k_new, v_new, backend=backend,
                                  num_splits=num_splits if backend == "triton" else None)
    torch.testing.assert_close(out.double(), truth, rtol=0, atol=2e-6)
    # the rows were written at cache_len and the length is the caller's to advance
    for b, n in enumerate(cache_len.tolist()):
        assert torch.equal(k_cache[b, n:n + 7], k_new[b]) and torch.equal(v_cache[b, n:n + 7], v_new[b])
    assert cache_len.tolist() == [5, 40, 97]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unchecked_call_computes_the_same_rows(backend):
    """check=False (the generation loop's, which validates its plan once) skips only the device checks."""
    q, k_cache, v_cache, cache_len, k_new, v_new = decode_problem()
    K = int(cache_len.max()) + q.shape[1]
    mask = IntervalMask((cache_len[:, None] + 1 + torch.arange(7, device=DEVICE)).int(),
                        torch.zeros(3, 7, dtype=torch.int32, device=DEVICE),
                        torch.zeros(3, 7, dtype=torch.int32, device=DEVICE), K)
    args = (q, k_cache, v_cache, cache_len, k_new, v_new, mask)
    with torch.no_grad():
        checked = hk.attention.decode(*args, backend=backend)
        for b, n in enumerate(cache_len.tolist()):  # the unchecked call must write the rows again
            k_cache[b, n:n + 7] = 0
        unchecked = hk.attention.decode(*args, backend=backend, check=False)
    assert torch.equal(k_cache[1, 40:47], k_new[1])
    assert torch.equal(checked, unchecked)
    # Without a mask the dense window is built from cache_len on the device: no check is needed for it.
    dense_checked = hk.attention.decode(*args[:-1], backend=backend)
    dense_unchecked = hk.attention.decode(*args[:-1], backend=backend, check=False)
    assert torch.equal(dense_checked, dense_unchecked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_reencoded_rows_and_window_in_one_call(dtype, num_splits):
    # Rows 0-3 settled last step and are re-encoded block-causally (blocks of 4 over cells 0..43);
    # rows 4-9 are the active window, dense over everything written.
    B, P = 2, 40
    q, k_cache, v_cache, cache_len, k_new, v_new = decode_problem(B=B, S=10, max_len=64, cache_len=(P, P),
                                                                  dtype=dtype)
    cells = P + torch.arange(10)
    in_window = torch.arange(10) >= 4
    prefix_end = torch.where(in_window, P + 10, (cells // 4 + 1) * 4)
    mask = IntervalMask(prefix_end[None], torch.zeros(1, 10, dtype=torch.long), torch.zeros(1, 10, dtype=torch.long), P + 10).to(DEVICE)
    truth = naive_decode(q, k_cache, v_cache, cache_len, k_new, v_new, mask)
    with torch.no_grad():
        low = hk.attention.decode(q, k_cache.clone(), v_cache.clone(), cache_len, k_new, v_new, mask,
                                  backend="reference")
        ours = hk.attention.decode(q, k_cache, v_cache, cache_len, k_new, v_new, mask, backend="triton",
                                   num_splits=num_splits)
    ours_error = (ours.double() - truth).abs().max().item()
    assert ours_error <= 2 * (low.double() - truth).abs().max().item() + ABSOLUTE[dtype]


def test_one_query_row_and_an_empty_prefix():
    q, k_cache, v_cache, cache_len, k_new, v_new = decode_problem(B=2, S=1, cache_len=(0, 77))
    with torch.no_grad():
        out = hk.attention.decode(q, k_cache, v_cache, cache_len, k_new, v_new, backend="triton", num_splits=4)
    torch.testing.assert_close(out.double(), naive_decode(q, k_cache, v_cache, cache_len, k_new, v_new),
                               rtol=0, atol=2e-6)
    torch.testing.assert_close(out[0].double(), v_new[0].double(), rtol=0, atol=1e-6)  # only key: itself


@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "cache_len": torch.tensor([5, 40, 115], device=DEVICE)},
     "decode: the cache overflows: cache_len \\+ S = 122 > max_len = 120"),
    (lambda a: {**a, "cache_len": torch.tensor([5, -2, 7], device=DEVICE)},
     "decode: cache_len must be >= 0, got a smallest value of -2"),
    (lambda a: {**a, "mask": IntervalMask(torch.full((1, 7), 13), torch.zeros(1, 7, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long),
                                          13).to(DEVICE)}, "attend past cache_len \\+ S"),
])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_value_checks_are_recorded_on_the_device_and_raised_once(change, message, backend):
    """The checks that need values never stop the call: they are folded into a DecodeErrors on the
    device, and its check() (one host synchronization) raises them and clears."""
    q, k_cache, v_cache, cache_len, k_new, v_new = decode_problem()
    args = change(dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_len=cache_len, k_new=k_new, v_new=v_new))
    errors = hk.attention.DecodeErrors(DEVICE)
    with torch.no_grad():
        hk.attention.decode(**args, backend=backend, errors=errors)
        hk.attention.decode(**args, backend=backend, errors=errors, check=False)  # records nothing
    with pytest.raises(ValueError, match=message):
        errors.check()
    errors.check()  # cleared
    # By default a call records into the device's shared DecodeErrors.
    with torch.no_grad():
        hk.attention.decode(**args, backend=backend)
    with pytest.raises(ValueError, match=message):
        hk.attention.decode_errors(DEVICE).check()


def test_valid_calls_record_no_error():
    q, k_cache, v_cache, cache_len, k_new, v_new = decode_problem()
    errors = hk.attention.DecodeErrors(DEVICE)
    with torch.no_grad():
        hk.attention.decode(q, k_cache, v_cache, cache_len, k_new, v_new, errors=errors)
    assert errors.messages() == []
    with pytest.raises(TypeError, match="errors must be a DecodeErrors"):
        hk.attention.decode(q, k_cache, v_cache, cache_len, k_new, v_new, errors=errors.state)


@pytest.mark.parametrize("change,error,message", [
    (lambda a: {**a, **{name: a[name].repeat(1, 18, 1, 1)[:, :121] for name in ("q", "k_new", "v_new")}},
     ValueError, "the cache overflows: S = 121 rows > max_len = 120"),
    (lambda a: {**a, "mask": IntervalMask(*torch.ones(3, 1, 6, dtype=torch.long), 9).to(DEVICE)},
     ValueError, "the mask must have \\[1 or 3, 7\\] rows"),
    (lambda a: {**a, "cache_len": torch.tensor([1.0, 2.0, 3.0], device=DEVICE)}, ValueError,
     "cache_len must be an integer tensor of shape \\[B=3\\]"),
    (lambda a: {**a, "k_new": a["k_new"][:, :3]}, ValueError, "k_new and v_new must have shapes"),
    (lambda a: {**a, "v_cache": a["v_cache"].double()}, TypeError, "v_cache must have q's dtype"),
    (lambda a: {**a, "backend": "fast"}, ValueError, "decode has no backend 'fast'; its backends are .*'cuda'"),
    (lambda a: {**a, "num_splits": 0}, ValueError, "num_splits must be None or an int >= 1"),
])
def test_invalid_inputs_raise_clear_errors(change, error, message):
    q, k_cache, v_cache, cache_len, k_new, v_new = decode_problem()
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_len=cache_len, k_new=k_new, v_new=v_new)
    with torch.no_grad(), pytest.raises(error, match=message):
        hk.attention.decode(**change(args))


def test_decode_is_inference_only_and_cuda_needs_a_gpu():
    q, k_cache, v_cache, cache_len, k_new, v_new = decode_problem()
    with pytest.raises(RuntimeError, match="inference-only"):
        hk.attention.decode(q.requires_grad_(), k_cache, v_cache, cache_len, k_new, v_new)
    if DEVICE.type == "cpu":
        with torch.no_grad(), pytest.raises(RuntimeError, match="decode: backend='cuda' cannot run on cpu tensors"):
            hk.attention.decode(q, k_cache, v_cache, cache_len, k_new, v_new, backend="cuda")


# -- cached generation through the kernels -------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DiT(ModelConfig.preset("tiny", family="epsilon", dropout=0.0)).to(DEVICE).eval()


@pytest.mark.parametrize("sched,context,config", [
    (hk.schedules.block(24, 8, 2), "block_causal", "aligned"),
    (hk.schedules.slide(20, 6, 2), "causal", "shifted"),
], ids=["block", "slide-shifted"])
def test_cached_triton_generation_equals_the_reference(model, sched, context, config):
    # float32: exactly the same tokens, with prompts of different lengths per sequence.
    prompt = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(3))
    kwargs = dict(method="acs", eta=0.2, context=context, config=config, bos_id=0, prompt=prompt,
                  prompt_lengths=torch.tensor([0, 6, 3]), kv_cache=True, device=DEVICE)
    reference = generate(model, sched, 3, 99, attention_backend="reference", **kwargs)
    triton = generate(model, sched, 3, 99, attention_backend="triton", **kwargs)
    assert torch.equal(triton.tokens, reference.tokens)
    assert torch.equal(triton.tokens[1], torch.cat([prompt[1].to(DEVICE), triton.tokens[1, 6:]]))
    assert torch.equal(triton.tokens[2, :3], prompt[2, :3].to(DEVICE))


def test_prompt_lengths_are_validated(model):
    sched = hk.schedules.block(24, 8, 2)
    with pytest.raises(ValueError, match="prompt_lengths must lie in \\[0, P=4\\]"):
        generate(model, sched, 2, 1, prompt=torch.zeros(1, 4, dtype=torch.long), prompt_lengths=torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="prompt_lengths needs a prompt"):
        generate(model, sched, 2, 1, prompt_lengths=torch.tensor([1, 2]))


# -- GPU: bf16 and the CUDA backend ---------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_backends_in_low_precision(backend, dtype, head_dim):
    q, k_cache, v_cache, cache_len, k_new, v_new = decode_problem(B=4, S=64, H=12, D=head_dim, max_len=5000,
                                                                  cache_len=(0, 1000, 4096, 4936), dtype=dtype)
    truth = naive_decode(q, k_cache, v_cache, cache_len, k_new, v_new)
    with torch.no_grad():
        low = hk.attention.decode(q, k_cache.clone(), v_cache.clone(), cache_len, k_new, v_new, backend="reference")
        ours = hk.attention.decode(q, k_cache, v_cache, cache_len, k_new, v_new, backend=backend)
    assert (ours.double() - truth).abs().max() <= 2 * (low.double() - truth).abs().max() + ABSOLUTE[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bf16_generation_step_agrees_wherever_the_gumbel_margin_exceeds_the_logit_error(backend):
    """The bf16 rule: one step from the same state, the kernel's token equals the reference's on every
    row whose Gumbel-max margin (best minus second-best perturbed score under the reference logits)
    exceeds twice that row's largest logit difference, since no perturbation that small can swap them."""
    torch.manual_seed(0)
    model = DiT(ModelConfig.preset("small", family="epsilon", dropout=0.0)).cuda().to(torch.bfloat16).eval()
    sched = hk.schedules.block(256, 16, 16)
    x = torch.randint(0, 256, (4, 256), device="cuda")
    a, b = sched.split(100)
    mask = hk.masks.inference(sched, 100, "aligned", "block_causal", "full").rows(slice(a, None)).cuda()
    logits = {}
    for name in ("reference", backend):
        cache = model.new_kv_cache(4, max_len=256)
        with torch.no_grad():
            model.use_attention_backend(name)
            prefix = hk.masks.inference(sched, 100, "aligned", "block_causal", "full").rows(slice(0, a)).cuda()
            prefix = IntervalMask(prefix.prefix_end, prefix.window_start, prefix.window_end, a)
            model(x[:, :a], torch.arange(a, device="cuda").expand(4, -1), prefix, kv_cache=cache)
            cache.advance(a)
            logits[name] = model(x[:, a:b], torch.arange(a, b, device="cuda").expand(4, -1), mask,
                                 kv_cache=cache).double()
    V = logits["reference"].shape[-1]
    rows = torch.arange(4 * (b - a), device="cuda")
    noise = -torch.log(-torch.log(hk.sampling.uniform53(7, 100, 0, (rows[:, None] * V + torch.arange(V, device="cuda")))))
    reference_scores = logits["reference"].reshape(-1, V) + noise
    top2 = reference_scores.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    error = (logits[backend] - logits["reference"]).abs().reshape(-1, V).amax(-1)
    decided = margin > 2 * error
    tokens = {name: hk.sampling.gumbel_argmax(logits[name].reshape(-1, V), 7, 100, row_ids=rows)
              for name in logits}
    assert decided.float().mean() > 0.9  # the rule must cover most rows to mean anything
    assert torch.equal(tokens[backend][decided], tokens["reference"][decided])


# -- torch.compile -----------------------------------------------------------------------------------------

def _compile_problem():
    q, k_cache, v_cache, cache_len, k_new, v_new = decode_problem()
    S = q.shape[1]
    ends = (cache_len[:, None] + torch.arange(1, S + 1, device=DEVICE)).to(torch.int32)  # causal over the rows
    mask = IntervalMask(ends, torch.zeros_like(ends), torch.zeros_like(ends), int(cache_len.max()) + S)
    return q, k_cache, v_cache, cache_len, k_new, v_new, mask


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("check", [True, False])
def test_decode_compiles_without_graph_breaks(backend, check):
    # decode is the custom op hdlm_kernels::decode (it writes the cache in place): torch.compile traces through
    # it with its fake implementation, and the compiled call writes and attends exactly as the eager one.
    problem = _compile_problem()
    q, k_cache, v_cache, cache_len, k_new, v_new, mask = problem
    eager_cache = (k_cache.clone(), v_cache.clone())
    with torch.no_grad():
        expected = hk.attention.decode(q, *eager_cache, cache_len, k_new, v_new, mask, backend=backend)

        @torch.compile(fullgraph=True, backend="aot_eager")
        def step(q, k_cache, v_cache, cache_len, k_new, v_new, mask):
            return hk.attention.decode(q, k_cache, v_cache, cache_len, k_new, v_new, mask, backend=backend,
                                       check=check) * 2

        got = step(*problem)
    assert torch.equal(got, expected * 2)
    assert torch.equal(k_cache, eager_cache[0]) and torch.equal(v_cache, eager_cache[1])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_decode_compiles_without_graph_breaks_on_the_gpu(backend):
    test_decode_compiles_without_graph_breaks(backend, check=False)


def test_the_op_finds_the_callers_mask_and_its_tile_maps():
    # The custom op takes the mask's tensors; IntervalMask.of_tensors finds the caller's mask again, so the
    # tile map built once per mask is reused by every layer's call instead of being rebuilt per call.
    *_, mask = _compile_problem()
    tiles = mask.tiles(16, 16)
    same = IntervalMask.of_tensors(mask.prefix_end, mask.window_start, mask.window_end, mask.key_length)
    assert same is mask and same.tiles(16, 16) is tiles
    other = IntervalMask.of_tensors(mask.prefix_end.clone(), mask.window_start, mask.window_end, mask.key_length)
    assert other is not mask and torch.equal(other.prefix_end, mask.prefix_end)


# -- no host synchronization ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend,num_splits", [("reference", None), ("triton", None), ("triton", 3)])
@pytest.mark.parametrize("with_mask", [False, True], ids=["dense_window", "mask"])
def test_decode_never_makes_the_host_wait(backend, num_splits, with_mask):
    """decode with its checks on (the default) issues no op that waits for the device: the checks are
    recorded on the device, the keys read are [0, max_len) under the mask, and the dense window and its
    tile map are built from cache_len on the device (once per cache_len value version). With several
    splits, the fused merge's arrival counters are reused without a host read."""
    q, k_cache, v_cache, cache_len, k_new, v_new = decode_problem()
    mask = None
    if with_mask:
        ends = (cache_len[:, None] + torch.arange(1, q.shape[1] + 1, device=DEVICE)).to(torch.int32)
        mask = IntervalMask(ends, torch.zeros_like(ends), torch.zeros_like(ends), k_cache.shape[1])
    errors = hk.attention.DecodeErrors(DEVICE)
    with torch.no_grad():
        expected = hk.attention.decode(q, k_cache.clone(), v_cache.clone(), cache_len, k_new, v_new, mask,
                                       backend=backend, errors=errors, num_splits=num_splits)
        with HostSyncs(armed=False) as syncs:
            _ = hk.attention.decode(q, k_cache, v_cache, cache_len, k_new, v_new, mask, backend=backend,
                                    num_splits=num_splits)
            syncs.armed = True
            out = hk.attention.decode(q, k_cache, v_cache, cache_len, k_new, v_new, mask, backend=backend,
                                      errors=errors, num_splits=num_splits)
            syncs.armed = False
    assert syncs.seen == []
    assert torch.equal(out, expected)
    errors.check()


def test_the_dense_window_is_built_once_per_cache_len_version():
    from hdlm_kernels.attention.decode import _dense_window

    q, k_cache, v_cache, cache_len, k_new, v_new = decode_problem()
    first = _dense_window(cache_len, 7, 120)
    assert _dense_window(cache_len, 7, 120) is first  # every layer of one step
    cache_len += 1  # the step advanced the lengths in place: a new window
    second = _dense_window(cache_len, 7, 120)
    assert second is not first and torch.equal(second.prefix_end[:, 0], (cache_len + 7).int())


# ======================================================================================================
# The fused decode kernels against a dense float64 reference written here (GPU): softmax over the allowed
# keys of each row, zeros for rows without keys. Both fused backends answer to one contract: the CUDA
# operator ``_C.decode_attention_cuda`` and the Triton split-KV path. Covered: float32/float16/bfloat16,
# head dims 64 and 128, masks shared by the batch and per sequence, empty rows, K/V as strided views of
# a larger cache buffer, strided q, forced split-KV (1 and 3 splits, the merge) and the automatic choice,
# S from 1 to 300 and L up to 5000, and the CUDA operator's error messages.
#
# Tolerance (flash-attn's rule): against the float64 truth, the kernel's error may be at most twice the
# error of the same dense reference computed in the kernel's dtype, plus a small absolute term.
# ======================================================================================================

GPU = torch.device("cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_cuda_operator = pytest.mark.skipif(_C is None or not hasattr(_C, "decode_attention_cuda"),
                                         reason="hdlm_kernels._C has no decode_attention_cuda (not built with CUDA)")
FUSED = [pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda_operator]),
         pytest.param("triton", marks=pytest.mark.cuda)]


# -- the reference -------------------------------------------------------------------------------------

def allowed_keys(prefix_end, window_start, window_end, batch, keys):
    """Bool [B, S, L]: row i of sequence b may attend key c (the definition in docs/conventions.md, masks)."""
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


def run_kernel(backend, q, k, v, masks, scale, num_splits):
    """The fused kernel of ``backend`` over cells ``k``/``v`` (no cache write): the CUDA operator, or the
    Triton split-KV path; ``num_splits`` 0 lets either choose."""
    if backend == "cuda":
        out = _C.decode_attention_cuda(q, k, v, *masks, scale, num_splits)
    else:
        from hdlm_kernels.attention.triton_attention import attention_split_kv_triton

        mask = IntervalMask(*masks, k.shape[1], check=False)
        out = attention_split_kv_triton(q, k, v, mask, scale, num_splits or None)[0].contiguous()
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert out.is_contiguous()
    return out


def check_against_reference(backend, q, k, v, masks, scale, num_splits):
    """Runs the kernel and asserts the low-precision tolerance, exact zeros on empty rows and no NaN."""
    out = run_kernel(backend, q, k, v, masks, scale, num_splits)
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
    return [t.to(GPU, dtype) for t in (q, k, v)]


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
    return [t.to(GPU, torch.int32).contiguous() for t in (prefix_end, window_start, window_end)]


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
    return [torch.tensor(t, dtype=torch.int32, device=GPU) for t in (prefix_end, window_start, window_end)]


def cache_view(kind, batch, keys, heads, head_dim, dtype, seed):
    """K or V as the kernel sees them when decoding: a [B, L, H, D] view of a larger buffer."""
    g = torch.Generator().manual_seed(seed)
    max_len = keys + 37
    if kind == "row_major":  # KVCache layout [B, max_len, H, D], sliced to the first L cells
        buffer = torch.randn(batch, max_len, heads, head_dim, generator=g).to(GPU, dtype)
        return buffer[:, :keys]
    if kind == "head_major":  # [B, H, max_len, D] transposed: dims 1 and 2 swap strides
        buffer = torch.randn(batch, heads, max_len, head_dim, generator=g).to(GPU, dtype)
        return buffer.transpose(1, 2)[:, :keys]
    if kind == "padded_rows":  # rows of D + 1 elements: no 16-byte alignment, element-wise loads
        buffer = torch.randn(batch, max_len, heads, head_dim + 1, generator=g).to(GPU, dtype)
        return buffer[:, :keys, :, :head_dim]
    if kind == "offset_base":  # base pointer one element past a 16-byte boundary
        numel = batch * max_len * heads * head_dim
        flat = torch.randn(numel + 1, generator=g).to(GPU, dtype)
        return flat[1:].view(batch, max_len, heads, head_dim)[:, :keys]
    raise ValueError(kind)


# -- correctness ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("shared_mask", [True, False], ids=["shared", "per_batch"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, dtype, head_dim, shared_mask, num_splits):
    batch, rows, keys, heads = 3, 37, 700, 2
    q, k, v = random_qkv(batch, rows, keys, heads, head_dim, dtype)
    masks = random_masks(1 if shared_mask else batch, rows, keys)
    check_against_reference(backend, q, k, v, masks, 1 / math.sqrt(head_dim), num_splits)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("keys", [1, 31, 32, 33, 5000])
@pytest.mark.parametrize("rows", [1, 2, 15, 16, 17, 64, 300])
def test_shapes(backend, rows, keys):
    """Partial row groups (16 rows) and partial key tiles (32 keys), up to S = 300 and L = 5000."""
    q, k, v = random_qkv(2, rows, keys, 2, 128, torch.bfloat16, seed=rows * 7 + keys)
    masks = random_masks(2, rows, keys, seed=rows + keys)
    for num_splits in (0, 1, 3):
        check_against_reference(backend, q, k, v, masks, 1 / math.sqrt(128), num_splits)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("rows", [127, 128, 129, 255, 256, 257, 520])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_row_blocks(backend, dtype, head_dim, rows):
    """The CUDA tensor-core kernel's row blocks (256 rows at D = 64, 128 at D = 128, each reading the
    K/V tiles once for all its rows): full, partial and several blocks, with and without splits."""
    q, k, v = random_qkv(2, rows, 900, 2, head_dim, dtype, seed=rows)
    masks = random_masks(2, rows, 900, seed=rows + head_dim)
    for num_splits in (0, 1, 3):
        check_against_reference(backend, q, k, v, masks, 1 / math.sqrt(head_dim), num_splits)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_long_keys_one_row(backend, dtype, head_dim):
    """Plain autoregressive decoding: one row over 5000 keys, where the automatic choice splits."""
    q, k, v = random_qkv(1, 1, 5000, 4, head_dim, dtype, seed=3)
    masks = [torch.tensor([[x]], dtype=torch.int32, device=GPU) for x in (4990, 4990, 5000)]
    for num_splits in (0, 1, 3):
        check_against_reference(backend, q, k, v, masks, 1 / math.sqrt(head_dim), num_splits)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_step_masks(backend, dtype):
    """A realistic step: per-sequence cache lengths, re-encoded rows (causal) and an active window."""
    cache_lens = [1000, 37, 4000]
    reencoded, window = 8, 32
    masks = decode_step_masks(cache_lens, reencoded, window)
    keys = max(cache_lens) + reencoded + window
    q, k, v = random_qkv(len(cache_lens), reencoded + window, keys, 3, 64, dtype, seed=5)
    for num_splits in (0, 1, 3):
        check_against_reference(backend, q, k, v, masks, 0.125, num_splits)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["row_major", "head_major", "padded_rows", "offset_base"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_cache_views(backend, kind, dtype):
    batch, rows, keys, heads, head_dim = 2, 20, 777, 3, 64
    k = cache_view(kind, batch, keys, heads, head_dim, dtype, seed=1)
    v = cache_view(kind, batch, keys, heads, head_dim, dtype, seed=2)
    assert not k.is_contiguous() and k.stride(-1) == 1
    q = random_qkv(batch, rows, 1, heads, head_dim, dtype, seed=4)[0]
    masks = random_masks(batch, rows, keys, seed=9)
    for num_splits in (0, 1, 3):
        out = check_against_reference(backend, q, k, v, masks, 0.125, num_splits)
        # The element-wise load path must compute exactly what the 16-byte path computes.
        same = run_kernel(backend, q, k.contiguous(), v.contiguous(), masks, 0.125, num_splits)
        assert torch.equal(out, same)


@pytest.mark.parametrize("backend", FUSED)
def test_strided_queries(backend):
    batch, rows, keys, heads, head_dim = 2, 24, 300, 4, 128
    _, k, v = random_qkv(batch, 1, keys, heads, head_dim, torch.float16, seed=6)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(batch, heads, rows, head_dim + 8, generator=g).to(GPU, torch.float16)[..., :head_dim]
    q = q.transpose(1, 2)  # [B, S, H, D] with arbitrary strides in dims 0-2
    masks = random_masks(1, rows, keys, seed=6)
    out = check_against_reference(backend, q, k, v, masks, 0.1, 0)
    assert torch.equal(out, run_kernel(backend, q.contiguous(), k, v, masks, 0.1, 0))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_rows_without_keys_are_zeros(backend, num_splits):
    q, k, v = random_qkv(2, 19, 100, 2, 64, torch.float32, seed=8)
    zeros = torch.zeros(1, 19, dtype=torch.int32, device=GPU)
    empty_window = torch.full_like(zeros, 50)  # window_start == window_end: empty
    out = run_kernel(backend, q, k, v, [zeros, empty_window, empty_window], 0.125, num_splits)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", FUSED)
def test_no_keys_at_all(backend):
    q, _, _ = random_qkv(2, 5, 1, 2, 64, torch.bfloat16)
    k = v = torch.empty(2, 0, 2, 64, device=GPU, dtype=torch.bfloat16)
    zeros = torch.zeros(2, 5, dtype=torch.int32, device=GPU)
    for num_splits in (0, 1, 3):
        out = run_kernel(backend, q, k, v, [zeros, zeros, zeros], 0.125, num_splits)
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", FUSED)
def test_empty_query(backend):
    _, k, v = random_qkv(2, 1, 10, 2, 64, torch.float16)
    q = torch.empty(2, 0, 2, 64, device=GPU, dtype=torch.float16)
    zeros = torch.zeros(1, 0, dtype=torch.int32, device=GPU)
    assert run_kernel(backend, q, k, v, [zeros, zeros, zeros], 0.125, 0).shape == (2, 0, 2, 64)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_key_returns_its_value_exactly(backend, dtype, num_splits):
    """A row that sees a single key outputs that key's value bit for bit (weight exactly 1)."""
    batch, rows, keys, heads = 2, 6, 200, 2
    q, k, v = random_qkv(batch, rows, keys, heads, 128, dtype, seed=11)
    key_of_row = torch.tensor([[0, 5, 31, 32, 150, 199]], dtype=torch.int32, device=GPU)
    zeros = torch.zeros_like(key_of_row)
    out = run_kernel(backend, q, k, v, [zeros, key_of_row, key_of_row + 1], 0.3, num_splits)
    expected = v[:, key_of_row[0].long()]  # [B, S, H, D]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_scores_stay_finite(backend, dtype):
    """Scores in the hundreds: the online max keeps exp2f in range."""
    q, k, v = random_qkv(2, 17, 900, 2, 64, dtype, seed=12, spread=4.0)
    masks = random_masks(2, 17, 900, seed=12)
    for num_splits in (0, 1, 3):
        check_against_reference(backend, q, k, v, masks, 1.0, num_splits)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_negative_and_zero_scale(backend, scale):
    """A negative scale flips which keys dominate; scale 0 averages the allowed values."""
    q, k, v = random_qkv(2, 21, 400, 2, 64, torch.float32, seed=15)
    masks = random_masks(1, 21, 400, seed=15)
    for num_splits in (0, 1, 3):
        check_against_reference(backend, q, k, v, masks, scale, num_splits)


@pytest.mark.parametrize("backend", FUSED)
def test_split_counts_agree(backend):
    """Any split count gives the same function (up to float32 rounding), including more splits than tiles."""
    q, k, v = random_qkv(1, 9, 2000, 2, 64, torch.float32, seed=13)
    masks = random_masks(1, 9, 2000, seed=13)
    single = run_kernel(backend, q, k, v, masks, 0.125, 1)
    for num_splits in (0, 2, 7, 64, 100):
        split = run_kernel(backend, q, k, v, masks, 0.125, num_splits)
        torch.testing.assert_close(split, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_deterministic(backend):
    q, k, v = random_qkv(2, 40, 3000, 2, 128, torch.bfloat16, seed=14)
    masks = random_masks(2, 40, 3000, seed=14)
    for num_splits in (0, 1, 3):
        first = run_kernel(backend, q, k, v, masks, 0.1, num_splits)
        assert torch.equal(first, run_kernel(backend, q, k, v, masks, 0.1, num_splits))


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


@pytest.mark.cuda
@needs_cuda_operator
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_cuda_operator_error_messages(case):
    mutate, message = ERROR_CASES[case]
    args = valid_args()
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        call(args)


@pytest.mark.cuda
@needs_cuda_operator
def test_cuda_backend_refuses_a_head_dim_before_writing_the_cache():
    q, k_cache, v_cache, cache_len, k_new, v_new = (t.to(GPU) for t in decode_problem(D=32))
    before = k_cache.clone()
    with torch.no_grad(), pytest.raises(ValueError, match=r"backend='cuda' takes head dim D = 64 or 128, got 32"):
        hk.attention.decode(q, k_cache, v_cache, cache_len, k_new, v_new, backend="cuda")
    assert torch.equal(k_cache, before)


@pytest.mark.cuda
@needs_cuda_operator
def test_cuda_operator_valid_args_run():
    """The baseline of the error cases is itself valid."""
    call(valid_args())
