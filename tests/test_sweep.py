"""ptft sweep: the grid is covered exactly and an optimizer-only sweep compiles once, the same
seed samples the same configs, a resumed sweep repeats nothing and reruns a killed trial, the
pruner stops a clearly worse trial, two worker processes share a SQLite study, and bad input
is refused before any trial."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ptft_jax.config.schema import ConfigError
from ptft_jax.data.tokenizer import train_tokenizer
from ptft_jax.studies.sweep.space import load_space
from ptft_jax.studies.sweep.study import open_study, prepare, resolve_options
from ptft_jax.studies.sweep.trials import run_sweep
from ptft_jax.train.step import COMPILES
from tests.test_finetune_job import _labelled
from tests.xla_flags import fake_devices


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A config that finetunes a small classifier from scratch in a few seconds a trial."""
    root = tmp_path_factory.mktemp("sweep")
    train, valid = _labelled(root, n_train=64, n_eval=32)
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    tokenizer = root / "tokenizer.json"
    train_tokenizer("encoder", texts * 4, 256).save(str(tokenizer))
    config = {"model": {"preset": "bert-tiny", "num_layers": 1, "max_len": 32,
                        "vocab_size": None, "dropout": 0.0},
              "data": {"corpus": str(train), "eval_corpus": str(valid), "eval_split": "train",
                       "label_column": "label", "tokenizer": str(tokenizer), "seq_len": 32},
              "train": {"task": "classification", "steps": 8, "global_batch": 16,
                        "log_every": 4, "progress": False},
              "eval": {"every": 2, "batch_size": 32},
              "checkpoint": {"every": 4, "keep": 1},
              "optim": {"learning_rate": 1.0e-3, "warmup_steps": 2}}
    path = root / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path


def _sweep(tmp_path, base, space: dict, **options):
    tmp_path.mkdir(parents=True, exist_ok=True)
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space))
    params, from_space = load_space(space_file)
    cli = {"config": str(base[1]), "space": str(space_file), "dir": str(tmp_path / "sweep"),
           **options}
    return prepare(resolve_options(cli, from_space))


