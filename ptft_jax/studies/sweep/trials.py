"""`ptft sweep`'s trials: each one an ordinary run (its own run directory and status file),
run by one or more workers sharing the study; trials of a killed worker are requeued, and a
finished study writes its report. study.py prepares the sweep and opens the study."""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

from ptft_jax.config.schema import ConfigError
from ptft_jax.core.files import atomic_write_text
from ptft_jax.jobs import entry
from ptft_jax.studies.sweep.report import write_report
from ptft_jax.studies.sweep.space import overrides
from ptft_jax.studies.sweep.study import Sweep, config_with, open_study
from ptft_jax.train.engine import reuse_engines


def _ended(t) -> bool:
    """A trial that ran to its end: complete, pruned, or failed on its own (refused config,
    crash, divergence, no evaluation). These count towards --trials, so a sweep whose every
    trial fails still stops; a trial failed because its process died or it was interrupted is
    queued again, and its rerun counts instead."""
    from optuna.trial import TrialState
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or \
        (t.state == TrialState.FAIL and bool(t.user_attrs.get("ended_failed")))


def _counts(study) -> tuple[int, int]:
    """(ended trials, running ones), surplus trials left out."""
    from optuna.trial import TrialState
    done = running = 0
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        done += _ended(t)
        running += t.state == TrialState.RUNNING
    return done, running


def refusal(study, since: datetime.datetime) -> str | None:
    """Why a trial started `since` was refused by config checks, if one was: every other
    sample would likely be refused the same way, so the sweep stops at once."""
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("refused") and t.datetime_start and t.datetime_start >= since:
            return t.user_attrs["refused"]
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_dead_trials(study) -> list[int]:
    """Trials left RUNNING by a process of this host that is gone: failed, and queued again
    with their parameters and run directory (the rerun resumes it). Other hosts' dead trials
    are found by their heartbeat (RetryFailedTrialCallback)."""
    from optuna.trial import TrialState
    host, found = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        a = t.user_attrs
        if a.get("host") == host and a.get("pid") and not _pid_alive(a["pid"]):
            study._storage.set_trial_user_attr(t._trial_id, "failed_because",
                                               "its process died")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number,
                                                      "run_dir": a.get("run_dir")},
                                skip_if_exists=False)
            found.append(t.number)
    return found


def _write_status(run_dir: Path, record: dict) -> None:
    if run_dir.is_dir():
        atomic_write_text(run_dir / "sweep_trial.json",
                          json.dumps(record, indent=1, default=str))


class TrialFailed(Exception):
    """A trial that ended without a result (refused config, crash, divergence): the study
    records it as failed and the sweep goes on."""


