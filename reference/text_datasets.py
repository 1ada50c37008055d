"""Real text corpora: the paper's evaluation sets, `datasets` datasets on this machine, their
detokenizers, and parallel tokenization into uint16 ``.bin`` shards (``hdlm prepare-bin``).

Named sets (``hdlm eval --dataset``), read from the local Hugging Face cache (nothing is downloaded
when ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set), with the split and text field of the
official evaluation and its detokenizer:

=============  ===========================================  ==========  ==========  ============
name           hub dataset (first one found)                split       field       detokenizer
=============  ===========================================  ==========  ==========  ============
wikitext103    Salesforce/wikitext, wikitext-103-raw-v1     validation  text        wikitext
wikitext2      Salesforce/wikitext, wikitext-2-raw-v1       validation  text        wikitext
ptb            ptb-text-only/ptb_text_only                  validation  sentence    ptb
lambada        EleutherAI/lambada_openai (OpenAI's test)    test        text        lambada
openwebtext    Skylion007/openwebtext                       train       text        none
=============  ===========================================  ==========  ==========  ============

Any other source is a path: text files or directories of ``*.txt`` (one document per file), a
``.jsonl`` file (one document per line, field ``text``), or a dataset saved with
``datasets.Dataset.save_to_disk``; or a hub dataset id in the local cache.

Evaluation protocol (paper App. C.1 and E, the official data pipeline): each document is detokenized,
tokenized with the model's tokenizer, followed by ``<|endoftext|>``, all documents concatenated and cut
into chunks of the model's length (1024 for the published models), the remainder dropped. The official
code drops the remainder of every batch of 1000 documents instead of only the last one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic_file import atomic_write
from .data import BIN_DTYPE, read_documents

__all__ = ["NAMED_DATASETS", "DETOKENIZERS", "DatasetSource", "wikitext_detokenize", "ptb_detokenize",
           "lambada_detokenize", "resolve_source", "load_documents", "tokenize_documents", "write_bin_shards",
           "DatasetUnavailableError"]


class DatasetUnavailableError(RuntimeError):
    """A dataset that is not on this machine (or ``datasets`` is not installed)."""


# ---------------------------------------------------------------------------------------------
# detokenizers: undo the tokenization of the source text (spaces around punctuation, @-@ joiners...)
# ---------------------------------------------------------------------------------------------

_WIKITEXT_PLAIN = [("s '", "s'"), (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                   (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")]
_WIKITEXT_BRACKETS = [(r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
                      (r"{\s*([^}]*?)\s*}", r"{\1}"), (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
                      (r"'\s*([^']*?)\s*'", r"'\1'")]
_WIKITEXT_TAIL = [("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"), (" \n", "\n"),
                  ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")]


def wikitext_detokenize(text: str) -> str:
    """WikiText's raw text back to plain text (the official ``wt_detokenizer`` rules, in its order)."""
    text = text.replace(*_WIKITEXT_PLAIN[0])
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for old, new in _WIKITEXT_PLAIN[1:]:
        text = text.replace(old, new)
    for pattern, replacement in _WIKITEXT_BRACKETS:
        text = re.sub(pattern, replacement, text)
    for old, new in _WIKITEXT_TAIL:
        text = text.replace(old, new)
    return text


def ptb_detokenize(text: str) -> str:
    """Penn Treebank sentences back to plain text (the official ``ptb_detokenizer`` rules)."""
    for old, new in ((" 's", "'s"), ("s ' ", "s' "), (" n't", "n't"), (" \n ", "\n"), ("\\/", "/")):
        text = text.replace(old, new)
    for _ in range(10):  # overlapping " N N " runs need repeated passes
        text = text.replace(" N ", " 1 ")
    for old, new in (("$ 1", "$1"), ("# 1", "#1"), ("<unk>", "?")):
        text = text.replace(old, new)
    return text


def lambada_detokenize(text: str) -> str:
    """LAMBADA passages: curly double quotes made straight, stripped, on a new line (official rule)."""
    return "\n" + text.replace("\u201c", '"').replace("\u201d", '"').strip()


