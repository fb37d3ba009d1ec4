"""Image classification: labelled images from the image cache and an image classifier."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ptft_jax.ckpt.pretrained import check_init_from
from ptft_jax.config.schema import Config, ConfigError
from ptft_jax.data.image_sources import open_images
from ptft_jax.data.images import ImageExamples, prepare_image_cache_once
from ptft_jax.data.labelled import LabelSpace, select
from ptft_jax.jobs.common import (check_labelled_splits, data_cache_root, pretrained_init,
                                  save_run_files, saved_labels)
from ptft_jax.models.flops import image_train_flops
from ptft_jax.tasks.factory import make_task
from ptft_jax.train.job import Job, Throughput


def image_split(cfg: Config, run_dir: Path, split: str, corpus: str | None, labels,
                 per_class: int):
    """(ImageExamples, class names) of one split: the source decoded into its image cache
    (process 0 builds it), filtered to data.keep_labels and, for training, data.per_class."""
    import hashlib

    d, m = cfg.data, cfg.model
    corpus = corpus or d.corpus
    source = open_images(corpus, split, d.image_column, d.label_column)
    if len(source) == 0:
        raise ValueError(f"data.corpus '{corpus}' split '{split}' holds no images.")
    root = data_cache_root(cfg, run_dir)
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
    run_dir = Path(cfg.run_dir)
    check_init_from(cfg.finetune.init_from, image_task=True)
    labels_path = run_dir / "labels.json"
    saved = saved_labels(run_dir)
    try:
        train, labels = image_split(cfg, run_dir, cfg.data.split, None, saved,
                                     cfg.data.per_class)
        evaluation = None
        if cfg.data.eval_split or cfg.data.eval_corpus:
            evaluation, _ = image_split(cfg, run_dir, cfg.data.eval_split or "train",
                                         cfg.data.eval_corpus, labels, 0)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_labelled_splits(saved, labels, labels_path, train, "image", cfg.data.corpus)
    task = make_task(cfg, labels)

    def save_files():
        save_run_files(run_dir, labels=labels)

    m = cfg.model
    describe = (f"{len(train):,} training images"
                + (f", {len(evaluation):,} eval images" if evaluation is not None else "")
                + f" of {m.image_size}x{m.image_size}x{m.channels} | {labels.num_outputs} "
                  f"classes")
    meta = {"labels": dataclasses.asdict(labels)}
    throughput = Throughput("examples", 1, image_train_flops(m, task.num_classes),
                            f"{image_train_flops(m) / 3e9:.2f} GFLOPs/image")
    return Job(cfg, task, train, lambda: describe, meta, save_files, throughput, evaluation,
               pretrained_init(cfg, None, labels.names))
