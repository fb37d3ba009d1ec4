"""`ptft sweep`: trials of one config over a search space, with Optuna's samplers and pruners
and a study in a database that several processes and hosts can share.

Every trial is an ordinary run directory (`<dir>/trial_NNNN`, its config written in full) that
`ptft finetune --config <dir>/trial_NNNN/config.yaml run_dir=...` reruns alone. The objective
is the best value of a validation metric over the trial's evaluations; each evaluation is
reported to the study, and the pruner may stop the trial there (its directory is kept, marked
pruned in `sweep_trial.json`).

Trials run in this process (or in `--workers` processes), one after another, inside
`engine.reuse_engines()`: a trial that differs from an earlier one only in what the optimizer
state carries (learning rate, warmup, weight decay, ...) reuses its compiled step.

Resuming: the same command continues the study. A trial left RUNNING by a process that is gone
(on this host: its pid is dead; elsewhere: its heartbeat stopped) is marked failed and queued
again with its parameters, and the rerun continues its run directory from the last checkpoint.
Complete, pruned and failed trials count towards --trials (a sweep whose every trial fails
still ends); a trial refused by config checks when its run starts stops the sweep at once.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
import warnings
from pathlib import Path

from ptft_jax.config.load import (from_dict, merge_dicts, parse_overrides, read_yaml_mapping,
                                  with_hf_model)
from ptft_jax.config.schema import ConfigError
from ptft_jax.config.resolve import task_for
from ptft_jax.config.validate import validate
from ptft_jax.core.files import claim_folder
from ptft_jax.core.params import unflatten
from ptft_jax.studies.sweep.space import Param, extremes, grid_size, load_space
from ptft_jax.tasks.metrics import DEFAULT_METRIC, METRIC_MODES, TASK_METRICS

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("median", "halving", "none")
HEARTBEAT_S, GRACE_S = 30, 120  # a trial whose heartbeat is older than GRACE_S is dead


@dataclasses.dataclass
class SweepOptions:
    config: str = ""
    space: str = ""
    trials: int | None = None  # trials to end (complete, pruned or failed; grid: its size)
    sampler: str = "tpe"
    metric: str | None = None  # a validation metric; default: the task's eval.metric
    direction: str | None = None  # maximize | minimize; default: the metric's own
    pruner: str = "median"
    pruner_startup_trials: int = 3  # trials that run in full before pruning starts
    pruner_warmup_evals: int = 1  # evaluations of a trial before it may be pruned
    storage: str | None = None  # an SQLAlchemy URL; default sqlite:///<dir>/study.db
    study_name: str | None = None  # default: the config file's stem
    dir: str | None = None  # default: runs/sweep_<config stem>
    workers: int = 1
    seed: int = 0
    overrides: list | None = None  # key.sub=value on the config, before the space's values


def resolve_options(cli: dict, from_space: dict) -> SweepOptions:
    """The space file's `sweep:` section, then the command line's flags (those given)."""
    names = [f.name for f in dataclasses.fields(SweepOptions)]
    for key in from_space:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            raise ConfigError(f"space: sweep.{key} is not a sweep option." +
                              (f" Did you mean '{close[0]}'?" if close else
                               f" Options: {', '.join(names)}."))
    merged = {**from_space, **{k: v for k, v in cli.items() if v is not None}}
    return SweepOptions(**merged)


def _command_of(cfg) -> str:
    """The command that runs the config (they share one loop; they differ in the tasks they
    accept): image classification runs as a finetune when it starts from a checkpoint."""
    task = task_for(cfg)
    if task in ("mlm", "clm", "contrastive"):
        return "pretrain"
    if task == "image_classification" and cfg.finetune.init_from is None:
        return "pretrain"
    return "finetune"


def config_with(raw: dict, values: dict):
    """The Config of `raw` (a config file's mapping) with dotted-key overrides applied."""
    nested = unflatten({dotted.replace(".", "/"): v for dotted, v in values.items()})
    return from_dict(with_hf_model(merge_dicts(raw, nested)))


def _device_info(workers: int) -> tuple[int, str]:
    """(devices one trial sees, backend). With one worker, this process's; with several,
    asked of a short-lived process, so this one never takes (and pre-allocates) a GPU its
    workers need."""
    if workers == 1:
        import jax
        return jax.device_count(), jax.default_backend()
    import subprocess
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count(), "
                          "jax.default_backend())"], capture_output=True, text=True, check=True)
    count, backend = out.stdout.split()
    return int(count), backend


