"""The pre-tokenized cache: round trip, token dtype, resume after an interruption, staleness,
corruption; BERT vocab.txt files; `ptft tokenizer train` and `ptft data prepare`."""
import fcntl
import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ptft_jax.data import cache_build as cache_module
from ptft_jax.data.cache import (CacheError, CorruptCache, MissingCache, StaleCache, TokenCache,
                                 token_dtype)
from ptft_jax.data.cache_build import prepare_cache
from ptft_jax.data.corpus import read_documents
from ptft_jax.data.packing import Packer
from ptft_jax.data.tokenizer import (WORDPIECE_SPECIALS, load_tokenizer, tokenizer_sha256,
                                     train_tokenizer)


class ListDocuments:
    """The Documents interface over a list. `fail_from`: texts() raises for any shard starting
    there or later, like a prepare killed part way. Records the starts it served."""

    def __init__(self, texts, name="test-list", fail_from=None):
        self.name, self._texts, self.fail_from = name, list(texts), fail_from
        self.served = []

    def __len__(self):
        return len(self._texts)

    def texts(self, start, stop):
        if self.fail_from is not None and start >= self.fail_from:
            raise RuntimeError("simulated interruption")
        self.served.append(start)
        return self._texts[start:stop]

    def fingerprint(self):
        return hashlib.sha256("\n".join(self._texts).encode()).hexdigest()


@pytest.fixture(scope="module")
def texts(small_corpus):
    return read_documents(small_corpus)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer("encoder", texts, 600).save(str(path))
    return path


@pytest.fixture(scope="module")
def other_tokenizer_file(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("tok") / "other.json"
    train_tokenizer("decoder", texts, 400).save(str(path))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, texts, tokenizer_file):
    """An uninterrupted prepare, the standard the other tests compare against."""
    cache_dir = tmp_path_factory.mktemp("reference") / "cache"
    prepare_cache(ListDocuments(texts), tokenizer_file, cache_dir, num_workers=1,
                  shard_docs=10, progress=False)
    return cache_dir


def _copy(reference, tmp_path):
    return shutil.copytree(reference, tmp_path / "cache")


def _same_cache(a: TokenCache, b: TokenCache):
    assert a.tokens.dtype == b.tokens.dtype
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.offsets, b.offsets)
    drop = ("created", "tokenizer", "shard_docs")  # how and when it was built, not what
    assert {k: v for k, v in a.meta.items() if k not in drop} == \
        {k: v for k, v in b.meta.items() if k not in drop}


# ---------------------------------------------------------------------------------------------
# Building and reading


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_holds_every_documents_ids(tmp_path, texts, tokenizer_file, workers):
    docs = ListDocuments(texts)
    cache = prepare_cache(docs, tokenizer_file, tmp_path / "cache", num_workers=workers,
                          shard_docs=16, progress=False)
    tok = load_tokenizer(tokenizer_file)
    assert cache.tokens.dtype == np.uint16 and cache.offsets.dtype == np.int64
    assert cache.num_docs == len(texts) and cache.meta["complete"] is True
    for d, text in enumerate(texts):
        assert cache.document(d).tolist() == tok.encode(text, add_special_tokens=False).ids
    assert cache.stats.docs == len(texts) and cache.stats.tokens == len(cache.tokens)
    assert cache.stats.workers == workers and cache.stats.tokens_per_s > 0
    assert not (tmp_path / "cache" / "partial").exists()
    # Reopened with its inputs, it is the same; and it is what packing takes.
    _same_cache(TokenCache.open(tmp_path / "cache", tokenizer_file, docs), cache)
    assert len(Packer(cache.tokens, cache.offsets, 32, bos_id=2, eos_id=3)) > 0
    # A second prepare of the same inputs finds it done.
    assert prepare_cache(docs, tokenizer_file, tmp_path / "cache", progress=False).stats is None


def test_token_dtype_fits_the_vocabulary(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    # A vocabulary past 65536 ids, end to end: ids above 65535 survive the cache.
    words = [f"w{i:05d}" for i in range(70_000)]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(WORDPIECE_SPECIALS + words) + "\n")
    texts = ["w69999 w00001 w65600", "w00000"]
    cache = prepare_cache(ListDocuments(texts), vocab, tmp_path / "cache", num_workers=1,
                          progress=False)
    offset = len(WORDPIECE_SPECIALS)
    assert cache.tokens.dtype == np.uint32
    assert cache.document(0).tolist() == [69_999 + offset, 1 + offset, 65_600 + offset]
    assert cache.document(1).tolist() == [offset]


