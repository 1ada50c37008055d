"""Byte-level tokenizer: the default tokenizer of the reference harness (docs/architecture.md, the reference harness).

Ids ``0..255`` are the bytes of the UTF-8 encoding of the text, id ``256`` is the absorbing MASK
state of the noise processes, so ``vocab_size = 257`` (the official GPT-2 setup is likewise "tokenizer
vocabulary + MASK": ``V = 50257 + 1``). Every string round-trips exactly; no text is ever unknown.

Document separator: the byte ``0x00`` (NUL) doubles as end-of-document (``eos_id = 0``), in the role of
GPT-2's ``<|endoftext|>`` in concatenate-and-wrap (paper App. E). NUL does not occur in text files, so
taking a byte for it keeps the vocabulary at 257. A text that does contain NUL still round-trips; its
NULs merely read as document boundaries to a model.

Decoding renders MASK visibly (``mask_text``, default ``"░"``) so that partially denoised samples can be
read; pass ``mask_text=""`` to skip MASK ids instead. Byte runs that are not valid UTF-8 (a model can
emit any byte sequence) decode with U+FFFD replacement characters rather than raising.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """UTF-8 bytes as ids ``0..255``, MASK = ``256``, end-of-document = byte ``0x00``."""

    kind = "byte"
    num_bytes = 256
    num_tokens = 256
    mask_id = 256
    eos_id = 0
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        """Ids of the UTF-8 bytes of ``text``: ``list[int]`` of ``len(text.encode())`` ids, no EOS added."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> torch.Tensor:
        """Like :meth:`encode`, as an int64 tensor ``[n]``."""
        if not isinstance(text, str):
            raise TypeError(f"encode_tensor: text must be str, got {type(text).__name__}")
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return torch.from_numpy(data.astype(np.int64))

    def decode(self, ids: Iterable[int] | torch.Tensor | np.ndarray, mask_text: str = "\u2591") -> str:
        """Text of a 1-D sequence of ids; each MASK id becomes ``mask_text`` (``""`` skips it).

        Raises ValueError for ids outside ``[0, vocab_size)`` or for a tensor/array that is not 1-D.
        """
        values = _as_int_list(ids)
        bad = [v for v in values if not 0 <= v < self.vocab_size]
        if bad:
            raise ValueError(f"decode: ids must lie in [0, {self.vocab_size}), got {bad[:5]} "
                             f"({len(bad)} out of range)")
        pieces: list[str] = []
        run = bytearray()
        for v in values:
            if v == self.mask_id:
                # decode each byte run on its own: a MASK interrupts a multi-byte character, and the
                # bytes on either side must not be glued into a character they do not form
                pieces.append(run.decode("utf-8", errors="replace"))
                pieces.append(mask_text)
                run = bytearray()
            else:
                run.append(v)
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, mask_id={self.mask_id}, eos_id={self.eos_id})"


def _as_int_list(ids: Iterable[int] | torch.Tensor | np.ndarray) -> list[int]:
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        if ids.ndim != 1:
            raise ValueError(f"decode: ids must be 1-D, got shape {tuple(ids.shape)}")
        return [int(v) for v in ids.tolist()]
    return [int(v) for v in ids]
