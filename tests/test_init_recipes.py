"""Each model family starts as its published recipe says (layers.kernel_init): the spread of
every kind of initial weight, measured on a freshly initialised model, against the recipe's
formula. A model that starts wrong trains wrong (issue 23: one N(0, 0.02) for every ViT
weight made it learn at a fraction of PyTorch's speed), and no forward-pass test notices."""
import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from ptft_jax.config.presets import PRESETS
from ptft_jax.config.schema import ModelConfig
from ptft_jax.core.params import flatten
from ptft_jax.models.transformer import LanguageModel
from ptft_jax.models.vision import ImageClassifier

WIDTH, LAYERS = 128, 3


def _init(model, *inputs) -> dict[str, np.ndarray]:
    params = nn.unbox(model.init(jax.random.key(0), *inputs)["params"])
    return {k: np.asarray(v) for k, v in flatten(jax.device_get(params)).items()}


def _std(p: dict, path: str) -> float:
    return float(np.std(p[path]))


def test_vit_follows_the_vit_paper_with_a_pytorch_style_head():
    cfg = ModelConfig(**{**PRESETS["vit-mini4"], "hidden_size": WIDTH, "mlp_dim": 4 * WIDTH,
                         "num_heads": 4, "num_layers": LAYERS, "image_size": 32})
    p = _init(ImageClassifier(cfg, 10), np.zeros((1, 32, 32, 3), np.float32))
    d, heads = WIDTH, 4
    # Xavier-uniform over the true fans: Var = 2 / (fan_in + fan_out).
    assert _std(p, "image/layers_0/attn/query/kernel") == pytest.approx((2 / (d + d)) ** .5,
                                                                          rel=0.05)
    assert p["image/layers_0/attn/query/kernel"].shape == (d, heads, d // heads)
    assert _std(p, "image/layers_0/attn/out/kernel") == pytest.approx((2 / (d + d)) ** .5,
                                                                        rel=0.05)
    assert _std(p, "image/layers_0/mlp/wi/kernel") == pytest.approx((2 / (d + 4 * d)) ** .5,
                                                                      rel=0.05)
    # LeCun-normal patches (fan in 4 * 4 * 3), positions N(0, 1/width), a zero class token.
    assert _std(p, "image/patch_embed/kernel") == pytest.approx((1 / 48) ** .5, rel=0.1)
    assert _std(p, "image/pos_embed") == pytest.approx(d ** -.5, rel=0.05)
    assert not p["image/cls"].any()
    # The head: U(+-1/sqrt(width)), not zero.
    head = p["head/kernel"]
    assert np.abs(head).max() <= d ** -.5 and _std(p, "head/kernel") == pytest.approx(
        (1 / (3 * d)) ** .5, rel=0.1)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_text_models_follow_bert_and_gpt2(kind):
    preset = "bert-mini" if kind == "encoder" else "gpt-mini"
    cfg = dataclasses.replace(ModelConfig(**PRESETS[preset]), hidden_size=WIDTH,
                              mlp_dim=4 * WIDTH, num_layers=LAYERS, vocab_size=4096,
                              max_len=512)
    p = _init(LanguageModel(cfg), np.zeros((1, 8), np.int32))
    prefix = "transformer/layers_1/"
    wi, out = p[prefix + "mlp/wi/kernel"], p[prefix + "attn/out/kernel"]
    if kind == "encoder":
        # BERT: truncated normal, std 0.02, cut at two standard deviations, for every kernel
        # and embedding table.
        for w in (wi, out, p["transformer/token_embed/embedding"]):
            assert np.abs(w).max() <= 0.04 + 1e-7
            assert np.std(w) == pytest.approx(0.02 * 0.8796, rel=0.05)
        assert _std(p, "transformer/position_embed/embedding") == pytest.approx(
            0.02 * 0.8796, rel=0.05)
    else:
        # GPT-2: normal 0.02, residual projections / sqrt(2 * layers), positions 0.01.
        assert np.std(wi) == pytest.approx(0.02, rel=0.05)
        assert np.abs(wi).max() > 0.05  # not truncated
        assert np.std(out) == pytest.approx(0.02 / (2 * LAYERS) ** .5, rel=0.05)
        assert _std(p, prefix + "mlp/wo/kernel") == pytest.approx(0.02 / (2 * LAYERS) ** .5,
                                                                   rel=0.05)
        assert _std(p, "transformer/position_embed/embedding") == pytest.approx(0.01, rel=0.05)


def test_resnet_follows_he_et_al():
    cfg = ModelConfig(**{**PRESETS["resnet18-small"], "resnet_width": 32})
    p = _init(ImageClassifier(cfg, 10), np.zeros((1, 32, 32, 3), np.float32))
    # Kaiming-normal, fan-out: Var = 2 / (k * k * out_channels).
    assert _std(p, "image/layers_2/conv1/kernel") == pytest.approx((2 / (9 * 64)) ** .5,
                                                                     rel=0.05)
    # Every BatchNorm starts as scale 1, bias 0: no block starts switched off.
    scales = [v for k, v in p.items() if k.endswith("/scale")]
    assert len(scales) > 10 and all((s == 1).all() for s in scales)
    # The head as torchvision's fc (nn.Linear's default): U(+-1/sqrt(width)), std 1/sqrt(3w).
    width = 32 * 8
    assert np.abs(p["head/kernel"]).max() <= width ** -.5
    assert _std(p, "head/kernel") == pytest.approx((3 * width) ** -.5, rel=0.1)
