"""Data sources: every local format, folders and globs, TFDS without TensorFlow, in-memory
arrays, the hub failing fast offline, fingerprints, and a clear error for each bad input."""
import gzip
import json
import logging
import multiprocessing
import operator
import os
import pickle
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ptft_jax.config.schema import DataConfig
from ptft_jax.data import sources
from ptft_jax.data.corpus import read_documents
from ptft_jax.data.opening import open_documents
from ptft_jax.data.sources import from_arrays

DOCS = ["the first document", "", "second one, with café", "   ", "third"]
LABELS = [1, 0, 0, 1, 2]
KEPT = [DOCS[i] for i in (0, 2, 4)]
KEPT_LABELS = [LABELS[i] for i in (0, 2, 4)]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Arrow conversions of local files go to a temporary HF cache, not the user's."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _open(corpus, **kwargs) -> sources.Documents:
    return open_documents(DataConfig(corpus=str(corpus), **kwargs))


def _all(docs):
    return docs.texts(0, len(docs))


def write(path, fmt, texts=DOCS, labels=LABELS):
    """Writes documents (and labels) as `fmt`; returns the path."""
    if fmt == "text":
        path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    elif fmt == "text.gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write("\n".join(texts) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n"
                                for t, l in zip(texts, labels)), encoding="utf-8")
    elif fmt == "json":  # one JSON document, not JSON lines
        path.write_text(json.dumps([{"text": t, "label": l} for t, l in zip(texts, labels)]),
                        encoding="utf-8")
    elif fmt == "csv":
        lines = ["text,label"] + [f'"{t}",{l}' for t, l in zip(texts, labels)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.table({"text": texts, "label": labels}), path)
    return path


# ---------------------------------------------------------------------------------------------
# Local files


@pytest.mark.parametrize("fmt,name", [("text", "d.txt"), ("text.gz", "d.txt.gz")])
def test_text_files_one_document_per_line(tmp_path, caplog, fmt, name):
    docs = _open(write(tmp_path / name, fmt))
    with caplog.at_level(logging.WARNING, logger="ptft_jax.data.sources"):
        assert _all(docs) == KEPT
    assert "dropped 2 blank lines of 5" in caplog.text
    assert docs.labels(0, 3) is None


@pytest.mark.parametrize("fmt,name", [("jsonl", "d.jsonl"), ("json", "d.json"),
                                      ("csv", "d.csv"), ("parquet", "d.parquet")])
def test_column_files_give_texts_and_labels(tmp_path, caplog, fmt, name):
    docs = _open(write(tmp_path / name, fmt), label_column="label")
    with caplog.at_level(logging.WARNING, logger="ptft_jax.data.sources"):
        assert len(docs) == 3
    assert "dropped 2 empty documents of 5" in caplog.text
    assert _all(docs) == KEPT
    assert docs.labels(0, 3) == KEPT_LABELS
    assert docs.texts(1, 100) == KEPT[1:]  # stop past the end is clipped, as for a list
    assert _open(tmp_path / name).labels(0, 3) is None


def test_csv_empty_cells_count_as_empty_documents(tmp_path):
    (tmp_path / "d.csv").write_text('text,label\nfirst,1\n,0\n"  ",1\nlast,0\n')
    docs = _open(tmp_path / "d.csv", label_column="label")
    assert _all(docs) == ["first", "last"] and docs.labels(0, 2) == [1, 0]


def test_folder_and_glob_read_every_file_sorted(tmp_path):
    folder = tmp_path / "shards"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    write(folder / "b.jsonl", "jsonl", ["b1", "b2"], [0, 1])
    write(folder / "a.jsonl", "jsonl", ["a1"], [1])
    write(folder / "sub" / "c.jsonl", "jsonl", ["c1"], [0])
    write(folder / ".hidden" / "x.jsonl", "jsonl", ["hidden"], [0])
    (folder / "README.md").write_text("not data")
    assert _all(_open(folder)) == ["a1", "b1", "b2", "c1"]
    assert _all(_open(folder / "*.jsonl")) == ["a1", "b1", "b2"]
    assert _all(_open(f"{folder}/**/*.jsonl")) == ["a1", "b1", "b2", "c1"]

    texts = tmp_path / "texts"
    texts.mkdir()
    write(texts / "2.txt", "text", ["two", "", "three"])
    write(texts / "1.txt", "text", ["one"])
    write(texts / "3.txt", "text", [" ", ""])  # only blank lines: contributes nothing
    write(texts / "4.txt.gz", "text.gz", ["four", "five"])
    docs = _open(texts)
    want = ["one", "two", "three", "four", "five"]
    assert _all(docs) == want
    for start in range(len(want)):  # random access across file boundaries
        for stop in range(start, len(want) + 2):
            assert docs.texts(start, stop) == want[start:stop]


