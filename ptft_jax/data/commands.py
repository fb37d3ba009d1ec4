"""The data tools' command bodies: `ptft tokenizer train` and `ptft data prepare` (cli.py
parses their arguments). Each returns the process's exit code."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ptft_jax.config.load import load_config
from ptft_jax.config.schema import ConfigError
from ptft_jax.config.validate import check_tokenizer_size
from ptft_jax.core.files import (LEGACY_RUN, atomic_write_text, check_output_file,
                                 check_ownable, claim_folder)
from ptft_jax.data.cache_build import prepare_cache
from ptft_jax.data.opening import open_documents
from ptft_jax.data.tokenizer import (iter_texts, run_tokenizer_path, save_tokenizer,
                                     tokenizer_source, train_tokenizer)


def failed(command: str, message) -> int:
    """Prints the one-line error and returns the usage-error exit code."""
    print(f"ptft {command}: error: {message}", file=sys.stderr)
    return 2


def tokenizer_train(args) -> int:
    """`ptft tokenizer train`: a tokenizer trained on the config's corpus, saved atomically."""
    cfg = load_config(args.config, args.overrides)
    if args.out:  # a file of the user's choosing: checked as every command's output file
        out = check_output_file(args.out, "--out", overwrite=args.force)
    else:
        out = Path(cfg.run_dir) / "tokenizer.json"
        check_ownable(out.parent, "run", "run_dir", LEGACY_RUN)  # before the training
        if out.exists() and not args.force:
            return failed("tokenizer train", f"{out} already exists; pass --force to replace "
                                             f"it, or --out to write elsewhere.")
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    if out.is_dir() or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "a folder" if out.is_dir() else "not a writable folder"
        return failed("tokenizer train", f"--out {out}: cannot write there ('{existing}' is "
                                         f"{what}); give a writable file path.")
    if cfg.model.kind not in ("encoder", "decoder"):
        raise ConfigError(f"'model.kind' is '{cfg.model.kind}'; it must be encoder (WordPiece "
                          f"tokenizer) or decoder (byte-level BPE).")
    check_tokenizer_size(cfg.data.tokenizer_vocab_size, cfg.model.kind)
    try:
        documents = open_documents(cfg.data)
    except ValueError as e:
        return failed("tokenizer train", e)
    kind = "WordPiece" if cfg.model.kind == "encoder" else "byte-level BPE"
    print(f"training a {kind} tokenizer of {cfg.data.tokenizer_vocab_size} tokens on "
          f"{len(documents):,} documents of {cfg.data.corpus} ...", flush=True)
    t0 = time.perf_counter()
    # The trainer's bars only make sense on a terminal; elsewhere they print empty lines.
    tokenizer = train_tokenizer(cfg.model.kind, iter_texts(documents),
                                cfg.data.tokenizer_vocab_size, progress=sys.stderr.isatty(),
                                extra_special_tokens=cfg.data.extra_special_tokens)
    if args.out:
        atomic_write_text(out, tokenizer.to_str(pretty=True))
    else:  # the run directory: taken as ptft's, so that pretraining takes the tokenizer on
        claim_folder(out.parent, "run", "run_dir", LEGACY_RUN)
        save_tokenizer(tokenizer, out.parent, tokenizer_source(cfg.data, cfg.model.kind))
    print(f"saved {out}: {tokenizer.get_vocab_size():,} tokens, trained in "
          f"{time.perf_counter() - t0:.1f}s")
    return 0


def data_prepare(args) -> int:
    """`ptft data prepare`: the pre-tokenized cache of the config's corpus (resumable)."""
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.run_dir)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "data_cache"
    try:
        tokenizer = run_tokenizer_path(cfg.data.tokenizer, run_dir,  # the one pretrain uses
                                       tokenizer_source(cfg.data, cfg.model.kind))
    except ValueError as e:
        return failed("data prepare", e)
    if tokenizer is None:
        return failed("data prepare", f"no tokenizer: data.tokenizer is not set and "
                                      f"{run_dir / 'tokenizer.json'} does not exist. Run `ptft "
                                      f"tokenizer train` with the same config first, or set "
                                      f"data.tokenizer=PATH (a tokenizer.json or vocab.txt).")
    try:
        documents = open_documents(cfg.data)
        if not cfg.data.cache_dir:  # the run directory's: taken as ptft's, as pretraining does
            claim_folder(run_dir, "run", "run_dir", LEGACY_RUN)
        print(f"preparing {cache_dir} from {len(documents):,} documents of {cfg.data.corpus} "
              f"with {tokenizer} ...", flush=True)
        cache = prepare_cache(documents, tokenizer, cache_dir, cfg.data.num_workers,
                              shard_docs=args.shard_docs, overwrite=args.overwrite)
    except ValueError as e:
        return failed("data prepare", e)
    except KeyboardInterrupt:
        print(f"ptft data prepare: interrupted; finished shards are kept in {cache_dir}. Run "
              f"the same command to resume.", file=sys.stderr)
        return 130
    counts = f"{cache.num_docs:,} documents, {len(cache.tokens):,} {cache.tokens.dtype} tokens"
    stats = cache.stats
    if stats is None:
        print(f"already prepared: {cache_dir} ({counts}); nothing to do")
        return 0
    resumed = f" | {stats.shards_skipped} shard(s) reused" if stats.shards_skipped else ""
    print(f"done: {cache_dir} | {counts} | {stats.docs_per_s:,.0f} docs/s, "
          f"{stats.tokens_per_s:,.0f} tokens/s on {stats.workers} worker(s) | "
          f"merge {stats.merge_seconds:.1f}s{resumed}")
    return 0
