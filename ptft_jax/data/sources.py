"""Where documents come from: local files (text, jsonl, csv, parquet), Hugging Face hub
datasets, TensorFlow Datasets (array_record, no TensorFlow), in-memory arrays, bundled corpora.

`open_documents(cfg.data)` returns a `Documents`: a random-access sequence of the non-empty
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
import contextlib
import csv
import functools
import glob
import gzip
import hashlib
import json
import logging
import mmap
import os
import zlib
from pathlib import Path

import numpy as np

from ptft_jax.config import DataConfig

log = logging.getLogger(__name__)

_CORPORA = Path(__file__).with_name("corpora")
BUNDLED = {"kjv": _CORPORA / "kjv.txt.gz"}  # text, one split
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

# Part of every fingerprint: bump it when the way documents are read changes (stripping,
# what counts as empty), so caches built by older code go stale.
_READER_VERSION = 1

_SCAN_BYTES = 16 << 20  # text files are scanned in windows of about this size
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


def open_documents(cfg: DataConfig, split: str | None = None) -> Documents:
    """The documents of `cfg.corpus` (split defaults to `cfg.split`). Raises ValueError, naming
    the file or dataset and what to do, for anything wrong that can be seen without reading
    the data."""
    split = cfg.split if split is None else split
    corpus = cfg.corpus
    if corpus.startswith("hf:"):
        return _open_hub(corpus[len("hf:"):], split, cfg.text_column, cfg.label_column)
    if corpus.startswith("tfds:"):
        return _open_tfds(corpus[len("tfds:"):], split, cfg.text_column, cfg.label_column)
    if cfg.format != "auto" and cfg.format not in EXTENSIONS:
        raise ValueError(f"data.format '{cfg.format}' is unknown; use auto (from the file "
                         f"extension) or one of: {', '.join(EXTENSIONS)}.")
    if corpus.startswith("bundled:") and corpus[len("bundled:"):] in BUNDLED_LABELLED:
        return _open_bundled_labelled(corpus, split, cfg.text_column, cfg.label_column)
    if corpus.startswith("bundled:"):
        paths, fmt = [_bundled(corpus)], "text"
    else:
        paths, fmt = _local_files(corpus, cfg.format)
    if split != "train":
        raise ValueError(f"data.corpus '{corpus}' is local files, which have one split, "
                         f"'train' (asked for '{split}'). Point data.corpus at the files of "
                         f"that split instead.")
    if fmt == "text":
        if cfg.label_column is not None:
            raise ValueError(f"data.corpus '{corpus}' is text files (one document per line), "
                             f"which have no label column; set data.label_column=null, or use "
                             f"jsonl, csv or parquet files with a '{cfg.label_column}' column.")
        return TextFiles(paths, corpus)
    for path in paths:
        columns = _peek_columns(path, fmt)
        if columns is not None:  # None: a whole-file JSON document, checked once loaded
            _require_columns(columns, str(path), cfg.text_column, cfg.label_column)
    return ColumnFiles(paths, fmt, corpus, cfg.text_column, cfg.label_column)


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
        self._stats = [_file_stat(p) for p in paths]
        self._open_file: tuple[int, object] | None = None  # (file index, its bytes), one at a time

    def fingerprint(self) -> str:
        return _digest("text", self._stats)

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
                             f"{_some(self.paths)} is blank.")
        _log_dropped(self.name, blank, int(first_doc[-1]) + blank, "blank lines")
        return starts, ends, first_doc

    def _bytes(self, i: int):
        """File i's bytes (memory-mapped for .txt); only the last one used stays open, so a
        folder of thousands of files holds neither thousands of descriptors nor all in memory."""
        if self._open_file is None or self._open_file[0] != i:
            path = self.paths[i]
            if _file_stat(path) != self._stats[i]:
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
    newlines = np.concatenate([np.flatnonzero(data[a:a + _SCAN_BYTES] == ord("\n")) + a
                               for a in range(0, n, _SCAN_BYTES)])
    starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
    ends = np.concatenate([newlines, [n]]).astype(np.int64)
    if starts[-1] == n:  # the file ends with a newline: there is no line after it
        starts, ends = starts[:-1], ends[:-1]
    keep = np.empty(len(starts), bool)
    first = 0
    while first < len(starts):
        last = max(first + 1, int(np.searchsorted(starts, starts[first] + _SCAN_BYTES)))
        lo = starts[first]
        hi = starts[last] if last < len(starts) else n  # each line with its newline
        window = data[lo:hi]
        try:
            str(window, "utf-8")
        except UnicodeDecodeError as e:
            line = int(np.searchsorted(starts, lo + e.start, side="right"))
            raise _not_utf8(path, f"line {line}: {e.reason}") from None
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
        _log_dropped(self.name, len(empty), total, "empty documents")
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
        self._stats = [_file_stat(p) for p in paths]

    def fingerprint(self) -> str:
        return _digest(self.format, self._stats, self.text_column, self.label_column)

    @functools.cached_property
    def _dataset(self):
        import datasets
        for path, stat in zip(self.paths, self._stats):
            if _file_stat(path) != stat:
                raise ValueError(f"{path} changed after data.corpus '{self.name}' was opened; "
                                 f"open it again.")
        try:
            ds = datasets.load_dataset(_HF_BUILDERS[self.format],
                                       data_files=[str(p) for p in self.paths], split="train")
        except (UnicodeDecodeError, datasets.exceptions.DatasetGenerationError) as e:
            cause = e if isinstance(e, UnicodeDecodeError) else (e.__cause__ or e)
            for path in self.paths:  # the error does not say which file; find it
                _check_utf8(path)
            raise ValueError(f"data.corpus '{self.name}': could not read the files as "
                             f"{self.format} ({type(cause).__name__}: {cause}).") from None
        _require_columns(ds.column_names, self.name, self.text_column, self.label_column)
        _require_text_type(ds, self.name, self.text_column)
        return ds


class HubDataset(_ArrowDocuments):
    """One split of a Hugging Face hub dataset, as prepared in the local HF cache."""

    def __init__(self, dataset, name: str, text_column: str, label_column: str | None):
        self._dataset = dataset
        self.name = name
        self.text_column = text_column
        self.label_column = label_column

    def fingerprint(self) -> str:
        return _digest("hf", self._dataset._fingerprint, self.text_column, self.label_column)


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
        return _digest("tfds", self._identity, self.text_column, self.label_column)

    def _num_rows(self) -> int:
        return len(self._source)

    def _empty_rows(self) -> np.ndarray:
        # Decoding records is the cost here (tens of thousands a second): one pass, on first use.
        empty = []
        for a in range(0, self._num_rows(), _SCAN_ROWS):
            rows = list(range(a, min(a + _SCAN_ROWS, self._num_rows())))
            for row, record in zip(rows, self._source.__getitems__(rows)):
                try:
                    if not _plain(record[self.text_column]).strip():
                        empty.append(row)
                except UnicodeDecodeError as e:
                    raise ValueError(f"{self.name}: row {row} of feature '{self.text_column}' "
                                     f"is not UTF-8 ({e.reason}).") from None
        return np.asarray(empty, np.int64)

    def _read(self, rows: np.ndarray, column: str) -> list:
        return [_plain(r[column]) for r in self._source.__getitems__(rows.tolist())]


class InMemory(_RowDocuments):
    """Texts and labels held in memory (see `from_arrays`)."""

    text_column = "text"

    def __init__(self, texts, labels, name: str):
        self.name = name
        try:
            self._texts = [_plain(t) for t in _as_list(texts)]
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}: a text is bytes that are not UTF-8 ({e.reason}); decode "
                             f"the texts to str first.") from None
        wrong = next((i for i, t in enumerate(self._texts)
                      if t is not None and not isinstance(t, str)), None)
        if wrong is not None:
            raise ValueError(f"{name}: text {wrong} is {type(self._texts[wrong]).__name__}, "
                             f"not str, bytes or None.")
        self._labels = None if labels is None else _as_list(labels)
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
        return _digest("arrays", self._content_hash)

    def _num_rows(self) -> int:
        return len(self._texts)

    def _empty_rows(self) -> np.ndarray:
        return np.asarray([i for i, t in enumerate(self._texts) if t is None or not t.strip()],
                          np.int64)

    def _read(self, rows: np.ndarray, column: str) -> list:
        values = self._texts if column == self.text_column else self._labels
        return [values[r] for r in rows.tolist()]


# ---------------------------------------------------------------------------------------------
# Opening each kind of source: the cheap checks, in order, before any data is read


def _bundled(corpus: str) -> Path:
    name = corpus.split(":", 1)[1]
    if name not in BUNDLED:
        known = [*BUNDLED, *BUNDLED_LABELLED]
        raise ValueError(f"data.corpus '{corpus}': no bundled corpus '{name}'. "
                         f"Bundled: {', '.join('bundled:' + n for n in known)}.")
    return BUNDLED[name]


def _open_bundled_labelled(corpus: str, split: str, text_column: str,
                           label_column: str | None) -> Documents:
    """A bundled labelled set: gzipped JSON lines with 'text' and 'label', a file per split."""
    files = BUNDLED_LABELLED[corpus.split(":", 1)[1]]
    if split not in files:
        raise ValueError(f"data.corpus '{corpus}' has the splits {', '.join(files)}; "
                         f"asked for '{split}'.")
    _require_columns(["text", "label"], corpus, text_column, label_column)
    return ColumnFiles([files[split]], "jsonl", f"{corpus}[{split}]", text_column, label_column)


def _format_of(path: Path) -> str | None:
    for fmt, extensions in EXTENSIONS.items():
        if path.name.lower().endswith(extensions):
            return fmt
    return None


def _local_files(corpus: str, fmt: str) -> tuple[list[Path], str]:
    """The files `corpus` names (a file, a folder or a glob), sorted, and their format."""
    pattern = os.path.expanduser(corpus)
    path = Path(pattern)
    if any(c in pattern for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    elif path.is_dir():
        # Every supported file in the folder and its subfolders; hidden ones are skipped.
        wanted = EXTENSIONS.get(fmt) or tuple(e for exts in EXTENSIONS.values() for e in exts)
        paths = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.name.lower().endswith(wanted)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not paths:
            raise ValueError(f"data.corpus '{corpus}': the folder holds no "
                             f"{'' if fmt == 'auto' else fmt + ' '}files with a supported "
                             f"extension ({', '.join(wanted)}). Point data.corpus at the files, "
                             f"or set data.format.")
    elif path.is_file():
        paths = [path]
    else:
        paths = []
    if not paths:
        raise ValueError(f"data.corpus '{corpus}' is not a file, a folder, or a glob that "
                         f"matches a file. Give a path or glob of .txt, .txt.gz, .jsonl, .csv "
                         f"or .parquet files, 'hf:NAME', 'tfds:NAME' or 'bundled:kjv'.")
    if fmt == "auto":
        formats = {p: _format_of(p) for p in paths}
        unknown = [p for p, f in formats.items() if f is None]
        if unknown:
            raise ValueError(f"data.corpus '{corpus}': cannot tell the format of "
                             f"{_some(unknown)} from the extension. Set data.format to one of "
                             f"{', '.join(EXTENSIONS)}, or narrow the glob.")
        found = sorted(set(formats.values()))
        if len(found) > 1:
            example = path / ("*" + EXTENSIONS[found[0]][0])
            raise ValueError(f"data.corpus '{corpus}' mixes formats ({', '.join(found)}). Use "
                             f"a glob of one kind (e.g. '{example}') or set data.format.")
        fmt = found[0]
    for p in paths:
        if p.stat().st_size == 0:
            raise ValueError(f"{p} is empty (0 bytes). Remove it from data.corpus "
                             f"'{corpus}', or re-create it.")
    return paths, fmt


def _peek_columns(path: Path, fmt: str) -> list[str] | None:
    """The column names of one file, from its header, first record or schema; None for a JSON
    file that is one document (its columns are known only once it is loaded)."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            return pq.read_schema(path).names
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{path}: not a readable parquet file ({e}).") from None
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if fmt == "csv":
                return next(csv.reader(f), [])
            for line in f:
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        return None
                    return list(record) if isinstance(record, dict) else None
    except UnicodeDecodeError as e:
        raise _not_utf8(path, f"near the start: {e.reason}") from None
    return None