@dataclasses.dataclass
class Sweep:
    """A sweep with every input checked: what the workers need (picklable)."""
    opts: SweepOptions
    raw: dict  # the config file's mapping
    params: list[Param]
    command: str  # pretrain | finetune
    metric: str
    direction: str
    trials: int
    dir: str
    storage: str
    study_name: str
    devices_per_worker: list | None  # GPUs: CUDA_VISIBLE_DEVICES of each worker


def prepare(opts: SweepOptions) -> Sweep:
    """Checks everything that can be checked before a trial runs: the config, the space's
    keys, ranges and values, the metric, the sampler and pruner, the grid's size, the storage.
    Raises ConfigError naming what is wrong."""

    path = Path(opts.config)
    raw = merge_dicts(read_yaml_mapping(path, "the --config file"),
                      parse_overrides(opts.overrides or []))
    params, _ = load_space(opts.space)
    for name, value, options in (("sampler", opts.sampler, SAMPLERS),
                                 ("pruner", opts.pruner, PRUNERS),
                                 ("direction", opts.direction or "maximize",
                                  ("maximize", "minimize"))):
        if value not in options:
            raise ConfigError(f"--{name} '{value}': choose one of {', '.join(options)}.")
    if opts.workers < 1 or (opts.trials is not None and opts.trials < 1):
        raise ConfigError("--workers and --trials must be at least 1.")
    n_devices, backend = _device_info(opts.workers)
    devices_per_worker = None
    if opts.workers > 1 and backend == "gpu":
        if opts.workers > n_devices:
            raise ConfigError(f"--workers {opts.workers}: this machine has {n_devices} GPU(s) "
                              f"and each worker owns one; use --workers {n_devices} or fewer "
                              f"(on one GPU, trials run one at a time).")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(n_devices)]
        devices_per_worker, n_devices = [ids[i] for i in range(opts.workers)], 1
    elif opts.workers > 1 and backend == "tpu":
        raise ConfigError("--workers > 1 on a TPU: one process owns a TPU host's chips; run one "
                          "worker per host, sharing the study through --storage.")

    base = config_with(raw, {})
    task = task_for(base)
    metric = opts.metric or (base.eval.metric if base.eval.metric != "auto" else
                             DEFAULT_METRIC.get(task, "loss"))
    metric = metric.removeprefix("eval/")
    produced = TASK_METRICS.get(task, ())
    if metric not in produced:
        raise ConfigError(f"--metric '{metric}': task '{task}' does not report it; its "
                          f"validation metrics are {', '.join(produced)}.")
    if base.data.eval_split is None and base.data.eval_corpus is None:
        raise ConfigError(f"the sweep's objective is a validation metric, and {path} has no "
                          f"validation data: set data.eval_split (or data.eval_corpus).")
    direction = opts.direction or ("maximize" if METRIC_MODES[metric] == "max" else "minimize")
    for values in [{}, *extremes(params)]:  # every choice and both ends of every range
        try:
            validate(config_with(raw, values), n_devices)
        except ConfigError as e:
            where = ", ".join(f"{k}={v!r}" for k, v in values.items()) or "the config itself"
            raise ConfigError(f"space: with {where}: {e}") from None
    command = _command_of(base)
    if opts.sampler == "grid":
        size = grid_size(params)
        if opts.trials is not None and size > opts.trials:
            raise ConfigError(f"the grid has {size} points but --trials is {opts.trials}: raise "
                              f"--trials to {size} (or leave it out), shrink the space, or use "
                              f"--sampler random / tpe.")
        trials = size
    else:
        trials = opts.trials or 20
    sweep_dir = opts.dir or f"runs/sweep_{path.stem}"
    storage = opts.storage or f"sqlite:///{Path(sweep_dir).resolve() / 'study.db'}"
    sweep = Sweep(opts, raw, params, command, metric, direction, trials, sweep_dir, storage,
                  opts.study_name or path.stem, devices_per_worker)
    # The trials' run directories and the report go there; a folder of the user's is refused.
    claim_folder(Path(sweep_dir), "sweep", "--dir", legacy=["study.db"])
    study = open_study(sweep)  # a storage that cannot be opened fails here
    _check_same_space(study, sweep)
    return sweep


