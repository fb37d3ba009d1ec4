"""The loop's first stage: resume from the run directory's newest intact checkpoint, else
initialise (and restore a pretrained component). Everything here is checked before anything
is written to the run directory (moving a damaged step aside is the one exception: it is
never deleted)."""
from __future__ import annotations

import dataclasses
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from ptft_jax.ckpt.checkpoint import Checkpointer
from ptft_jax.ckpt.integrity import DAMAGED_DIR, CheckpointDamaged
from ptft_jax.config.schema import Config, ConfigError
from ptft_jax.config.resolve import task_for
from ptft_jax.core.state import TrainState
from ptft_jax.data.loader import BatchLoader
from ptft_jax.train.engine import Engine, build
from ptft_jax.train.job import Job
from ptft_jax.train.optim import hyperparams, set_hyperparams

# Settings a resumed run must share with the run it resumes, or it would not continue the
# same run (other masks and dropout, another task). The data stream has its own check
# (check_data_position), and the model's shapes theirs (Checkpointer.check_shapes).
RESUME_KEYS = ("train.seed", "train.task")


def check_resume_config(saved: dict, cfg: Config, saved_task: str | None = None) -> None:
    """`saved_task`: the task the run trained (its checkpoints say; train.task may be auto)."""
    now = cfg.to_dict()
    if saved_task is not None and saved_task != task_for(cfg):
        raise ConfigError(f"{cfg.run_dir} holds a {saved_task} run and this config trains "
                          f"{task_for(cfg)}: use a new run_dir (to start from that run, give it "
                          f"as finetune.init_from).")

    def get(tree, dotted):
        for part in dotted.split("."):
            tree = (tree or {}).get(part)
        return tree
    for key in RESUME_KEYS:
        if key == "train.task" and saved_task is not None:
            continue  # compared above, as tasks (auto resolves to one)
        before, after = get(saved, key), get(now, key)
        if before is not None and before != after:
            raise ConfigError(f"{key} was {before!r} in this run directory and is {after!r} "
                              f"now: a resume must keep it (exact resume). Set {key}={before!r}, "
                              f"or use a new run_dir.")
    before, after = get(saved, "optim.clip_norm"), cfg.optim.clip_norm
    if before is not None and (before == 0) != (after == 0):
        raise ConfigError(f"optim.clip_norm was {before} in this run directory and is {after} "
                          f"now: turning clipping on or off changes the optimizer state's "
                          f"structure. Keep it {'0' if before == 0 else 'non-zero'}, or use a "
                          f"new run_dir.")


