"""Finetuning strategies as parameter plans: which parameters train in a phase, and at which
learning-rate factor. Every strategy goes through regex rules on parameter paths (the one
rule mechanism) or through the layer a path belongs to, so they all combine:

- full finetuning (the default), linear probe (`head/` only), freeze by regex;
- LR factors by regex (e.g. a head trained 10x faster than the backbone);
- layer-wise LR decay: layer l of L at decay^(L - l), embeddings at decay^(L + 1);
- gradual unfreezing (top-down phases every N steps) and adaptive unfreezing (the next phase
  when the validation metric plateaus): phase 0 trains the head, each phase adds the next
  `unfreeze_layers` layers down, the last one adds the embeddings;
- LoRA: adapters under `lora/` train, the weights they adapt stay frozen.

Frozen parameters are left out of the trainable set (no gradient, no optimizer state). With
`scan_layers` a layer is a slice of one stacked array: its per-layer LR factors and its
not-yet-unfrozen layers are arrays along the `layers` axis (gradients masked, updates scaled
by 0), since a slice cannot be left out of the trainable set.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from ptft_jax.config.schema import MULTIMODAL_KINDS, PRETRAIN_TASKS, Config
from ptft_jax.config.resolve import task_for
from ptft_jax.core.lora import LORA_KEY, LoraSpec, lora_spec
from ptft_jax.core.params import check_rules_hit, flatten, matching, rule_values

_LAYER = re.compile(r"(^|/)layers_(\d+)/")
_STACKED = re.compile(r"(^|/)layers/")
# The subtrees a pretrained component lives under; what is outside them (heads, projections,
# fusion layers) trains with the head.
COMPONENTS = ("transformer/", "image/", "text/")


@dataclass
class Plan:
    phase: int
    num_phases: int
    trainable: frozenset  # parameter paths that get gradients and optimizer state
    lr_factors: dict = field(default_factory=dict)  # path -> float or array [L, 1, ...]
    grad_masks: dict = field(default_factory=dict)  # path -> 0/1 array [L, 1, ...]
    lora: LoraSpec | None = None
    report: list = field(default_factory=list)  # what each rule matched, counts


def depths(cfg: Config) -> dict[str, int]:
    """Layers per component subtree: a multimodal model's towers count their own layers (layer
    l of a tower of L is as far from its top as layer l of any L-layer model)."""
    if cfg.model.kind in MULTIMODAL_KINDS:
        return {"image/": cfg.towers.image.model.num_layers,
                "text/": cfg.towers.text.model.num_layers}
    return {"": cfg.model.num_layers}


def depth_of(path: str, depth: dict[str, int]) -> int:
    bare = path[len(LORA_KEY) + 1:] if path.startswith(LORA_KEY + "/") else path
    for prefix, layers in depth.items():
        if bare.startswith(prefix):
            return layers
    return max(depth.values())


def num_phases(cfg: Config) -> int:
    f = cfg.finetune
    if f.unfreeze == "none":
        return 1
    return math.ceil(max(depths(cfg).values()) / f.unfreeze_layers) + 1


def phase_at_step(cfg: Config, step: int) -> int:
    """Gradual unfreezing: the phase a step trains in (a pure function of the step)."""
    return min(step // cfg.finetune.unfreeze_every, num_phases(cfg) - 1)


def _place(path: str) -> tuple[str, int | None]:
    """Where a parameter sits: ('layer', l), ('stacked', None), ('embed', None) for the
    component's embeddings, ('top', None) for heads and the component's final norm."""
    path = path[len(LORA_KEY) + 1:] if path.startswith(LORA_KEY + "/") else path
    m = _LAYER.search(path)
    if m:
        return "layer", int(m.group(2))
    if _STACKED.search(path):
        return "stacked", None
    if path.startswith(COMPONENTS) and "final_norm" not in path:
        return "embed", None
    return "top", None


def make_plan(cfg: Config, params, phase: int = 0) -> Plan:
    """The plan for `phase`, from the config and the model's (abstract) parameter tree."""
    shapes = {p: tuple(x.shape) for p, x in flatten(params).items()}
    paths = set(shapes)
    lora = lora_spec(cfg)
    if task_for(cfg) in PRETRAIN_TASKS:
        return Plan(0, 1, frozenset(paths), report=[f"trainable: all {len(paths)} tensors"])
    f, depth = cfg.finetune, depths(cfg)
    L = max(depth.values())
    report = []
    trainable = set(paths)
    check_rules_hit(paths, f.freeze, "finetune.freeze")
    frozen = matching(paths, f.freeze)
    if f.freeze:
        report.append(f"finetune.freeze {f.freeze}: {len(frozen)} tensor(s) frozen")
    trainable -= frozen
    if f.linear_probe:
        trainable = {p for p in trainable if _place(p)[0] == "top"}
        report.append(f"finetune.linear_probe: only the head trains ({len(trainable)} tensors)")
    if lora is not None:
        adapted = {p for p in paths if not p.startswith(LORA_KEY + "/")
                   and _place(p)[0] != "top"}
        trainable -= adapted
        report.append(f"finetune.lora_rank={lora.rank}: the component's {len(adapted)} tensors "
                      f"freeze; adapters on {lora.targets!r} train")

    # Unfreezing: the top `unfrozen` layers of each component (and, in the last phase, the
    # embeddings) train.
    phases = num_phases(cfg)
    embeddings_train = f.unfreeze == "none" or phase == phases - 1

    def layer_trains(layers: int):
        unfrozen = layers if f.unfreeze == "none" else min(phase * f.unfreeze_layers, layers)
        return np.arange(layers) >= layers - unfrozen

    factors, masks = {}, {}
    check_rules_hit(paths, [pattern for pattern, _ in f.lr_multipliers],
                    "finetune.lr_multipliers")
    rule_factors = {p: float(v) for p, v in rule_values(paths, f.lr_multipliers).items()}
    for p in sorted(trainable):
        where, layer = _place(p)
        base = rule_factors.get(p, 1.0)
        Lp = depth_of(p, depth)
        trains = layer_trains(Lp)
        if where == "layer":
            if not trains[layer]:
                trainable.discard(p)
                continue
            factor = base * f.layer_decay ** (Lp - layer)
        elif where == "embed":
            if not embeddings_train:
                trainable.discard(p)
                continue
            factor = base * f.layer_decay ** (Lp + 1)
        elif where == "stacked":
            if not trains.any():
                trainable.discard(p)
                continue
            per_layer = base * f.layer_decay ** (Lp - np.arange(Lp)) * trains
            shape = (Lp,) + (1,) * (len(shapes[p]) - 1)
            if not trains.all():
                masks[p] = trains.astype(np.float32).reshape(shape)
            factor = per_layer.astype(np.float32).reshape(shape)
            if np.all(factor == 1.0):
                factor = 1.0
        else:
            factor = base
        if not isinstance(factor, float) or factor != 1.0:
            factors[p] = factor
    if f.unfreeze != "none":
        unfrozen = min(phase * f.unfreeze_layers, L)
        report.append(f"finetune.unfreeze={f.unfreeze}: phase {phase + 1} of {phases}, top "
                      f"{unfrozen} of {L} layer(s) unfrozen"
                      + (" in each tower" if len(depth) > 1 else "")
                      + (", embeddings too" if embeddings_train else ""))
    for pattern, value in f.lr_multipliers:
        hits = len(matching(trainable, [pattern]))
        report.append(f"finetune.lr_multipliers {pattern!r} x{value:g}: {hits} trainable "
                      f"tensor(s) (first match wins)")
    if f.layer_decay != 1.0:
        report.append(f"finetune.layer_decay={f.layer_decay}: top layer x{f.layer_decay:g}, "
                      f"embeddings x{f.layer_decay ** (L + 1):.3g}")
    total = sum(int(np.prod(s)) for s in shapes.values())
    n_train = sum(int(np.prod(shapes[p])) * (float(masks[p].mean()) if p in masks else 1.0)
                  for p in trainable)
    report.append(f"trainable: {n_train:,.0f} of {total:,} parameters "
                  f"({n_train / total:.2%}) in {len(trainable)} tensor(s)")
    if not trainable:
        raise ValueError("No parameter trains: finetune.freeze / linear_probe / lora leave "
                         "nothing trainable. Loosen finetune.freeze.")
    return Plan(phase, phases, frozenset(trainable), factors, masks, lora, report)
