"""The pure train and eval steps, and their two compiled forms: `jax.jit` over a mesh, and
`jax.pmap`.

`train_step(state, batch, key) -> (state, metrics)` has no side effects. Its randomness comes
from `fold_in(key, state.step)`, so a resumed run draws exactly what an uninterrupted run would.
Static things (task, optimizer, which parameters train, LoRA) are closed over with
`functools.partial`; a new set of trainable parameters (a finetuning phase) is a new step.

Parameters are split into trainable and frozen *before* `jax.grad`: gradients exist for the
trainable ones only, and frozen ones pass through untouched (bit-identical).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ptft_jax.core import params as ptree
from ptft_jax.core.lora import with_adapters
from ptft_jax.core.mesh import batch_sharding, replicated
from ptft_jax.core.state import TrainState


def _batch_size(batch) -> int:
    return jax.tree.leaves(batch)[0].shape[0]


def _loss(train_params, frozen, model_state, batch, example_ids, key, micro_index, *, task,
          lora, device_index=None):
    """The summed loss of one (micro)batch and (sums, new model_state). The task's own
    randomness (MLM masks) is keyed by example ids; dropout (and LoRA dropout) is drawn afresh
    for each microbatch, and under pmap for each device (`device_index`: each device's rows
    get their own masks, as one global draw gives them under jit)."""
    params = ptree.merge(train_params, frozen)
    dropout_key = jax.random.fold_in(jax.random.fold_in(key, 1 << 30), micro_index)
    if device_index is not None:  # pmap; under jit one draw covers the global batch
        dropout_key = jax.random.fold_in(dropout_key, device_index)
    if lora is not None:
        params = with_adapters(params, lora, jax.random.fold_in(dropout_key, 1), train=True)
    sums, model_state = task.sums(params, model_state, batch, example_ids, key, train=True,
                                  rngs={"dropout": dropout_key})
    return sums["loss_sum"], (sums, model_state)


def accumulate(train_params, frozen, model_state, batch, example_ids, key, *, grad_accum: int,
               **kw):
    """Summed gradients (trainable parameters only), sums and model state over `grad_accum`
    microbatches, scanned inside the step.

    Microbatch m takes rows m, m + A, m + 2A, ... so each device keeps its own rows (the batch is
    sharded in contiguous blocks) and no data moves between devices.
    """
    grad_fn = jax.grad(functools.partial(_loss, **kw), has_aux=True)
    if grad_accum == 1:
        grads, (sums, model_state) = grad_fn(train_params, frozen, model_state, batch,
                                             example_ids, key, 0)
        return grads, sums, model_state

    def split(x):
        return x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)

    micro_batches, micro_ids = jax.tree.map(split, (batch, example_ids))

    def body(carry, micro):
        grads, sums, state = carry
        mb, ids, index = micro
        g, (s, state) = grad_fn(train_params, frozen, state, mb, ids, key, index)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s), state), None

    first = jax.tree.map(lambda x: x[0], (micro_batches, micro_ids))
    sum_shapes = jax.eval_shape(
        lambda p: _loss(p, frozen, model_state, first[0], first[1], key, 0, **kw)[1][0],
        train_params)
    zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), train_params),
             jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sum_shapes), model_state)
    (grads, sums, model_state), _ = jax.lax.scan(
        body, zeros, (micro_batches, micro_ids, jnp.arange(grad_accum)))
    return grads, sums, model_state


def train_step(state: TrainState, batch: dict, key, *, task, tx, learning_rate, trainable,
               lora=None, grad_accum: int = 1, rules=None, axis_name: str | None = None,
               example_offset=0, device_index=None):
    """One optimizer step on `batch`. Under pmap, `axis_name` sums gradients across devices.
    Metrics are the task's sums (the host turns them into means) and the gradient norm and LR."""
    step_key = jax.random.fold_in(key, state.step)
    example_ids = example_offset + jnp.arange(_batch_size(batch))
    train_params, frozen = ptree.split(state.params, trainable.__contains__)
    with nn.logical_axis_rules(rules or ()):
        grads, sums, model_state = accumulate(train_params, frozen, state.model_state, batch,
                                              example_ids, step_key, task=task, lora=lora,
                                              grad_accum=grad_accum, device_index=device_index)
    if axis_name is not None:
        grads, sums = jax.lax.psum((grads, sums), axis_name)
        model_state = {k: v if k in task.constant_state else jax.lax.pmean(v, axis_name)
                       for k, v in model_state.items()}
    count = jnp.maximum(sums["count"], 1.0)
    with jax.named_scope("optimizer"):  # named for profiles (ptft bench --profile)
        grads = jax.tree.map(lambda g: g / count, grads)  # gradient of the mean loss
        updates, opt_state = tx.update(grads, state.opt_state, train_params)
        params = ptree.merge(optax.apply_updates(train_params, updates), frozen)
    # Divergence guard: a non-finite loss, gradient or update never reaches the state; the
    # step is skipped on device (no host sync) and reported, and the loop decides when to stop.
    loss = sums["loss_sum"] / count
    with jax.named_scope("divergence_guard"):
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & \
            jnp.isfinite(optax.tree.norm(updates))
        params, opt_state, model_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), (params, opt_state, model_state),
            (state.params, state.opt_state, state.model_state))
    metrics = {"sums": sums, "grad_norm": grad_norm,
               "learning_rate": learning_rate(state.opt_state),
               "loss": loss, "skipped": 1 - finite.astype(jnp.int32)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      model_state=model_state), metrics


