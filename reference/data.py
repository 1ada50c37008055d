"""Token data for training: concatenate-and-wrap streams, nanoGPT-style ``.bin`` files, seeded samplers.

Concatenate-and-wrap (paper App. E, following MDLM; the official code does the same per map-batch):
every document is tokenized, followed by the tokenizer's end-of-document id, and all documents are
joined into one 1-D *token stream*. Training sequences are windows of ``seq_len`` tokens of that stream,
so a sequence may span document boundaries (marked by EOS) and nothing is padded or truncated.

Two views of a stream, both in :class:`TokenDataset`:

* **random windows** (training, :class:`RandomWindowSampler`): offsets drawn uniformly from
  ``[0, n - seq_len]``, like nanoGPT. Every token of the stream can be drawn, including the tail.
* **fixed chunks** (evaluation, ``dataset[i]``, :func:`wrap_into_sequences`): chunk ``i`` is tokens
  ``[i·L, (i+1)·L)``. The last ``n mod L`` tokens (``TokenDataset.remainder``) form no chunk and are left
  out of chunk-based evaluation, as in the official code; they are never padded or wrapped onto the start.

File formats. A ``.bin`` file is a raw little-endian ``uint16`` token stream without header (nanoGPT's
format; vocabularies up to 65536 ids), opened as a read-only ``np.memmap`` so that corpora larger than
memory work. Text files are read as UTF-8; one file is one document. :func:`prepare_bin` turns text
files into a ``.bin``.

Bundled corpus. ``reference/corpus/`` holds five short English texts written for this project (no
third-party text), about 29 KB, so that training and tests run without downloads;
:func:`bundled_corpus_path` gives the directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .atomic_file import atomic_write

__all__ = [
    "BIN_DTYPE",
    "Tokenizer",
    "TokenDataset",
    "RandomWindowSampler",
    "bundled_corpus_path",
    "concatenate_documents",
    "load_tokens",
    "prepare_bin",
    "read_documents",
    "split_train_val",
    "wrap_into_sequences",
]

BIN_DTYPE = np.dtype("<u2")
"""Element type of ``.bin`` token files: little-endian uint16, whatever the machine's byte order."""


class Tokenizer(Protocol):
    """What the data functions need of a tokenizer (``hdlm_reference.tokenizer.ByteTokenizer`` is one)."""

    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> Sequence[int]: ...


def bundled_corpus_path() -> Path:
    """Directory of the bundled English corpus (``*.txt`` files, one document each)."""
    return Path(__file__).resolve().parent / "corpus"


