"""The best checkpoint and the divergence guard: no checkpoint holding a NaN or inf is ever
written (best/ included), a diverged evaluation is never the best, and a damaged best/ is
passed over, saying so, for the newest intact step."""
import json
import shutil

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ptft_jax.ckpt import integrity
from ptft_jax.ckpt.checkpoint import Checkpointer
from ptft_jax.cli import main
from ptft_jax.core.state import TrainState
from tests.test_faults import _biggest_data_file, _truncate
from tests.test_finetune_job import SHORT, _labelled


def _state(value):
    params = {"dense": {"kernel": np.full((4, 3), value, np.float32),
                        "bias": np.zeros(3, np.float32)}}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None,
                      model_state={})


def test_a_state_holding_nan_is_never_saved_and_one_read_back_is_damage(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(1, _state(0.5), {})
    with pytest.raises(integrity.StateNotFinite, match=r"step 2 .*params/dense/kernel"):
        ckpt.save(2, _state(np.nan), {})
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    # A step written by something else (or by a ptft from before this check): damage.
    step = tmp_path / "checkpoints" / "1"
    shutil.rmtree(step / "params")
    with ocp.StandardCheckpointer() as writer:
        writer.save(step / "params", _state(np.inf).params)
    meta = json.loads((step / "meta" / "metadata").read_text())
    meta.pop("checksums")
    (step / "meta" / "metadata").write_text(json.dumps(meta))
    with pytest.raises(integrity.CheckpointDamaged, match="non-finite values .* params/dense"):
        integrity.check_step(step)


def _finetune(tmp_path, pre, run, *extra):
    train, evaluation = _labelled(tmp_path)
    return main(["finetune", "--config", "configs/finetune_fortunes_full.yaml",
                 f"run_dir={run}", f"finetune.init_from={pre}", f"data.corpus={train}",
                 f"data.eval_corpus={evaluation}", "data.eval_split=train",
                 "train.global_batch=8", "train.log_every=2", "eval.every=2",
                 "eval.batch_size=16", "checkpoint.every=2", "checkpoint.keep=5",
                 "optim.warmup_steps=0", *SHORT, *extra])


def test_a_diverging_finetune_keeps_no_non_finite_best_and_eval_says_so(tmp_path, pretrained,
                                                                        capsys):
    run = tmp_path / "diverged"
    code = _finetune(tmp_path, pretrained, run, "train.steps=20", "optim.learning_rate=1e6",
                     "train.max_skipped_steps=3")
    err = capsys.readouterr().err
    assert code == 3, err[-3000:]
    assert "diverged" in err
    steps = [*integrity.step_folders(run / "best"), *integrity.step_folders(run / "checkpoints")]
    for step_dir in steps:  # whatever was saved before the divergence is finite and intact
        integrity.check_step(step_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # null where a value was not finite: JSON, never NaN
        assert all(v is None or not isinstance(v, float) or np.isfinite(v)
                   for v in row.values()), row
    code = main(["eval", str(run)])
    out, err = capsys.readouterr()
    if steps:
        assert code == 0 and all(np.isfinite(v) for v in json.loads(out).values()
                                 if isinstance(v, float)), err[-2000:]
    else:
        assert code == 2 and "holds no checkpoint" in err and "Traceback" not in err


def test_a_damaged_best_is_passed_over_for_the_newest_intact_step(tmp_path, pretrained,
                                                                  capsys):
    run = tmp_path / "run"
    assert _finetune(tmp_path, pretrained, run, "train.steps=4") == 0
    best = integrity.step_folders(run / "best")[0]
    _truncate(_biggest_data_file(best / "params"))
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"best/{best.name}" in warnings[0] and \
        "reading checkpoints/4 instead" in warnings[0], err[-2000:]
    assert json.loads(out)["checkpoint"].endswith("(step 4)")
    # With every step damaged: refused, naming what to do.
    for step_dir in integrity.step_folders(run / "checkpoints"):
        (step_dir / "meta" / "metadata").write_text("[]")
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "holds no intact checkpoint" in err and "checkpoints verify" in err
    # Training moves a damaged best/ aside at its end, saying what inference reads instead.
    moved = integrity.move_aside_damaged(run / "best")
    assert [m[0] for m in moved] == [int(best.name)] and not best.exists()
