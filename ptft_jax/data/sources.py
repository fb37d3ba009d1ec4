"""Where documents come from: local files (text, jsonl, csv, parquet), Hugging Face hub
datasets, TensorFlow Datasets (array_record, no TensorFlow), in-memory arrays, bundled corpora.

`open_documents(cfg.data)` (data/opening.py) returns a `Documents`: a random-access sequence of the non-empty
documents of one split, with optional labels. Opening does only the cheap checks (paths,
formats, columns, splits, hub reachability); the one pass over the data that finds empty
documents (and, for text files, checks UTF-8) runs on the first `len()`, `texts()` or
`labels()`. So a caller whose cache is fresh by `fingerprint()` never pays for that pass.

Worker processes: every `Documents` pickles small. Text files carry their line index and re-open
(memory-map) the files by path; HF datasets pickle as references to their memory-mapped Arrow
cache files; TFDS sources re-open their array_record files; arrays travel whole. Call `len()`
before handing one to workers, so the pass over the data runs once, in the parent, and travels
with it. `open_documents(cfg, split)` is deterministic, so re-opening in a worker works too.
"""
from __future__ import annotations

import abc
import functools
import gzip
import hashlib
import json
import logging
import mmap
import zlib
from pathlib import Path

import numpy as np

from ptft_jax.data.source_checks import (SCAN_BYTES, as_list, check_json, check_utf8, file_stat,
                                         log_dropped, not_utf8, plain, require_columns,
                                         require_text_type, some_paths, source_digest)

log = logging.getLogger(__name__)

_CORPORA = Path(__file__).with_name("corpora")
# Text, one split: the KJV, and every fortune of Debian's package but the labelled set's
# validation ones (in-domain text for continued pretraining before a fortunes finetune).
BUNDLED = {"kjv": _CORPORA / "kjv.txt.gz", "fortunes-text": _CORPORA / "fortunes-text.txt.gz"}
# Labelled sets (JSON lines with 'text' and 'label'), one file per split.
BUNDLED_LABELLED = {"fortunes": {split: _CORPORA / f"fortunes-{split}.jsonl.gz"
                                 for split in ("train", "validation")}}

# data.format -> the file extensions it reads (what data.format=auto recognises).
EXTENSIONS = {
    "text": (".txt", ".txt.gz"),  # one document per line
    "jsonl": (".jsonl", ".json"),  # JSON lines, or one JSON array / dict of columns
    "csv": (".csv",),
    "parquet": (".parquet",),
}
_HF_BUILDERS = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}

_SCAN_ROWS = 10_000  # rows read at a time when looking for empty documents


