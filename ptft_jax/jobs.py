"""What each kind of job prepares before the one loop runs: its data, tokenizer, task and
starting parameters. A pretraining job packs tokenized documents into rows for masked or
causal LM; a finetuning job pads labelled examples for a classifier and may start from a
pretrained component (`finetune.init_from`).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from tokenizers import Tokenizer

from ptft_jax.config import Config, ConfigError, pooling_for, task_for
from ptft_jax.convert.hf import is_hf
from ptft_jax.data.cache import TokenCache, prepare_cache_once
from ptft_jax.data.labelled import LabelSpace, open_examples
from ptft_jax.data.packing import Packer
from ptft_jax.data.opening import open_documents
from ptft_jax.data.tokenizer import (TokenIds, iter_texts, load_tokenizer, run_tokenizer_path,
                                     train_tokenizer)
from ptft_jax.engine import data_parallel_size
from ptft_jax.tasks.classify import ClassifyTask
from ptft_jax.tasks.lm import CausalLM, MaskedLM, MlmSpec
from ptft_jax.tasks.vocab_loss import LOSS_CHUNK_AUTO_TOKENS

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Job:
    cfg: Config  # with model.vocab_size resolved from the tokenizer
    task: object
    train_rows: object  # anything with len() and rows(index) -> dict of arrays
    describe: str  # one line for the log
    meta: dict  # what checkpoints record beside the config
    save_files: Callable[[], None]  # writes the tokenizer (and labels) into the run directory
    eval_examples: object = None  # data.labelled.Examples of the eval split, or None
    init_from: Callable | None = None  # (engine, state) -> state with pretrained params
    tokens_per_row: int = 0
    # Training FLOPs of one row when every parameter trains (MFU); None: the loop derives them
    # from the model (language models per token, image models per image).
    flops_per_row: float | None = None


# ---------------------------------------------------------------------------------------------
# Shared: the tokenizer and the model's vocabulary


def _broadcast_text(text: str) -> str:
    """Process 0's `text`, on every process."""
    data = np.frombuffer(text.encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    padded = np.zeros(size, np.uint8)
    padded[: min(size, len(data))] = data[:size]
    return bytes(multihost_utils.broadcast_one_to_all(padded)).decode()


def prepare_tokenizer(cfg: Config, run_dir: Path, documents):
    """The tokenizer `run_tokenizer_path` names, else a new one trained on the documents (the
    caller saves it into the run directory once every check has passed)."""
    try:
        path = run_tokenizer_path(cfg.data.tokenizer, run_dir)
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
        tok = Tokenizer.from_str(_broadcast_text(tok.to_str() if tok is not None else ""))
    return tok


def resolve_vocab(cfg: Config, token_ids: TokenIds) -> Config:
    """model.vocab_size must fit the tokenizer: equal to its size, or that size rounded up to a
    multiple of 128 (padding rows make the vocabulary matmuls faster). null picks the latter.
    A Hugging Face model keeps its own table, which must hold every token id."""
    size = token_ids.vocab_size
    padded = -(-size // 128) * 128
    vocab = cfg.model.vocab_size
    if is_hf(cfg.finetune.init_from):
        if size > vocab:
            raise ConfigError(f"The tokenizer {cfg.data.tokenizer} has {size} tokens but the "
                              f"model {cfg.finetune.init_from} embeds {vocab} (config.json "
                              f"vocab_size): ids past {vocab - 1} would have no row. Use the "
                              f"tokenizer that came with the model.")
        return cfg
    if vocab is None:
        vocab = padded
    elif vocab not in (size, padded):
        raise ConfigError(f"model.vocab_size is {vocab} but the tokenizer has {size} tokens. "
                          f"Set model.vocab_size={padded} (or {size}), or null to follow the "
                          f"tokenizer; to keep {vocab}, use a tokenizer of that size.")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def _save_tokenizer(tokenizer, run_dir: Path) -> None:
    if jax.process_index() == 0 and not (run_dir / "tokenizer.json").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(run_dir / "tokenizer.json"))


def _init_from(cfg: Config, token_ids: TokenIds | None, label_names=None):
    """(engine, state) -> (state with the pretrained parameters, report), or None: what
    finetune.init_from names, restored through the load / dont_load / init_fresh rules."""
    from ptft_jax.pretrained import load_pretrained, load_pretrained_state  # noqa: light imports
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


# ---------------------------------------------------------------------------------------------
# Pretraining: packed rows of tokenized documents


def open_token_cache(cfg: Config, run_dir: Path, documents) -> TokenCache:
    """The pre-tokenized cache of the documents, built on first use (resumably) by process 0;
    the other processes open it once it is ready (the cache folder must be shared)."""
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "data_cache"
    return prepare_cache_once(documents, run_dir / "tokenizer.json", cache_dir,
                              cfg.data.num_workers, progress=cfg.train.progress)


def mlm_spec(cfg: Config, ids: TokenIds) -> MlmSpec:
    first_regular = max(ids.special_ids) + 1  # our tokenizers put special tokens first
    return MlmSpec.from_config(cfg.objective, mask_id=ids.mask_id, special_ids=ids.special_ids,
                               random_low=first_regular, random_high=ids.vocab_size)


def resolve_loss_chunk(cfg: Config) -> int:
    """objective.loss_chunk (tokens per device per chunk of the vocabulary loss), or for null
    the measured default: LOSS_CHUNK_AUTO_TOKENS (see benchmarks/loss_chunk.py)."""
    if cfg.objective.loss_chunk is not None:
        return cfg.objective.loss_chunk
    return LOSS_CHUNK_AUTO_TOKENS


def lm_task(cfg: Config, spec: MlmSpec | None, devices=None):
    """The masked or causal LM task of `cfg` (spec: the tokenizer's masking ids, for MLM)."""
    chunk = resolve_loss_chunk(cfg)
    # Under pmap the step traces one device's rows; under jit, the global batch.
    split = 1 if cfg.mesh.parallelism == "pmap" else data_parallel_size(cfg, devices)
    if task_for(cfg) == "mlm":
        return MaskedLM(cfg.model, spec, chunk, split)
    return CausalLM(cfg.model, chunk, split)


def pretrain_job(cfg: Config) -> Job:
    run_dir = Path(cfg.run_dir)
    try:
        documents = open_documents(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tokenizer = prepare_tokenizer(cfg, run_dir, documents)
    token_ids = TokenIds.of(tokenizer, cfg.model.kind)
    cfg = resolve_vocab(cfg, token_ids)
    task = lm_task(cfg, mlm_spec(cfg, token_ids) if task_for(cfg) == "mlm" else None)

    class LazyRows:
        """The packed rows, built on first use: the token cache is made only after every
        check on the run directory has passed."""
        packer = None

        def build(self):
            if self.packer is None:
                cache = open_token_cache(cfg, run_dir, documents)
                self.packer = Packer(cache.tokens, cache.offsets, cfg.data.seq_len,
                                     token_ids.bos_id, token_ids.eos_id, cfg.data.packing)
            return self.packer

        def __len__(self):
            return len(self.build())

        def rows(self, index):
            return self.packer.rows(index)

    rows = LazyRows()

    def save_files():
        _save_tokenizer(tokenizer, run_dir)
        rows.build()

    def describe():
        p = rows.build()
        return (f"{len(p)} rows of {cfg.data.seq_len} tokens ({cfg.data.packing}; "
                f"{p.dropped_tokens} tail tokens dropped)")
    return Job(cfg, task, rows, describe, {"tokenizer_vocab_size": token_ids.vocab_size},
               save_files, init_from=_init_from(cfg, token_ids), tokens_per_row=cfg.data.seq_len)


# ---------------------------------------------------------------------------------------------
# Finetuning: padded labelled examples, a classifier, a pretrained component


def finetune_tokenizer_path(cfg: Config, run_dir: Path) -> Path:
    """The run's own tokenizer on resume, else data.tokenizer, else the one of the run that
    finetune.init_from names (the component was trained on its ids)."""
    try:
        path = run_tokenizer_path(cfg.data.tokenizer, run_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if path is None and cfg.finetune.init_from:
        source = Path(cfg.finetune.init_from)
        for folder in (source, *source.parents[:3]):
            if (folder / "tokenizer.json").is_file():
                return folder / "tokenizer.json"
    if path is None:
        raise ConfigError("A finetuning run needs the tokenizer its component was trained with: "
                          "set finetune.init_from to a ptft run directory (its tokenizer.json "
                          "is used) or data.tokenizer=PATH.")
    return path


def finetune_job(cfg: Config) -> Job:
    run_dir = Path(cfg.run_dir)
    tokenizer_path = finetune_tokenizer_path(cfg, run_dir)
    tokenizer = load_tokenizer(tokenizer_path)
    token_ids = TokenIds.of(tokenizer, cfg.model.kind)
    cfg = resolve_vocab(cfg, token_ids)
    kind = task_for(cfg)
    labels_path = run_dir / "labels.json"
    saved_labels = LabelSpace.load(labels_path) if labels_path.exists() else None
    cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "data_cache"
    # The examples are tokenized into a cache next to a copy of the tokenizer, so the cache's
    # tokenizer check has a file to read before the run directory is written.
    try:
        train, labels = open_examples(cfg.data, cfg.data.split, tokenizer_path, cache_root,
                                      kind, saved_labels, cfg.model.kind,
                                      progress=cfg.train.progress)
        evaluation = None
        if cfg.data.eval_split or cfg.data.eval_corpus:
            evaluation, _ = open_examples(cfg.data, cfg.data.eval_split or "train",
                                          tokenizer_path, cache_root, kind, labels,
                                          cfg.model.kind, progress=cfg.train.progress,
                                          corpus=cfg.data.eval_corpus)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if saved_labels is not None and saved_labels != labels:
        raise ConfigError(f"{labels_path} holds other labels than the data now gives; use a new "
                          f"run_dir.")
    task = ClassifyTask(cfg.model, labels, pooling_for(cfg))

    def save_files():
        if jax.process_index() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not (run_dir / "tokenizer.json").exists():  # a vocab.txt is saved as JSON too
                tokenizer.save(str(run_dir / "tokenizer.json"))
            if not labels_path.exists():
                labels.save(labels_path)

    init_from = _init_from(cfg, token_ids, labels.names)
    truncated = train.truncated + (evaluation.truncated if evaluation is not None else 0)
    describe = (f"{len(train):,} training examples"
                + (f", {len(evaluation):,} eval examples" if evaluation is not None else "")
                + f" of up to {cfg.data.seq_len} tokens ({truncated:,} truncated) | "
                  f"{labels.kind}: {labels.num_outputs} output(s)")
    meta = {"tokenizer_vocab_size": token_ids.vocab_size, "labels": dataclasses.asdict(labels)}
    return Job(cfg, task, train, lambda: describe, meta, save_files, evaluation, init_from,
               tokens_per_row=cfg.data.seq_len)


# ---------------------------------------------------------------------------------------------
# Images: labelled images from the image cache, an image classifier


def image_split(cfg: Config, run_dir: Path, split: str, corpus: str | None, labels,
                 per_class: int):
    """(ImageExamples, class names) of one split: the source decoded into its image cache
    (process 0 builds it), filtered to data.keep_labels and, for training, data.per_class."""
    import hashlib
    from ptft_jax.data.image_sources import open_images
    from ptft_jax.data.images import ImageExamples, prepare_image_cache_once, select
    d, m = cfg.data, cfg.model
    corpus = corpus or d.corpus
    source = open_images(corpus, split, d.image_column, d.label_column)
    if len(source) == 0:
        raise ValueError(f"data.corpus '{corpus}' split '{split}' holds no images.")
    root = Path(d.cache_dir) if d.cache_dir else run_dir / "data_cache"
    tag = hashlib.sha1(corpus.encode()).hexdigest()[:8]
    cache = prepare_image_cache_once(
        source, root / f"images-{split}-{tag}-{m.image_size}px-{m.channels}c", m.image_size,
        m.channels, d.resize, d.skip_bad_images, d.num_workers, progress=cfg.train.progress)
    raw = [str(v) for v in cache.labels]
    keep = None if d.keep_labels is None else {str(v) for v in d.keep_labels}
    if keep is not None:
        missing = sorted(keep - set(raw))
        if missing:
            raise ValueError(f"data.keep_labels: {missing} are not labels of {source.name} "
                             f"(its labels: {sorted(set(raw))[:20]}).")
    if labels is None:
        labels = LabelSpace.from_labels("classification",
                                        [v for v in raw if keep is None or v in keep])
    kept_rows = [i for i, v in enumerate(raw) if keep is None or v in keep]
    ids = np.full(len(raw), -1, np.int64)
    ids[kept_rows] = labels.encode([raw[i] for i in kept_rows], f"split '{split}' of {corpus}")
    rows = select(ids, None, per_class, d.shuffle_seed)
    rows = rows[ids[rows] >= 0]
    return ImageExamples(cache.images, ids, rows), labels


def image_job(cfg: Config) -> Job:
    from ptft_jax.tasks.image import ImageClassifyTask
    run_dir = Path(cfg.run_dir)
    labels_path = run_dir / "labels.json"
    saved = LabelSpace.load(labels_path) if labels_path.exists() else None
    try:
        train, labels = image_split(cfg, run_dir, cfg.data.split, None, saved,
                                     cfg.data.per_class)
        evaluation = None
        if cfg.data.eval_split or cfg.data.eval_corpus:
            evaluation, _ = image_split(cfg, run_dir, cfg.data.eval_split or "train",
                                         cfg.data.eval_corpus, labels, 0)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if saved is not None and saved != labels:
        raise ConfigError(f"{labels_path} holds other labels than the data now gives; use a new "
                          f"run_dir.")
    if len(train) == 0:
        raise ConfigError(f"data.keep_labels / data.per_class leave no training image in "
                          f"{cfg.data.corpus}.")
    bn_axis = "batch" if cfg.mesh.parallelism == "pmap" else None
    task = ImageClassifyTask(cfg.model, labels.names, cfg.augment,
                             cfg.objective.label_smoothing, bn_axis)

    def save_files():
        if jax.process_index() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not labels_path.exists():
                labels.save(labels_path)

    m = cfg.model
    describe = (f"{len(train):,} training images"
                + (f", {len(evaluation):,} eval images" if evaluation is not None else "")
                + f" of {m.image_size}x{m.image_size}x{m.channels} | {labels.num_outputs} "
                  f"classes")
    meta = {"labels": dataclasses.asdict(labels)}
    return Job(cfg, task, train, lambda: describe, meta, save_files, evaluation,
               _init_from(cfg, None, labels.names), tokens_per_row=1)
