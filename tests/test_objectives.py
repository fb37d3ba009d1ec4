"""MLM masking statistics and the loss arithmetic."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptft_jax.tasks.lm import CausalLM, MaskedLM, MlmSpec, mask_positions
from ptft_jax.tasks.vocab_loss import ModelFns, logit_sums, positions_per_chunk, token_sums

SPEC = MlmSpec(mask_id=4, special_ids=(0, 1, 2, 3, 4), random_low=5, random_high=1000)


def _mask_many(tokens, valid=None, seed=0):
    keys = jax.random.split(jax.random.key(seed), tokens.shape[0])
    valid = jnp.ones(tokens.shape, bool) if valid is None else valid
    slots = SPEC.num_slots(tokens.shape[1])
    return jax.vmap(lambda k, t, v: mask_positions(k, t, SPEC, slots, v))(keys, tokens, valid)


def test_mlm_selects_15_percent_with_80_10_10():
    tokens = jnp.asarray(np.random.default_rng(0).integers(5, 1000, (128, 512)), jnp.int32)
    inputs, positions, targets, weights = map(np.asarray, _mask_many(tokens))
    tokens = np.asarray(tokens)
    assert positions.shape == (128, SPEC.num_slots(512)) == (128, 77)
    # Every row predicts round(0.15 x 512) = 77 distinct positions, its original tokens.
    assert np.all(weights.sum(1) == 77)
    assert all(len(set(row)) == 77 for row in positions)
    assert np.array_equal(targets, np.take_along_axis(tokens, positions, 1))
    got = np.take_along_axis(inputs, positions, 1)
    n = weights.sum()
    masked = got == SPEC.mask_id
    kept = got == targets
    randomised = ~masked & ~kept
    assert abs(masked.sum() / n - 0.8) < 0.01
    # A random replacement equals the original with probability 1/995: it then counts as kept.
    assert abs(randomised.sum() / n - 0.1) < 0.01
    assert abs(kept.sum() / n - 0.1) < 0.01
    assert np.all(got[randomised] >= SPEC.random_low)
    # Positions not selected are untouched.
    untouched = np.ones(tokens.shape, bool)
    np.put_along_axis(untouched, positions, False, 1)
    assert np.array_equal(inputs[untouched], tokens[untouched])
    # Which positions are chosen is uniform over the row.
    # (Hits per block of 64 positions: mean 1232, sd about 33.)
    hits = np.bincount(positions.ravel(), minlength=512).reshape(8, 64).sum(1)
    assert np.all(np.abs(hits / hits.mean() - 1) < 0.15), hits


def test_mlm_never_selects_special_tokens_or_padding():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 40, (64, 256)).astype(np.int32)  # many special ids (0..4)
    valid = rng.random((64, 256)) > 0.3
    valid[0] = False  # a row of padding only: nothing to predict
    valid[1, 3:] = False  # three valid tokens: still one prediction (BERT's max(1, ...))
    tokens[1, :3] = 7
    _, positions, _, weights = map(np.asarray, _mask_many(jnp.asarray(tokens),
                                                          jnp.asarray(valid)))
    chosen = np.zeros(tokens.shape, bool)
    np.put_along_axis(chosen, np.where(weights > 0, positions, 0), weights > 0, 1)
    assert not chosen[np.isin(tokens, SPEC.special_ids)].any()
    assert not chosen[~valid].any()
    assert weights[0].sum() == 0 and weights[1].sum() == 1
    eligible = ~np.isin(tokens, SPEC.special_ids) & valid
    assert np.array_equal(weights.sum(1)[2:],
                          np.maximum(np.round(eligible.sum(1) * 0.15), 1)[2:])


def test_masking_depends_on_key_only():
    tokens = jnp.asarray(np.random.default_rng(2).integers(5, 1000, (4, 64)), jnp.int32)
    a, b, c = _mask_many(tokens, seed=3), _mask_many(tokens, seed=3), _mask_many(tokens, seed=4)
    assert np.array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_num_slots_is_bert_max_predictions():
    assert [SPEC.num_slots(n) for n in (100, 128, 512)] == [15, 20, 77]


class _EchoInputs(MaskedLM):
    """The masked LM task on a stand-in model that predicts its own input token at each
    slot: a slot is right exactly when masking left its token in place (the kept 10%)."""

    def __init__(self, vocab=1000):
        self.spec, self.vocab, self.loss_chunk_tokens, self.data_parallel = SPEC, vocab, 0, 1

    def fns(self, model_state, train, rngs):
        def features(params, inputs, segment_ids, positions, predict_at=None):
            at = jnp.take_along_axis(inputs, predict_at, axis=1)
            return jax.nn.one_hot(at, self.vocab) * 100.0
        return ModelFns(features, lambda head, f: f)


def test_mlm_sums_count_the_selected_slots_and_see_the_masked_inputs():
    rng = np.random.default_rng(5)
    tokens = rng.integers(5, 1000, (64, 256)).astype(np.int32)
    segments = np.ones_like(tokens)
    segments[:, 200:] = 0  # padding: never predicted
    sums, _ = _EchoInputs().sums(None, {}, {"tokens": jnp.asarray(tokens),
                                            "segment_ids": jnp.asarray(segments)},
                                 jnp.arange(64), jax.random.key(0), train=False)
    assert float(sums["count"]) == 64 * 30  # round(0.15 x 200) per row
    assert abs(float(sums["correct_sum"]) / float(sums["count"]) - 0.1) < 0.02


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
        self.loss_chunk_tokens, self.data_parallel, self.vocab = chunk, 1, vocab

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


def test_chunks_have_a_floor_in_tokens():
    assert positions_per_chunk(16, 256, 0) == 256  # off
    assert positions_per_chunk(16, 256, 1024) == 64  # 16 rows x 64 positions
    assert positions_per_chunk(16, 256, 1000) == 64  # the next divisor reaching the floor
    assert positions_per_chunk(16, 20, 64) == 4
    assert positions_per_chunk(4, 39, 64) == 39  # no divisor of 39 between 13 and 39: one chunk
    assert positions_per_chunk(16, 256, 1 << 20) == 256


def test_chunked_loss_equals_whole_loss_with_gradients():
    """The fused chunked loss against plain autodiff of the whole loss: value, metrics, and
    gradients for features and both head parameters, scaled by an outer factor (the step
    divides by the token count)."""
    rng = np.random.default_rng(4)
    feats = jnp.asarray(rng.normal(size=(3, 8, 16)), jnp.float32)
    head = {"table": jnp.asarray(rng.normal(size=(50, 16)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(50,)), jnp.float32)}
    targets = jnp.asarray(rng.integers(0, 50, (3, 8)))
    weights = jnp.asarray(rng.random((3, 8)) > 0.3, jnp.float32)
    fns = ModelFns(None, lambda h, f: jnp.einsum("bld,vd->blv", f, h["table"]) + h["bias"])

    def loss(h, f, chunk):
        sums = token_sums(fns, h, f, targets, weights, chunk)
        return sums["loss_sum"] / 7.0, sums

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (whole, whole_sums), g_whole = grad(head, feats, 0)
    for chunk in (3, 6, 12):  # 1, 2 and 4 positions of 3 rows
        (part, part_sums), g_part = grad(head, feats, chunk)
        np.testing.assert_allclose(part, whole, rtol=1e-5)
        for k in ("correct_sum", "count"):
            assert float(part_sums[k]) == float(whole_sums[k])
        for a, b in zip(jax.tree.leaves(g_part), jax.tree.leaves(g_whole)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Without a gradient, the chunked forward gives the same sums.
    np.testing.assert_allclose(token_sums(fns, head, feats, targets, weights, 6)["loss_sum"],
                               whole * 7.0, rtol=1e-5)


def test_mlm_on_gathered_slots_equals_the_loss_of_full_logits():
    """Gathering the slots before the MLM transform gives the loss and gradients of the
    full model's logits read at those slots (the transform works per position)."""
    from tests.helpers import batches, engine_for, tiny_config
    cfg = tiny_config("encoder", "model.num_layers=1")
    engine = engine_for(cfg)
    task, model = engine.task, engine.task.model
    params = engine.host_state(engine.init(jax.random.key(0))).params
    batch = {k: jnp.asarray(v) for k, v in batches(cfg, 1)[0].items()}
    ids, key = jnp.arange(cfg.train.global_batch), jax.random.key(3)
    slots = task.spec.num_slots(cfg.data.seq_len)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
    inputs, positions, targets, weights = jax.vmap(
        lambda k, t, v: mask_positions(k, t, task.spec, slots, v))(
            keys, batch["tokens"], batch["segment_ids"] != 0)

    def full(p):
        logits = model.apply({"params": p}, inputs, batch["segment_ids"], batch["positions"])
        at = jnp.take_along_axis(logits, positions[..., None], axis=1)
        return logit_sums(at, targets, weights)["loss_sum"]

    def gathered(p):
        return task.sums(p, {}, batch, ids, key, train=False)[0]["loss_sum"]

    (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(f))(params) for f in (full, gathered))
    np.testing.assert_allclose(b, a, rtol=1e-5)
    # atol: float32 sums in another order; entries of 1e-5 differ by ~1e-7 (gradients ~0.1).
    for x, y in zip(jax.tree.leaves(gb), jax.tree.leaves(ga)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
