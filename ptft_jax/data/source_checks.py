"""What every document source shares: its fingerprint (what the token cache's staleness check
compares), the checks that name a bad file or column and how to fix it, and small conversions
of what datasets hand back."""
from __future__ import annotations

import codecs
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from ptft_jax.config.reading import UnreadableFile, read_json, read_jsonl

log = logging.getLogger(__name__)

# Part of every fingerprint: bump it when the way documents are read changes (stripping,
# what counts as empty), so caches built by older code go stale.
READER_VERSION = 1
SCAN_BYTES = 16 << 20  # text files are scanned in windows of about this size


def file_stat(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def source_digest(*parts) -> str:
    text = json.dumps([READER_VERSION, *parts], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def log_dropped(name: str, dropped: int, total: int, what: str) -> None:
    if dropped:
        log.warning("%s: dropped %d %s of %d; %d documents remain.", name, dropped, what,
                    total, total - dropped)


def not_utf8(path: Path, detail: str) -> ValueError:
    fixed = path.name.replace(".", ".utf8.", 1)
    return ValueError(f"{path}: not UTF-8 text ({detail}). Convert it, e.g. "
                      f"`iconv -f latin1 -t utf-8 {path.name} > {fixed}`, and point data.corpus "
                      f"at the converted file.")


def check_utf8(path: Path) -> None:
    """Raises naming `path` if it is not UTF-8; streams, so any size is fine."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(SCAN_BYTES):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                raise not_utf8(path, f"near byte {offset + e.start}: {e.reason}") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise not_utf8(path, f"at the end: {e.reason}") from None


def check_json(path: Path) -> None:
    """Raises naming `path` and its line if it is neither JSON lines (an object a line) nor
    one JSON document (what HF's json builder reads from .jsonl / .json files). Called once
    reading has failed: the builder's own error names neither the file nor the line."""
    what = "a data.corpus .jsonl / .json file"
    records = 0
    try:
        for _ in read_jsonl(path, what):
            records += 1
        return
    except UnreadableFile:
        if records:  # JSON lines up to a bad one: that line is the error
            raise
    read_json(path, what, object)  # one JSON document, or its own error (line, column)


def plain(value):
    """A value as Python: NumPy scalars and arrays -> Python, bytes -> str (UTF-8)."""
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()
    return value.decode("utf-8") if isinstance(value, bytes) else value


def as_list(values) -> list:
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def some_paths(paths: list[Path], shown: int = 3) -> str:
    names = ", ".join(str(p) for p in paths[:shown])
    return names + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def require_columns(columns: list[str], where: str, text_column: str,
                     label_column: str | None) -> None:
    if columns and str(columns[0]).lstrip().startswith(("{", "[")):
        # A JSON lines file read as CSV: its "columns" are pieces of the first record.
        raise ValueError(f"{where} is read as CSV, but its first line is JSON, not a header of "
                         f"column names: set data.format=jsonl (or auto, to go by the file's "
                         f"extension).")
    for key, column in (("data.text_column", text_column), ("data.label_column", label_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{where} has no column '{column}' ({key}). Its columns: "
                             f"{', '.join(map(str, columns)) or '(none)'}. Set {key}=<one of "
                             f"them>" + (" or null for no labels." if key.endswith("label_column")
                                         else "."))


def require_text_type(dataset, where: str, column: str) -> None:
    import datasets
    feature = dataset.features[column]
    if not (isinstance(feature, datasets.Value)
            and feature.dtype in ("string", "large_string", "null")):
        texts = [c for c, f in dataset.features.items()
                 if isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")]
        raise ValueError(f"{where}: column '{column}' holds {feature}, not text. Set "
                         f"data.text_column to a text column (text columns: "
                         f"{', '.join(texts) or 'none'}).")
