"""Magnitude pruning (finetune.prune_sparsity): the cubic schedule reaches its sparsity on the
targets only, globally or array by array; pruned weights stay exactly zero under Adam; a
resumed run prunes exactly as an unbroken one; combinations it cannot honour are refused."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ptft_jax.ckpt import integrity
from ptft_jax.config.load import load_config
from ptft_jax.config.schema import ConfigError
from ptft_jax.config.validate import validate
from ptft_jax.jobs.entry import finetune
from ptft_jax.train.prune import magnitude_pruning, pruned_share, sparsity_at
from tests.test_hf_runs import FIXTURES, _labelled
from tests.test_resume import _arrays


def _toy():
    rng = np.random.default_rng(0)
    return {"layer_a": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(16,)), jnp.float32)},
            "layer_b": {"kernel": jnp.asarray(3 * rng.normal(size=(16, 4)), jnp.float32)}}


def _train(params, tx, steps):
    state = tx.init(params)
    grad = jax.grad(lambda p: sum(jnp.sum(jnp.sin(x) * x) for x in jax.tree.leaves(p)))
    zeros = []
    for _ in range(steps):
        updates, state = jax.jit(tx.update)(grad(params), state, params)
        params = optax.apply_updates(params, updates)
        zeros.append({k: np.asarray(v["kernel"] == 0) for k, v in params.items()})
    return params, state, zeros


def test_the_cubic_schedule():
    steps = np.arange(0, 12)
    levels = np.asarray(sparsity_at(steps, 0.8, 2, 10))
    assert levels[:3].tolist() == [0, 0, 0] and np.allclose(levels[10:], 0.8)
    assert np.all(np.diff(levels[2:11]) > 0) and np.all(np.diff(levels[2:11], 2) < 1e-7)
    assert np.isclose(levels[6], 0.8 * (1 - 0.5 ** 3))


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_pruning_reaches_its_sparsity_on_the_targets_and_keeps_it(scope):
    tx = optax.chain(optax.adam(0.05), magnitude_pruning("kernel$", 0.75, 0, 4, 2, scope))
    params, state, zeros = _train(_toy(), tx, 8)
    a, b = np.asarray(params["layer_a"]["kernel"]), np.asarray(params["layer_b"]["kernel"])
    total = a.size + b.size
    if scope == "global":  # one threshold: the larger layer_b weights survive more
        assert (a == 0).sum() + (b == 0).sum() == int(0.75 * total)
        assert (b == 0).mean() < (a == 0).mean()
    else:
        assert (a == 0).sum() == int(0.75 * a.size) and (b == 0).sum() == int(0.75 * b.size)
    assert not np.any(np.asarray(params["layer_a"]["bias"]) == 0)  # not a target
    # From the last mask update (step 4) on, the same weights stay exactly 0 while Adam keeps
    # moving every other one.
    for later in zeros[4:]:
        for name in later:
            assert np.array_equal(later[name], zeros[3][name])
    assert pruned_share(state) == pytest.approx(0.75, abs=1 / total)


def _cfg(run, *extra):
    data = run.parent / "train.jsonl"  # written once: a rewritten file is another source
    data = data if data.is_file() else _labelled(run.parent)
    return load_config(None, [
        f"run_dir={run}", f"finetune.init_from=hf:{FIXTURES / 'bert_cls'}",
        f"data.corpus={data}", f"data.eval_corpus={data}", "data.label_column=label",
        "train.task=classification", "train.steps=6", "data.seq_len=24",
        "train.global_batch=8", "train.progress=false", "optim.warmup_steps=0",
        "model.dropout=0.0", "checkpoint.every=0", "checkpoint.every_minutes=1e-9",
        "checkpoint.async_save=false", "checkpoint.keep=10", "finetune.prune_sparsity=0.5",
        "eval.every=2",
        "finetune.prune_start=1", "finetune.prune_end=4", "finetune.prune_every=1", *extra])


def _params(run, step):
    return {p: v for p, v in _arrays(run, step).items() if p.startswith("params/")}


def test_a_pruned_finetune_resumes_exactly_and_its_zeros_stay(tmp_path):
    run = tmp_path / "pruned"
    summary = finetune(_cfg(run))
    final = _params(run, 6)
    targets = [p for p in final if p.startswith("params/transformer/") and
               p.endswith("kernel")]
    zeros = sum(int((final[p] == 0).sum()) for p in targets)
    assert zeros == int(0.5 * sum(final[p].size for p in targets))
    assert summary["pruned"] == pytest.approx(0.5, abs=1e-3)
    assert not any((final[p] == 0).any() for p in final if p.startswith("params/head/"))
    at_end = _params(run, 4)  # the schedule's end: the masks are fixed from here on
    for p in targets:
        assert np.array_equal(at_end[p] == 0, final[p] == 0)
    # best/ holds an evaluation at the full sparsity (step 4 or 6), never step 2's.
    best = [int(s.name) for s in integrity.step_folders(run / "best")]
    assert best and all(step >= 4 for step in best) and summary["best_step"] >= 4
    masks = [v for p, v in _arrays(run, 6).items() if p.startswith("opt_state/") and
             v.dtype == np.bool_ and v.ndim]
    assert len(masks) == len(targets)

    # A run that lost its steps after 2 resumes from step 2 and ends bit-identical.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for step in integrity.step_folders(resumed / "checkpoints"):
        if int(step.name) > 2:
            shutil.rmtree(step)
    shutil.rmtree(resumed / "best", ignore_errors=True)
    finetune(_cfg(resumed))
    again = _arrays(resumed, 6)
    for path, value in _arrays(run, 6).items():
        np.testing.assert_array_equal(again[path], value, err_msg=path)


def test_what_pruning_cannot_honour_is_refused(tmp_path):
    for extra, says in ((["finetune.lora_rank=2"], "lora_rank"),
                        (["finetune.unfreeze=gradual"], "unfreeze"),
                        (["finetune.prune_end=9"], "prune_end"),
                        (["finetune.prune_sparsity=1.0"], "prune_sparsity")):
        with pytest.raises(ConfigError, match=says):
            validate(_cfg(tmp_path / "x", *extra), 8)
    with pytest.raises(ConfigError, match="matches no trainable parameter"):
        finetune(_cfg(tmp_path / "probe", "finetune.linear_probe=true"))
    assert not (tmp_path / "probe" / "checkpoints").exists()
