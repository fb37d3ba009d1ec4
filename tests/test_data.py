"""The minimal data path: corpus reading, tokenizers, packing, the deterministic loader."""
import gzip

import numpy as np
import pytest

from ptft_jax.data.corpus import read_documents
from ptft_jax.data.loader import BatchLoader
from ptft_jax.data.packing import Packer
from ptft_jax.data.tokenizer import TokenIds, load_tokenizer, train_tokenizer


def test_bundled_corpus_is_the_whole_kjv():
    docs = read_documents("bundled:kjv")
    assert len(docs) == 1189  # chapters of the King James Bible
    assert docs[0].startswith("In the beginning God created the heaven and the earth.")
    assert docs[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_tokenizer_round_trips_through_its_file(tmp_path, small_corpus, kind):
    docs = read_documents(small_corpus)
    a = train_tokenizer(kind, docs, 600)
    if kind == "decoder":  # byte-level BPE training is reproducible (WordPiece's is not)
        assert a.to_str() == train_tokenizer(kind, docs, 600).to_str()
    a.save(str(tmp_path / "tok.json"))
    loaded = load_tokenizer(tmp_path / "tok.json")
    text = docs[3][:300]
    assert loaded.encode(text).ids == a.encode(text).ids
    ids = TokenIds.of(loaded, kind)
    assert ids.special_ids[0] == 0 and max(ids.special_ids) == len(ids.special_ids) - 1
    if kind == "encoder":
        assert loaded.decode(loaded.encode(text).ids).split()[0] == text.lower().split()[0]
    else:  # byte-level BPE is lossless
        assert loaded.decode(loaded.encode(text).ids) == text


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_extra_special_tokens_come_after_the_objectives_and_are_never_masked(small_corpus, kind):
    docs = read_documents(small_corpus)
    tok = train_tokenizer(kind, docs, 600, extra_special_tokens=["<doc>", "<title>"])
    ids = TokenIds.of(tok, kind)
    base = 5 if kind == "encoder" else 1
    assert tok.token_to_id("<doc>") == base and tok.token_to_id("<title>") == base + 1
    assert set(ids.special_ids) == set(range(base + 2))
    # A special token stays whole in text rather than being split into subwords.
    assert tok.encode("<doc> in the beginning", add_special_tokens=False).ids[0] == base


def _docs(seed=0, n=40, longest=30):
    rng = np.random.default_rng(seed)
    docs = [list(rng.integers(10, 100, rng.integers(1, longest))) for _ in range(n)]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    return docs, np.concatenate(docs).astype(np.int32), offsets


def _reference_stream(docs, bos, eos):
    """The wrapped documents one after another, and which document each token belongs to."""
    stream, owner = [], []
    for i, d in enumerate(docs):
        wrapped = ([bos] if bos is not None else []) + list(d) + [eos]
        stream += wrapped
        owner += [i] * len(wrapped)
    return np.array(stream), np.array(owner)


@pytest.mark.parametrize("bos", [2, None])
def test_pack_rows_hold_the_stream_with_segments_and_positions(bos):
    docs, tokens, offsets = _docs()
    packer = Packer(tokens, offsets, seq_len=16, bos_id=bos, eos_id=3, mode="pack")
    stream, owner = _reference_stream(docs, bos, 3)
    assert len(packer) == len(stream) // 16
    assert packer.dropped_tokens == len(stream) % 16
    rows = packer.rows(np.arange(len(packer)))
    assert np.array_equal(rows["tokens"].ravel(), stream[: len(packer) * 16])
    own = owner[: len(packer) * 16].reshape(-1, 16)
    for r in range(len(packer)):
        seg, pos = rows["segment_ids"][r], rows["positions"][r]
        assert seg[0] == 1 and np.all(seg > 0)
        # Same segment <=> same document; positions count up from each segment's start.
        assert np.array_equal(seg[:, None] == seg[None, :], own[r][:, None] == own[r][None, :])
        starts = np.flatnonzero(np.diff(seg, prepend=0))
        for a, b in zip(starts, list(starts[1:]) + [16]):
            assert list(pos[a:b]) == list(range(b - a))


def test_packed_attention_never_crosses_documents():
    from ptft_jax.models.transformer import attention_mask
    docs, tokens, offsets = _docs(seed=1)
    packer = Packer(tokens, offsets, seq_len=32, bos_id=2, eos_id=3)
    _, owner = _reference_stream(docs, 2, 3)
    index = np.array([0, 3, 5])
    mask = np.asarray(attention_mask(packer.rows(index)["segment_ids"]))[:, 0]
    own = owner[: len(packer) * 32].reshape(-1, 32)[index]
    same_doc = own[:, :, None] == own[:, None, :]
    assert np.array_equal(mask, same_doc)  # attends exactly within its own document


def test_pad_puts_one_document_per_row_and_loses_nothing():
    docs, tokens, offsets = _docs(seed=2, longest=40)
    packer = Packer(tokens, offsets, seq_len=16, bos_id=2, eos_id=3, mode="pad")
    rows = packer.rows(np.arange(len(packer)))
    rebuilt = []
    for r in range(len(packer)):
        keep = rows["segment_ids"][r] == 1
        assert np.all(keep[: keep.sum()])  # real tokens first, then padding
        assert np.all(rows["tokens"][r][~keep] == 0)
        assert list(rows["positions"][r][keep]) == list(range(keep.sum()))
        rebuilt += list(rows["tokens"][r][keep])
    stream, _ = _reference_stream(docs, 2, 3)
    assert rebuilt == list(stream)  # every token of every document, in order
    assert packer.dropped_tokens == 0


def test_too_little_text_for_one_row():
    with pytest.raises(ValueError, match="fewer than one row"):
        Packer(np.array([5], np.int32), np.array([0, 1]), seq_len=8, bos_id=None, eos_id=0)


class _Rows:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def rows(self, index):
        return {"tokens": np.asarray(index)[:, None]}


def test_loader_is_deterministic_covers_each_epoch_and_splits_rows():
    whole = BatchLoader(_Rows(20), global_batch=8, seed=3, rows=slice(0, 8))
    again = BatchLoader(_Rows(20), global_batch=8, seed=3, rows=slice(0, 8))
    other = BatchLoader(_Rows(20), global_batch=8, seed=4, rows=slice(0, 8))
    assert np.array_equal(whole.batch(7)["tokens"], again.batch(7)["tokens"])
    assert not np.array_equal(whole.batch(0)["tokens"], other.batch(0)["tokens"])
    # Five steps of 8 = two epochs of 20: each epoch sees every row once.
    seen = np.concatenate([whole.indices(s) for s in range(5)])
    assert sorted(seen[:20]) == list(range(20)) and sorted(seen[20:]) == list(range(20))
    # Resuming at step k gives what an uninterrupted run gives next.
    resumed = BatchLoader(_Rows(20), global_batch=8, seed=3, rows=slice(0, 8))
    assert all(np.array_equal(resumed.indices(s), whole.indices(s)) for s in range(3, 9))
    # Two processes' row slices make up the global batch, and together see each row once.
    first = BatchLoader(_Rows(20), 8, 3, slice(0, 4))
    second = BatchLoader(_Rows(20), 8, 3, slice(4, 8))
    assert np.array_equal(np.concatenate([first.indices(2), second.indices(2)]),
                          whole.indices(2))
    epoch = np.concatenate([np.concatenate([first.indices(s), second.indices(s)])
                            for s in range(5)])[:20]
    assert sorted(epoch) == list(range(20))


def test_bad_corpora_get_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(ValueError, match="holds no text"):
        read_documents(str(empty))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_documents(str(latin))
    with pytest.raises(ValueError, match="is not a file"):
        read_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="no bundled corpus"):
        read_documents("bundled:nope")
    gz = tmp_path / "docs.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("one doc\n\nanother doc\n")
    assert read_documents(str(gz)) == ["one doc", "another doc"]
