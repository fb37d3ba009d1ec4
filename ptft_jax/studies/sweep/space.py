"""The search space of `ptft sweep`: a YAML mapping from config keys to what a trial may set.

    optim.learning_rate: {log_uniform: [1.0e-5, 1.0e-3]}   # float, sampled on a log scale
    optim.weight_decay: {uniform: [0.0, 0.1], step: 0.05}  # float (step: on a grid)
    optim.warmup_steps: {int: [0, 100], step: 20}          # integer range, both ends included
    optim.name: [adamw, lion]                              # a list: choices
    strategy:                                              # not a config key: a named choice
      bundles:                                             #   that sets several keys at once
        full: {}
        lora_r8: {finetune.lora_rank: 8}
        gradual: {finetune.unfreeze: gradual, finetune.unfreeze_every: 50}

A `sweep:` section in the same file may set the command's options (sampler, metric, trials,
pruner, ...; the command line wins). Every key is checked against the config's keys (an
unknown one names the closest), every range for order, every value against validation: all
before the first trial.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path

from ptft_jax.config.load import read_yaml_mapping
from ptft_jax.config.schema import Config, ConfigError

KINDS = ("choices", "uniform", "log_uniform", "int", "bundles")


@dataclasses.dataclass
class Param:
    name: str  # a dotted config key, or a bundle's name
    kind: str  # one of KINDS
    choices: list | None = None  # choices; bundles: the bundle names
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    bundles: dict | None = None  # bundles: name -> {dotted key: value}

    def grid_values(self) -> list:
        """Every value a grid visits; a continuous range needs a step."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            raise ConfigError(f"space: '{self.name}' is a continuous range: a grid needs "
                              f"choices or a step (e.g. {{{self.kind}: [{self.low}, "
                              f"{self.high}], step: ...}}), or use --sampler random / tpe.")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        values = [self.low + i * self.step for i in range(n)]
        return [int(v) for v in values] if self.kind == "int" else \
            [round(v, 12) for v in values]

    def suggest(self, trial):
        """The value an Optuna trial samples for this parameter."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high),
                                     step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step,
                                   log=self.log)


def config_keys(node=None, prefix: str = "") -> list[str]:
    """Every dotted key of the config ('optim.learning_rate', 'towers.image.model.patch_size')."""
    node = Config() if node is None else node
    keys = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            keys += config_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def check_key(key: str, where: str) -> None:
    keys = config_keys()
    if key in keys:
        return
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else \
        " Keys are dotted config keys, e.g. optim.learning_rate."
    raise ConfigError(f"{where}: '{key}' is not a config key.{hint}")


def _number(value) -> float | None:
    """A finite number, also written as a string: YAML 1.1 (PyYAML) reads `1e-4` (no dot) as
    a string. None for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return (number if isinstance(value, str) else value) if math.isfinite(number) else None


def _range(name: str, kind: str, spec: dict) -> Param:
    bounds = spec[kind]
    numbers = [_number(b) for b in bounds] if isinstance(bounds, (list, tuple)) else []
    if len(numbers) != 2 or None in numbers:
        raise ConfigError(f"space: '{name}': {kind} takes [low, high] (two finite numbers), "
                          f"got {bounds!r}.")
    low, high = (float(n) for n in numbers)
    if not low < high:
        raise ConfigError(f"space: '{name}': the range [{bounds[0]}, {bounds[1]}] is "
                          f"{'empty' if low == high else 'inverted'}; write [low, high] with "
                          f"low < high.")
    log = kind == "log_uniform" or bool(spec.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"space: '{name}': a log scale needs low > 0 (got {bounds[0]}).")
    given = spec.get("step")
    step = None if given is None else _number(given)
    if given is not None and (step is None or step <= 0 or step > high - low):
        raise ConfigError(f"space: '{name}': step ({given}) must be a positive number at most "
                          f"high - low ({high - low:g}).")
    if step is not None and log:
        raise ConfigError(f"space: '{name}': a step and a log scale do not combine; drop one.")
    if kind == "int":
        if low != int(low) or high != int(high) or (step is not None and step != int(step)):
            raise ConfigError(f"space: '{name}': int takes integers, got {bounds!r}.")
        return Param(name, "int", low=int(low), high=int(high),
                     step=None if step is None else int(step), log=log)
    return Param(name, "float", low=low, high=high, step=step, log=log)


