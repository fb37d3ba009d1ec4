"""LoRA as a parameter transform: unchanged outputs at init, exact merge, gradients only for
the adapters, dropout in training only."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptft_jax.core import lora
from ptft_jax.core import params as ptree
from ptft_jax.models.transformer import LanguageModel
from tests.helpers import tiny_config

SPEC = lora.LoraSpec(rank=4, alpha=8.0, targets=r"attn/(query|value|out)/kernel$|mlp/wi/kernel$")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(5, 256, (2, 16)), jnp.int32)


def _model(scan=False):
    cfg = dataclasses.replace(tiny_config("encoder").model, scan_layers=scan)
    model = LanguageModel(cfg)
    return model, nn.unbox(model.init(jax.random.key(0), TOKENS)["params"])


def _randomise_b(params):
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: (jax.random.normal(jax.random.key(len(ptree.path_str(p))), x.shape) * 0.1
                      if ptree.path_str(p).endswith("/b") else x), params[lora.LORA_KEY])
    return {**params, lora.LORA_KEY: adapters}


@pytest.mark.parametrize("scan", [False, True])
def test_adapters_leave_outputs_unchanged_at_init_and_merge_exactly(scan):
    model, base = _model(scan)
    params = {**base, lora.LORA_KEY: lora.init_adapters(base, SPEC, jax.random.key(1))}
    assert lora.adapter_count(params) > 0
    out = model.apply({"params": base}, TOKENS)
    at_init = model.apply({"params": lora.with_adapters(params, SPEC)}, TOKENS)
    assert np.array_equal(np.asarray(out), np.asarray(at_init))
    trained = _randomise_b(params)
    adapted = model.apply({"params": lora.with_adapters(trained, SPEC)}, TOKENS)
    assert not np.allclose(adapted, out, atol=1e-3)  # the adapters do something
    merged = lora.merge(trained, SPEC)
    assert lora.LORA_KEY not in merged
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    np.testing.assert_allclose(model.apply({"params": merged}, TOKENS), adapted, atol=1e-5)


def test_gradients_reach_the_adapters_not_the_frozen_base():
    model, base = _model()
    adapters = _randomise_b({lora.LORA_KEY: lora.init_adapters(base, SPEC, jax.random.key(1))})

    def loss(trainable):
        return jnp.mean(model.apply({"params": lora.with_adapters({**base, **trainable}, SPEC)},
                                    TOKENS) ** 2)
    grads = jax.grad(loss)(adapters)
    assert set(grads) == {lora.LORA_KEY}  # the base is not in the differentiated tree
    flat = ptree.flatten(grads)
    assert all(np.abs(g).sum() > 0 for g in flat.values())
    # The output projection's input axes are (heads, head_dim): A is [heads * head_dim, r].
    a = ptree.flatten(adapters)["lora/transformer/layers_0/attn/out/kernel/a"]
    assert a.shape == (128, 4)


def test_a_target_regex_that_matches_nothing_is_an_error():
    _, base = _model()
    with pytest.raises(ValueError, match="matches no kernel"):
        lora.init_adapters(base, dataclasses.replace(SPEC, targets="attn/nothing"),
                           jax.random.key(0))


def test_dropout_acts_in_training_only():
    model, base = _model()
    spec = dataclasses.replace(SPEC, dropout=0.5)
    params = _randomise_b({**base, lora.LORA_KEY: lora.init_adapters(base, spec,
                                                                    jax.random.key(1))})
    plain = model.apply({"params": lora.with_adapters(params, spec, train=False)}, TOKENS)
    same = model.apply({"params": lora.with_adapters(params, spec, jax.random.key(2),
                                                     train=False)}, TOKENS)
    dropped = model.apply({"params": lora.with_adapters(params, spec, jax.random.key(2),
                                                        train=True)}, TOKENS)
    assert np.array_equal(np.asarray(plain), np.asarray(same))
    assert not np.allclose(plain, dropped, atol=1e-4)
