"""Finetuning strategies through the one loop: what trains in each phase, frozen parameters,
LoRA, layer-wise decay, evaluation across device counts, early stopping and the best
checkpoint."""
import json

import jax
import numpy as np
import pytest

from ptft_jax.ckpt.checkpoint import BestCheckpointer, Checkpointer
from ptft_jax.ckpt.pretrained import read_params
from ptft_jax.core import params as ptree
from ptft_jax.data.labelled import Examples, LabelSpace
from ptft_jax.jobs.common import text_throughput
from ptft_jax.tasks.classify import ClassifyTask
from ptft_jax.train.engine import build
from ptft_jax.train.evaluate import evaluate
from ptft_jax.train.job import Job
from ptft_jax.train.loop import run
from tests.helpers import VOCAB, host_params, run_steps, tiny_config

LABELS = LabelSpace("classification", ("a", "b", "c"))


def cls_config(tmp_path=None, *overrides):
    return tiny_config("encoder", "train.task=classification", "data.label_column=label",
                       "model.dropout=0.1", "train.log_every=1", "train.progress=false",
                       *( [f"run_dir={tmp_path}"] if tmp_path else []), *overrides)


class CountingTask(ClassifyTask):
    """The classification task, counting how often its sums are traced (once per compile)."""
    traces = 0

    def sums(self, *args, **kw):
        CountingTask.traces += 1
        return super().sums(*args, **kw)


