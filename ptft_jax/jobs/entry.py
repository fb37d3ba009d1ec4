"""`ptft pretrain` and `ptft finetune`: check the config before anything compiles or is
written, pick the job for its task (the data, tokenizer and task each kind of job prepares),
and run the one loop (train/loop.py) on it."""
from __future__ import annotations

from pathlib import Path

import jax

from ptft_jax.config.schema import (FINETUNE_TASKS, IMAGE_TASKS, MULTIMODAL_TASKS, Config,
                                    ConfigError, task_for)
from ptft_jax.config.validate import validate
from ptft_jax.core.mesh import initialize_distributed
from ptft_jax.jobs.images import image_job
from ptft_jax.jobs.labelled import finetune_job
from ptft_jax.jobs.lm import pretrain_job
from ptft_jax.jobs.pairs import pairs_job
from ptft_jax.train.job import Job
from ptft_jax.train.loop import run


def check_paths(cfg: Config) -> None:
    """run_dir (and data.cache_dir) must be folders this process can write, or creatable ones:
    a clear error now rather than a traceback after the tokenizer or cache was built."""
    import os
    for key, value in (("run_dir", cfg.run_dir), ("data.cache_dir", cfg.data.cache_dir)):
        if not value:
            continue
        path = Path(value)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{key} '{value}' is a file; give a folder path.")
        existing = path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"{key} '{value}' lies under '{existing}', which is a file; give "
                              f"a folder path.")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{key} '{value}' cannot be written ('{existing}' is read-only "
                              f"for this user); choose a writable folder.")


# Settings a resumed run must share with the run it resumes, or it would not continue the
# same run (other masks and dropout, another task). The data stream has its own check
# (check_data_position), and the model's shapes theirs (Checkpointer.check_shapes).


def pretrain(cfg: Config, on_eval=None) -> dict:
    initialize_distributed(cfg.distributed)
    validate(cfg, jax.device_count())
    check_paths(cfg)
    if task_for(cfg) in FINETUNE_TASKS + ("multimodal_classification",):
        raise ConfigError(f"train.task '{task_for(cfg)}' is a finetuning task: run ptft "
                          f"finetune.")
    return run(job_for(cfg), on_eval)


def finetune(cfg: Config, on_eval=None) -> dict:
    initialize_distributed(cfg.distributed)
    validate(cfg, jax.device_count())
    check_paths(cfg)
    tasks = FINETUNE_TASKS + IMAGE_TASKS + MULTIMODAL_TASKS
    if task_for(cfg) not in tasks:
        raise ConfigError(f"ptft finetune needs train.task to be one of {', '.join(tasks)} "
                          f"(got '{task_for(cfg)}').")
    return run(job_for(cfg), on_eval)


def job_for(cfg: Config) -> Job:
    task = task_for(cfg)
    if task in IMAGE_TASKS:
        return image_job(cfg)
    if task in MULTIMODAL_TASKS:
        return pairs_job(cfg)
    return finetune_job(cfg) if task in FINETUNE_TASKS else pretrain_job(cfg)