def test_interrupted_prepare_resumes_where_it_stopped(tmp_path, texts, tokenizer_file,
                                                      reference):
    cache_dir = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="simulated"):
        prepare_cache(ListDocuments(texts, fail_from=30), tokenizer_file, cache_dir,
                      num_workers=1, shard_docs=10, progress=False)
    with pytest.raises(MissingCache, match="interrupted"):
        TokenCache.open(cache_dir)
    # What a process killed while writing shard 3 leaves behind.
    (cache_dir / "partial" / "shard-000003.npz.tmp").write_bytes(b"half a shard")
    docs = ListDocuments(texts)
    # The shard size of the unfinished prepare wins, so its shards stay valid.
    cache = prepare_cache(docs, tokenizer_file, cache_dir, num_workers=1, shard_docs=7,
                          progress=False)
    assert docs.served == [30, 40, 50]
    assert (cache.stats.shards_skipped, cache.stats.shards_done) == (3, 3)
    assert cache.stats.docs == 30
    _same_cache(cache, TokenCache.open(reference))


def test_interrupted_merge_is_redone(tmp_path, texts, tokenizer_file, reference, monkeypatch):
    cache_dir = tmp_path / "cache"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "_commit_meta", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(ListDocuments(texts), tokenizer_file, cache_dir, num_workers=1,
                      shard_docs=10, progress=False)
    # tokens.bin and offsets.npy are in place, but without meta.json they are not a cache.
    assert (cache_dir / "tokens.bin").exists()
    with pytest.raises(MissingCache, match="incomplete"):
        TokenCache.open(cache_dir)
    monkeypatch.undo()
    docs = ListDocuments(texts)
    cache = prepare_cache(docs, tokenizer_file, cache_dir, num_workers=1, progress=False)
    assert docs.served == [] and cache.stats.shards_skipped == 6
    _same_cache(cache, TokenCache.open(reference))


# ---------------------------------------------------------------------------------------------
# Staleness


def test_the_same_tokenizer_in_another_file_is_not_stale(tmp_path, tokenizer_file, reference):
    """A cache belongs to a tokenizer, not to a file: the copy a run saves must match."""
    resaved = tmp_path / "resaved" / "tokenizer.json"
    resaved.parent.mkdir()
    load_tokenizer(tokenizer_file).save(str(resaved))
    assert TokenCache.open(_copy(reference, tmp_path), resaved).num_docs > 0


def test_other_tokenizer_is_stale(tmp_path, texts, tokenizer_file, other_tokenizer_file,
                                  reference):
    cache_dir = _copy(reference, tmp_path)
    with pytest.raises(StaleCache) as e:
        TokenCache.open(cache_dir, other_tokenizer_file)
    built = TokenCache.open(cache_dir).meta["tokenizer"]["sha256"]
    now = tokenizer_sha256(other_tokenizer_file)
    assert built[:16] in str(e.value) and now[:16] in str(e.value)
    assert "ptft data prepare" in str(e.value) and "data.cache_dir" in str(e.value)
    # prepare refuses to mix, and leaves the cache as it was.
    with pytest.raises(StaleCache, match="--overwrite"):
        prepare_cache(ListDocuments(texts), other_tokenizer_file, cache_dir, progress=False)
    _same_cache(TokenCache.open(cache_dir, tokenizer_file, ListDocuments(texts)),
                TokenCache.open(reference))


def test_changed_source_is_stale(tmp_path, texts, tokenizer_file, reference):
    cache_dir = _copy(reference, tmp_path)
    changed = ListDocuments(texts[:-1] + ["a new last chapter"], name="changed")
    with pytest.raises(StaleCache) as e:
        TokenCache.open(cache_dir, tokenizer_file, changed)
    assert ListDocuments(texts).fingerprint() in str(e.value)
    assert changed.fingerprint() in str(e.value) and "'changed'" in str(e.value)
    with pytest.raises(StaleCache, match="--overwrite"):
        prepare_cache(changed, tokenizer_file, cache_dir, progress=False)


def test_overwrite_keeps_the_old_cache_until_the_new_one_is_complete(
        tmp_path, texts, tokenizer_file, other_tokenizer_file, reference):
    cache_dir = _copy(reference, tmp_path)
    with pytest.raises(RuntimeError, match="simulated"):
        prepare_cache(ListDocuments(texts, fail_from=20), other_tokenizer_file, cache_dir,
                      num_workers=1, shard_docs=10, progress=False, overwrite=True)
    _same_cache(TokenCache.open(cache_dir, tokenizer_file), TokenCache.open(reference))
    # Without --overwrite the other tokenizer's unfinished shards are not resumed either.
    with pytest.raises(StaleCache):
        prepare_cache(ListDocuments(texts), other_tokenizer_file, cache_dir, progress=False)
    cache = prepare_cache(ListDocuments(texts), other_tokenizer_file, cache_dir,
                          num_workers=1, progress=False, overwrite=True)
    assert cache.stats.shards_skipped == 2  # the unfinished shards of the same inputs
    other = load_tokenizer(other_tokenizer_file)
    assert cache.document(5).tolist() == other.encode(texts[5], add_special_tokens=False).ids
    TokenCache.open(cache_dir, other_tokenizer_file, ListDocuments(texts))


