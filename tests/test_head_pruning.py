"""Attention-head pruning (`ptft export --prune-heads K`, infer/head_pruning.py): a head's score
is the gradient of a gate on its output (checked by finite differences); the pruned, smaller
model computes what the full model computes with those heads silenced, scanned or not; the
exported run is smaller and read by predict, eval and init_from; what it cannot do is refused."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptft_jax.cli import main
from ptft_jax.config.load import load_config, load_run_config
from ptft_jax.config.schema import ConfigError, ModelConfig
from ptft_jax.core.params import flatten, stack_layers, unflatten
from ptft_jax.data.labelled import LabelSpace
from ptft_jax.infer.head_pruning import head_importance, kept_heads, prune_heads
from ptft_jax.jobs.entry import finetune
from ptft_jax.tasks.classify import ClassifyTask
from tests.test_hf_runs import SHORT
from tests.test_packed_finetune import _examples

HEADS = 4


def _task(scanned=False, heads=HEADS, head_dim=None):
    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=heads,
                      head_dim=head_dim, mlp_dim=32, max_len=32, scan_layers=scanned)
    return ClassifyTask(cfg, LabelSpace("classification", ("a", "b", "c")), "mean")


def _setup():
    batch = {k: jnp.asarray(v) for k, v in _examples(n=8).rows(np.arange(8)).items()}
    task = _task()
    params = nn.unbox(task.init_variables(jax.random.key(0), batch)["params"])
    return task, jax.tree.map(np.asarray, params), batch


def test_a_heads_score_is_the_gradient_of_a_gate_on_its_output():
    task, params, batch = _setup()
    scores = head_importance(task, params, {}, [batch], 2)
    assert scores.shape == (2, HEADS)
    for layer, head in ((0, 1), (1, 3)):
        def gated(xi):  # head `head`'s output times xi
            p = {k: jnp.asarray(v) for k, v in flatten(params).items()}
            path = f"transformer/layers_{layer}/attn/out/kernel"
            p[path] = p[path].at[head].multiply(xi)
            sums, _ = task.sums(unflatten(p), {}, batch, jnp.arange(8), jax.random.key(0),
                                train=False)
            return sums["loss_sum"]
        gate = jax.grad(gated)(1.0)
        assert scores[layer, head] == pytest.approx(abs(float(gate)), rel=1e-4, abs=1e-9)
        # and the gradient is what the loss does when the head is turned up and down
        eps = 0.05
        finite = (float(gated(1 + eps)) - float(gated(1 - eps))) / (2 * eps)
        assert finite == pytest.approx(float(gate), rel=0.3, abs=2e-4)
    # A silent head (its output rows zero) scores 0 and is the first to go.
    silent = {k: v.copy() for k, v in flatten(params).items()}
    silent["transformer/layers_1/attn/out/kernel"][2] = 0.0
    scores = head_importance(task, unflatten(silent), {}, [batch], 2)
    assert scores[1, 2] == 0.0 and 2 not in kept_heads(scores, HEADS - 1)[1]


@pytest.mark.parametrize("scanned", [False, True])
def test_the_pruned_model_is_the_full_model_with_those_heads_silenced(scanned):
    task, params, batch = _setup()
    kept = np.array([[0, 3], [1, 2]])
    silenced = {k: v.copy() for k, v in flatten(params).items()}
    for layer, drop in ((0, [1, 2]), (1, [0, 3])):
        silenced[f"transformer/layers_{layer}/attn/out/kernel"][drop] = 0.0
    silenced = unflatten(silenced)
    if scanned:
        params, silenced = stack_layers(params), stack_layers(silenced)
    full = _task(scanned).model
    small = _task(scanned, heads=2, head_dim=4).model
    pruned = prune_heads(params, kept)
    assert pruned["transformer"]["layers" if scanned else "layers_0"]["attn"]["query"][
        "kernel"].shape[-2:] == (2, 4)
    inputs = task.model_inputs(batch)
    expected = full.apply({"params": silenced}, *inputs)
    np.testing.assert_allclose(small.apply({"params": pruned}, *inputs), expected,
                               rtol=1e-5, atol=1e-6)


def test_an_exported_pruned_run_is_smaller_and_reads_like_any_run(tmp_path, lora_run, capsys):
    out = tmp_path / "pruned"
    main(["export", str(lora_run), str(out), "--prune-heads", "1"])
    assert "pruned to 1 of 2 per layer" in capsys.readouterr().out
    cfg = load_run_config(out)
    assert (cfg.model.num_heads, cfg.model.head_dim) == (1, cfg.model.hidden_size // 2)
    assert cfg.finetune.lora_rank == 0
    (tmp_path / "in.txt").write_text("the lord said unto the king\nand he was a man\n")
    main(["predict", str(out), "--input", str(tmp_path / "in.txt")])
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(answers) == 2 and all(abs(sum(a["probabilities"].values()) - 1) < 1e-4
                                     for a in answers)
    # A pruned run is a start for more finetuning (its shape comes with it) ...
    summary = finetune(load_config(None, [
        f"run_dir={tmp_path / 'recover'}", f"finetune.init_from={out}",
        f"data.corpus={_corpus(tmp_path)}", "train.task=classification",
        "data.label_column=label", "train.steps=2", "data.seq_len=24", *SHORT]))
    assert summary["steps"] == 2
    assert load_run_config(tmp_path / "recover").model.head_dim == cfg.model.head_dim
    # ... and what cannot hold it says so.
    for argv, message in (
            (["export", str(out), str(tmp_path / "hf"), "--format", "hf"], "heads were pruned"),
            (["export", str(lora_run), str(tmp_path / "x"), "--prune-heads", "2"],
             "keep between 1 and 1"),
            (["export", str(lora_run), str(tmp_path / "y"), "--prune-heads", "1", "--format",
              "onnx"], "--format ptft")):
        assert main(argv) != 0
        assert message in capsys.readouterr().err
        assert not (tmp_path / argv[2]).exists()
    with pytest.raises(ConfigError, match="text classifiers"):
        from ptft_jax.infer.head_pruning import check_prunable
        check_prunable(load_config(None, ["train.task=mlm"]), 1)


def _corpus(tmp_path):
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps({"text": f"the king said {i}", "label": "neg pos".split()
                                        [i % 2]}) + "\n" for i in range(16)))
    return path
