"""Image-text pairs (and an optional label per pair): where they come from, and the examples
a multimodal task reads.

Sources (`data.corpus`), each one split unless it says otherwise:

| corpus | what |
|---|---|
| `emoji` | Noto Color Emoji glyphs with their Unicode names (data/emoji.py; splits train / validation / test) |
| `pairs.jsonl`, `pairs.csv` | one pair per row: `data.image_column` (an image file, relative to the file's folder), `data.text_column`, optionally `data.label_column` |
| `pairs.npz` | arrays: `data.image_column` uint8 [n, h, w(, c)], `data.text_column` strings, optionally `data.label_column` |
| `hf:NAME` | a Hugging Face dataset's image and text columns (`data.split`) |

Images go through the image cache (decoded and resized once, by worker processes, resumable,
checksummed); the cache keeps each pair's text and label beside its image, so the three stay
aligned through skipped unreadable files. Texts are tokenized in memory when a run starts
(captions are short; the tokenizer is Rust and batched).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ptft_jax.config.reading import read_jsonl, read_text
from ptft_jax.data.images import ImageExamples
from ptft_jax.data.emoji import EmojiPairs
from ptft_jax.data.image_io import (as_array, digest, file_key, gather_images,
                                   read_image_files)
from ptft_jax.data.opening import open_hub_images, require_image_columns


class PairRecords:
    """An image source for the image cache whose per-image "labels" are {text, label}
    records: the cache then keeps a pair's text and label aligned with its image."""

    def __init__(self, source):
        self.source = source
        self.name = source.name

    def __len__(self) -> int:
        return len(self.source)

    def fingerprint(self) -> str:
        return self.source.fingerprint()

    def read(self, start: int, stop: int) -> list:
        return self.source.read(start, stop)

    def labels(self) -> list:
        return [{"text": t, "label": lab}
                for t, lab in zip(self.source.texts(), self.source.labels())]


def _check_texts(texts: list, where: str) -> list[str]:
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{where}: pair {i} has no text ({t!r}); every image needs a "
                             f"non-empty text.")
    return texts


class NpzPairs:
    def __init__(self, path: Path, image_column: str, text_column: str,
                 label_column: str | None):
        self.path, self.name = path, str(path)
        self.columns = image_column, text_column, label_column
        with np.load(path, allow_pickle=False) as z:
            missing = [c for c in self.columns if c is not None and c not in z.files]
            if missing:
                raise ValueError(f"data.corpus '{path}' has no array {missing[0]!r} (it holds: "
                                 f"{', '.join(z.files)}); set data.image_column / "
                                 f"data.text_column / data.label_column.")
            lengths = {c: len(z[c]) for c in self.columns if c is not None}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"'{c}' {n:,}" for c, n in lengths.items())
            raise ValueError(f"data.corpus '{path}': its columns have different lengths ({shown}"
                             f"); each image needs exactly one text (and label).")
        self.n = lengths[image_column]
        self._arrays = None

    def _load(self):
        if self._arrays is None:
            with np.load(self.path, allow_pickle=False) as z:
                self._arrays = {c: z[c] for c in self.columns if c is not None}
        return self._arrays

    def __len__(self) -> int:
        return self.n

    def fingerprint(self) -> str:
        return digest("npz-pairs", file_key(self.path), self.columns)

    def texts(self) -> list[str]:
        return _check_texts([str(t) for t in self._load()[self.columns[1]]], self.name)

    def labels(self) -> list:
        column = self.columns[2]
        if column is None:
            return [None] * self.n
        return [v.item() if hasattr(v, "item") else v for v in self._load()[column]]

    def read(self, start: int, stop: int) -> list:
        images = self._load()[self.columns[0]]
        return [as_array(images[i], f"{self.name} row {i}") for i in range(start, stop)]

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}


