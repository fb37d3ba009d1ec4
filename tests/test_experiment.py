"""`ptft experiment pretrain-vs-end-to-end`: equal budgets across arms, the refusals, and a
tiny experiment run end to end through the CLI, interrupted mid-stage and resumed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ptft_jax.config.schema import ConfigError
from ptft_jax.studies import experiment
from tests.test_multimodal import _write_pairs
from tests.xla_flags import fake_devices

TOWERS = {"image": {"model": {"preset": "vit-mini4", "image_size": 8, "patch_size": 4,
                              "hidden_size": 32, "num_heads": 2, "mlp_dim": 64,
                              "num_layers": 2}},
          "text": {"model": {"preset": "bert-tiny", "hidden_size": 32, "num_heads": 2,
                             "mlp_dim": 64, "max_len": 16}}}


def _config(tmp_path, budget=4e9, **experiment_keys) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    npz = _write_pairs(tmp_path, n=64)
    doc = {"experiment": {"dir": str(tmp_path / "exp"), "seeds": [0], "budget_flops": budget,
                          "evals": 2, **experiment_keys},
           "finetune": {"model": {"kind": "fusion", "hidden_size": 32},
                        "towers": TOWERS,
                        "data": {"corpus": str(npz), "eval_corpus": str(npz),
                                 "eval_split": "train", "text_column": "text",
                                 "label_column": "label", "seq_len": 8,
                                 "tokenizer_vocab_size": 128, "num_workers": 1},
                        "train": {"global_batch": 16, "log_every": 10, "progress": False},
                        "eval": {"batch_size": 16}},
           "align": {"towers": {"image": {"projection_dim": 16},
                                "text": {"projection_dim": 16}}}}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _plan(path):
    cfg = experiment.load_experiment(path)
    tokenizer, vocab = experiment.prepare_texts_and_tokenizer(cfg)
    stages = experiment.stage_dicts(cfg, tokenizer, vocab)
    return cfg, experiment.plan(cfg, stages, tokenizer, 8)


def test_every_arm_gets_the_same_budget(tmp_path):
    cfg, arms = _plan(_config(tmp_path))
    totals = {arm: sum(s.flops for s in runs[0]) for arm, runs in arms.items()}
    assert set(totals) == {"a", "b", "c", "d_b", "d_c"}
    for arm, total in totals.items():
        assert cfg.budget_flops * (1 - experiment.MAX_IMBALANCE) <= total <= cfg.budget_flops
    stages = {arm: [s.name for s in runs[0]] for arm, runs in arms.items()}
    assert stages["b"] == ["image_pretrain", "text_pretrain", "finetune"]
    assert stages["c"] == ["align", "finetune"] and stages["a"] == ["finetune"]
    # arm d finetunes b's and c's pretrained towers (the same runs) with the towers frozen:
    # cheaper steps, so more of them for the same budget
    b, d_b = arms["b"][0], arms["d_b"][0]
    assert [s.run_dir for s in b[:2]] == [s.run_dir for s in d_b[:2]]
    assert d_b[-1].steps > b[-1].steps
    assert d_b[-1].extra["finetune"]["freeze"] == ["^image/", "^text/"]
    # the shares hold: image pretraining spends about 30% of the budget
    assert abs(b[0].flops / cfg.budget_flops - 0.3) < 0.02


def test_budgets_that_cannot_be_equal_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="less than one step"):
        _plan(_config(tmp_path / "tiny", budget=1e6))
    with pytest.raises(ConfigError, match="cannot be split equally"):
        _plan(_config(tmp_path / "coarse", budget=1.5e8))
    with pytest.raises(ConfigError, match="leaves arm b no budget"):
        experiment.load_experiment(_config(tmp_path / "shares", shares={
            "image_pretrain": 0.6, "text_pretrain": 0.5}))
    with pytest.raises(ConfigError, match="choose among"):
        experiment.load_experiment(_config(tmp_path / "arms", arms=["a", "e"]))


def test_experiment_runs_end_to_end_and_resumes_mid_stage(tmp_path):
    # Four evaluations: stages checkpoint every quarter, so the interrupt lands mid-stage.
    # Arms c and d_c only: a pretraining stage one finetuning reuses and another finetunes
    # frozen covers what the run adds over the plan (tested above for all five arms), at
    # three stages' compiles instead of eight.
    path = _config(tmp_path, budget=3e9, evals=4, arms=["c", "d_c"])
    command = [sys.executable, "-m", "ptft_jax.cli", "experiment", "pretrain-vs-end-to-end",
               "--config", str(path)]
    root = tmp_path / "exp"
    # One CPU device: the stages compile several times faster than on 8 fake ones (the
    # sharded steps are tested elsewhere).
    env = {**os.environ, "XLA_FLAGS": fake_devices(1)}
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env)
    # Interrupt as soon as some stage has saved a checkpoint short of its last step.
    interrupted = None
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None and interrupted is None:
        plan = root / "plan.json"
        if plan.exists():
            for runs in json.loads(plan.read_text()).values():
                for stage in runs["0"]:
                    ckpts = Path(stage["run_dir"]) / "checkpoints"
                    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] \
                        if ckpts.is_dir() else []
                    if any(s < stage["steps"] for s in steps):
                        interrupted = stage
        time.sleep(0.02)
    assert interrupted is not None, first.communicate()[0][-3000:]
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 130, out[-3000:]
    assert not (root / "results.jsonl").exists()
    done_before = {p: p.stat().st_mtime_ns for p in root.rglob("result.json")}
    second = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "resumed at step" in second.stdout
    for p, mtime in done_before.items():  # finished stages are not run again
        assert p.stat().st_mtime_ns == mtime
    rows = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
    assert sorted(r["arm"] for r in rows) == ["c", "d_c"]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1
        assert r["curve"] and r["flops"] <= 3e9
    table = (root / "results.md").read_text()
    assert "| c: towers aligned (contrastive) |" in table and "±" in table
    assert "| d: aligned, towers frozen |" in table
    assert (root / "accuracy_vs_flops.png").stat().st_size > 5000
    # every stage is an ordinary run directory: rerunnable alone with its own config
    plan = json.loads((root / "plan.json").read_text())
    stage = plan["c"]["0"][0]
    assert plan["d_c"]["0"][0]["run_dir"] == stage["run_dir"]  # one align run, used twice
    config = yaml.safe_load((Path(stage["run_dir"]) / "config.yaml").read_text())
    assert config["train"]["task"] == "contrastive"
    assert config["train"]["steps"] == stage["steps"]
    np.testing.assert_allclose(sum(s["flops"] for s in rows[0]["stages"]), rows[0]["flops"])


def test_a_missing_experiment_section_is_named(tmp_path):
    path = _config(tmp_path)
    doc = yaml.safe_load(path.read_text())
    for drop, message in ((lambda d: d.pop("experiment"), "the 'experiment' section is missing"),
                          (lambda d: d["experiment"].pop("budget_flops"),
                           "experiment.budget_flops is missing")):
        broken = yaml.safe_load(yaml.safe_dump(doc))
        drop(broken)
        path.write_text(yaml.safe_dump(broken))
        with pytest.raises(ConfigError, match=message) as e:
            experiment.load_experiment(path)
        assert str(path) in str(e.value)
