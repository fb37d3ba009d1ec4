"""A real multi-host run: two OS processes join with `jax.distributed` on 127.0.0.1 (gloo CPU
collectives), train a few steps on a mesh that spans both, and agree with a single-process run
over the same four devices: same losses and saved weights, checkpoints written by both
processes together."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ptft_jax.ckpt.pretrained import read_params
from ptft_jax.core.params import flatten
from tests.xla_flags import fake_devices

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pretrain_tiny_mlm.yaml"
TIMEOUT_S = 300  # per group of processes
FAILURE_GRACE_S = 10  # after one process fails, before its peers are killed
STEPS = 4


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(num_devices: int) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", HF_DATASETS_OFFLINE="1",
               XLA_FLAGS=fake_devices(num_devices),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    return env


def _overrides(corpus: str, run_dir: Path) -> list[str]:
    return [f"data.corpus={corpus}", "data.tokenizer_vocab_size=512", "data.seq_len=32",
            "model.max_len=32", f"train.steps={STEPS}", "train.global_batch=8",
            "train.log_every=1", "train.progress=false", "checkpoint.every=2",
            "mesh.data=2", "mesh.fsdp=2", f"run_dir={run_dir}"]


def _start(overrides: list[str], num_devices: int, log_dir: Path, name: str):
    """Starts `ptft pretrain`, its stdout/stderr going to files (no pipe can fill and block)."""
    out = open(log_dir / f"{name}.out", "w")
    err = open(log_dir / f"{name}.err", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ptft_jax.cli", "pretrain", "--config", str(CONFIG), *overrides],
        cwd=REPO, env=_env(num_devices), stdout=out, stderr=err)
    out.close()
    err.close()
    return proc


def _wait_all(procs: dict, log_dir: Path) -> None:
    """Waits for every process; fails with each one's stderr tail. On a timeout, or once one
    process has failed (its peers would only hang in a collective), the rest are killed."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        codes = {name: proc.poll() for name, proc in procs.items()}
        if all(code is not None for code in codes.values()):
            break
        if any(code not in (None, 0) for code in codes.values()):
            deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        time.sleep(0.2)
    codes = {}
    for name, proc in procs.items():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            codes[name] = "killed"
        else:
            codes[name] = proc.returncode
    if any(code != 0 for code in codes.values()):
        tails = "\n".join(f"--- {name} (exit {codes[name]}) stderr tail ---\n"
                          + (log_dir / f"{name}.err").read_text()[-3000:] for name in procs)
        raise AssertionError(f"a run failed: {codes}\n{tails}")


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def test_two_processes_match_one_process(small_corpus, tmp_path):
    multi_dir, single_dir = tmp_path / "multi", tmp_path / "single"
    port = _free_port()
    workers = {
        f"worker{i}": _start(_overrides(small_corpus, multi_dir) + [
            "distributed.enabled=true", f"distributed.coordinator_address=127.0.0.1:{port}",
            "distributed.num_processes=2", f"distributed.process_id={i}"],
            num_devices=2, log_dir=tmp_path, name=f"worker{i}")
        for i in range(2)}
    _wait_all(workers, tmp_path)
    # The reference: one process, four devices, the same mesh. Tokenizer training breaks ties
    # in hash order, so it takes the multi-host run's tokenizer rather than training its own.
    tokenizer = multi_dir / "tokenizer.json"
    assert tokenizer.is_file()
    _wait_all({"single": _start(_overrides(small_corpus, single_dir) + [
        f"data.tokenizer={tokenizer}"], num_devices=4, log_dir=tmp_path, name="single")},
        tmp_path)

    multi, ref = _losses(multi_dir), _losses(single_dir)
    assert sorted(multi) == list(range(1, STEPS + 1)), multi
    assert sorted(ref) == list(range(1, STEPS + 1)), ref
    np.testing.assert_allclose([multi[s] for s in sorted(multi)], [ref[s] for s in sorted(ref)],
                               rtol=1e-4)
    # Only process 0 writes metrics, and the run saved steps 2 and 4 (every process took part).
    assert [p.name for p in multi_dir.rglob("*.jsonl")] == ["metrics.jsonl"]
    assert {2, 4} <= {int(p.name) for p in (multi_dir / "checkpoints").iterdir()
                      if p.name.isdigit()}
    # The saved weights agree too, every array of them, not only the losses.
    saved = {name: flatten(read_params(d / "checkpoints" / str(STEPS)))
             for name, d in (("multi", multi_dir), ("single", single_dir))}
    assert saved["multi"].keys() == saved["single"].keys() and len(saved["multi"]) > 10
    for path, value in saved["multi"].items():
        np.testing.assert_allclose(value, saved["single"][path], rtol=1e-4, atol=1e-6,
                                   err_msg=path)


