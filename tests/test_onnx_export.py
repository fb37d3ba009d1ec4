"""`ptft export --format onnx`: a finetuned classifier (LoRA merged, one text or a pair) as
model.onnx + a tokenizer that writes ptft's rows, checked by onnxruntime against ptft; the
README's script runs it with JAX blocked and prints what `ptft predict` prints; an encoder as
`ptft embed`'s embeddings; an image classifier with BatchNorm as `ptft predict` on images; bad
requests are refused before any write."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ptft_jax.config.load import load_config
from ptft_jax.config.schema import ConfigError
from ptft_jax.data.labelled import predict_examples
from ptft_jax.data.tokenizer import load_tokenizer
from ptft_jax.jobs.entry import finetune
from tests.test_hf_runs import FIXTURES, SHORT, TEXTS, _labelled
from tests.helpers import resnet_run
from tests.test_main_job import _ptft

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")
README = Path(__file__).parent.parent / "README.md"
PAIRS = ["a king and a lord", "unto the land of the house of the lord and the king", "god"]


def _finetune(tmp: Path, pairs: bool) -> Path:
    """A classifier finetuned with LoRA from a small BERT, mean pooling; on text pairs or not."""
    run = tmp / ("pairs" if pairs else "single")
    rows = [json.loads(line) for line in _labelled(tmp).read_text().splitlines()]
    data = tmp / f"{run.name}.jsonl"
    data.write_text("".join(json.dumps({**r, "second": r["text"][::-1]}) + "\n" for r in rows))
    finetune(load_config(None, [
        f"run_dir={run}", f"finetune.init_from=hf:{FIXTURES / 'bert_cls'}",
        f"data.corpus={data}", "data.label_column=label", "train.task=classification",
        "train.steps=3", "data.seq_len=24", "finetune.pooling=mean", "finetune.lora_rank=2",
        *(["data.text_pair_column=second"] if pairs else []), *SHORT]))
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _finetune(tmp_path_factory.mktemp("onnx"), pairs=False)


def test_an_onnx_export_predicts_as_ptft_does_without_jax(run, tmp_path):
    out = tmp_path / "onnx"
    result = _ptft("export", str(run), str(out), "--format", "onnx")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA adapters merged" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "model.onnx", "onnx.json",
                                                     "tokenizer.json"]
    meta = json.loads((out / "onnx.json").read_text())
    assert meta["max_abs_diff_from_ptft"] <= 1e-4 and len(meta["checked_shapes"]) == 3
    assert meta["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]

    # The README's script, with JAX made unimportable: ptft predict's labels and probabilities.
    script = re.search(r"```python\n(# onnx_predict\.py.*?)```", README.read_text(), re.S)[1]
    blocked = "import sys; sys.modules['jax'] = sys.modules['ptft_jax'] = None\n"
    (tmp_path / "onnx_predict.py").write_text(blocked + script)
    texts = ["the lord said unto the king", "in the house of god and the land of the king"]
    done = subprocess.run([sys.executable, str(tmp_path / "onnx_predict.py"), str(out)],
                          input="\n".join(texts) + "\n", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [json.loads(line) for line in done.stdout.splitlines()]
    from ptft_jax.infer.predict import predict_run
    expected = predict_run(run, texts, progress=False)
    assert [p["label"] for p in printed] == [p["label"] for p in expected]
    for p, e in zip(printed, expected):
        assert p["probabilities"].keys() == e["probabilities"].keys()
        np.testing.assert_allclose(list(p["probabilities"].values()),
                                   list(e["probabilities"].values()), atol=1e-4)


def test_an_exported_pair_classifier_reads_rows_as_ptft_writes_them(tmp_path):
    from ptft_jax.infer.onnx_export import export_onnx
    run = _finetune(tmp_path, pairs=True)
    out = tmp_path / "onnx"
    meta = export_onnx(run, out)
    assert meta["max_abs_diff_from_ptft"] <= 1e-4 and meta["lora_merged"]
    # The exported tokenizer writes ptft's rows (pairs, type ids), padded to the longest; the
    # last pair is cut to data.seq_len (24), both of its texts longer than half of that.
    from tokenizers import Tokenizer
    firsts = TEXTS + [" ".join(["the lord and the king"] * 4)]
    seconds = PAIRS + [" ".join(["in the house of god"] * 3)]
    rows = Tokenizer.from_file(str(out / "tokenizer.json")).encode_batch(list(zip(firsts,
                                                                                seconds)))
    ours = predict_examples(firsts, load_tokenizer(run / "tokenizer.json"), 24, "encoder",
                            seconds)
    assert ours.truncated == 1
    ours = ours.rows(np.arange(len(firsts)))
    length = len(rows[0].ids)
    assert length == int(ours["segment_ids"].sum(1).max())
    np.testing.assert_array_equal([r.ids for r in rows], ours["tokens"][:, :length])
    np.testing.assert_array_equal([r.attention_mask for r in rows],
                                  ours["segment_ids"][:, :length])
    np.testing.assert_array_equal([r.type_ids for r in rows], ours["type_ids"][:, :length])


def test_an_encoder_exports_as_ptft_embed_computes(pretrained, tmp_path):
    """A pretraining run (masked LM) exports as an embedding model: mean-pooled, normalised."""
    from tokenizers import Tokenizer

    from ptft_jax.infer.embed import embed, load_encoder
    from ptft_jax.infer.onnx_export import export_onnx
    meta = export_onnx(pretrained, tmp_path / "enc")
    assert meta["output"] == "embeddings" and meta["max_length"] == 32
    texts = ["the lord said unto the king", "and", " ".join(["in the house of god"] * 9)]
    rows = Tokenizer.from_file(str(tmp_path / "enc" / "tokenizer.json")).encode_batch(texts)
    assert len(rows[2].ids) == 32  # the long text is cut at ptft embed's length
    vectors = _ort(tmp_path / "enc", {
        "input_ids": [r.ids for r in rows], "attention_mask": [r.attention_mask for r in rows],
        "token_type_ids": [r.type_ids for r in rows]})
    expected = embed(load_encoder(str(pretrained)), texts, progress=False)
    np.testing.assert_allclose(vectors, expected, atol=1e-4)


def test_an_image_classifier_exports_with_its_batch_norm(tmp_path):
    """A small ResNet (BatchNorm statistics in the model state) from uint8 pixels."""
    from PIL import Image

    from ptft_jax.infer.onnx_export import export_onnx
    from ptft_jax.infer.predict import predict_images
    run, images = resnet_run(tmp_path)
    meta = export_onnx(run, tmp_path / "onnx")
    assert meta["image_shape"] == [8, 8, 1] and meta["max_abs_diff_from_ptft"] <= 1e-4
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(images[i], "L").save(files[-1])
    probabilities = _ort(tmp_path / "onnx", {"pixels": images[:3, :, :, None]})
    expected = [list(p["probabilities"].values()) for p in predict_images(run, files,
                                                                          progress=False)]
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)


def _ort(folder: Path, inputs: dict) -> np.ndarray:
    import onnxruntime
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    arrays = {k: np.asarray(v, np.uint8 if k == "pixels" else np.int32)
              for k, v in inputs.items()}
    return session.run(None, arrays)[0]


def test_an_int8_export_quantizes_every_projection(run, tmp_path):
    """onnxruntime's dynamic int8: every matmul with weights, the attention projections
    included (they are MatMuls, not Einsums), smaller, within a measured distance of ptft."""
    import onnx

    from ptft_jax.infer.onnx_export import export_onnx
    meta = export_onnx(run, tmp_path / "int8", quantize="int8")
    assert meta["int8_bytes"] < meta["float32_bytes"]
    assert 0 < meta["int8_max_abs_diff_from_ptft"] < 0.05
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int8" / "model.onnx")).graph.node]
    assert "Einsum" not in ops
    # 2 layers x (query, key, value, out, MLP in, MLP out) and the head: 13 weight matmuls.
    assert ops.count("MatMulInteger") >= 13, sorted(set(ops))


def test_onnx_export_refuses_what_it_cannot_write(run, tmp_path):
    from ptft_jax.infer.onnx_export import export_onnx
    (tmp_path / "notes").mkdir()
    with pytest.raises(ConfigError, match=r"neither a ptft run directory .* nor a Hugging Face"):
        export_onnx(tmp_path / "notes", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    result = _ptft("export", str(run), str(taken), "--format", "onnx")
    assert result.returncode != 0 and "OUT_DIR" in result.stderr
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]
    with pytest.raises(ConfigError, match=r"--quantize int4: --format onnx quantizes to int8"):
        export_onnx(run, tmp_path / "out", quantize="int4")
    result = _ptft("export", str(run), str(tmp_path / "hf"), "--format", "hf", "--quantize",
                   "int8")
    assert result.returncode != 0 and "leave --quantize out for --format hf" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "hf").exists()
