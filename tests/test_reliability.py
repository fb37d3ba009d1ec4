"""Reliability: a diverging run never overwrites good checkpoints and exits non-zero, and the
metrics log stays valid JSON."""
import json

import numpy as np
import orbax.checkpoint as ocp

from ptft_jax.core import params as ptree

TINY = ["data.seq_len=64", "model.max_len=64", "train.global_batch=8", "train.progress=false",
        "train.log_every=2", "optim.warmup_steps=0"]


def _params(step_dir):
    return ptree.flatten(ocp.StandardCheckpointer().restore(step_dir / "params"))


def test_injected_nan_keeps_the_last_good_checkpoint_and_exits_non_zero(tmp_path, small_corpus,
                                                                        capsys):
    from ptft_jax.cli import main
    run = tmp_path / "run"
    common = ["--config", "configs/pretrain_tiny_mlm.yaml", f"run_dir={run}",
              f"data.corpus={small_corpus}", "data.tokenizer_vocab_size=512",
              "checkpoint.every=1", "checkpoint.keep=1", "checkpoint.async_save=false", *TINY]
    assert main(["pretrain", *common, "train.steps=4"]) == 0
    good = _params(run / "checkpoints" / "4")
    capsys.readouterr()
    # Resumed with a learning rate that sends the loss to inf / NaN within a few steps.
    code = main(["pretrain", *common, "train.steps=40", "optim.learning_rate=1e12",
                 "train.max_skipped_steps=3"])
    err = capsys.readouterr().err
    assert code == 3, err[-3000:]
    assert "diverged: 3 steps in a row" in err
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1  # keep=1, and still a checkpoint: the newest one saved
    kept = _params(run / "checkpoints" / str(steps[0]))
    assert all(np.all(np.isfinite(v)) for v in kept.values())
    if steps[0] == 4:
        assert all(np.array_equal(kept[p], good[p]) for p in good)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("skipped_steps") for r in rows)
    for r in rows:  # valid JSON (json.loads would take NaN; check no float is non-finite)
        assert all(v is None or not isinstance(v, float) or np.isfinite(v) for v in r.values())


BAD_INPUTS = [
    (["data.shuffle_seed=-1"], "data.shuffle_seed"),
    (["data.prefetch=0"], "data.prefetch"),
    (["data.prefetch=-1"], "data.prefetch"),
    (["data.tokenizer_vocab_size=10"], "data.tokenizer_vocab_size"),
    (["data.tokenizer_vocab_size=0"], "data.tokenizer_vocab_size"),
    (["optim.weight_decay_rules=[['bias$', 'no'], ['.*', true]]"], "optim.weight_decay_rules"),
    (["model.attention=cudnn"], "model.attention"),
    (["train.loss_spike_factor=0.5"], "train.loss_spike_factor"),
    (["train.max_skipped_steps=0"], "train.max_skipped_steps"),
    (["checkpoint.every_minutes=-1"], "checkpoint.every_minutes"),
]


def test_bad_inputs_get_a_one_line_error_naming_the_key_and_write_nothing(tmp_path, capsys):
    from ptft_jax.cli import main
    for i, (overrides, key) in enumerate(BAD_INPUTS):
        run = tmp_path / f"run{i}"
        code = main(["pretrain", "--config", "configs/pretrain_tiny_mlm.yaml", f"run_dir={run}",
                     *overrides])
        err = capsys.readouterr().err.strip()
        assert code == 2, (overrides, err)
        assert len(err.splitlines()) == 1 and key in err, (overrides, err)
        assert not run.exists(), overrides
    assert main(["bench", "--steps", "0", "--out", str(tmp_path / "bench")]) == 2
    assert "--steps" in capsys.readouterr().err and not (tmp_path / "bench").exists()


def test_run_dir_and_cache_dir_that_are_files_are_refused(tmp_path, capsys):
    from ptft_jax.cli import main
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for overrides, key in ([f"run_dir={a_file}"], "run_dir"), \
            ([f"run_dir={a_file / 'run'}"], "run_dir"), \
            ([f"run_dir={tmp_path / 'run'}", f"data.cache_dir={a_file}"], "data.cache_dir"):
        code = main(["pretrain", "--config", "configs/pretrain_tiny_mlm.yaml", *overrides])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and key in err, (overrides, err)
    assert a_file.read_text() == "mine" and not (tmp_path / "run").exists()


def test_resume_with_settings_that_break_exact_resume_is_refused(tmp_path, small_corpus, capsys):
    from ptft_jax.cli import main
    run = tmp_path / "run"
    common = ["pretrain", "--config", "configs/pretrain_tiny_mlm.yaml", f"run_dir={run}",
              f"data.corpus={small_corpus}", "data.tokenizer_vocab_size=512",
              "checkpoint.async_save=false", *TINY]
    assert main([*common, "train.steps=2"]) == 0
    config = (run / "config.yaml").read_text()
    capsys.readouterr()
    for override, key in (("train.seed=1", "train.seed"), ("optim.clip_norm=0", "optim.clip_norm"),
                          ("data.shuffle_seed=5", "data.shuffle_seed")):
        assert main([*common, "train.steps=4", override]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and key in err and "new run_dir" in err, err
    assert (run / "config.yaml").read_text() == config
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_a_rule_that_matches_nothing_is_an_error_unless_it_is_the_last_catch_all(tmp_path,
                                                                                  capsys):
    from ptft_jax.cli import main
    run = tmp_path / "run"
    code = main(["pretrain", "--config", "configs/pretrain_tiny_mlm.yaml", f"run_dir={run}",
                 "optim.weight_decay_rules=[['bais$', false], ['.*', true]]", *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "'bais$' matches no parameter" in err and len(err.splitlines()) == 1
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()
    code = main(["tokenizer", "train", "--config", "configs/pretrain_tiny_mlm.yaml",
                 "--out", str(tmp_path)])
    assert code == 2 and "--out" in capsys.readouterr().err