DETOKENIZERS: dict[str, Callable[[str], str] | None] = {
    "none": None, "wikitext": wikitext_detokenize, "ptb": ptb_detokenize, "lambada": lambada_detokenize}


@dataclass(frozen=True)
class DatasetSource:
    """Where a corpus comes from: ``hub`` ids tried in order (or a ``path``), its config, split, text
    field and detokenizer name."""

    name: str
    hub: tuple[str, ...] = ()
    config: str | None = None
    split: str | None = None
    field: str = "text"
    detokenizer: str = "none"
    path: Path | None = None


NAMED_DATASETS: dict[str, DatasetSource] = {
    "wikitext103": DatasetSource("wikitext103", ("Salesforce/wikitext", "wikitext"), "wikitext-103-raw-v1",
                                 "validation", "text", "wikitext"),
    "wikitext2": DatasetSource("wikitext2", ("Salesforce/wikitext", "wikitext"), "wikitext-2-raw-v1",
                               "validation", "text", "wikitext"),
    "ptb": DatasetSource("ptb", ("ptb-text-only/ptb_text_only", "ptb_text_only"), None, "validation", "sentence",
                         "ptb"),
    "lambada": DatasetSource("lambada", ("EleutherAI/lambada_openai",), "default", "test", "text", "lambada"),
    "openwebtext": DatasetSource("openwebtext", ("Skylion007/openwebtext", "openwebtext"), None, "train", "text"),
}


def resolve_source(name_or_path: str, *, split: str | None = None, field: str | None = None,
                   detokenizer: str | None = None, config: str | None = None) -> DatasetSource:
    """A named set (table above) or a path / hub id, with the given overrides."""
    if detokenizer is not None and detokenizer not in DETOKENIZERS:
        raise ValueError(f"detokenizer must be one of {', '.join(DETOKENIZERS)}, got {detokenizer!r}")
    if name_or_path in NAMED_DATASETS:
        base = NAMED_DATASETS[name_or_path]
    elif Path(name_or_path).exists():
        base = DatasetSource(name_or_path, path=Path(name_or_path))
    else:
        base = DatasetSource(name_or_path, hub=(name_or_path,), split="train")
    return DatasetSource(base.name, base.hub, config if config is not None else base.config,
                         split if split is not None else base.split, field or base.field,
                         detokenizer or base.detokenizer, base.path)


def _datasets():
    try:
        import datasets
    except ImportError as error:
        raise DatasetUnavailableError("reading `datasets` datasets needs the optional package datasets "
                                      "(pip install datasets)") from error
    return datasets


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file())


