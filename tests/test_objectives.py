"""MLM masking statistics and the loss arithmetic."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptft_jax.tasks.lm import (CausalLM, ModelFns, MlmSpec, logit_sums, mask_tokens,
                               token_sums)

SPEC = MlmSpec(mask_id=4, special_ids=(0, 1, 2, 3, 4), random_low=5, random_high=1000)


def _mask_many(tokens, valid=None, seed=0):
    keys = jax.random.split(jax.random.key(seed), tokens.shape[0])
    if valid is None:
        return jax.vmap(lambda k, t: mask_tokens(k, t, SPEC))(keys, tokens)
    return jax.vmap(lambda k, t, v: mask_tokens(k, t, SPEC, v))(keys, tokens, valid)


def test_mlm_selects_15_percent_with_80_10_10():
    tokens = jnp.asarray(np.random.default_rng(0).integers(5, 1000, (128, 512)), jnp.int32)
    inputs, targets, weights = _mask_many(tokens)
    selected = np.asarray(weights) == 1.0
    inputs, tokens = np.asarray(inputs), np.asarray(tokens)
    n = selected.sum()
    assert abs(n / tokens.size - 0.15) < 0.005, n / tokens.size  # 65536 tokens: sd ~0.0014
    masked = (inputs == SPEC.mask_id) & selected
    kept = (inputs == tokens) & selected
    randomised = selected & ~masked & ~kept
    assert abs(masked.sum() / n - 0.8) < 0.01
    # A random replacement equals the original with probability 1/995: it then counts as kept.
    assert abs(randomised.sum() / n - 0.1) < 0.01
    assert abs(kept.sum() / n - 0.1) < 0.01
    assert np.all(inputs[randomised] >= SPEC.random_low)
    # Unselected positions are untouched and carry no weight; targets are the originals.
    assert np.array_equal(inputs[~selected], tokens[~selected])
    assert np.array_equal(np.asarray(targets), tokens)


def test_mlm_never_selects_special_tokens_or_padding():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 40, (64, 256)).astype(np.int32)  # many special ids (0..4)
    valid = rng.random((64, 256)) > 0.3
    _, _, weights = _mask_many(jnp.asarray(tokens), jnp.asarray(valid))
    weights = np.asarray(weights)
    assert weights[np.isin(tokens, SPEC.special_ids)].sum() == 0
    assert weights[~valid].sum() == 0
    eligible = ~np.isin(tokens, SPEC.special_ids) & valid
    assert abs(weights.sum() / eligible.sum() - 0.15) < 0.01


def test_masking_depends_on_key_only():
    tokens = jnp.asarray(np.random.default_rng(2).integers(5, 1000, (4, 64)), jnp.int32)
    a, b, c = _mask_many(tokens, seed=3), _mask_many(tokens, seed=3), _mask_many(tokens, seed=4)
    assert np.array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_token_sums_match_numpy_cross_entropy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    weights = (rng.random((2, 5)) > 0.4).astype(np.float32)
    sums = logit_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(sums["loss_sum"], (nll * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["correct_sum"],
                               ((logits.argmax(-1) == targets) * weights).sum())
    assert float(sums["count"]) == weights.sum()


class _PerfectNextToken(CausalLM):
    """The causal LM task on a stand-in model whose features are the one-hot true next token
    (scaled) and whose logits are the features: the task's targets and weights are under
    test, not a model."""

    def __init__(self, chunk, vocab=20):
        self.loss_chunk, self.vocab = chunk, vocab

    def fns(self, model_state, train, rngs):
        def features(params, inputs, segment_ids, positions):
            nxt = jnp.concatenate([inputs[:, 1:], inputs[:, :1]], axis=1)
            return jax.nn.one_hot(nxt, self.vocab) * 100.0
        return ModelFns(features, lambda params, f: f)


@pytest.mark.parametrize("chunk", [0, 2, 3])
def test_clm_predicts_the_next_token_within_a_segment(chunk):
    tokens = jnp.asarray([[10, 11, 12, 13, 14, 0]], jnp.int32)
    segments = jnp.asarray([[1, 1, 1, 2, 2, 0]], jnp.int32)
    sums, _ = _PerfectNextToken(chunk).sums(None, {}, {"tokens": tokens,
                                                       "segment_ids": segments},
                                            None, None, train=False)
    # Targets: 11, 12 (segment 1) and 14 (segment 2); not 13 (crosses a boundary), not padding.
    assert float(sums["count"]) == 3.0
    assert float(sums["correct_sum"]) == 3.0
    assert float(sums["loss_sum"]) < 1e-3


def test_chunked_loss_equals_whole_loss_with_gradients():
    rng = np.random.default_rng(4)
    feats = jnp.asarray(rng.normal(size=(3, 8, 16)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(50, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (3, 8)))
    weights = jnp.asarray(rng.random((3, 8)) > 0.3, jnp.float32)
    fns = ModelFns(None, lambda p, f: jnp.einsum("bld,vd->blv", f, p))

    def loss(p, chunk):
        return token_sums(fns, p, feats, targets, weights, chunk)["loss_sum"]

    whole, g_whole = jax.value_and_grad(loss)(table, 0)
    for chunk in (1, 2, 4):
        part, g_part = jax.value_and_grad(loss)(table, chunk)
        np.testing.assert_allclose(part, whole, rtol=1e-5)
        np.testing.assert_allclose(g_part, g_whole, rtol=1e-4, atol=1e-6)