class FilePairs:
    """A .jsonl or .csv file, one pair per row; image paths relative to the file's folder."""

    def __init__(self, path: Path, image_column: str, text_column: str,
                 label_column: str | None):
        self.path, self.name = path, str(path)
        self.columns = image_column, text_column, label_column
        what = "an image-text pairs file"
        if path.suffix == ".jsonl":  # (the file's line number, the row)
            numbered = [(f"line {n}", row) for n, row in read_jsonl(path, what)]
        else:
            text = read_text(path, what, universal_newlines=False)  # csv reads \r\n itself
            numbered = [(f"row {i + 1}", row) for i, row in
                        enumerate(csv.DictReader(io.StringIO(text, newline="")))]
        for where, row in numbered:
            missing = [c for c in self.columns if c is not None and c not in row]
            if missing:
                raise ValueError(f"{path} {where} has no column {missing[0]!r} (it has: "
                                 f"{', '.join(row)}); set data.image_column / "
                                 f"data.text_column / data.label_column.")
        rows = [row for _, row in numbered]
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def _file(self, i: int) -> Path:
        p = Path(str(self.rows[i][self.columns[0]]))
        return p if p.is_absolute() else self.path.parent / p

    def fingerprint(self) -> str:
        files = []
        for i in range(len(self)):
            f = self._file(i)
            files.append(file_key(f)[1:] if f.exists() else None)
        return digest("file-pairs", file_key(self.path), self.columns, files)

    def texts(self) -> list[str]:
        if self.columns[1] is None:
            return [""] * len(self)
        return _check_texts([r[self.columns[1]] for r in self.rows], self.name)

    def labels(self) -> list:
        column = self.columns[2]
        return [r[column] if column is not None else None for r in self.rows]

    def read(self, start: int, stop: int) -> list:
        return read_image_files(self._file(i) for i in range(start, stop))


class HubPairs:
    def __init__(self, spec: str, split: str, image_column: str, text_column: str,
                 label_column: str | None):
        self.spec, self.split, self.name = spec, split, f"hf:{spec}:{split}"
        self.columns = image_column, text_column, label_column
        self._open()

    def _open(self):
        self._data = open_hub_images(self.spec, self.split, self.columns[0],
                                      self.columns[2] or self.columns[0])
        require_image_columns(self._data.column_names, self.name, self.columns[0], self.columns[1])

    def __len__(self) -> int:
        return len(self._data)

    def fingerprint(self) -> str:
        return digest("hf-pairs", self.spec, self.split, self._data._fingerprint, self.columns)

    def texts(self) -> list[str]:
        return _check_texts(list(self._data[self.columns[1]]), self.name)

    def labels(self) -> list:
        column = self.columns[2]
        return list(self._data[column]) if column else [None] * len(self)

    def read(self, start: int, stop: int) -> list:
        cells = self._data[start:stop][self.columns[0]]
        return [as_array(v, f"{self.name} row {start + i}") for i, v in enumerate(cells)]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_data"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()


def open_pairs(corpus: str, split: str, image_column: str, text_column: str,
               label_column: str | None):
    """The pair source `data.corpus` names (see the module docstring)."""
    if corpus == "emoji" or corpus.startswith("emoji:"):
        return EmojiPairs(split, text_column, label_column)
    if corpus.startswith("hf:"):
        return HubPairs(corpus[3:], split, image_column, text_column, label_column)
    path = Path(corpus)
    if path.suffix in (".npz", ".jsonl", ".csv"):
        if not path.is_file():
            raise ValueError(f"data.corpus '{corpus}': no such file.")
        if path.suffix == ".npz":
            return NpzPairs(path, image_column, text_column, label_column)
        return FilePairs(path, image_column, text_column, label_column)
    raise ValueError(f"data.corpus '{corpus}' is not an image-text source: use 'emoji', a "
                     f".jsonl / .csv file of image paths and texts, a .npz of image and text "
                     f"arrays, or hf:NAME.")


class PairExamples(ImageExamples):
    """One split of image-text pairs: the images (as ImageExamples), their token rows and
    captions, label ids or None without labels."""

    def __init__(self, images: np.ndarray, texts, captions: list[str],
                 label_ids: np.ndarray | None, index: np.ndarray | None = None):
        super().__init__(images, label_ids, index)
        self.texts, self.captions = texts, captions

    def rows(self, index) -> dict[str, np.ndarray]:
        rows = self.index[np.asarray(index, np.int64)]
        out = self.texts.rows(rows)
        out["image"] = gather_images(self.images, rows)
        if self.label_ids is not None:
            out["label"] = self.label_ids[rows].astype(np.int32)
        out["weight"] = np.ones(len(rows), np.float32)
        return out

    def caption_groups(self) -> np.ndarray:
        """Per example, the index of its text among the distinct texts: pairs that share a
        text (two images with one caption) count as each other's matches in retrieval."""
        captions = [self.captions[i] for i in self.index]
        _, groups = np.unique(np.asarray(captions, dtype=object).astype(str),
                              return_inverse=True)
        return groups
