"""Structured pruning of attention heads (`ptft export RUN OUT --prune-heads K`): each layer
keeps its K most important heads and the others are cut out of the weights, so the saved model
is smaller and every step computes less (model.head_dim keeps the heads' size when
num_heads x head_dim falls below hidden_size).

A head's importance is Michel et al.'s ("Are Sixteen Heads Really Better than One?", 2019):
the expected |dL/dxi_h| of a gate xi_h on the head's output, here over batches of the run's
training examples. A gate on head h scales the rows of the output projection that read it, so
dL/dxi_h = sum(W_out[h] * dL/dW_out[h]): the ordinary parameter gradient gives every head's
score in one backward pass. Every layer keeps the same number of heads, so the model keeps
one shape per layer (and `model.scan_layers` still stacks them).

No maintained JAX library prunes heads (HF's `prune_heads` is PyTorch's); this is the small
piece written here.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ptft_jax.config.schema import FINETUNE_TASKS, Config, ConfigError
from ptft_jax.config.resolve import task_for
from ptft_jax.core.params import flatten, unflatten
from ptft_jax.data.labelled import open_examples

_ATTN = re.compile(r"^transformer/layers(?:_(\d+))?/attn/(query|key|value|out)/(kernel|bias)$")
# Where the head axis is in each attention array, counting from the layer's own axes.
_HEAD_AXIS = {("query", "kernel"): 1, ("key", "kernel"): 1, ("value", "kernel"): 1,
              ("query", "bias"): 0, ("key", "bias"): 0, ("value", "bias"): 0,
              ("out", "kernel"): 0}


def check_prunable(cfg: Config, keep: int) -> None:
    """ConfigError unless `keep` heads per layer can be kept of this run's model."""
    if task_for(cfg) not in FINETUNE_TASKS:
        raise ConfigError(f"--prune-heads prunes text classifiers (train.task "
                          f"{', '.join(FINETUNE_TASKS)}); this run trained {task_for(cfg)}.")
    if not 1 <= keep < cfg.model.num_heads:
        raise ConfigError(f"--prune-heads {keep}: keep between 1 and {cfg.model.num_heads - 1} "
                          f"of this model's {cfg.model.num_heads} heads per layer.")


def importance_batches(cfg: Config, run_dir: Path, task, examples: int):
    """Padded batches of about `examples` of the run's training examples, in file order."""
    try:
        split, _ = open_examples(cfg.data, cfg.data.split, run_dir / "tokenizer.json",
                                 Path(cfg.data.cache_dir) if cfg.data.cache_dir
                                 else run_dir / "data_cache", task.labels.kind, task.labels,
                                 cfg.model.kind, progress=False)
    except ValueError as e:
        raise ConfigError(f"--prune-heads scores heads on the run's training split: {e}") \
            from None
    size = min(cfg.eval.batch_size, 32, len(split))
    n = max(size, min(examples, len(split)) // size * size)  # whole batches: one compile
    return [split.rows(np.arange(start, start + size)) for start in range(0, n, size)]


def head_importance(task, params, model_state, batches, num_layers: int) -> np.ndarray:
    """[layers, heads]: the mean over batches of |sum(W_out[h] * dL/dW_out[h])|, L the batch's
    summed loss."""
    def scores(params, batch):
        def loss(p):
            sums, _ = task.sums(p, model_state, batch, jnp.arange(len(batch["tokens"])),
                                jax.random.key(0), train=False)
            return sums["loss_sum"]
        grads = flatten(jax.grad(loss)(params))
        weights = flatten(params)
        per_layer = {}
        for path, g in grads.items():
            m = _ATTN.match(path)
            if m and m.group(2) == "out" and m.group(3) == "kernel":
                gate = jnp.abs(jnp.sum(weights[path] * g, axis=(-2, -1)))  # [(L,) heads]
                per_layer[m.group(1)] = gate
        if None in per_layer:  # scanned layers: one stacked array
            return per_layer[None]
        return jnp.stack([per_layer[str(i)] for i in range(num_layers)])
    jitted = jax.jit(scores)
    total = sum(np.asarray(jitted(params, {k: jnp.asarray(v) for k, v in b.items()}))
                for b in batches)
    return total / max(len(batches), 1)


def kept_heads(importance: np.ndarray, keep: int) -> np.ndarray:
    """[layers, keep]: each layer's `keep` most important heads, in their original order."""
    return np.sort(np.argsort(-importance, axis=1, kind="stable")[:, :keep], axis=1)


def prune_heads(params: dict, kept: np.ndarray) -> dict:
    """The params with only the `kept` [layers, keep] heads of every attention layer."""
    out = {}
    for path, value in flatten(params).items():
        m = _ATTN.match(path)
        axis = _HEAD_AXIS.get((m.group(2), m.group(3))) if m else None
        if axis is None:  # not attention, or the output bias (one per layer, not per head)
            out[path] = value
            continue
        value = np.asarray(value)
        if m.group(1) is None:  # scanned: [layers, ...], a different selection per layer
            index = kept.reshape((kept.shape[0],) + (1,) * axis + (kept.shape[1],)
                                 + (1,) * (value.ndim - axis - 2))
            out[path] = np.take_along_axis(value, index, axis=axis + 1)
        else:
            out[path] = np.take(value, kept[int(m.group(1))], axis=axis)
    return unflatten(out)


def pruned_config(cfg: Config, keep: int) -> Config:
    m = cfg.model
    head_dim = m.head_dim or m.hidden_size // m.num_heads
    return dataclasses.replace(cfg, model=dataclasses.replace(m, num_heads=keep,
                                                              head_dim=head_dim))
