"""The values each config key may take, checked by one walk over every field of every section
(`check_values`, which validate() calls first): a key with a fixed set of values (a Literal
type in schema.py) must hold one of them; every number must be finite (NaN and infinities
are refused anywhere, inside lists too); every integer is a size, count, step or seed, so it
must be >= 0 unless RANGES says more (or, for mesh axes, less); every float key has its
range in RANGES. A ModelConfig's rules hold for `model.*` and for both towers' models alike.

Rules are written "> 0", ">= 1", "[0, 1)" (interval notation); a key typed `X | None` may
also be null. What depends on two keys (hidden_size divisible by num_heads, say) is
validate.py's.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ptft_jax.config.schema import (AugmentConfig, CheckpointConfig, ConfigError, DataConfig,
                                    DistillConfig, DistributedConfig, EvalConfig,
                                    FinetuneConfig, MeshConfig, ModelConfig, ObjectiveConfig,
                                    OptimConfig, TowerConfig, TrainConfig, check_choice)

UNIT = "[0, 1)"  # a rate or probability that must leave something: dropout, b1, ...

# Per section, the keys whose range is not the default one (integers: ">= 0"; floats: any
# finite value). A key missing here that is a float is deliberately unbounded.
RANGES: dict[type, dict[str, str]] = {
    ModelConfig: {"vocab_size": ">= 8", "hidden_size": ">= 1", "num_layers": ">= 1",
                  "num_heads": ">= 1", "head_dim": ">= 1", "mlp_dim": ">= 1", "max_len": ">= 1",
                  "dropout": UNIT, "norm_eps": "(0, 1)", "image_size": ">= 8",
                  "channels": ">= 1", "patch_size": ">= 1", "resnet_width": ">= 1"},
    TowerConfig: {"projection_dim": ">= 1"},
    # seq_len: room for a row's special tokens ([CLS] ... [SEP], a pair's second [SEP]) and
    # some text; shorter rows train nothing a user would want.
    DataConfig: {"seq_len": ">= 8", "prefetch": ">= 1", "tokenizer_vocab_size": ">= 1",
                 "examples_per_row": ">= 0"},
    ObjectiveConfig: {"mask_rate": "(0, 1)", "mask_token_rate": "[0, 1]",
                      "random_token_rate": "[0, 1]", "label_smoothing": UNIT,
                      "temperature": "> 0"},
    AugmentConfig: {"mixup": ">= 0", "cutmix": ">= 0", "mix_prob": "[0, 1]"},
    MeshConfig: {"data": ">= -1", "fsdp": ">= -1", "tensor": ">= -1"},  # -1: the rest
    OptimConfig: {"learning_rate": "> 0", "end_lr_ratio": ">= 0", "decay_every": ">= 1",
                  "decay_factor": "(0, 1]", "plateau_factor": "(0, 1)",
                  "plateau_patience": ">= 1", "plateau_threshold": "> 0",
                  "plateau_min_scale": UNIT, "b1": UNIT, "b2": UNIT, "eps": "> 0",
                  "momentum": UNIT, "weight_decay": ">= 0", "clip_norm": ">= 0"},
    TrainConfig: {"steps": ">= 1", "global_batch": ">= 1", "grad_accum": ">= 1",
                  "log_every": ">= 1", "max_skipped_steps": ">= 1",
                  "loss_spike_factor": ">= 0", "loss_spike_window": ">= 1"},
    FinetuneConfig: {"layer_decay": "(0, 1]", "unfreeze_every": ">= 1",
                     "unfreeze_patience": ">= 1", "unfreeze_layers": ">= 1",
                     "lora_alpha": "> 0", "lora_dropout": UNIT, "prune_sparsity": UNIT,
                     "prune_every": ">= 1"},
    DistillConfig: {"temperature": "> 0", "alpha": "[0, 1]", "hidden_weight": ">= 0"},
    EvalConfig: {"batch_size": ">= 1"},
    CheckpointConfig: {"every_minutes": ">= 0", "keep": ">= 1"},
    DistributedConfig: {"num_processes": ">= 1"},
}


def check_values(node: Any, where: str = "") -> None:
    """Every field of a config dataclass, nested sections too: its choice, finiteness and
    range (see the module's docstring). Raises ConfigError naming the dotted key."""
    hints, rules = get_type_hints(type(node)), RANGES.get(type(node), {})
    for f in dataclasses.fields(node):
        key, value = f"{where}{f.name}", getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            check_values(value, f"{key}.")
            continue
        typ, optional = _without_none(hints[f.name])
        if value is None:
            if not optional:
                raise ConfigError(f"'{key}' may not be null.")
            continue
        if get_origin(typ) is Literal:
            check_choice(value, typ, key)
            continue
        rule = rules.get(f.name, ">= 0" if typ is int else None)
        if typ in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (typ is int and not isinstance(value, int)):
                raise ConfigError(f"'{key}' must be {'an integer' if typ is int else 'a number'}"
                                  f", got {value!r}.")
            if not math.isfinite(value) or not _holds(value, rule):
                raise ConfigError(_wrong(key, value, rule, optional, _default(f)))
        _check_finite(value, key)


def _check_finite(value: Any, key: str) -> None:
    """NaN or an infinity anywhere inside a list (or mapping) value."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"'{key}' is {value}; it must be a finite number.")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, f"{key}[{i}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_finite(item, f"{key}.{name}")


def _without_none(typ: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed): `int | None` -> (int, True)."""
    if get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in get_args(typ) if a is not type(None)]
        return args[0], len(args) < len(get_args(typ))
    return typ, False


def _holds(value: float, rule: str | None) -> bool:
    if rule is None:
        return True
    if rule.startswith(">="):
        return value >= float(rule[2:])
    if rule.startswith(">"):
        return value > float(rule[1:])
    low, high = (float(x) for x in rule[1:-1].split(","))
    return (low <= value if rule[0] == "[" else low < value) and \
        (value <= high if rule[-1] == "]" else value < high)


def _describe(rule: str) -> str:
    """The rule in words: "> 0" -> "positive", ">= 1" -> "at least 1", "[0, 1)" -> "in ..."."""
    if rule == "> 0":
        return "positive"
    if rule == ">= 0":
        return "non-negative"
    if rule.startswith(">="):
        return f"at least {rule[2:].strip()}"
    if rule.startswith(">"):
        return f"above {rule[1:].strip()}"
    return f"in {rule}"


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _wrong(key: str, value: float, rule: str | None, optional: bool, default: Any) -> str:
    """One line: the key, its value, what it must be and the default to go back to."""
    need = ([] if math.isfinite(value) else ["finite"]) + ([_describe(rule)] if rule else [])
    null = ", or null (the default)" if optional and default is None else ""
    hint = f" (the default is {default})" if default is not None else ""
    return f"'{key}' is {value}; it must be {' and '.join(need)}{null}{hint}."
