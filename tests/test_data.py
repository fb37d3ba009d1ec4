"""The minimal data path: corpus reading, tokenizers, packing, the deterministic loader."""
import gzip

import numpy as np
import pytest

from ptft_jax.data.corpus import read_documents
from ptft_jax.data.loader import BatchLoader
from ptft_jax.data.packing import pack
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


def test_pack_concatenates_documents_with_separators():
    rows, dropped = pack([[5, 6, 7], [8, 9]], seq_len=4, bos_id=2, eos_id=3)
    assert rows.tolist() == [[2, 5, 6, 7], [3, 2, 8, 9]]
    assert dropped == 1  # the final [SEP]
    with pytest.raises(ValueError, match="fewer than one sequence"):
        pack([[5]], seq_len=8, bos_id=None, eos_id=0)


def test_loader_is_deterministic_covers_each_epoch_and_splits_rows():
    examples = np.arange(40, dtype=np.int32).reshape(20, 2)
    whole = BatchLoader(examples, global_batch=8, seed=3, rows=slice(0, 8))
    again = BatchLoader(examples, global_batch=8, seed=3, rows=slice(0, 8))
    other = BatchLoader(examples, global_batch=8, seed=4, rows=slice(0, 8))
    assert np.array_equal(whole.batch(7)["tokens"], again.batch(7)["tokens"])
    assert not np.array_equal(whole.batch(0)["tokens"], other.batch(0)["tokens"])
    # Five steps of 8 = two epochs of 20: each epoch sees every example once.
    seen = np.concatenate([whole.indices(s) for s in range(5)])
    assert sorted(seen[:20]) == list(range(20)) and sorted(seen[20:]) == list(range(20))
    # Two processes' row slices make up the global batch.
    first = BatchLoader(examples, 8, 3, slice(0, 4))
    second = BatchLoader(examples, 8, 3, slice(4, 8))
    assert np.array_equal(np.concatenate([first.indices(2), second.indices(2)]),
                          whole.indices(2))


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
