"""Resuming a run directory: what may and may not change. (The bit-identical resume after a
kill -9, mid-save included, is tested in test_faults.py.)"""
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ptft_jax.config.load import load_config
from ptft_jax.config.schema import ConfigError
from ptft_jax.jobs.entry import pretrain


def _cfg(run_dir, corpus, *extra):
    """A tiny run. Both runs of a comparison share one tokenizer file: HF's WordPiece training
    is not reproducible (ties broken in hash order), and tokenizer training is not under test."""
    return load_config("configs/pretrain_tiny_mlm.yaml", [
        f"run_dir={run_dir}", f"data.corpus={corpus}", "data.tokenizer_vocab_size=512",
        "data.seq_len=32", "model.max_len=32", "train.steps=6", "train.global_batch=8",
        "train.log_every=1", "train.progress=false", "checkpoint.every=3", "checkpoint.keep=5",
        "optim.warmup_steps=2", "mesh.data=2", "mesh.fsdp=4", *extra])


def _arrays(run_dir, step):
    """Every array of a checkpoint step, read straight from disk with Orbax."""
    out = {}
    for item in ("params", "opt_state"):
        tree = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / item)
        for path, leaf in _flat(tree, item):
            out[path] = np.asarray(leaf)
    return out


def _flat(tree, prefix):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flat(v, f"{prefix}/{i}")
    elif tree is not None:
        yield prefix, tree


def test_finished_run_directory_is_not_overwritten(tmp_path, small_corpus):
    run = tmp_path / "run"
    pretrain(_cfg(run, small_corpus, "train.steps=3"))
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="nothing to do"):
        pretrain(_cfg(run, small_corpus, "train.steps=3"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_resume_with_another_model_shape_fails_before_training(tmp_path, small_corpus):
    run = tmp_path / "run"
    pretrain(_cfg(run, small_corpus, "train.steps=3"))
    from ptft_jax.ckpt.checkpoint import CheckpointMismatch
    with pytest.raises(CheckpointMismatch, match="mlp/wi/kernel"):
        pretrain(_cfg(run, small_corpus, "train.steps=6", "model.mlp_dim=256"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3"]


def test_resume_on_a_changed_data_stream_is_refused(tmp_path, small_corpus):
    run = tmp_path / "run"
    pretrain(_cfg(run, small_corpus, "train.steps=3"))
    with pytest.raises(ConfigError, match="different data stream \\(seed"):
        pretrain(_cfg(run, small_corpus, "train.steps=6", "data.shuffle_seed=7"))
    with pytest.raises(ConfigError, match="different data stream \\(rows_per_epoch"):
        pretrain(_cfg(run, small_corpus, "train.steps=6", "data.packing=pad"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3"]


def test_model_vocabulary_must_fit_the_tokenizer(tmp_path, small_corpus):
    with pytest.raises(ConfigError, match="model.vocab_size is 1000 but the tokenizer has 512"):
        pretrain(_cfg(tmp_path / "run", small_corpus, "model.vocab_size=1000"))
    assert not (tmp_path / "run").exists()
