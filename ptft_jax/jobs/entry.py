"""`ptft pretrain` and `ptft finetune`: check the config before anything compiles or is
written, pick the job for its task (the data, tokenizer and task each kind of job prepares),
and run the one loop (train/loop.py) on it."""
from __future__ import annotations

import os
from pathlib import Path

import jax

from ptft_jax.config.reading import read_yaml
from ptft_jax.config.schema import (FINETUNE_TASKS, IMAGE_TASKS, MULTIMODAL_TASKS, PRETRAIN_TASKS,
                                    Config, ConfigError)
from ptft_jax.config.resolve import task_for
from ptft_jax.config.validate import validate
from ptft_jax.core.files import (LEGACY_RUN, MARKER, check_ownable, lock_folder, release_folders,
                                 step_folders)
from ptft_jax.core.mesh import initialize_distributed
from ptft_jax.data.cache import LOCK_FILE
from ptft_jax.jobs.images import image_job
from ptft_jax.jobs.labelled import finetune_job
from ptft_jax.jobs.lm import pretrain_job
from ptft_jax.jobs.pairs import pairs_job
from ptft_jax.train.job import Job
from ptft_jax.train.loop import run


def check_paths(cfg: Config) -> None:
    """run_dir (and data.cache_dir) must be folders this process can write, or creatable ones,
    and not folders of the user's (core/files.py): a clear error now rather than a traceback
    after the tokenizer or cache was built."""
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
    if jax.process_index() != 0:  # process 0 writes these folders (and may have begun to)
        return
    if cfg.data.cache_dir and task_for(cfg) in PRETRAIN_TASKS:  # the folder is the token cache
        check_ownable(Path(cfg.data.cache_dir), "token cache", "data.cache_dir", [LOCK_FILE])
    # Taken (marked) at its first write: a job's data cache (jobs/common.data_cache_root) or
    # the training loop's run files, whichever comes first; nothing is written here.
    check_ownable(Path(cfg.run_dir), "run", "run_dir", LEGACY_RUN)
    lock_folder(Path(cfg.run_dir), "run_dir")  # if it exists; else when it is made
    check_same_kind(cfg)


def check_same_kind(cfg: Config) -> None:
    """A run directory that holds checkpoints of another kind of model is refused by name,
    before its tokenizer or data are looked at (an encoder run resumed as a decoder would
    otherwise fail on the tokenizer's special tokens)."""
    run_dir = Path(cfg.run_dir)
    if not (run_dir / "config.yaml").is_file() or not step_folders(run_dir / "checkpoints"):
        return
    saved = read_yaml(run_dir / "config.yaml", "the run's config.yaml")
    kind = (saved.get("model") or {}).get("kind")
    if kind is not None and kind != cfg.model.kind:
        raise ConfigError(f"run_dir {run_dir} holds checkpoints of model.kind {kind} and this "
                          f"config's model.kind is {cfg.model.kind}: use a new run_dir (to "
                          f"start from that run, give it as finetune.init_from).")


# What each command trains: the tasks it accepts, as data. Supervised image classification is
# both (pretrain an image component on one labelled set, finetune a new head on another), and
# contrastive alignment may continue under ptft finetune with a tower frozen.
COMMAND_TASKS = {
    "pretrain": PRETRAIN_TASKS + IMAGE_TASKS + ("contrastive",),
    "finetune": FINETUNE_TASKS + IMAGE_TASKS + MULTIMODAL_TASKS,
}
# Which job prepares each task's data, tokenizer and task object.
JOB_MAKERS = {**dict.fromkeys(PRETRAIN_TASKS, pretrain_job),
              **dict.fromkeys(FINETUNE_TASKS, finetune_job),
              **dict.fromkeys(IMAGE_TASKS, image_job),
              **dict.fromkeys(MULTIMODAL_TASKS, pairs_job)}


def train(command: str, cfg: Config, on_eval=None) -> dict:
    """`ptft pretrain` or `ptft finetune` (`command`): every check, then the one loop on the
    job for the config's task. `on_eval`: see train.loop.run."""
    initialize_distributed(cfg.distributed)
    validate(cfg, jax.device_count())
    task, allowed = task_for(cfg), COMMAND_TASKS[command]
    if task not in allowed:
        other = [c for c, tasks in COMMAND_TASKS.items() if task in tasks]
        raise ConfigError(f"ptft {command} trains train.task {', '.join(allowed)}; '{task}' "
                          f"is a task for ptft {' or '.join(other)}.")
    run_dir = Path(cfg.run_dir)
    new_run_dir = not run_dir.exists()
    try:
        check_paths(cfg)  # locks run_dir: released when the run ends
        return run(job_for(cfg), on_eval)
    except ValueError:  # a refused input (ConfigError included): no empty run_dir stays
        if new_run_dir and jax.process_index() == 0 and run_dir.is_dir() and \
                [p.name for p in run_dir.iterdir()] == [MARKER]:
            (run_dir / MARKER).unlink()
            run_dir.rmdir()
        raise
    finally:
        release_folders()


def pretrain(cfg: Config, on_eval=None) -> dict:
    return train("pretrain", cfg, on_eval)


def finetune(cfg: Config, on_eval=None) -> dict:
    return train("finetune", cfg, on_eval)


def job_for(cfg: Config) -> Job:
    return JOB_MAKERS[task_for(cfg)](cfg)
