"""``KVCache``: per-layer keys and values of the final cells of each sequence (docs/architecture.md, generation data flow).

At inference the settled prefix of a monotone hyperschedule only grows, and its cells attend only to
settled cells, so their keys and values never change once they are final. A generation step feeds
the cells from ``length`` on (rows that settled since the last step, re-encoded, then the active
window), writes their keys/values at those cells, attends over cells ``[0, length + n)``, and then
advances ``length`` by the number of cells that became final. Window cells written past ``length``
are scratch: the next step overwrites them.

The cache is a plain container: it stores, reads and counts; the model decides what to write.
"""

from __future__ import annotations

import torch

__all__ = ["KVCache"]


def _check_count(name: str, value, context: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{context}: {name} must be an int >= {minimum}, got {value!r}")
    return value


class KVCache:
    """Keys and values ``[num_layers, batch, max_len, heads, head_dim]`` plus per-sequence lengths.

    Args:
        num_layers, batch, max_len, heads, head_dim: sizes (ints >= 1).
        dtype: dtype of the stored keys/values (that of the attention inputs, e.g. bfloat16 under
            autocast).
        device: where the tensors live.

    Attributes:
        k, v: the storage tensors; cell ``c`` of sequence ``b`` in layer ``l`` is ``k[l, b, c]``.
        length: ``LongTensor [batch]``, the number of final cells of each sequence: cells
            ``[0, length[b])`` hold keys/values that no later step changes.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        for name, value in (("num_layers", num_layers), ("batch", batch), ("max_len", max_len),
                            ("heads", heads), ("head_dim", head_dim)):
            _check_count(name, value, "KVCache", minimum=1)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"KVCache: dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.k = torch.zeros(num_layers, batch, max_len, heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = torch.zeros(batch, dtype=torch.long, device=self.k.device)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def heads(self) -> int:
        return self.k.shape[3]

    @property
    def head_dim(self) -> int:
        return self.k.shape[4]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    # -- storage -------------------------------------------------------------------------------
    def _check_layer(self, layer, context: str) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise IndexError(f"{context}: layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

    def _starts(self, start, context: str) -> torch.Tensor:
        return self.length if start is None else self._per_sequence(start, "start", context)

    def _per_sequence(self, value, name: str, context: str) -> torch.Tensor:
        """An int shared by the batch or an integer tensor ``[batch]``, >= 0, as a LongTensor."""
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ValueError(f"{context}: {name} must be >= 0, got {value}")
            return torch.full((self.batch,), value, dtype=torch.long, device=self.device)
        if (not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool
                or value.shape != (self.batch,)):
            raise ValueError(f"{context}: {name} must be None, an int or an integer tensor of shape "
                             f"[batch={self.batch}], got {value!r}")
        if bool((value < 0).any()):
            raise ValueError(f"{context}: {name} must be >= 0, got {value.tolist()}")
        return value.to(device=self.device, dtype=torch.long)

    def write(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, start=None) -> None:
        """Store ``k_new``, ``v_new`` (``[batch, n, heads, head_dim]``, the cache's dtype and device) at
        cells ``[start[b], start[b] + n)`` of ``layer`` for each sequence ``b``.

        ``start``: None (= ``length``, the first non-final cell), an int shared by the batch, or a
        LongTensor ``[batch]``. Values are stored detached: the cache is inference state and must not
        keep autograd graphs alive from one step to the next. ``length`` is not changed.
        """
        context = "KVCache.write"
        self._check_layer(layer, context)
        expected = (self.batch, None, self.heads, self.head_dim)
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or any(
                    e is not None and s != e for s, e in zip(t.shape, expected)):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{context}: {name} must have shape [batch={self.batch}, n, "
                                 f"heads={self.heads}, head_dim={self.head_dim}], got {shape}")
            if t.dtype != self.dtype:
                raise TypeError(f"{context}: {name} has dtype {t.dtype} but the cache stores {self.dtype}")
            if t.device != self.device:
                raise ValueError(f"{context}: {name} is on {t.device} but the cache is on {self.device}")
        if k_new.shape != v_new.shape:
            raise ValueError(f"{context}: k_new and v_new must have one shape, got {tuple(k_new.shape)} and "
                             f"{tuple(v_new.shape)}")
        n = k_new.shape[1]
        starts = self._starts(start, context)
        lo, hi = (int(x) for x in torch.aminmax(starts))
        if hi + n > self.max_len:
            raise ValueError(f"{context}: writing {n} cells from start {hi} needs cells up to {hi + n}, "
                             f"beyond max_len={self.max_len}")
        if n == 0:
            return
        k_new, v_new = k_new.detach(), v_new.detach()
        if lo == hi:  # one start for the batch (the usual case): a strided copy
            self.k[layer, :, lo:lo + n] = k_new
            self.v[layer, :, lo:lo + n] = v_new
        else:
            cells = starts[:, None] + torch.arange(n, device=self.device)
            sequences = torch.arange(self.batch, device=self.device)[:, None]
            self.k[layer, sequences, cells] = k_new
            self.v[layer, sequences, cells] = v_new

    def read(self, layer: int, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of cells ``[0, upto)`` of ``layer``: two ``[batch, upto, heads, head_dim]``
        views into the storage (no copy). Cells past a sequence's written ones hold stale or zero
        values; the attention mask must not select them."""
        context = "KVCache.read"
        self._check_layer(layer, context)
        _check_count("upto", upto, context)
        if upto > self.max_len:
            raise ValueError(f"{context}: upto must be <= max_len={self.max_len}, got {upto}")
        return self.k[layer, :, :upto], self.v[layer, :, :upto]

    # -- length ----------------------------------------------------------------------------------
    def advance(self, n) -> None:
        """Mark ``n`` more cells of each sequence final: ``length += n`` (an int >= 0, or a LongTensor
        ``[batch]`` of them). Raises if a length would pass ``max_len``."""
        context = "KVCache.advance"
        if isinstance(n, int) and not isinstance(n, bool):
            if n < 0:
                raise ValueError(f"{context}: n must be >= 0, got {n}")
            step = torch.full_like(self.length, n)
        elif (isinstance(n, torch.Tensor) and not n.dtype.is_floating_point and n.dtype != torch.bool
              and n.shape == (self.batch,)):
            step = n.to(device=self.device, dtype=torch.long)
            if bool((step < 0).any()):
                raise ValueError(f"{context}: n must be >= 0, got {step.tolist()}")
        else:
            raise ValueError(f"{context}: n must be an int or an integer tensor of shape "
                             f"[batch={self.batch}], got {n!r}")
        new_length = self.length + step
        if int(new_length.max()) > self.max_len:
            raise ValueError(f"{context}: advancing lengths {self.length.tolist()} by {step.tolist()} passes "
                             f"max_len={self.max_len}")
        self.length.copy_(new_length)

    def truncate(self, length) -> None:
        """Forget cells past ``length`` (an int, or a LongTensor ``[batch]``): e.g. to roll back to a
        shorter prompt, or re-generate a suffix. Lengths only shrink; raises if one would grow."""
        context = "KVCache.truncate"
        target = self._per_sequence(length, "length", context)
        if bool((target > self.length).any()):
            raise ValueError(f"{context}: length must not exceed the current lengths {self.length.tolist()}, "
                             f"got {target.tolist()} (use advance to grow)")
        self.length.copy_(target)

    def reset(self) -> None:
        """Forget every cell (``length = 0``); the storage is kept and later overwritten."""
        self.length.zero_()

    def __repr__(self) -> str:
        return (f"KVCache(num_layers={self.num_layers}, batch={self.batch}, max_len={self.max_len}, "
                f"heads={self.heads}, head_dim={self.head_dim}, dtype={self.dtype}, device={self.device}, "
                f"length={self.length.tolist()})")
