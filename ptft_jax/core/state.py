"""The train state, built shapes first, then shardings, then arrays (never unsharded).

Parameters are split into trainable and frozen before anything is differentiated: the
optimizer state covers the trainable parameters only (`Plan.trainable`), so frozen ones cost
neither gradient memory nor optimizer memory.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ptft_jax.core import params as ptree
from ptft_jax.core.lora import LORA_KEY, init_adapters


@flax.struct.dataclass
class TrainState:
    """What a step reads and writes. `params` holds every parameter (trainable or frozen, LoRA
    adapters under 'lora/'); `opt_state` covers the trainable ones only; `model_state` holds the
    model's mutable collections (e.g. {'batch_stats': ...} for BatchNorm), {} for models
    without any."""
    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any = flax.struct.field(default_factory=dict)


def model_variables(task, rng, batch, lora):
    """(boxed params incl. LoRA adapters, model_state) from the task's model init."""
    variables = dict(task.init_variables(rng, batch))
    params = variables.pop("params")
    if lora is not None:
        params = {**params, LORA_KEY: init_adapters(nn.unbox(params), lora,
                                                    jax.random.fold_in(rng, 7))}
    return params, variables


def abstract_state(task, tx, batch, trainable, lora=None):
    """(abstract TrainState, logical PartitionSpecs of (params, model_state)): shapes only."""
    boxed_params, boxed_state = jax.eval_shape(
        lambda rng: model_variables(task, rng, batch, lora), jax.random.key(0))
    params, model_state = nn.unbox(boxed_params), nn.unbox(boxed_state)
    train_params, _ = ptree.split(params, trainable.__contains__)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                       opt_state=jax.eval_shape(tx.init, train_params), model_state=model_state)
    # LoRA adapters carry no axis names: they are small and stay replicated.
    return state, (nn.get_partition_spec(boxed_params), nn.get_partition_spec(boxed_state))


def state_shardings(state: TrainState, logical_specs, tx, trainable, mesh: Mesh,
                    rules) -> TrainState:
    """NamedShardings for every leaf: parameters and model state from their logical names,
    optimizer moments like their parameters (optax.tree_map_params), the rest replicated."""
    param_specs, state_specs = logical_specs
    param_sh = nn.logical_to_mesh_sharding(param_specs, mesh, rules)
    check_divisible(state.params, param_sh)
    repl = NamedSharding(mesh, P())
    train_sh, _ = ptree.split(param_sh, trainable.__contains__)
    train_params, _ = ptree.split(state.params, trainable.__contains__)
    # A per-parameter leaf of another shape (Adafactor's factored row / column statistics)
    # is small by design: replicated.
    opt_sh = optax.tree_map_params(
        tx, lambda leaf, sh, param: sh if leaf.shape == param.shape else repl,
        state.opt_state, train_sh, train_params, transform_non_params=lambda _: repl,
        is_leaf=lambda x: isinstance(x, NamedSharding))
    model_state_sh = nn.logical_to_mesh_sharding(state_specs, mesh, rules)
    return TrainState(step=repl, params=param_sh, opt_state=opt_sh, model_state=model_state_sh)


def check_divisible(params, shardings) -> None:
    """A readable error, before compiling, for a parameter the mesh cannot split evenly."""
    flat_params, flat_sh = ptree.flatten(params), ptree.flatten(shardings)
    for path, leaf in flat_params.items():
        sh = flat_sh[path]
        mesh_shapes = dict(sh.mesh.shape)
        for dim, axes in zip(leaf.shape, sh.spec):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            size = 1
            for a in axes:
                size *= mesh_shapes[a]
            if dim % size:
                raise ValueError(f"Parameter '{path}' has shape {leaf.shape}; its dimension "
                                 f"{dim} is sharded over mesh axes {axes} of size {size}, which "
                                 f"does not divide it. Change the mesh sizes or the model shape.")


def init_state(task, tx, rng, batch, trainable, shardings: TrainState,
               lora=None) -> TrainState:
    """Initialises parameters, model state and optimizer state directly into their
    shardings."""
    def init(rng):
        boxed_params, boxed_state = model_variables(task, rng, batch, lora)
        params = nn.unbox(boxed_params)
        train_params, _ = ptree.split(params, trainable.__contains__)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(train_params), model_state=nn.unbox(boxed_state))
    return jax.jit(init, out_shardings=shardings)(rng)


def init_opt_state(tx, params, trainable, shardings):
    """A fresh optimizer state for the trainable part of `params`, in its shardings."""
    return jax.jit(lambda p: tx.init(ptree.split(p, trainable.__contains__)[0]),
                   out_shardings=shardings)(params)


def carry_opt_state(old, new):
    """`new` (a fresh optimizer state for a larger trainable set) with every leaf that `old`
    already had (same key path: moments of parameters that stay trainable, step counts) taken
    from `old`: moments survive a change of phase, new parameters start from zero."""
    old_leaves = {jax.tree_util.keystr(p): leaf
                  for p, leaf in jax.tree_util.tree_leaves_with_path(old)}

    def pick(path, leaf):
        kept = old_leaves.get(jax.tree_util.keystr(path))
        if kept is not None and kept.shape == leaf.shape:
            return jax.device_put(kept, leaf.sharding) if hasattr(leaf, "sharding") else kept
        return leaf
    return jax.tree_util.tree_map_with_path(pick, new)


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying target shardings: what Orbax restores into."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