def changed_settings(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """'key: before -> now' for each setting a resumed run changes (those that break exact
    resume are refused above; the others, a new LR say, are the user's to make, and said)."""
    changes = []
    for key in sorted(set(saved) | set(now)):
        before, after = saved.get(key), now.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += changed_settings(before, after, f"{prefix}{key}.")
        elif before != after:
            changes.append(f"{prefix}{key}: {before!r} -> {after!r}")
    return changes


def check_data_position(meta: dict, loader: BatchLoader) -> None:
    """Exact resume needs the same rows in the same order: same seed, same number of rows per
    epoch, same global batch. Anything else would silently replay or skip data."""
    saved = meta.get("data", {})
    now = loader.position(int(meta["step"]))
    for key in ("seed", "rows_per_epoch", "samples_seen"):
        if key in saved and saved[key] != now[key]:
            raise ConfigError(
                f"The checkpoint was reading a different data stream ({key}: {saved[key]} "
                f"then, {now[key]} now): the corpus, data.seq_len, data.packing, "
                f"data.shuffle_seed or train.global_batch changed. Restore them to resume "
                f"exactly, or start a new run_dir.")


@dataclasses.dataclass
class Progress:
    """What the loop knows beyond the state, saved in every checkpoint's metadata: the
    unfreezing phase and the eval metric's history (for early stopping and adaptive
    unfreezing)."""
    phase: int = 0
    best: float | None = None
    best_step: int | None = None
    since_best: int = 0  # evaluations without improvement (reset when a phase begins)
    plateau: dict | None = None  # optim.schedule plateau: reduce-on-plateau's state

    def improved(self, value: float, mode: str) -> bool:
        if self.best is None or (value > self.best if mode == "max" else value < self.best):
            self.best, self.since_best = value, 0
            return True
        self.since_best += 1
        return False


@dataclasses.dataclass
class Start:
    """Where training starts: step 0 and a fresh (or pretrained) state, or a checkpoint."""
    step: int
    meta: dict  # the checkpoint's metadata ({} for a fresh run)
    progress: Progress
    engine: Engine
    state: TrainState
    init_report: list  # what a pretrained initialisation loaded, for the log


def restore_newest_intact(ckpt: Checkpointer, cfg: Config, task):
    """(step, meta, progress, engine, state) of the run directory's newest intact checkpoint,
    or None for a fresh run. A damaged step (missing items, unreadable, failed checksums) is
    moved aside with a warning that names it and the fault, and the next older one is tried;
    a checkpoint that does not fit the config is the user's to fix, and raises."""
    while (step := ckpt.latest_step()) is not None:
        fault = None
        try:
            meta = ckpt.read_meta(step)
            check_resume_config(meta.get("config", {}), cfg, meta.get("task"))
            try:
                progress = Progress(**(meta.get("progress") or {}))
            except TypeError:
                raise CheckpointDamaged(ckpt.step_dir(step), "its metadata has a progress "
                                        "record of the wrong shape") from None
            try:
                engine = build(cfg, task, phase=progress.phase)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            state, meta = ckpt.restore(step, engine.restore_target())
        except CheckpointDamaged as e:
            fault = e.fault
        if jax.process_count() > 1:  # damage one process saw is damage for all
            faults = multihost_utils.process_allgather(np.int32(fault is not None))
            if faults.any() and fault is None:
                fault = "damaged as read by another process"
        if fault is None:
            return step, meta, progress, engine, state
        where = ckpt.move_aside(step, fault)
        if jax.process_index() == 0:
            print(f"warning: checkpoint step {step} is damaged ({fault}); moved it to {where} "
                  f"and falling back to the previous step.", file=sys.stderr, flush=True)
    damaged = ckpt.directory.parent / DAMAGED_DIR
    if damaged.is_dir() and any(damaged.iterdir()):
        raise ConfigError(f"{ckpt.directory.parent} holds no intact checkpoint: every step is "
                          f"damaged and was moved to {damaged}. Nothing was started. Check them "
                          f"with `ptft checkpoints verify {ckpt.directory.parent}`; use a new "
                          f"run_dir, or move {damaged} away to start this one afresh.")
    return None


def resume_or_init(job: Job, ckpt: Checkpointer, init_key) -> Start:
    cfg, t = job.cfg, job.cfg.train
    resumed = restore_newest_intact(ckpt, cfg, job.task)
    if resumed:
        step, meta, progress, engine, state = resumed
        # The optimizer's hyperparameters are this config's (a resumed run may lower the LR,
        # say); the plateau scale is the run's own and stays.
        state = state.replace(opt_state=set_hyperparams(state.opt_state, {
            k: v for k, v in hyperparams(cfg.optim, t.steps).items() if k != "lr_scale"}))
        if step >= t.steps:
            raise ConfigError(f"{cfg.run_dir} already holds a checkpoint at step {step}, at or "
                              f"past train.steps={t.steps}: nothing to do. Raise train.steps "
                              f"to continue training, or use a new run_dir.")
        return Start(step, meta, progress, engine, state, [])
    if ckpt.interrupted_saves and jax.process_index() == 0:
        print(f"note: {ckpt.directory} held no finished checkpoint, only an interrupted save "
              f"of step {ckpt.interrupted_saves[-1]} (removed); training starts at step 0.",
              file=sys.stderr, flush=True)
    try:
        engine = build(cfg, job.task, phase=0)
        state, report = engine.init(init_key), []
        if job.init_from is not None:
            state, report = job.init_from(engine, state)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Start(0, {}, Progress(), engine, state, report)