class Documents(abc.ABC):
    """A random-access sequence of non-empty documents, with optional labels.

    `texts(start, stop)` and `labels(start, stop)` take slice bounds: `stop` past the end is
    clipped, as for a list."""

    name: str  # for logs and cache metadata: "hf:imdb[train]", "data/*.parquet", ...

    @abc.abstractmethod
    def __len__(self) -> int:
        ...

    @abc.abstractmethod
    def texts(self, start: int, stop: int) -> list[str]:
        ...

    @abc.abstractmethod
    def labels(self, start: int, stop: int) -> list | None:
        """None when the source has no label column."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Changes whenever the documents would; cheap (no pass over the data)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def from_arrays(texts, labels=None, name: str = "arrays") -> Documents:
    """Documents from in-memory texts (a list or NumPy array of str or UTF-8 bytes) and
    optional labels of the same length."""
    return InMemory(texts, labels, name)


# ---------------------------------------------------------------------------------------------
# Text files: one document per line


class TextFiles(Documents):
    """Text files, one document per line, stripped of ASCII whitespace; blank lines are dropped.

    Plain .txt files are memory-mapped, so worker processes share the page cache; .txt.gz
    files are decompressed into memory, once per process. The line index (two int64 offsets
    per document) is built by one pass on first use and travels with the object when pickled."""

    def __init__(self, paths: list[Path], name: str):
        self.paths = paths
        self.name = name
        self._stats = [file_stat(p) for p in paths]
        self._open_file: tuple[int, object] | None = None  # (file index, its bytes), one at a time

    def fingerprint(self) -> str:
        return source_digest("text", self._stats)

    def __len__(self) -> int:
        return int(self._index[2][-1])

    def texts(self, start: int, stop: int) -> list[str]:
        start, stop, _ = slice(start, stop).indices(len(self))
        starts, ends, first_doc = self._index
        out: list[str] = []
        for i in range(int(np.searchsorted(first_doc, start, side="right")) - 1, len(self.paths)):
            if first_doc[i] >= stop:
                break
            lo = max(start, first_doc[i]) - first_doc[i]
            hi = min(stop, first_doc[i + 1]) - first_doc[i]
            if lo >= hi:
                continue
            data = self._bytes(i)
            out.extend(data[s:e].strip().decode("utf-8")
                       for s, e in zip(starts[i][lo:hi].tolist(), ends[i][lo:hi].tolist()))
        return out

    def labels(self, start: int, stop: int) -> None:
        return None

    @functools.cached_property
    def _index(self) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """Per file, the byte offsets where its non-blank lines start and end; and the index of
        each file's first document (with the total last)."""
        starts, ends, blank = [], [], 0
        for i, path in enumerate(self.paths):
            s, e, b = _line_spans(np.frombuffer(self._bytes(i), np.uint8), path)
            starts.append(s)
            ends.append(e)
            blank += b
        first_doc = np.concatenate([[0], np.cumsum([len(s) for s in starts])]).astype(np.int64)
        if first_doc[-1] == 0:
            raise ValueError(f"data.corpus '{self.name}' holds no text: every line of "
                             f"{some_paths(self.paths)} is blank.")
        log_dropped(self.name, blank, int(first_doc[-1]) + blank, "blank lines")
        return starts, ends, first_doc

    def _bytes(self, i: int):
        """File i's bytes (memory-mapped for .txt); only the last one used stays open, so a
        folder of thousands of files holds neither thousands of descriptors nor all in memory."""
        if self._open_file is None or self._open_file[0] != i:
            path = self.paths[i]
            if file_stat(path) != self._stats[i]:
                raise ValueError(f"{path} changed after data.corpus '{self.name}' was opened; "
                                 f"open it again.")
            self._open_file = (i, _read_text_file(path))
        return self._open_file[1]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open_file"] = None  # re-opened by path where it is unpickled
        return state


def _read_text_file(path: Path):
    if path.name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a readable gzip file ({e}). Re-create it with "
                             f"`gzip`, or give the uncompressed .txt file.") from None
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


_ASCII_SPACE = np.zeros(256, bool)
_ASCII_SPACE[list(b" \t\n\r\v\f")] = True  # what bytes.strip() removes