def examples(n, seq_len=16, seed=0, labels=LABELS):
    """n labelled examples of random tokens and lengths, laid out as finetuning feeds them."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, seq_len + 4, n)  # some get truncated
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(5, VOCAB, offsets[-1]).astype(np.int32)
    return Examples((tokens, offsets), None,
                    rng.integers(0, labels.num_outputs, n).astype(np.int32), seq_len,
                    cls_id=2, sep_id=3)


def job(cfg, task, n_train=40, eval_examples=None):
    return Job(cfg, task, examples(n_train), lambda: "synthetic", {}, lambda: None,
               text_throughput(cfg, vocab_projection=False), eval_examples)


def changed(a, b):
    fa, fb = ptree.flatten(a), ptree.flatten(b)
    return {p for p in fa if not np.array_equal(np.asarray(fa[p]), np.asarray(fb[p]))}


def test_frozen_parameters_stay_bit_identical_and_have_no_optimizer_state():
    cfg = cls_config(None, "finetune.freeze=['layers_0/', 'token_embed']")
    engine = build(cfg, ClassifyTask(cfg.model, LABELS, "cls"))
    state = engine.init(jax.random.key(0))
    before = host_params(engine, state)
    rows = examples(16)
    state, history = run_steps(engine, state, [rows.rows(np.arange(8) + 8 * i)
                                               for i in range(2)])
    frozen = {p for p in ptree.flatten(before) if "layers_0/" in p or "token_embed" in p}
    assert frozen and frozen.isdisjoint(engine.plan.trainable)
    moved = changed(before, host_params(engine, state))
    assert moved and moved.isdisjoint(frozen)
    assert moved == set(engine.plan.trainable)  # and everything that trains moved
    opt_paths = " ".join(jax.tree_util.keystr(p) for p, _ in
                         jax.tree_util.tree_leaves_with_path(engine.host_state(state).opt_state))
    assert "layers_0" not in opt_paths and "token_embed" not in opt_paths
    assert "layers_1" in opt_paths and "head" in opt_paths
    assert all(np.isfinite(h["loss"]) for h in history)


def test_lora_training_steps_leave_every_base_weight_bit_identical():
    # Through the real step (optimizer, weight decay, dropout): only the adapters and the
    # classifier head (a fresh head trains in full under LoRA) move.
    cfg = cls_config(None, "finetune.lora_rank=2", "optim.weight_decay=0.1")
    engine = build(cfg, ClassifyTask(cfg.model, LABELS, "cls"))
    state = engine.init(jax.random.key(0))
    before = host_params(engine, state)
    rows = examples(24)
    state, _ = run_steps(engine, state, [rows.rows(np.arange(8) + 8 * i) for i in range(3)])
    moved = changed(before, host_params(engine, state))
    adapters = {p for p in ptree.flatten(before) if p.startswith("lora/")}
    assert adapters and {p for p in adapters if p.endswith("/b")} <= moved
    assert {p for p in moved if not p.startswith("head/")} <= adapters


def test_linear_probe_trains_the_head_alone():
    cfg = cls_config(None, "finetune.linear_probe=true")
    engine = build(cfg, ClassifyTask(cfg.model, LABELS, "cls"))
    assert engine.plan.trainable and all(p.startswith("head/") for p in engine.plan.trainable)
    state = engine.init(jax.random.key(0))
    before = host_params(engine, state)
    rows = examples(16)  # two steps: the warmup's first learning rate is 0
    state, _ = run_steps(engine, state, [rows.rows(np.arange(8) + 8 * i) for i in range(2)])
    assert changed(before, host_params(engine, state)) == set(engine.plan.trainable)


@pytest.mark.parametrize("scan", [False, True])
def test_layer_wise_decay_gives_the_planned_per_layer_rates(scan):
    """Adam's first update is lr * factor * sign(g) (where g is not tiny): the ratio of the
    update sizes per layer is the planned decay."""
    decay, lr = 0.5, 1e-3
    cfg = cls_config(None, f"finetune.layer_decay={decay}", f"optim.learning_rate={lr}",
                     "optim.warmup_steps=0", "optim.schedule=constant", "optim.weight_decay=0",
                     "optim.clip_norm=0", "model.dropout=0.0",
                     f"model.scan_layers={str(scan).lower()}")
    engine = build(cfg, ClassifyTask(cfg.model, LABELS, "cls"))
    state = engine.init(jax.random.key(0))
    before = host_params(engine, state)
    state, _ = run_steps(engine, state, [examples(8).rows(np.arange(8))])
    after = host_params(engine, state)
    L = cfg.model.num_layers

    def median_step(path, index=None):
        delta = np.abs(ptree.flatten(after)[path] - ptree.flatten(before)[path])
        delta = delta if index is None else delta[index]
        return float(np.median(delta[delta > 0]))

    kernel = "transformer/layers{}/mlp/wi/kernel"
    for layer in range(L):
        if scan:
            got = median_step(kernel.format(""), layer)
        else:
            got = median_step(kernel.format(f"_{layer}"))
        np.testing.assert_allclose(got, lr * decay ** (L - layer), rtol=0.02)
    np.testing.assert_allclose(median_step("transformer/token_embed/embedding"),
                               lr * decay ** (L + 1), rtol=0.02)
    np.testing.assert_allclose(median_step("head/out/kernel"), lr, rtol=0.02)


@pytest.mark.parametrize("scan", [False, True])
def test_gradual_unfreezing_trains_the_planned_layers_and_compiles_once_per_phase(tmp_path,
                                                                                  scan):
    cfg = cls_config(tmp_path, "finetune.unfreeze=gradual", "finetune.unfreeze_every=2",
                     "train.steps=6", "checkpoint.every=2", "checkpoint.keep=5",
                     "checkpoint.async_save=false", f"model.scan_layers={str(scan).lower()}")
    CountingTask.traces = 0
    task = CountingTask(cfg.model, LABELS, "cls")
    summary = run(job(cfg, task))
    assert summary["steps"] == 6 and summary["phase"] == 2
    assert CountingTask.traces == 3  # one train-step compile per phase, nothing more
    ckpt = Checkpointer(tmp_path / "checkpoints")
    engine = build(cfg, task)
    init_key = jax.random.split(jax.random.key(cfg.train.seed))[0]  # as the loop splits it
    init = host_params(engine, engine.init(init_key))
    saved = {s: jax.device_get(ckpt.restore(s, engine.restore_target(), params_only=True)[0]
                               .params) for s in (2, 4, 6)}
    ckpt.close()
    moved = [changed(init, saved[2]), changed(saved[2], saved[4]), changed(saved[4], saved[6])]
    assert all(p.startswith("head/") for p in moved[0]) and moved[0]
    if scan:  # one stacked array: the top layer's slice moves, the lower one must not
        stack = "transformer/layers/mlp/wi/kernel"
        top_moved = ~np.all(ptree.flatten(saved[2])[stack][1] == ptree.flatten(saved[4])[stack][1])
        bottom_same = np.array_equal(ptree.flatten(saved[2])[stack][0],
                                     ptree.flatten(saved[4])[stack][0])
        assert top_moved and bottom_same
    else:
        assert any("layers_1/" in p for p in moved[1])
        assert not any("layers_0/" in p or "embed" in p for p in moved[1])
    assert any("token_embed" in p for p in moved[2])
    assert any(("layers_0/" in p) or ("layers/" in p) for p in moved[2])


def test_adaptive_unfreezing_unfreezes_on_a_plateau(tmp_path):
    # A learning rate too small to change the predictions, large enough to move the weights:
    # accuracy plateaus at once, so each evaluation after the first unfreezes the next layer
    # down, and more parameters move in each phase.
    cfg = cls_config(tmp_path, "finetune.unfreeze=adaptive", "finetune.unfreeze_patience=1",
                     "eval.every=1", "eval.metric=accuracy", "eval.batch_size=8",
                     "train.steps=4", "optim.learning_rate=1e-6", "model.dropout=0.0",
                     "checkpoint.every=1", "checkpoint.keep=5", "checkpoint.async_save=false")
    summary = run(job(cfg, ClassifyTask(cfg.model, LABELS, "cls"),
                      eval_examples=examples(13, seed=5)))
    assert summary["phase"] == 2  # step 1 sets the best; steps 2 and 3 each unfreeze a layer
    meta = Checkpointer(tmp_path / "checkpoints").read_meta(4)
    assert meta["progress"]["phase"] == 2 and meta["progress"]["best_step"] == 1
    saved = [read_params(tmp_path / "checkpoints" / str(s)) for s in (1, 2, 3, 4)]
    moved = [changed(a, b) for a, b in zip(saved, saved[1:])]  # in steps 2, 3 and 4
    assert moved[0] and moved[0] < moved[1] < moved[2]
    assert not any("layers_0/" in p for p in moved[1]) and any("layers_0/" in p for p in moved[2])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval/accuracy" in r for r in rows) == 4


def test_early_stopping_keeps_the_best_checkpoint(tmp_path):
    cfg = cls_config(tmp_path, "eval.every=1", "eval.metric=accuracy", "eval.early_stopping=2",
                     "eval.batch_size=8", "train.steps=20", "optim.learning_rate=1e-12",
                     "checkpoint.every=1", "checkpoint.keep=10", "model.dropout=0.0")
    task = ClassifyTask(cfg.model, LABELS, "cls")
    summary = run(job(cfg, task, eval_examples=examples(13, seed=5)))
    assert summary["steps"] == 3 and "early stopping" in summary["stop_reason"]
    assert summary["best_step"] == 1
    engine = build(cfg, task)
    best = BestCheckpointer(tmp_path / "best", "accuracy", "max")
    assert best.best_step() == 1
    restored, _ = best.restore(1, engine.restore_target())
    best.close()
    ckpt = Checkpointer(tmp_path / "checkpoints")
    step1, _ = ckpt.restore(1, engine.restore_target(), params_only=True)
    ckpt.close()
    assert not changed(jax.device_get(restored.params), jax.device_get(step1.params))


def test_eval_is_the_same_on_one_and_eight_devices():
    cfg1 = cls_config(None, "mesh.data=1")
    cfg8 = cls_config(None, "mesh.data=8")
    data = examples(37, seed=3)  # 37 = 4 full batches of 8 and a partial one
    results = []
    for cfg, devices in ((cfg1, jax.devices()[:1]), (cfg8, None)):
        engine = build(cfg, ClassifyTask(cfg.model, LABELS, "cls"), devices)
        state = engine.init(jax.random.key(0))
        results.append(evaluate(engine, state, data, 8))
    one, eight = results
    assert np.sum(one["confusion"]) == 37
    assert one["confusion"] == eight["confusion"]
    np.testing.assert_allclose(one["loss"], eight["loss"], rtol=1e-5)
    # And against predictions computed one example at a time, by hand.
    engine = build(cfg1, ClassifyTask(cfg1.model, LABELS, "cls"), jax.devices()[:1])
    state = engine.init(jax.random.key(0))
    confusion = np.zeros((3, 3), int)
    for i in range(37):
        row = {k: np.repeat(v, 8, axis=0) for k, v in data.rows(np.array([i])).items()}
        probs = np.asarray(engine.step_fn.predict(state, engine.to_device(row, 8)))[0]
        confusion[row["label"][0], int(np.argmax(probs))] += 1
    assert confusion.tolist() == one["confusion"]
