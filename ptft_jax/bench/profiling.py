"""Where a step's time goes: a profiler trace read back against the compiled HLO.

`ptft bench --profile` traces a few steps with `jax.profiler` (a Perfetto trace, viewable in
ui.perfetto.dev or TensorBoard). This module sums the trace's op events by what they belong
to in the model: every HLO instruction carries the JAX op name it came from, with the Flax
module path in it (".../transformer/layers_0/attn/query/dot_general"), and transposed
(backward) ops are marked `transpose(jvp(...))`. Categories are matched on that path, first
match wins.
"""
from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path

CATEGORIES = (
    ("vocabulary projection + loss", r"vocab_loss|LanguageModel\.logits|attend"),
    ("MLM transform", r"mlm_head"),
    ("attention projections", r"/attn/(query|key|value|out)/"),
    ("attention scores, mask, softmax", r"/attn/"),
    ("MLP", r"/mlp/"),
    ("layer norms", r"_norm/"),
    ("patch embedding", r"patch_embed"),
    ("convolutions", r"conv"),
    ("batch norm", r"(^|/)(bn\d|stem_bn|proj_bn)/"),
    ("augmentation", r"augment"),
    ("embeddings", r"embed"),
    ("masking + random numbers", r"mask_positions|_uniform|_randint|threefry|random_bits"),
    ("optimizer (AdamW, clipping)", r"/optimizer/"),
    ("divergence guard", r"divergence_guard"),
)
OTHER = "other"

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]+)\"")


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX op name it was lowered from."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def category(op_name: str) -> str:
    for name, pattern in CATEGORIES:
        if re.search(pattern, op_name):
            return name
    return OTHER


def _trace_events(trace_dir: Path) -> list[dict]:
    paths = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))
    if not paths:
        raise FileNotFoundError(f"No perfetto_trace.json.gz under {trace_dir}.")
    data = json.load(gzip.open(paths[-1]))
    return data["traceEvents"] if isinstance(data, dict) else data


def summarize(trace_dir: Path, hlo_text: str, steps: int) -> dict:
    """Milliseconds per step by category and by direction (forward / backward), and the top
    instructions, from the op events whose names are instructions of the compiled step."""
    names = op_names(hlo_text)
    by_category: dict[str, float] = collections.Counter()
    by_direction: dict[str, float] = collections.Counter()
    by_op: dict[str, float] = collections.Counter()
    for e in _trace_events(trace_dir):
        if e.get("ph") != "X":
            continue
        args = e.get("args") or {}
        instruction = args.get("hlo_op") or e.get("name", "")
        op = names.get(instruction)
        if op is None:
            continue
        ms = e.get("dur", 0) / 1e3 / steps
        by_category[category(op)] += ms
        by_direction["backward" if "transpose(" in op else "forward / other"] += ms
        by_op[re.sub(r"layers_\d+", "layers_N", op)] += ms
    total = sum(by_category.values())
    return {"total_ms": total,
            "categories": sorted(by_category.items(), key=lambda kv: -kv[1]),
            "directions": sorted(by_direction.items(), key=lambda kv: -kv[1]),
            "top_ops": by_op.most_common(12)}


def markdown(summary: dict, title: str) -> str:
    total = summary["total_ms"] or 1.0
    lines = [f"### {title}", "",
             f"Op time summed over the trace: {summary['total_ms']:.1f} ms per step "
             f"(ops running in parallel count each).", "",
             "| where | ms / step | share |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {ms / total:.0%} |" for name, ms in summary["categories"]]
    lines += ["", "| direction | ms / step | share |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {ms / total:.0%} |" for name, ms in summary["directions"]]
    lines += ["", "Top ops (JAX op name, layers merged):", ""]
    lines += [f"- {ms:.1f} ms: `{op}`" for op, ms in summary["top_ops"]]
    return "\n".join(lines) + "\n"
