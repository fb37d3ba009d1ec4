"""`ptft export --quantize int8 | int8-weights`: Qwix's int8 model as a ptft run directory that
eval, predict and serve read; its weights are int8 with a scale per output channel (and the
embedding table int8 per row), its predictions near the float model's but not equal to them;
what it cannot do is refused before any write."""
import json

import numpy as np
import pytest

from tests.test_hf_runs import _labelled
from tests.test_main_job import _ptft

from ptft_jax.ckpt import integrity
from ptft_jax.ckpt.pretrained import check_init_from, read_params
from ptft_jax.config.schema import ConfigError
from ptft_jax.core.params import flatten
from ptft_jax.infer.predict import evaluate_run, predict_run
from ptft_jax.infer.run_export import export_run

TEXTS = ["the lord said unto the king", "and he was a man", "in the house of god",
         "unto the land of the house of the lord and the king", "he shall be"]


@pytest.fixture(scope="module")
def run(lora_run):
    """A LoRA classifier (LoRA is merged before quantizing)."""
    return lora_run


@pytest.fixture(scope="module")
def int8_run(run, tmp_path_factory):
    """`ptft export RUN OUT --quantize int8` through the command line, once."""
    out = tmp_path_factory.mktemp("int8") / "int8"
    result = _ptft("export", str(run), str(out), "--quantize", "int8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "int8 with qwix" in result.stdout and "LoRA adapters merged" in result.stdout
    return out


def _probabilities(run_dir):
    return np.array([list(p["probabilities"].values())
                     for p in predict_run(run_dir, TEXTS, progress=False)])


@pytest.mark.parametrize("mode", ["int8", "int8-weights"])
def test_a_quantized_run_is_read_like_any_run(run, int8_run, tmp_path, mode):
    out = int8_run
    if mode != "int8":  # the other mode in this process (the command line is int8_run's)
        out = tmp_path / mode
        assert export_run(run, out, mode)["quantization"]["mode"] == mode
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["mode"] == mode and meta["quantized_bytes"] < meta["float_bytes"] / 2.5

    # Stored: every matmul kernel and the token table as int8 with float32 scales.
    step_dir = integrity.step_folders(out / "checkpoints")[0]
    stored = flatten(read_params(step_dir))
    float_params = flatten(read_params(integrity.step_folders(run / "checkpoints")[0]))
    int8 = {p for p, v in stored.items() if v.dtype == np.int8}
    kernels = {p for p in float_params if p.endswith("kernel") and "lora" not in p}
    assert {p.split("/array/")[0] for p in int8 if "/array/" in p} == kernels
    assert any(p.endswith("token_embed/embedding/qvalue") for p in int8)
    # Per output channel, absmax: dequantized, each weight within half a step of the float
    # one (LoRA merged into it: the float run's own kernels are without their adapters).
    wo = next(p for p in kernels if p.endswith("mlp/wo/kernel"))
    q, scale = stored[wo + "/array/qvalue"], stored[wo + "/array/scale"]
    assert scale.shape == (1, q.shape[1]) and np.abs(q).max() == 127
    assert np.abs(q * scale - float_params[wo]).max() <= scale.max() / 2 + 1e-7
    table = next(p for p in stored if p.endswith("token_embed/embedding/qvalue"))
    rows, row_scale = stored[table], stored[table.replace("qvalue", "scale")]
    original = float_params[table[:-len("/qvalue")]]
    assert np.abs(rows * row_scale - original).max() <= row_scale.max() / 2 + 1e-7

    # eval, predict: near the float model, and not equal to it (the int8 model ran).
    quantized, reference = _probabilities(out), _probabilities(run)
    difference = np.abs(quantized - reference).max()
    assert 0 < difference < 0.05, difference
    metrics = evaluate_run(out, corpus=str(_labelled(tmp_path)), progress=False)
    assert metrics["examples"] == 30 and 0 <= metrics["accuracy"] <= 1


def test_a_quantized_run_is_served(run, int8_run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ptft_jax.infer.server import Limits, create_app
    from ptft_jax.infer.serving import TextClassifier
    out = int8_run
    model = TextClassifier(out, 16, 512)
    model.warm_up()
    with TestClient(create_app(model, Limits())) as client:
        response = client.post("/v1/predict", json={"texts": TEXTS})
    got = np.array([list(p["probabilities"].values()) for p in response.json()["predictions"]])
    # The int8 model's answers: a float rounding that differs with the batch's shape can move
    # an activation across an int8 step, so within 1e-3 rather than float's 1e-5.
    quantized = _probabilities(out)
    np.testing.assert_allclose(got, quantized, atol=1e-3)
    assert np.abs(got - quantized).max() < np.abs(quantized - _probabilities(run)).max()


def test_what_cannot_be_quantized_is_refused_before_any_write(run, int8_run, tmp_path):
    out = int8_run
    again = _ptft("export", str(out), str(tmp_path / "again"), "--quantize", "int8")
    assert again.returncode == 2 and "already quantized" in again.stderr
    for fmt in ("hf", "onnx"):
        result = _ptft("export", str(out), str(tmp_path / fmt), "--format", fmt)
        assert result.returncode == 2 and "is a quantized run" in result.stderr
    hf = _ptft("export", str(run), str(tmp_path / "hf"), "--format", "hf", "--quantize", "int8")
    assert hf.returncode == 2 and "--format hf" in hf.stderr
    onnx = _ptft("export", str(run), str(tmp_path / "onnx"), "--format", "onnx", "--quantize",
                 "int8-weights")
    assert onnx.returncode == 2 and "int8" in onnx.stderr
    assert not any((tmp_path / name).exists() for name in ("again", "hf", "onnx"))
    with pytest.raises(ConfigError, match="is a quantized run"):
        check_init_from(out, image_task=False)
