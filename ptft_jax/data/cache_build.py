"""Building the pre-tokenized cache (cache.py reads it): the corpus is split into shards of
documents, tokenized by worker processes into partial/ (an interrupted build resumes from the
finished shards), then merged into the token and offset files and committed by meta.json,
written last. A lock keeps two builds from writing one folder.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from ptft_jax.core.files import TMP_SUFFIX, atomic_write, claim_folder, fsync_dir, write_tmp
from ptft_jax.data.tokenizer import load_tokenizer, tokenizer_sha256

log = logging.getLogger(__name__)

from ptft_jax.data.cache import (CACHE_VERSION, LOCK_FILE, META_FILE, OFFSETS_FILE, PARTIAL_DIR,
                                 PLAN_FILE, TOKENS_FILE, WHAT_TO_DO, CacheError, CorruptCache,
                                 Documents, MissingCache, PrepareStats, StaleCache, TokenCache,
                                 token_dtype)


def prepare_cache(documents: Documents, tokenizer_path: str | Path, cache_dir: str | Path,
                  num_workers: int = 0, shard_docs: int = 10_000, progress: bool = True,
                  overwrite: bool = False) -> TokenCache:
    """Tokenizes `documents` into `cache_dir` and returns the opened cache.

    A finished cache of the same tokenizer and source is returned as it is (its `.stats` is
    None); an unfinished one is resumed, and `.stats` tells what this call did. A cache
    (finished or not) of another tokenizer or source, or a damaged one, raises CacheError
    unless `overwrite`: then it is replaced, but only once the new one is complete.
    `num_workers=0` uses every core. With more than one worker, processes are spawned: a script
    that calls this needs the `if __name__ == "__main__":` guard, and `documents` must pickle.
    """
    cache_dir, tokenizer_path = Path(cache_dir), Path(tokenizer_path)
    if shard_docs < 1:
        raise ValueError(f"shard_docs must be at least 1, got {shard_docs}.")
    if num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0 (0 = every core), got {num_workers}.")
    tokenizer = load_tokenizer(tokenizer_path)
    # One past the largest id (a vocab.txt with repeated lines has gaps, so not the count).
    vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    inputs = {"version": CACHE_VERSION,
              "tokenizer": {"path": str(tokenizer_path),
                            "sha256": tokenizer_sha256(tokenizer_path)},
              "source": {"name": documents.name, "fingerprint": documents.fingerprint()},
              "num_docs": len(documents), "vocab_size": vocab_size,
              "dtype": token_dtype(vocab_size).name}
    # A folder of the user's is refused before anything in it is touched (partial/ would be).
    claim_folder(cache_dir, "token cache", "data.cache_dir", legacy=[LOCK_FILE])
    partial = cache_dir / PARTIAL_DIR
    with exclusive(cache_dir):
        finished = _reusable_cache(cache_dir, inputs, overwrite)
        if finished is not None:
            if _same_inputs(_read_plan(partial), inputs):  # a merge died after its commit
                shutil.rmtree(partial)
            log.info("token cache %s is already prepared", cache_dir)
            return finished
        plan = _start_or_resume_plan(partial, inputs, shard_docs, overwrite)
        stats = _tokenize_shards(documents, tokenizer, partial, plan, num_workers, progress)
        t0 = time.perf_counter()
        _merge(cache_dir, plan)
        cache = TokenCache._read(cache_dir)
        cache.stats = PrepareStats(**stats, merge_seconds=time.perf_counter() - t0)
        shutil.rmtree(partial)  # only after _merge's commit
    return cache


def prepare_cache_once(documents: Documents, tokenizer_path: str | Path, cache_dir: str | Path,
                       num_workers: int = 0, progress: bool = True) -> TokenCache:
    """`prepare_cache` on a multi-host run: process 0 builds (or reuses) the cache, the others
    wait for it and open it, so two processes never race for the folder's lock (the folder
    must be shared between hosts). On one process, just `prepare_cache`."""
    import jax
    from jax.experimental import multihost_utils
    cache = None
    if jax.process_index() == 0:
        cache = prepare_cache(documents, tokenizer_path, cache_dir, num_workers,
                              progress=progress)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"ptft token cache ready: {cache_dir}")
        if cache is None:
            cache = TokenCache.open(cache_dir, tokenizer_path, documents)
    return cache


def _same_inputs(a: dict, b: dict) -> bool:
    """Same tokenizer bytes, same source data, same format; paths and names may differ."""
    def key(d: dict) -> tuple:
        return (d.get("version"), d.get("tokenizer", {}).get("sha256"),
                d.get("source", {}).get("fingerprint"), d.get("num_docs"), d.get("dtype"))
    return key(a) == key(b)


@contextlib.contextmanager
def exclusive(cache_dir: Path):
    """Holds a lock on the folder, so two prepares never write the same files at once."""
    with open(cache_dir / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"Another `ptft data prepare` is writing {cache_dir}. Wait for it "
                             f"to finish, or use another data.cache_dir.") from None
        yield


def _reusable_cache(cache_dir: Path, inputs: dict, overwrite: bool) -> TokenCache | None:
    """The finished cache in the folder if it was built from these inputs; None if there is
    none (or `overwrite` lets a stale or damaged one be replaced); else CacheError."""
    if not (cache_dir / META_FILE).exists():
        return None
    try:
        cache = TokenCache._read(cache_dir)
        cache.check_tokenizer(Path(inputs["tokenizer"]["path"]), inputs["tokenizer"]["sha256"])
        cache.check_source(inputs["source"]["name"], inputs["source"]["fingerprint"],
                           inputs["num_docs"])
        return cache
    except MissingCache:  # an interrupted merge: it is finished from the shards
        return None
    except CacheError as e:
        if overwrite:
            log.warning("replacing the token cache in %s: %s", cache_dir, e)
            return None
        raise type(e)(f"{e} ptft does not mix caches; `ptft data prepare --overwrite` with the "
                      f"same config replaces this one.") from None


def _start_or_resume_plan(partial: Path, inputs: dict, shard_docs: int,
                          overwrite: bool) -> dict:
    """The plan of an unfinished prepare of the same inputs (its shard size wins, so its
    finished shards stay valid), or a new one."""
    plan_path = partial / PLAN_FILE
    if plan_path.exists():
        plan = _read_plan(partial)
        if _same_inputs(plan, inputs):
            if plan["shard_docs"] != shard_docs:
                log.info("resuming with the unfinished prepare's shard size, %d documents",
                         plan["shard_docs"])
            return plan
        if not overwrite:
            raise StaleCache(f"{partial} holds an unfinished prepare of other inputs (another "
                             f"tokenizer or source), or its {plan_path.name} is unreadable. "
                             f"{WHAT_TO_DO}, or run `ptft data prepare --overwrite` with the "
                             f"same config to discard it.")
    if partial.exists():  # another plan's shards, or shards without a plan: not trustworthy
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    plan = {**inputs, "shard_docs": shard_docs}
    atomic_write(plan_path, lambda f: f.write(json.dumps(plan, indent=1).encode()))
    return plan


def _read_plan(partial: Path) -> dict:
    """An unfinished prepare's plan; {} if there is none or it is unreadable."""
    try:
        return json.loads((partial / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _shard_path(partial: Path, shard: int) -> Path:
    return partial / f"shard-{shard:06d}.npz"


def _shard_range(plan: dict, shard: int) -> tuple[int, int]:
    start = shard * plan["shard_docs"]
    return start, min(start + plan["shard_docs"], plan["num_docs"])


def _num_shards(plan: dict) -> int:
    return -(-plan["num_docs"] // plan["shard_docs"])


class _ShardWriter:
    """Tokenizes one shard and writes it atomically; lives in each worker (or this process)."""

    def __init__(self, documents: Documents, tokenizer_json: str, plan: dict, partial: Path):
        self.documents, self.plan, self.partial = documents, plan, partial
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.dtype = np.dtype(plan["dtype"])

    def __call__(self, shard: int) -> tuple[int, int]:
        start, stop = _shard_range(self.plan, shard)
        texts = self.documents.texts(start, stop)
        if len(texts) != stop - start:
            raise ValueError(f"{self.documents.name}: texts({start}, {stop}) returned "
                             f"{len(texts)} documents, not {stop - start}.")
        ids = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), self.dtype, int(lengths.sum()))
        atomic_write(_shard_path(self.partial, shard),
                      lambda f: np.savez(f, tokens=tokens, lengths=lengths))
        return stop - start, len(tokens)


_worker_writer: _ShardWriter | None = None  # one per pool worker, set by _init_worker


def _init_worker(documents, tokenizer_json, plan, partial) -> None:
    global _worker_writer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # One process per core already: the tokenizer's own threads would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_writer = _ShardWriter(documents, tokenizer_json, plan, partial)


def _run_shard(shard: int) -> tuple[int, int]:
    return _worker_writer(shard)


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use, in a container too
    except AttributeError:
        return os.cpu_count() or 1


def _tokenize_shards(documents: Documents, tokenizer: Tokenizer, partial: Path, plan: dict,
                     num_workers: int, progress: bool) -> dict:
    for stray in partial.glob(f"*{TMP_SUFFIX}"):  # from a process killed mid-write
        stray.unlink()
    shards = range(_num_shards(plan))
    finished = {s for s in shards if _shard_path(partial, s).exists()}
    pending = [s for s in shards if s not in finished]
    if finished:
        log.info("resuming: %d of %d shards already tokenized", len(finished), len(shards))
    workers = max(1, min(num_workers or _available_cores(), len(pending)))
    finished_docs = sum(stop - start for start, stop in (_shard_range(plan, s) for s in finished))
    docs = tokens = 0
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=plan["num_docs"], initial=finished_docs, unit="doc",
                                       unit_scale=True, desc="tokenizing", smoothing=0.1,
                                       disable=not progress))
        if workers == 1:
            results = map(_ShardWriter(documents, tokenizer.to_str(), plan, partial), pending)
        else:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(
                workers, _init_worker, (documents, tokenizer.to_str(), plan, partial)))
            results = pool.imap_unordered(_run_shard, pending)
        for shard_docs, shard_tokens in results:
            docs, tokens = docs + shard_docs, tokens + shard_tokens
            bar.update(shard_docs)
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - t0):,.0f} tokens/s",
                                refresh=False)
    return dict(docs=docs, tokens=tokens, seconds=time.perf_counter() - t0, workers=workers,
                shards_done=len(pending), shards_skipped=len(finished))