def read_documents(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Texts of the given text files, one document per file; a directory stands for its ``*.txt`` files
    in sorted name order. Raises FileNotFoundError for a missing path or a directory without ``*.txt``."""
    documents = []
    for path in _text_files(sources):
        documents.append(path.read_text(encoding="utf-8"))
    return documents


def concatenate_documents(documents: Iterable[Sequence[int]], eos_id: int, vocab_size: int) -> np.ndarray:
    """Concatenate-and-wrap's stream: each document's ids followed by ``eos_id``.

    Returns a 1-D ``uint16`` array of length ``sum(len(doc) + 1)`` (an empty document contributes its EOS).
    Raises ValueError when ``vocab_size`` does not fit uint16 or an id lies outside ``[0, vocab_size)``.
    """
    _check_fits_uint16(vocab_size)
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"concatenate_documents: eos_id must lie in [0, {vocab_size}), got {eos_id}")
    parts = []
    for index, document in enumerate(documents):
        ids = np.asarray(document, dtype=np.int64).reshape(-1)
        _check_ids(ids, vocab_size, f"documents[{index}]")
        parts.append(ids.astype(np.uint16))
        parts.append(np.array([eos_id], dtype=np.uint16))
    if not parts:
        return np.zeros(0, dtype=np.uint16)
    return np.concatenate(parts)


def wrap_into_sequences(tokens: np.ndarray | torch.Tensor, seq_len: int) -> torch.Tensor:
    """Fixed-length chunks of a 1-D stream: int64 ``[n // seq_len, seq_len]``, row ``i`` = tokens
    ``[i·seq_len, (i+1)·seq_len)``; the last ``n % seq_len`` tokens form no row (see module docstring)."""
    _check_positive_int(seq_len, "seq_len")
    if tokens.ndim != 1:
        raise ValueError(f"wrap_into_sequences: tokens must be 1-D, got shape {tuple(tokens.shape)}")
    rows = len(tokens) // seq_len
    kept = tokens[: rows * seq_len]
    if isinstance(kept, np.ndarray):
        return torch.from_numpy(np.asarray(kept, dtype=np.int64)).reshape(rows, seq_len)
    return kept.to(torch.int64).reshape(rows, seq_len)


def prepare_bin(text_files: str | os.PathLike | Iterable[str | os.PathLike], out_path: str | os.PathLike,
                tokenizer: Tokenizer) -> int:
    """Tokenize text files (one document each, EOS after each) into a nanoGPT-style ``.bin`` file.

    The file is written to a temporary name in the destination directory, fsynced, then renamed, so a
    crash never leaves a truncated ``out_path`` that could be mistaken for a corpus. Returns the number
    of tokens written. Raises ValueError when the tokenizer's vocabulary does not fit uint16.
    """
    _check_fits_uint16(tokenizer.vocab_size)
    files = _text_files(text_files)
    total = 0
    with atomic_write(out_path) as f:
        for path in files:
            # one file at a time: the whole corpus never has to sit in memory
            stream = concatenate_documents([tokenizer.encode(path.read_text(encoding="utf-8"))],
                                           tokenizer.eos_id, tokenizer.vocab_size)
            f.write(stream.astype(BIN_DTYPE).tobytes())
            total += stream.size
    return total


def load_tokens(sources: str | os.PathLike | Iterable[str | os.PathLike],
                tokenizer: Tokenizer | None = None) -> np.ndarray:
    """The token stream of a corpus: 1-D ``uint16`` array.

    ``sources`` is one ``.bin`` file (returned as a read-only memmap, nothing read yet), or text files
    and directories of ``*.txt`` (read, tokenized with ``tokenizer`` and concatenated with EOS after
    each document, in memory).
    """
    paths = _as_path_list(sources)
    bins = [p for p in paths if p.suffix == ".bin"]
    if bins:
        if len(paths) != 1:
            raise ValueError(f"load_tokens: a .bin file must be the only source (its stream is "
                             f"memory-mapped, not copied), got {[str(p) for p in paths]}")
        path = bins[0]
        if not path.is_file():
            raise FileNotFoundError(f"load_tokens: token file {str(path)!r} does not exist")
        if path.stat().st_size % BIN_DTYPE.itemsize:
            raise ValueError(f"load_tokens: {str(path)!r} has {path.stat().st_size} bytes, not a whole "
                             f"number of uint16 tokens")
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=BIN_DTYPE)
        return np.memmap(path, dtype=BIN_DTYPE, mode="r")
    if tokenizer is None:
        raise ValueError("load_tokens: text sources need a tokenizer, got tokenizer=None")
    documents = [tokenizer.encode(text) for text in read_documents(paths)]
    return concatenate_documents(documents, tokenizer.eos_id, tokenizer.vocab_size)


def split_train_val(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split a stream into (train, val): val is the last ``round(n · val_fraction)`` tokens (like the
    official OpenWebText split, which keeps the final documents for validation). Both are views (a
    memmap stays a memmap); no token is dropped or shared."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"split_train_val: val_fraction must lie in [0, 1), got {val_fraction}")
    cut = len(tokens) - int(round(len(tokens) * val_fraction))
    return tokens[:cut], tokens[cut:]


class TokenDataset:
    """A 1-D token stream seen as windows of ``seq_len`` tokens.

    ``len(dataset)`` is the number of whole fixed chunks, ``dataset[i]`` chunk ``i`` as int64 ``[seq_len]``;
    ``windows(offsets)`` gives arbitrary windows for the random-window sampler.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        _check_positive_int(seq_len, "seq_len")
        if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
            raise ValueError(f"TokenDataset: tokens must be a 1-D numpy array, got "
                             f"{type(tokens).__name__} of shape {getattr(tokens, 'shape', None)}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"TokenDataset: tokens must have an integer dtype, got {tokens.dtype}")
        if len(tokens) < seq_len:
            raise ValueError(f"TokenDataset: the stream must hold at least seq_len={seq_len} tokens, "
                             f"got {len(tokens)}")
        self.tokens = tokens
        self.seq_len = seq_len

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_windows(self) -> int:
        """Number of distinct window offsets, ``n - seq_len + 1``."""
        return self.num_tokens - self.seq_len + 1

    @property
    def remainder(self) -> int:
        """Tokens after the last whole chunk (not part of any ``dataset[i]``)."""
        return self.num_tokens % self.seq_len

    def __len__(self) -> int:
        return self.num_tokens // self.seq_len

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(f"TokenDataset: chunk index must lie in [-{len(self)}, {len(self)}), "
                             f"got {index}")
        index %= len(self)
        return self.windows(np.array([index * self.seq_len]))[0]

    def windows(self, offsets: np.ndarray | Sequence[int]) -> torch.Tensor:
        """Windows starting at ``offsets`` (``[B]`` ints in ``[0, num_windows)``): int64 ``[B, seq_len]``."""
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
        if offsets.size and (offsets.min() < 0 or offsets.max() >= self.num_windows):
            raise ValueError(f"TokenDataset.windows: offsets must lie in [0, {self.num_windows}), got values "
                             f"in [{offsets.min()}, {offsets.max()}]")
        rows = [np.asarray(self.tokens[o: o + self.seq_len]) for o in offsets.tolist()]
        if not rows:
            return torch.zeros(0, self.seq_len, dtype=torch.int64)
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def chunk_batch(self, batch_index: int, batch_size: int, rank: int = 0,
                    world_size: int = 1) -> torch.Tensor:
        """This rank's share of the ``batch_index``-th batch of fixed chunks, for evaluation.

        The global batch holds chunks ``batch_index·batch_size + j`` (``j < batch_size``), modulo
        ``len(self)`` so that every rank gets the same number of rows; rank ``r`` takes the ``r``-th
        contiguous ``batch_size / world_size`` of them. Returns int64 ``[batch_size / world_size, seq_len]``.
        """
        _check_shard(batch_size, rank, world_size)
        local = batch_size // world_size
        first = batch_index * batch_size + rank * local
        chunks = (first + np.arange(local)) % len(self)
        return self.windows(chunks * self.seq_len)

    def __repr__(self) -> str:
        return (f"TokenDataset(num_tokens={self.num_tokens}, seq_len={self.seq_len}, chunks={len(self)}, "
                f"remainder={self.remainder})")


class RandomWindowSampler:
    """Seeded random windows, sharded over data-parallel ranks like ``DistributedSampler``.

    Batch ``k`` is a pure function of ``(seed, k)``: its ``batch_size`` global offsets are drawn uniformly
    from ``[0, num_windows)`` by a PCG64 generator seeded with ``SeedSequence([seed, k])``, identically on
    every rank, and rank ``r`` takes the ``r``-th contiguous ``batch_size / world_size`` of them. Hence
    the sampler's whole state is ``(seed, next_batch)``, resuming is exact, and the global batch does not
    depend on the number of ranks.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        _check_shard(batch_size, rank, world_size)
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"RandomWindowSampler: seed must be a non-negative int, got {seed!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.next_batch = 0

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    def global_offsets(self, batch_index: int) -> np.ndarray:
        """Window offsets of the whole batch ``batch_index`` (all ranks): int64 ``[batch_size]``."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, batch_index])))
        return rng.integers(0, self.dataset.num_windows, size=self.batch_size, dtype=np.int64)

    def batch(self, batch_index: int) -> torch.Tensor:
        """This rank's rows of batch ``batch_index``: int64 ``[batch_size / world_size, seq_len]``."""
        local = self.local_batch_size
        offsets = self.global_offsets(batch_index)[self.rank * local: (self.rank + 1) * local]
        return self.dataset.windows(offsets)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        rows = self.batch(self.next_batch)
        self.next_batch += 1
        return rows

    def state_dict(self) -> dict:
        return {"seed": self.seed, "next_batch": self.next_batch, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream of a saved sampler; its seed replaces this one's (resuming must replay
        the same stream). Raises ValueError when the global batch size differs."""
        if state["batch_size"] != self.batch_size:
            raise ValueError(f"RandomWindowSampler.load_state_dict: saved batch_size {state['batch_size']} "
                             f"differs from this sampler's {self.batch_size}")
        self.seed = int(state["seed"])
        self.next_batch = int(state["next_batch"])


def _text_files(sources) -> list[Path]:
    files = []
    for path in _as_path_list(sources):
        if path.is_dir():
            found = sorted(path.glob("*.txt"))
            if not found:
                raise FileNotFoundError(f"no *.txt file in directory {str(path)!r}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"text source {str(path)!r} does not exist")
    return files


def _as_path_list(sources) -> list[Path]:
    if isinstance(sources, (str, os.PathLike)):
        return [Path(sources)]
    paths = [Path(s) for s in sources]
    if not paths:
        raise ValueError("no data source given (an empty list of paths)")
    return paths


def _check_ids(ids: np.ndarray, vocab_size: int, name: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{name}: token ids must lie in [0, {vocab_size}), got values in "
                         f"[{ids.min()}, {ids.max()}]")


def _check_fits_uint16(vocab_size: int) -> None:
    if not 0 < vocab_size <= 1 << 16:
        raise ValueError(f"vocab_size must lie in [1, 65536] to store ids as uint16, got {vocab_size}")


def _check_positive_int(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_shard(batch_size: int, rank: int, world_size: int) -> None:
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(world_size, "world_size")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    if batch_size % world_size:
        raise ValueError(f"batch_size must be a multiple of world_size={world_size}, got {batch_size}")
