"""What a multimodal job prepares before the one loop runs: image-text pairs (images through
the image cache, texts tokenized with the text tower's tokenizer), the two-tower or fused
task, and its starting parameters: each tower from its own `towers.*.init_from` (a ptft run's
component or a Hugging Face model), or the whole model from `finetune.init_from` (a
contrastive run's towers into a fused classifier).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import jax
import numpy as np

from ptft_jax.ckpt.pretrained import load_pretrained, load_pretrained_state
from ptft_jax.config.hf import is_hf
from ptft_jax.config.schema import Config, ConfigError
from ptft_jax.config.resolve import task_for
from ptft_jax.core.mesh import broadcast_text
from ptft_jax.data.images import prepare_image_cache_once
from ptft_jax.data.labelled import LabelSpace, predict_examples, select
from ptft_jax.data.pairs import PairExamples, PairRecords, open_pairs
from ptft_jax.data.tokenizer import TokenIds, load_tokenizer, run_tokenizer_path, train_tokenizer
from ptft_jax.jobs.common import (check_labelled_splits, data_cache_root, fitted_vocab_size,
                                  pretrained_init, save_run_files, saved_labels)
from ptft_jax.models.flops import multimodal_train_flops
from ptft_jax.tasks.factory import make_task
from ptft_jax.train.job import Job, Throughput

log = logging.getLogger(__name__)

# A tower's component in the checkpoints that may hold it, and its subtree in this model.
TOWER_SOURCES = {"image": {"image": "image"}, "text": {"text": "text", "transformer": "text"}}


def pairs_tokenizer(cfg: Config, run_dir: Path, captions: list[str]):
    """The text tower's tokenizer: the run directory's (on resume), data.tokenizer (an HF
    text tower sets it), the tokenizer of the ptft run towers.text.init_from names, else a
    WordPiece trained on the training split's texts (on process 0, then shared)."""
    from tokenizers import Tokenizer
    try:
        path = run_tokenizer_path(cfg.data.tokenizer, run_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    source = cfg.towers.text.init_from
    if path is None and source and not is_hf(source):
        for folder in (Path(source), *Path(source).parents[:3]):
            if (folder / "tokenizer.json").is_file():
                path = folder / "tokenizer.json"
                break
        else:
            raise ConfigError(f"towers.text.init_from {source} has no tokenizer.json beside it; "
                              f"set data.tokenizer to the tokenizer its text encoder was trained "
                              f"with.")
    if path is not None:
        return load_tokenizer(path)
    tok = None
    if jax.process_index() == 0:
        tok = train_tokenizer("encoder", iter(captions), cfg.data.tokenizer_vocab_size,
                              extra_special_tokens=cfg.data.extra_special_tokens)
    if jax.process_count() > 1:
        tok = Tokenizer.from_str(broadcast_text(tok.to_str() if tok is not None else ""))
    return tok


def fit_text_vocab(cfg: Config, token_ids: TokenIds) -> Config:
    """towers.text.model.vocab_size from the tokenizer, as model.vocab_size for text models:
    its size or that rounded up to 128 (null picks the latter); an HF tower keeps its own."""
    text = cfg.towers.text.model
    vocab = fitted_vocab_size(token_ids.vocab_size, text.vocab_size, cfg.towers.text.init_from,
                              "towers.text.model.vocab_size")
    text = dataclasses.replace(text, vocab_size=vocab)
    towers = dataclasses.replace(cfg.towers, text=dataclasses.replace(cfg.towers.text,
                                                                      model=text))
    return dataclasses.replace(cfg, towers=towers)


def pairs_split(cfg: Config, run_dir: Path, split: str, corpus: str | None, tokenizer,
                labels: LabelSpace | None, per_class: int, source=None):
    """(PairExamples, label space or None) of one split: images decoded into their cache
    (process 0 builds it), texts tokenized, labels encoded; data.keep_labels and, for
    training, data.per_class select rows."""
    d = cfg.data
    image = cfg.towers.image.model
    corpus = corpus or d.corpus
    source = source or open_pairs(corpus, split, d.image_column, d.text_column, d.label_column)
    if len(source) == 0:
        raise ValueError(f"data.corpus '{corpus}' split '{split}' holds no image-text pairs.")
    root = data_cache_root(cfg, run_dir)
    tag = hashlib.sha1(corpus.encode()).hexdigest()[:8]
    cache = prepare_image_cache_once(
        PairRecords(source),
        root / f"pairs-{split}-{tag}-{image.image_size}px-{image.channels}c",
        image.image_size, image.channels, d.resize, d.skip_bad_images, d.num_workers,
        progress=cfg.train.progress)
    captions = [r["text"] for r in cache.labels]
    ids, rows = None, np.arange(len(captions))
    if d.label_column is not None:
        raw = [str(r["label"]) for r in cache.labels]
        keep = None if d.keep_labels is None else {str(v) for v in d.keep_labels}
        if labels is None:
            labels = LabelSpace.from_labels("classification",
                                            [v for v in raw if keep is None or v in keep])
        kept = [i for i, v in enumerate(raw) if v in labels.names and (keep is None or v in keep)]
        ids = np.full(len(raw), -1, np.int64)
        if kept:
            ids[kept] = labels.encode([raw[i] for i in kept], f"split '{split}' of {corpus}")
        rows = select(ids, None, per_class, d.shuffle_seed)
        rows = rows[ids[rows] >= 0]
    texts = predict_examples(captions, tokenizer, d.seq_len, "encoder")
    if texts.truncated:
        log.info("%s split %s: %d of %d texts cut to data.seq_len=%d", corpus, split,
                 texts.truncated, len(captions), d.seq_len)
    return PairExamples(cache.images, texts, captions, ids, rows), labels


def tower_init_from(cfg: Config, label_names=None, vocab_rows: int | None = None):
    """(engine, state) -> (state, report): `finetune.init_from` (a whole multimodal run: its
    towers and whatever else matches) first, then each tower from its own init_from."""
    whole = pretrained_init(cfg, None, label_names)
    towers = [(name, getattr(cfg.towers, name).init_from) for name in ("image", "text")]
    towers = [(name, source) for name, source in towers if source]
    if whole is None and not towers:
        return None

    def init_from(engine, state):
        report = []
        if whole is not None:
            state, report = whole(engine, state)
        host = engine.host_state(state)
        params, model_state = dict(host.params), host.model_state
        for name, source in towers:
            sub, lines = load_pretrained(source, {name: params[name]}, [".*"], [], [],
                                         vocab_rows=vocab_rows,
                                         rename=TOWER_SOURCES[name])
            params[name] = sub[name]
            report += [f"towers.{name}: {line}" for line in lines]
            if name == "image" and model_state:
                model_state, lines = load_pretrained_state(source, model_state, ["^image/"],
                                                           [])
                report += [f"towers.image: {line}" for line in lines]
        for line in report:
            log.info("init_from: %s", line)
        return engine.place(host.replace(params=params, model_state=model_state)), report
    return init_from


def pairs_job(cfg: Config) -> Job:
    run_dir, d, task_name = Path(cfg.run_dir), cfg.data, task_for(cfg)
    labels_path = run_dir / "labels.json"
    saved = saved_labels(run_dir)
    try:
        source = open_pairs(d.corpus, d.split, d.image_column, d.text_column, d.label_column)
        tokenizer = pairs_tokenizer(cfg, run_dir, source.texts())
        token_ids = TokenIds.of(tokenizer, "encoder")
        cfg = fit_text_vocab(cfg, token_ids)
        train, labels = pairs_split(cfg, run_dir, d.split, None, tokenizer, saved, d.per_class,
                                    source)
        evaluation = None
        if d.eval_split or d.eval_corpus:
            evaluation, _ = pairs_split(cfg, run_dir, d.eval_split or "train", d.eval_corpus,
                                        tokenizer, labels, 0)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_labelled_splits(saved, labels, labels_path, train, "pair", d.corpus)
    if task_name != "contrastive" and labels is None:
        raise ConfigError("train.task multimodal_classification needs labels: set "
                          "data.label_column.")
    task = make_task(cfg, labels, tokenizer)
    image = cfg.towers.image.model

    def save_files():
        save_run_files(run_dir, tokenizer, labels)

    describe = (f"{len(train):,} training pairs"
                + (f", {len(evaluation):,} eval pairs" if evaluation is not None else "")
                + f" | images {image.image_size}x{image.image_size}x{image.channels}, texts of "
                  f"up to {d.seq_len} tokens"
                + (f" | {labels.num_outputs} classes" if labels is not None else ""))
    meta = {"tokenizer_vocab_size": token_ids.vocab_size}
    if labels is not None:
        meta["labels"] = dataclasses.asdict(labels)
    flops = multimodal_train_flops(cfg)
    throughput = Throughput("examples", 1, flops, f"{flops / 3e9:.2f} GFLOPs/pair (forward)")
    return Job(cfg, task, train, lambda: describe, meta, save_files, throughput, evaluation,
               tower_init_from(cfg, labels.names if labels else None, token_ids.vocab_size))
