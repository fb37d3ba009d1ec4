"""The train state, built shapes first, then shardings, then arrays (never unsharded)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ptft_jax.params import flatten


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def _init_params_boxed(model: nn.Module, rng, seq_len: int):
    """Parameters still wrapped in their logical-axis metadata (nn.Partitioned boxes)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return model.init({"params": rng, "dropout": rng}, tokens)["params"]


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
    """(abstract TrainState, logical PartitionSpecs of its params): shapes only, no memory."""
    boxed = jax.eval_shape(lambda rng: _init_params_boxed(model, rng, seq_len),
                           jax.random.key(0))
    params = nn.unbox(boxed)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                       opt_state=jax.eval_shape(tx.init, params))
    return state, nn.get_partition_spec(boxed)


def state_shardings(state: TrainState, logical_specs, tx, mesh: Mesh, rules) -> TrainState:
    """NamedShardings for every leaf: parameters from their logical names, optimizer moments
    like their parameters (optax.tree_map_params), everything else replicated."""
    param_sh = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
    check_divisible(state.params, param_sh)
    repl = NamedSharding(mesh, P())
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, state.opt_state, param_sh,
                                   transform_non_params=lambda _: repl,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(step=repl, params=param_sh, opt_state=opt_sh)


def check_divisible(params, shardings) -> None:
    """A readable error, before compiling, for a parameter the mesh cannot split evenly."""
    flat_params, flat_sh = flatten(params), flatten(shardings)
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


def init_state(model: nn.Module, tx, rng, seq_len: int, shardings: TrainState) -> TrainState:
    """Initialises parameters and optimizer state directly into their shardings."""
    def init(rng):
        params = nn.unbox(_init_params_boxed(model, rng, seq_len))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params))
    return jax.jit(init, out_shardings=shardings)(rng)


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying target shardings: what Orbax restores into."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
