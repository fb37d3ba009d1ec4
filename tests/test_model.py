"""The model keeps packed documents apart: changing one document of a packed row leaves the
other document's outputs unchanged, and padding changes nothing. The CPU's attention form
computes what jax.nn.dot_product_attention does."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptft_jax.models.layers import heads_major_attention
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


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_heads_major_attention_is_jax_attention_values_and_gradients(causal, dtype):
    """What model.attention=auto runs on a CPU, against jax.nn.dot_product_attention's XLA
    form: packed documents, a padding tail (rows that may attend to nothing), no mask."""
    dtype = jnp.dtype(dtype)
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 4, 8), dtype) for i in range(3))
    segments = jnp.concatenate([SEGMENTS, jnp.ones_like(SEGMENTS)])
    mask = ((segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0))[:, None]
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for m in (mask, None):
        def ours(q, k, v):
            return jnp.sum(jnp.sin(heads_major_attention(q, k, v, m, causal).astype(jnp.float32)))

        def theirs(q, k, v):
            out = jax.nn.dot_product_attention(q, k, v, mask=m, is_causal=causal,
                                               implementation="xla")
            return jnp.sum(jnp.sin(out.astype(jnp.float32)))
        (a, grads_a), (b, grads_b) = (jax.value_and_grad(f, (0, 1, 2))(q, k, v)
                                      for f in (ours, theirs))
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
        for x, y in zip(grads_a, grads_b):
            assert x.dtype == y.dtype == dtype
            np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                       rtol=tol, atol=tol)
