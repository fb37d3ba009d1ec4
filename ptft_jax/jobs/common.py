"""What every kind of job shares: the tokenizer (trained or loaded, saved into the run
directory), the model's vocabulary fitted to it, and the pretrained component that
`finetune.init_from` names; what a row of text costs."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
from tokenizers import Tokenizer

from ptft_jax.ckpt.pretrained import load_pretrained, load_pretrained_state
from ptft_jax.config.hf import is_hf
from ptft_jax.config.schema import Config, ConfigError
from ptft_jax.core.files import LEGACY_RUN, claim_folder
from ptft_jax.core.mesh import broadcast_text
from ptft_jax.data.labelled import LabelSpace
from ptft_jax.data.tokenizer import (TokenIds, iter_texts, load_tokenizer, run_tokenizer_path,
                                     save_tokenizer, tokenizer_source, train_tokenizer)
from ptft_jax.models.flops import matmul_params, train_flops_per_token
from ptft_jax.train.job import Throughput

log = logging.getLogger(__name__)


def text_throughput(cfg: Config, vocab_projection: bool,
                    predicted_positions: int | None = None) -> Throughput:
    """Throughput in tokens, each costing `train_flops_per_token` (a classifier's head runs
    once per example, not per token: no vocabulary projection)."""
    T = cfg.data.seq_len
    return Throughput("tokens", T, train_flops_per_token(cfg.model, T, vocab_projection,
                                                         predicted_positions),
                      f"{matmul_params(cfg.model) / 1e6:.2f}M matmul params")


def prepare_tokenizer(cfg: Config, run_dir: Path, documents):
    """The tokenizer `run_tokenizer_path` names, else a new one trained on the documents (the
    caller saves it into the run directory once every check has passed)."""
    try:
        path = run_tokenizer_path(cfg.data.tokenizer, run_dir,
                                  tokenizer_source(cfg.data, cfg.model.kind))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if path is not None:
        return load_tokenizer(path)
    # HF's WordPiece trainer breaks frequency ties in hash order, so two trainings on the same
    # text can differ in a few tokens. On multi-host, process 0 trains and the others take its
    # tokenizer; the run directory keeps it for every later resume.
    tok = None
    if jax.process_index() == 0:
        tok = train_tokenizer(cfg.model.kind, iter_texts(documents),
                              cfg.data.tokenizer_vocab_size,
                              extra_special_tokens=cfg.data.extra_special_tokens)
    if jax.process_count() > 1:
        tok = Tokenizer.from_str(broadcast_text(tok.to_str() if tok is not None else ""))
    return tok


def fitted_vocab_size(size: int, vocab: int | None, init_from: str | None, key: str) -> int:
    """The vocabulary size a text model takes for a tokenizer of `size` tokens: `vocab` (the
    config's `key`) if it is that size or that size rounded up to a multiple of 128 (padding
    rows make the vocabulary matmuls faster); null picks the latter. A Hugging Face model
    (`init_from` hf:...) keeps its own table, which must hold every token id; so does a model
    started from a ptft run whose table holds them (one that came from a Hugging Face model
    may have more rows than its tokenizer has tokens)."""
    padded = -(-size // 128) * 128
    if init_from and not is_hf(init_from) and vocab is not None and vocab > size:
        return vocab
    if is_hf(init_from):
        if size > vocab:
            raise ConfigError(f"The tokenizer has {size} tokens but the model {init_from} "
                              f"embeds {vocab} (config.json vocab_size): ids past {vocab - 1} "
                              f"would have no row. Use the tokenizer that came with the model.")
        return vocab
    if vocab is None:
        return padded
    if vocab not in (size, padded):
        other = f" (or {size})" if size != padded else ""
        raise ConfigError(f"{key} is {vocab} but the tokenizer has {size} tokens. Set "
                          f"{key}={padded}{other}, or null to follow the tokenizer; to keep "
                          f"{vocab}, use a tokenizer of that size.")
    return vocab


def resolve_vocab(cfg: Config, token_ids: TokenIds) -> Config:
    """The config with model.vocab_size fitted to the tokenizer (`fitted_vocab_size`)."""
    vocab = fitted_vocab_size(token_ids.vocab_size, cfg.model.vocab_size, cfg.finetune.init_from,
                              "model.vocab_size")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def check_labelled_splits(saved, labels, labels_path: Path, train, what: str,
                          corpus: str) -> None:
    """A resumed run's labels.json must match the labels the data gives now, and the training
    split must hold something."""
    if saved is not None and saved != labels:
        raise ConfigError(f"{labels_path} holds other labels than the data now gives; use a new "
                          f"run_dir.")
    if len(train) == 0:
        raise ConfigError(f"data.keep_labels / data.per_class leave no training {what} in "
                          f"{corpus}.")


def saved_labels(run_dir: Path) -> LabelSpace | None:
    """The label space a run directory was started with (labels.json), or None."""
    path = run_dir / "labels.json"
    return LabelSpace.load(path) if path.exists() else None


def data_cache_root(cfg: Config, run_dir: Path) -> Path:
    """Where a job's data caches go: data.cache_dir, else data_cache/ in the run directory,
    which is then taken as ptft's (marked, core/files.py) before the first cache is written:
    the caches are the first thing a job writes there."""
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    if jax.process_index() == 0:
        claim_folder(run_dir, "run", "run_dir", LEGACY_RUN)
    return run_dir / "data_cache"


def save_run_files(run_dir: Path, tokenizer=None, labels: LabelSpace | None = None,
                   tokenizer_made_by: dict | None = None) -> None:
    """The tokenizer (a vocab.txt is saved as JSON too, with the config keys that made it:
    tokenizer_source) and the label space into the run directory, by process 0, once: a
    resumed run keeps the files it started with."""
    if jax.process_index() != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None and not (run_dir / "tokenizer.json").exists():
        save_tokenizer(tokenizer, run_dir, tokenizer_made_by)
    if labels is not None and not (run_dir / "labels.json").exists():
        labels.save(run_dir / "labels.json")


def pretrained_init(cfg: Config, token_ids: TokenIds | None, label_names=None):
    """(engine, state) -> (state with the pretrained parameters, report), or None: what
    finetune.init_from names, restored through the load / dont_load / init_fresh rules."""
    f = cfg.finetune
    if not f.init_from:
        return None
    vocab_rows = token_ids.vocab_size if token_ids is not None else None

    def init_from(engine, state):
        host = engine.host_state(state)
        params, report = load_pretrained(f.init_from, host.params, f.load, f.dont_load,
                                         f.init_fresh, vocab_rows=vocab_rows,
                                         label_names=label_names)
        model_state, more = load_pretrained_state(f.init_from, host.model_state, f.load,
                                                  f.dont_load)
        report += more
        for line in report:
            log.info("init_from: %s", line)
        return engine.place(host.replace(params=params, model_state=model_state)), report
    return init_from
