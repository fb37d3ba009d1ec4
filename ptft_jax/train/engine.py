"""The engine: what a run needs that follows from its config and task. The model, the plan
of which parameters train, the optimizer, the state's shardings, the compiled steps, and how
host batches become device arrays.

A finetuning phase that changes which parameters train (gradual or adaptive unfreezing) is a
new engine (`Engine.for_phase`): a new optimizer and step, compiled once for that phase, with
the optimizer moments of parameters that keep training carried over.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from ptft_jax.config.schema import Config, ConfigError, OptimConfig
from ptft_jax.config.resolve import prune_end
from ptft_jax.core.lora import lora_spec
from ptft_jax.core.mesh import LOGICAL_RULES, global_batch_array, make_mesh, process_rows
from ptft_jax.core.params import check_rules_hit, flatten, matching
from ptft_jax.core.state import (TrainState, abstract_state, carry_opt_state, init_opt_state,
                                 init_state, model_variables, state_shardings, with_shardings)
from ptft_jax.train.optim import hyperparams, make_optimizer, set_hyperparams
from ptft_jax.train.plan import Plan, make_plan
from ptft_jax.train.prune import magnitude_pruning
from ptft_jax.train.step import JitStep, PmapStep, pmap_sharding


@dataclasses.dataclass
class Engine:
    cfg: Config
    task: object
    plan: Plan
    tx: object
    learning_rate: object  # opt_state -> the LR of the coming update
    abstract: TrainState  # shapes only
    shardings: TrainState
    step_fn: object  # JitStep or PmapStep: (state, batch, key) -> (state, metrics)
    rows: slice  # the rows of each global batch this process feeds
    batch_sharding: object = None  # jit only
    devices: list | None = None

    @property
    def pmap(self) -> bool:
        return self.cfg.mesh.parallelism == "pmap"

    def example_batch(self, size: int | None = None) -> dict:
        return self.task.example_batch(size or self.cfg.train.global_batch,
                                       self.cfg.data.seq_len)

    def init(self, key) -> TrainState:
        batch = self.task.example_batch(1, self.cfg.data.seq_len)
        state = init_state(self.task, self.tx, key, batch, self.plan.trainable, self.shardings,
                           self.plan.lora)
        # The optimizer's hyperparameters are this config's (a reused engine's tx was made
        # with another's).
        state = state.replace(opt_state=set_hyperparams(
            state.opt_state, hyperparams(self.cfg.optim, self.cfg.train.steps)))
        return self.place(state)

    def restore_target(self) -> TrainState:
        return with_shardings(self.abstract, self.shardings)

    def place(self, state: TrainState) -> TrainState:
        """Puts a state built on the mesh (or one device, for pmap) where the step wants it."""
        if not self.pmap:
            return state
        n = jax.local_device_count()
        return jax.device_put(jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), state),
                              pmap_sharding())

    def host_state(self, state: TrainState) -> TrainState:
        """The state as checkpoints hold it (one copy, not one per pmap device)."""
        return jax.tree.map(lambda x: x[0], state) if self.pmap else state

    def rows_of(self, size: int) -> slice:
        """The rows of a global batch of `size` that this process feeds."""
        if self.pmap:
            per_process = size // jax.process_count()
            return slice(jax.process_index() * per_process,
                         (jax.process_index() + 1) * per_process)
        return process_rows(self.batch_sharding, size)

    def to_device(self, batch: dict[str, np.ndarray], size: int | None = None) -> dict:
        """This process's rows of a global batch of `size` (default: the training batch)."""
        if self.pmap:
            n = jax.local_device_count()
            return jax.device_put({k: v.reshape(n, -1, *v.shape[1:]) for k, v in batch.items()},
                                  pmap_sharding())
        return global_batch_array(batch, self.batch_sharding,
                                  size or self.cfg.train.global_batch)

    def for_phase(self, phase: int, state: TrainState) -> tuple["Engine", TrainState]:
        """The engine of another finetuning phase, and `state` with its optimizer state grown
        to the new trainable set (moments of parameters that were training are kept)."""
        engine = build(self.cfg, self.task, self.devices, phase)
        host = self.host_state(state)
        fresh = init_opt_state(engine.tx, host.params, engine.plan.trainable,
                               engine.shardings.opt_state)
        host = host.replace(opt_state=carry_opt_state(host.opt_state, fresh))
        return engine, engine.place(host) if self.pmap else host


def check_rules_match(params, rules, key: str) -> None:
    """Every rule but a final catch-all must match some parameter of the model: a misspelt
    regex ('bais$') would otherwise silently give its parameters the next rule's value. The
    default rules serve every model (a ResNet has no embeddings): only a rule the user wrote
    must match something."""
    exempt = {pattern for pattern, _ in OptimConfig().weight_decay_rules}
    patterns = [pattern for pattern, _ in rules]
    if patterns and patterns[-1] in (".*", "", "^.*$", "."):
        exempt.add(patterns[-1])
    check_rules_hit(flatten(params), patterns, key, exempt)


