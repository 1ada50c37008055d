"""hk.KVCache: storage layout, writes at per-sequence cells, reads, lengths and errors."""

import pytest
import torch

import hdlm_kernels as hk


def rows(batch, n, heads=2, head_dim=3, offset=0.0, dtype=torch.float32):
    """Distinct values per (sequence, row, head, dim) so misplaced writes show."""
    values = torch.arange(batch * n * heads * head_dim, dtype=dtype).reshape(batch, n, heads, head_dim)
    return values + offset


def test_construction():
    cache = hk.KVCache(3, 2, 10, 2, 3, torch.float64, "cpu")
    assert cache.k.shape == cache.v.shape == (3, 2, 10, 2, 3)
    assert cache.k.dtype == cache.dtype == torch.float64 and cache.device == torch.device("cpu")
    assert (cache.num_layers, cache.batch, cache.max_len, cache.heads, cache.head_dim) == (3, 2, 10, 2, 3)
    assert cache.length.dtype == torch.long and cache.length.tolist() == [0, 0]
    assert "max_len=10" in repr(cache) and "length=[0, 0]" in repr(cache)
    assert hk.KVCache(1, 1, 1, 1, 1).dtype == torch.float32


def test_write_at_length_read_back_and_advance():
    cache = hk.KVCache(2, 2, 8, 2, 3)
    first_k, first_v = rows(2, 3), rows(2, 3, offset=100)
    cache.write(1, first_k, first_v)  # at cells [0, 3)
    k, v = cache.read(1, 3)
    assert torch.equal(k, first_k) and torch.equal(v, first_v)
    assert cache.k[0].abs().sum() == 0  # other layers untouched
    assert cache.length.tolist() == [0, 0]  # writing does not advance
    cache.advance(2)
    cache.write(1, rows(2, 4, offset=1000), rows(2, 4, offset=2000))  # at cells [2, 6)
    k, v = cache.read(1, 6)
    assert torch.equal(k[:, :2], first_k[:, :2]) and torch.equal(k[:, 2:], rows(2, 4, offset=1000))
    assert torch.equal(v[:, 2:], rows(2, 4, offset=2000))


def test_read_returns_views():
    cache = hk.KVCache(1, 1, 4, 1, 1)
    k, v = cache.read(0, 2)
    cache.write(0, torch.ones(1, 2, 1, 1), torch.full((1, 2, 1, 1), 2.0))
    assert k.flatten().tolist() == [1.0, 1.0] and v.flatten().tolist() == [2.0, 2.0]


def test_write_at_per_sequence_starts():
    cache = hk.KVCache(1, 3, 8, 2, 3)
    cache.advance(torch.tensor([0, 2, 5]))
    new_k, new_v = rows(3, 3), rows(3, 3, offset=-50)
    cache.write(0, new_k, new_v)
    for b, start in enumerate([0, 2, 5]):
        assert torch.equal(cache.k[0, b, start:start + 3], new_k[b])
        assert torch.equal(cache.v[0, b, start:start + 3], new_v[b])
        assert cache.k[0, b, :start].abs().sum() == 0
    cache.write(0, rows(3, 1, offset=7), rows(3, 1, offset=7), start=6)  # an explicit shared start
    assert torch.equal(cache.k[0, :, 6], rows(3, 1, offset=7)[:, 0])


def test_write_stores_detached_values():
    cache = hk.KVCache(1, 1, 4, 1, 2)
    k_new = torch.randn(1, 2, 1, 2, requires_grad=True)
    cache.write(0, k_new * 2, k_new * 3)
    assert not cache.k.requires_grad and cache.k.grad_fn is None


def test_advance_by_tensor_and_reset():
    cache = hk.KVCache(1, 2, 6, 1, 1)
    cache.advance(torch.tensor([1, 4]))
    cache.advance(1)
    assert cache.length.tolist() == [2, 5]
    cache.reset()
    assert cache.length.tolist() == [0, 0]


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [(0, 1, 1, 1, 1), (1, 1, 1, 1, 0), (1, 1.5, 1, 1, 1), (1, True, 1, 1, 1)])
def test_invalid_sizes_raise(args):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        hk.KVCache(*args)


def test_invalid_dtype_raises():
    with pytest.raises(TypeError, match="floating-point torch.dtype"):
        hk.KVCache(1, 1, 1, 1, 1, dtype=torch.int32)


def test_write_overflow_raises():
    cache = hk.KVCache(1, 2, 5, 2, 3)
    cache.advance(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="from start 3 needs cells up to 6, beyond max_len=5"):
        cache.write(0, rows(2, 3), rows(2, 3))


def test_advance_overflow_and_negative_raise():
    cache = hk.KVCache(1, 2, 5, 1, 1)
    cache.advance(4)
    with pytest.raises(ValueError, match="passes max_len=5"):
        cache.advance(2)
    assert cache.length.tolist() == [4, 4]  # unchanged by the failed call
    with pytest.raises(ValueError, match="n must be >= 0"):
        cache.advance(-1)
    with pytest.raises(ValueError, match=r"integer tensor of shape \[batch=2\]"):
        cache.advance(torch.tensor([1]))


@pytest.mark.parametrize("k_new,error,message", [
    (rows(1, 2), ValueError, r"k_new must have shape \[batch=2, n, heads=2, head_dim=3\], got \(1, 2, "),
    (rows(2, 2, heads=1), ValueError, "k_new must have shape"),
    (rows(2, 2)[0], ValueError, "k_new must have shape"),
    (rows(2, 2, dtype=torch.float64), TypeError, "k_new has dtype torch.float64 but the cache stores"),
])
def test_write_with_wrong_rows_raises(k_new, error, message):
    cache = hk.KVCache(1, 2, 8, 2, 3)
    with pytest.raises(error, match=message):
        cache.write(0, k_new, rows(2, 2))


def test_write_and_read_argument_errors():
    cache = hk.KVCache(2, 2, 8, 2, 3)
    with pytest.raises(IndexError, match=r"layer must be an int in \[0, 2\), got 2"):
        cache.write(2, rows(2, 1), rows(2, 1))
    with pytest.raises(ValueError, match="k_new and v_new must have one shape"):
        cache.write(0, rows(2, 1), rows(2, 2))
    with pytest.raises(ValueError, match=r"start must be None, an int or an integer tensor of shape \[b"):
        cache.write(0, rows(2, 1), rows(2, 1), start=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="start must be >= 0"):
        cache.write(0, rows(2, 1), rows(2, 1), start=-1)
    with pytest.raises(ValueError, match="upto must be <= max_len=8, got 9"):
        cache.read(0, 9)
    with pytest.raises(IndexError, match="layer must be an int"):
        cache.read(-1, 2)


def test_truncate_shrinks_lengths_only():
    cache = hk.KVCache(1, 3, 10, 1, 2)
    cache.advance(torch.tensor([4, 7, 2]))
    cache.truncate(torch.tensor([1, 7, 0]))
    assert cache.length.tolist() == [1, 7, 0]
    cache.truncate(0)
    assert cache.length.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="must not exceed the current lengths"):
        cache.truncate(1)
    with pytest.raises(ValueError, match="length must be >= 0"):
        cache.truncate(-1)
    with pytest.raises(ValueError, match=r"length must be None, an int or an integer tensor of shape \[batch=3\]"):
        cache.truncate(torch.tensor([1.0, 0.0, 0.0]))