def _merge(cache_dir: Path, plan: dict) -> None:
    """Shards -> tokens.bin + offsets.npy, then meta.json as the commit. Safe to redo."""
    partial = cache_dir / PARTIAL_DIR
    lengths = []

    def write_tokens(f: BinaryIO) -> None:
        for shard in range(_num_shards(plan)):
            path = _shard_path(partial, shard)
            start, stop = _shard_range(plan, shard)
            try:
                with np.load(path) as data:
                    tokens, shard_lengths = data["tokens"], data["lengths"]
            except (OSError, ValueError, KeyError) as e:
                raise CorruptCache(f"Shard {path} is unreadable ({e}); delete it and rerun "
                                   f"`ptft data prepare` to redo it.") from None
            if len(shard_lengths) != stop - start or shard_lengths.sum() != len(tokens):
                raise CorruptCache(f"Shard {path} does not hold documents {start}..{stop - 1}; "
                                   f"delete it and rerun `ptft data prepare` to redo it.")
            f.write(tokens.astype(plan["dtype"], copy=False).tobytes())
            lengths.append(shard_lengths)

    tokens_tmp = write_tmp(cache_dir / TOKENS_FILE, write_tokens)
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths or [[]]))]).astype(np.int64)
    offsets_tmp = write_tmp(cache_dir / OFFSETS_FILE, lambda f: np.save(f, offsets))
    # The old meta.json goes first: from here until the new one lands, the folder reads as
    # unfinished, never as a complete cache whose files do not match its meta.
    (cache_dir / META_FILE).unlink(missing_ok=True)
    fsync_dir(cache_dir)
    os.replace(tokens_tmp, cache_dir / TOKENS_FILE)
    os.replace(offsets_tmp, cache_dir / OFFSETS_FILE)
    _commit_meta(cache_dir, plan, num_tokens=int(offsets[-1]))


def _commit_meta(cache_dir: Path, plan: dict, num_tokens: int) -> None:
    meta = {**plan, "num_tokens": num_tokens,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "complete": True}
    atomic_write(cache_dir / META_FILE, lambda f: f.write(json.dumps(meta, indent=1).encode()))