def _line_spans(data: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Start and end byte offsets of the non-blank lines of `data` (one file's bytes), and the
    number of blank lines. Checks that the file is UTF-8 on the way. Vectorised, in windows of
    whole lines, so a file of gigabytes needs about 16 MB of scratch memory."""
    n = len(data)
    if n == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, 0
    newlines = np.concatenate([np.flatnonzero(data[a:a + SCAN_BYTES] == ord("\n")) + a
                               for a in range(0, n, SCAN_BYTES)])
    starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
    ends = np.concatenate([newlines, [n]]).astype(np.int64)
    if starts[-1] == n:  # the file ends with a newline: there is no line after it
        starts, ends = starts[:-1], ends[:-1]
    keep = np.empty(len(starts), bool)
    first = 0
    while first < len(starts):
        last = max(first + 1, int(np.searchsorted(starts, starts[first] + SCAN_BYTES)))
        lo = starts[first]
        hi = starts[last] if last < len(starts) else n  # each line with its newline
        window = data[lo:hi]
        try:
            str(window, "utf-8")
        except UnicodeDecodeError as e:
            line = int(np.searchsorted(starts, lo + e.start, side="right"))
            raise not_utf8(path, f"line {line}: {e.reason}") from None
        # A line is kept when any of its bytes (the segment up to the next line) is not space.
        keep[first:last] = np.logical_or.reduceat(~_ASCII_SPACE[window], starts[first:last] - lo)
        first = last
    return starts[keep], ends[keep], int((~keep).sum())


# ---------------------------------------------------------------------------------------------
# Row sources: tables whose rows are documents (HF datasets, TFDS, arrays)


class _RowDocuments(Documents):
    """Documents that are rows of a table. Rows with empty text are skipped through a small
    index of the skipped rows (memory grows with the empty rows, not with the corpus)."""

    text_column: str
    label_column: str | None

    @abc.abstractmethod
    def _num_rows(self) -> int:
        ...

    @abc.abstractmethod
    def _empty_rows(self) -> np.ndarray:
        """Sorted indices of the rows whose text is missing or only whitespace."""

    @abc.abstractmethod
    def _read(self, rows: np.ndarray, column: str) -> list:
        """The values of `column` at `rows` (sorted), as Python objects (text as str)."""

    def __len__(self) -> int:
        return self._num_rows() - len(self._skips)

    def texts(self, start: int, stop: int) -> list[str]:
        return self._read(self._rows(start, stop), self.text_column)

    def labels(self, start: int, stop: int) -> list | None:
        if self.label_column is None:
            return None
        return self._read(self._rows(start, stop), self.label_column)

    @functools.cached_property
    def _skips(self) -> np.ndarray:
        """For each empty row, how many documents come before it: document d is row
        d + (the number of these that are <= d)."""
        empty = np.asarray(self._empty_rows(), np.int64)
        total = self._num_rows()
        if len(empty) == total:
            raise ValueError(f"{self.name}: the corpus holds no text (all {total} documents "
                             f"in column '{self.text_column}' are empty).")
        log_dropped(self.name, len(empty), total, "empty documents")
        return empty - np.arange(len(empty))

    def _rows(self, start: int, stop: int) -> np.ndarray:
        start, stop, _ = slice(start, stop).indices(len(self))
        docs = np.arange(start, stop, dtype=np.int64)
        return docs + np.searchsorted(self._skips, docs, side="right")


class _ArrowDocuments(_RowDocuments):
    """Rows of a Hugging Face `datasets.Dataset` (memory-mapped Arrow); subclasses provide
    `_dataset`."""

    _dataset: object

    def _num_rows(self) -> int:
        return len(self._dataset)

    @functools.cached_property
    def _arrow(self):
        columns = [c for c in (self.text_column, self.label_column) if c is not None]
        return self._dataset.select_columns(columns).with_format("arrow")

    def _empty_rows(self) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc
        found = []
        for a in range(0, self._num_rows(), 100 * _SCAN_ROWS):  # Arrow compute: GB/s
            text = self._arrow[a:a + 100 * _SCAN_ROWS].column(self.text_column)
            if text.type == pa.null():  # a column of nulls only
                found.append(np.arange(a, a + len(text)))
                continue
            length = pc.utf8_length(pc.utf8_trim_whitespace(text))
            empty = pc.fill_null(pc.equal(length, 0), True)
            found.append(np.flatnonzero(empty.to_numpy(zero_copy_only=False)) + a)
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    def _read(self, rows: np.ndarray, column: str) -> list:
        if len(rows) == 0:
            return []
        # Rows come from a range of documents: a zero-copy slice of the rows they span, less
        # the few empty ones.
        first = int(rows[0])
        values = self._arrow[first:int(rows[-1]) + 1].column(column)
        if len(values) != len(rows):
            values = values.take(rows - first)
        return values.to_pylist()


class ColumnFiles(_ArrowDocuments):
    """Local jsonl / csv / parquet files, read through HF `datasets`: converted once into Arrow
    in the HF cache (HF_DATASETS_CACHE), then memory-mapped. The conversion runs on first use,
    so a fresh cache by `fingerprint()` (paths, sizes, mtimes) never needs it."""

    def __init__(self, paths: list[Path], fmt: str, name: str, text_column: str,
                 label_column: str | None):
        self.paths = paths
        self.format = fmt
        self.name = name
        self.text_column = text_column
        self.label_column = label_column
        self._stats = [file_stat(p) for p in paths]

    def fingerprint(self) -> str:
        return source_digest(self.format, self._stats, self.text_column, self.label_column)

    @functools.cached_property
    def _dataset(self):
        import datasets
        for path, stat in zip(self.paths, self._stats):
            if file_stat(path) != stat:
                raise ValueError(f"{path} changed after data.corpus '{self.name}' was opened; "
                                 f"open it again.")
        try:
            ds = datasets.load_dataset(_HF_BUILDERS[self.format],
                                       data_files=[str(p) for p in self.paths], split="train")
        except (ValueError, datasets.exceptions.DatasetGenerationError) as e:
            # (a bad JSON line raises a bare ValueError, "Expected object or value")
            cause = e if isinstance(e, ValueError) else (e.__cause__ or e)
            for path in self.paths:  # the error does not say which file; find it
                check_utf8(path)
                if self.format == "jsonl":
                    check_json(path)
            raise ValueError(f"data.corpus '{self.name}': could not read the files as "
                             f"{self.format} ({type(cause).__name__}: {cause}).") from None
        require_columns(ds.column_names, self.name, self.text_column, self.label_column)
        require_text_type(ds, self.name, self.text_column)
        return ds


class HubDataset(_ArrowDocuments):
    """One split of a Hugging Face hub dataset, as prepared in the local HF cache."""

    def __init__(self, dataset, name: str, text_column: str, label_column: str | None):
        self._dataset = dataset
        self.name = name
        self.text_column = text_column
        self.label_column = label_column

    def fingerprint(self) -> str:
        return source_digest("hf", self._dataset._fingerprint, self.text_column, self.label_column)


class TfdsSource(_RowDocuments):
    """One split of a prepared TensorFlow Datasets dataset, read by random access from its
    array_record (or parquet) files through `tfds` data sources: no TensorFlow involved."""

    def __init__(self, source, name: str, text_column: str, label_column: str | None,
                 identity: tuple):
        self._source = source
        self.name = name
        self.text_column = text_column
        self.label_column = label_column
        self._identity = identity  # (full name with version, split, data dir, info mtime)

    def fingerprint(self) -> str:
        return source_digest("tfds", self._identity, self.text_column, self.label_column)

    def _num_rows(self) -> int:
        return len(self._source)

    def _empty_rows(self) -> np.ndarray:
        # Decoding records is the cost here (tens of thousands a second): one pass, on first use.
        empty = []
        for a in range(0, self._num_rows(), _SCAN_ROWS):
            rows = list(range(a, min(a + _SCAN_ROWS, self._num_rows())))
            for row, record in zip(rows, self._source.__getitems__(rows)):
                try:
                    if not plain(record[self.text_column]).strip():
                        empty.append(row)
                except UnicodeDecodeError as e:
                    raise ValueError(f"{self.name}: row {row} of feature '{self.text_column}' "
                                     f"is not UTF-8 ({e.reason}).") from None
        return np.asarray(empty, np.int64)

    def _read(self, rows: np.ndarray, column: str) -> list:
        return [plain(r[column]) for r in self._source.__getitems__(rows.tolist())]


class InMemory(_RowDocuments):
    """Texts and labels held in memory (see `from_arrays`)."""

    text_column = "text"

    def __init__(self, texts, labels, name: str):
        self.name = name
        try:
            self._texts = [plain(t) for t in as_list(texts)]
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}: a text is bytes that are not UTF-8 ({e.reason}); decode "
                             f"the texts to str first.") from None
        wrong = next((i for i, t in enumerate(self._texts)
                      if t is not None and not isinstance(t, str)), None)
        if wrong is not None:
            raise ValueError(f"{name}: text {wrong} is {type(self._texts[wrong]).__name__}, "
                             f"not str, bytes or None.")
        self._labels = None if labels is None else as_list(labels)
        self.label_column = None if labels is None else "label"
        if self._labels is not None and len(self._labels) != len(self._texts):
            raise ValueError(f"{name}: {len(self._texts)} texts but {len(self._labels)} labels; "
                             f"give one label per text.")

    @functools.cached_property
    def _content_hash(self) -> str:
        h = hashlib.sha256()
        for text in self._texts:  # length-prefixed, so ["ab", "c"] and ["a", "bc"] differ
            if text is None:
                h.update(b"N")
            else:
                data = text.encode("utf-8")
                h.update(b"S" + len(data).to_bytes(8, "little") + data)
        h.update(json.dumps(self._labels, default=str).encode())
        return h.hexdigest()

    def fingerprint(self) -> str:
        return source_digest("arrays", self._content_hash)

    def _num_rows(self) -> int:
        return len(self._texts)

    def _empty_rows(self) -> np.ndarray:
        return np.asarray([i for i, t in enumerate(self._texts) if t is None or not t.strip()],
                          np.int64)

    def _read(self, rows: np.ndarray, column: str) -> list:
        values = self._texts if column == self.text_column else self._labels
        return [values[r] for r in rows.tolist()]
