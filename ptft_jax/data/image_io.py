"""Decoding images and fingerprinting their sources: what every image source (image_sources.py,
pairs.py, emoji.py) shares. A file that cannot be decoded becomes a `BadImage`, not an
exception, so the cache can skip it and say where it was."""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Part of every source's fingerprint: raise it when decoding changes, so caches rebuild.
READER_VERSION = 1


@dataclass
class BadImage:
    where: str  # file or row
    reason: str


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps([READER_VERSION, *parts], default=str).encode()) \
        .hexdigest()[:24]


def file_key(path: Path):
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def decode(data: bytes, where: str) -> np.ndarray | BadImage:
    """Encoded image bytes -> uint8 [h, w, c] (c = 1, 3 or 4 as stored; the cache converts)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return pil_to_array(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return BadImage(where, f"{type(e).__name__}: {e}")


def pil_to_array(im) -> np.ndarray:
    if im.mode not in ("L", "RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
    a = np.asarray(im, np.uint8)
    return a[..., None] if a.ndim == 2 else a


def as_array(value, where: str):
    """An image cell (PIL image, encoded bytes, {'bytes': ...} or an array) -> uint8 array."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return decode(value["bytes"], where)
    if isinstance(value, (bytes, bytearray)):
        return decode(bytes(value), where)
    if hasattr(value, "getbands"):  # a PIL image
        return pil_to_array(value)
    a = np.asarray(value)
    if a.dtype != np.uint8 or a.ndim not in (2, 3):
        return BadImage(where, f"not a uint8 image array ({a.dtype} {a.shape})")
    return a[..., None] if a.ndim == 2 else a


def gather_images(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """images[rows] as uint8, read from a (memory-mapped) cache in file order."""
    order = np.argsort(rows)
    out = np.empty((len(rows), *images.shape[1:]), np.uint8)
    out[order] = images[rows[order]]
    return out


def read_image_files(paths) -> list:
    """Each file decoded (data/image_io.decode), or a BadImage naming it if it cannot be
    read."""
    out = []
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as e:
            out.append(BadImage(str(path), str(e)))
            continue
        out.append(decode(data, str(path)))
    return out
