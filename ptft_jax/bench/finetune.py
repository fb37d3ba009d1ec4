"""`ptft bench --finetune`: a sequence classifier stepping under each finetuning strategy.

Per case: compile time (apart), the median of synchronised steps after warm-up, the trainable
parameter count and fraction, and the memory that training adds per parameter it trains:
gradient bytes (gradients exist for trainable parameters only: the step splits the frozen
ones off before `jax.grad`) plus optimizer-state bytes (read from the state's shapes), beside
XLA's compiled memory analysis of the train step. `compile_only` cases (bert-base on a CPU)
compile the step from shapes and skip the timing. With PyTorch and `transformers` installed,
`torch: true` cases also time `BertForSequenceClassification` in the same run.

Batches are synthetic padded examples: random lengths between a quarter and all of
`seq_len`, an attention mask from segment ids, one label per row.
"""
from __future__ import annotations

import datetime
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from ptft_jax.bench.benchmark import (load_torch_reference, named_cases, read_cases,
                                     state_bytes_on_first_device, timed_steps)
from ptft_jax.bench.report import device_slug, environment
from ptft_jax.config.load import load_config
from ptft_jax.config.schema import ConfigError
from ptft_jax.config.validate import validate
from ptft_jax.core.params import split
from ptft_jax.core.state import with_shardings
from ptft_jax.data.labelled import LabelSpace
from ptft_jax.tasks.factory import make_task
from ptft_jax.train.engine import build

CASE_KEYS = ("name", "preset", "seq_len", "global_batch", "labels", "vocab_size", "finetune",
             "phase", "compile_only", "torch", "steps")


def case_config(case: dict, overrides=()):
    return load_config(None, [
        f"model.preset={case['preset']}", "train.task=classification",
        "data.label_column=label", f"data.seq_len={case['seq_len']}",
        f"model.max_len={max(case['seq_len'], 128)}", f"train.global_batch={case['global_batch']}",
        f"model.vocab_size={case.get('vocab_size', 30522)}", "model.dropout=0.0",
        "train.steps=1000", "optim.warmup_steps=10",
        *case.get("finetune", []), *overrides])