def make_storage(url: str):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeats are marked experimental
            return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                              grace_period=GRACE_S, heartbeat_stale_trial_callback=(
                                  RetryHeartbeatStaleTrialCallback(max_retry=2)))
    except Exception as e:  # SQLAlchemy's errors for a bad URL, driver or server
        hint = (" Install the database's Python driver (PostgreSQL: pip install psycopg, or "
                "psycopg2-binary with a postgresql+psycopg2:// URL)."
                if isinstance(e, ImportError) else "")
        raise ConfigError(f"--storage '{url}' cannot be opened: {type(e).__name__}: "
                          f"{str(e).splitlines()[0]}{hint}") from None
    finally:
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep logs its own lines


def open_study(sweep: Sweep, worker: int = 0):
    """The study, with this worker's sampler. Worker k of a sweep that finds n trials in the
    study samples with seed + k + 10007 n: parallel workers, and a resumed sweep, do not draw
    the configs already drawn, and a fresh sweep is reproducible (hosts that share a study:
    give each its own --seed)."""
    import optuna
    storage = make_storage(sweep.storage)
    seed = sweep.opts.seed + worker + 10007 * _trial_count(storage, sweep.study_name)
    samplers = {"grid": lambda: optuna.samplers.GridSampler(
                    {p.name: p.grid_values() for p in sweep.params}, seed=sweep.opts.seed),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed),
                "tpe": lambda: optuna.samplers.TPESampler(seed=seed)}
    o = sweep.opts
    pruners = {"median": lambda: optuna.pruners.MedianPruner(
                   n_startup_trials=o.pruner_startup_trials,
                   n_warmup_steps=0, n_min_trials=1),
               "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
               "none": lambda: optuna.pruners.NopPruner()}
    study = optuna.create_study(storage=storage, study_name=sweep.study_name,
                                direction=sweep.direction, sampler=samplers[o.sampler](),
                                pruner=pruners[o.pruner](), load_if_exists=True)
    if study.direction.name.lower() != sweep.direction:
        raise ConfigError(f"study '{sweep.study_name}' in {sweep.storage} was made to "
                          f"{study.direction.name.lower()}; this sweep would {sweep.direction}. "
                          f"Use another --study-name or --dir.")
    return study


def _trial_count(storage, study_name: str) -> int:
    import optuna
    for summary in optuna.get_all_study_summaries(storage):
        if summary.study_name == study_name:
            return summary.n_trials
    return 0


def _check_same_space(study, sweep: Sweep) -> None:
    """A resumed study must search the same space with the same config (else its trials would
    not be comparable)."""
    signature = json.dumps({"space": [dataclasses.asdict(p) for p in sweep.params],
                            "config": sweep.raw, "metric": sweep.metric,
                            "sampler": sweep.opts.sampler}, sort_keys=True, default=str)
    saved = study.user_attrs.get("signature")
    if saved is None:
        study.set_user_attr("signature", signature)
    elif saved != signature:
        raise ConfigError(f"study '{sweep.study_name}' in {sweep.storage} was made with another "
                          f"config, space, metric or sampler; resume it with the same ones, or "
                          f"use another --study-name or --dir.")
