"""Learning-rate schedules and the optimizer (AdamW with clipping and a rule-driven decay mask)."""
from __future__ import annotations

import optax

from ptft_jax.config import OptimConfig
from ptft_jax.params import match_rules


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


def make_optimizer(cfg: OptimConfig, total_steps: int):
    """Returns (tx, schedule). Weight decay follows `cfg.weight_decay_rules` (first match wins)."""
    schedule = make_schedule(cfg, total_steps)

    def decay_mask(params):
        return match_rules(params, cfg.weight_decay_rules, "optim.weight_decay_rules")

    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw) if cfg.clip_norm \
        else adamw
    return tx, schedule
