"""The attention kernels' launch configurations: decode window classes, the split-KV choice for the
GPU's SM count, the dispatchable launches the sm_90 gate compiles, and the opt-in autotuning's
pruning (docs/attention.md, "Launch configurations")."""

import pytest
import torch

from hdlm_kernels.masks import IntervalMask

ta = pytest.importorskip("hdlm_kernels.attention.triton_attention")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("rows,expected", [(1, 16), (16, 16), (17, 32), (32, 32), (33, None), (None, None)])
def test_window_classes(rows, expected):
    assert ta.window_class(rows) == expected
    config = ta.forward_config(64, torch.bfloat16, rows=rows)
    assert config.block_m == (expected or ta.forward_config(64, torch.bfloat16).block_m)


def test_the_interpreter_keeps_its_own_tiles():
    for rows in (None, 4, 100):
        assert ta.forward_config(64, torch.float32, on_gpu=False, rows=rows) == ta.LaunchConfig(32, 32)
    assert ta.backward_config(128, torch.float16, on_gpu=False) == ta.LaunchConfig(32, 32)
    assert ta.backward_dq_config(128, torch.float16, on_gpu=False) == ta.LaunchConfig(32, 32)


@pytest.mark.parametrize("programs,key_tiles,expected", [
    (12, 100, 16),   # 264 / 12 = 22 programs per query tile wanted: capped at 16
    (96, 100, 3),    # ceil(264 / 96)
    (100, 2, 2),     # never more splits than key tiles
    (132, 100, 1),   # the SMs are full already
    (500, 100, 1),
])
def test_split_kv_fills_132_sms_about_twice(programs, key_tiles, expected):
    assert ta.choose_splits(programs, key_tiles, 132) == expected


def test_the_gate_compiles_what_dispatch_chooses():
    """Every (head dim, dtype) the package accepts has each pass, with the configuration dispatch reads."""
    launches = ta.dispatchable_launches()
    seen = {(l.name, l.config["D"], l.config["dtype"]) for l in launches}
    names = ("attention.forward", "attention.forward_split_kv", "attention.decode_forward", "attention.backward_delta",
             "attention.backward_dkdv", "attention.backward_dkdv_atomic_dq", "attention.backward_dq")
    for D in (32, 64, 96, 128, 256):
        for dtype in ("float16", "bfloat16", "float32"):
            assert {(n, D, dtype) for n in names} <= seen
    # The 16-bit tile loads go through TMA descriptors wherever the layout allows (every head dim the gate
    # compiles), float32 through pointers; the pointer-load variant is compiled too where
    # GATE_POINTER_LOADS says.
    with_tma = {(l.name, l.config["D"], l.config["dtype"]) for l in launches if l.config.get("tma") == "yes"}
    tile_passes = [n for n in names if n != "attention.backward_delta"]
    assert with_tma == {(n, D, dtype) for n in tile_passes for D in (32, 64, 96, 128, 256)
                        for dtype in ("float16", "bfloat16")}
    pointer = {(l.name, l.config["D"], l.config["dtype"]) for l in launches if l.config.get("tma") == "no"}
    assert {(n, D, str(dtype).replace("torch.", "")) for D, dtype in ta.GATE_POINTER_LOADS
            for n in ("attention.forward", "attention.backward_dkdv", "attention.backward_dq")} <= pointer
    for launch in launches:
        dtype = getattr(torch, launch.config["dtype"])
        c = launch.constexprs
        if launch.name == "attention.backward_delta":
            assert c["BLOCK_Q"] == ta.delta_block_q(launch.config["D"])
            continue
        if "TMA" in c:
            assert c["TMA"] == (launch.config["tma"] == "yes")
        if launch.name == "attention.backward_dq":
            expected = ta.backward_dq_config(launch.config["D"], dtype)
        elif launch.name.startswith("attention.backward"):
            expected = ta.backward_config(launch.config["D"], dtype)
        elif launch.name == "attention.decode_forward":
            expected = ta.forward_config(launch.config["D"], dtype, rows=c["BLOCK_M"])
        else:
            expected = ta.forward_config(launch.config["D"], dtype)
        assert (c["BLOCK_M"], c["BLOCK_N"], launch.options["num_warps"], launch.options["num_stages"]) == (
            expected.block_m, expected.block_n, expected.num_warps, expected.num_stages)
        assert launch.spill_free == (dtype != torch.float32 and launch.config["D"] <= 128)
        if launch.name.startswith("attention.forward") or launch.name == "attention.decode_forward":
            # The split-KV launches compile the fused merge; the training forward does not.
            assert c["SPLIT_KV"] == (launch.name != "attention.forward")
    # The merge runs inside the split-KV launch: no separate merge kernel is dispatched.
    assert not any("merge" in launch.name for launch in launches)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256])
