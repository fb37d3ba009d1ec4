"""The pre-tokenized cache: a corpus tokenized once into a memory-mapped token file.

Layout of a cache folder (`data.cache_dir`, by default `<run_dir>/data_cache`):

    tokens.bin     every document's token ids, concatenated (uint16, or uint32 for vocabularies
                   over 65536 tokens); no special tokens, packing adds those
    offsets.npy    int64 [num_docs + 1]: document d is tokens[offsets[d]:offsets[d + 1]]
    meta.json      tokenizer sha256, source name and fingerprint, counts, dtype, version and
                   "complete": true. Written last: it is the commit record of the cache.
    partial/       only while a prepare is unfinished: plan.json (what is being built) and one
                   shard-NNNNNN.npz per finished shard of `shard_docs` documents

Resume: each shard is written to a temporary file and renamed, so a shard file exists only
when it is whole, and its existence is the record that it is done. A rerun with the same
tokenizer and source skips finished shards. The merge writes tokens.bin and offsets.npy through
temporary files too, removes an old meta.json before replacing the files it describes, and
writes the new meta.json last, so an interrupted merge leaves a folder that `open()` rejects as
incomplete and that a rerun merges again from the shards (deleted only after the commit).

Staleness: a cache belongs to one tokenizer (sha256 of its canonical JSON) and one source
(its fingerprint). `TokenCache.open` raises `StaleCache` when either differs, and
`prepare_cache` refuses to touch a folder built from other inputs unless `overwrite=True`;
even then the old cache stays whole and readable until the new one is committed.

Workers: a `spawn` pool (JAX's and the tokenizer's threads make `fork` unsafe). Each worker
receives the documents object once (pickled through the pool initializer) and the tokenizer
as a JSON string, then reads, tokenizes and writes its shards itself, so no token ids travel
back through pipes. The documents object must therefore pickle cheaply: a reference to the
data (paths, a dataset name), not the data itself. With one worker, or one shard to do,
everything runs in this process and the tokenizer's own threads use the cores.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ptft_jax.data.tokenizer import tokenizer_sha256

log = logging.getLogger(__name__)

CACHE_VERSION = 1
TOKENS_FILE, OFFSETS_FILE, META_FILE = "tokens.bin", "offsets.npy", "meta.json"
PARTIAL_DIR, PLAN_FILE, LOCK_FILE = "partial", "plan.json", ".lock"


class Documents(Protocol):
    """What the cache reads documents from (implemented by ptft_jax.data.sources)."""
    name: str

    def __len__(self) -> int: ...

    def texts(self, start: int, stop: int) -> list[str]: ...

    def fingerprint(self) -> str: ...


class CacheError(ValueError):
    """The cache cannot be used as it is; the message names the file and what to do."""


class MissingCache(CacheError):
    """No cache (or only an unfinished one) in the folder."""


class StaleCache(CacheError):
    """The cache was built from another tokenizer or another version of the source."""


class CorruptCache(CacheError):
    """A cache file is missing, truncated or inconsistent with meta.json."""


@dataclass(frozen=True)
class PrepareStats:
    """What one `prepare_cache` call did. Rates count only the documents tokenized by this
    call (not shards finished by an earlier, interrupted one), over the tokenizing time."""
    docs: int
    tokens: int
    seconds: float  # tokenizing, pool start-up included
    merge_seconds: float
    workers: int
    shards_done: int  # tokenized by this call
    shards_skipped: int  # finished by an earlier call and reused

    @property
    def docs_per_s(self) -> float:
        return self.docs / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


WHAT_TO_DO = ("Delete the folder and rerun `ptft data prepare`, or point data.cache_dir "
               "elsewhere")


class TokenCache:
    """A finished cache, opened read-only: `tokens` (memory-mapped) and `offsets` are what
    `ptft_jax.data.packing.Packer(tokens, offsets, ...)` takes."""

    def __init__(self, cache_dir: Path, tokens: np.ndarray, offsets: np.ndarray, meta: dict):
        self.cache_dir, self.tokens, self.offsets, self.meta = cache_dir, tokens, offsets, meta
        self.stats: PrepareStats | None = None  # set by a prepare_cache that did some work

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    def __repr__(self) -> str:
        return (f"TokenCache({str(self.cache_dir)!r}: {self.num_docs} docs, "
                f"{len(self.tokens)} {self.tokens.dtype} tokens)")

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index]:self.offsets[index + 1]]

    @classmethod
    def open(cls, cache_dir: str | Path, tokenizer_path: str | Path | None = None,
             documents: Documents | None = None) -> "TokenCache":
        """Opens and checks a cache: raises MissingCache, CorruptCache, or (when the tokenizer
        or documents are given) StaleCache if they are not the ones it was built from."""
        cache = cls._read(Path(cache_dir))
        if tokenizer_path is not None:
            tokenizer_path = Path(tokenizer_path)
            if not tokenizer_path.is_file():
                raise ValueError(f"Tokenizer file '{tokenizer_path}' does not exist.")
            cache.check_tokenizer(tokenizer_path, tokenizer_sha256(tokenizer_path))
        if documents is not None:
            cache.check_source(documents.name, documents.fingerprint(), len(documents))
        return cache

    @classmethod
    def _read(cls, cache_dir: Path) -> "TokenCache":
        meta_path = cache_dir / META_FILE
        if not meta_path.is_file():
            if (cache_dir / PARTIAL_DIR).is_dir() or (cache_dir / TOKENS_FILE).exists():
                raise MissingCache(f"The token cache in {cache_dir} is incomplete ({META_FILE} "
                                   f"is missing): a `ptft data prepare` was interrupted. Rerun "
                                   f"it to finish; finished shards are reused.")
            raise MissingCache(f"No token cache in {cache_dir} ({META_FILE} not found). Build "
                               f"it with `ptft data prepare --config ...`.")
        try:
            meta = json.loads(meta_path.read_text())
            dtype = np.dtype(meta["dtype"])
            num_docs, num_tokens = int(meta["num_docs"]), int(meta["num_tokens"])
            meta["tokenizer"]["sha256"], meta["source"]["fingerprint"]  # the staleness checks'
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptCache(f"{meta_path} is unreadable ({type(e).__name__}: {e}). "
                               f"{WHAT_TO_DO}.") from None
        if meta.get("version") != CACHE_VERSION:
            raise CorruptCache(f"{meta_path}: cache format version {meta.get('version')!r}, "
                               f"this ptft reads version {CACHE_VERSION}. {WHAT_TO_DO}.")
        if meta.get("complete") is not True:
            raise MissingCache(f"{meta_path} says the cache is incomplete. Rerun "
                               f"`ptft data prepare` to finish it.")

        offsets_path = cache_dir / OFFSETS_FILE
        try:
            offsets = np.load(offsets_path)
        except (OSError, ValueError, EOFError) as e:
            raise CorruptCache(f"{offsets_path} is missing or unreadable ({e}). "
                               f"{WHAT_TO_DO}.") from None
        if offsets.dtype != np.int64 or offsets.shape != (num_docs + 1,):
            raise CorruptCache(f"{offsets_path} holds {offsets.dtype} {offsets.shape}; "
                               f"{META_FILE} says int64 ({num_docs + 1},). {WHAT_TO_DO}.")
        falls = ", and fall on the way" if np.any(np.diff(offsets) < 0) else ""
        if offsets[0] != 0 or offsets[-1] != num_tokens or falls:
            raise CorruptCache(f"{offsets_path} is inconsistent: offsets must rise from 0 to "
                               f"the {num_tokens} tokens of {META_FILE} (they go from "
                               f"{offsets[0]} to {offsets[-1]}{falls}). {WHAT_TO_DO}.")

        tokens_path = cache_dir / TOKENS_FILE
        expected = num_tokens * dtype.itemsize
        size = tokens_path.stat().st_size if tokens_path.is_file() else None
        if size != expected:
            found = "is missing" if size is None else f"has {size:,} bytes"
            raise CorruptCache(f"{tokens_path} {found}; {META_FILE} says {num_tokens:,} "
                               f"{dtype} tokens = {expected:,} bytes. The cache is truncated or "
                               f"damaged. {WHAT_TO_DO}.")
        # np.memmap cannot map an empty file; a corpus of empty documents has no tokens.
        tokens = (np.memmap(tokens_path, dtype=dtype, mode="r") if num_tokens
                  else np.zeros(0, dtype))
        return cls(cache_dir, tokens, offsets, meta)

    def check_tokenizer(self, path: Path, sha256: str) -> None:
        built = self.meta["tokenizer"]
        if built["sha256"] != sha256:
            raise StaleCache(
                f"The token cache in {self.cache_dir} is stale: it was built with tokenizer "
                f"{built['path']} (sha256 {built['sha256'][:16]}...), but the tokenizer now is "
                f"{path} (sha256 {sha256[:16]}...). {WHAT_TO_DO}.")

    def check_source(self, name: str, fingerprint: str, num_docs: int) -> None:
        built = self.meta["source"]
        if built["fingerprint"] != fingerprint or self.num_docs != num_docs:
            raise StaleCache(
                f"The token cache in {self.cache_dir} is stale: it was built from "
                f"'{built['name']}' (fingerprint {built['fingerprint']}, {self.num_docs} "
                f"documents), but the data is now '{name}' (fingerprint {fingerprint}, "
                f"{num_docs} documents). {WHAT_TO_DO}.")
