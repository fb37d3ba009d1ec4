"""The model keeps packed documents apart: changing one document of a packed row leaves the
other document's outputs unchanged, and padding changes nothing."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptft_jax.models.transformer import LanguageModel
from tests.helpers import tiny_config

SEGMENTS = jnp.asarray([[1] * 7 + [2] * 6 + [0] * 3], jnp.int32)
POSITIONS = jnp.asarray([list(range(7)) + list(range(6)) + [0] * 3], jnp.int32)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("scan", [False, True])
def test_packed_documents_do_not_see_each_other(kind, scan):
    cfg = dataclasses.replace(tiny_config(kind).model, scan_layers=scan)
    model = LanguageModel(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(5, 256, (1, 16)), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])

    def run(t):
        hidden = model.apply({"params": params}, t, SEGMENTS, POSITIONS,
                             method=lambda m, *a: m.transformer(*a))
        logits = model.apply({"params": params}, t, SEGMENTS, POSITIONS)
        return np.asarray(hidden), np.asarray(logits)

    hidden, logits = run(tokens)
    other_doc = tokens.at[0, 7:13].set(jnp.asarray(rng.integers(5, 256, 6), jnp.int32))
    padding = tokens.at[0, 13:].set(jnp.asarray([9, 10, 11], jnp.int32))
    h2, l2 = run(other_doc)
    np.testing.assert_allclose(h2[0, :7], hidden[0, :7], atol=1e-6)  # document 1 unchanged
    np.testing.assert_allclose(l2[0, :7], logits[0, :7], atol=1e-5)
    assert not np.allclose(h2[0, 7:13], hidden[0, 7:13], atol=1e-3)  # document 2 did change
    h3, l3 = run(padding)
    np.testing.assert_allclose(h3[0, :13], hidden[0, :13], atol=1e-6)
    np.testing.assert_allclose(l3[0, :13], logits[0, :13], atol=1e-5)
    # And document 2 alone, at positions 0.., gives what it gives inside the packed row.
    alone = model.apply({"params": params}, tokens[:, 7:13], jnp.ones((1, 6), jnp.int32),
                        POSITIONS[:, 7:13], method=lambda m, *a: m.transformer(*a))
    np.testing.assert_allclose(np.asarray(alone)[0], hidden[0, 7:13], atol=1e-5)
