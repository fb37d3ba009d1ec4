"""Parameter paths ('transformer/layers_0/attn/query/kernel') and the one rule mechanism.

Rules are `(regex, value)` pairs; a parameter takes the value of the first rule whose regex
matches its path (`re.search`). Every parameter must be matched by some rule, so a typo in a
regex cannot silently leave parameters out. The same mechanism drives weight decay now, and
freezing, LR multipliers, `dont_load` and LoRA targets later.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any, Sequence

import jax

log = logging.getLogger(__name__)


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


def match_rules(tree, rules: Sequence[Sequence[Any]], what: str = "rules"):
    """A pytree like `tree` holding, for each leaf, the value of the first matching rule.

    Raises ValueError naming the parameters no rule matches. Logs how many parameters each rule
    matched, so that a rule matching nothing is visible.
    """
    compiled = [(re.compile(pattern), value) for pattern, value in rules]
    hits: Counter = Counter()
    unmatched: list[str] = []

    def pick(key_path, _leaf):
        path = path_str(key_path)
        for i, (rx, value) in enumerate(compiled):
            if rx.search(path):
                hits[i] += 1
                return value
        unmatched.append(path)
        return None

    out = jax.tree_util.tree_map_with_path(pick, tree)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        raise ValueError(f"{what}: {len(unmatched)} parameter(s) match no rule: {shown}. "
                         f"Add a catch-all rule ['.*', value] at the end.")
    for i, (pattern, value) in enumerate(rules):
        log.info("%s: rule %r -> %r matched %d parameter(s)", what, pattern, value, hits[i])
    return out
