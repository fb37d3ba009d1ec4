"""Learning-rate schedules and optimizers: AdamW, Adam, SGD (momentum / Nesterov), LAMB, Lion
and Adafactor from optax, each with clipping, the rule-driven weight-decay mask, and
per-parameter LR multipliers (head vs backbone, layer-wise decay, layers not yet unfrozen
inside a stacked `scan_layers` array).

The numeric hyperparameters (peak LR, warmup, decay, betas, momentum, the plateau scale) live
in the optimizer state through `optax.inject_hyperparams`, as arrays, not as constants
compiled into the step. So two runs that differ only in them compile the same step (a sweep
reuses it), and reduce-on-plateau changes the LR between evaluations without a recompile.

The optimizer only ever sees the trainable parameters (core/state.py splits them off before
`jax.grad`), so the multipliers here are factors on trainable leaves: a float, or for a
stacked layer array an array along its leading `layers` axis.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ptft_jax.config.schema import OptimConfig
from ptft_jax.core.params import match_rules, path_str

# Optimizers whose weight decay is L2 on the gradient (Adam and SGD as their papers and
# PyTorch define them); the others decay the weights apart from the gradient's scaling.
COUPLED_DECAY = ("adam", "sgd")


def hyperparams(cfg: OptimConfig, total_steps: int) -> dict[str, float]:
    """The hyperparameters the optimizer state carries (everything numeric a sweep may vary
    without a recompile); `lr_scale` is reduce-on-plateau's factor, 1 until a plateau."""
    values = {"learning_rate": cfg.learning_rate, "warmup_steps": cfg.warmup_steps,
              "total_steps": total_steps, "end_lr_ratio": cfg.end_lr_ratio,
              "decay_every": cfg.decay_every, "decay_factor": cfg.decay_factor,
              "weight_decay": cfg.weight_decay, "b1": cfg.b1, "b2": cfg.b2,
              "momentum": cfg.momentum, "lr_scale": 1.0}
    return {k: float(v) for k, v in values.items()}  # all float32 arrays in the state


def learning_rate_at(h: dict, step, kind: str):
    """The LR at `step` (traceable): linear warmup from 0 to the peak, then cosine / linear
    decay to end_lr_ratio * peak, step decay (x decay_factor every decay_every steps), or
    constant (also the base of reduce-on-plateau); times the plateau scale."""
    step = jnp.asarray(step, jnp.float32)
    peak = h["learning_rate"]
    warmup = jnp.minimum(h["warmup_steps"], h["total_steps"])
    since = jnp.maximum(step - warmup, 0.0)
    frac = jnp.clip(since / jnp.maximum(h["total_steps"] - warmup, 1.0), 0.0, 1.0)
    end = h["end_lr_ratio"]
    if kind == "cosine":
        after = peak * ((1 - end) * 0.5 * (1 + jnp.cos(jnp.pi * frac)) + end)
    elif kind == "linear":
        after = peak * (1 + (end - 1) * frac)
    elif kind == "step":
        after = peak * h["decay_factor"] ** jnp.floor(since / jnp.maximum(h["decay_every"], 1))
    else:
        after = peak
    warm = peak * step / jnp.maximum(warmup, 1.0)
    return jnp.where(step < warmup, warm, after) * h["lr_scale"]


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The schedule of `cfg` as a function of the step, its hyperparameters fixed."""
    h = {k: jnp.float32(v) for k, v in hyperparams(cfg, total_steps).items()}
    return lambda step: learning_rate_at(h, step, cfg.schedule)


def _scale_by_path(factors: dict) -> optax.GradientTransformation:
    """Multiplies each leaf by `factors[path]` (a float or a broadcastable array); leaves not
    listed pass unchanged. Stateless, so the optimizer state's structure never depends on it."""
    if not factors:
        return optax.identity()

    def scale(updates, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda p, u: u * factors[path_str(p)] if path_str(p) in factors else u, updates)
    return optax.stateless(scale)


def _core(cfg: OptimConfig, decay_mask, h: dict) -> optax.GradientTransformation:
    """The optimizer of `cfg.name` with the (possibly traced) hyperparameters `h`, the LR
    schedule included, as optax chains it."""
    decay = optax.add_decayed_weights(h["weight_decay"], mask=decay_mask)
    lr = optax.scale_by_learning_rate(lambda count: learning_rate_at(h, count, cfg.schedule))
    if cfg.name in ("adamw", "adam"):
        adam = optax.scale_by_adam(b1=h["b1"], b2=h["b2"], eps=cfg.eps)
        parts = [decay, adam] if cfg.name == "adam" else [adam, decay]
    elif cfg.name == "sgd":
        parts = [decay, optax.trace(decay=h["momentum"], nesterov=cfg.nesterov)]
    elif cfg.name == "lamb":
        parts = [optax.scale_by_adam(b1=h["b1"], b2=h["b2"], eps=cfg.eps), decay,
                 optax.scale_by_trust_ratio()]
    elif cfg.name == "lion":
        parts = [optax.scale_by_lion(b1=h["b1"], b2=h["b2"]), decay]
    elif cfg.name == "adafactor":
        parts = [optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0), decay]
    else:
        raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}")
    return optax.chain(*parts, lr)


