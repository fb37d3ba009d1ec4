"""The one training loop, for every task, in stages: resume or initialise (train/resume.py),
open the run directory, compile, then per step: train, log, evaluate and decide (early stop,
plateau LR, adaptive unfreezing), save; and a final report.

`ptft pretrain` and `ptft finetune` are this loop with different jobs (jobs/); the loop knows
no task family: each job says what its throughput counts and what a row costs. Everything
that can be wrong with the inputs is checked before the first compile and before anything is
written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
import yaml

from ptft_jax.ckpt import integrity
from ptft_jax.ckpt.checkpoint import (BestCheckpointer, Checkpointer, CheckpointSaveFailed,
                                      committed_steps)
from ptft_jax.ckpt.integrity import StateNotFinite
from ptft_jax.core.files import LEGACY_RUN, atomic_write_text, claim_folder
from ptft_jax.data.loader import BatchLoader, prefetch
from ptft_jax.tasks.base import add_sums
from ptft_jax.tasks.metrics import eval_metric
from ptft_jax.config.resolve import prune_end
from ptft_jax.train import peak
from ptft_jax.train.evaluate import evaluate
from ptft_jax.train.job import Job
from ptft_jax.train.log import MetricsWriter
from ptft_jax.train.optim import get_hyperparam, plateau_step, set_hyperparams
from ptft_jax.train.plan import phase_at_step
from ptft_jax.train.prune import pruned_share
from ptft_jax.train.resume import (Start, changed_settings, check_data_position,
                                   resume_or_init)
from ptft_jax.train.safety import DivergenceGuard, SaveClock, StopOnSignal


class IntervalClock:
    """Seconds of the current log interval spent on steps: wall time less the pauses
    (compiling, evaluating, saving), which are no step's time."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.started, self.paused = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def pause(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - t0

    def step_seconds(self) -> float:
        return time.perf_counter() - self.started - self.paused


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


