"""The README's main job, end to end through the `ptft` command, on a shortened run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from tests.xla_flags import fake_devices

# The main job as a newcomer runs it: one CPU device (not the 8 fake ones the other tests
# use), which also compiles several times faster. Other test files run `ptft` through
# `_ptft` too.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": fake_devices(1)}
# The causal-LM run is mostly steps, not compiles: XLA's default optimisation level, as a
# newcomer's run has it, is the quicker there.
NEWCOMER_ENV = {**ENV, "XLA_FLAGS": ""}


def _command():
    exe = shutil.which("ptft")
    return [exe] if exe else [sys.executable, "-m", "ptft_jax.cli"]


def _ptft(*args, timeout=600, stdin=None, env=None):
    return subprocess.run([*_command(), *args], capture_output=True, text=True,
                          timeout=timeout, input=stdin, env=env or ENV)


def _check_run(run, rows, steps):
    """What a finished main-job run directory holds: one metrics row per logged step, each
    with every figure, the loss falling, checkpoints, the tokenizer, the config, TensorBoard."""
    assert [r["step"] for r in rows] == steps
    for key in ("loss", "learning_rate", "grad_norm", "step_time_s", "tokens_per_s", "mfu"):
        assert all(r[key] > 0 for r in rows[1:]), key  # step 1's warm-up LR is 0
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["accuracy"] > 0
    assert "20" in {p.name for p in (run / "checkpoints").iterdir()}
    assert (run / "tokenizer.json").is_file() and (run / "config.yaml").is_file()
    assert any(p.name.startswith("events") for p in (run / "tensorboard").iterdir())


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_causal_lm_main_job_runs_end_to_end(tmp_path):
    run = tmp_path / "run"
    result = _ptft("pretrain", "--config", "configs/pretrain_tiny_clm.yaml", f"run_dir={run}",
                   "train.steps=20", "train.log_every=10", "optim.warmup_steps=5",
                   "checkpoint.every=10", env=NEWCOMER_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 20 steps" in result.stdout
    _check_run(run, _rows(run), [10, 20])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10", "20"]


def test_bad_config_fails_fast_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    result = _ptft("pretrain", "--config", "configs/pretrain_tiny_mlm.yaml", f"run_dir={run}",
                   "train.grad_accum=7", timeout=120)  # 32 rows do not split into 7
    assert result.returncode == 2
    assert "divisible" in result.stderr and "Traceback" not in result.stderr
    assert not run.exists()


def test_masked_lm_main_job_stopped_by_ctrl_c_resumes_to_the_end(tmp_path):
    """The README's main job (shortened), stopped by Ctrl-C after a few steps: it saves a
    checkpoint, and the same command resumes it and trains to the end, each step once."""
    run = tmp_path / "run"
    args = ["pretrain", "--config", "configs/pretrain_tiny_mlm.yaml", f"run_dir={run}",
            "train.steps=20", "train.log_every=1", "optim.warmup_steps=5", "checkpoint.every=10"]
    proc = subprocess.Popen([*_command(), *args], stdout=subprocess.PIPE,
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
    stopped = max(int(p.name) for p in (run / "checkpoints").iterdir())
    assert 3 <= stopped < 20
    resumed = _ptft(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {stopped}" in resumed.stdout + resumed.stderr
    assert "done: 20 steps" in resumed.stdout
    _check_run(run, _rows(run), list(range(1, 21)))
