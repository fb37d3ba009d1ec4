"""Parallel layouts compute the same step: sharded == one device, pmap == jit,
scanned == unrolled layers, microbatches == one big batch. Batches are what training feeds
(packed rows with segment ids and positions, or padded rows); layouts are compared on whole
gradient trees (a gradient wrong by a constant factor shows) and on parameters after several
optimizer steps."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptft_jax.models.transformer import LanguageModel
from tests.helpers import (assert_same_gradients, batches, engine_for, host_params, run_steps,
                           tiny_config)

# float32 on CPU; sharded reductions sum in a different order, so compare with a tolerance.
RTOL, ATOL = 2e-4, 2e-5


def _assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree.leaves(b)
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def _assert_same_gradients(engine_a, engine_b, mode):
    """Whole gradient trees (and loss sums) at the same initial parameters agree."""
    assert_same_gradients(engine_a, engine_b, batches(engine_a.cfg, 1, seed=7, mode=mode)[0],
                          loss_rtol=RTOL)


def _train(cfg, n_steps=3, devices=None, state=None):
    engine = engine_for(cfg, devices)
    if state is None:
        state = engine.init(jax.random.key(0))
    state, history = run_steps(engine, state, batches(cfg, n_steps))
    return engine, state, history


# The encoder with dropout on: the masks are one draw over the global batch, the same however
# the batch is sharded (with dropout off, the same step minus the masks).
@pytest.mark.parametrize("kind, dropout", [("decoder", 0.0), ("encoder", 0.2)])
def test_sharded_step_equals_single_device(kind, dropout):
    one_cfg = tiny_config(kind, f"model.dropout={dropout}")
    one_engine, one_state, one_hist = _train(one_cfg, devices=jax.devices()[:1])
    mesh_cfg = tiny_config(kind, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                           f"model.dropout={dropout}")
    engine, state, hist = _train(mesh_cfg)
    _assert_same_gradients(one_engine, engine, "pad")
    # The state really is spread over the mesh: a kernel split over fsdp and tensor.
    kernel = state.params["transformer"]["layers_0"]["mlp"]["wi"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len({s.device for s in kernel.addressable_shards}) == 8
    for a, b in zip(one_hist, hist):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=RTOL)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-3)
    _assert_trees_close(host_params(engine, state), jax.device_get(one_state.params))


# One model suffices: pmap wraps the same pure step whatever the model (the decoder's
# sharding is checked against one device above).
@pytest.mark.parametrize("kind", ["encoder"])
def test_pmap_equals_jit(kind):
    jit_cfg = tiny_config(kind, "mesh.data=8")
    jit_engine, jit_state, jit_hist = _train(jit_cfg)
    pmap_cfg = tiny_config(kind, "mesh.parallelism=pmap")
    pmap_engine, pmap_state, pmap_hist = _train(pmap_cfg)
    for a, b in zip(jit_hist, pmap_hist):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=RTOL)
        np.testing.assert_allclose(a["accuracy"], b["accuracy"], rtol=RTOL)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-3)
    _assert_trees_close(host_params(pmap_engine, pmap_state), host_params(jit_engine, jit_state))


def test_pmap_gives_each_device_its_own_dropout_masks():
    # Every device gets device 0's rows. With one dropout key for all devices, every device
    # would drop the same units and the summed loss would be 8 x device 0's own (measured by
    # a batch whose other rows are padding). A decoder: causal LM draws nothing per example.
    def summed_loss(dropout, batch):
        engine = engine_for(tiny_config("decoder", "mesh.parallelism=pmap",
                                        f"model.dropout={dropout}", "train.global_batch=16"))
        _, metrics = engine.step_fn(engine.init(jax.random.key(0)), engine.to_device(batch),
                                    jax.random.key(3))
        return float(jax.device_get(engine.host_state(metrics))["sums"]["loss_sum"])

    rows = batches(tiny_config("decoder", "train.global_batch=16"), 1)[0]
    n, per_device = jax.device_count(), 16 // jax.device_count()
    same = {k: np.concatenate([v[:per_device]] * n) for k, v in rows.items()}
    alone = {**same, "segment_ids": np.where(np.arange(16)[:, None] < per_device,
                                             same["segment_ids"], 0)}
    assert summed_loss(0.0, same) == pytest.approx(n * summed_loss(0.0, alone), rel=1e-5)
    assert summed_loss(0.5, same) != pytest.approx(n * summed_loss(0.5, alone), rel=1e-3)


def test_microbatches_equal_one_big_batch():
    big_cfg = tiny_config("encoder", "mesh.data=8", "train.global_batch=32")
    _, big_state, big_hist = _train(big_cfg, n_steps=2)
    acc_cfg = tiny_config("encoder", "mesh.data=8", "train.global_batch=32", "train.grad_accum=4")
    engine, acc_state, acc_hist = _train(acc_cfg, n_steps=2)
    _assert_same_gradients(engine_for(big_cfg), engine, "pack")
    for a, b in zip(big_hist, acc_hist):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=RTOL)
        np.testing.assert_allclose(a["tokens_in_loss"], b["tokens_in_loss"])
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-3)
    _assert_trees_close(host_params(engine, acc_state), jax.device_get(big_state.params))


def _stack_layers(unrolled: dict, num_layers: int) -> dict:
    """Unrolled params (layers_0, layers_1, ...) -> the scanned layout (layers, stacked)."""
    tf = dict(unrolled["transformer"])
    layers = [tf.pop(f"layers_{i}") for i in range(num_layers)]
    tf["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return {**unrolled, "transformer": tf}


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_layers_equal_unrolled(kind, remat):
    cfg = tiny_config(kind).model
    unrolled = LanguageModel(dataclasses.replace(cfg, remat=remat))
    scanned = LanguageModel(dataclasses.replace(cfg, scan_layers=True, remat=remat))
    tokens = jnp.asarray(np.random.default_rng(0).integers(5, 256, (4, 16)), jnp.int32)
    params = nn.unbox(unrolled.init(jax.random.key(0), tokens)["params"])
    stacked = _stack_layers(params, cfg.num_layers)
    # The scanned model's own init has the same structure as the stacked tree.
    own = nn.unbox(scanned.init(jax.random.key(0), tokens)["params"])
    assert jax.tree.structure(own) == jax.tree.structure(stacked)

    def loss(model, p):
        return jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, tokens))[..., 7])

    l_u, g_u = jax.value_and_grad(lambda p: loss(unrolled, p))(params)
    l_s, g_s = jax.value_and_grad(lambda p: loss(scanned, p))(stacked)
    np.testing.assert_allclose(l_u, l_s, rtol=1e-5)
    _assert_trees_close(_stack_layers(g_u, cfg.num_layers), g_s, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_chunked_loss_on_a_mesh_equals_whole_loss_on_one_device(kind):
    _, one_state, one_hist = _train(tiny_config(kind, "objective.loss_chunk=0"),
                                    devices=jax.devices()[:1], n_steps=2)
    engine, state, hist = _train(tiny_config(kind, "objective.loss_chunk=4", "mesh.data=2",
                                             "mesh.fsdp=2", "mesh.tensor=2"), n_steps=2)
    for a, b in zip(one_hist, hist):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=RTOL)
    _assert_trees_close(host_params(engine, state), jax.device_get(one_state.params))
