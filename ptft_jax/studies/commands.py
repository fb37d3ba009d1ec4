"""`ptft experiment` and `ptft sweep` as commands (cli.py parses their arguments)."""
from __future__ import annotations

import dataclasses

from ptft_jax.config.schema import ConfigError
from ptft_jax.studies import experiment as experiments
from ptft_jax.studies.sweep.space import load_space
from ptft_jax.studies.sweep.study import SweepOptions, prepare, resolve_options
from ptft_jax.studies.sweep.trials import run_sweep


def experiment(args) -> int:
    rows = experiments.run(args.config)
    print(f"experiment done: {len(rows)} run(s); table, plot and JSONL in "
          f"{experiments.load_experiment(args.config).dir}")
    return 0


def sweep(args) -> int:
    cli = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(SweepOptions)}
    _, from_space = load_space(args.space)
    options = prepare(resolve_options(cli, from_space))
    report = run_sweep(options)
    if report["refused"]:  # every other sample would be refused the same way
        raise ConfigError(f"sweep stopped: {report['refused']}")
    best = (f"best: trial {report['best_trial']}, {options.metric} {report['best_value']:.4g} "
            f"(config: {report['dir']}/best_config.yaml)" if report["best_trial"] is not None
            else "no trial completed (see why in trials.md)")
    print(f"sweep {'interrupted' if report['interrupted'] else 'done'}: {report['trials']} "
          f"trial(s); {best}; table and plots in {report['dir']}/trials.md")
    return 130 if report["interrupted"] else 0 if report["best_trial"] is not None else 1