LOADER_SCRIPT = """
import json, sys
import numpy as np
from ptft_jax.config.schema import DistributedConfig, MeshConfig
from ptft_jax.data.loader import BatchLoader
from ptft_jax.core.mesh import batch_sharding, initialize_distributed, make_mesh, process_rows

port, process_id, out = sys.argv[1:4]
initialize_distributed(DistributedConfig(enabled=True, coordinator_address=f"127.0.0.1:{port}",
                                         num_processes=2, process_id=int(process_id)))
rows = process_rows(batch_sharding(make_mesh(MeshConfig(data=2, fsdp=2))), 8)

class Rows:  # 40 rows of a dataset; what each process reads is all that matters here
    def __len__(self):
        return 40
    def rows(self, index):
        return {"tokens": np.asarray(index)}

loader = BatchLoader(Rows(), 8, 0, rows)
with open(out, "w") as f:
    json.dump({"rows": [rows.start, rows.stop],
               "seen": [loader.batch(step)["tokens"].tolist() for step in range(10)]}, f)
"""


def test_two_processes_read_every_row_of_an_epoch_exactly_once(tmp_path):
    port = _free_port()
    procs = {}
    for i in range(2):
        err = open(tmp_path / f"loader{i}.err", "w")
        procs[f"loader{i}"] = subprocess.Popen(
            [sys.executable, "-c", LOADER_SCRIPT, str(port), str(i), str(tmp_path / f"{i}.json")],
            cwd=REPO, env=_env(2), stdout=subprocess.DEVNULL, stderr=err)
        err.close()
    _wait_all(procs, tmp_path)
    first, second = (json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2))
    # Each process holds its own half of every global batch of 8 ...
    assert sorted([first["rows"], second["rows"]]) == [[0, 4], [4, 8]]
    # ... and over 10 steps (two epochs of 40 rows) together they read each row once per epoch.
    for epoch in range(2):
        steps = range(epoch * 5, epoch * 5 + 5)
        seen = [r for s in steps for r in first["seen"][s] + second["seen"][s]]
        assert sorted(seen) == list(range(40))