def test_grid_covers_exactly_the_grid_compiles_once_and_reports(tmp_path, base):
    lrs = [1.0e-3, 3.0e-3, 1.0e-2]
    sweep = _sweep(tmp_path, base, {"optim.learning_rate": lrs,
                                    "optim.weight_decay": [0.0, 0.1]}, sampler="grid",
                   pruner="none")
    assert sweep.trials == 6
    before = COMPILES[0]
    report = run_sweep(sweep)
    assert COMPILES[0] - before == 1  # optimizer hyperparameters only: one compiled step
    rows = report["rows"]
    assert sorted((r["optim.learning_rate"], r["optim.weight_decay"]) for r in rows) == \
        sorted((lr, wd) for lr in lrs for wd in (0.0, 0.1))
    assert all(r["state"] == "complete" for r in rows)
    out = Path(sweep.dir)
    for name in ("trials.md", "trials.csv", "best_config.yaml", "history.png",
                 "importance.png"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    # Each trial is an ordinary run directory whose config holds its parameters.
    for r in rows:
        saved = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert saved["optim"]["learning_rate"] == r["optim.learning_rate"]
        status = json.loads((Path(r["run_dir"]) / "sweep_trial.json").read_text())
        assert status["state"] == "complete"
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["optim"]["learning_rate"] == rows[report["best_trial"]]["optim.learning_rate"]

    # The same command again: the study is done, nothing reruns.
    mtimes = {r["run_dir"]: (Path(r["run_dir"]) / "metrics.jsonl").stat().st_mtime
              for r in rows}
    again = run_sweep(sweep)
    assert again["trials"] == 6
    assert mtimes == {r["run_dir"]: (Path(r["run_dir"]) / "metrics.jsonl").stat().st_mtime
                      for r in again["rows"]}


def test_same_seed_samples_the_same_configs(tmp_path, base):
    space = {"optim.learning_rate": {"log_uniform": [1.0e-5, 1.0e-2]},
             "optim.warmup_steps": {"int": [0, 10]},
             "optim.name": ["adamw", "lion", "sgd"]}

    def sampled(name, seed, sampler):
        sweep = _sweep(tmp_path / name, base, space, sampler=sampler, seed=seed, trials=6)
        study = open_study(sweep)
        out = []
        for _ in range(6):
            trial = study.ask()
            out.append({p.name: p.suggest(trial) for p in sweep.params})
            study.tell(trial, out[-1]["optim.learning_rate"])  # TPE learns from values
        return out

    for sampler in ("random", "tpe"):
        first = sampled(f"{sampler}-a", 7, sampler)
        assert first == sampled(f"{sampler}-b", 7, sampler)
        assert first != sampled(f"{sampler}-c", 8, sampler)


def test_a_killed_trial_is_rerun_and_completed_ones_are_not(tmp_path, base):
    sweep = _sweep(tmp_path, base, {"optim.learning_rate": {"log_uniform": [1e-4, 1e-2]}},
                   sampler="random", trials=1, pruner="none")
    first = run_sweep(sweep)
    done = first["rows"][0]["run_dir"]
    mtime = (Path(done) / "metrics.jsonl").stat().st_mtime
    # A worker that took trial 1 and died: the trial stays RUNNING in the study.
    code = ("import optuna, socket, sys; from ptft_jax.studies.sweep.study import make_storage;"
            f"s = optuna.load_study(study_name={sweep.study_name!r}, "
            f"storage=make_storage({sweep.storage!r})); t = s.ask();"
            "t.suggest_float('optim.learning_rate', 1e-4, 1e-2, log=True);"
            "t.set_user_attr('host', socket.gethostname()); t.set_user_attr('pid', 2**22 + 7)")
    subprocess.run([sys.executable, "-c", code], check=True)
    sweep.trials = 2
    report = run_sweep(sweep)
    states = {r["trial"]: r["state"] for r in report["rows"]}
    assert states[0] == "complete" and states[1].startswith("failed") and \
        states[2] == "complete"
    study = open_study(sweep)
    assert study.trials[2].user_attrs["rerun_of"] == 1
    assert study.trials[2].params == study.trials[1].params
    assert (Path(done) / "metrics.jsonl").stat().st_mtime == mtime  # not run again


def test_the_pruner_stops_a_clearly_worse_trial(tmp_path, base):
    sweep = _sweep(tmp_path, base, {"optim.learning_rate": [3.0e-3, 1.0e-9]}, sampler="grid",
                   pruner="median", pruner_startup_trials=1, pruner_warmup_evals=1,
                   metric="loss")
    study = open_study(sweep)  # the order matters: the good trial first
    for lr in (3.0e-3, 1.0e-9):
        study.enqueue_trial({"optim.learning_rate": lr})
    report = run_sweep(sweep)
    good, bad = sorted(report["rows"], key=lambda r: r["trial"])
    assert good["state"] == "complete" and good["steps"] == 8
    assert bad["state"] == "pruned" and bad["steps"] < 8
    status = json.loads((Path(bad["run_dir"]) / "sweep_trial.json").read_text())
    assert status["state"] == "pruned"
    assert (Path(bad["run_dir"]) / "checkpoints").is_dir()  # kept


def test_two_workers_share_a_sqlite_study(tmp_path, base, monkeypatch):
    # Each worker on one CPU device: quicker to compile.
    monkeypatch.setenv("XLA_FLAGS", fake_devices(1))
    sweep = _sweep(tmp_path, base, {"optim.learning_rate": {"log_uniform": [1e-4, 1e-2]}},
                   sampler="random", trials=4, workers=2, pruner="none")
    report = run_sweep(sweep)
    complete = [r for r in report["rows"] if r["state"] == "complete"]
    assert len(complete) == 4
    dirs = [r["run_dir"] for r in complete]
    assert len(set(dirs)) == 4
    assert len({r["optim.learning_rate"] for r in complete}) == 4  # workers sample apart
    pids = set()
    for d in dirs:  # each trial ran once, to its end
        lines = (Path(d) / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(line)["step"] for line in lines if '"loss"' in line and
                 '"eval/' not in line]
        assert steps == sorted(set(steps)) and steps[-1] == 8
    study = open_study(sweep)
    for t in study.trials:
        pids.add(t.user_attrs.get("pid"))
    assert os.getpid() not in pids


@pytest.mark.parametrize("space,options,message", [
    ({"optim.name": ["adamw", "adamax"]}, {}, "optim.name.*adamw, adam, sgd, lamb, lion"),
    ({"optim.schedule": ["cosine", "exp"]}, {}, "step, plateau"),
    ({"optim.learnig_rate": [1e-3]}, {}, "Did you mean 'optim.learning_rate'"),
    ({"optim.learning_rate": {"uniform": [1e-3, 1e-3]}}, {}, "is empty"),
    ({"optim.learning_rate": {"log_uniform": [1e-2, 1e-4]}}, {}, "is inverted"),
    ({"optim.learning_rate": [1e-3]}, {"metric": "pearson"}, "does not report it"),
    ({"optim.learning_rate": [1e-3]}, {"storage": "sqlite:////nonexistent/dir/x.db"},
     "cannot be opened"),
    ({"optim.learning_rate": [1e-3, 2e-3, 3e-3]}, {"sampler": "grid", "trials": 2},
     "the grid has 3 points but --trials is 2"),
    ({"optim.learning_rate": {"uniform": [1e-4, 1e-3]}}, {"sampler": "grid"},
     "a grid needs choices or a step"),
    ({"optim.learning_rate": [1e-3], "sweep": {"trails": 3}}, {}, "Did you mean 'trials'"),
])
def test_bad_input_is_refused_before_any_trial(tmp_path, base, space, options, message):
    with pytest.raises(ConfigError, match=message):
        _sweep(tmp_path, base, space, **options)
    assert not list(tmp_path.glob("sweep/trial_*"))


def test_the_command_line_refuses_bad_input_with_one_line(tmp_path, base, capsys):
    from ptft_jax.cli import main
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.learning_rate": [1e-3, 2e-3, 3e-3]}))
    code = main(["sweep", "--config", str(base[1]), "--space", str(space), "--sampler", "grid",
                 "--trials", "2", "--dir", str(tmp_path / "sweep")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--trials is 2" in err


def test_reduce_on_plateau_lowers_the_lr_in_a_run_and_keeps_it_on_resume(tmp_path, base):
    from ptft_jax.jobs import entry
    from ptft_jax.studies.sweep.study import config_with
    raw = yaml.safe_load(base[1].read_text())
    run = tmp_path / "run"

    def finetune(steps):
        # An LR too small to change a prediction: every evaluation after the first is a
        # plateau (patience 1), and each halves the LR.
        entry.finetune(config_with(raw, {
            "run_dir": str(run), "train.steps": steps, "train.log_every": 2,
            "optim.learning_rate": 1e-9, "optim.warmup_steps": 0, "optim.schedule": "plateau",
            "optim.plateau_patience": 1, "eval.metric": "accuracy"}))
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["learning_rate"] / 1e-9 for r in rows if "learning_rate" in r}

    assert finetune(8) == pytest.approx({2: 1, 4: 1, 6: 0.5, 8: 0.25}, rel=1e-4)
    assert finetune(10)[10] == pytest.approx(0.125, rel=1e-4)  # resumed: the count goes on


def test_numeric_strings_are_numbers_in_every_range(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 (no dot) as a string.
    path = tmp_path / "space.yaml"
    path.write_text("optim.learning_rate: {log_uniform: [1e-4, 1e-2]}\n"
                    "optim.weight_decay: {uniform: [0, 1e-1], step: 5e-2}\n"
                    "optim.warmup_steps: {int: [0, 1e2], step: 2e1}\n")
    lr, wd, warmup = load_space(path)[0]
    assert (lr.low, lr.high, lr.log) == (1e-4, 1e-2, True)
    assert wd.grid_values() == [0.0, 0.05, 0.1]
    assert warmup.grid_values() == [0, 20, 40, 60, 80, 100]
    path.write_text("optim.learning_rate: {uniform: [1e-4, lots]}\n")
    with pytest.raises(ConfigError, match="two finite numbers"):
        load_space(path)


@pytest.mark.parametrize("space,code", [
    ({"strategy": {"bundles": {"nomatch": {"finetune.freeze": ["nomatch"]}}}}, 2),  # refused
    ({"optim.learning_rate": {"choices": [1.0e6]}}, 1),  # every trial diverges
])
def test_failing_trials_end_the_sweep(tmp_path, base, capsys, space, code):
    # Failed trials count towards --trials; a refused config stops the sweep at once.
    from ptft_jax.cli import main
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space))
    assert main(["sweep", "--config", str(base[1]), "--space", str(space_file), "--trials", "2",
                 "--sampler", "random", "--dir", str(tmp_path / "sweep"),
                 "train.max_skipped_steps=1"]) == code
    captured = capsys.readouterr()
    failed = [line.split(":")[0] for line in captured.out.splitlines() if ": failed: " in line]
    if code == 2:
        assert failed == ["trial 0"], captured.out[-2000:]
        assert "sweep stopped: trial 0 (strategy=nomatch)" in captured.err
        assert "matches no parameter" in captured.err
    else:
        assert failed == ["trial 0", "trial 1"], captured.out[-2000:]
        assert "no trial completed" in captured.out
