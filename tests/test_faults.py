"""Fault tests on real runs: each kind of checkpoint damage is found and the run falls back to
the newest intact step; kill -9 at random moments (mid-save included) resumes bit-identically;
a save that fails (file-size limit, full disk) stops the run with every earlier step intact."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ptft_jax.ckpt import integrity
from ptft_jax.ckpt.checkpoint import Checkpointer
from ptft_jax.config.load import load_config
from ptft_jax.config.schema import ConfigError
from ptft_jax.core.params import flatten
from ptft_jax.jobs.entry import pretrain
from ptft_jax.jobs.lm import pretrain_job
from ptft_jax.train.resume import restore_newest_intact
from tests.test_resume import _arrays

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = {
    # Masked LM with dropout on, so the resumed run must draw the same dropout masks too.
    "mlm": ["model.dropout=0.1"],
    "clm": ["model.preset=gpt-tiny", "model.vocab_size=null", "model.type_vocab_size=0"],
}


def _overrides(run, corpus, *extra):
    return [f"run_dir={run}", f"data.corpus={corpus}", "data.tokenizer_vocab_size=512",
            "data.seq_len=32", "model.max_len=32", "train.global_batch=8",
            "train.progress=false", "train.log_every=1", "optim.warmup_steps=2",
            "checkpoint.keep=10", *extra]


def _cfg(run, corpus, *extra):
    return load_config("configs/pretrain_tiny_mlm.yaml", _overrides(run, corpus, *extra))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, small_corpus):
    """Six steps, saved by the clock alone (checkpoint.every=0, every_minutes tiny): one
    checkpoint per step, synchronous."""
    run = tmp_path_factory.mktemp("faults") / "base"
    pretrain(_cfg(run, small_corpus, "train.steps=6", "checkpoint.every=0",
                  "checkpoint.every_minutes=1e-9", "checkpoint.async_save=false"))
    return run


def test_time_based_checkpoints_and_checksums_in_the_metadata(base_run):
    assert sorted(int(p.name) for p in (base_run / "checkpoints").iterdir()) == [1, 2, 3, 4, 5,
                                                                                   6]
    meta = json.loads((base_run / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert set(meta["checksums"]) == {"params", "opt_state"}
    params = {k[len("params/"):]: v for k, v in _arrays(base_run, 6).items()
              if k.startswith("params/")}
    assert set(meta["checksums"]["params"]) == set(params)
    # The device checksum equals one computed here on the host arrays read back.
    assert integrity.checksums(params) == meta["checksums"]["params"]


def _biggest_data_file(item_dir: Path) -> Path:
    return max((p for p in item_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def _flip_one_bit(step_dir):
    f = _biggest_data_file(step_dir / "params")
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


def _random_bytes(step_dir):
    f = _biggest_data_file(step_dir / "params")
    data = bytearray(f.read_bytes())
    start = len(data) // 3
    data[start:start + 4096] = random.Random(0).randbytes(4096)
    f.write_bytes(bytes(data))


DAMAGE = {  # kind -> (what is done to the newest step, words the recorded fault holds)
    "truncated data file": (lambda d: _truncate(_biggest_data_file(d / "params")),
                            "cannot be read"),
    "deleted data file": (lambda d: _biggest_data_file(d / "params").unlink(),
                          "cannot be read"),
    "deleted params/_METADATA": (lambda d: (d / "params" / "_METADATA").unlink(),
                                 "params/_METADATA is missing"),
    "deleted params item": (lambda d: shutil.rmtree(d / "params"), "params item is missing"),
    "random bytes": (_random_bytes, ""),  # a read error or a checksum mismatch
    "one flipped bit": (_flip_one_bit, "checksum mismatch in 1 array"),
    # Metadata is checked like data: valid JSON of the wrong shape, and a folder holding
    # another step's state (steps 5 -> 6 would never have been trained).
    "metadata a list": (lambda d: _meta_file(d).write_text("[1, 2, 3]"), "not an object"),
    "metadata empty": (lambda d: _meta_file(d).write_text("{}"), "no valid step"),
    "step not a number": (lambda d: _edit_meta(d, step="abc"), "no valid step"),
    "data position of another step": (lambda d: _edit_meta(d, data={"step": 6,
                                                                    "samples_seen": 3}),
                                      "data position of 3 samples"),
    "a copy of step 5 named 6": (lambda d: (shutil.rmtree(d), shutil.copytree(
        d.parent / "5", d)), "step 5's, in a folder named 6"),
}


def _meta_file(step_dir: Path) -> Path:
    return step_dir / "meta" / "metadata"


def _edit_meta(step_dir: Path, **values):
    meta = json.loads(_meta_file(step_dir).read_text())
    _meta_file(step_dir).write_text(json.dumps({**meta, **values}))


def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_each_kind_of_damage_is_found_moved_aside_and_the_previous_step_restored(
        base_run, tmp_path, small_corpus):
    step5 = _arrays(base_run, 5)
    for kind, (damage, words) in DAMAGE.items():
        run = tmp_path / kind.replace(" ", "_").replace("/", "_")
        shutil.copytree(base_run, run)
        damage(run / "checkpoints" / "6")
        status = {r["step"]: r["status"] for r in integrity.verify_run(run)}
        assert status["6"].startswith("DAMAGED") and words in status["6"], (kind, status)
        assert all(status[s] == "ok" for s in "12345"), (kind, status)

        job = pretrain_job(_cfg(run, small_corpus, "train.steps=8"))
        ckpt = Checkpointer(run / "checkpoints")
        step, meta, _, engine, state = restore_newest_intact(ckpt, job.cfg, job.task)
        ckpt.close()
        assert step == 5 and meta["step"] == 5, kind
        assert not (run / "checkpoints" / "6").exists()
        note = (run / integrity.DAMAGED_DIR / "6" / integrity.REASON_FILE).read_text()
        assert words in note, (kind, note)
        restored = {f"params/{k}": np.asarray(v) for k, v in
                    flatten(engine.host_state(state).params).items()}
        assert all(np.array_equal(restored[k], step5[k]) for k in restored), kind
    # The flipped bit lands in an array's data: read without checksums, it comes back as a
    # different value (what the probe saw restored silently); with them, it is refused.
    run = tmp_path / "flip_raw"
    shutil.copytree(base_run, run)
    _flip_one_bit(run / "checkpoints" / "6")
    raw = flatten(integrity.read_item(run / "checkpoints" / "6" / "params"))
    good = _arrays(base_run, 6)
    assert sum(not np.array_equal(v, good[f"params/{k}"]) for k, v in raw.items()) == 1
    with pytest.raises(integrity.CheckpointDamaged, match="checksum mismatch"):
        integrity.check_step(run / "checkpoints" / "6")


def test_no_intact_step_left_is_refused_and_stays_refused(base_run, tmp_path, small_corpus):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    for step in "123456":
        _flip_one_bit(run / "checkpoints" / step)
    for _ in range(2):  # the second time, nothing is left in checkpoints/: still refused
        with pytest.raises(ConfigError, match="no intact checkpoint.*Nothing was started"):
            pretrain(_cfg(run, small_corpus, "train.steps=8"))
    assert sorted(p.name for p in (run / integrity.DAMAGED_DIR).iterdir()) == list("123456")
    assert not any((run / "checkpoints").iterdir())


def test_fallback_through_the_cli_resumes_bit_identically(base_run, tmp_path, small_corpus,
                                                         capsys):
    from ptft_jax.cli import main
    run = tmp_path / "damaged"  # as if it had died after saving step 4, which then got damaged
    shutil.copytree(base_run, run)
    for step in "56":
        shutil.rmtree(run / "checkpoints" / step)
    _flip_one_bit(run / "checkpoints" / "4")
    capsys.readouterr()
    assert main(["checkpoints", "verify", str(run)]) == 1
    assert "DAMAGED: checksum mismatch" in capsys.readouterr().out
    code = main(["pretrain", "--config", "configs/pretrain_tiny_mlm.yaml",
                 *_overrides(run, small_corpus, "train.steps=6", "checkpoint.every=2")])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "warning: checkpoint step 4 is damaged (checksum mismatch" in err
    assert "resumed at step 3" in out + err
    a, b = _arrays(base_run, 6), _arrays(run, 6)  # the uninterrupted run's step 6
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # Rows of the steps trained again moved aside: every step once, in order.
    rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]
    assert main(["checkpoints", "verify", str(run)]) == 0


def test_damage_is_reported_in_one_line_with_no_orbax_tracebacks(base_run, tmp_path,
                                                                small_corpus):
    """Orbax and TensorStore log a failed read from each thread and coroutine it passes
    through; a fallback or a verify says what is wrong once."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    _truncate(_biggest_data_file(run / "checkpoints" / "6" / "params"))
    (run / "checkpoints" / "5" / "params" / "manifest.ocdbt").unlink()
    result = _ptft("checkpoints", "verify", str(run))
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr == "", result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if "DAMAGED" in line]
    assert len(rows) == 2 and "params/manifest.ocdbt is missing" in rows[0], rows
    # A resume over both (a deleted data file left Orbax's coroutines raising after it).
    _biggest_data_file(run / "checkpoints" / "4" / "params").unlink()
    result = _ptft("pretrain", "--config", "configs/pretrain_tiny_mlm.yaml",
                   *_overrides(run, small_corpus, "train.steps=4", "checkpoint.every=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert [line.split(" is damaged")[0] for line in lines if line.startswith("warning")] == \
        [f"warning: checkpoint step {s}" for s in (6, 5, 4)], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(lines) <= 5, result.stderr[-3000:]


def _ptft(*args, wrapper=(), timeout=600):
    return subprocess.run([*wrapper, sys.executable, "-m", "ptft_jax.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _start(args, log: Path):
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "ptft_jax.cli", *args], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)


def _kill_when(proc, condition, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    return proc.returncode


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_kill_9_mid_save_and_at_a_random_moment_then_a_bit_identical_resume(
        tmp_path, small_corpus, objective):
    """On a sharded mesh (data 2 x fsdp 4). Both objectives are killed mid-save at a random
    step; masked LM is also killed at a random moment after its resumed run saved a step."""
    steps = 10
    extra = [*OBJECTIVES[objective], f"train.steps={steps}", "checkpoint.every=2",
             "mesh.data=2", "mesh.fsdp=4"]
    whole = tmp_path / "whole"
    pretrain(_cfg(whole, small_corpus, *extra))
    extra.append(f"data.tokenizer={whole / 'tokenizer.json'}")  # tokenizer training is not
    run = tmp_path / "killed"                                   # reproducible, nor tested here
    args = ["pretrain", "--config", "configs/pretrain_tiny_mlm.yaml",
            *_overrides(run, small_corpus, *extra)]
    ckpts = run / "checkpoints"
    rng = random.Random(objective)

    def committed():
        return [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() \
            else []

    # 1. Killed while the asynchronous save of a random step is being written (its temporary
    #    folder exists).
    mid_save_of = rng.choice([4, 6])
    proc = _start(args, tmp_path / "1.log")
    code = _kill_when(proc, lambda: ckpts.is_dir() and any(
        p.name.startswith(f"{mid_save_of}.orbax-checkpoint-tmp") for p in ckpts.iterdir()))
    assert code == -signal.SIGKILL, (tmp_path / "1.log").read_text()[-2000:]
    assert mid_save_of not in committed()
    if objective == "mlm":
        # 2. Resumed, then killed at a random moment once it has committed a step of its own.
        newest = max(committed())
        delay = rng.uniform(0.0, 0.5)
        proc = _start(args, tmp_path / "2.log")
        seen = []

        def saved_then_waited():
            if not seen and max(committed(), default=0) > newest:
                seen.append(time.monotonic())
            return bool(seen) and time.monotonic() - seen[0] >= delay
        code = _kill_when(proc, saved_then_waited)
        assert code == -signal.SIGKILL, (tmp_path / "2.log").read_text()[-2000:]
        assert "resumed at step" in (tmp_path / "2.log").read_text()
    # 3. The same run again, to the end (in this process: its step is compiled already).
    summary = pretrain(_cfg(run, small_corpus, *extra))
    assert 0 < summary["start_step"] < steps and summary["steps"] == steps

    a, b = _arrays(whole, steps), _arrays(run, steps)
    assert a.keys() == b.keys() and len(a) > 10
    assert all(np.array_equal(a[k], b[k]) for k in a), objective
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # each step once
    whole_losses = {json.loads(line)["step"]: json.loads(line)["loss"]
                    for line in (whole / "metrics.jsonl").read_text().splitlines()}
    assert all(r["loss"] == whole_losses[r["step"]] for r in rows)


def _can_mount_tmpfs(path: Path, size: str = "9m") -> bool:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True)
    return result.returncode == 0


@pytest.mark.parametrize("limit", ["file-size limit", "full disk"])
def test_a_save_that_fails_stops_the_run_and_keeps_every_earlier_step(
        base_run, tmp_path, small_corpus, limit):
    wrapper = []
    if limit == "file-size limit":  # any file past 195 KiB fails to write (EFBIG)
        run = tmp_path / "run"
        wrapper = ["bash", "-c", "trap '' XFSZ; ulimit -f 195; exec \"$@\"", "bash"]
    else:  # a 9 MB filesystem holding one step (5.6 MB) and not a second
        mount = tmp_path / "small_fs"
        if not _can_mount_tmpfs(mount):
            pytest.skip("this machine does not let the tests mount a tmpfs")
        run = mount / "run"
    try:
        (run / "checkpoints").mkdir(parents=True)
        for name in ("tokenizer.json", "data_cache", "config.yaml", "metrics.jsonl"):
            copy = shutil.copytree if (base_run / name).is_dir() else shutil.copy
            copy(base_run / name, run / name)
        shutil.copytree(base_run / "checkpoints" / "6", run / "checkpoints" / "6")
        result = _ptft("pretrain", "--config", "configs/pretrain_tiny_mlm.yaml",
                       *_overrides(run, small_corpus, "train.steps=10", "checkpoint.every=2",
                                   "checkpoint.keep=1"), wrapper=wrapper)
        assert result.returncode == 4, result.stderr[-3000:]
        line = [x for x in result.stderr.splitlines() if x.startswith("ptft pretrain: error")]
        assert len(line) == 1 and "saving checkpoint step 8" in line[0], result.stderr[-3000:]
        assert "newest: step 6" in line[0] and "run the same command to resume" in line[0]
        assert sorted(p.name for p in (run / "checkpoints").iterdir()
                      if ".orbax-checkpoint-tmp" not in p.name) == ["6"]
        integrity.check_step(run / "checkpoints" / "6")  # intact, every checksum
        good = _arrays(base_run, 6)
        kept = _arrays(run, 6)
        assert all(np.array_equal(good[k], kept[k]) for k in good)
    finally:
        if limit == "full disk":
            subprocess.run(["umount", str(tmp_path / "small_fs")], capture_output=True)


def test_a_read_only_run_dir_is_refused_before_anything_is_written(base_run, tmp_path,
                                                                    small_corpus, capsys):
    """A read-only filesystem binds root too (permission bits do not), so this runs here."""
    from ptft_jax.cli import main
    mount = tmp_path / "ro_fs"
    if not _can_mount_tmpfs(mount, "64m"):
        pytest.skip("this machine does not let the tests mount a tmpfs")
    try:
        shutil.copytree(base_run, mount / "resume")
        (mount / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        for run in (mount / "resume", mount / "fresh"):  # a resume, and a run to be created
            code = main(["pretrain", "--config", "configs/pretrain_tiny_mlm.yaml",
                         *_overrides(run, small_corpus, "train.steps=8")])
            err = capsys.readouterr().err.strip()
            assert code == 2 and len(err.splitlines()) == 1, err
            assert "run_dir" in err and "read-only" in err, err
        code = main(["tokenizer", "train", "--config", "configs/pretrain_tiny_mlm.yaml",
                     f"data.corpus={small_corpus}", "--out", str(mount / "out" / "tok.json")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "--out" in err and len(err.splitlines()) == 1, err
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