# ptft sweep: engines kept for the next trial in this process, by what their compiled step
# depends on (None: off). A trial that differs only in what the optimizer state carries
# (optim.hyperparams) or in what the loop does around the step reuses the compiled step.
_REUSE: dict | None = None
# Keys that never reach the compiled step: the optimizer's numeric hyperparameters are arrays
# in its state (train/optim.py), the rest is the loop's business.
NOT_COMPILED = ("run_dir", "train.seed", "train.steps", "train.log_every", "train.progress",
                "eval", "checkpoint", "finetune.init_from", "finetune.unfreeze_every",
                "finetune.unfreeze_patience", "data.shuffle_seed",
                *(f"optim.{k}" for k in ("learning_rate", "warmup_steps", "end_lr_ratio",
                                         "decay_every", "decay_factor", "weight_decay", "b1",
                                         "b2", "momentum", "plateau_factor",
                                         "plateau_patience", "plateau_cooldown",
                                         "plateau_threshold", "plateau_min_scale")))


@contextlib.contextmanager
def reuse_engines():
    """Within this block, `build` returns the engine (and compiled step) of an earlier call
    whose config differs only in NOT_COMPILED keys."""
    global _REUSE
    _REUSE = {}
    try:
        yield
    finally:
        _REUSE = None


def _reuse_key(cfg: Config, task, devices, phase: int) -> str:
    tree = cfg.to_dict()
    for dotted in NOT_COMPILED:
        *parents, last = dotted.split(".")
        node = tree
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    labels = task.labels.names if task.labels is not None else None
    return json.dumps([tree, task.name, labels, phase,
                       [d.id for d in (devices or jax.devices())]], sort_keys=True, default=str)


def build(cfg: Config, task, devices=None, phase: int = 0) -> Engine:
    """Builds the engine for `cfg` and `task` on `devices` (default: all) for a phase (or
    reuses one, inside `reuse_engines`)."""
    if _REUSE is not None:
        key = _reuse_key(cfg, task, devices, phase)
        if key not in _REUSE:
            _REUSE[key] = _build(cfg, task, devices, phase)
        return dataclasses.replace(_REUSE[key], cfg=cfg)
    return _build(cfg, task, devices, phase)


def pruning(cfg: Config, trainable):
    """finetune.prune_sparsity's transformation (train/prune.py), or None."""
    f = cfg.finetune
    if not f.prune_sparsity:
        return None
    if not matching(trainable, [f.prune_targets]):
        raise ConfigError(f"finetune.prune_targets {f.prune_targets!r} matches no trainable "
                          f"parameter; give a regex on trainable paths (e.g. "
                          f"'^transformer/.*kernel$').")
    return magnitude_pruning(f.prune_targets, f.prune_sparsity, f.prune_start, prune_end(cfg),
                             f.prune_every, f.prune_scope)


def _build(cfg: Config, task, devices=None, phase: int = 0) -> Engine:
    t = cfg.train
    lora = lora_spec(cfg)
    example = task.example_batch(1, cfg.data.seq_len)
    boxed, _ = jax.eval_shape(lambda rng: model_variables(task, rng, example, lora),
                              jax.random.key(0))
    plan = make_plan(cfg, nn.unbox(boxed), phase)
    check_rules_match(nn.unbox(boxed), cfg.optim.weight_decay_rules, "optim.weight_decay_rules")
    tx, learning_rate = make_optimizer(cfg.optim, t.steps, plan.lr_factors, plan.grad_masks,
                                       pruning(cfg, plan.trainable))
    abstract, logical_specs = abstract_state(task, tx, example, plan.trainable, lora)
    static = dict(task=task, tx=tx, learning_rate=learning_rate, trainable=plan.trainable, lora=lora,
                  grad_accum=t.grad_accum)
    if cfg.mesh.parallelism == "pmap":
        one = SingleDeviceSharding(jax.local_devices()[0])
        per_process = t.global_batch // jax.process_count()
        first = jax.process_index() * per_process
        return Engine(cfg, task, plan, tx, learning_rate, abstract,
                      jax.tree.map(lambda _: one, abstract), PmapStep(**static),
                      slice(first, first + per_process), devices=devices)
    mesh = make_mesh(cfg.mesh, devices)
    shardings = state_shardings(abstract, logical_specs, tx, plan.trainable, mesh,
                                LOGICAL_RULES)
    step_fn = JitStep(mesh, shardings, LOGICAL_RULES, **static)
    return Engine(cfg, task, plan, tx, learning_rate, abstract, shardings, step_fn,
                  process_rows(step_fn.batch_sharding, t.global_batch),
                  step_fn.batch_sharding, devices)
