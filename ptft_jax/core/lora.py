"""LoRA (Hu et al. 2021) as a parameter transform: the model code does not change.

Adapters live in the params tree under 'lora/', mirroring the paths of the kernels they adapt
('lora/transformer/layers_0/attn/query/kernel/a' and '.../b'). Before the model is applied,
the step replaces each adapted kernel W by W + (alpha / r) * A @ B (reshaped to W's shape);
the base weights are frozen, so only A, B (and the task head) get gradients and optimizer
state. `merge` folds the adapters into the weights for export.

A kernel's input axes are its first axis (Dense [in, out]; attention q/k/v [d, heads, k]),
except the attention output projection [heads, k, d], whose input is (heads, k). A stacked
(`scan_layers`) kernel keeps its leading layers axis on A and B.

Dropout: PEFT drops the adapter's input features per token. A weight-space transform cannot
see tokens, so here the mask falls on A's input rows, one mask per step (and microbatch)
shared by the whole batch: the same expectation, coarser noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ptft_jax.config.schema import Config
from ptft_jax.core.params import check_rules_hit, flatten, is_stacked, matching

LORA_KEY = "lora"


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: str = r"attn/(query|value)/kernel$"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _in_axes(path: str) -> int:
    return 2 if path.endswith("attn/out/kernel") else 1


def target_paths(params, spec: LoraSpec) -> list[str]:
    """The kernels the target regex selects; an error when it selects none."""
    kernels = [p for p, x in flatten(params).items()
               if p.endswith("kernel") and len(x.shape) >= 2 and not p.startswith(LORA_KEY)]
    check_rules_hit(kernels, [spec.targets], "finetune.lora_targets", what="kernel")
    return sorted(matching(kernels, [spec.targets]), key=kernels.index)


def _shapes(path: str, shape) -> tuple[tuple, int, int]:
    """(leading axes, fan_in, fan_out) of a kernel."""
    lead = tuple(shape[:1]) if is_stacked(path) else ()
    body = shape[len(lead):]
    k = _in_axes(path)
    return lead, math.prod(body[:k]), math.prod(body[k:])


def _set(tree: dict, path: str, value) -> None:
    parts = path.split("/")
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def _get(tree: dict, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def init_adapters(params, spec: LoraSpec, key) -> dict:
    """A ~ N(0, 1/fan_in) (the variance of a fan-in init), B = 0: the model is unchanged at
    initialisation and the first gradients reach B."""
    adapters: dict = {}
    flat = flatten(params)
    for i, path in enumerate(target_paths(params, spec)):
        lead, fan_in, fan_out = _shapes(path, flat[path].shape)
        dtype = flat[path].dtype
        a = jax.random.normal(jax.random.fold_in(key, i), (*lead, fan_in, spec.rank),
                              jnp.float32) / math.sqrt(fan_in)
        _set(adapters, path, {"a": a.astype(dtype),
                              "b": jnp.zeros((*lead, spec.rank, fan_out), dtype)})
    return adapters


def _adapted(kernel, a, b, scale):
    delta = jnp.einsum("...ir,...ro->...io", a, b) * scale
    return kernel + delta.reshape(kernel.shape).astype(kernel.dtype)


def with_adapters(params, spec: LoraSpec, key=None, train: bool = False) -> dict:
    """The model's params with every adapted kernel replaced by W + scale * A @ B (LoRA dropout
    on A's input rows when training). Without adapters, `params` unchanged."""
    if LORA_KEY not in params:
        return params
    adapters = params[LORA_KEY]
    out = {k: v for k, v in params.items() if k != LORA_KEY}
    out = jax.tree.map(lambda x: x, out)  # a copy of the dict structure to write into
    for i, (path, ab) in enumerate(_adapter_leaves(adapters)):
        a = ab["a"]
        if train and spec.dropout > 0 and key is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1 - spec.dropout,
                                        a.shape[:-1] + (1,))
            a = jnp.where(keep, a / (1 - spec.dropout), 0)
        _set(out, path, _adapted(_get(out, path), a, ab["b"], spec.scale))
    return out


def _adapter_leaves(adapters: dict, prefix: str = ""):
    for key, value in adapters.items():
        if set(value) == {"a", "b"} and not isinstance(value["a"], dict):
            yield prefix + key, value
        else:
            yield from _adapter_leaves(value, f"{prefix}{key}/")


def merge(params, spec: LoraSpec) -> dict:
    """For export: the base weights with the adapters folded in, 'lora/' removed."""
    return with_adapters(params, spec, train=False)


def adapter_count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params.get(LORA_KEY, {})))


def lora_spec(cfg: Config) -> LoraSpec | None:
    """The LoRA transform a config asks for (finetune.lora_rank > 0), or None."""
    f = cfg.finetune
    if not f.lora_rank:
        return None
    return LoraSpec(rank=f.lora_rank, alpha=f.lora_alpha, dropout=f.lora_dropout,
                    targets=f.lora_targets)