class TrialRefused(TrialFailed):
    """A trial whose config ptft refused (ConfigError) when its run started: the sweep stops
    with the error instead of sampling more points that would fail the same way."""


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) during a trial: its run saved a checkpoint, the trial is queued
    again, and the sweep stops."""


def run_trial(sweep: Sweep, trial, log) -> float:
    """The objective: runs one trial's run to its end and returns the best value of the metric
    over its evaluations. Raises optuna.TrialPruned, TrialFailed (TrialRefused) or Interrupted."""
    import optuna

    values = {p.name: p.suggest(trial) for p in sweep.params}
    run_dir = trial.user_attrs.get("run_dir") or str(Path(sweep.dir) / f"trial_{trial.number:04d}")
    for key, value in (("run_dir", run_dir), ("host", socket.gethostname()),
                       ("pid", os.getpid())):
        trial.set_user_attr(key, value)
    settings = {**overrides(sweep.params, values), "run_dir": run_dir,
                "eval.metric": sweep.metric}
    if sweep.opts.workers > 1:
        settings["train.progress"] = False  # several workers' bars would interleave
    best = {"value": None, "step": None, "evals": 0}
    maximize = sweep.direction == "maximize"

    def on_eval(step, metrics):
        value = float(metrics[sweep.metric])
        if best["value"] is None or (value > best["value"] if maximize else value < best["value"]):
            best.update(value=value, step=step)
        trial.report(value, step)
        best["evals"] += 1
        if best["evals"] >= sweep.opts.pruner_warmup_evals and trial.should_prune():
            return f"pruned by the sweep at step {step}: {sweep.metric} {value:.4g}"
        return None

    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in values.items())
    log(f"trial {trial.number}: {shown} -> {run_dir}")
    t0 = time.perf_counter()
    record = {"number": trial.number, "params": values, "metric": sweep.metric}

    def failed(reason: str, detail: str | None = None, error=TrialFailed):
        trial.set_user_attr("failed_because", reason[:500])
        trial.set_user_attr("ended_failed", True)  # counts towards --trials
        _write_status(Path(run_dir), {**record, "state": "failed", "error": detail or reason})
        log(f"trial {trial.number}: failed: {reason}")
        return error(reason)

    try:
        cfg = config_with(sweep.raw, settings)
        result = entry.train(sweep.command, cfg, on_eval)
    except ConfigError as e:  # refused by config checks: the sweep stops (see `enough`)
        trial.set_user_attr("refused", f"trial {trial.number} ({shown}): "
                                       f"{str(e).splitlines()[0]}"[:1000])
        raise failed(str(e).splitlines()[0], str(e), TrialRefused) from None
    except ValueError as e:
        raise failed(str(e).splitlines()[0], str(e)) from None
    except Exception as e:  # noqa: BLE001 - one trial's crash must not end the sweep
        raise failed(f"{type(e).__name__}: {e}", traceback.format_exc()) from None
    seconds = time.perf_counter() - t0
    trial.set_user_attr("seconds", round(seconds, 1))
    trial.set_user_attr("compile_seconds", round(result.get("compile_seconds") or 0.0, 2))
    trial.set_user_attr("steps", result["steps"])
    record.update(seconds=seconds, steps=result["steps"], best=best)
    reason = result.get("stop_reason") or ""
    if result.get("stopped_by_signal"):
        trial.set_user_attr("failed_because", "interrupted")
        _write_status(Path(run_dir), {**record, "state": "interrupted"})
        raise Interrupted()
    if reason.startswith("pruned"):
        _write_status(Path(run_dir), {**record, "state": "pruned", "stop_reason": reason})
        log(f"trial {trial.number}: {reason}, {seconds:.0f} s")
        raise optuna.TrialPruned(reason)
    if result.get("diverged") or best["value"] is None:
        raise failed(reason or "no evaluation ran")
    _write_status(Path(run_dir), {**record, "state": "complete", "stop_reason": reason})
    log(f"trial {trial.number}: complete: {sweep.metric} {best['value']:.4g} (step "
        f"{best['step']}), {seconds:.0f} s")
    return best["value"]


def work(sweep: Sweep, worker: int = 0) -> None:
    """One worker: runs trials of the study until --trials are complete or pruned, in this
    process (reusing compiled steps), through Optuna's optimize loop (which keeps each
    running trial's heartbeat)."""
    if sweep.devices_per_worker is not None:  # set before JAX starts in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = sweep.devices_per_worker[worker]
    from optuna.trial import TrialState

    study = open_study(sweep, worker)
    since = datetime.datetime.now()  # a trial refused from here on stops this worker
    prefix = f"[worker {worker}] " if sweep.opts.workers > 1 else ""

    def log(line):
        print(f"{prefix}{line}", flush=True)

    def objective(trial):
        # Workers that start trials at once may overshoot: a trial beyond the target's count
        # (by trial number) is surplus, recorded as such, and ends this worker.
        earlier = [t for t in study.get_trials(deepcopy=False)
                   if t.number < trial.number and not t.user_attrs.get("surplus") and
                   (_ended(t) or t.state == TrialState.RUNNING)]
        if len(earlier) >= sweep.trials:
            trial.set_user_attr("surplus", True)
            study.stop()
            raise TrialFailed("surplus")
        try:
            return run_trial(sweep, trial, log)
        except Interrupted:
            study.enqueue_trial(trial.params, user_attrs={"rerun_of": trial.number,
                                                          "run_dir": trial.user_attrs["run_dir"]})
            raise KeyboardInterrupt from None

    def enough(study, _trial):
        done, running = _counts(study)
        if done + running >= sweep.trials or refusal(study, since):
            study.stop()

    if sum(_counts(study)) >= sweep.trials:
        return
    with reuse_engines():
        try:
            study.optimize(objective, callbacks=[enough], catch=(TrialFailed,),
                           gc_after_trial=False)
        except KeyboardInterrupt:
            log("sweep interrupted: run the same command to resume it")
            raise


def _worker_main(sweep: Sweep, worker: int) -> None:
    try:
        work(sweep, worker)
    except KeyboardInterrupt:
        sys.exit(130)


def run_sweep(sweep: Sweep) -> dict:
    """Runs the sweep to its --trials (resuming a study that exists), then writes the report."""
    import multiprocessing

    study = open_study(sweep)
    since = datetime.datetime.now()
    dead = requeue_dead_trials(study)
    if dead:
        print(f"trial(s) {', '.join(map(str, dead))} were left running by a process that is "
              f"gone: marked failed and queued again (they resume from their checkpoints)")
    done, _ = _counts(study)
    print(f"sweep {sweep.study_name}: {sweep.trials} trial(s) of ptft {sweep.command}, "
          f"{sweep.opts.sampler} sampler, {sweep.opts.pruner} pruner, objective: "
          f"{sweep.direction} {sweep.metric}; {done} done; study in {sweep.storage}", flush=True)
    interrupted = False
    if sweep.opts.workers == 1:
        try:
            work(sweep)
        except KeyboardInterrupt:
            interrupted = True
    else:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, args=(sweep, i))
                 for i in range(sweep.opts.workers)]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:
            interrupted = True
            for p in procs:
                p.join()
        interrupted |= any(p.exitcode not in (0, None) for p in procs)
    study = open_study(sweep)
    report = write_report(study, sweep)
    report["interrupted"] = interrupted
    report["refused"] = refusal(study, since)  # the sweep stopped at a refused trial
    return report
