"""The image cache and the labelled image examples read from it.

Images are decoded, converted to `channels` and resized to the training resolution once, by
host worker processes, into a memory-mapped uint8 file; training and evaluation then read
rows from it with no decoding at all. The cache keeps the token cache's guarantees
(data/cache.py):

    images.bin    uint8 [n, size, size, channels], the kept images in source order
    labels.json   their raw labels (as the source gives them)
    kept.npy      int64 [n]: each kept image's index in the source (unreadable files that
                  data.skip_bad_images skipped are missing from it)
    meta.json     source name and fingerprint, size, channels, resize, counts, the crc32 of
                  each shard of images.bin, "complete": true. Written last: the commit record.
    partial/      while unfinished: plan.json and one shard-NNNNNN.npz per finished shard

- resumable: shards are written whole (temporary file, then rename), and a rerun skips them;
- stale: a cache of another source, size or channel count raises `StaleCache` (and is never
  touched by a prepare of other inputs);
- corrupt: a truncated or altered images.bin fails its size or shard checksums on open.
"""
from __future__ import annotations

import concurrent.futures
import datetime
import json
import logging
import multiprocessing
import os
import shutil
import zlib
from pathlib import Path

import numpy as np

from ptft_jax.data.batching import PaddedBatches
from ptft_jax.data.cache import LOCK_FILE, CacheError, CorruptCache, MissingCache, StaleCache
from ptft_jax.data.cache_build import exclusive
from ptft_jax.core.files import atomic_write, claim_folder, fsync_dir, write_tmp
from ptft_jax.data.image_io import BadImage, gather_images

log = logging.getLogger(__name__)

IMAGE_CACHE_VERSION = 1
IMAGES_FILE, LABELS_FILE, KEPT_FILE, META_FILE = "images.bin", "labels.json", "kept.npy", \
    "meta.json"
PARTIAL_DIR, PLAN_FILE = "partial", "plan.json"
# Checksums are verified on every open up to this size (about a second); bigger caches are
# checked by size, and in full by `ImageCache.verify()`.
VERIFY_ON_OPEN_BYTES = 1 << 30
_FIX = "Delete the folder and run again, or point data.cache_dir elsewhere"


def convert(image: np.ndarray, size: int, channels: int, resize: bool, where: str):
    """uint8 [h, w, c] -> [size, size, channels]: channels converted (gray <-> RGB, alpha
    dropped), resized bilinearly when `resize`; a size mismatch otherwise is an error."""
    if image.ndim == 2:
        image = image[..., None]
    h, w, c = image.shape
    if (h, w, c) == (size, size, channels):
        return image
    # Grayscale repeats to RGB and RGBA drops its alpha; colour is never dropped silently.
    if c not in (1, 3, 4) or (channels == 1 and c != 1):
        raise ValueError(f"{where} has {c} channel(s), which do not fit model.channels="
                         f"{channels}: set model.channels={3 if c >= 3 else c} (the model's "
                         f"input), or convert the images first.")
    if (h, w) != (size, size) and not resize:
        raise ValueError(f"{where} is {w}x{h} pixels, not model.image_size={size}: images of "
                         f"mixed sizes need data.resize=true (or set model.image_size).")
    from PIL import Image
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[c]
    im = Image.fromarray(image[..., 0] if c == 1 else image, mode)
    im = im.convert("L" if channels == 1 else "RGB")
    if (h, w) != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    out = np.asarray(im, np.uint8)
    return out[..., None] if out.ndim == 2 else out