def test_the_dq_pass_has_wgmma_tiles_in_16_bit(head_dim, dtype):
    """wgmma multiplies 64 rows per warp group: the dQ pass, whose products have M = its query rows, takes
    at least 64 of them at every head dim on a GPU. Up to D = 64 it shares the dK/dV pass's tile
    (one tile map); above, the dK/dV pass keeps its own (32 query rows x 64 keys, its products M = keys)."""
    dq, dkdv = ta.backward_dq_config(head_dim, dtype), ta.backward_config(head_dim, dtype)
    assert dq.block_m >= 64 and dq.block_n >= 32
    if head_dim <= 64:
        assert dq == dkdv
    else:
        assert dkdv == ta.LaunchConfig(32, 64, num_warps=8, num_stages=2)
        assert (dq.block_m, dq.block_n) != (dkdv.block_m, dkdv.block_n)


def test_float32_keeps_one_backward_tile():
    for head_dim in (32, 64, 96, 128, 256):
        assert ta.backward_dq_config(head_dim, torch.float32) == ta.backward_config(head_dim, torch.float32)


@pytest.mark.parametrize("dtype,head_dim", [(torch.float16, 96), (torch.float32, 40)])
def test_the_gpu_backward_tiles_compute_the_reference(monkeypatch, dtype, head_dim):
    """The GPU's 16-bit backward tiles at D = 96/128, run in the interpreter (float16, and float32 for the
    semantics): the dK/dV pass on 32 x 64 tiles and the dQ pass on 64 x 64 tiles with its own tile map,
    each map built once per tile shape without a host sync, the backward bit-reproducible, and the
    gradients those of the reference."""
    from host_syncs import HostSyncs

    from hdlm_kernels.attention.reference import attention_ref

    real_backward, real_dq = ta.backward_config, ta.backward_dq_config
    monkeypatch.setattr(ta, "backward_config", lambda d, t, on_gpu=True: real_backward(128, torch.float16))
    monkeypatch.setattr(ta, "backward_dq_config", lambda d, t, on_gpu=True: real_dq(128, torch.float16))
    dkdv_tile, dq_tile = ta.backward_config(head_dim, dtype), ta.backward_dq_config(head_dim, dtype)
    assert (dkdv_tile.block_m, dkdv_tile.block_n) == (32, 64)
    assert (dq_tile.block_m, dq_tile.block_n) == (64, 64)

    g = torch.Generator().manual_seed(7)
    B, Q, H = 2, 150, 2
    q, k, v, grad = (torch.randn(B, Q, H, head_dim, generator=g).to(dtype) for _ in range(4))
    rows = torch.arange(Q, dtype=torch.int32)
    # Blocks of 70 rows that see their own and earlier blocks (full and partial tiles at 64 x 64), a window
    # of 10 keys in the second sequence, and rows 20..29 of the first without keys.
    ends = torch.stack([torch.clamp((rows // 70 + 1) * 70, max=Q), torch.clamp((rows // 70) * 70, max=Q)])
    ends[0, 20:30] = 0
    starts = torch.stack([torch.zeros_like(rows), torch.clamp(rows - 5, min=0)])
    window_ends = torch.stack([torch.zeros_like(rows), torch.clamp(rows + 5, max=Q)])
    mask = IntervalMask(ends, starts, window_ends, Q)

    built, real_tiles = [], type(mask).tiles

    def recorded_tiles(self, block_m=128, block_n=128):
        fresh = (block_m, block_n) not in self._tiles
        with HostSyncs() as syncs:
            tiles = real_tiles(self, block_m, block_n)
        built.append(((block_m, block_n), fresh, syncs.seen))
        return tiles

    monkeypatch.setattr(type(mask), "tiles", recorded_tiles)
    first = _forward_backward(q, k, v, mask, grad)
    second = _forward_backward(q, k, v, mask, grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    fresh = [(shape, syncs) for shape, is_new, syncs in built if is_new]
    assert sorted(shape for shape, _ in fresh) == [(32, 32), (32, 64), (64, 64)]  # forward, dK/dV, dQ
    assert all(syncs == [] for _, syncs in fresh)
    assert {shape for shape, _, _ in built} == {(32, 32), (32, 64), (64, 64)}

    # The tolerance rule of the attention tests: within twice the error of the reference computed in
    # the same dtype, plus a small absolute term, against the float64 truth.
    monkeypatch.undo()
    low = _reference_gradients(attention_ref, q, k, v, mask, grad)
    truth = _reference_gradients(attention_ref, q.double(), k.double(), v.double(), mask, grad.double())
    for name, got, want, same_dtype in zip(("out", "dq", "dk", "dv"), first, truth, low):
        error = (got.double() - want).abs().max().item()
        reference_error = (same_dtype.double() - want).abs().max().item()
        assert error <= 2 * reference_error + {torch.float32: 1e-5, torch.float16: 1e-4}[dtype], name
    assert (first[1][0, 20:30] == 0).all()  # dQ of the rows without keys, written by the dQ pass


def _reference_gradients(attention_ref, q, k, v, mask, grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attention_ref(q, k, v, mask)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("block_m", ta.DECODE_WINDOW_CLASSES)
def test_decode_tiles_compute_the_reference(monkeypatch, block_m):
    """The GPU's decode tiles (16 or 32 query rows), run in the interpreter in float32."""
    from hdlm_kernels.attention.reference import attention_ref

    monkeypatch.setattr(ta, "forward_config", lambda head_dim, dtype, on_gpu=True, rows=None:
                        ta._decode_config(block_m, head_dim, dtype))
    g = torch.Generator().manual_seed(1)
    B, S, H, D, K = 2, 11, 2, 32, 150
    q, k, v = (torch.randn(B, n, H, D, generator=g) for n in (S, K, K))
    ends = torch.tensor([[60 + i for i in range(S)], [K - S + i + 1 for i in range(S)]], dtype=torch.int32)
    mask = IntervalMask(ends, torch.zeros_like(ends), torch.zeros_like(ends), K)
    for num_splits in (1, 3):
        out, _ = ta.attention_split_kv_triton(q, k, v, mask, num_splits=num_splits)
        torch.testing.assert_close(out, attention_ref(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_autotune_candidates_are_pruned_by_the_gate_limit():
    import triton

    from hdlm_kernels._kernel_launch import SMEM_PER_BLOCK

    configs = [triton.Config({}, num_warps=w, num_stages=s) for w in ta.AUTOTUNE_WARPS for s in ta.AUTOTUNE_STAGES]
    q32 = torch.empty(1, dtype=torch.float32)
    args = {"Q": q32, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 256, "BLOCK_DV": 256}
    kept = ta.prune_autotune_configs(configs, args)
    assert kept and all(ta.shared_memory_estimate(64, 64, 256, 256, 4, c.num_stages) <= SMEM_PER_BLOCK for c in kept)
    assert {c.num_stages for c in kept} == {s for s in ta.AUTOTUNE_STAGES
                                            if ta.shared_memory_estimate(64, 64, 256, 256, 4, s) <= SMEM_PER_BLOCK}
    # Small tiles keep every candidate.
    assert len(ta.prune_autotune_configs(configs, dict(args, BLOCK_D=64, BLOCK_DV=64))) == len(configs)


def test_autotune_is_a_gpu_option(monkeypatch):
    """HDLM_KERNELS_AUTOTUNE=1 changes nothing in the interpreter (nothing to time there)."""
    from hdlm_kernels.attention.reference import attention_ref

    monkeypatch.setenv(ta.AUTOTUNE_ENV, "1")
    assert ta.autotune_enabled()
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=g) for _ in range(3))
    ends = torch.arange(1, 41, dtype=torch.int32)[None]
    mask = IntervalMask(ends, torch.zeros_like(ends), torch.zeros_like(ends), 40)
    torch.testing.assert_close(ta.attention_triton(q, k, v, mask), attention_ref(q, k, v, mask), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the backward's fused delta preprocess

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 37, 3, 64), (1, 5, 2, 40), (2, 70, 1, 200)])
def test_fused_delta_equals_its_reference_twin(dtype, shape):
    from hdlm_kernels.attention.reference import attention_delta_ref

    g = torch.Generator().manual_seed(3)
    out, dout = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    got = ta.backward_delta_triton(out, dout)
    assert got.dtype == torch.float32 and got.shape == (shape[0], shape[2], shape[1])
    torch.testing.assert_close(got, attention_delta_ref(out, dout))


def test_fused_delta_reads_strided_rows():
    from hdlm_kernels.attention.reference import attention_delta_ref

    g = torch.Generator().manual_seed(4)
    both = torch.randn(2, 33, 2, 2, 48, generator=g)  # out and dout interleaved: row stride 2·H·D
    out, dout = both[:, :, 0], both[:, :, 1]
    torch.testing.assert_close(ta.backward_delta_triton(out, dout), attention_delta_ref(out, dout))


def test_fused_delta_names_a_bad_argument():
    with pytest.raises(ValueError, match="out and dout must have the same shape and dtype"):
        ta.backward_delta_triton(torch.zeros(1, 2, 1, 8), torch.zeros(1, 3, 1, 8))
    with pytest.raises(ValueError, match=r"dout must be a \[B, Q, H, Dv\] tensor"):
        ta.backward_delta_triton(torch.zeros(1, 2, 1, 8), torch.zeros(2, 8))


# ------------------------------------------------------------------ TMA descriptors or pointer loads

def test_tma_eligibility_is_the_descriptor_layout_rule():
    assert ta.tma_device(torch.device("cpu"))  # the interpreter runs the descriptor loads
    assert ta.TMA_DTYPES == (torch.float16, torch.bfloat16)
    q16, q32 = torch.zeros(1, 40, 1, 32, dtype=torch.float16), torch.zeros(1, 40, 1, 32)
    assert ta._use_tma(q16, q16, q16) and not ta._use_tma(q32, q32, q32)
    assert ta.tma_eligible(torch.zeros(2, 10, 3, 64, dtype=torch.float16))
    # 20 float16 values = 40-byte rows: a stride TMA cannot express.
    assert not ta.tma_eligible(torch.zeros(2, 10, 3, 20, dtype=torch.float16))
    assert ta.tma_eligible(torch.zeros(2, 10, 3, 20, dtype=torch.float32))  # 80-byte rows
    # A base address off the 16-byte grid, and a head dim that is not contiguous.
    assert not ta.tma_eligible(torch.zeros(2 * 10 * 3 * 64 + 1, dtype=torch.float16)[1:].view(2, 10, 3, 64))
    assert not ta.tma_eligible(torch.zeros(2, 10, 3, 64, 2)[..., 0])
    assert not ta.tma_eligible(torch.zeros(2, 0, 3, 64))


def _forward_backward(q, k, v, mask, grad, deterministic=True):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = ta.attention_triton(q, k, v, mask, deterministic=deterministic)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tma_and_pointer_loads_give_the_same_results(monkeypatch, dtype):
    """The same kernels with TMA=True (descriptors) and TMA=False (pointers), in the interpreter: equal
    bit for bit (both read zeros past the last row and head dim), and equal to the reference. float32
    loads through pointers on a GPU; here its descriptor path is run too, for the semantics."""
    from hdlm_kernels.attention.reference import attention_ref

    g = torch.Generator().manual_seed(5)
    B, Q, H, D = 2, 45, 2, 24
    q, k, v = (torch.randn(B, Q, H, D, generator=g).to(dtype) for _ in range(3))
    grad = torch.randn(B, Q, H, D, generator=g).to(dtype)
    ends = torch.randint(0, Q + 1, (B, Q), generator=g, dtype=torch.int32)
    starts = torch.randint(0, Q + 1, (B, Q), generator=g, dtype=torch.int32)
    mask = IntervalMask(ends // 2, torch.minimum(starts, ends), torch.maximum(starts, ends), Q)
    assert ta.tma_eligible(q)
    monkeypatch.setattr(ta, "TMA_DTYPES", (dtype,))
    real_tile_operand, loads = ta._tile_operand, []
    monkeypatch.setattr(ta, "_tile_operand", lambda t, rows, dim, tma: loads.append(tma) or
                        real_tile_operand(t, rows, dim, tma))
    with_tma = _forward_backward(q, k, v, mask, grad)
    assert loads and all(loads)  # every tile operand of the forward and both backward passes: a descriptor
    monkeypatch.setattr(ta, "tma_device", lambda device: False)
    loads.clear()
    with_pointers = _forward_backward(q, k, v, mask, grad)
    assert loads and not any(loads)
    for a, b in zip(with_tma, with_pointers):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref = attention_ref(qr, kr, vr, mask)
    ref.backward(grad.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    for got, want in zip(with_tma, (ref, qr.grad, kr.grad, vr.grad)):
        torch.testing.assert_close(got.double(), want.detach(), **tol)


# ------------------------------------------------------------------ no zero-fill of dQ, dK, dV

@pytest.mark.parametrize("deterministic", [True, False])
def test_gradient_buffers_are_not_zero_filled_and_every_element_is_written(monkeypatch, deterministic):
    """Rows without keys and keys without rows get zero gradients written by the kernels: the buffers
    come from torch.empty_like, here poisoned with NaN, and torch.zeros_like is not called for them (the
    non-deterministic pass's float32 dQ accumulator, summed by atomics, is the one zeroed buffer)."""
    from hdlm_kernels.attention.reference import attention_ref

    g = torch.Generator().manual_seed(6)
    B, Q, H, D = 2, 70, 2, 16
    q, k, v = (torch.randn(B, Q, H, D, generator=g) for _ in range(3))
    grad = torch.randn(B, Q, H, D, generator=g)
    ends = torch.full((B, Q), 40, dtype=torch.int32)  # keys 40..69: attended by no row
    ends[:, 3] = 0                                     # row 3 and the last query tile: no keys
    ends[:, 64:] = 0
    mask = IntervalMask(ends, torch.zeros_like(ends), torch.zeros_like(ends), Q)

    real_empty_like, zeros_like_calls = torch.empty_like, []

    def poisoned_empty_like(t, *args, **kwargs):
        return real_empty_like(t, *args, **kwargs).fill_(float("nan"))

    def recorded_zeros_like(t, *args, **kwargs):
        zeros_like_calls.append(tuple(t.shape))
        return torch.zeros(t.shape, dtype=t.dtype, device=t.device)

    monkeypatch.setattr(ta.torch, "empty_like", poisoned_empty_like)
    monkeypatch.setattr(ta.torch, "zeros_like", recorded_zeros_like)
    got = _forward_backward(q, k, v, mask, grad, deterministic=deterministic)
    monkeypatch.undo()
    assert (B, Q, H, D) not in zeros_like_calls  # (the tile map's own [B, Q] work may use zeros_like)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    ref = attention_ref(qr, kr, vr, mask)
    ref.backward(grad.double())
    for got_t, want in zip(got, (ref, qr.grad, kr.grad, vr.grad)):
        torch.testing.assert_close(got_t.double(), want.detach(), rtol=1e-5, atol=1e-5)
    assert (got[1][:, 3] == 0).all() and (got[1][:, 64:] == 0).all()  # dQ of rows without keys
    assert (got[2][:, 40:] == 0).all() and (got[3][:, 40:] == 0).all()  # dK, dV of unattended keys