def make_optimizer(cfg: OptimConfig, total_steps: int, lr_factors: dict | None = None,
                   grad_masks: dict | None = None, last=None):
    """Returns (tx, learning_rate): `learning_rate(opt_state)` is the LR of the coming update.

    - `grad_masks` {path: 0/1 array}: zeroes the gradient slices of frozen layers inside a
      stacked array before clipping, so they count in no norm and get no optimizer moments.
    - `lr_factors` {path: factor}: scales each leaf's whole update (the optimizer's step and
      weight decay), i.e. its learning rate; 0 keeps a frozen slice exactly where it is.
    - `last`: a transformation applied after all of these (pruning's masks, train/prune.py).
    Weight decay follows `cfg.weight_decay_rules` (first match wins)."""
    def decay_mask(params):
        return match_rules(params, cfg.weight_decay_rules, "optim.weight_decay_rules")

    def core(learning_rate, warmup_steps, total_steps, end_lr_ratio, decay_every, decay_factor,
             weight_decay, b1, b2, momentum, lr_scale):  # named: inject_hyperparams binds them
        return _core(cfg, decay_mask, dict(
            learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=total_steps,
            end_lr_ratio=end_lr_ratio, decay_every=decay_every, decay_factor=decay_factor,
            weight_decay=weight_decay, b1=b1, b2=b2, momentum=momentum, lr_scale=lr_scale))

    core = optax.inject_hyperparams(core, hyperparam_dtype=jnp.float32)
    parts = [_scale_by_path(grad_masks or {})]
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts += [core(**hyperparams(cfg, total_steps)), _scale_by_path(lr_factors or {})]
    if last is not None:
        parts.append(last)
    tx = optax.chain(*parts)

    def learning_rate(opt_state):
        state = _injected(opt_state)
        return learning_rate_at(state.hyperparams, state.count, cfg.schedule)
    return tx, learning_rate


def _is_injected(x) -> bool:
    return isinstance(x, optax.InjectStatefulHyperparamsState)


def _injected(opt_state):
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_injected) if _is_injected(x)]
    assert len(found) == 1, "the optimizer state holds one set of hyperparameters"
    return found[0]


def set_hyperparams(opt_state, values: dict):
    """`opt_state` with the injected hyperparameters in `values` replaced (each array keeps
    its placement: under pmap, one copy per device)."""
    def replace(x):
        if not _is_injected(x):
            return x
        new = dict(x.hyperparams)
        for name, value in values.items():
            old = new[name]
            array = jnp.full(old.shape, value, old.dtype)
            new[name] = jax.device_put(array, old.sharding) if hasattr(old, "sharding") \
                else array
        return x._replace(hyperparams=new)
    return jax.tree.map(replace, opt_state, is_leaf=_is_injected)


def get_hyperparam(opt_state, name: str) -> float:
    value = _injected(opt_state).hyperparams[name]
    return float(jnp.ravel(jnp.asarray(value))[0])


def plateau_rule(cfg: OptimConfig) -> optax.GradientTransformationExtraArgs:
    """Reduce-on-plateau (optax.contrib), fed the validation metric after each evaluation on
    the host: its scale becomes the state's `lr_scale`."""
    return optax.contrib.reduce_on_plateau(factor=cfg.plateau_factor,
                                           patience=cfg.plateau_patience,
                                           cooldown=cfg.plateau_cooldown,
                                           rtol=0.0, atol=cfg.plateau_threshold,
                                           min_scale=cfg.plateau_min_scale)


def plateau_step(cfg: OptimConfig, saved: dict | None, value: float,
                 mode: str) -> tuple[dict, float]:
    """Feeds one evaluation's metric to reduce-on-plateau. `saved` is its state as the last
    call returned it (a dict of numbers, kept in the checkpoints' metadata so a resumed run
    continues the count); returns the new state and the LR scale."""
    rule = plateau_rule(cfg)
    fresh = rule.init(None)
    state = fresh if saved is None else fresh._replace(**{
        k: jnp.asarray(v, getattr(fresh, k).dtype) for k, v in saved.items()})
    _, state = rule.update({}, state, value=-value if mode == "max" else value)
    return {k: float(v) for k, v in state._asdict().items()}, float(state.scale)