class Training:
    """One run after its start is known. What the stages share (engine, state, progress,
    the writers) lives here; each method is one stage of the loop."""

    def __init__(self, job: Job, ckpt: Checkpointer, start: Start,
                 metric: tuple[str, str] | None, train_key):
        cfg = job.cfg
        self.job, self.cfg, self.task, self.ckpt, self.train_key = \
            job, cfg, job.task, ckpt, train_key
        self.engine, self.state, self.progress = start.engine, start.state, start.progress
        self.start_step = self.step = start.step
        self.resumed_config = start.meta.get("config") or {}
        self.metric, self.mode = metric or (None, None)
        self.compiled, self.compile_seconds = None, 0.0
        self.pending, self.last, self.last_eval = [], {}, {}
        self.stop_reason: str | None = None
        self.guard = DivergenceGuard(cfg)
        self.save_clock = SaveClock(cfg.checkpoint.every_minutes)
        self.interval = IntervalClock()
        # MFU counts only FLOPs that are computed: a frozen backbone skips most of them, so
        # it is reported for pretraining and full finetuning only.
        plan = self.engine.plan
        all_train = len(plan.trainable) == len(jax.tree.leaves(self.engine.abstract.params)) \
            and not plan.grad_masks
        self.flops_per_unit = job.throughput.flops_per_unit if all_train else None
        self.open_run_directory(start)
        self.log_header(start.init_report)

    # -- stage: open the run directory (every check has passed) -------------------------------
    def open_run_directory(self, start: Start) -> None:
        cfg, job, t = self.cfg, self.job, self.cfg.train
        run_dir = Path(cfg.run_dir)
        if jax.process_index() == 0:  # checked before anything was written (jobs/entry.py)
            claim_folder(run_dir, "run", "run_dir", LEGACY_RUN)
        job.save_files()
        self.loader = BatchLoader(job.train_rows, t.global_batch, cfg.data.shuffle_seed,
                                  self.engine.rows)
        if self.step:
            check_data_position(start.meta, self.loader)
            self.state = self.engine.place(self.state)
        if jax.process_index() == 0:  # the config this run trains with
            atomic_write_text(run_dir / "config.yaml",
                              yaml.safe_dump((job.written_cfg or cfg).to_dict(), sort_keys=False))
        self.best = None if self.metric is None else \
            BestCheckpointer(run_dir / "best", self.metric, self.mode)
        # The MFU reference, timed before the input thread starts so nothing competes with it.
        self.reference = peak.MfuReference()
        self.batches = prefetch((self.engine.to_device(self.loader.batch(s))
                                 for s in range(self.step, t.steps)), cfg.data.prefetch)
        self.writer = MetricsWriter(run_dir, t.steps, self.step, jax.process_index() == 0,
                                    t.progress)

    def log_header(self, init_report: list) -> None:
        cfg, m, plan = self.cfg, self.cfg.model, self.engine.plan
        self.writer.info(f"{self.task.name} | {m.kind} {m.preset or ''} "
                         f"{self.job.throughput.size} | {self.job.describe()} | "
                         f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
                         f"{cfg.mesh.parallelism} | run dir {Path(cfg.run_dir)}"
                         + (f" | resumed at step {self.step}" if self.step else ""))
        for line in [*init_report, *plan.report]:
            self.writer.info(f"  {line}")
        rows = len(self.loader.source)
        if rows < cfg.train.global_batch:
            self.writer.info(f"  warning: the training data has {rows} rows, fewer than "
                             f"train.global_batch={cfg.train.global_batch}: each batch repeats "
                             f"rows (lower train.global_batch, or give more data)")
        changes = changed_settings(self.resumed_config, cfg.to_dict()) if self.step else []
        if changes:
            self.writer.info(f"  resumed with {len(changes)} changed setting(s): "
                             + "; ".join(changes[:8]) + (" ..." if len(changes) > 8 else ""))

    # -- stage: build the step for a phase -----------------------------------------------------
    def compile(self) -> float:
        """Compiles the step for the current engine (phase); seconds, 0 if it was reused."""
        engine, reused = self.engine, self.engine.step_fn._compiled is not None
        with self.interval.pause():
            t0 = time.perf_counter()
            self.compiled = engine.step_fn.compile(self.state, self.batch, self.train_key)
            seconds = time.perf_counter() - t0
        if reused:
            self.writer.info("compiled step reused (an earlier run in this process compiled it)")
            return 0.0
        plan = engine.plan
        self.writer.info(f"compile {seconds:.1f}s (phase {plan.phase + 1} of "
                         f"{plan.num_phases})" if plan.num_phases > 1 else
                         f"compile {seconds:.1f}s | MFU against "
                         f"{self.reference.flops / 1e12:.2f} TFLOP/s ({self.reference.source})")
        return seconds

    def enter_phase(self, phase: int) -> None:
        """A new unfreezing phase: a new trainable set, compiled before its first step."""
        self.progress.phase = phase
        self.engine, self.state = self.engine.for_phase(phase, self.state)
        self.compiled = None
        for line in self.engine.plan.report:
            self.writer.info(f"  {line}")

    # -- stage: the step loop ------------------------------------------------------------------
    def compile_first(self) -> None:
        self.batch = next(self.batches)
        self.compile_seconds = self.compile()
        self.interval.restart()

    def train(self, stop: StopOnSignal, on_eval) -> None:
        t = self.cfg.train
        while self.step < t.steps:
            if self.cfg.finetune.unfreeze == "gradual" and \
                    phase_at_step(self.cfg, self.step) != self.progress.phase:
                self.enter_phase(phase_at_step(self.cfg, self.step))
            if self.compiled is None:
                self.compile()
            self.state, metrics = self.compiled(self.state, self.batch, self.train_key)
            self.step += 1
            self.pending.append(metrics)
            self.guard.add(self.step, metrics)
            self.writer.advance()
            at_log = self.step % t.log_every == 0 or self.step == t.steps
            will_save = self.ckpt.should_save(self.step) or self.step == t.steps or \
                self.save_clock.due(at_log)
            stopping = stop.agreed(check_all_processes=at_log)
            if (at_log or will_save or stopping) and self.diverged():
                break
            if at_log:
                self.log_interval()
            if self.at_eval():
                self.stop_reason = self.evaluate_and_decide(on_eval)
            if at_log:
                self.interval.restart()
            if will_save or stopping or self.stop_reason:
                if self.diverged():  # steps since the last check (early stopping)
                    break
                # Never a state the guard is still unsure of, nor one that is not finite.
                if not self.guard.suspect and not self.save():
                    break
            if stopping:
                self.writer.info(f"Stopped by {stop.signal_name}: " + (
                    f"saved step {self.step}" if not self.guard.suspect else
                    f"step {self.step} not saved, its last steps were skipped as non-finite "
                    f"(the newest checkpoint is the last good state)")
                    + ". Run the same command to resume.")
                break
            if self.stop_reason:
                self.writer.info(self.stop_reason)
                break
            if self.step < t.steps:
                self.batch = next(self.batches)

    def diverged(self) -> bool:
        """Whether the run has diverged: the guard's verdict on the steps not checked yet, or
        an earlier one (a non-finite evaluation or state)."""
        reason = self.guard.check()
        if reason:
            self.stop_reason = reason
        return bool(self.stop_reason and self.stop_reason.startswith("diverged"))

    def at_eval(self) -> bool:
        every = self.cfg.eval.every
        return self.metric is not None and (self.step == self.cfg.train.steps or
                                            bool(every and self.step % every == 0))

    # -- stage: log an interval ----------------------------------------------------------------
    def log_interval(self) -> None:
        values = [self.engine.host_state(v) for v in jax.device_get(self.pending)]  # waits
        self.pending = []
        seconds = self.interval.step_seconds()
        good = [v for v in values if not np.max(v["skipped"])]
        sums = None
        for v in good:  # skipped steps' sums are not finite: left out, counted
            sums = add_sums(sums, v["sums"])
        last = self.task.metrics(sums) if sums is not None else {}
        last = {k: v for k, v in last.items() if np.isscalar(v)}
        if len(good) < len(values):
            last["skipped_steps"] = len(values) - len(good)
        tp, rows = self.job.throughput, len(values) * self.cfg.train.global_batch
        units_per_s = rows * tp.units_per_row / seconds
        if tp.unit == "tokens":
            last.update(tokens_per_s=units_per_s,
                        tokens_per_s_per_device=units_per_s / jax.device_count())
        last.update(grad_norm=float(np.mean([v["grad_norm"] for v in good]))
                    if good else float("nan"),
                    learning_rate=float(values[-1]["learning_rate"]),
                    step_time_s=seconds / len(values), examples_per_s=rows / seconds)
        if self.flops_per_unit is not None:
            last["mfu"] = self.reference.mfu(units_per_s, self.flops_per_unit)
            if self.reference.too_low:
                last["mfu_ceiling_too_low"] = True
                warning = self.reference.warning_once(last["mfu"])
                if warning:
                    self.writer.info(warning)
        self.last = last
        self.writer.write(self.step, last, shown=[*self.task.shown, "learning_rate",
                                                  "step_time_s", f"{tp.unit}_per_s", "mfu",
                                                  "skipped_steps"])

    # -- stage: evaluate and decide ------------------------------------------------------------
    def evaluate_and_decide(self, on_eval) -> str | None:
        """Evaluates, keeps the best checkpoint, then decides: plateau LR, adaptive
        unfreezing, early stopping, or `on_eval`'s stop. The stop reason, or None."""
        if self.diverged():  # the guard's verdict first: the state may be one that diverges
            return self.stop_reason
        with self.interval.pause():  # not part of any step's time
            self.last_eval = self.evaluate()
        if self.diverged():
            return self.stop_reason
        with self.interval.pause():
            self.adjust_plateau(float(self.last_eval[self.metric]))
        p, f = self.progress, self.cfg.finetune
        phases_left = p.phase < self.engine.plan.num_phases - 1
        reason = None
        if f.unfreeze == "adaptive" and phases_left and p.since_best >= f.unfreeze_patience:
            self.writer.info(f"{self.metric} has not improved for {f.unfreeze_patience} "
                             f"evaluation(s): unfreezing")
            p.since_best = 0
            self.enter_phase(p.phase + 1)
        elif self.cfg.eval.early_stopping and not phases_left and \
                p.since_best >= self.cfg.eval.early_stopping:
            reason = (f"early stopping: {self.metric} has not improved for "
                      f"{self.cfg.eval.early_stopping} evaluations (best {p.best:.4g} at step "
                      f"{p.best_step})")
        if on_eval is not None and reason is None:
            reason = on_eval(self.step, self.last_eval)
        return reason

    def at_final_sparsity(self) -> bool:
        """Whether the model is pruned as asked (finetune.prune_sparsity reached at
        prune_end): before that, an evaluation is not a candidate for best/ (nor counts
        towards early stopping), which eval, predict and export read."""
        return not self.cfg.finetune.prune_sparsity or self.step >= prune_end(self.cfg)

    def evaluate(self) -> dict:
        cfg = self.cfg
        values = evaluate(self.engine, self.state, self.job.eval_examples, cfg.eval.batch_size,
                          progress=cfg.train.progress and jax.process_index() == 0)
        self.writer.write(self.step, {f"eval/{k}": v for k, v in values.items()},
                          shown=[f"eval/{k}" for k in self.task.eval_shown])
        nonfinite = [k for k, v in values.items() if np.isscalar(v) and not np.isfinite(v)]
        if nonfinite:  # the model's outputs overflow: a diverged state, never the best
            self.stop_reason = (f"diverged: eval/{nonfinite[0]} is {values[nonfinite[0]]} at "
                                f"step {self.step} (the model's outputs overflow); nothing "
                                f"was saved from this step on")
        elif self.at_final_sparsity() and \
                self.progress.improved(float(values[self.metric]), self.mode):
            self.progress.best_step = self.step
            try:
                self.best.save(self.step, self.engine.host_state(self.state),
                               {"config": cfg.to_dict(), **self.job.meta, "step": self.step},
                               values)
            except StateNotFinite as e:
                self.stop_reason = f"diverged: {e}"
        return values

    def adjust_plateau(self, value: float) -> None:
        """optim.schedule plateau: the LR scale lives in the optimizer state."""
        if self.cfg.optim.schedule != "plateau":
            return
        self.progress.plateau, scale = plateau_step(self.cfg.optim, self.progress.plateau,
                                                    value, self.mode)
        opt_state = self.state.opt_state
        if scale != get_hyperparam(opt_state, "lr_scale"):
            self.state = self.state.replace(
                opt_state=set_hyperparams(opt_state, {"lr_scale": scale}))
            self.writer.info(f"{self.metric} has plateaued: the LR is now {scale:g} x the "
                             f"schedule's")

    # -- stage: save ---------------------------------------------------------------------------
    def save(self) -> bool:
        """Saves the step; False (the run stops as diverged, nothing written) if its state
        holds a NaN or inf."""
        with self.interval.pause():  # checksums and the save's start: not a step
            meta = {"config": self.cfg.to_dict(), "data": self.loader.position(self.step),
                    "task": self.task.name, "progress": dataclasses.asdict(self.progress),
                    **self.job.meta}
            try:
                self.ckpt.save(self.step, self.engine.host_state(self.state), meta)
            except StateNotFinite as e:
                self.stop_reason = f"diverged: {e}"
                return False
        self.save_clock.saved()
        return True

    def check_best(self, last_saved: int | None) -> None:
        """best/ read back and verified once training is over (eval, predict and export read
        it): a damaged one is moved aside, saying what they will read instead."""
        for step, fault, target in integrity.move_aside_damaged(Path(self.cfg.run_dir) / "best"):
            self.writer.info(
                f"warning: the best checkpoint (step {step}) is damaged ({fault}); moved it to "
                f"{target}. eval, predict and export will read " +
                (f"the newest intact step of checkpoints/ (step {last_saved}) instead."
                 if last_saved is not None else "nothing: no other step was saved; train "
                 "again to write one."))

    # -- stage: final report -------------------------------------------------------------------
    def finish(self, stop: StopOnSignal) -> dict:
        diverged = bool(self.stop_reason and self.stop_reason.startswith("diverged"))
        if diverged:
            kept = self.ckpt.latest_step()
            self.writer.info(f"{self.stop_reason}. " + (
                f"The last checkpoint (step {kept}) is intact: lower optim.learning_rate (or "
                f"raise optim.warmup_steps) and run the same command to resume from it."
                if kept else "No checkpoint had been saved yet: lower optim.learning_rate (or "
                "raise optim.warmup_steps) and start again."))
        with abandon_on_save_failure(self.ckpt, self.best, self.writer):
            self.ckpt.close()  # waits for the last save: a failure surfaces here
        last_saved = (committed_steps(self.ckpt.directory) or [None])[-1]
        if self.best is not None:
            self.best.close()
            # Read back on one host only: under jax.distributed, Orbax's read is a collective
            # that the other processes, gone to shut down, never join (a hang, then an abort
            # at the shutdown barrier). Inference verifies best/ when it reads it anyway.
            if jax.process_count() == 1:
                self.check_best(last_saved)
        self.writer.close()
        p = self.progress
        return {"run_dir": str(Path(self.cfg.run_dir)), "steps": self.step,
                "start_step": self.start_step, "stopped_by_signal": stop.signal_name,
                "stop_reason": self.stop_reason,
                "compile_seconds": self.compile_seconds, "peak_flops": self.reference.flops,
                "flops_per_unit": self.flops_per_unit, "phase": p.phase, "best": p.best,
                "best_step": p.best_step, "metric": self.metric, "diverged": diverged,
                "last_saved_step": last_saved, "pruned": pruned_share(self.state.opt_state),
                **self.last,
                **{f"eval/{k}": v for k, v in self.last_eval.items()}}


def run(job: Job, on_eval=None) -> dict:
    """Trains `job` to train.steps (or a stop). `on_eval(step, metrics)` is called after each
    evaluation; a string it returns stops the run there, saved, with that reason."""
    cfg = job.cfg
    ckpt = Checkpointer(Path(cfg.run_dir) / "checkpoints", cfg.checkpoint.every,
                        cfg.checkpoint.keep, cfg.checkpoint.async_save)
    init_key, train_key = jax.random.split(jax.random.key(cfg.train.seed))
    try:  # nothing is written to the run directory until these checks have passed
        start = resume_or_init(job, ckpt, init_key)
        metric = eval_metric(cfg, job.task) if job.eval_examples is not None else None
    except BaseException:
        ckpt.close()
        raise
    training = Training(job, ckpt, start, metric, train_key)
    training.compile_first()
    with StopOnSignal() as stop, abandon_on_save_failure(ckpt, training.best, training.writer):
        training.train(stop, on_eval)
    return training.finish(stop)
