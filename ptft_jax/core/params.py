"""Parameter paths ('transformer/layers_0/attn/query/kernel') and the one rule mechanism.

A rule is a regex; it matches a parameter when `re.search` finds it in the parameter's
'/'-joined path. Where rules carry values (`(regex, value)` pairs), the first matching rule
wins. Every consumer states only what it does with a match: weight decay (`match_rules`: every
parameter must match some rule), freezing and load / dont_load / init_fresh (`matching`,
`any_rule`), LR multipliers (`rule_values`), LoRA targets. A rule the user wrote that matches
no parameter is an error in one format (`check_rules_hit`): a typo would otherwise silently
give its parameters another rule's treatment.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


# Top-level parameter subtrees that only training reads (distillation's hidden-state
# projections, tasks/distill.py): a run's checkpoints hold them, its model for inference not.
TRAINING_ONLY = ("distill",)


def for_inference(params: dict) -> dict:
    """`params` without the TRAINING_ONLY subtrees."""
    return {k: v for k, v in params.items() if k not in TRAINING_ONLY}


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(key_path) -> str:
    """A jax key path -> 'a/b/c'."""
    return "/".join(_key_name(k) for k in key_path)


def flatten(tree) -> dict[str, Any]:
    """{'a/b/c': leaf} for every leaf of a pytree."""
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(flat: dict[str, Any]) -> dict:
    """{'a/b/c': leaf} -> nested dicts (the inverse of `flatten` for dict trees)."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


# ---------------------------------------------------------------------------------------------
# Rules


def first_rule(path: str, patterns: Sequence[str]) -> int | None:
    """The index of the first regex that matches `path`, or None."""
    for i, pattern in enumerate(patterns):
        if re.search(pattern, path):
            return i
    return None


def any_rule(path: str, patterns: Sequence[str]) -> bool:
    return first_rule(path, patterns) is not None


def matching(paths, patterns: Sequence[str]) -> set[str]:
    """The paths some regex of `patterns` matches."""
    return {p for p in paths if any_rule(p, patterns)}


def rule_values(paths, rules: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """{path: the value of the first rule whose regex matches it}; unmatched paths are absent."""
    patterns = [pattern for pattern, _ in rules]
    out = {}
    for p in paths:
        i = first_rule(p, patterns)
        if i is not None:
            out[p] = rules[i][1]
    return out


def check_rules_hit(paths, patterns: Sequence[str], key: str, exempt=(),
                    what: str = "parameter") -> None:
    """Every regex of `patterns` (but those in `exempt`) matches some path, or a ValueError
    naming the config key, the regex and what paths look like."""
    paths = sorted(paths)
    for pattern in patterns:
        if pattern not in exempt and not any(re.search(pattern, p) for p in paths):
            raise ValueError(f"{key}: rule {pattern!r} matches no {what} of the model "
                             f"({what}s look like: {', '.join(paths[:3])}). Fix the regex or "
                             f"drop the rule.")


def match_rules(tree, rules: Sequence[Sequence[Any]], what: str = "rules"):
    """A pytree like `tree` holding, for each leaf, the value of the first matching rule.

    Raises ValueError naming the parameters no rule matches. Logs how many parameters each rule
    matched, so that a rule matching nothing is visible.
    """
    patterns = [pattern for pattern, _ in rules]
    hits: Counter = Counter()
    unmatched: list[str] = []

    def pick(key_path, _leaf):
        path = path_str(key_path)
        i = first_rule(path, patterns)
        if i is None:
            unmatched.append(path)
            return None
        hits[i] += 1
        return rules[i][1]

    out = jax.tree_util.tree_map_with_path(pick, tree)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        raise ValueError(f"{what}: {len(unmatched)} parameter(s) match no rule: {shown}. "
                         f"Add a catch-all rule ['.*', value] at the end.")
    for i, (pattern, value) in enumerate(rules):
        log.info("%s: rule %r -> %r matched %d parameter(s)", what, pattern, value, hits[i])
    return out


def count(tree) -> int:
    """Number of scalar parameters in a tree."""
    return sum(int(getattr(x, "size", 1)) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# Splitting a tree by path: trainable and frozen parameters apart before jax.grad


def split(tree: dict, keep: Callable[[str], bool], prefix: str = "") -> tuple[dict, dict]:
    """(kept, rest): two nested dicts holding the leaves whose path `keep` accepts, and the
    others. Empty sub-dicts are dropped. Pure dict work, so it runs inside jit too."""
    kept, rest = {}, {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            a, b = split(value, keep, path + "/")
            if a:
                kept[key] = a
            if b:
                rest[key] = b
        elif keep(path):
            kept[key] = value
        else:
            rest[key] = value
    return kept, rest


def merge(a: dict, b: dict) -> dict:
    """The union of two nested dicts with disjoint leaves (the inverse of `split`)."""
    out = dict(a)
    for key, value in b.items():
        if key in out:
            if not (isinstance(out[key], dict) and isinstance(value, dict)):
                raise ValueError(f"merge: '{key}' is in both trees")
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Layer layouts: unrolled ('layers_0', 'layers_1', ...) and stacked ('layers', the nn.scan
# layout with a leading layers axis). Nothing else in these models is called 'layers'.

_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def layer_index(path: str) -> int | None:
    """The layer of an unrolled path ('.../layers_3/...' -> 3); None otherwise, including a
    stacked path ('.../layers/...'), whose leading axis holds every layer."""
    m = re.search(r"(^|/)layers_(\d+)(/|$)", path)
    return int(m.group(2)) if m else None


def is_stacked(path: str) -> bool:
    return re.search(r"(^|/)layers(/|$)", path) is not None


def stack_layers(tree):
    """Unrolled -> stacked, in every dict holding 'layers_0' .. 'layers_{L-1}'."""
    if not isinstance(tree, dict):
        return tree
    tree = {k: stack_layers(v) for k, v in tree.items()}
    numbered = sorted((int(m.group(1)), k) for k in tree if (m := _LAYER_KEY.match(k)))
    if not numbered:
        return tree
    if [i for i, _ in numbered] != list(range(len(numbered))):
        raise ValueError(f"layers are not numbered 0..{len(numbered) - 1}: "
                         f"{[k for _, k in numbered]}")
    layers = [tree.pop(k) for _, k in numbered]
    stack = np.stack if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(layers)) \
        else jnp.stack
    tree["layers"] = jax.tree.map(lambda *xs: stack(xs), *layers)
    return tree


def unstack_layers(tree):
    """Stacked -> unrolled: a dict key 'layers' becomes 'layers_0' .. 'layers_{L-1}'."""
    if not isinstance(tree, dict):
        return tree
    tree = {k: unstack_layers(v) if k != "layers" else v for k, v in tree.items()}
    if "layers" not in tree:
        return tree
    stacked = tree.pop("layers")
    n = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n):
        tree[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return tree