def _require_columns(columns: list[str], where: str, text_column: str,
                     label_column: str | None) -> None:
    for key, column in (("data.text_column", text_column), ("data.label_column", label_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{where} has no column '{column}' ({key}). Its columns: "
                             f"{', '.join(map(str, columns)) or '(none)'}. Set {key}=<one of "
                             f"them>" + (" or null for no labels." if key.endswith("label_column")
                                         else "."))


def _require_text_type(dataset, where: str, column: str) -> None:
    import datasets
    feature = dataset.features[column]
    if not (isinstance(feature, datasets.Value)
            and feature.dtype in ("string", "large_string", "null")):
        texts = [c for c, f in dataset.features.items()
                 if isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")]
        raise ValueError(f"{where}: column '{column}' holds {feature}, not text. Set "
                         f"data.text_column to a text column (text columns: "
                         f"{', '.join(texts) or 'none'}).")


def _split_names(split: str) -> list[str]:
    """'train[:10%]+test' -> ['train', 'test'] (the HF and TFDS split syntax)."""
    return [part.split("[")[0].strip() for part in split.split("+")]


def _require_split(split: str, available, where: str) -> None:
    missing = [s for s in _split_names(split) if s not in available]
    if missing:
        raise ValueError(f"{where} has no split '{missing[0]}'. Its splits: "
                         f"{', '.join(available)}. Set data.split=<one of them>.")


def _open_hub(spec: str, split: str, text_column: str, label_column: str | None) -> Documents:
    """`hf:NAME`, `hf:OWNER/NAME` or `hf:OWNER/NAME/CONFIG`. Loads (and on first use
    downloads) the split into the HF cache. When the hub cannot be reached, only the local
    cache is tried, so an offline machine fails in seconds instead of retrying for minutes."""
    import datasets
    from huggingface_hub import constants
    parts = spec.split("/")
    if not spec or len(parts) > 3 or not all(parts):
        raise ValueError(f"data.corpus 'hf:{spec}' is not a dataset name: use hf:NAME, "
                         f"hf:OWNER/NAME or hf:OWNER/NAME/CONFIG (e.g. hf:stanfordnlp/imdb).")
    repo, config = ("/".join(parts[:2]), parts[2]) if len(parts) == 3 else (spec, None)
    name = f"hf:{spec}[{split}]"
    if datasets.config.HF_HUB_OFFLINE:
        offline = "offline mode is on: HF_DATASETS_OFFLINE or HF_HUB_OFFLINE is set"
    elif not _hub_reachable(constants.ENDPOINT):
        offline = f"{constants.ENDPOINT} does not answer"
    else:
        offline = None
    with _hub_offline_mode() if offline else contextlib.nullcontext():
        try:
            builder = datasets.load_dataset_builder(repo, config)
        except (ConnectionError, FileNotFoundError) as e:  # DatasetNotFoundError included
            if offline or isinstance(e, ConnectionError):
                raise ValueError(_hub_unreachable(spec, repo, config, split,
                                                  offline or str(e))) from None
            raise ValueError(f"data.corpus 'hf:{spec}': no dataset '{repo}' on the Hugging "
                             f"Face hub ({e}). Check the name at https://huggingface.co/"
                             f"datasets, or log in (`hf auth login`) if it is gated.") from None
        if builder.info.splits:
            _require_split(split, list(builder.info.splits), f"hf:{spec}")
        if builder.info.features:
            _require_columns(list(builder.info.features), name, text_column, label_column)
        builder.download_and_prepare()
        try:
            ds = builder.as_dataset(split=split)
        except ValueError as e:  # splits were unknown before preparing: HF names them now
            raise ValueError(f"{name}: {e} Set data.split=<one of them>.") from None
    _require_columns(ds.column_names, name, text_column, label_column)
    _require_text_type(ds, name, text_column)
    return HubDataset(ds, name, text_column, label_column)


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether the hub answers at all (any HTTP status), through huggingface_hub's own HTTP
    session so proxies apply; no retries."""
    from huggingface_hub import get_session
    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception:  # DNS, connection, TLS, timeout: all mean "not reachable from here"
        return False
    return True


@contextlib.contextmanager
def _hub_offline_mode():
    """HF offline mode for the duration (a cached dataset still loads), as HF_DATASETS_OFFLINE=1
    would give; both libraries read these flags at call time."""
    import datasets
    from huggingface_hub import constants
    before = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = before


def _hub_unreachable(spec: str, repo: str, config: str | None, split: str, reason: str) -> str:
    args = repr(repo) + (f", {config!r}" if config else "")
    out = f"{repo.replace('/', '_')}-{split}.parquet"
    return (f"data.corpus 'hf:{spec}': could not reach the Hugging Face hub ({reason}), and "
            f"the dataset is not in the local HF cache. Use local files instead: where the hub "
            f"is reachable, run `python -c \"import datasets; datasets.load_dataset({args}, "
            f"split={split!r}).to_parquet({out!r})\"`, copy {out} here, and set "
            f"data.corpus=path/to/*.parquet.")


def _open_tfds(spec: str, split: str, text_column: str, label_column: str | None) -> Documents:
    """`tfds:NAME[/CONFIG][:VERSION]`: a dataset already prepared (in array_record format)
    under TFDS_DATA_DIR or ~/tensorflow_datasets. What `tfds.data_source(spec, split=split,
    data_dir=..., download=False)` does, with each failure explained: it is never downloaded
    or built here."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import file_adapters
    # tfds reads TFDS_DATA_DIR once, at import; read it now so the current value counts.
    data_dir = os.environ.get("TFDS_DATA_DIR")
    where = data_dir or "~/tensorflow_datasets (set TFDS_DATA_DIR to look elsewhere)"
    prepare = (f"Prepare it where the network is reachable with `tfds build {spec} "
               f"--file_format=array_record --data_dir=DIR`, then set TFDS_DATA_DIR=DIR.")
    try:
        builder = tfds.builder(spec, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(f"data.corpus 'tfds:{spec}': no such dataset registered with tfds, "
                         f"nor prepared in {where}. {prepare}") from None
    if not builder.is_prepared():
        raise ValueError(f"data.corpus 'tfds:{spec}' is not prepared in {builder.data_dir}. "
                         f"{prepare}")
    if builder.info.file_format not in file_adapters.FileFormat.with_random_access():
        raise ValueError(f"data.corpus 'tfds:{spec}' is prepared as "
                         f"{builder.info.file_format or 'tfrecord'} in {builder.data_dir}, "
                         f"which has no random access and needs TensorFlow. Rebuild it with "
                         f"--file_format=array_record.")
    name = f"tfds:{spec}[{split}]"
    _require_split(split, list(builder.info.splits), f"tfds:{spec}")
    features = builder.info.features
    _require_columns(list(features.keys()), f"tfds:{spec}", text_column, label_column)
    feature = features[text_column]
    if feature.shape != () or np.dtype(feature.np_dtype).kind not in "OSU":
        raise ValueError(f"tfds:{spec}: feature '{text_column}' holds {feature}, not text. Set "
                         f"data.text_column to a text feature.")
    source = builder.as_data_source(split=split)
    info_file = Path(builder.data_dir) / "dataset_info.json"
    identity = (builder.info.full_name, split, str(builder.data_dir),
                info_file.stat().st_mtime_ns if info_file.exists() else 0)
    return TfdsSource(source, name, text_column, label_column, identity)


# ---------------------------------------------------------------------------------------------
# Small shared pieces


def _file_stat(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _digest(*parts) -> str:
    text = json.dumps([_READER_VERSION, *parts], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _log_dropped(name: str, dropped: int, total: int, what: str) -> None:
    if dropped:
        log.warning("%s: dropped %d %s of %d; %d documents remain.", name, dropped, what,
                    total, total - dropped)


def _not_utf8(path: Path, detail: str) -> ValueError:
    fixed = path.name.replace(".", ".utf8.", 1)
    return ValueError(f"{path}: not UTF-8 text ({detail}). Convert it, e.g. "
                      f"`iconv -f latin1 -t utf-8 {path.name} > {fixed}`, and point data.corpus "
                      f"at the converted file.")


def _check_utf8(path: Path) -> None:
    """Raises naming `path` if it is not UTF-8; streams, so any size is fine."""
    import codecs
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(_SCAN_BYTES):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                raise _not_utf8(path, f"near byte {offset + e.start}: {e.reason}") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, f"at the end: {e.reason}") from None


def _plain(value):
    """A value as Python: NumPy scalars and arrays -> Python, bytes -> str (UTF-8)."""
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _as_list(values) -> list:
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def _some(paths: list[Path], shown: int = 3) -> str:
    names = ", ".join(str(p) for p in paths[:shown])
    return names + (f" and {len(paths) - shown} more" if len(paths) > shown else "")
