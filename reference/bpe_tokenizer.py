"""Byte-level BPE tokenizers (GPT-2 style), the tokenizer of the published HDLM models.

Two implementations of the same thing, read from the same files offline:

* :class:`BPETokenizer` runs the Hugging Face ``tokenizers`` library on a ``tokenizer.json`` or on a
  ``vocab.json`` + ``merges.txt`` pair (what ``GPT2TokenizerFast.save_pretrained`` writes into a model
  snapshot, and what a tokenizer trained with ``tokenizers`` saves);
* :class:`TiktokenTokenizer` runs ``tiktoken`` (faster on long texts) on the same vocabulary, or on a
  named tiktoken encoding that is available locally.

Both follow the conventions of :class:`hdlm_reference.tokenizer.ByteTokenizer`: ids ``0 .. num_tokens-1``
are the tokenizer's own, ``mask_id = num_tokens`` is the absorbing MASK state the models add (the official
GPT-2 setup: 50257 tokens + MASK = 50258), ``vocab_size = num_tokens + 1``, ``eos_id`` is
``<|endoftext|>`` (appended after every document, as in the official data pipeline). ``decode`` renders
MASK visibly and decodes the byte runs between MASKs separately.

``tokenizers`` and ``tiktoken`` are optional dependencies (``pip install hdlm-kernels[pretrained]``),
imported only when a tokenizer is built.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["BPETokenizer", "TiktokenTokenizer", "TokenizerUnavailableError", "bpe_files", "EOS_TOKEN",
           "GPT2_PATTERN"]

EOS_TOKEN = "<|endoftext|>"
# GPT-2's pre-tokenization pattern (the same split as the ByteLevel pre-tokenizer of `tokenizers`).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class TokenizerUnavailableError(RuntimeError):
    """A tokenizer cannot be built here: its library is not installed, or its files are missing."""


def bpe_files(directory: str | Path) -> dict[str, Path]:
    """The BPE files of a directory: ``{"tokenizer.json": path}`` when there is one, else
    ``{"vocab.json": ..., "merges.txt": ...}``. Raises :class:`TokenizerUnavailableError` naming the
    directory when neither is there."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return {"tokenizer.json": directory / "tokenizer.json"}
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return {"vocab.json": directory / "vocab.json", "merges.txt": directory / "merges.txt"}
    raise TokenizerUnavailableError(
        f"no tokenizer files in {str(directory)!r}: expected tokenizer.json, or vocab.json and merges.txt")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters: printable Latin-1
    bytes stand for themselves, the others (control characters, space, ...) for code points 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _split_at_mask(values: list[int], mask_id: int, mask_text: str, decode_run) -> str:
    pieces, run = [], []
    for v in values:
        if v == mask_id:
            # a MASK interrupts the byte stream: the tokens on either side are decoded separately so
            # that they are not glued into characters they do not form
            pieces.append(decode_run(run))
            pieces.append(mask_text)
            run = []
        else:
            run.append(v)
    pieces.append(decode_run(run))
    return "".join(pieces)


def _as_ids(ids) -> list[int]:
    if hasattr(ids, "ndim") and ids.ndim != 1:
        raise ValueError(f"decode: ids must be 1-D, got shape {tuple(ids.shape)}")
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(v) for v in ids]


