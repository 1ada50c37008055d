"""Which tokenizer: named on the command line, recorded in a run directory, read back.

A tokenizer is named by a *spec* string:

* ``"byte"``: :class:`hdlm_reference.tokenizer.ByteTokenizer` (the default; 256 ids + MASK);
* a directory holding ``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` (a model snapshot, a
  tokenizer saved by ``tokenizers``): :class:`hdlm_reference.bpe_tokenizer.BPETokenizer`;
* ``"tiktoken:DIR"``: the same files run by tiktoken; ``"tiktoken:NAME"`` a named tiktoken encoding
  available locally (e.g. ``tiktoken:gpt2``);
* a Hugging Face hub id (e.g. ``gpt2``): the tokenizer files of that repository, read from the local
  hub cache only (nothing is downloaded).

A run records its tokenizer in ``RUN/tokenizer/``: ``tokenizer_spec.json`` (kind, sizes, EOS, file
names, tiktoken encoding name) and a copy of the tokenizer's files, so that ``hdlm sample`` and ``hdlm eval``
use the very tokenizer the run was trained with, wherever the run directory is moved. A run without
that directory (written before tokenizers were recorded) is read as byte-tokenized when its model has
257 ids; anything else is refused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .atomic_file import atomic_write
from .bpe_tokenizer import BPETokenizer, TiktokenTokenizer, TokenizerUnavailableError
from .tokenizer import ByteTokenizer

__all__ = ["TOKENIZER_DIR", "SPEC_FILE", "load_tokenizer", "save_tokenizer", "load_saved_tokenizer",
           "spec_of", "tokenizer_summary", "TokenizerUnavailableError"]

TOKENIZER_DIR = "tokenizer"
SPEC_FILE = "tokenizer_spec.json"


def load_tokenizer(spec: str):
    """The tokenizer a spec string names (module docstring). Raises :class:`TokenizerUnavailableError`
    (a ``RuntimeError``) naming the spec when it cannot be built here."""
    if not isinstance(spec, str) or not spec:
        raise TokenizerUnavailableError(f"a tokenizer spec must be a non-empty string, got {spec!r}")
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("tiktoken:"):
        target = spec.removeprefix("tiktoken:")
        if Path(target).is_dir():
            return TiktokenTokenizer.from_directory(target)
        return TiktokenTokenizer.named(target)
    path = Path(spec)
    if path.is_dir():
        return BPETokenizer.from_directory(path)
    if path.exists():
        raise TokenizerUnavailableError(f"tokenizer {spec!r} is a file; pass the directory that holds "
                                        "tokenizer.json (or vocab.json and merges.txt)")
    return BPETokenizer.from_directory(_cached_hub_snapshot(spec))


def _cached_hub_snapshot(repo_id: str) -> Path:
    """The locally cached snapshot of a hub repository's tokenizer files (never downloads)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise TokenizerUnavailableError(
            f"tokenizer {repo_id!r} is neither 'byte', a directory nor tiktoken:NAME; reading it as a hub id "
            "needs the optional package huggingface_hub (pip install hdlm-kernels[pretrained])") from error
    try:
        return Path(snapshot_download(repo_id, local_files_only=True,
                                      allow_patterns=["tokenizer.json", "vocab.json", "merges.txt"]))
    except Exception as error:  # not a valid id, or not in the cache
        raise TokenizerUnavailableError(
            f"tokenizer {repo_id!r} is neither 'byte', an existing directory, tiktoken:NAME nor a hub "
            f"repository in the local cache ({type(error).__name__}: {error})") from error


def spec_of(tokenizer) -> str:
    """A spec string that :func:`load_tokenizer` turns back into ``tokenizer`` (e.g. in worker processes)."""
    kind = getattr(tokenizer, "kind", None)
    if kind == "byte":
        return "byte"
    files = getattr(tokenizer, "files", None)
    if kind == "tiktoken":
        if tokenizer.encoding_name:
            return f"tiktoken:{tokenizer.encoding_name}"
        return f"tiktoken:{next(iter(files.values())).parent}"
    if kind == "bpe" and files:
        return str(next(iter(files.values())).parent)
    raise TokenizerUnavailableError(f"no spec names the tokenizer {tokenizer!r}")


def tokenizer_summary(tokenizer) -> dict:
    """The record of a tokenizer: kind, num_tokens, eos_id, mask_id, and file names / encoding name."""
    summary = {"kind": getattr(tokenizer, "kind", "byte"), "num_tokens": int(tokenizer.vocab_size) - 1,
               "eos_id": int(tokenizer.eos_id), "mask_id": int(tokenizer.mask_id)}
    files = getattr(tokenizer, "files", None)
    if files:
        summary["files"] = sorted(files)
    if getattr(tokenizer, "encoding_name", None):
        summary["encoding"] = tokenizer.encoding_name
    return summary


def save_tokenizer(tokenizer, run_dir: str | os.PathLike) -> Path:
    """Record ``tokenizer`` in ``run_dir/tokenizer/`` (its files copied, the spec written atomically,
    all readable by others); returns that directory."""
    directory = Path(run_dir) / TOKENIZER_DIR
    directory.mkdir(parents=True, exist_ok=True)
    for name, path in sorted(getattr(tokenizer, "files", {}).items()):
        target = directory / name
        if Path(path).resolve() != target.resolve():
            with atomic_write(target) as f, open(path, "rb") as source:
                shutil.copyfileobj(source, f)
    with atomic_write(directory / SPEC_FILE) as f:
        f.write((json.dumps(tokenizer_summary(tokenizer), indent=2) + "\n").encode("utf-8"))
    return directory


def load_saved_tokenizer(run_dir: str | os.PathLike, num_tokens: int | None = None):
    """The tokenizer recorded in ``run_dir`` by :func:`save_tokenizer`.

    ``num_tokens``: the model's token ids without MASK; a recorded tokenizer of another size is
    refused, and a run without a record is read as byte-tokenized only when it is 256. Raises
    :class:`TokenizerUnavailableError` naming the run.
    """
    run_dir = Path(run_dir)
    directory = run_dir / TOKENIZER_DIR
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        if num_tokens in (None, ByteTokenizer.num_bytes):
            return ByteTokenizer()
        raise TokenizerUnavailableError(
            f"{run_dir} does not record its tokenizer ({spec_path} is missing) and its model has "
            f"{num_tokens} token ids, so it is not byte-tokenized; pass the tokenizer it was trained with")
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    kind = spec.get("kind")
    if kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind == "bpe":
        tokenizer = BPETokenizer.from_files({name: directory / name for name in spec["files"]})
    elif kind == "tiktoken":
        tokenizer = (TiktokenTokenizer.named(spec["encoding"]) if spec.get("encoding")
                     else TiktokenTokenizer.from_directory(directory))
    else:
        raise TokenizerUnavailableError(f"{spec_path} names an unknown tokenizer kind {kind!r}")
    recorded = int(spec.get("num_tokens", tokenizer.vocab_size - 1))
    if tokenizer.vocab_size - 1 != recorded:
        raise TokenizerUnavailableError(f"the tokenizer in {directory} has {tokenizer.vocab_size - 1} tokens, "
                                        f"but {spec_path} records {recorded}")
    if num_tokens is not None and recorded != num_tokens:
        raise TokenizerUnavailableError(
            f"the tokenizer recorded in {directory} has {recorded} tokens, but the model has {num_tokens} "
            "token ids (MASK excluded)")
    return tokenizer