class ImageCache:
    """A finished image cache, opened read-only."""

    def __init__(self, cache_dir: Path, images: np.ndarray, labels: list, kept: np.ndarray,
                 meta: dict):
        self.cache_dir, self.images, self.labels, self.kept, self.meta = \
            cache_dir, images, labels, kept, meta

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def open(cls, cache_dir, inputs: dict | None = None, verify: bool | None = None):
        cache_dir = Path(cache_dir)
        meta_path = cache_dir / META_FILE
        if not meta_path.is_file():
            state = "incomplete (an earlier run was interrupted; running again finishes it)" \
                if (cache_dir / PARTIAL_DIR).is_dir() else "missing"
            raise MissingCache(f"The image cache in {cache_dir} is {state}.")
        try:
            meta = json.loads(meta_path.read_text())
            n, size, c = int(meta["num_images"]), int(meta["size"]), int(meta["channels"])
            crcs, shard = list(meta["crc32"]), int(meta["shard_images"])
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptCache(f"{meta_path} is unreadable ({type(e).__name__}: {e}). "
                               f"{_FIX}.") from None
        if meta.get("version") != IMAGE_CACHE_VERSION or meta.get("complete") is not True:
            raise CorruptCache(f"{meta_path}: not a complete image cache of version "
                               f"{IMAGE_CACHE_VERSION}. {_FIX}.")
        if inputs is not None:
            _check_same(meta, inputs, cache_dir)
        path = cache_dir / IMAGES_FILE
        per_image = size * size * c
        have = path.stat().st_size if path.is_file() else None
        if have != n * per_image:
            found = "is missing" if have is None else f"has {have:,} bytes"
            raise CorruptCache(f"{path} {found}; {META_FILE} says {n:,} images of {size}x{size}"
                               f"x{c} = {n * per_image:,} bytes: truncated or damaged. {_FIX}.")
        try:
            labels = json.loads((cache_dir / LABELS_FILE).read_text())
            kept = np.load(cache_dir / KEPT_FILE)
        except (OSError, ValueError) as e:
            raise CorruptCache(f"{cache_dir}: {LABELS_FILE} or {KEPT_FILE} is unreadable ({e}). "
                               f"{_FIX}.") from None
        if len(labels) != n or kept.shape != (n,):
            raise CorruptCache(f"{cache_dir}: {len(labels)} labels and {kept.shape} kept indices "
                               f"for {n} images. {_FIX}.")
        images = np.memmap(path, np.uint8, "r", shape=(n, size, size, c)) if n else \
            np.zeros((0, size, size, c), np.uint8)
        cache = cls(cache_dir, images, labels, kept, meta)
        if verify or (verify is None and n * per_image <= VERIFY_ON_OPEN_BYTES):
            cache.verify(crcs, shard)
        return cache

    def verify(self, crcs=None, shard: int | None = None) -> None:
        """Recomputes every shard's crc32 against meta.json (CorruptCache on a mismatch)."""
        crcs = crcs if crcs is not None else self.meta["crc32"]
        shard = shard or int(self.meta["shard_images"])
        for i, expected in enumerate(crcs):
            got = zlib.crc32(np.ascontiguousarray(self.images[i * shard:(i + 1) * shard]))
            if got != expected:
                raise CorruptCache(f"{self.cache_dir / IMAGES_FILE}: images {i * shard}-"
                                   f"{min((i + 1) * shard, len(self)) - 1} fail their checksum "
                                   f"(the file was altered or damaged). {_FIX}.")


def _check_same(meta: dict, inputs: dict, cache_dir: Path) -> None:
    for key in ("fingerprint", "size", "channels", "resize", "num_source"):
        if meta.get(key) != inputs.get(key):
            raise StaleCache(f"The image cache in {cache_dir} is stale: it was built from "
                             f"'{meta.get('source')}' at {meta.get('size')} px, "
                             f"{meta.get('channels')} channel(s) ({key} differs from the data "
                             f"and config now: {meta.get(key)!r} then, {inputs.get(key)!r} "
                             f"now). {_FIX}.")


def prepare_image_cache(source, cache_dir, size: int, channels: int, resize: bool = True,
                        skip_bad: bool = False, num_workers: int = 0, shard_images: int = 4096,
                        progress: bool = True) -> ImageCache:
    """Decodes, converts and resizes `source` into `cache_dir` (resuming an unfinished run)
    and returns the opened cache; a finished cache of the same inputs is reused as it is."""
    cache_dir = Path(cache_dir)
    inputs = {"version": IMAGE_CACHE_VERSION, "source": source.name,
              "fingerprint": source.fingerprint(), "size": size, "channels": channels,
              "resize": resize, "skip_bad": skip_bad, "num_source": len(source),
              "shard_images": shard_images}
    if (cache_dir / META_FILE).exists():
        return ImageCache.open(cache_dir, inputs)
    claim_folder(cache_dir, "image cache", "data.cache_dir", legacy=[LOCK_FILE])
    partial = cache_dir / PARTIAL_DIR
    with exclusive(cache_dir):
        if (cache_dir / META_FILE).exists():  # finished while we waited
            return ImageCache.open(cache_dir, inputs)
        partial.mkdir(exist_ok=True)
        plan_path = partial / PLAN_FILE
        if plan_path.exists():
            plan = json.loads(plan_path.read_text())
            if {k: plan.get(k) for k in inputs} != inputs:
                raise StaleCache(f"{cache_dir} holds an unfinished image cache of other inputs "
                                 f"({plan.get('source')}). {_FIX}.")
        else:
            atomic_write(plan_path, lambda f: f.write(json.dumps(inputs).encode()))
        n = len(source)
        shards = [s for s in range(-(-n // shard_images))
                  if not _shard_path(partial, s).exists()]
        work = _ShardWork(source, partial, size, channels, resize, shard_images, n)
        bar = None
        if progress and shards:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(shards), desc=f"decoding images into {cache_dir.name}",
                       unit="shard", dynamic_ncols=True)
        workers = min(num_workers or (os.cpu_count() or 1), len(shards))
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")  # JAX's threads make fork unsafe
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                for _ in pool.map(work, shards):
                    bar and bar.update()
        else:
            for s in shards:
                work(s)
                bar and bar.update()
        if bar is not None:
            bar.close()
        _merge(cache_dir, partial, inputs, source.labels(), skip_bad)
        shutil.rmtree(partial)
    return ImageCache.open(cache_dir, inputs)


def prepare_image_cache_once(source, cache_dir, *args, **kw) -> ImageCache:
    """Multi-host: process 0 builds (or reuses) the cache, the others open it once ready."""
    import jax
    from jax.experimental import multihost_utils
    cache = prepare_image_cache(source, cache_dir, *args, **kw) \
        if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"ptft image cache ready: {cache_dir}")
        if cache is None:
            cache = ImageCache.open(cache_dir)
    return cache