class BPETokenizer:
    """Byte-level BPE through the ``tokenizers`` library (see the module docstring).

    Build one with :meth:`from_directory` or :meth:`from_files`; ``files`` are the files it was read
    from (copied into a run directory by :func:`hdlm_reference.tokenizer_spec.save_tokenizer`).
    """

    kind = "bpe"

    def __init__(self, backend, files: dict[str, Path]):
        self._backend = backend
        self.files = dict(files)
        self.num_tokens = int(backend.get_vocab_size(with_added_tokens=True))
        self.mask_id = self.num_tokens
        self.vocab_size = self.num_tokens + 1
        eos = backend.token_to_id(EOS_TOKEN)
        if eos is None:
            raise TokenizerUnavailableError(
                f"the tokenizer in {sorted(str(p) for p in self.files.values())} has no {EOS_TOKEN} token "
                "(the end-of-document id of the data pipeline)")
        self.eos_id = int(eos)

    @classmethod
    def from_directory(cls, directory: str | Path) -> "BPETokenizer":
        """From ``tokenizer.json``, or ``vocab.json`` + ``merges.txt``, in ``directory``."""
        return cls.from_files(bpe_files(directory))

    @classmethod
    def from_files(cls, files: dict[str, Path]) -> "BPETokenizer":
        try:
            from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        except ImportError as error:
            raise TokenizerUnavailableError(
                "BPE tokenizers need the optional package `tokenizers` (pip install tokenizers, or "
                "pip install hdlm-kernels[pretrained])") from error
        if "tokenizer.json" in files:
            backend = Tokenizer.from_file(str(files["tokenizer.json"]))
        else:
            backend = Tokenizer(models.BPE.from_file(str(files["vocab.json"]), str(files["merges.txt"])))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
            if backend.token_to_id(EOS_TOKEN) is not None:  # GPT-2's vocab.json holds it as a plain entry
                backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])
        return cls(backend, {name: Path(path) for name, path in files.items()})

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no EOS added); ``<|endoftext|>`` in the text is the EOS id."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], mask_text: str = "\u2591") -> str:
        """Text of a 1-D id sequence; each MASK id becomes ``mask_text``. Raises ValueError for ids
        outside ``[0, vocab_size)``."""
        values = _as_ids(ids)
        bad = [v for v in values if not 0 <= v < self.vocab_size]
        if bad:
            raise ValueError(f"decode: ids must lie in [0, {self.vocab_size}), got {bad[:5]} ({len(bad)} out of range)")
        return _split_at_mask(values, self.mask_id, mask_text,
                              lambda run: self._backend.decode(run, skip_special_tokens=False) if run else "")

    def vocabulary(self) -> dict[str, int]:
        """Token string (byte-level characters) -> id, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"BPETokenizer(num_tokens={self.num_tokens}, eos_id={self.eos_id}, files={sorted(self.files)})"


class TiktokenTokenizer:
    """The same byte-level BPE through ``tiktoken``: built offline from BPE files
    (:meth:`from_directory`), or a named tiktoken encoding (:meth:`named`, e.g. ``"gpt2"``), which
    tiktoken reads from its cache (``TIKTOKEN_CACHE_DIR``)."""

    kind = "tiktoken"

    def __init__(self, encoding, files: dict[str, Path] | None = None, encoding_name: str | None = None):
        self._encoding = encoding
        self.files = dict(files or {})
        self.encoding_name = encoding_name
        self.num_tokens = int(encoding.n_vocab)
        self.mask_id = self.num_tokens
        self.vocab_size = self.num_tokens + 1
        self.eos_id = int(encoding.eot_token)

    @staticmethod
    def _tiktoken():
        try:
            import tiktoken
        except ImportError as error:
            raise TokenizerUnavailableError(
                "tiktoken tokenizers need the optional package `tiktoken` (pip install tiktoken)") from error
        return tiktoken

    @classmethod
    def from_directory(cls, directory: str | Path) -> "TiktokenTokenizer":
        """From the BPE files of ``directory`` (see :func:`bpe_files`): every vocabulary entry becomes a
        mergeable byte string whose rank is its id, as in GPT-2 where ids follow the merge order."""
        tiktoken = cls._tiktoken()
        files = bpe_files(directory)
        if "tokenizer.json" in files:
            data = json.loads(files["tokenizer.json"].read_text(encoding="utf-8"))
            vocab = dict(data["model"]["vocab"])
            added = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
        else:
            vocab = json.loads(files["vocab.json"].read_text(encoding="utf-8"))
            added = {EOS_TOKEN: vocab[EOS_TOKEN]} if EOS_TOKEN in vocab else {}
        if EOS_TOKEN not in added:
            raise TokenizerUnavailableError(f"the tokenizer in {str(directory)!r} has no {EOS_TOKEN} token")
        to_byte = {char: byte for byte, char in _byte_to_unicode().items()}
        ranks = {}
        for token, rank in vocab.items():
            if token in added:
                continue
            try:
                ranks[bytes(to_byte[c] for c in token)] = int(rank)
            except KeyError:
                raise TokenizerUnavailableError(
                    f"the tokenizer in {str(directory)!r} is not a byte-level BPE (token {token!r})") from None
        encoding = tiktoken.Encoding(name=f"bpe:{Path(directory).name}", pat_str=GPT2_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=added)
        return cls(encoding, files)

    @classmethod
    def named(cls, name: str) -> "TiktokenTokenizer":
        tiktoken = cls._tiktoken()
        try:
            encoding = tiktoken.get_encoding(name)
        except Exception as error:  # unknown name, or not cached and not reachable
            raise TokenizerUnavailableError(
                f"the tiktoken encoding {name!r} is not available locally ({type(error).__name__}: {error}); "
                "put it in tiktoken's cache (TIKTOKEN_CACHE_DIR) or use the tokenizer files of a model "
                "snapshot (tiktoken:DIR)") from error
        if EOS_TOKEN not in encoding.special_tokens_set:
            raise TokenizerUnavailableError(f"the tiktoken encoding {name!r} has no {EOS_TOKEN} token")
        return cls(encoding, encoding_name=name)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be str, got {type(text).__name__}")
        return self._encoding.encode(text, allowed_special={EOS_TOKEN})

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._encoding.encode_batch(list(texts), allowed_special={EOS_TOKEN})

    def decode(self, ids: Iterable[int], mask_text: str = "\u2591") -> str:
        values = _as_ids(ids)
        bad = [v for v in values if not 0 <= v < self.vocab_size]
        if bad:
            raise ValueError(f"decode: ids must lie in [0, {self.vocab_size}), got {bad[:5]} ({len(bad)} out of range)")
        return _split_at_mask(values, self.mask_id, mask_text,
                              lambda run: self._encoding.decode(run, errors="replace"))

    def __repr__(self) -> str:
        source = self.encoding_name or sorted(self.files)
        return f"TiktokenTokenizer(num_tokens={self.num_tokens}, eos_id={self.eos_id}, source={source!r})"