# ---------------------------------------------------------------------------------------------
# Corruption: open() names the file and says what to do


def _truncate_tokens(d):
    with open(d / "tokens.bin", "r+b") as f:
        f.truncate((d / "tokens.bin").stat().st_size - 10)


def _offsets_fall(d):
    offsets = np.load(d / "offsets.npy")
    offsets[3], offsets[4] = offsets[4], offsets[3]
    np.save(d / "offsets.npy", offsets)


def _offsets_end_early(d):
    offsets = np.load(d / "offsets.npy")
    offsets[-1] -= 1
    np.save(d / "offsets.npy", offsets)


def _truncate_offsets(d):
    (d / "offsets.npy").write_bytes((d / "offsets.npy").read_bytes()[:100])


def _meta_garbage(d):
    (d / "meta.json").write_text('{"version": 1, "comp')


def _meta_incomplete(d):
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "complete": False}))


@pytest.mark.parametrize("damage, error, names", [
    (_truncate_tokens, CorruptCache, "tokens.bin"),
    (lambda d: (d / "tokens.bin").unlink(), CorruptCache, "tokens.bin"),
    (_offsets_fall, CorruptCache, "offsets.npy"),
    (_offsets_end_early, CorruptCache, "offsets.npy"),
    (_truncate_offsets, CorruptCache, "offsets.npy"),
    (lambda d: (d / "offsets.npy").unlink(), CorruptCache, "offsets.npy"),
    (_meta_garbage, CorruptCache, "meta.json"),
    (_meta_incomplete, MissingCache, "meta.json"),
    (lambda d: (d / "meta.json").unlink(), MissingCache, "meta.json"),
], ids=["tokens-truncated", "tokens-missing", "offsets-fall", "offsets-end-early",
        "offsets-truncated", "offsets-missing", "meta-unparsable", "meta-incomplete",
        "meta-missing"])
def test_damaged_cache_is_refused(tmp_path, texts, tokenizer_file, reference, damage, error,
                                  names):
    cache_dir = _copy(reference, tmp_path)
    damage(cache_dir)
    with pytest.raises(error) as e:
        TokenCache.open(cache_dir, tokenizer_file, ListDocuments(texts))
    assert names in str(e.value) and "ptft data prepare" in str(e.value)
    assert isinstance(e.value, CacheError) and isinstance(e.value, ValueError)


def test_prepare_repairs_a_damaged_cache_only_when_told(tmp_path, texts, tokenizer_file,
                                                        reference):
    cache_dir = _copy(reference, tmp_path)
    _truncate_tokens(cache_dir)
    with pytest.raises(CorruptCache, match="--overwrite"):
        prepare_cache(ListDocuments(texts), tokenizer_file, cache_dir, progress=False)
    cache = prepare_cache(ListDocuments(texts), tokenizer_file, cache_dir, num_workers=1,
                          progress=False, overwrite=True)
    _same_cache(cache, TokenCache.open(reference))


def test_no_cache_says_how_to_make_one(tmp_path):
    with pytest.raises(MissingCache, match="ptft data prepare"):
        TokenCache.open(tmp_path / "nowhere")


def test_two_prepares_never_write_one_folder(tmp_path, texts, tokenizer_file):
    (tmp_path / "cache").mkdir()
    with open(tmp_path / "cache" / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a running prepare holds it
        with pytest.raises(CacheError, match="Another `ptft data prepare`"):
            prepare_cache(ListDocuments(texts), tokenizer_file, tmp_path / "cache",
                          progress=False)


# ---------------------------------------------------------------------------------------------
# BERT vocab.txt


def test_bert_vocab_txt_loads_as_an_uncased_wordpiece(tmp_path):
    vocab = WORDPIECE_SPECIALS + ["hello", "world", "in", "the", "begin", "##ning", ",", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = load_tokenizer(tmp_path / "vocab.txt")
    enc = tok.encode("Hello, World! In the Beginning.", add_special_tokens=False)
    assert enc.tokens == ["hello", ",", "world", "[UNK]", "in", "the", "begin", "##ning", "."]
    assert enc.ids == [vocab.index(t) for t in enc.tokens]  # id = line number
    assert tok.encode("hello").tokens == ["[CLS]", "hello", "[SEP]"]
    assert tok.encode("the [MASK].", add_special_tokens=False).tokens == ["the", "[MASK]", "."]
    assert tok.decode(enc.ids) == "hello, world in the beginning."


@pytest.mark.parametrize("content, match", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "neither a tokenizer.json"),
    (b"just some words\nbut no unknown token\n", "neither a tokenizer.json"),
    (b"", "neither a tokenizer.json"),
    (b'{"not": "a tokenizer"}', "is JSON but not a tokenizer.json"),
], ids=["binary", "no-unk", "empty", "json-not-tokenizer"])
def test_a_file_that_is_no_tokenizer_is_refused(tmp_path, content, match):
    (tmp_path / "tok").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_tokenizer(tmp_path / "tok")


