"""The one training loop, for every task: config -> job -> engine -> state -> steps, with
evaluation, early stopping, unfreezing phases and checkpoints.

`ptft pretrain` and `ptft finetune` are this loop with different jobs (jobs/). Resume order:
the run directory's own checkpoint, else `finetune.init_from`, else a fresh initialisation.
Everything that can be wrong with the inputs is checked before the first compile and before
anything is written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from pathlib import Path

import jax
import numpy as np
import yaml
from jax.experimental import multihost_utils

from ptft_jax.ckpt.checkpoint import (BestCheckpointer, Checkpointer, CheckpointSaveFailed,
                                      committed_steps)
from ptft_jax.ckpt.integrity import DAMAGED_DIR, CheckpointDamaged
from ptft_jax.config.schema import (FINETUNE_TASKS, IMAGE_KINDS, MULTIMODAL_KINDS, Config,
                                    ConfigError, task_for)
from ptft_jax.data.loader import BatchLoader, prefetch
from ptft_jax.models.flops import image_train_flops, matmul_params, train_flops_per_token
from ptft_jax.tasks.base import add_sums
from ptft_jax.tasks.metrics import metric_mode
from ptft_jax.train import peak
from ptft_jax.train.engine import build
from ptft_jax.train.evaluate import evaluate
from ptft_jax.train.job import Job
from ptft_jax.train.log import MetricsWriter
from ptft_jax.train.optim import get_hyperparam, hyperparams, plateau_step, set_hyperparams
from ptft_jax.train.plan import phase_at_step
from ptft_jax.train.safety import DivergenceGuard, SaveClock, StopOnSignal

log = logging.getLogger(__name__)


RESUME_KEYS = ("train.seed", "train.task")


def check_resume_config(saved: dict, cfg: Config) -> None:
    now = cfg.to_dict()

    def get(tree, dotted):
        for part in dotted.split("."):
            tree = (tree or {}).get(part)
        return tree
    for key in RESUME_KEYS:
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


def eval_metric(cfg: Config, task) -> tuple[str, str]:
    name = cfg.eval.metric if cfg.eval.metric != "auto" else task.default_metric
    try:
        return name, metric_mode(name)
    except ValueError as e:
        raise ConfigError(f"eval.metric: {e}") from None


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


def restore_newest_intact(ckpt: Checkpointer, cfg: Config, task):
    """(step, meta, progress, engine, state) of the run directory's newest intact checkpoint,
    or None for a fresh run. A damaged step (missing items, unreadable, failed checksums) is
    moved aside with a warning that names it and the fault, and the next older one is tried;
    a checkpoint that does not fit the config is the user's to fix, and raises."""
    while (step := ckpt.latest_step()) is not None:
        fault = None
        try:
            meta = ckpt.read_meta(step)
            check_resume_config(meta.get("config", {}), cfg)
            progress = Progress(**meta.get("progress", {}))
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


@contextlib.contextmanager
def abandon_on_save_failure(ckpt, best, writer):
    """A save that fails stops the run: what was saved before stays as it is, the other
    writers are closed, and the error goes up to the command (one line, exit code 4)."""
    try:
        yield
    except CheckpointSaveFailed as e:
        writer.info(f"error: {e}")
        for closer in (ckpt.close, *([best.close] if best is not None else []), writer.close):
            try:
                closer()
            except Exception:  # the failure is already being reported
                pass
        raise


