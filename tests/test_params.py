"""The (regex, value) rule mechanism and the weight-decay mask it drives."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ptft_jax.config.schema import OptimConfig
from ptft_jax.core.params import flatten, match_rules
from ptft_jax.models.transformer import LanguageModel
from ptft_jax.train.optim import make_optimizer, make_schedule
from tests.helpers import tiny_config


def _params(kind="encoder"):
    model = LanguageModel(tiny_config(kind).model)
    return nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


def test_first_matching_rule_wins_and_every_parameter_is_covered():
    params = {"a": {"kernel": 1, "bias": 2}, "b": {"kernel": 3}}
    values = flatten(match_rules(params, [(r"^a/", "A"), (r"kernel$", "K"), (".*", "rest")]))
    assert values == {"a/bias": "A", "a/kernel": "A", "b/kernel": "K"}
    with pytest.raises(ValueError, match="1 parameter\\(s\\) match no rule: b/kernel"):
        match_rules(params, [(r"^a/", 1)])


def test_default_weight_decay_skips_biases_norms_and_embeddings():
    mask = flatten(match_rules(_params(), OptimConfig().weight_decay_rules))
    decayed = {p for p, v in mask.items() if v}
    assert "transformer/layers_0/mlp/wi/kernel" in decayed
    assert "transformer/layers_1/attn/query/kernel" in decayed
    assert "mlm_head/transform/kernel" in decayed
    for path, v in mask.items():
        if path.endswith(("bias", "scale")) or "embed/" in path:
            assert not v, path


def test_adamw_decays_only_masked_parameters():
    params = _params("decoder")
    cfg = OptimConfig(learning_rate=0.1, warmup_steps=0, schedule="constant", clip_norm=0.0,
                      weight_decay=0.5)
    tx, _ = make_optimizer(cfg, total_steps=10)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = flatten(optax.apply_updates(params, updates))
    old = flatten(params)
    # With zero gradients only weight decay moves a parameter: kernel -> kernel * (1 - lr*wd).
    k = "transformer/layers_0/mlp/wi/kernel"
    np.testing.assert_allclose(new[k], old[k] * (1 - 0.1 * 0.5), rtol=1e-6)
    for path in ("transformer/token_embed/embedding", "transformer/final_norm/scale",
                 "transformer/layers_0/mlp/wi/bias"):
        np.testing.assert_array_equal(new[path], old[path])


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(learning_rate=1.0, warmup_steps=10, schedule="cosine", end_lr_ratio=0.1)
    lr = make_schedule(cfg, total_steps=110)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 0.5)
    np.testing.assert_allclose(float(lr(10)), 1.0)
    np.testing.assert_allclose(float(lr(110)), 0.1, rtol=1e-5)
    lin = make_schedule(OptimConfig(learning_rate=1.0, warmup_steps=0, schedule="linear",
                                    end_lr_ratio=0.0), total_steps=100)
    np.testing.assert_allclose(float(lin(50)), 0.5)