def eval_step(params, model_state, batch, *, task, lora=None, rules=None,
              axis_name: str | None = None):
    """The task's sums over one eval batch (rows with weight 0 count nothing); no dropout."""
    if lora is not None:
        params = with_adapters(params, lora, train=False)
    with nn.logical_axis_rules(rules or ()):
        sums, _ = task.sums(params, model_state, batch, jnp.arange(_batch_size(batch)),
                            jax.random.key(0), train=False)
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return sums


def predict_step(params, model_state, batch, *, task, lora=None, rules=None):
    if lora is not None:
        params = with_adapters(params, lora, train=False)
    with nn.logical_axis_rules(rules or ()):
        return task.predict(params, model_state, batch)


COMPILES = [0]  # train steps compiled in this process (ptft sweep counts its reuse)


class CompileOnce:
    """The train step compiled ahead of time, once per step object: an engine reused by the
    next trial of a sweep (engine.reuse_engines) reuses its compiled step."""
    _compiled = None

    def compile(self, state, batch, key):
        if self._compiled is None:
            self._compiled = self.lower(state, batch, key).compile()
            COMPILES[0] += 1
        return self._compiled


class JitStep(CompileOnce):
    """`train_step` jitted once over a mesh, with explicit shardings and the state donated;
    `evaluate` and `predict` jitted likewise (params not donated).

    Calls run under `jax.set_mesh` so the model's logical constraints resolve to this mesh.
    """

    def __init__(self, mesh: Mesh, state_shardings: TrainState, rules, **static):
        self.mesh = mesh
        self.batch_sharding = batch_sharding(mesh)
        repl = replicated(mesh)
        self.jitted = jax.jit(functools.partial(train_step, rules=rules, **static),
                              in_shardings=(state_shardings, self.batch_sharding, repl),
                              out_shardings=(state_shardings, repl), donate_argnums=0)
        evaluation = dict(task=static["task"], lora=static.get("lora"), rules=rules)
        self.jitted_eval = jax.jit(functools.partial(eval_step, **evaluation),
                                   in_shardings=(state_shardings.params,
                                                 state_shardings.model_state,
                                                 self.batch_sharding),
                                   out_shardings=repl)
        self.jitted_predict = jax.jit(functools.partial(predict_step, **evaluation),
                                      in_shardings=(state_shardings.params,
                                                    state_shardings.model_state,
                                                    self.batch_sharding),
                                      out_shardings=self.batch_sharding)

    def lower(self, state, batch, key):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(state, batch, key)

    def __call__(self, state, batch, key):
        with jax.set_mesh(self.mesh):
            return self.jitted(state, batch, key)

    def evaluate(self, state, batch):
        with jax.set_mesh(self.mesh):
            return self.jitted_eval(state.params, state.model_state, batch)

    def predict(self, state, batch):
        with jax.set_mesh(self.mesh):
            return self.jitted_predict(state.params, state.model_state, batch)


def pmap_sharding() -> NamedSharding:
    """Places arrays with a leading local-device axis the way `jax.pmap` takes them (pmap now
    runs on jit + shard_map; `device_put_replicated` and `device_put_sharded` are gone)."""
    return NamedSharding(Mesh(np.array(jax.local_devices()), ("batch",)), P("batch"))


class PmapStep(CompileOnce):
    """Pure data parallelism with `jax.pmap`: state replicated, batch split on a leading device
    axis, gradients and sums added with `psum`. The same pure steps as the jit path."""

    def __init__(self, **static):
        def step(state, batch, key):
            device = jax.lax.axis_index("batch")
            return train_step(state, batch, key, axis_name="batch", device_index=device,
                              example_offset=device * _batch_size(batch), **static)
        self._step = jax.pmap(step, axis_name="batch", in_axes=(0, 0, None),
                              donate_argnums=0)
        evaluation = dict(task=static["task"], lora=static.get("lora"))
        self._eval = jax.pmap(functools.partial(eval_step, axis_name="batch", **evaluation),
                              axis_name="batch")
        self._predict = jax.pmap(functools.partial(predict_step, **evaluation),
                                 axis_name="batch")

    def lower(self, state, batch, key):
        return self._step.lower(state, batch, key)

    def __call__(self, state, batch, key):
        return self._step(state, batch, key)

    def evaluate(self, state, batch):
        return jax.tree.map(lambda x: x[0], self._eval(state.params, state.model_state, batch))

    def predict(self, state, batch):
        out = self._predict(state.params, state.model_state, batch)
        return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)
