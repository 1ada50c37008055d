"""hdlm_reference.model.DiT: the official state_dict layout, initialization, forward modes
(full, packed, KV-cached incremental), per-token conditioning and positions, and errors."""

import pytest
import torch
import torch.nn.functional as F

import hdlm_kernels as hk
from hdlm_kernels.masks import IntervalMask
from hdlm_reference.model import DiT, ModelConfig

# -- the official state_dict (docs/pretrained.md, formats) -----------------------
_HIDDEN, _VOCAB, _COND = 768, 50258, 128
_BLOCK_KEYS = [
    ("norm1.weight", (768,)),
    ("attn_qkv.weight", (2304, 768)),
    ("attn_out.weight", (768, 768)),
    ("norm2.weight", (768,)),
    ("mlp.0.weight", (3072, 768)),
    ("mlp.0.bias", (3072,)),
    ("mlp.2.weight", (768, 3072)),
    ("mlp.2.bias", (768,)),
]
_GAMMA_BLOCK_KEYS = [("adaLN_modulation.weight", (4608, 128)), ("adaLN_modulation.bias", (4608,))]


def official_state_dict_layout(family):
    """[(key, shape)] of the official HDLM (ε) / HDLM_Gamma (γ) checkpoints, in state_dict order."""
    block = _BLOCK_KEYS + (_GAMMA_BLOCK_KEYS if family == "gamma" else [])
    layout = [("vocab_embed.embedding", (50258, 768)), ("rotary_emb.inv_freq", (32,))]
    layout += [(f"blocks.{i}.{key}", shape) for i in range(12) for key, shape in block]
    layout += [("output_layer.norm_final.weight", (768,)), ("output_layer.linear.weight", (50258, 768)),
               ("output_layer.linear.bias", (50258,))]
    if family == "gamma":
        layout += [("sigma_map.mlp.0.weight", (128, 256)), ("sigma_map.mlp.0.bias", (128,)),
                   ("sigma_map.mlp.2.weight", (128, 128)), ("sigma_map.mlp.2.bias", (128,))]
    return layout


def small_on_meta(family):
    with torch.device("meta"):
        return DiT(ModelConfig.preset("small", family=family))


@pytest.mark.parametrize("family", ["epsilon", "gamma"])
def test_small_state_dict_is_the_official_layout(family):
    state = small_on_meta(family).state_dict()
    assert [(key, tuple(value.shape)) for key, value in state.items()] == official_state_dict_layout(family)
    assert all(value.dtype == torch.float32 for value in state.values())
    # Parameter counts of docs/official-code.md §4 (inv_freq is a buffer).
    count = sum(value.numel() for key, value in state.items() if key != "rotary_emb.inv_freq")
    assert count == {"epsilon": 162_246_482, "gamma": 169_429_074}[family]


@pytest.mark.parametrize("family", ["epsilon", "gamma"])
def test_synthetic_official_state_dict_loads_strictly(family):
    model = small_on_meta(family)
    synthetic = {key: torch.empty(shape, device="meta") for key, shape in official_state_dict_layout(family)}
    result = model.load_state_dict(synthetic, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    del synthetic["output_layer.linear.bias"]
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(synthetic, strict=True, assign=True)


# -- helpers -------------------------------------------------------------------------------------
def tiny(family="epsilon", dtype=torch.float64, seed=0, **overrides):
    """A tiny model with every parameter random (the zero inits would hide most of the network)."""
    torch.manual_seed(seed)
    model = DiT(ModelConfig.preset("tiny", family=family, **overrides)).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * 0.3)
    return model


def causal_mask(S):
    zeros = torch.zeros(1, S, dtype=torch.int32)
    return IntervalMask(torch.arange(1, S + 1)[None], zeros, zeros, S)


def random_inputs(B, S, vocab_size=257, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (B, S), generator=g)
    sigma = torch.rand(B, S, generator=g, dtype=dtype) * 3
    return ids, torch.arange(S).expand(B, S), sigma


