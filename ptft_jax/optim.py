"""Learning-rate schedules and the optimizer: AdamW with clipping, a rule-driven decay mask,
and per-parameter LR multipliers (head vs backbone, layer-wise decay, layers not yet
unfrozen inside a stacked `scan_layers` array).

The optimizer only ever sees the trainable parameters (state.py splits them off before
`jax.grad`), so the multipliers here are factors on trainable leaves: a float, or for a
stacked layer array an array along its leading `layers` axis.
"""
from __future__ import annotations

import jax
import optax

from ptft_jax.config import OptimConfig
from ptft_jax.params import match_rules, path_str


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine / linear decay to `end_lr_ratio` * peak."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_ratio
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


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


def make_optimizer(cfg: OptimConfig, total_steps: int, lr_factors: dict | None = None,
                   grad_masks: dict | None = None):
    """Returns (tx, schedule).

    - `grad_masks` {path: 0/1 array}: zeroes the gradient slices of frozen layers inside a
      stacked array before clipping, so they count in no norm and get no Adam moments.
    - `lr_factors` {path: factor}: scales each leaf's whole update (Adam step and weight decay),
      i.e. its learning rate; 0 keeps a frozen slice exactly where it is.
    Weight decay follows `cfg.weight_decay_rules` (first match wins)."""
    schedule = make_schedule(cfg, total_steps)

    def decay_mask(params):
        return match_rules(params, cfg.weight_decay_rules, "optim.weight_decay_rules")

    # AdamW written out (it is what optax.adamw chains), so the LR factors come last.
    parts = [_scale_by_path(grad_masks or {})]
    if cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts += [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
              optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
              optax.scale_by_learning_rate(schedule),
              _scale_by_path(lr_factors or {})]
    return optax.chain(*parts), schedule
