"""Building a Config: three layers, each overriding the last: the dataclass defaults, the
YAML file, then command-line `a.b=value` overrides. Model presets (`model.preset: bert-base`)
fill the model's shape before explicit model keys are applied; an `hf:` init_from fills it
from the checkpoint's config.json (config/hf.py), a ptft run directory's from its
config.yaml. Unknown keys are named with the closest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ptft_jax.config.hf import SHAPE_KEYS, is_hf, open_model
from ptft_jax.config.presets import PRESETS
from ptft_jax.config.reading import read_yaml
from ptft_jax.config.schema import Config, ConfigError, check_choice


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


RENAMED = {"train.objective": "train.task"}


def _check_keys(cls, data: dict, where: str) -> None:
    valid = list(_field_types(cls))
    for key in data:
        if f"{where}{key}" in RENAMED:
            raise ConfigError(f"Config key '{where}{key}' is now '{RENAMED[where + key]}'; "
                              f"rename it.")
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f" Did you mean '{where}{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown config key '{where}{key}'.{hint} "
                              f"Valid keys here: {', '.join(valid)}.")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Checks a YAML value against a field's annotation, converting int -> float where harmless."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"'{key}' may not be null.")
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is typing.Literal:
        check_choice(value, typ, key)
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}.")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}.")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}.")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string, got {value!r}.")
        return value
    if typ is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"'{key}' must be a list, got {value!r}.")
        return value
    return value


def _not_a_section(cls, value: Any, key: str) -> ConfigError:
    keys = list(_field_types(cls))
    return ConfigError(f"'{key}' is a section, not a value (got {value!r}): set the keys under "
                       f"it, e.g. {key}.{keys[0]}=...; its keys: {', '.join(keys)}.")


def check_sections(cls, data: dict, where: str = "") -> None:
    """Every section given (`model`, `towers.image`, ...) is a mapping of its keys, not a
    scalar such as `model=5`; the sections' own code reads them as mappings."""
    types = _field_types(cls)
    for key, value in data.items():
        typ = types.get(key)
        if typ is None or not dataclasses.is_dataclass(typ) or value is None:
            continue  # an unknown key is named later, with the closest valid one
        if not isinstance(value, dict):
            raise _not_a_section(typ, value, f"{where}{key}")
        check_sections(typ, value, f"{where}{key}.")


def _build(cls, data: dict, where: str = ""):
    if not isinstance(data, dict):
        if where:
            raise _not_a_section(cls, data, where.rstrip("."))
        raise ConfigError(f"The config must be a mapping, got {data!r}.")
    _check_keys(cls, data, where)
    types = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        typ = types[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, typ, f"{where}{key}")
    return cls(**kwargs)


def merge_dicts(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """['train.steps=10', 'model.preset=bert-tiny'] -> nested dict; values are parsed as YAML."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' is not of the form key.sub=value "
                              f"(for example train.steps=100).")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"Override '{item}' has an empty key part.")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"Override '{item}': value is not valid YAML ({e}).") from None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"Override '{item}' conflicts with an earlier override.")
        node[parts[-1]] = value
    return nested


def read_yaml_mapping(path: str | Path, what: str, missing_hint: str = "") -> dict:
    """A YAML file holding a mapping (empty: {}); an UnreadableFile (config/reading.py)
    naming `what`, the file and the line when it is missing, not UTF-8, not YAML, or not a
    mapping."""
    return read_yaml(path, what, dict, missing_hint)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- overrides; then model presets are expanded."""
    data: dict = {}
    if path is not None:
        data = read_yaml_mapping(path, "the --config file", "shipped configs are in configs/, "
                                 "for example configs/pretrain_tiny_mlm.yaml")
    data = merge_dicts(data, parse_overrides(overrides or []))
    return from_dict(with_run_model(with_hf_model(data)))


def load_run_config(run_dir: str | Path) -> Config:
    """The config a run directory was trained with (its config.yaml, as the run wrote it)."""
    return from_dict(read_yaml(Path(run_dir) / "config.yaml", "a run's config.yaml"))


def expand_model(model: dict | None, key: str = "model") -> dict:
    """A model section with its preset's shape filled in (explicit keys win)."""
    model = dict(model or {})
    preset = model.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            close = difflib.get_close_matches(str(preset), list(PRESETS), n=1, cutoff=0.4)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown {key}.preset '{preset}'.{hint} "
                              f"Presets: {', '.join(PRESETS)}.")
        model = {**PRESETS[preset], **model}
    if model.get("kind") == "resnet" and "num_layers" not in model:
        # A ResNet's layers are its blocks (what layer-wise rules and unfreezing count).
        model["num_layers"] = sum(model.get("resnet_stages") or [2, 2, 2, 2])
    return model