def test_two_processes_stop_together_when_one_sees_a_non_finite_loss(tmp_path):
    """A regression label of 1e30 (a finite float32) squares to inf: the process whose rows
    hold it computes a non-finite loss, the globally reduced flag skips the step on both, and
    with train.max_skipped_steps=1 both stop with exit code 3, every saved step finite."""
    import gzip

    from ptft_jax.data.corpus import BUNDLED
    with gzip.open(BUNDLED["kjv"], "rt", encoding="utf-8") as f:
        verses = [v.strip() for _ in range(20) for v in next(f).split(". ")
                  if len(v.split()) > 4][:64]
    rows = [{"text": v, "label": float(len(v.split()))} for v in verses]
    rows[37]["label"] = 1e30
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from ptft_jax.data.tokenizer import train_tokenizer
    tokenizer = tmp_path / "tokenizer.json"
    train_tokenizer("encoder", verses, 512).save(str(tokenizer))
    run = tmp_path / "run"
    port = _free_port()
    common = [f"data.corpus={data}", f"data.tokenizer={tokenizer}",
              "data.eval_split=null", "data.seq_len=32", "model.max_len=32",
              # one example per row: the bad one comes at a known place in the epoch
              "data.packing=pad",
              "train.task=regression", "train.steps=24", "train.global_batch=8",
              "train.log_every=1", "train.progress=false", "train.max_skipped_steps=1",
              "checkpoint.every=1", "mesh.data=2", "mesh.fsdp=2", f"run_dir={run}",
              "distributed.enabled=true", f"distributed.coordinator_address=127.0.0.1:{port}",
              "distributed.num_processes=2"]
    procs = {}
    for i in range(2):
        out, err = (open(tmp_path / f"nan{i}.{s}", "w") for s in ("out", "err"))
        procs[i] = subprocess.Popen(
            [sys.executable, "-m", "ptft_jax.cli", "finetune", "--config",
             str(REPO / "configs" / "finetune_fortunes_scratch.yaml"), *common,
             f"distributed.process_id={i}"], cwd=REPO, env=_env(2), stdout=out, stderr=err)
        out.close()
        err.close()
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
        time.sleep(0.2)
    for p in procs.values():  # one that did not stop is a failure: it would wait forever
        if p.poll() is None:
            p.kill()
    codes = {i: p.wait() for i, p in procs.items()}
    errs = {i: (tmp_path / f"nan{i}.err").read_text() for i in procs}
    assert codes == {0: 3, 1: 3}, (codes, {i: e[-2000:] for i, e in errs.items()})
    assert all("diverged: 1 steps in a row" in e for e in errs.values())
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    losses = _losses(run)
    assert all(np.isfinite(losses[s]) for s in saved)
    assert len(saved) < 24  # it stopped early, at the epoch's step that holds the bad row
    from ptft_jax.ckpt.integrity import check_step
    for step in saved:
        check_step(run / "checkpoints" / str(step))


def test_two_processes_finetune_on_packed_rows_and_end_cleanly(tmp_path):
    """A 2-process finetune on packed rows with evaluation and a best checkpoint: both
    processes report the same metrics and exit 0 (the end-of-run read-back of best/ once hung
    the shutdown barrier under jax.distributed)."""
    import gzip

    from ptft_jax.data.corpus import BUNDLED
    from ptft_jax.data.tokenizer import train_tokenizer
    with gzip.open(BUNDLED["kjv"], "rt", encoding="utf-8") as f:
        texts = [s.strip() for _ in range(40) for s in next(f).split(";")[:5]
                 if len(s.strip()) > 10][:200]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "lord" if "LORD" in t else "other"})
                            + "\n" for t in texts))
    train_tokenizer("encoder", texts, 512).save(str(tmp_path / "tokenizer.json"))
    port, run = _free_port(), tmp_path / "run"
    common = [f"data.corpus={data}", f"data.tokenizer={tmp_path / 'tokenizer.json'}",
              "data.eval_split=train", "data.seq_len=64", "model.max_len=64", "train.steps=4",
              "train.global_batch=16", "eval.every=2", "eval.batch_size=16",
              "train.progress=false", "checkpoint.every=2", "mesh.data=2", "mesh.fsdp=2",
              f"run_dir={run}", "distributed.enabled=true",
              f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2"]
    procs = {i: subprocess.Popen(
        [sys.executable, "-m", "ptft_jax.cli", "finetune", "--config",
         str(REPO / "configs" / "finetune_fortunes_scratch.yaml"), *common,
         f"distributed.process_id={i}"], cwd=REPO, env=_env(2), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)}
    outs = {i: p.communicate(timeout=TIMEOUT_S) for i, p in procs.items()}
    assert {i: p.returncode for i, p in procs.items()} == {0: 0, 1: 0}, \
        {i: err[-2000:] for i, (_, err) in outs.items()}
    assert "packed" in outs[0][0]
    assert len([line for line in outs[0][0].splitlines() if "eval/" in line]) == 2
    final = [out.rsplit("eval macro_f1", 1)[-1] for out, _ in outs.values()]  # "done:" lines
    assert final[0] == final[1] and "best" in final[0], final
    assert (run / "best").is_dir()
