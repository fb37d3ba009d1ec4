"""Magnitude pruning while finetuning (`finetune.prune_sparsity`), after Zhu & Gupta (2017),
"To prune, or not to prune": the smallest weights of the targeted arrays are masked to zero,
their share rising from 0 at `prune_start` to `prune_sparsity` at `prune_end` on a cubic
schedule (fast at first, while the network can still recover), the masks recomputed every
`prune_every` steps from the weights' magnitudes, over all targets at once (global) or array by
array (per_layer).

No maintained JAX pruning library installs here, so this is the small piece written by hand:
one optax transformation, last in the optimizer's chain. Its state holds the masks (one bool
per weight of each target; a checkpoint saves them with the optimizer state, so a resumed run
prunes exactly as an unbroken one) and its own step count. A pruned weight's update is minus
the weight itself, so it is exactly zero after every step, whatever the optimizer's moments say.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ptft_jax.core.params import any_rule, path_str


class PruneState(NamedTuple):
    count: jax.Array  # updates so far (int32)
    masks: Any  # like the params: bool arrays for targets (True = kept), a scalar for the rest


def sparsity_at(step, final: float, start: int, end: int):
    """Zhu & Gupta's cubic schedule: 0 before `start`, `final` from `end` on."""
    progress = jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0)
    return final * (1.0 - (1.0 - progress) ** 3)


def _kept(values: jax.Array, sparsity) -> jax.Array:
    """A mask keeping all but the floor(sparsity * n) smallest of `values` (ties by position)."""
    flat = values.reshape(-1)
    pruned = jnp.floor(sparsity * flat.size).astype(jnp.int32)
    rank = jnp.zeros(flat.size, jnp.int32).at[jnp.argsort(flat)].set(
        jnp.arange(flat.size, dtype=jnp.int32))
    return (rank >= pruned).reshape(values.shape)


def magnitude_pruning(targets: str, sparsity: float, start: int, end: int, every: int,
                      scope: str) -> optax.GradientTransformation:
    """`targets`: a regex on parameter paths (params.any_rule); `scope`: global | per_layer."""
    def is_target(key_path) -> bool:
        return any_rule(path_str(key_path), [targets])

    def init(params):
        masks = jax.tree_util.tree_map_with_path(
            lambda kp, p: jnp.ones(p.shape if is_target(kp) else (), jnp.bool_), params)
        return PruneState(jnp.zeros((), jnp.int32), masks)

    def recompute(params, masks, level):
        # A pruned weight's magnitude counts as 0, so it stays pruned.
        values = jax.tree.map(lambda p, m: jnp.where(m, jnp.abs(p), 0.0), params, masks)
        leaves, treedef = jax.tree.flatten(values)
        chosen = [i for i, m in enumerate(jax.tree.leaves(masks)) if m.ndim]
        if scope == "per_layer":
            for i in chosen:
                leaves[i] = _kept(leaves[i], level)
        else:
            kept = _kept(jnp.concatenate([leaves[i].reshape(-1) for i in chosen]), level)
            offset = 0
            for i in chosen:
                size = leaves[i].size
                leaves[i] = kept[offset:offset + size].reshape(leaves[i].shape)
                offset += size
        old = jax.tree.leaves(masks)
        return jax.tree.unflatten(treedef, [leaves[i] if i in chosen else old[i]
                                            for i in range(len(old))])

    def update(updates, state, params):
        step = state.count + 1  # the training step this update makes (the config counts so)
        due = (step >= start) & (step <= end) & (((step - start) % every == 0) | (step == end))
        # The updated weights are ranked only on a step that recomputes the masks.
        masks = jax.lax.cond(due, lambda: recompute(optax.apply_updates(params, updates),
                                                    state.masks,
                                                    sparsity_at(step, sparsity, start, end)),
                             lambda: state.masks)
        # Kept weights take their update; pruned ones minus themselves: exactly zero after.
        updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p).astype(u.dtype) if m.ndim
                               else u, updates, params, masks)
        return updates, PruneState(state.count + 1, masks)
    return optax.GradientTransformation(init, update)


def pruned_share(opt_state) -> float | None:
    """The share of the targets' weights pruned now, or None without pruning (summed on the
    devices: under several processes no host holds every mask)."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState))
             if isinstance(x, PruneState)]
    if not found:
        return None
    chosen = [m for m in jax.tree.leaves(found[0].masks) if m.ndim]
    pruned = sum(int(jnp.sum(~m)) for m in chosen)
    return pruned / max(sum(m.size for m in chosen), 1)
