"""The README's main job, end to end through the `ptft` command, on a shortened run."""
import json
import os
import shutil
import subprocess
import sys

import pytest

# The main job as a newcomer runs it: one CPU device (not the 8 fake ones the other tests
# use), which also compiles several times faster.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": ""}


def _ptft(*args, timeout=600, stdin=None):
    exe = shutil.which("ptft")
    cmd = [exe] if exe else [sys.executable, "-m", "ptft_jax.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                          input=stdin, env=ENV)


@pytest.mark.parametrize("config", ["pretrain_tiny_mlm", "pretrain_tiny_clm"])
def test_main_job_runs_end_to_end(tmp_path, config):
    run = tmp_path / "run"
    result = _ptft("pretrain", "--config", f"configs/{config}.yaml", f"run_dir={run}",
                   "train.steps=20", "train.log_every=10", "optim.warmup_steps=5",
                   "checkpoint.every=10")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 20 steps" in result.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    for key in ("loss", "accuracy", "learning_rate", "grad_norm", "step_time_s",
                "tokens_per_s", "mfu"):
        assert all(r[key] > 0 for r in rows), key
    assert rows[1]["loss"] < rows[0]["loss"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10", "20"]
    assert (run / "tokenizer.json").is_file() and (run / "config.yaml").is_file()
    assert any(p.name.startswith("events") for p in (run / "tensorboard").iterdir())


def test_bad_config_fails_fast_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    result = _ptft("pretrain", "--config", "configs/pretrain_tiny_mlm.yaml", f"run_dir={run}",
                   "train.grad_accum=7", timeout=120)  # 32 rows do not split into 7
    assert result.returncode == 2
    assert "divisible" in result.stderr and "Traceback" not in result.stderr
    assert not run.exists()


def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes(tmp_path):
    import signal
    import time
    run = tmp_path / "run"
    args = ["pretrain", "--config", "configs/pretrain_tiny_mlm.yaml", f"run_dir={run}",
            "train.log_every=1", "data.seq_len=32", "model.max_len=32", "checkpoint.every=1000"]
    exe = shutil.which("ptft")
    cmd = [exe] if exe else [sys.executable, "-m", "ptft_jax.cli"]
    proc = subprocess.Popen([*cmd, *args, "train.steps=1000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Stopped by SIGINT: saved step" in out + err
    saved = [int(p.name) for p in (run / "checkpoints").iterdir()]
    assert len(saved) == 1 and 3 <= saved[0] < 1000
    resumed = _ptft(*args, f"train.steps={saved[0] + 2}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {saved[0]}" in resumed.stdout + resumed.stderr
    assert f"done: {saved[0] + 2} steps" in resumed.stdout
