"""hk.attention.decode: the cache write, the Triton split-KV path against the reference (interpreter on
a CPU machine, fp32/fp16), the errors, and cached generation through the Triton backend."""

import pytest
import torch

import hdlm_kernels as hk
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

@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["dense_window", "mask"])
def test_decode_never_makes_the_host_wait(backend, with_mask):
    """decode with its checks on (the default) issues no op that waits for the device: the checks are
    recorded on the device, the keys read are [0, max_len) under the mask, and the dense window and its
    tile map are built from cache_len on the device (once per cache_len value version)."""
    q, k_cache, v_cache, cache_len, k_new, v_new = decode_problem()
    mask = None
    if with_mask:
        ends = (cache_len[:, None] + torch.arange(1, q.shape[1] + 1, device=DEVICE)).to(torch.int32)
        mask = IntervalMask(ends, torch.zeros_like(ends), torch.zeros_like(ends), k_cache.shape[1])
    errors = hk.attention.DecodeErrors(DEVICE)
    with torch.no_grad():
        expected = hk.attention.decode(q, k_cache.clone(), v_cache.clone(), cache_len, k_new, v_new, mask,
                                       backend=backend, errors=errors)
        with HostSyncs(armed=False) as syncs:
            _ = hk.attention.decode(q, k_cache, v_cache, cache_len, k_new, v_new, mask, backend=backend)
            syncs.armed = True
            out = hk.attention.decode(q, k_cache, v_cache, cache_len, k_new, v_new, mask, backend=backend,
                                      errors=errors)
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
