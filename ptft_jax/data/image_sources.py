"""Where labelled images come from: IDX files (the MNIST format), NumPy arrays, a folder with
one subfolder per class, a Hugging Face dataset's image column, or a TensorFlow Datasets
`data_source` (array_record). Each source is a cheap, picklable reference to the data: the
image cache's worker processes open it again and read their own shards.

A source gives `len()`, `fingerprint()` (what the cache's staleness check compares),
`labels()` (every raw label, cheap) and `read(start, stop)`: a list of uint8 [h, w, c] arrays,
or of `BadImage` for a file that cannot be decoded.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ptft_jax.data.image_io import (as_array, digest, file_key,
                                   read_image_files)
from ptft_jax.data.opening import (open_hub_images, require_image_columns, tfds_builder,
                                   tfds_data_source)
from ptft_jax.data.pairs import open_pairs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """The array an IDX file (optionally gzipped) holds; a clear error for anything else."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read this IDX file ({e}).") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (its first bytes are not the IDX magic "
                         f"number 00 00 <type> <dims>).")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    if len(data) != header + int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: the IDX header says {shape} {dtype} values but the file "
                         f"holds {len(data) - header} bytes after it: truncated or damaged.")
    return np.frombuffer(data, dtype, offset=header).reshape(shape)


class IdxImages:
    """An IDX images file [n, h, w] or [n, h, w, c] and its IDX labels file [n]."""

    def __init__(self, images: Path, labels: Path):
        self.images_path, self.labels_path = images, labels
        self.name = str(images)
        self._images = None

    def _load(self) -> np.ndarray:
        if self._images is None:
            a = read_idx(self.images_path)
            if a.ndim not in (3, 4) or a.dtype != np.uint8:
                raise ValueError(f"{self.images_path}: IDX images must be uint8 [n, h, w] or "
                                 f"[n, h, w, c]; it holds {a.dtype} {a.shape}.")
            self._images = a[..., None] if a.ndim == 3 else a
        return self._images

    def __len__(self) -> int:
        return len(self._load())

    def fingerprint(self) -> str:
        return digest("idx", file_key(self.images_path), file_key(self.labels_path))

    def labels(self) -> list:
        labels = read_idx(self.labels_path)
        if labels.ndim != 1 or len(labels) != len(self):
            raise ValueError(f"{self.labels_path} holds {labels.shape} labels for the "
                             f"{len(self)} images of {self.images_path}; the two files must "
                             f"have the same length.")
        return labels.astype(np.int64).tolist()

    def read(self, start: int, stop: int) -> list:
        return list(self._load()[start:stop])

    def __getstate__(self):
        return {**self.__dict__, "_images": None}


def open_idx(spec: str, split: str) -> IdxImages:
    """`idx:PATH`: an images file (its labels file is the same name with `labels-idx1`), or a
    folder holding `<split>-images-idx3-ubyte[.gz]` (`t10k` is the MNIST name of test)."""
    path = Path(spec)
    if path.is_dir():
        prefixes = [split] + (["t10k"] if split == "test" else [])
        found = [p for prefix in prefixes
                 for p in sorted(path.glob(f"{prefix}-images-idx3-ubyte*"))]
        if not found:
            have = sorted({p.name.split("-images")[0] for p in path.glob("*-images-idx*")})
            raise ValueError(f"data.corpus 'idx:{spec}': no '{split}-images-idx3-ubyte[.gz]' "
                             f"in that folder (splits there: {', '.join(have) or 'none'}). "
                             f"Set data.split / data.eval_split to one of them.")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"data.corpus 'idx:{spec}': no such file or folder.")
    labels = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    if labels == path or not labels.is_file():
        raise ValueError(f"data.corpus 'idx:{spec}': the labels file {labels.name} is missing "
                         f"next to {path.name}.")
    return IdxImages(path, labels)


# ---------------------------------------------------------------------------------------------
# NumPy arrays


class NumpyImages:
    """A .npz with an images array [n, h, w(, c)] uint8 and a labels array [n]."""

    def __init__(self, path: Path, image_key: str, label_key: str):
        self.path, self.image_key, self.label_key = path, image_key, label_key
        self.name = str(path)
        self._arrays = None

    def _load(self):
        if self._arrays is None:
            try:
                with np.load(self.path, allow_pickle=False) as z:
                    keys = list(z.keys())
                    for key, what in ((self.image_key, "data.image_column"),
                                      (self.label_key, "data.label_column")):
                        if key not in keys:
                            raise ValueError(f"{self.path} has no array '{key}' ({what}); its "
                                             f"arrays: {', '.join(keys)}.")
                    images, labels = z[self.image_key], z[self.label_key]
            except (OSError, EOFError) as e:
                raise ValueError(f"{self.path}: cannot read this .npz ({e}).") from None
            if images.ndim == 3:
                images = images[..., None]
            if images.ndim != 4 or images.dtype != np.uint8:
                raise ValueError(f"{self.path}: '{self.image_key}' must be uint8 [n, h, w] or "
                                 f"[n, h, w, c]; it holds {images.dtype} {images.shape} (scale "
                                 f"float images to 0-255 and cast them to uint8).")
            if labels.shape != (len(images),):
                raise ValueError(f"{self.path}: '{self.label_key}' holds {labels.shape} labels "
                                 f"for {len(images)} images; they must match.")
            self._arrays = images, labels
        return self._arrays

    def __len__(self) -> int:
        return len(self._load()[0])

    def fingerprint(self) -> str:
        return digest("npz", file_key(self.path), self.image_key, self.label_key)

    def labels(self) -> list:
        return self._load()[1].tolist()

    def read(self, start: int, stop: int) -> list:
        return list(self._load()[0][start:stop])

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}