def _shard_path(partial: Path, shard: int) -> Path:
    return partial / f"shard-{shard:06d}.npz"


class _ShardWork:
    """Decodes one shard of the source into partial/shard-N.npz (picklable: a worker task)."""

    def __init__(self, source, partial, size, channels, resize, shard_images, n):
        self.source, self.partial = source, partial
        self.size, self.channels, self.resize = size, channels, resize
        self.shard_images, self.n = shard_images, n

    def __call__(self, shard: int) -> None:
        start = shard * self.shard_images
        stop = min(start + self.shard_images, self.n)
        images = np.zeros((stop - start, self.size, self.size, self.channels), np.uint8)
        bad = []
        for i, image in enumerate(self.source.read(start, stop)):
            if isinstance(image, BadImage):
                bad.append([start + i, image.where, image.reason])
                continue
            images[i] = convert(image, self.size, self.channels, self.resize,
                                f"{self.source.name} image {start + i}")
        path = _shard_path(self.partial, shard)
        tmp = write_tmp(path, lambda f: np.savez(f, images=images,
                                                   bad=np.asarray(json.dumps(bad))))
        os.replace(tmp, path)


def _merge(cache_dir: Path, partial: Path, inputs: dict, raw_labels: list,
           skip_bad: bool) -> None:
    n, per_shard = inputs["num_source"], inputs["shard_images"]
    num_shards = -(-n // per_shard)
    bad_all = []
    for s in range(num_shards):
        with np.load(_shard_path(partial, s)) as z:
            bad_all += json.loads(str(z["bad"]))
    if bad_all and not skip_bad:
        index, where, reason = bad_all[0]
        raise ValueError(f"{len(bad_all)} image(s) of {inputs['source']} cannot be read, e.g. "
                         f"{where} ({reason}). Fix or remove them, or set "
                         f"data.skip_bad_images=true to count and skip them.")
    if bad_all:
        log.warning("%s: skipped %d unreadable image(s) (data.skip_bad_images), e.g. %s",
                    inputs["source"], len(bad_all), bad_all[0][1])
    skipped = {b[0] for b in bad_all}
    kept = np.asarray([i for i in range(n) if i not in skipped], np.int64)
    old_meta = cache_dir / META_FILE
    if old_meta.exists():
        old_meta.unlink()
    crcs, chunk = [], []
    count = 0

    def write_images(f):
        nonlocal count
        for s in range(num_shards):
            with np.load(_shard_path(partial, s)) as z:
                images = z["images"]
            keep = [i for i in range(len(images)) if s * per_shard + i not in skipped]
            chunk.append(images[keep])
            pending = np.concatenate(chunk)
            chunk.clear()
            # Checksummed in blocks of `shard_images` kept images, as verify() reads them.
            while len(pending) >= per_shard or (s == num_shards - 1 and len(pending)):
                block, pending = pending[:per_shard], pending[per_shard:]
                crcs.append(zlib.crc32(np.ascontiguousarray(block)))
                f.write(block.tobytes())
                count += len(block)
            if len(pending):
                chunk.append(pending)
    os.replace(write_tmp(cache_dir / IMAGES_FILE, write_images), cache_dir / IMAGES_FILE)
    labels = [raw_labels[i] for i in kept]
    atomic_write(cache_dir / LABELS_FILE, lambda f: f.write(json.dumps(labels).encode()))
    atomic_write(cache_dir / KEPT_FILE, lambda f: np.save(f, kept))
    meta = {**inputs, "num_images": count, "skipped": len(bad_all),
            "skipped_examples": [b[1] for b in bad_all[:20]], "crc32": crcs,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), "complete": True}
    atomic_write(cache_dir / META_FILE, lambda f: f.write(json.dumps(meta).encode()))
    fsync_dir(cache_dir)


class ImageExamples(PaddedBatches):
    """Labelled images of one split: a view on an image cache, optionally a subset of its
    rows (some classes, N per class). Rows on demand, like data.labelled.Examples."""

    def __init__(self, images: np.ndarray, label_ids: np.ndarray, index: np.ndarray | None = None):
        self.images = images
        self.label_ids = label_ids
        self.index = np.arange(len(images)) if index is None else index

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, index) -> dict[str, np.ndarray]:
        rows = self.index[np.asarray(index, np.int64)]
        return {"image": gather_images(self.images, rows),
                "label": self.label_ids[rows].astype(np.int32),
                "weight": np.ones(len(rows), np.float32)}


__all__ = ["ImageCache", "ImageExamples", "prepare_image_cache", "prepare_image_cache_once",
           "CacheError"]