def run(job: Job, on_eval=None) -> dict:
    """Trains `job` to train.steps (or a stop). `on_eval(step, metrics)` is called after each
    evaluation; a string it returns stops the run there, saved, with that reason."""
    cfg, task = job.cfg, job.task
    is_main = jax.process_index() == 0
    run_dir = Path(cfg.run_dir)
    t, B = cfg.train, cfg.train.global_batch

    # Resume from the run directory's newest intact checkpoint, else initialise (and restore
    # a pretrained component). Nothing is written to the run directory until every check here
    # has passed (moving a damaged step aside is the one exception: it is never deleted).
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.every, cfg.checkpoint.keep,
                        cfg.checkpoint.async_save)
    init_key, train_key = jax.random.split(jax.random.key(t.seed))
    init_report: list = []
    try:
        resumed = restore_newest_intact(ckpt, cfg, task)
        if resumed:
            start_step, meta, progress, engine, state = resumed
            # The optimizer's hyperparameters are this config's (a resumed run may lower the
            # LR, say); the plateau scale is the run's own and stays.
            state = state.replace(opt_state=set_hyperparams(state.opt_state, {
                k: v for k, v in hyperparams(cfg.optim, t.steps).items() if k != "lr_scale"}))
            if start_step >= t.steps:
                raise ConfigError(f"{run_dir} already holds a checkpoint at step {start_step}, "
                                  f"at or past train.steps={t.steps}: nothing to do. Raise "
                                  f"train.steps to continue training, or use a new run_dir.")
        else:
            start_step, meta, progress = 0, {}, Progress()
            try:
                engine = build(cfg, task, phase=progress.phase)
                state = engine.init(init_key)
                if job.init_from is not None:
                    state, init_report = job.init_from(engine, state)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        finetuning = task_for(cfg) in FINETUNE_TASKS
        evaluating = job.eval_examples is not None
        metric, mode = eval_metric(cfg, task) if evaluating else (None, None)
    except BaseException:
        ckpt.close()
        raise
    job.save_files()
    loader = BatchLoader(job.train_rows, B, cfg.data.shuffle_seed, engine.rows)
    if start_step:
        check_data_position(meta, loader)
        state = engine.place(state)
    if is_main:  # every check has passed: the config this run trains with
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    best = BestCheckpointer(run_dir / "best", metric, mode) if evaluating else None

    # The MFU reference, timed before the input thread starts so nothing competes with it.
    reference = peak.MfuReference()
    batches = prefetch((engine.to_device(loader.batch(s)) for s in range(start_step, t.steps)),
                       cfg.data.prefetch)
    writer = MetricsWriter(run_dir, t.steps, start_step, is_main, t.progress)
    images = cfg.model.kind in IMAGE_KINDS + MULTIMODAL_KINDS  # throughput in examples/s
    size = (f"{job.flops_per_row / 3e9:.2f} GFLOPs/pair (forward)" if job.flops_per_row else
            f"{image_train_flops(cfg.model) / 3e9:.2f} GFLOPs/image" if images else
            f"{matmul_params(cfg.model) / 1e6:.2f}M matmul params")
    writer.info(f"{task.name} | {cfg.model.kind} {cfg.model.preset or ''} "
                f"{size} | {job.describe()} | "
                f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
                f"{cfg.mesh.parallelism} | run dir {run_dir}"
                + (f" | resumed at step {start_step}" if start_step else ""))
    for line in [*init_report, *engine.plan.report]:
        writer.info(f"  {line}")
    # MFU counts only FLOPs that are computed: a frozen backbone skips most of them, so it is
    # reported for pretraining and full finetuning only.
    all_train = len(engine.plan.trainable) == len(jax.tree.leaves(engine.abstract.params)) \
        and not engine.plan.grad_masks
    # Images: a "token" is an image (tokens_per_row = 1), so tokens_per_s is images/s.
    flops_per_token = None if not all_train else job.flops_per_row if job.flops_per_row else \
        image_train_flops(cfg.model, task.num_classes) if images else \
        train_flops_per_token(
            cfg.model, job.tokens_per_row, vocab_projection=not finetuning,
            predicted_positions=task.predicted_positions(job.tokens_per_row))

    paused = [0.0]  # seconds of the current log interval spent evaluating or compiling

    def compile_step(engine, state, batch):
        t0, reused = time.perf_counter(), engine.step_fn._compiled is not None
        compiled = engine.step_fn.compile(state, batch, train_key)
        seconds = time.perf_counter() - t0
        paused[0] += seconds
        if reused:
            writer.info("compiled step reused (an earlier run in this process compiled it)")
            return compiled, 0.0
        writer.info(f"compile {seconds:.1f}s (phase {engine.plan.phase + 1} of "
                    f"{engine.plan.num_phases})" if engine.plan.num_phases > 1 else
                    f"compile {seconds:.1f}s | MFU against {reference.flops / 1e12:.2f} "
                    f"TFLOP/s ({reference.source})")
        return compiled, seconds

    first = next(batches, None)
    compiled, compile_seconds = compile_step(engine, state, first)
    paused[0] = 0.0

    def save(step):
        t_save = time.perf_counter()
        meta = {"config": cfg.to_dict(), "data": loader.position(step), "task": task.name,
                "progress": dataclasses.asdict(progress), **job.meta}
        ckpt.save(step, engine.host_state(state), meta)
        paused[0] += time.perf_counter() - t_save  # checksums and the save's start: not a step

    def run_eval(step) -> dict:
        values = evaluate(engine, state, job.eval_examples, cfg.eval.batch_size,
                          progress=t.progress and is_main)
        writer.write(step, {f"eval/{k}": v for k, v in values.items()},
                     shown=[f"eval/{k}" for k in task.eval_shown])
        if progress.improved(float(values[metric]), mode):
            progress.best_step = step
            best.save(step, engine.host_state(state), {"config": cfg.to_dict(), **job.meta,
                                                        "step": step}, values)
        return values

    pending: list = []
    guard = DivergenceGuard(cfg)
    clock = SaveClock(cfg.checkpoint.every_minutes)
    last: dict = {}
    last_eval: dict = {}
    stop_reason = None
    step = start_step
    interval_start = time.perf_counter()
    batch = first
    with StopOnSignal() as stop, abandon_on_save_failure(ckpt, best, writer):
        while step < t.steps:
            # Gradual unfreezing: a new phase is a new trainable set, compiled once.
            if cfg.finetune.unfreeze == "gradual" and phase_at_step(cfg, step) != progress.phase:
                progress.phase = phase_at_step(cfg, step)
                engine, state = engine.for_phase(progress.phase, state)
                compiled, _ = compile_step(engine, state, batch)
                for line in engine.plan.report:
                    writer.info(f"  {line}")
            state, metrics = compiled(state, batch, train_key)
            step += 1
            pending.append(metrics)
            guard.add(step, metrics)
            writer.advance()
            at_log = step % t.log_every == 0 or step == t.steps
            will_save = ckpt.should_save(step) or step == t.steps or clock.due(at_log)
            stopping = stop.agreed(check_all_processes=at_log)
            if at_log or will_save or stopping:
                diverged = guard.check()
                if diverged:
                    stop_reason = diverged
                    break
            if at_log:
                values = [engine.host_state(v) for v in jax.device_get(pending)]  # waits
                elapsed = time.perf_counter() - interval_start - paused[0]
                sums = None
                good = [v for v in values if not np.max(v["skipped"])]
                for v in good:  # skipped steps' sums are not finite: left out, counted
                    sums = add_sums(sums, v["sums"])
                last = task.metrics(sums) if sums is not None else {}
                last = {k: v for k, v in last.items() if np.isscalar(v)}
                if len(good) < len(values):
                    last["skipped_steps"] = len(values) - len(good)
                tokens_per_s = len(values) * B * job.tokens_per_row / elapsed
                if images:  # a token would be an image: images/s is examples_per_s
                    last.update(examples_per_s=len(values) * B / elapsed)
                else:
                    last.update(tokens_per_s=tokens_per_s,
                                tokens_per_s_per_device=tokens_per_s / jax.device_count())
                last.update(grad_norm=float(np.mean([v["grad_norm"] for v in good]))
                            if good else float("nan"),
                            learning_rate=float(values[-1]["learning_rate"]),
                            step_time_s=elapsed / len(values),
                            examples_per_s=len(values) * B / elapsed)
                if flops_per_token is not None:
                    last["mfu"] = reference.mfu(tokens_per_s, flops_per_token)
                    if reference.too_low:
                        last["mfu_ceiling_too_low"] = True
                        warning = reference.warning_once(last["mfu"])
                        if warning:
                            writer.info(warning)
                writer.write(step, last, shown=[*task.shown, "learning_rate", "step_time_s",
                                                "examples_per_s" if images else "tokens_per_s",
                                                "mfu", "skipped_steps"])
                pending = []
            at_eval = evaluating and (step == t.steps or (cfg.eval.every and
                                                          step % cfg.eval.every == 0))
            if at_eval:
                t_eval = time.perf_counter()
                last_eval = run_eval(step)
                if cfg.optim.schedule == "plateau":  # the LR scale lives in the state
                    progress.plateau, scale = plateau_step(cfg.optim, progress.plateau,
                                                           float(last_eval[metric]), mode)
                    if scale != get_hyperparam(state.opt_state, "lr_scale"):
                        state = state.replace(opt_state=set_hyperparams(state.opt_state,
                                                                        {"lr_scale": scale}))
                        writer.info(f"{metric} has plateaued: the LR is now {scale:g} x the "
                                    f"schedule's")
                paused[0] += time.perf_counter() - t_eval  # not part of any step's time
                phases_left = progress.phase < engine.plan.num_phases - 1
                if cfg.finetune.unfreeze == "adaptive" and phases_left and \
                        progress.since_best >= cfg.finetune.unfreeze_patience:
                    progress.phase += 1
                    progress.since_best = 0
                    writer.info(f"{metric} has not improved for "
                                f"{cfg.finetune.unfreeze_patience} evaluation(s): unfreezing")
                    engine, state = engine.for_phase(progress.phase, state)
                    compiled = None  # compiled below, on the next batch
                    for line in engine.plan.report:
                        writer.info(f"  {line}")
                elif cfg.eval.early_stopping and not phases_left and \
                        progress.since_best >= cfg.eval.early_stopping:
                    stop_reason = (f"early stopping: {metric} has not improved for "
                                   f"{cfg.eval.early_stopping} evaluations (best "
                                   f"{progress.best:.4g} at step {progress.best_step})")
                if on_eval is not None and stop_reason is None:
                    stop_reason = on_eval(step, last_eval)
            if at_log:
                interval_start = time.perf_counter()
                paused[0] = 0.0
            if will_save or stopping or stop_reason:
                diverged = guard.check()  # steps since the last check (early stopping)
                if diverged:
                    stop_reason = diverged
                    break
                if not guard.suspect:  # never a state the guard is still unsure of
                    save(step)
                    clock.saved()
            if stopping:
                writer.info(f"Stopped by {stop.signal_name}: " + (
                    f"saved step {step}" if not guard.suspect else
                    f"step {step} not saved, its last steps were skipped as non-finite "
                    f"(the newest checkpoint is the last good state)")
                    + ". Run the same command to resume.")
                break
            if stop_reason:
                writer.info(stop_reason)
                break
            if step < t.steps:
                batch = next(batches)
                if compiled is None:
                    compiled, _ = compile_step(engine, state, batch)
    if stop_reason and stop_reason.startswith("diverged"):
        kept = ckpt.latest_step()
        writer.info(f"{stop_reason}. " + (f"The last checkpoint (step {kept}) is intact: lower "
                                          f"optim.learning_rate (or raise optim.warmup_steps) "
                                          f"and run the same command to resume from it."
                                          if kept else "No checkpoint had been saved yet: "
                                          "lower optim.learning_rate (or raise "
                                          "optim.warmup_steps) and start again."))
    with abandon_on_save_failure(ckpt, best, writer):
        ckpt.close()  # waits for the last save: a failure surfaces here
    last_saved = (committed_steps(ckpt.directory) or [None])[-1]
    if best is not None:
        best.close()
    writer.close()
    return {"run_dir": str(run_dir), "steps": step, "start_step": start_step,
            "stopped_by_signal": stop.signal_name, "stop_reason": stop_reason,
            "compile_seconds": compile_seconds, "peak_flops": reference.flops,
            "flops_per_token": flops_per_token, "phase": progress.phase,
            "best": progress.best, "best_step": progress.best_step, "metric": metric,
            "diverged": bool(stop_reason and stop_reason.startswith("diverged")),
            "last_saved_step": last_saved,
            **last, **{f"eval/{k}": v for k, v in last_eval.items()}}