# ---------------------------------------------------------------------------------------------
# The commands, end to end


def _ptft(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "ptft_jax.cli", *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_tokenizer_train_and_data_prepare_commands(tmp_path, small_corpus, texts):
    run = [f"run_dir={tmp_path / 'run'}", f"data.corpus={small_corpus}",
           "data.tokenizer_vocab_size=500", "data.num_workers=1"]
    r = _ptft("data", "prepare", *run, cwd=tmp_path)
    assert r.returncode == 2 and "ptft tokenizer train" in r.stderr
    assert r.stderr.startswith("ptft data prepare: error:")

    r = _ptft("tokenizer", "train", *run, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    tokenizer_file = tmp_path / "run" / "tokenizer.json"
    assert "WordPiece" in r.stdout and str(tokenizer_file) in r.stdout
    tok = load_tokenizer(tokenizer_file)
    assert tok.get_vocab_size() <= 500
    r = _ptft("tokenizer", "train", *run, cwd=tmp_path)
    assert r.returncode == 2 and "--force" in r.stderr
    assert r.stderr.startswith("ptft tokenizer train: error:")

    r = _ptft("data", "prepare", *run, "--shard-docs", "25", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stdout and "docs/s" in r.stdout
    cache = TokenCache.open(tmp_path / "run" / "data_cache", tokenizer_file)
    assert cache.num_docs == len(texts) and cache.meta["shard_docs"] == 25
    for d in (0, 31, len(texts) - 1):
        assert cache.document(d).tolist() == tok.encode(texts[d], add_special_tokens=False).ids
    r = _ptft("data", "prepare", *run, cwd=tmp_path)
    assert r.returncode == 0 and "already prepared" in r.stdout

    # A byte-level BPE for a decoder, written elsewhere; the cache of the WordPiece is stale
    # for it, and --overwrite replaces it.
    bpe = tmp_path / "bpe.json"
    r = _ptft("tokenizer", "train", *run, "model.kind=decoder", "--out", bpe, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(bpe.read_text())["model"]["type"] == "BPE"
    r = _ptft("tokenizer", "train", *run, "model.kind=decoder", "--out", bpe, "--force",
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # The run keeps its own tokenizer: another data.tokenizer for it is refused.
    r = _ptft("data", "prepare", *run, f"data.tokenizer={bpe}", cwd=tmp_path)
    assert r.returncode == 2 and "differs from the tokenizer this run directory" in r.stderr
    # A second run with the BPE, pointed at the first run's cache folder: stale.
    shared = [f"run_dir={tmp_path / 'run2'}", f"data.cache_dir={tmp_path / 'run' / 'data_cache'}",
              f"data.tokenizer={bpe}", *run[1:]]
    r = _ptft("data", "prepare", *shared, cwd=tmp_path)
    assert r.returncode == 2 and "stale" in r.stderr and "--overwrite" in r.stderr
    r = _ptft("data", "prepare", *shared, "--overwrite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    TokenCache.open(tmp_path / "run" / "data_cache", bpe)


@pytest.mark.parametrize("command", [["tokenizer", "train"], ["data", "prepare"]])
def test_commands_refuse_bad_input_without_a_traceback(tmp_path, tokenizer_file, command):
    base = [f"run_dir={tmp_path}", f"data.tokenizer={tokenizer_file}"]
    r = _ptft(*command, *base, f"data.corpus={tmp_path / 'missing.txt'}", cwd=tmp_path)
    assert r.returncode == 2 and "missing.txt" in r.stderr
    r = _ptft(*command, *base, "data.corpuss=x", cwd=tmp_path)
    assert r.returncode == 2 and "data.corpus" in r.stderr


def test_data_prepare_refuses_a_file_that_is_no_tokenizer(tmp_path, small_corpus):
    (tmp_path / "notes.txt").write_text("no tokens here\n")
    r = _ptft("data", "prepare", f"run_dir={tmp_path / 'run'}", f"data.corpus={small_corpus}",
              f"data.tokenizer={tmp_path / 'notes.txt'}", cwd=tmp_path)
    assert r.returncode == 2 and "neither a tokenizer.json" in r.stderr and "notes.txt" in r.stderr
