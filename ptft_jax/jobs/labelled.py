"""Finetuning on labelled text: labelled examples (padded, or packed several to a row), a
classifier (or multi-label or regression) head, and a pretrained component to start from
(`finetune.init_from`)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ptft_jax.ckpt.pretrained import check_init_from
from ptft_jax.config.hf import is_hf
from ptft_jax.config.schema import Config, ConfigError
from ptft_jax.config.resolve import slots_for, task_for
from ptft_jax.core.mesh import data_parallel_size
from ptft_jax.data.labelled import open_examples
from ptft_jax.data.opening import eval_split_of
from ptft_jax.data.packed_examples import PackedExamples
from ptft_jax.data.tokenizer import TokenIds, load_tokenizer, run_tokenizer_path
from ptft_jax.jobs.common import (data_cache_root, pretrained_init, resolve_vocab, save_run_files,
                                  saved_labels, text_throughput)
from ptft_jax.jobs.distill import (check_same_tokenizer, check_teacher_labels, distill_task,
                                   open_teacher, teacher_init, with_teacher_tokenizer)
from ptft_jax.tasks.factory import make_task
from ptft_jax.train.job import Job


def finetune_tokenizer_path(cfg: Config, run_dir: Path) -> Path:
    """The run's own tokenizer on resume, else data.tokenizer, else the one of the run that
    finetune.init_from names (the component was trained on its ids)."""
    try:
        path = run_tokenizer_path(cfg.data.tokenizer, run_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    theirs = None
    if cfg.finetune.init_from and not is_hf(cfg.finetune.init_from):
        source = Path(cfg.finetune.init_from)
        theirs = next((folder / "tokenizer.json" for folder in (source, *source.parents[:3])
                       if (folder / "tokenizer.json").is_file()), None)
    if path is None and theirs is not None:
        return theirs
    if path is not None and theirs is not None and \
            load_tokenizer(path).get_vocab() != load_tokenizer(theirs).get_vocab():
        # The component's embedding rows are its own tokenizer's ids: another tokenizer's ids
        # would read the wrong rows.
        if cfg.data.tokenizer:
            raise ConfigError(f"data.tokenizer ({path}) is not the tokenizer the component in "
                              f"finetune.init_from was trained with ({theirs}); leave "
                              f"data.tokenizer null to use that one.")
        raise ConfigError(f"{path} (left in this run_dir by an earlier run) is not the "
                          f"tokenizer the component in finetune.init_from was trained with "
                          f"({theirs}); use a new run_dir.")
    if path is None:
        raise ConfigError("A finetuning run needs the tokenizer its component was trained with: "
                          "set finetune.init_from to a ptft run directory (its tokenizer.json "
                          "is used) or data.tokenizer=PATH.")
    return path


def finetune_job(cfg: Config) -> Job:
    run_dir = Path(cfg.run_dir)
    check_init_from(cfg.finetune.init_from, image_task=False)
    teacher = open_teacher(cfg) if cfg.distill.teacher else None
    if teacher is not None:
        cfg = with_teacher_tokenizer(cfg, teacher)
    tokenizer_path = finetune_tokenizer_path(cfg, run_dir)
    tokenizer = load_tokenizer(tokenizer_path)
    if teacher is not None:
        check_same_tokenizer(teacher, tokenizer, tokenizer_path)
    token_ids = TokenIds.of(tokenizer, cfg.model.kind)
    cfg = resolve_vocab(cfg, token_ids)
    kind = task_for(cfg)
    labels_path = run_dir / "labels.json"
    saved = saved_labels(run_dir)
    cache_root = data_cache_root(cfg, run_dir)
    # The examples are tokenized into a cache next to a copy of the tokenizer, so the cache's
    # tokenizer check has a file to read before the run directory is written.
    try:
        train, labels = open_examples(cfg.data, cfg.data.split, tokenizer_path, cache_root,
                                      kind, saved, cfg.model.kind,
                                      progress=cfg.train.progress,
                                      per_class=cfg.data.per_class)
        evaluation = None
        if cfg.data.eval_split or cfg.data.eval_corpus:
            evaluation, _ = open_examples(cfg.data, eval_split_of(cfg.data),
                                          tokenizer_path, cache_root, kind, labels,
                                          cfg.model.kind, progress=cfg.train.progress,
                                          corpus=cfg.data.eval_corpus)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if saved is not None and saved != labels:
        raise ConfigError(f"{labels_path} holds other labels than the data now gives; use a new "
                          f"run_dir.")
    slots, written_cfg = slots_for(cfg), None
    if slots is not None:  # several examples to a row: the order they are packed in is seeded
        train = PackedExamples(train, slots, cfg.data.shuffle_seed)
        if evaluation is not None:
            evaluation = PackedExamples(evaluation, slots, None)
        written_cfg, cfg = cfg, rows_per_batch(cfg, train, evaluation)
    task = make_task(cfg, labels)
    init_from = pretrained_init(cfg, token_ids, labels.names)
    if teacher is not None:
        check_teacher_labels(teacher, labels)
        task = distill_task(cfg, task, teacher, token_ids.vocab_size)
        init_from = teacher_init(teacher, token_ids.vocab_size, labels.names, then=init_from)

    def save_files():
        save_run_files(run_dir, tokenizer, labels)

    truncated = train.truncated + (evaluation.truncated if evaluation is not None else 0)

    def count(split):
        if slots is None:
            return f"{len(split):,}"
        return (f"{len(split.examples):,} (packed {split.examples_per_row:.2f} to a row, "
                f"{len(split):,} rows)")
    describe = (f"{count(train)} training examples"
                + (f", {count(evaluation)} eval examples" if evaluation is not None else "")
                + f" of up to {cfg.data.seq_len} tokens ({truncated:,} truncated) | "
                  f"{labels.kind}: {labels.num_outputs} output(s)")
    if teacher is not None:
        describe += f" | distilling from {teacher.source}"
    if slots is not None:
        describe += (f" | batches of {written_cfg.train.global_batch} examples: "
                     f"{cfg.train.global_batch} packed rows (about "
                     f"{cfg.train.global_batch * train.examples_per_row:.0f} examples)")
    meta = {"tokenizer_vocab_size": token_ids.vocab_size, "labels": dataclasses.asdict(labels)}
    return Job(cfg, task, train, lambda: describe, meta, save_files,
               text_throughput(cfg, vocab_projection=False), evaluation, init_from,
               written_cfg)


def rows_per_batch(cfg: Config, train, evaluation) -> Config:
    """The config with train.global_batch and eval.batch_size in packed rows. Both count
    examples, as for padded rows; packed, a batch is the rows that hold that many examples on
    average (so a recipe keeps its meaning), to the nearest multiple the mesh splits evenly."""
    dp = data_parallel_size(cfg)
    eval_rows = cfg.eval.batch_size if evaluation is None else \
        evaluation.rows_holding(cfg.eval.batch_size, dp)
    rows = train.rows_holding(cfg.train.global_batch, dp * cfg.train.grad_accum)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch=rows),
                               eval=dataclasses.replace(cfg.eval, batch_size=eval_rows))