# ---------------------------------------------------------------------------------------------
# A folder of class folders


class ImageFolder:
    """root/<class>/<file>: one subfolder per class, image files inside (sorted)."""

    def __init__(self, root: Path):
        self.root = root
        self.name = str(root)
        classes = sorted(p for p in root.iterdir() if p.is_dir())
        self.files: list[tuple[Path, str]] = []
        for folder in classes:
            self.files += [(f, folder.name) for f in sorted(folder.iterdir())
                           if f.suffix.lower() in IMAGE_SUFFIXES]
        if not self.files:
            raise ValueError(f"data.corpus '{root}' holds no image files in class subfolders "
                             f"(expected {root}/<class>/<image>{'|'.join(IMAGE_SUFFIXES[:3])}).")

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        return digest("folder", [(str(f.relative_to(self.root)), *file_key(f)[1:])
                                  for f, _ in self.files])

    def labels(self) -> list:
        return [label for _, label in self.files]

    def read(self, start: int, stop: int) -> list:
        return read_image_files(path for path, _ in self.files[start:stop])


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets and TensorFlow Datasets


class HubImages:
    def __init__(self, spec: str, split: str, image_column: str, label_column: str):
        self.spec, self.split = spec, split
        self.image_column, self.label_column = image_column, label_column
        self._ds, self.name = open_hub_images(spec, split, image_column, label_column)

    def __len__(self) -> int:
        return len(self._ds)

    def fingerprint(self) -> str:
        return digest("hf", self._ds._fingerprint, self.image_column, self.label_column)

    def labels(self) -> list:
        return list(self._ds[self.label_column])

    def read(self, start: int, stop: int) -> list:
        column = self._ds.select(range(start, stop))[self.image_column]
        return [as_array(v, f"{self.name} row {start + i}") for i, v in enumerate(column)]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_ds"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._ds, _ = open_hub_images(self.spec, self.split, self.image_column,
                                       self.label_column)


class TfdsImages:
    def __init__(self, spec: str, split: str, image_column: str, label_column: str):
        self.spec, self.split = spec, split
        self.image_column, self.label_column = image_column, label_column
        self._open()

    def _open(self):
        builder, features, self.name = tfds_builder(self.spec, self.split, (None, None))
        require_image_columns(list(features.keys()), self.name, self.image_column,
                              self.label_column)
        self._source, self._identity = tfds_data_source(builder, self.split)

    def __len__(self) -> int:
        return len(self._source)

    def fingerprint(self) -> str:
        return digest("tfds", self._identity, self.image_column, self.label_column)

    def labels(self) -> list:
        out = []
        for a in range(0, len(self), 4096):
            rows = list(range(a, min(a + 4096, len(self))))
            out += [np.asarray(r[self.label_column]).item()
                    for r in self._source.__getitems__(rows)]
        return out

    def read(self, start: int, stop: int) -> list:
        try:
            records = self._source.__getitems__(list(range(start, stop)))
        except ModuleNotFoundError as e:  # tfds decodes its encoded Image feature with TF
            raise ValueError(f"{self.name}: tfds needs {e.name} to decode feature "
                             f"'{self.image_column}' (an encoded image). Install tensorflow-cpu, "
                             f"or store the images as a uint8 Tensor feature.") from None
        return [as_array(r[self.image_column], f"{self.name} row {start + i}")
                for i, r in enumerate(records)]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_source"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()


def open_images(corpus: str, split: str, image_column: str = "image",
                label_column: str | None = "label"):
    """The image source `data.corpus` names (see module docstring)."""
    label_column = label_column or "label"
    if corpus == "emoji" or Path(corpus).suffix in (".jsonl", ".csv"):
        # Image-text pair sources serve as labelled image sources too (their text unused).
        return open_pairs(corpus, split, image_column, None, label_column)
    if corpus.startswith("idx:"):
        return open_idx(corpus[4:], split)
    if corpus.startswith("hf:"):
        return HubImages(corpus[3:], split, image_column, label_column)
    if corpus.startswith("tfds:"):
        return TfdsImages(corpus[5:], split, image_column, label_column)
    path = Path(corpus[len("folder:"):] if corpus.startswith("folder:") else corpus)
    if path.suffix == ".npz":
        if not path.is_file():
            raise ValueError(f"data.corpus '{corpus}': no such file.")
        return NumpyImages(path, image_column, label_column)
    if path.is_dir():
        return ImageFolder(path)
    raise ValueError(f"data.corpus '{corpus}' is not an image source: use idx:PATH (MNIST "
                     f"format), a .npz file, a folder with one subfolder per class, hf:NAME, "
                     f"tfds:NAME, 'emoji', or a .jsonl / .csv of image paths.")
