"""Finetuning from a pretraining run, end to end: the component restores alone into a
classifier, and `ptft finetune`, `ptft eval` and `ptft predict` work on a run directory."""
import gzip
import json
import re

import jax
import numpy as np
import orbax.checkpoint as ocp

from ptft_jax.config.load import load_config
from ptft_jax.core import params as ptree
from ptft_jax.data.corpus import BUNDLED
from ptft_jax.jobs.labelled import finetune_job
from ptft_jax.train.engine import build
from tests.helpers import host_params
from tests.test_main_job import _ptft

SHORT = ["data.seq_len=32", "model.max_len=32", "train.progress=false"]


def _labelled(tmp_path, n_train=48, n_eval=20):
    """Verses labelled by whether they speak of the LORD: a task a model can learn a bit of."""
    with gzip.open(BUNDLED["kjv"], "rt", encoding="utf-8") as f:
        chapters = [next(f) for _ in range(40)]
    verses = [v.strip() for c in chapters for v in c.split(". ") if len(v.split()) > 4]
    rows = [{"text": v, "label": "lord" if "LORD" in v else "other"} for v in verses]
    paths = []
    for name, part in (("train", rows[:n_train]), ("eval", rows[n_train:n_train + n_eval])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        paths.append(path)
    return paths


def test_pretrained_component_restores_alone_into_a_classifier(tmp_path, pretrained):
    pre = pretrained
    train, _ = _labelled(tmp_path)
    cfg = load_config("configs/finetune_fortunes_full.yaml", [
        f"run_dir={tmp_path / 'ft'}", f"finetune.init_from={pre}", f"data.corpus={train}",
        "data.eval_split=null", *SHORT])
    job = finetune_job(cfg)
    engine = build(job.cfg, job.task)
    fresh = engine.init(jax.random.key(3))
    fresh_params = host_params(engine, fresh)
    state, report = job.init_from(engine, fresh)
    loaded = ptree.flatten(host_params(engine, state))
    saved = ptree.flatten(ocp.StandardCheckpointer().restore(pre / "checkpoints" / "2" /
                                                             "params"))
    component = [p for p in loaded if p.startswith("transformer/")]
    assert len(component) > 10
    for path in component:
        assert np.array_equal(loaded[path], np.asarray(saved[path])), path
    for path, value in ptree.flatten(fresh_params).items():
        if path.startswith("head/"):
            assert np.array_equal(loaded[path], value), path
    assert any("mlm_head" in line for line in report)  # the pretraining head is left out


def test_finetune_eval_and_predict_end_to_end(tmp_path, pretrained):
    pre = pretrained
    train, evaluation = _labelled(tmp_path)
    run = tmp_path / "ft"
    result = _ptft("finetune", "--config", "configs/finetune_fortunes_full.yaml",
                   f"run_dir={run}", f"finetune.init_from={pre}", f"data.corpus={train}",
                   f"data.eval_corpus={evaluation}", "data.eval_split=train", "train.steps=6",
                   "train.global_batch=8", "train.log_every=3", "eval.every=3",
                   "eval.batch_size=16", "checkpoint.every=3", *SHORT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 6 steps" in result.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/macro_f1" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(0 <= r["eval/accuracy"] <= 1 for r in evals)
    assert json.loads((run / "labels.json").read_text())["names"] == ["lord", "other"]
    assert (run / "best").is_dir() and (run / "tokenizer.json").is_file()

    result = _ptft("eval", str(run), "--corpus", str(evaluation), "--split", "train")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout)
    assert metrics["examples"] == 20 and 0 <= metrics["macro_f1"] <= 1
    # The run trained and evaluated on packed rows (the default); `ptft eval` reads padded
    # rows: the best step's metrics are the same.
    best = int(next((run / "best").iterdir()).name)
    row = next(r for r in evals if r["step"] == best)
    assert row["eval/accuracy"] == metrics["accuracy"], (row, metrics)
    assert abs(row["eval/loss"] - metrics["loss"]) < 1e-5 * max(1, abs(metrics["loss"]))

    texts = ["And the LORD spake unto Moses, saying", "In the beginning was the word"]
    result = _ptft("predict", str(run), stdin="\n".join(texts) + "\n")
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(predictions) == 2
    for p in predictions:
        assert p["label"] in ("lord", "other")
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-4

    # labels.json edited after training (here reordered: each output would take another
    # name silently) is refused, naming the labels the checkpoint was trained on.
    labels = (run / "labels.json").read_text()
    (run / "labels.json").write_text('{"kind": "classification", "names": ["other", "lord"]}')
    for command in (["predict", str(run)], ["export", str(run), str(tmp_path / "hf"),
                                            "--format", "hf"]):
        result = _ptft(*command, stdin="some text\n")
        assert result.returncode == 2 and "in this order: lord, other" in result.stderr, \
            result.stderr[-2000:]
    assert not (tmp_path / "hf").exists()
    (run / "labels.json").write_text(labels)

    # A pretraining run has no head to predict with: a clear error, nothing written.
    result = _ptft("predict", str(pre), stdin="some text\n")
    assert result.returncode == 2 and "no finetuned head" in result.stderr


def test_lora_run_exports_merged_weights_that_predict_the_same(tmp_path, pretrained):
    from ptft_jax.infer.predict import predict_run
    from ptft_jax.infer.run_export import export_run
    from ptft_jax.jobs.entry import finetune
    pre = pretrained
    train, _ = _labelled(tmp_path)
    run = tmp_path / "lora"
    finetune(load_config("configs/finetune_fortunes_lora.yaml", [
        f"run_dir={run}", f"finetune.init_from={pre}", f"data.corpus={train}",
        "data.eval_split=null", "train.steps=3", "train.global_batch=8",
        "optim.warmup_steps=0", *SHORT]))
    texts = ["And the LORD said", "a wall of stones", "unto the children"]
    before = list(predict_run(run, texts, progress=False))
    # predict packs the texts into shared rows: each is predicted as it is alone, in order.
    for text, packed in zip(texts, before):
        alone = next(predict_run(run, [text], progress=False))
        np.testing.assert_allclose(list(alone["probabilities"].values()),
                                   list(packed["probabilities"].values()), atol=1e-6)
    result = export_run(run, tmp_path / "exported")
    assert result["lora_merged"]
    after = list(predict_run(tmp_path / "exported", texts, progress=False))
    for a, b in zip(before, after):
        assert a["label"] == b["label"]
        np.testing.assert_allclose(list(a["probabilities"].values()),
                                   list(b["probabilities"].values()), atol=1e-5)
    saved = ptree.flatten(ocp.StandardCheckpointer().restore(
        tmp_path / "exported" / "checkpoints" / "3" / "params"))
    assert not any(p.startswith("lora/") for p in saved)


def test_a_packed_few_label_finetune_resumes_bit_identically(tmp_path, pretrained, capsys):
    """Packed rows (the default), dropout on, data.per_class choosing the examples: a run
    resumed from its step-2 checkpoint ends bit-identical to the run that went on."""
    import shutil

    from ptft_jax.ckpt.integrity import check_step
    from ptft_jax.jobs.entry import finetune
    train, evaluation = _labelled(tmp_path, n_train=80)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    for row in rows:  # short texts, several to a row of 32
        row["text"] = " ".join(row["text"].split()[:5])
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    per_label = [sum(r["label"] == name for r in rows) for name in ("lord", "other")]
    cfg = load_config("configs/finetune_fortunes_full.yaml", [
        f"run_dir={tmp_path / 'ft'}", f"finetune.init_from={pretrained}",
        f"data.corpus={train}", f"data.eval_corpus={evaluation}", "data.eval_split=train",
        "data.per_class=12", "train.steps=4", "train.global_batch=8", "eval.every=2",
        "checkpoint.every=2", "checkpoint.keep=3", "checkpoint.async_save=false",
        "model.dropout=0.1", *SHORT])
    assert cfg.data.packing == "pack"
    first = finetune(cfg)
    ckpts = tmp_path / "ft" / "checkpoints"
    _, a = check_step(ckpts / "4")
    shutil.rmtree(ckpts / "4")  # as if the run had been stopped after its step-2 save
    second = finetune(cfg)
    assert second["start_step"] == 2 and second["steps"] == 4
    _, b = check_step(ckpts / "4")
    for item in ("params", "opt_state"):
        for x, y in zip(jax.tree.leaves(a[item]), jax.tree.leaves(b[item])):
            assert np.array_equal(x, y), item
    assert first["eval/macro_f1"] == second["eval/macro_f1"]
    out = capsys.readouterr().out
    chosen = sum(min(12, n) for n in per_label)  # data.per_class: up to 12 of each class
    packed = re.search(rf"\| {chosen} \(packed ([\d.]+) to a row", out)
    assert packed and float(packed.group(1)) > 2, out[:300]
