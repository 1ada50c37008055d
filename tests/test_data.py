"""Byte tokenizer, concatenate-and-wrap streams, .bin token files, seeded window samplers, bundled corpus."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hdlm_reference.data import (BIN_DTYPE, RandomWindowSampler, TokenDataset, bundled_corpus_path,
                                 concatenate_documents, load_tokens, prepare_bin, read_documents,
                                 split_train_val, wrap_into_sequences)
from hdlm_reference.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer()
MASK = TOKENIZER.mask_id


# ---- tokenizer


def test_tokenizer_ids():
    assert (TOKENIZER.vocab_size, TOKENIZER.mask_id, TOKENIZER.eos_id) == (257, 256, 0)
    assert TOKENIZER.encode("Hi é") == [72, 105, 32, 0xC3, 0xA9]
    assert torch.equal(TOKENIZER.encode_tensor("Hi é"), torch.tensor([72, 105, 32, 0xC3, 0xA9]))
    assert TOKENIZER.encode_tensor("").dtype == torch.int64


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_tokenizer_round_trip(text):
    ids = TOKENIZER.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert TOKENIZER.decode(ids) == text
    assert TOKENIZER.decode(torch.tensor(ids, dtype=torch.long)) == text
    assert TOKENIZER.decode(np.array(ids, dtype=np.uint16)) == text


def test_decode_renders_or_skips_mask():
    ids = TOKENIZER.encode("ab") + [MASK] + TOKENIZER.encode("cd")
    assert TOKENIZER.decode(ids) == "ab\u2591cd"
    assert TOKENIZER.decode(ids, mask_text="") == "abcd"
    assert TOKENIZER.decode(ids, mask_text="[MASK]") == "ab[MASK]cd"


def test_decode_mask_inside_a_multibyte_character_does_not_glue_bytes():
    e_acute = TOKENIZER.encode("é")  # two bytes
    text = TOKENIZER.decode([e_acute[0], MASK, e_acute[1]], mask_text="")
    assert text == "\ufffd\ufffd"  # each half is invalid on its own; the MASK is not erased into "é"


def test_decode_rejects_bad_ids():
    with pytest.raises(ValueError, match=r"\[0, 257\)"):
        TOKENIZER.decode([65, 257])
    with pytest.raises(ValueError, match="1-D"):
        TOKENIZER.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="str"):
        TOKENIZER.encode(b"bytes")


# ---- concatenate-and-wrap


def test_concatenate_documents_appends_eos_after_each():
    stream = concatenate_documents([[5, 6], [], [7]], eos_id=0, vocab_size=257)
    assert stream.dtype == np.uint16
    assert stream.tolist() == [5, 6, 0, 0, 7, 0]
    with pytest.raises(ValueError, match=r"documents\[1\]"):
        concatenate_documents([[1], [300]], eos_id=0, vocab_size=257)
    with pytest.raises(ValueError, match="uint16"):
        concatenate_documents([[1]], eos_id=0, vocab_size=70_000)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 255), max_size=40), max_size=8), st.integers(1, 17))
def test_concatenate_and_wrap_invariants(documents, seq_len):
    stream = concatenate_documents(documents, eos_id=0, vocab_size=257)
    assert len(stream) == sum(len(d) + 1 for d in documents)
    eos_positions = np.flatnonzero(stream == 0).tolist()
    assert eos_positions == list(np.cumsum([len(d) + 1 for d in documents]) - 1)
    rows = wrap_into_sequences(stream, seq_len)
    assert rows.dtype == torch.int64 and rows.shape == (len(stream) // seq_len, seq_len)
    # rows are consecutive pieces of the stream; only the tail of n mod seq_len tokens is not in a row
    assert rows.reshape(-1).tolist() == stream[: rows.numel()].tolist()
    assert len(stream) - rows.numel() == len(stream) % seq_len
    if len(stream) >= seq_len:
        dataset = TokenDataset(stream, seq_len)
        assert len(dataset) == rows.shape[0] and dataset.remainder == len(stream) % seq_len
        assert all(torch.equal(dataset[i], rows[i]) for i in range(len(dataset)))


# ---- .bin files


def write_texts(directory, texts):
    directory.mkdir(parents=True, exist_ok=True)
    for index, text in enumerate(texts):
        (directory / f"{index:02d}.txt").write_text(text, encoding="utf-8")
    return directory


def test_prepare_bin_matches_text_loading(tmp_path):
    texts = write_texts(tmp_path / "texts", ["first document\n", "zweites Dokument: größer", ""])
    out = tmp_path / "out" / "corpus.bin"
    count = prepare_bin(texts, out, TOKENIZER)
    expected = load_tokens(texts, TOKENIZER)
    assert count == len(expected) == sum(len(t.encode()) + 1 for t in read_documents(texts))
    tokens = load_tokens(out)
    assert isinstance(tokens, np.memmap) and tokens.dtype == BIN_DTYPE
    assert tokens.tolist() == expected.tolist()
    # raw little-endian uint16 without header (nanoGPT's format)
    assert out.read_bytes() == expected.astype("<u2").tobytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["corpus.bin"]


def test_prepare_bin_failure_leaves_no_file(tmp_path):
    texts = write_texts(tmp_path / "texts", ["one", "two", "three"])

    class FailingTokenizer(ByteTokenizer):
        calls = 0

        def encode(self, text):
            FailingTokenizer.calls += 1
            if FailingTokenizer.calls == 3:
                raise RuntimeError("tokenizer died")
            return super().encode(text)

    out = tmp_path / "corpus.bin"
    with pytest.raises(RuntimeError, match="tokenizer died"):
        prepare_bin(texts, out, FailingTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts"]  # neither corpus.bin nor a temp file


def test_load_tokens_errors(tmp_path):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    with pytest.raises(ValueError, match="whole number"):
        load_tokens(odd)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_tokens(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="only source"):
        load_tokens([odd, tmp_path / "b.txt"])
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokens(write_texts(tmp_path / "t", ["x"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.txt file"):
        read_documents(tmp_path / "empty")


def test_split_train_val(tmp_path):
    out = tmp_path / "c.bin"
    prepare_bin(write_texts(tmp_path / "texts", ["a" * 94, "b" * 4]), out, TOKENIZER)
    tokens = load_tokens(out)
    train, val = split_train_val(tokens, 0.1)
    assert (len(train), len(val)) == (90, 10)
    assert isinstance(train, np.memmap) and isinstance(val, np.memmap)
    assert np.concatenate([train, val]).tolist() == tokens.tolist()
    assert len(split_train_val(tokens, 0.0)[1]) == 0
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(tokens, 1.0)


# ---- dataset and sampler


def make_stream(n=1000, seed=0):
    return np.random.default_rng(seed).integers(0, 257, size=n).astype(np.uint16)


def test_token_dataset_views():
    stream = make_stream(103)
    dataset = TokenDataset(stream, 10)
    assert (len(dataset), dataset.remainder, dataset.num_windows) == (10, 3, 94)
    assert dataset[3].tolist() == stream[30:40].tolist() and dataset[-1].tolist() == stream[90:100].tolist()
    windows = dataset.windows([0, 93])
    assert windows.dtype == torch.int64 and windows[1].tolist() == stream[93:].tolist()
    with pytest.raises(ValueError, match=r"offsets must lie in \[0, 94\)"):
        dataset.windows([94])
    with pytest.raises(IndexError):
        dataset[10]
    with pytest.raises(ValueError, match="seq_len=200"):
        TokenDataset(stream, 200)
    # evaluation batches: fixed chunks in order, sharded contiguously, wrapped modulo len
    assert dataset.chunk_batch(0, 4).tolist() == [dataset[i].tolist() for i in range(4)]
    assert dataset.chunk_batch(2, 4, rank=1, world_size=2).tolist() == [dataset[i].tolist() for i in (0, 1)]


def test_sampler_is_seeded_and_resumable():
    dataset = TokenDataset(make_stream(), 16)
    first = RandomWindowSampler(dataset, batch_size=8, seed=3)
    batches = [next(first) for _ in range(5)]
    again = RandomWindowSampler(dataset, batch_size=8, seed=3)
    assert all(torch.equal(a, next(again)) for a in batches)
    other = RandomWindowSampler(dataset, batch_size=8, seed=4)
    assert not torch.equal(batches[0], next(other))
    assert len({tuple(b[:, 0].tolist()) for b in batches}) == 5  # batches differ from step to step

    partial = RandomWindowSampler(dataset, batch_size=8, seed=3)
    next(partial), next(partial)
    resumed = RandomWindowSampler(dataset, batch_size=8, seed=999)
    resumed.load_state_dict(partial.state_dict())
    assert [torch.equal(next(resumed), b) for b in batches[2:]] == [True] * 3
    with pytest.raises(ValueError, match="batch_size"):
        RandomWindowSampler(dataset, batch_size=4, seed=3).load_state_dict(partial.state_dict())


def test_sampler_shards_one_global_batch_over_ranks():
    dataset = TokenDataset(make_stream(), 16)
    whole = RandomWindowSampler(dataset, batch_size=8, seed=1)
    shards = [RandomWindowSampler(dataset, batch_size=8, seed=1, rank=r, world_size=4) for r in range(4)]
    for step in range(3):
        parts = [s.batch(step) for s in shards]
        assert all(p.shape == (2, 16) for p in parts)
        assert torch.equal(torch.cat(parts), whole.batch(step))
    with pytest.raises(ValueError, match="multiple of world_size=3"):
        RandomWindowSampler(dataset, batch_size=8, seed=1, rank=0, world_size=3)


def test_sampler_reaches_every_window():
    stream = make_stream(20)
    sampler = RandomWindowSampler(TokenDataset(stream, 8), batch_size=16, seed=0)
    seen = set()
    for step in range(20):
        seen.update(sampler.global_offsets(step).tolist())
    assert seen == set(range(13))  # including the last window, which holds the tail tokens


# ---- bundled corpus


def test_bundled_corpus_loads():
    directory = bundled_corpus_path()
    files = sorted(directory.glob("*.txt"))
    assert len(files) >= 3
    assert sum(f.stat().st_size for f in files) < 300_000
    tokens = load_tokens(directory, TOKENIZER)
    assert int((tokens == TOKENIZER.eos_id).sum()) == len(files)
    text = TOKENIZER.decode(tokens)
    assert "lighthouse" in text and text.count("\x00") == len(files)
    assert len(TokenDataset(split_train_val(tokens, 0.05)[1], 128)) >= 8
