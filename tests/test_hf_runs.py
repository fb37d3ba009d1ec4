"""Runs that start from a Hugging Face directory and export back: finetuning a classifier
(LoRA merged on export), continued MLM pretraining and CLM training of a GPT-2, each exported
with `ptft export --format hf` and read back: by ptft always, by `transformers` where torch
is installed, with the same outputs."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from ptft_jax.ckpt.pretrained import first_intact, read_params
from ptft_jax.config import hf
from ptft_jax.config.load import load_config
from ptft_jax.config.schema import ModelConfig
from ptft_jax.convert.hf import flat_params
from ptft_jax.core.lora import lora_spec, merge
from ptft_jax.core.params import unflatten
from ptft_jax.data.labelled import predict_examples
from ptft_jax.data.tokenizer import load_tokenizer
from ptft_jax.infer.export import export_hf
from ptft_jax.jobs.entry import finetune, pretrain
from ptft_jax.models.heads import Classifier
from ptft_jax.models.transformer import LanguageModel
from tests.test_main_job import _ptft

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
SHORT = ["train.progress=false", "train.global_batch=8", "checkpoint.every=0",
         "optim.warmup_steps=0", "model.dropout=0.0"]
TEXTS = ["the lord said unto the king", "and he was a man of the land", "in the house of god"]


def _labelled(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    words = "the of and to in that he his for is with it not be they as was shall unto lord".split()
    rows = [{"text": " ".join(rng.choice(words, 8)), "label": ["pos", "neg", "neu"][i % 3]}
            for i in range(30)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _transformers():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def test_classifier_from_hf_finetunes_and_exports_back(tmp_path, capsys):
    run, out = tmp_path / "cls", tmp_path / "hf_out"
    cfg = load_config(None, [
        f"run_dir={run}", f"finetune.init_from=hf:{FIXTURES / 'bert_cls'}",
        f"data.corpus={_labelled(tmp_path)}", "data.label_column=label",
        "train.task=classification", "train.steps=3", "data.seq_len=32",
        "finetune.lora_rank=2", "finetune.lora_targets=attn/(query|value)/kernel$", *SHORT])
    summary = finetune(cfg)
    assert summary["steps"] == 3
    log = capsys.readouterr().out
    assert "classifier output layer kept" in log  # same label names: the HF head is reused

    # ptft embed reads a run directory too (LoRA merged), from stdin, JSONL to stdout.
    result = _ptft("embed", str(run), "--pooling", "cls", stdin="\n".join(TEXTS) + "\n")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in rows] == TEXTS
    assert all(abs(np.linalg.norm(r["embedding"]) - 1) < 1e-5 for r in rows)
    assert len(rows[0]["embedding"]) == 24

    result = _ptft("export", str(run), str(out), "--format", "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA adapters merged" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}

    # ptft reads its own export back: the same probabilities as the run predicts.
    from ptft_jax.infer.predict import predict_run
    before = [list(p["probabilities"].values()) for p in predict_run(run, TEXTS,
                                                                     progress=False)]
    model = hf.open_model(f"hf:{out}")
    flat, _ = flat_params(model)
    model_cfg = ModelConfig(**{**model.model_keys(), "dropout": 0.0}, dtype="float32")
    examples = predict_examples(TEXTS, load_tokenizer(out / "tokenizer.json"), 32, "encoder")
    batch = examples.rows(np.arange(len(TEXTS)))
    logits = Classifier(model_cfg, 3, "cls").apply(
        {"params": unflatten(flat)}, batch["tokens"], batch["segment_ids"],
        batch["positions"], batch["type_ids"])
    np.testing.assert_allclose(np.asarray(jax.nn.softmax(logits)), before, atol=1e-5)

    try:
        transformers = _transformers()
    except pytest.skip.Exception:
        return
    import torch
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**batch).logits, -1).numpy()
    np.testing.assert_allclose(probs, before, atol=1e-4)
    assert model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}


def _lm_logits(run: Path, ids: np.ndarray) -> np.ndarray:
    cfg = load_config(run / "config.yaml")
    params, _ = first_intact(run, read_params)
    if lora_spec(cfg) is not None:
        params = merge(params, lora_spec(cfg))
    model_cfg = ModelConfig(**{**cfg.model.__dict__, "dtype": "float32", "dropout": 0.0})
    return np.asarray(LanguageModel(model_cfg).apply({"params": params}, ids))


@pytest.mark.parametrize("case,task", [("bert_mlm", "mlm"), ("gpt2_lm", "clm")])
def test_pretraining_continues_from_hf_and_exports_back(tmp_path, small_corpus, case, task,
                                                       capsys):
    run, out = tmp_path / task, tmp_path / f"{task}_hf"
    cfg = load_config(None, [
        f"run_dir={run}", f"finetune.init_from=hf:{FIXTURES / case}", f"train.task={task}",
        f"data.corpus={small_corpus}", "data.seq_len=32", "train.steps=4",
        "optim.learning_rate=1e-3", *SHORT])
    summary = pretrain(cfg)
    assert np.isfinite(summary["loss"])
    log = capsys.readouterr().out
    assert "loaded" in log and "fresh init: 0 tensor(s)" in log  # the head came along too
    export_hf(run, out)
    ids = np.random.default_rng(1).integers(0, 100, (2, 10)).astype(np.int32)
    ours = _lm_logits(run, ids)

    # Read back by ptft (through the import path) ...
    model = hf.open_model(f"hf:{out}")
    keys = {**model.model_keys(), "dropout": 0.0}
    flat, _ = flat_params(model)
    reread = LanguageModel(ModelConfig(**keys, dtype="float32")).apply(
        {"params": unflatten(flat)}, ids)
    np.testing.assert_allclose(np.asarray(reread), ours, atol=1e-5)

    try:
        transformers = _transformers()
    except pytest.skip.Exception:
        return
    import torch
    auto = transformers.AutoModelForMaskedLM if task == "mlm" else \
        transformers.GPT2LMHeadModel
    theirs = auto.from_pretrained(out).eval()
    with torch.no_grad():
        logits = theirs(torch.tensor(ids).long()).logits.numpy()
    np.testing.assert_allclose(logits, ours, atol=1e-4)