def load_documents(source: DatasetSource) -> tuple[Iterable[str], int | None]:
    """``(documents, count)``: the source's texts (not yet detokenized; count None when unknown)."""
    path = source.path
    if path is not None and not _is_saved_dataset(path):
        if path.suffix == ".jsonl":
            import json

            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            try:
                return [json.loads(line)[source.field] for line in lines], len(lines)
            except (KeyError, ValueError) as error:
                raise ValueError(f"{path}: every line must be a JSON object with a {source.field!r} field "
                                 f"({error})") from None
        documents = read_documents(path)
        return documents, len(documents)
    datasets = _datasets()
    if path is not None:
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            split = source.split or ("validation" if "validation" in data else next(iter(data)))
            if split not in data:
                raise ValueError(f"{path} has splits {sorted(data)}, not {split!r}")
            data = data[split]
    else:
        data, errors = None, []
        for repo in source.hub:
            try:
                data = datasets.load_dataset(repo, source.config, split=source.split)
                break
            except Exception as error:  # not cached / not reachable / not a dataset
                errors.append(f"{repo}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        if data is None:
            raise DatasetUnavailableError(
                f"dataset {source.name!r} is not available here (tried {', '.join(source.hub)}, config "
                f"{source.config!r}, split {source.split!r}; it must be in the local Hugging Face cache when "
                "offline): " + "; ".join(errors))
    if source.field not in data.column_names:
        raise ValueError(f"dataset {source.name!r} has columns {data.column_names}, not the text field "
                         f"{source.field!r}")
    return (row[source.field] for row in data), len(data)


# ---------------------------------------------------------------------------------------------
# parallel tokenization
# ---------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _start_worker(tokenizer_spec: str, detokenizer: str) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process per core already
    from .tokenizer_spec import load_tokenizer

    _WORKER["tokenizer"] = load_tokenizer(tokenizer_spec)
    _WORKER["detokenize"] = DETOKENIZERS[detokenizer]


def _tokenize_batch(texts: list[str]) -> list[np.ndarray]:
    """One batch of documents -> one uint16 stream ``doc, EOS`` per document."""
    tokenizer, detokenize = _WORKER["tokenizer"], _WORKER["detokenize"]
    if detokenize is not None:
        texts = [detokenize(t) for t in texts]
    encode_batch = getattr(tokenizer, "encode_batch", None)
    ids = encode_batch(texts) if encode_batch is not None else [tokenizer.encode(t) for t in texts]
    streams = []
    for document in ids:
        stream = np.append(np.asarray(document, dtype=np.int64), tokenizer.eos_id)
        if stream.min() < 0 or stream.max() >= min(tokenizer.vocab_size - 1, 1 << 16):
            raise ValueError(f"token ids must lie in [0, {tokenizer.vocab_size - 1}) and fit uint16")
        streams.append(stream.astype(BIN_DTYPE))
    return streams


def _batches(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    batch = []
    for text in documents:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_documents(documents: Iterable[str], tokenizer_spec: str, *, detokenizer: str = "none",
                       workers: int = 1, batch_documents: int = 256, progress: bool = False,
                       total: int | None = None) -> Iterator[np.ndarray]:
    """Uint16 streams ``doc EOS``, one per document, in order, tokenized in batches of
    ``batch_documents`` by ``workers`` processes (1: in this process) with the tokenizer named by
    ``tokenizer_spec`` (see :mod:`hdlm_reference.tokenizer_spec`); a tqdm bar over the documents."""
    from tqdm import tqdm

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    bar = tqdm(total=total, desc="tokenize", unit="doc", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1:
            _start_worker(tokenizer_spec, detokenizer)
            for batch in _batches(documents, batch_documents):
                yield from _tokenize_batch(batch)
                bar.update(len(batch))
            return
        import multiprocessing

        # fork starts a worker in milliseconds (spawn re-imports torch in each); the tokenizer is built in
        # the worker, and TOKENIZERS_PARALLELISM is off so that a forked `tokenizers` never deadlocks
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with context.Pool(workers, initializer=_start_worker, initargs=(tokenizer_spec, detokenizer)) as pool:
            sized = ((len(b), b) for b in _batches(documents, batch_documents))
            counts = []

            def feed():
                for count, batch in sized:
                    counts.append(count)
                    yield batch

            for index, streams in enumerate(pool.imap(_tokenize_batch, feed(), chunksize=1)):
                yield from streams
                bar.update(counts[index])
    finally:
        bar.close()


def write_bin_shards(streams: Iterable[np.ndarray], out_path: str | os.PathLike,
                     shard_tokens: int | None = None) -> list[tuple[Path, int]]:
    """Write token streams to ``out_path`` (one file), or with ``shard_tokens`` to shards
    ``STEM_00000.bin, STEM_00001.bin, ...`` next to it, each closed after the document that reaches
    ``shard_tokens`` tokens (documents are never split). Every file is written atomically. Returns
    ``[(path, tokens)]``."""
    out_path = Path(out_path)
    if shard_tokens is not None and (isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int)
                                     or shard_tokens < 1):
        raise ValueError(f"shard_tokens must be an int >= 1 or None, got {shard_tokens!r}")
    written: list[tuple[Path, int]] = []

    def shard_path(index: int) -> Path:
        if shard_tokens is None:
            return out_path
        return out_path.with_name(f"{out_path.stem}_{index:05d}{out_path.suffix or '.bin'}")

    iterator = iter(streams)
    pending = next(iterator, None)
    while True:
        path, count = shard_path(len(written)), 0
        with atomic_write(path) as f:
            while pending is not None:
                f.write(pending.tobytes())
                count += pending.size
                pending = next(iterator, None)
                if shard_tokens is not None and count >= shard_tokens:
                    break
        written.append((path, count))
        if pending is None:
            return written