# -- initialization and shapes ----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["epsilon", "gamma"])
def test_fresh_model_logits_are_the_output_bias(family):
    model = DiT(ModelConfig.preset("tiny", family=family)).eval()
    ids, pos, sigma = random_inputs(2, 12, dtype=torch.float32)
    with torch.no_grad():
        logits = model(ids, pos, causal_mask(12), sigma)
        assert logits.shape == (2, 12, 257) and logits.dtype == torch.float32
        assert torch.equal(logits, torch.zeros_like(logits))
        model.output_layer.linear.bias.copy_(torch.randn(257))
        logits = model(ids, pos, causal_mask(12), sigma)
    assert torch.equal(logits, model.output_layer.linear.bias.detach().expand(2, 12, -1))


@pytest.mark.parametrize("family", ["epsilon", "gamma"])
def test_state_dict_round_trip_reproduces_the_model(family):
    source, target = tiny(family, torch.float32, seed=1), tiny(family, torch.float32, seed=2)
    target.load_state_dict(source.state_dict(), strict=True)
    ids, pos, sigma = random_inputs(2, 9, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(source(ids, pos, causal_mask(9), sigma), target(ids, pos, causal_mask(9), sigma))


def test_preset_options():
    config = ModelConfig.preset("tiny", family="gamma", vocab_size=300, attention_backend="flex")
    assert (config.vocab_size, config.mask_id, config.family) == (300, 299, "gamma")
    assert config.attention_backend == "flex"
    assert config.head_dim == 16
    with pytest.raises(ValueError, match="unknown name 'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown family 'delta'"):
        ModelConfig.preset("tiny", family="delta")
    with pytest.raises(ValueError, match="ModelConfig.attention_backend: attention has no backend 'fast'; its "
                                         "backends are 'auto', 'kernels', 'reference', 'flex', 'triton'"):
        ModelConfig.preset("tiny", attention_backend="fast")


def test_backends_are_refused_where_configured_when_the_op_lacks_them():
    # "cuda" is a decode backend only: the model's uncached attention cannot take it, its KV-cached calls can.
    with pytest.raises(ValueError, match="ModelConfig.attention_backend: attention has no backend 'cuda'"):
        ModelConfig.preset("tiny", attention_backend="cuda")
    config = ModelConfig.preset("tiny", decode_backend="cuda")
    assert (config.attention_backend, config.decode_backend) == ("reference", "cuda")
    with pytest.raises(ValueError, match="ModelConfig.decode_backend: decode has no backend 'cudnn'"):
        ModelConfig.preset("tiny", decode_backend="cudnn")
    with pytest.raises(ValueError, match="must be an even integer"):
        ModelConfig(vocab_size=10, hidden_size=12, num_layers=1, num_heads=4)


# -- logits rows --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["epsilon", "gamma"])
def test_logits_rows_select_rows_of_the_full_forward(family):
    model = tiny(family)
    B, S = 2, 10
    ids, pos, sigma = random_inputs(B, S)
    mask = causal_mask(S)
    with torch.no_grad():
        full = model(ids, pos, mask, sigma)
        shared = torch.tensor([7, 2, 9])
        torch.testing.assert_close(model(ids, pos, mask, sigma, logits_rows=shared), full[:, shared],
                                   rtol=0, atol=1e-12)
        per_sequence = torch.tensor([[0, 5], [9, 3]])
        torch.testing.assert_close(model(ids, pos, mask, sigma, logits_rows=per_sequence),
                                   torch.stack([full[0, [0, 5]], full[1, [9, 3]]]), rtol=0, atol=1e-12)
        chosen = torch.rand(B, S, generator=torch.Generator().manual_seed(0)) < 0.4
        torch.testing.assert_close(model(ids, pos, mask, sigma, logits_rows=chosen), full[chosen],
                                   rtol=0, atol=1e-12)
        # the generation loop's form: flat row-major indices, and no value checks
        index = chosen.reshape(-1).nonzero().squeeze(1)
        torch.testing.assert_close(model(ids, pos, mask, sigma, logits_index=index, check=False), full[chosen],
                                   rtol=0, atol=1e-12)
        with pytest.raises(ValueError, match="pass logits_rows or logits_index, not both"):
            model(ids, pos, mask, sigma, logits_rows=chosen, logits_index=index)
        with pytest.raises(TypeError, match=r"logits_index must be an int64 tensor \[N\]"):
            model(ids, pos, mask, sigma, logits_index=index.int())
        with pytest.raises(ValueError, match=r"logits_index must lie in \[0, B·S = 20\)"):
            model(ids, pos, mask, sigma, logits_index=torch.tensor([20]))


# -- conditioning and positions ----------------------------------------------------------------------
def test_weighted_token_embedding_is_eq_12():
    model = tiny("gamma", gamma=0.5)
    ids, _, sigma = random_inputs(2, 6)
    E = model.vocab_embed.embedding
    keep = torch.exp(-0.5 * sigma)[..., None]
    expected = keep * E[ids] + (1 - keep) * E[-1]
    torch.testing.assert_close(model.vocab_embed(ids, sigma, 0.5), expected, rtol=1e-14, atol=1e-14)
    assert torch.equal(model.vocab_embed(ids), E[ids])


def test_gamma_conditioning_is_per_token():
    """Changing σ̄ of one cell changes the rows that see it and no other row (causal mask)."""
    model = tiny("gamma")
    ids, pos, sigma = random_inputs(1, 8)
    changed = sigma.clone()
    changed[0, 5] += 1.0
    with torch.no_grad():
        before, after = model(ids, pos, causal_mask(8), sigma), model(ids, pos, causal_mask(8), changed)
    assert torch.equal(before[0, :5], after[0, :5])
    assert (before[0, 5:] - after[0, 5:]).abs().amax(-1).min() > 1e-6


def test_epsilon_family_ignores_sigma():
    model = tiny("epsilon")
    ids, pos, sigma = random_inputs(1, 6)
    with torch.no_grad():
        assert torch.equal(model(ids, pos, causal_mask(6), sigma), model(ids, pos, causal_mask(6)))


def test_positions_are_per_token_and_per_sequence():
    """Two sequences with the same tokens and different positions in one batch each get their own
    rotary angles (the official cache reuses the first sequence's positions for the whole batch)."""
    model = tiny("epsilon")
    ids, _, _ = random_inputs(1, 7)
    ids = ids.expand(2, 7)
    positions = torch.stack([torch.arange(7), torch.tensor([0, 3, 4, 9, 10, 11, 20])])
    mask = causal_mask(7)
    with torch.no_grad():
        batched = model(ids, positions, mask)
        alone = [model(ids[b:b + 1], positions[b:b + 1], mask)[0] for b in range(2)]
        shifted = model(ids[:1], positions[:1] + 13, mask)[0]
    torch.testing.assert_close(batched[0], alone[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(batched[1], alone[1], rtol=0, atol=1e-12)
    assert not torch.allclose(batched[0], batched[1])
    # Rotary attention depends on position differences only.
    torch.testing.assert_close(shifted, alone[0], rtol=1e-9, atol=1e-9)


def test_flex_backend_gives_the_reference_logits():
    model = tiny("gamma", dtype=torch.float32)
    flex = tiny("gamma", dtype=torch.float32, attention_backend="flex")
    ids, pos, sigma = random_inputs(2, 9, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(flex(ids, pos, causal_mask(9), sigma),
                                   model(ids, pos, causal_mask(9), sigma), rtol=1e-4, atol=1e-4)


# -- incremental (KV-cached) forward ---------------------------------------------------------------------
@pytest.mark.parametrize("family", ["epsilon", "gamma"])
@pytest.mark.parametrize("config,context,window", [("aligned", "block_causal", "full"),
                                                   ("aligned", "causal", "causal"),
                                                   ("shifted", "block_causal", "causal")])
def test_kv_cached_generation_equals_full_forward(family, config, context, window):
    """Replay every step of τ_Block: feed cells [length, K) with the cache (rows settled since the last
    step re-encoded in prefix mode, then the window), compare with the uncached forward over all K
    cells, advance the cache by the cells that became final. Window tokens change from step to step."""
    model = tiny(family)
    sched = hk.schedules.block(24, 8, 2)
    B = 2
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (B, sched.length + 1), generator=g)
    cache = model.new_kv_cache(B, max_len=sched.length + 1)
    assert cache.dtype == torch.float64
    with torch.no_grad():
        for t in range(sched.num_steps):
            a, _ = sched.split(t)
            mask = hk.masks.inference(sched, t, config, context, window)
            K = mask.key_length
            cells = torch.arange(K)
            noisy = torch.randint(0, 257, (B, K), generator=g)
            ids = torch.where(cells < a, tokens[:, :K], noisy)  # settled cells keep their tokens
            sigma = torch.where(cells < a, 0.0, torch.rand(B, K, generator=g, dtype=torch.float64) + 0.5)
            positions = cells.expand(B, K)
            full = model(ids, positions, mask, sigma)
            length = int(cache.length[0])
            new = slice(length, None)
            incremental = model(ids[:, new], positions[:, new], mask.rows(new), sigma[:, new], kv_cache=cache)
            torch.testing.assert_close(incremental, full[:, new], rtol=1e-10, atol=1e-10, msg=f"step {t}")
            cache.advance(a - length)


def test_kv_cached_forward_with_per_sequence_lengths():
    """Sequences whose caches hold different numbers of final cells share one call (causal context)."""
    model = tiny("gamma")
    B, S, n = 2, 11, 4
    ids, positions, sigma = random_inputs(B, S, seed=4)
    with torch.no_grad():
        full = model(ids, positions, causal_mask(S), sigma)
        cache = model.new_kv_cache(B, max_len=S)
        model(ids[:, :5], positions[:, :5], causal_mask(5), sigma[:, :5], kv_cache=cache)
        lengths = torch.tensor([3, 5])
        cache.advance(lengths)
        cells = lengths[:, None] + torch.arange(n)  # [[3..6], [5..8]]
        K = int(lengths.max()) + n
        zeros = torch.zeros(B, n, dtype=torch.int32)
        mask = IntervalMask(cells + 1, zeros, zeros, K)
        rows = torch.arange(B)[:, None]
        logits = model(ids[rows, cells], cells, mask, sigma[rows, cells], kv_cache=cache,
                       logits_rows=torch.tensor([0, 3]))
    torch.testing.assert_close(logits, full[rows, cells[:, [0, 3]]], rtol=1e-10, atol=1e-10)


def test_kv_cached_forward_errors():
    model = tiny("epsilon")
    ids, positions, _ = random_inputs(2, 6)
    cache = model.new_kv_cache(2, max_len=8)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"position_ids must be the cells the new rows are written to"):
            model(ids, positions + 1, causal_mask(6), kv_cache=cache)
        with pytest.raises(ValueError, match="the mask has key_length 7, but the keys have length 6"):
            model(ids, positions, IntervalMask(torch.full((1, 6), 7, dtype=torch.int32),
                                               torch.zeros(1, 6, dtype=torch.int32),
                                               torch.zeros(1, 6, dtype=torch.int32), 7), kv_cache=cache)
        with pytest.raises(ValueError, match=r"\(num_layers, batch, heads, head_dim\) = \(2, 2, 4, 16\)"):
            model(ids, positions, causal_mask(6), kv_cache=hk.KVCache(2, 1, 8, 4, 16, torch.float64))
        with pytest.raises(TypeError, match=r"k_cache must have q's dtype and device \(torch.float64, cpu\), "
                                            "got torch.float32"):
            model(ids, positions, causal_mask(6), kv_cache=model.new_kv_cache(2, 8, dtype=torch.float32))
        with pytest.raises(ValueError, match="the mask has key_length 6, more than the cache's max_len 4"):
            model(ids, positions, causal_mask(6), kv_cache=model.new_kv_cache(2, 4))
    with pytest.raises(RuntimeError, match="inference-only.*torch.no_grad"):
        model(ids, positions, causal_mask(6), kv_cache=cache)


# -- packed training forward ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["epsilon", "gamma"])
def test_packed_batch_trains_and_matches_the_inference_windows(family):
    model = tiny(family)
    sched = hk.schedules.block(24, 8, 2)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    packed = hk.packing.pack(tokens, sched, "aligned", "block_causal", "full",
                             generator=torch.Generator().manual_seed(6))
    sigma = sched.noise_time(packed.levels).double()

    model.train()
    logits = model(packed.input_ids, packed.position_ids, packed.mask, sigma,
                   logits_rows=packed.loss_positions)
    assert logits.shape == (int(packed.loss_positions.sum()), 257)
    loss = F.cross_entropy(logits, packed.target_ids[packed.loss_positions])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    # Each packed interval computes exactly the window rows of its step at inference.
    model.eval()
    with torch.no_grad():
        logits = model(packed.input_ids, packed.position_ids, packed.mask, sigma)
        for b in range(2):
            for (a, end), t in zip(packed.intervals[b].tolist(), packed.steps[b].tolist()):
                cells = (packed.loss_positions[b] & (packed.position_ids[b] >= a)
                         & (packed.position_ids[b] < end)).nonzero().squeeze(1)
                mask = hk.masks.inference(sched, t, "aligned", "block_causal", "full")
                window = model(tokens[b:b + 1, :end], torch.arange(end)[None], mask,
                               sched.noise_time(sched.levels(t)[:end]).double()[None],
                               logits_rows=torch.arange(a, end))
                torch.testing.assert_close(logits[b, cells], window[0], rtol=1e-10, atol=1e-10)


def test_dropout_only_in_training():
    model = tiny("epsilon", dropout=0.5)
    ids, pos, _ = random_inputs(1, 6)
    with torch.no_grad():
        assert torch.equal(model(ids, pos, causal_mask(6)), model(ids, pos, causal_mask(6)))
        model.train()
        assert not torch.equal(model(ids, pos, causal_mask(6)), model(ids, pos, causal_mask(6)))


# -- errors ----------------------------------------------------------------------------------------
def test_forward_input_errors():
    model = tiny("gamma")
    ids, pos, sigma = random_inputs(2, 6)
    mask = causal_mask(6)
    with torch.no_grad():
        with pytest.raises(TypeError, match="the gamma family needs sigma"):
            model(ids, pos, mask)
        with pytest.raises(ValueError, match=r"sigma must have shape \[B=2, S=6\]"):
            model(ids, pos, mask, sigma[:, :5])
        with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=257\)"):
            model(ids + 300, pos, mask, sigma)
        with pytest.raises(ValueError, match=r"position_ids must have shape \[B=2, S=6\]"):
            model(ids, pos[:, :4], mask, sigma)
        with pytest.raises(ValueError, match="the mask has 6 query rows, but the queries have 5"):
            model(ids[:, :5], pos[:, :5], mask, sigma[:, :5])
        with pytest.raises(TypeError, match="mask must be an hdlm_kernels.masks.IntervalMask"):
            model(ids, pos, mask.to_dense(), sigma)
        with pytest.raises(ValueError, match=r"logits_rows must lie in \[0, 6\)"):
            model(ids, pos, mask, sigma, logits_rows=torch.tensor([6]))
        with pytest.raises(ValueError, match=r"bool logits_rows must have shape \[B=2, S=6\]"):
            model(ids, pos, mask, sigma, logits_rows=torch.ones(6, dtype=torch.bool))


def test_use_attention_backend_routes_every_block():
    model = DiT(ModelConfig.preset("tiny"))
    assert model.use_attention_backend("flex") is model
    assert model.config.attention_backend == "flex"
    assert all(block.attention_backend == block.decode_backend == "flex" for block in model.blocks)
    model.use_attention_backend("reference", decode_backend="cuda")
    assert (model.config.attention_backend, model.config.decode_backend) == ("reference", "cuda")
    assert all((b.attention_backend, b.decode_backend) == ("reference", "cuda") for b in model.blocks)
    with pytest.raises(ValueError, match="DiT.use_attention_backend: attention has no backend 'cudnn'"):
        model.use_attention_backend("cudnn")
    with pytest.raises(ValueError, match="DiT.use_attention_backend: attention has no backend 'cuda'"):
        model.use_attention_backend("cuda")