def synthetic_examples(cfg, num_labels: int, n: int = 2, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    B, T = cfg.train.global_batch, cfg.data.seq_len
    out = []
    for _ in range(n):
        lengths = rng.integers(T // 4, T + 1, B)
        valid = np.arange(T)[None, :] < lengths[:, None]
        out.append({"tokens": np.where(valid, rng.integers(5, cfg.model.vocab_size, (B, T)),
                                       0).astype(np.int32),
                    "segment_ids": valid.astype(np.int32),
                    "positions": np.where(valid, np.arange(T), 0).astype(np.int32),
                    "type_ids": np.zeros((B, T), np.int32),
                    "weight": np.ones(B, np.float32),
                    "label": rng.integers(0, num_labels, B).astype(np.int32)})
    return out


def _bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def run_case(case: dict, steps: int, warmup: int, overrides=()) -> dict:
    cfg = case_config(case, overrides)
    validate(cfg, jax.device_count())
    labels = LabelSpace("classification", tuple(f"c{i}" for i in range(case.get("labels", 4))))
    task = make_task(cfg, labels)
    engine = build(cfg, task, phase=case.get("phase", 0))
    abstract = engine.abstract
    trainable, _ = split(abstract.params, engine.plan.trainable.__contains__)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    row = {"trainable_params": n_train, "total_params": total,
           "trainable_fraction": n_train / total, "grad_bytes": _bytes(trainable),
           "opt_state_bytes": _bytes(abstract.opt_state)}
    row["grad_plus_opt_bytes"] = row["grad_bytes"] + row["opt_state_bytes"]
    key = jax.random.key(0)
    batch = engine.to_device(synthetic_examples(cfg, labels.num_outputs, 1)[0])
    t0 = time.perf_counter()
    if case.get("compile_only"):
        target = with_shardings(abstract, engine.shardings)
        compiled = engine.step_fn.lower(target, batch, key).compile()
    else:
        state = engine.init(key)
        compiled = engine.step_fn.lower(state, batch, key).compile()
    row["compile_s"] = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    if memory is not None:
        row.update(mem_arguments_bytes=memory.argument_size_in_bytes,
                   mem_temporaries_bytes=memory.temp_size_in_bytes)
    if case.get("compile_only"):
        return row
    row["state_bytes_per_device"] = state_bytes_on_first_device(state)
    batches = [engine.to_device(b) for b in synthetic_examples(cfg, labels.num_outputs)]
    state, times = timed_steps(compiled, state, batches, key, warmup, case.get("steps", steps))
    median = statistics.median(times)
    row.update(step_ms_median=median * 1e3, step_ms_min=min(times) * 1e3,
               step_ms_max=max(times) * 1e3,
               examples_per_s=cfg.train.global_batch / median,
               tokens_per_s=cfg.train.global_batch * cfg.data.seq_len / median)
    return row


def run(names, cases_file: Path, out_dir: Path, steps: int, warmup: int,
        with_torch: bool = True, echo=print, overrides=()) -> list[dict]:
    doc = read_cases(cases_file)
    cases = named_cases(doc.get("finetune", []), names, "finetune", cases_file,
                        required=("preset", "seq_len", "global_batch"))
    for c in cases:
        unknown = set(c) - set(CASE_KEYS)
        if unknown:
            raise ConfigError(f"{cases_file}: finetune case {c.get('name')} has unknown keys "
                              f"{unknown}; valid: {', '.join(CASE_KEYS)}.")
        try:  # every case's config, checked before anything runs
            validate(case_config(c, overrides), jax.device_count())
        except ValueError as e:
            raise ConfigError(f"{cases_file}: finetune case {c['name']}: "
                              f"{str(e).splitlines()[0]}") from None
    if not cases:
        raise ConfigError(f"No finetune cases chosen from {cases_file}.")
    env = environment()
    torch_ref = load_torch_reference() if with_torch else None
    out = out_dir / device_slug(env)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    rows = []
    for case in cases:
        echo(f"[{case['name']}] ...")
        row = {"case": case["name"], **case, **env}
        row.update(run_case(case, steps, warmup, overrides))
        if case.get("torch") and torch_ref is not None:
            for compiled in (False, True):
                key = "torch_compile" if compiled else "torch_eager"
                try:
                    result = torch_ref.time_classifier(case_config(case, overrides),
                                                       case.get("labels", 4), compiled,
                                                       case.get("steps", steps), warmup)
                    row.update({f"{key}_{k}": v for k, v in result.items()})
                except Exception as e:  # the reference must never stop the suite
                    row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        echo(_line(row))
        with open(out / f"finetune-{stamp}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    table = markdown(rows, env)
    (out / "finetune-latest.md").write_text(table)
    echo(table)
    return rows


def _line(r: dict) -> str:
    parts = [f"[{r['case']}] trainable {r['trainable_fraction']:.2%}",
             f"grad+opt {r['grad_plus_opt_bytes'] / 2**20:.1f} MB",
             f"compile {r['compile_s']:.1f}s"]
    if "step_ms_median" in r:
        parts.append(f"step {r['step_ms_median']:.1f} ms")
    for key in ("torch_eager", "torch_compile"):
        if key + "_step_ms_median" in r:
            parts.append(f"{key} {r[key + '_step_ms_median']:.1f} ms")
    return " | ".join(parts)


def markdown(rows: list[dict], env: dict) -> str:
    head = (f"Finetuning cases on {env['device_kind']} x{env['device_count']} (host "
            f"{env['machine']}, {env['isa']}); jax {env['jax']}"
            + (f", torch {env['torch']}" if "torch" in env else "")
            + f"; commit {env['git_commit']}; {env['time']}\n\n")
    cols = ["case", "trainable", "grad + opt state MB", "XLA temp MB", "compile s",
            "step ms (median)", "examples/s", "torch eager ms", "torch.compile ms",
            "ptft/eager", "ptft/compile"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        step = r.get("step_ms_median")

        def ref(key):
            ms = r.get(key + "_step_ms_median")
            return (f"{ms:.1f}", f"{step / ms:.2f}" if step else "-") if ms else ("-", "-")
        (eager, r_eager), (comp, r_comp) = ref("torch_eager"), ref("torch_compile")
        lines.append("| " + " | ".join([
            r["case"], f"{r['trainable_params']:,} ({r['trainable_fraction']:.2%})",
            f"{r['grad_plus_opt_bytes'] / 2**20:.1f}",
            f"{r.get('mem_temporaries_bytes', 0) / 2**20:.1f}", f"{r['compile_s']:.1f}",
            f"{step:.1f}" if step else "compile only",
            f"{r['examples_per_s']:.1f}" if step else "-", eager, comp, r_eager, r_comp]) + " |")
    notes = []
    by_name = {r["case"]: r for r in rows}
    for r in rows:
        base = by_name.get(r["case"].rsplit("-", 1)[0] + "-full")
        if base is not None and base is not r:
            saved = 1 - r["grad_plus_opt_bytes"] / base["grad_plus_opt_bytes"]
            notes.append(f"- {r['case']}: gradients + optimizer state {saved:.1%} smaller than "
                         f"{base['case']}")
    return head + "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"