def test_text_scan_matches_python_split_in_tiny_windows(tmp_path, monkeypatch):
    """The vectorised line scan, forced through many windows (lines longer than a window)."""
    rng = np.random.default_rng(0)
    words = ["alpha", "béta", "", " ", "\t", "x" * 40, "mot\r", "  padded  "]
    lines = [" ".join(rng.choice(words, rng.integers(0, 4))) for _ in range(300)]
    text = "\n".join(lines)  # no final newline: the last line still counts
    (tmp_path / "d.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(sources, "SCAN_BYTES", 7)
    docs = _open(tmp_path / "d.txt")
    assert _all(docs) == [line.strip() for line in lines if line.strip()]


def test_documents_pickle_small_and_read_the_same(tmp_path):
    (tmp_path / "big.txt").write_text("\n".join(f"document {i}" for i in range(5000)))
    for docs in [_open(tmp_path / "big.txt"), _open("bundled:kjv"),
                 _open(write(tmp_path / "d.parquet", "parquet"), label_column="label")]:
        len(docs)  # the pass over the data, done before pickling as a caller should
        data = pickle.dumps(docs)
        assert len(data) < 200_000, f"{docs.name} pickles to {len(data)} bytes"
        again = pickle.loads(data)
        assert again.texts(0, 50) == docs.texts(0, 50)
        assert again.labels(0, 3) == docs.labels(0, 3)
        assert again.fingerprint() == docs.fingerprint()


def test_documents_read_in_spawned_worker_processes(tmp_path, tfds_dir, monkeypatch):
    """As the pre-tokenization cache uses them: pickled into `spawn` workers."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
    all_docs = [_open(write(tmp_path / "d.txt.gz", "text.gz")),
                _open(write(tmp_path / "d.parquet", "parquet"), label_column="label"),
                open_documents(DataConfig(corpus="tfds:tiny_texts", label_column="label")),
                from_arrays(DOCS, LABELS)]
    for docs in all_docs:
        len(docs)
    read = operator.methodcaller("texts", 0, 3)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.map(read, all_docs) == [read(docs) for docs in all_docs]


def test_fingerprints_follow_file_changes(tmp_path):
    for name, fmt in [("d.txt", "text"), ("d.jsonl", "jsonl")]:
        path = write(tmp_path / name, fmt)
        first = _open(path).fingerprint()
        assert _open(path).fingerprint() == first  # stable
        write(path, fmt, DOCS + ["more"], LABELS + [0])  # new content
        assert _open(path).fingerprint() != first
        second = _open(path).fingerprint()
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: same size
        assert _open(path).fingerprint() != second
    assert _open(tmp_path / "d.jsonl").fingerprint() != \
        _open(tmp_path / "d.jsonl", label_column="label").fingerprint()


def test_file_changed_after_opening_is_an_error_not_garbage(tmp_path):
    path = write(tmp_path / "d.txt", "text")
    docs = _open(path)
    len(docs)
    copy = pickle.loads(pickle.dumps(docs))  # as a worker process would receive it
    path.write_text("completely\ndifferent\ncontent here\n")
    with pytest.raises(ValueError, match="changed after"):
        copy.texts(0, 2)


def test_read_documents_reads_any_corpus(tmp_path):
    assert read_documents(str(write(tmp_path / "d.jsonl", "jsonl"))) == KEPT
    assert len(read_documents("bundled:kjv")) == 1189


# ---------------------------------------------------------------------------------------------
# Bad input: each gets its own clear error


def put(path, data):
    """Writes str or bytes to `path`; returns it."""
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


BAD_INPUTS = {
    "missing file": (lambda d: d / "missing.txt", {}, r"is not a file, a folder, or a glob"),
    "glob matching nothing": (lambda d: d / "*.parquet", {}, r"glob that matches a file"),
    "folder without data": (lambda d: put(d / "notes.md", "x").parent, {},
                            r"holds no files with a supported extension"),
    "empty file": (lambda d: put(d / "e.jsonl", ""), {},
                   r"e\.jsonl is empty \(0 bytes\)"),
    "only blank lines": (lambda d: put(d / "b.txt", "\n  \n\t\n"), {}, r"holds no text"),
    "only empty texts": (lambda d: write(d / "e.jsonl", "jsonl", ["", " "], [0, 1]), {},
                         r"holds no text"),
    "latin-1 text": (lambda d: put(d / "l.txt", "caf\xe9 cr\xe8me\n".encode("latin-1")), {},
                     r"l\.txt: not UTF-8 text \(line 1.*iconv -f latin1 -t utf-8 l\.txt"),
    "latin-1 jsonl": (lambda d: put(d / "l.jsonl", b'{"text": "caf\xe9"}\n'), {},
                      r"l\.jsonl: not UTF-8 text.*iconv"),
    "latin-1 late in csv": (lambda d: put(d / "l.csv", b"text\n" + b"fine\n" * 20000 +
                                          b"caf\xe9\n"), {}, r"l\.csv: not UTF-8 text.*iconv"),
    "missing text column": (lambda d: write(d / "d.jsonl", "jsonl"), {"text_column": "body"},
                            r"d\.jsonl has no column 'body' \(data\.text_column\)\. Its "
                            r"columns: text, label\. Set data\.text_column="),
    "JSON lines read as CSV": (lambda d: write(d / "d.jsonl", "jsonl"), {"format": "csv"},
                               r"d\.jsonl is read as CSV, but its first line is JSON.*"
                               r"data\.format=jsonl"),
    "missing csv text column": (lambda d: write(d / "d.csv", "csv"), {"text_column": "body"},
                                r"no column 'body'.*Its columns: text, label"),
    "missing parquet label": (lambda d: write(d / "d.parquet", "parquet"),
                              {"label_column": "stars"},
                              r"no column 'stars' \(data\.label_column\).*or null"),
    "missing label in a JSON document": (lambda d: write(d / "d.json", "json"),
                                         {"label_column": "stars"}, r"no column 'stars'"),
    "labels of a text file": (lambda d: write(d / "d.txt", "text"), {"label_column": "label"},
                              r"text files .* have no label column"),
    "a column that is not text": (lambda d: write(d / "d.parquet", "parquet"),
                                  {"text_column": "label"}, r"column 'label' holds .*not text"),
    "unknown format": (lambda d: write(d / "d.txt", "text"), {"format": "xml"},
                       r"data\.format 'xml' is unknown"),
    "unknown extension": (lambda d: put(d / "d.md", "x"), {},
                          r"cannot tell the format of .*d\.md.*data\.format"),
    "mixed formats": (lambda d: write(d / "b.csv", "csv") and write(d / "a.txt", "text").parent,
                      {}, r"mixes formats \(csv, text\)"),
    "a split of local files": (lambda d: write(d / "d.txt", "text"), {"split": "test"},
                               "one split, but split 'test' was asked for"),
    "unknown bundled corpus": (lambda d: "bundled:nope", {}, r"no bundled corpus 'nope'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error(tmp_path, case):
    make, kwargs, match = BAD_INPUTS[case]
    corpus = make(tmp_path)
    with pytest.raises(ValueError, match=match):
        _all(_open(corpus, **kwargs))


def test_cheap_errors_come_at_open_before_any_loading(tmp_path, monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise AssertionError("load_dataset ran before the checks")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    for fmt in ["jsonl", "csv", "parquet"]:
        with pytest.raises(ValueError, match="no column 'body'"):
            _open(write(tmp_path / f"d.{fmt}", fmt), text_column="body")
    docs = _open(tmp_path / "d.jsonl")
    assert docs.fingerprint()  # a cache check needs no loading either


# ---------------------------------------------------------------------------------------------
# Hugging Face hub: fails at once without network


def test_hub_fails_fast_offline():
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"could not reach the Hugging Face hub \(offline mode"
                                         r".*to_parquet.*data\.corpus=path/to/\*\.parquet"):
        open_documents(DataConfig(corpus="hf:stanfordnlp/imdb"))
    assert time.perf_counter() - t0 < 10


def test_hub_unreachable_without_offline_flags_still_fails_fast(monkeypatch):
    """No HF_*_OFFLINE set, and the hub does not answer: a short probe, then cache-only."""
    import datasets
    from huggingface_hub import constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"could not reach the Hugging Face hub "
                                         r"\(http://127\.0\.0\.1:9 does not answer\)"):
        open_documents(DataConfig(corpus="hf:nyu-mll/glue/sst2", split="validation"))
    assert time.perf_counter() - t0 < 10
    assert datasets.config.HF_HUB_OFFLINE is False  # offline only for the attempt


def test_hub_names_are_checked():
    with pytest.raises(ValueError, match="is not a dataset name"):
        open_documents(DataConfig(corpus="hf:a/b/c/d"))


# ---------------------------------------------------------------------------------------------
# TensorFlow Datasets through array_record, without TensorFlow


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny text dataset prepared as array_record, as `tfds build` would leave it."""
    import tensorflow_datasets as tfds

    class TinyTexts(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        # Not registered: reading it back must work from its files alone, as for any
        # dataset prepared elsewhere.
        VERSION = tfds.core.Version("1.0.0")
        # No source folder (checksums, metadata). tfds's own lookup of it needs the
        # `importlib_resources` backport, which it declares only for Python < 3.9.
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                "score": tfds.features.Scalar(np.float32)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(DOCS, LABELS),
                    "test": self._generate_examples(["held out"], [2])}

        def _generate_examples(self, texts, labels):
            for i, (text, label) in enumerate(zip(texts, labels)):
                yield i, {"text": text, "label": label, "score": i / 2}

    tfds.disable_progress_bar()
    data_dir = tmp_path_factory.mktemp("tfds")
    TinyTexts(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_reads_a_prepared_dataset_without_tensorflow(tfds_dir, monkeypatch, caplog):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
    docs = open_documents(DataConfig(corpus="tfds:tiny_texts", label_column="label"))
    assert docs.name == "tfds:tiny_texts[train]"
    # tfds shuffles records by key hash when preparing: compare as sets, order is tfds's own.
    with caplog.at_level(logging.WARNING, logger="ptft_jax.data.sources"):
        pairs = set(zip(_all(docs), docs.labels(0, len(docs))))
    assert pairs == set(zip(KEPT, KEPT_LABELS))
    assert "dropped 2 empty documents of 5" in caplog.text
    assert all(isinstance(t, str) for t in _all(docs))

    again = pickle.loads(pickle.dumps(docs))
    assert again.texts(0, 3) == docs.texts(0, 3) and again.fingerprint() == docs.fingerprint()
    test = open_documents(DataConfig(corpus="tfds:tiny_texts:1.0.0"), split="test")
    assert _all(test) == ["held out"]
    assert test.fingerprint() != docs.fingerprint()
    assert len(open_documents(DataConfig(corpus="tfds:tiny_texts", split="train[:2]"))) <= 2
    assert "tensorflow" not in sys.modules


def test_tfds_scan_in_small_batches(tfds_dir, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
    monkeypatch.setattr(sources, "_SCAN_ROWS", 2)
    docs = open_documents(DataConfig(corpus="tfds:tiny_texts"))
    assert sorted(_all(docs)) == sorted(KEPT)


@pytest.mark.parametrize("corpus,kwargs,match", [
    ("tfds:tiny_texts", {"split": "validation"}, r"no split 'validation'.*train, test"),
    ("tfds:tiny_texts", {"text_column": "body"},
     r"no column 'body'.*Its columns: .*label.*Set data\.text_column="),
    ("tfds:tiny_texts", {"label_column": "stars"}, r"no column 'stars'"),
    ("tfds:tiny_texts", {"text_column": "score"}, r"feature 'score' holds .*not text"),
    ("tfds:tiny_texts:9.9.9", {}, r"no such dataset .*tfds build"),
    ("tfds:no_such_dataset_here", {}, r"no such dataset registered with tfds, nor prepared"),
    ("tfds:mnist", {}, r"'tfds:mnist' is not prepared in .*--file_format=array_record"),
])
def test_tfds_errors(tfds_dir, monkeypatch, corpus, kwargs, match):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
    with pytest.raises(ValueError, match=match):
        open_documents(DataConfig(corpus=corpus, **kwargs))


# ---------------------------------------------------------------------------------------------
# In-memory arrays


def test_from_arrays(caplog):
    docs = from_arrays(np.array(DOCS), np.array(LABELS), name="mine")
    with caplog.at_level(logging.WARNING, logger="ptft_jax.data.sources"):
        assert _all(docs) == KEPT
    assert "mine: dropped 2 empty documents of 5" in caplog.text
    assert docs.labels(0, 3) == KEPT_LABELS and type(docs.labels(0, 1)[0]) is int
    assert _all(from_arrays([t.encode() for t in DOCS] + [None])) == KEPT
    assert from_arrays(DOCS).labels(0, 3) is None
    assert from_arrays(DOCS).fingerprint() == from_arrays(list(DOCS)).fingerprint()
    assert from_arrays(DOCS).fingerprint() != from_arrays(DOCS[:-1] + ["Third"]).fingerprint()
    assert from_arrays(["ab", "c"]).fingerprint() != from_arrays(["a", "bc"]).fingerprint()
    assert from_arrays(DOCS, LABELS).fingerprint() != from_arrays(DOCS, LABELS[::-1]).fingerprint()
    assert pickle.loads(pickle.dumps(docs)).texts(0, 3) == KEPT
    with pytest.raises(ValueError, match="text 1 is int, not str"):
        from_arrays(["a", 3])
    with pytest.raises(ValueError, match="5 texts but 2 labels"):
        from_arrays(DOCS, [0, 1])
    with pytest.raises(ValueError, match="holds no text"):
        len(from_arrays(["", " "]))
