"""The pure train step and its two compiled forms: `jax.jit` over a mesh, and `jax.pmap`.

`train_step(state, batch, key) -> (state, metrics)` has no side effects. Its randomness comes
from `fold_in(key, state.step)`, so a resumed run draws exactly what an uninterrupted run would.
Static things (model, optimizer, objective) are closed over with `functools.partial`.
"""
from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ptft_jax.mesh import batch_sharding, replicated
from ptft_jax.objectives import ModelFns
from ptft_jax.state import TrainState


def model_fns(model: nn.Module) -> ModelFns:
    def features(params, tokens, segment_ids, positions, rngs):
        return model.apply({"params": params}, tokens, segment_ids, positions, rngs=rngs,
                           method=model.features)

    def logits(params, feats):
        return model.apply({"params": params}, feats, method=model.logits)
    return ModelFns(features, logits)


def _sums_and_grads(params, batch, example_ids, key, micro_index=0, *, model, objective,
                    spec, loss_chunk=0):
    """Gradients of the summed loss, and the loss / accuracy sums, for one (micro)batch.

    The objective's randomness (MLM masks) is keyed by global example ids, so it does not
    depend on the microbatch; dropout is drawn afresh for each microbatch."""
    fns = model_fns(model)
    dropout_key = jax.random.fold_in(jax.random.fold_in(key, 1 << 30), micro_index)

    def loss_sum(p):
        sums = objective(fns, p, batch, example_ids, key, spec, loss_chunk,
                         rngs={"dropout": dropout_key})
        return sums["loss_sum"], sums

    grads, sums = jax.grad(loss_sum, has_aux=True)(params)
    return grads, sums


def accumulate(params, batch, example_ids, key, *, grad_accum: int, **kw):
    """Summed gradients over `grad_accum` microbatches, scanned inside the step.

    Microbatch m takes rows m, m + A, m + 2A, ... so each device keeps its own rows (the batch is
    sharded in contiguous blocks) and no data moves between devices.
    """
    if grad_accum == 1:
        return _sums_and_grads(params, batch, example_ids, key, **kw)

    def split(x):
        return x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)

    micro_batches, micro_ids = jax.tree.map(split, (batch, example_ids))

    def body(carry, micro):
        mb, ids, index = micro
        grads, sums = _sums_and_grads(params, mb, ids, key, index, **kw)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct_sum", "count")}
    (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums),
                                    (micro_batches, micro_ids, jnp.arange(grad_accum)))
    return grads, sums


def train_step(state: TrainState, batch: dict, key, *, model, tx, schedule, objective, spec,
               grad_accum: int = 1, loss_chunk: int = 0, rules=None,
               axis_name: str | None = None, example_offset=0):
    """One optimizer step on `batch`. Under pmap, `axis_name` sums gradients across devices."""
    step_key = jax.random.fold_in(key, state.step)
    batch_size = batch["tokens"].shape[0]
    example_ids = example_offset + jnp.arange(batch_size)
    with nn.logical_axis_rules(rules or ()):
        grads, sums = accumulate(state.params, batch, example_ids, step_key, model=model,
                                 objective=objective, spec=spec, grad_accum=grad_accum,
                                 loss_chunk=loss_chunk)
    if axis_name is not None:
        grads, sums = jax.lax.psum((grads, sums), axis_name)
    count = jnp.maximum(sums["count"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)  # gradient of the mean token loss
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": sums["loss_sum"] / count, "accuracy": sums["correct_sum"] / count,
               "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step),
               "tokens_in_loss": sums["count"]}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


class JitStep:
    """`train_step` jitted once over a mesh, with explicit shardings and the state donated.

    Calls run under `jax.set_mesh` so the model's logical constraints resolve to this mesh.
    """

    def __init__(self, step_fn: Callable, mesh: Mesh, state_shardings: TrainState, rules):
        self.mesh = mesh
        self.batch_sharding = batch_sharding(mesh)
        fn = functools.partial(step_fn, rules=rules)
        self.jitted = jax.jit(fn,
                              in_shardings=(state_shardings, self.batch_sharding,
                                            replicated(mesh)),
                              out_shardings=(state_shardings, replicated(mesh)),
                              donate_argnums=0)

    def lower(self, state, batch, key):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(state, batch, key)

    def __call__(self, state, batch, key):
        with jax.set_mesh(self.mesh):
            return self.jitted(state, batch, key)


def make_jit_step(mesh: Mesh, state_shardings: TrainState, rules, **static) -> JitStep:
    return JitStep(functools.partial(train_step, **static), mesh, state_shardings, rules)


def pmap_sharding() -> NamedSharding:
    """Places arrays with a leading local-device axis the way `jax.pmap` takes them (pmap now
    runs on jit + shard_map; `device_put_replicated` and `device_put_sharded` are gone)."""
    return NamedSharding(Mesh(np.array(jax.local_devices()), ("batch",)), P("batch"))


def make_pmap_step(**static):
    """Pure data parallelism with `jax.pmap`: state replicated, batch split on a leading device
    axis, gradients summed with `psum`. Gives the same losses as the jit path."""
    def step(state, batch, key):
        local = batch["tokens"].shape[0]
        offset = jax.lax.axis_index("batch") * local
        return train_step(state, batch, key, axis_name="batch", example_offset=offset,
                          **static)
    return jax.pmap(step, axis_name="batch", in_axes=(0, 0, None), donate_argnums=0)