def from_dict(data: dict) -> Config:
    check_sections(Config, data)
    data = {**data, "model": expand_model(data.get("model"))}
    towers = data.get("towers")
    if isinstance(towers, dict):
        towers = dict(towers)
        for name, kind in (("image", "vit"), ("text", "encoder")):
            tower = towers.get(name)
            if isinstance(tower, dict) and isinstance(tower.get("model", {}), dict):
                model = expand_model(tower.get("model"), f"towers.{name}.model")
                towers[name] = {**tower, "model": {"kind": kind, **model}}
        data["towers"] = towers
    return _build(Config, data)


# ---------------------------------------------------------------------------------------------
# The config: an hf: init_from sets the model keys (load_config calls it)


def with_hf_model(data: dict) -> dict:
    """With `finetune.init_from: hf:...`, the model's shape comes from its config.json and
    its tokenizer is the default data.tokenizer. A model key set to another value is an
    error (the weights could not load), not a silent override. A multimodal model's towers
    (`towers.image.init_from`, `towers.text.init_from`) take theirs the same way."""
    check_sections(Config, data)
    spec = (data.get("finetune") or {}).get("init_from")
    if isinstance(spec, str) and is_hf(spec):
        model, tokenizer = _hf_model_keys(spec, data.get("model"), "model",
                                          "finetune.init_from")
        data = {**data, "model": model}
        data = _with_tokenizer(data, tokenizer)
    towers = data.get("towers")
    if isinstance(towers, dict):
        for name in ("image", "text"):
            tower = towers.get(name)
            spec = tower.get("init_from") if isinstance(tower, dict) else None
            if not isinstance(spec, str) or not is_hf(spec):
                continue
            model, tokenizer = _hf_model_keys(spec, tower.get("model"), f"towers.{name}.model",
                                              f"towers.{name}.init_from")
            towers = {**towers, name: {**tower, "model": model}}
            data = _with_tokenizer({**data, "towers": towers}, tokenizer)
    return data


# A ptft run's shape: config.json's keys, a pruned model's head size, a ResNet's block layout.
RUN_SHAPE_KEYS = (*SHAPE_KEYS, "head_dim", "resnet_stages", "resnet_block", "resnet_width",
                  "resnet_stem")


def with_run_model(data: dict) -> dict:
    """With `finetune.init_from` naming a ptft run (its folder, checkpoints/ or one step) and a
    model section that sets no preset and no shape key, the model's shape is the run's (from
    its config.yaml), as an hf: init_from takes config.json's. A config that sets a shape
    keeps it: a mismatch is named per parameter when the weights load."""
    spec = (data.get("finetune") or {}).get("init_from")
    model = data.get("model") or {}
    if not isinstance(spec, str) or is_hf(spec) or not isinstance(model, dict) or \
            model.get("preset") is not None or \
            any(model.get(k) is not None for k in RUN_SHAPE_KEYS):
        return data
    source = Path(spec)
    found = next((folder / "config.yaml" for folder in (source, *source.parents[:2])
                  if (folder / "config.yaml").is_file()), None)
    if found is None:  # not a run (yet): init_from's own check names it later
        return data
    theirs = read_yaml_mapping(found, "the config.yaml of the run finetune.init_from names")
    shape = {k: v for k, v in (theirs.get("model") or {}).items()
             if k in RUN_SHAPE_KEYS and v is not None}
    return {**data, "model": {**model, **shape}} if shape else data


def _hf_model_keys(spec: str, model, key: str, source_key: str):
    """(the model section with config.json's shape, the model's tokenizer path or None)."""
    model = dict(model or {})
    if model.get("preset") is not None:
        raise ConfigError(f"{key}.preset and {source_key}={spec} both set the model's "
                          f"shape; drop {key}.preset (config.json sets it).")
    try:
        source = open_model(spec)
        keys = source.model_keys()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    model = {k: v for k, v in model.items() if not (v is None and k in keys)}  # null: take it
    for name in SHAPE_KEYS:
        if name in model and name in keys and model[name] != keys[name]:
            raise ConfigError(f"{key}.{name}={model[name]!r} conflicts with {source.directory}/"
                              f"config.json ({keys[name]!r}); remove {key}.{name}: "
                              f"{source_key}=hf:... sets the model's shape.")
    if source.family == "vit":
        return {**keys, **model}, None
    if source.tokenizer_path is None:
        raise ConfigError(f"{source.directory} has neither tokenizer.json nor vocab.txt; "
                          f"set data.tokenizer=PATH to the tokenizer the model was trained "
                          f"with.")
    return {**keys, **model}, str(source.tokenizer_path)


def _with_tokenizer(data: dict, tokenizer: str | None) -> dict:
    if tokenizer is None or (data.get("data") or {}).get("tokenizer") is not None:
        return data
    return merge_dicts(data, {"data": {"tokenizer": tokenizer}})