def parse_param(name: str, spec) -> Param:
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"space: '{name}' must be a list of choices or a mapping with one of "
                          f"{', '.join(KINDS)} (got {spec!r}).")
    kinds = [k for k in spec if k in KINDS]
    extra = set(spec) - set(KINDS) - {"step", "log"}
    if len(kinds) != 1 or extra:
        raise ConfigError(f"space: '{name}' must hold exactly one of {', '.join(KINDS)} "
                          f"(optionally with step or log); got {', '.join(map(str, spec))}.")
    kind = kinds[0]
    if kind == "bundles":
        bundles = spec["bundles"]
        if not isinstance(bundles, dict) or not bundles:
            raise ConfigError(f"space: '{name}': bundles is a non-empty mapping of names to "
                              f"overrides, e.g. {{full: {{}}, lora: {{finetune.lora_rank: 8}}}}.")
        for label, overrides in bundles.items():
            if not isinstance(overrides, dict):
                raise ConfigError(f"space: '{name}.{label}' must be a mapping of config keys "
                                  f"to values (or {{}}).")
            for key in overrides:
                check_key(key, f"space: '{name}.{label}'")
        return Param(name, "bundles", choices=[str(k) for k in bundles],
                     bundles={str(k): v for k, v in bundles.items()})
    check_key(name, "space")
    if kind == "choices":
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"space: '{name}': choices must be a non-empty list.")
        bad = [c for c in choices if not (c is None or isinstance(c, (bool, int, float, str)))]
        if bad:
            raise ConfigError(f"space: '{name}': choices must be numbers, strings, booleans or "
                              f"null; {bad[0]!r} is not (a list or mapping goes in a bundle).")
        return Param(name, "choices", choices=choices)
    return _range(name, kind, spec)


def load_space(path: str | Path) -> tuple[list[Param], dict]:
    """(parameters, the file's `sweep:` options)."""
    doc = read_yaml_mapping(path, "the --space file")
    options = doc.pop("sweep", None) or {}
    if not isinstance(options, dict):
        raise ConfigError(f"--space '{path}': 'sweep' must be a mapping of options.")
    if not doc:
        raise ConfigError(f"--space '{path}' has no parameters to search.")
    params = [parse_param(str(name), spec) for name, spec in doc.items()]
    owners: dict = {}
    for p in params:  # a key set twice (by a parameter and a bundle) is ambiguous
        for key in (p.bundles and {k for b in p.bundles.values() for k in b}) or {p.name}:
            if key in owners:
                raise ConfigError(f"space: '{key}' is set by both '{owners[key]}' and "
                                  f"'{p.name}'; keep one.")
            owners[key] = p.name
    return params, options


def overrides(params: list[Param], values: dict) -> dict:
    """{dotted key: value} of a trial's sampled values, bundles expanded."""
    out = {}
    for p in params:
        if p.kind == "bundles":
            out.update(p.bundles[values[p.name]])
        else:
            out[p.name] = values[p.name]
    return out


def extremes(params: list[Param]) -> list[dict]:
    """Override sets that together visit every choice and both ends of every range once: what
    validation checks before the first trial."""
    out = []
    for p in params:
        for value in (p.choices if p.choices is not None else [p.low, p.high]):
            if p.kind == "int":
                value = int(value)
            out.append(p.bundles[value] if p.kind == "bundles" else {p.name: value})
    return out


def grid_size(params: list[Param]) -> int:
    return math.prod(len(p.grid_values()) for p in params)
