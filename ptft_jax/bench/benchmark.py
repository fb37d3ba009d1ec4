"""`ptft bench`: step time, throughput, MFU, compile time and memory for the cases in
`ptft_jax/bench/cases.yaml`, side by side with a PyTorch reference when one is installed.

Measured honestly: compile time apart (`lower().compile()`), warm-up steps discarded, each timed
step ends in `block_until_ready` on the new state, and the median, min and max of N steps are
reported. Each case steps on what training feeds (bench/workloads.py: packed rows with their
document mask for language models, uint8 images augmented on device for image models). The
input pipeline has its own benchmark (bench/pipeline.py). FLOPs follow `ptft_jax.models.flops` (PaLM
convention) and count only what the step computes (masked LM: the head at its masked slots).
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import logging
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from ptft_jax.bench import profiling
from ptft_jax.bench.report import REPO, device_slug, environment, markdown_table, plot, summary_line
from ptft_jax.bench.workloads import synthetic_batches, workload  # noqa: F401 (re-export)
from ptft_jax.config.load import load_config
from ptft_jax.config.reading import read_yaml
from ptft_jax.config.schema import ConfigError
from ptft_jax.config.validate import validate
from ptft_jax.models.layers import dtypes
from ptft_jax.train import peak
from ptft_jax.train.engine import build

log = logging.getLogger(__name__)

# The cases ship with the package. The PyTorch reference (a reference, never a dependency) and
# the committed results are the source checkout's (report.REPO), when ptft runs from one.
DEFAULT_CASES = Path(__file__).with_name("cases.yaml")
TORCH_REFERENCE = REPO / "benchmarks" / "torch_reference.py"
CASE_KEYS = ("name", "preset", "text_preset", "objective", "seq_len", "image_size",
             "global_batch",
             "parallelism", "mesh", "dtype", "remat", "scan", "grad_accum", "vocab_size",
             "torch", "rows", "loss_chunk", "overrides")
ROWS = ("packed", "unmasked")
OBJECTIVES = ("mlm", "clm", "image_classification", "contrastive")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    preset: str
    objective: str  # one of OBJECTIVES
    global_batch: int
    parallelism: str
    mesh: dict
    dtype: str
    remat: str
    scan: bool
    grad_accum: int
    vocab_size: int | None
    torch: bool
    rows: str = "packed"
    loss_chunk: int | None = None  # objective.loss_chunk; None: the default
    seq_len: int | None = None  # language models
    image_size: int | None = None  # image models; None: the preset's
    overrides: tuple = ()  # other config keys ("key.sub=value")
    text_preset: str | None = None  # contrastive: the text tower (preset: the image tower)

    def config(self, overrides: tuple[str, ...] = ()):
        per_objective = [f"data.seq_len={self.seq_len}"] if self.seq_len else []
        if self.objective == "contrastive":
            # Two towers: `preset` is the image tower, `text_preset` the text one.
            model = [f"towers.image.model.preset={self.preset}",
                     f"towers.text.model.preset={self.text_preset}", "model.kind=two_tower",
                     "towers.text.model.dropout=0.0", "towers.image.projection_dim=512",
                     "towers.text.projection_dim=512"]
            if self.image_size:
                model.append(f"towers.image.model.image_size={self.image_size}")
        else:
            model = [f"model.preset={self.preset}"]
            if self.image_size:
                per_objective.append(f"model.image_size={self.image_size}")
        if self.objective == "image_classification":
            per_objective.append("augment.flip=true")
        cfg = load_config(None, [
            *model, f"train.task={self.objective}",
            *per_objective, f"train.global_batch={self.global_batch}",
            f"mesh.parallelism={self.parallelism}", f"mesh.data={self.mesh.get('data', -1)}",
            f"mesh.fsdp={self.mesh.get('fsdp', 1)}", f"mesh.tensor={self.mesh.get('tensor', 1)}",
            f"model.dtype={self.dtype}", f"model.remat={self.remat}",
            f"model.scan_layers={str(self.scan).lower()}", f"train.grad_accum={self.grad_accum}",
            "model.dropout=0.0", "train.steps=1000", "optim.warmup_steps=10",
            *([f"model.vocab_size={self.vocab_size}"] if self.vocab_size else []),
            *([f"model.max_len={max(self.seq_len, 128)}"] if self.preset == "gpt-tiny" else []),
            *([f"objective.loss_chunk={self.loss_chunk}"] if self.loss_chunk is not None
              else []),
            *self.overrides, *overrides])
        return cfg


def read_cases(path: Path) -> dict:
    """A bench cases file (--cases-file): a YAML mapping; `ptft bench`, --finetune and
    --pipeline read it here, so a bad one is one line naming the file and the line."""
    return read_yaml(path, "the bench cases file", dict, "pass --cases-file")


def check_names(listed, path: Path, what: str) -> None:
    """A list of cases holds mappings, each with a name no other case of the list has (the
    later one would silently replace the earlier)."""
    if not isinstance(listed, list):
        raise ConfigError(f"{path}: the {what} cases must be a list of mappings, got "
                          f"{type(listed).__name__}.")
    seen = set()
    for c in listed:
        if not isinstance(c, dict) or c.get("name") in (None, ""):
            raise ConfigError(f"{path}: every {what} case is a mapping with a name; got {c!r}.")
        if c["name"] in seen:
            raise ConfigError(f"{path}: two {what} cases are named '{c['name']}'; give each "
                              f"case its own name.")
        seen.add(c["name"])


def named_cases(listed: list[dict], names: list[str], what: str, path: Path,
                required: tuple = ()) -> list[dict]:
    """The cases of one list of the cases file (`pipeline:`, `finetune:`) that --cases names,
    or all of them; a name not in the list is refused, listing the names that are, and so is
    a case that lacks a `required` key."""
    check_names(listed, path, what)
    for c in listed:
        missing = [k for k in required if k not in c]
        if missing:
            raise ConfigError(f"{path}: {what} case {c['name']} does not set "
                              f"{', '.join(missing)}; every {what} case sets "
                              f"{', '.join(required)}.")
    known = [c.get("name") for c in listed]
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(f"No {what} case(s) {', '.join(missing)} in {path}; {what} cases: "
                          f"{', '.join(map(str, known))}.")
    return [c for c in listed if not names or c.get("name") in names]


def load_cases(path: Path, sets: list[str], names: list[str]) -> list[Case]:
    """The cases of `sets` (all sets without --set), narrowed to `names` when --cases is
    given. A key a case leaves unset takes the file's `defaults:`, then the shipped file's."""
    doc = read_cases(path)
    if not isinstance(doc.get("sets"), dict):
        raise ConfigError(f"{path}: no 'sets:' mapping of set names to lists of cases; the "
                          f"bench cases file needs one (see {DEFAULT_CASES}).")
    defaults, all_sets = doc.get("defaults") or {}, doc["sets"]
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: 'defaults' must be a mapping of case keys to values.")
    if set(defaults) - set(CASE_KEYS):
        raise ConfigError(f"{path}: defaults has unknown keys {set(defaults) - set(CASE_KEYS)}; "
                          f"valid: {', '.join(CASE_KEYS)}.")
    if Path(path).resolve() != DEFAULT_CASES.resolve():
        defaults = {**read_cases(DEFAULT_CASES)["defaults"], **defaults}
    for s in sets:
        if s not in all_sets:
            raise ConfigError(f"No benchmark set '{s}' in {path}; sets: {', '.join(all_sets)}.")
    check_names([c for cases in all_sets.values() for c in (cases or [])], path, "benchmark")
    required = [f.name for f in dataclasses.fields(Case) if f.default is dataclasses.MISSING]
    by_name = {}
    for set_name, cases in all_sets.items():
        for raw in cases or []:
            unknown = set(raw) - set(CASE_KEYS)
            if unknown:
                raise ConfigError(f"{path}: case {raw.get('name')} has unknown keys {unknown}; "
                                  f"valid: {', '.join(CASE_KEYS)}.")
            missing = [k for k in required if k not in {**defaults, **raw}]
            if missing:
                raise ConfigError(f"{path}: case {raw['name']} does not set "
                                  f"{', '.join(missing)}; set them in the case (or under "
                                  f"defaults:).")
            case = Case(**{**defaults, **raw})
            case = dataclasses.replace(case, overrides=tuple(case.overrides or ()))
            if case.rows not in ROWS:
                raise ConfigError(f"{path}: case {case.name} has rows: {case.rows}; use one of "
                                  f"{', '.join(ROWS)}.")
            if case.objective not in OBJECTIVES:
                raise ConfigError(f"{path}: case {case.name} has objective: {case.objective}; "
                                  f"use one of {', '.join(OBJECTIVES)}.")
            by_name[raw["name"]] = (set_name, case)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConfigError(f"No benchmark case(s) {missing} in {path}; cases: "
                          f"{', '.join(by_name)}.")
    outside = [f"{n} (set {by_name[n][0]})" for n in names if sets and by_name[n][0] not in sets]
    if outside:  # --cases picks within --set
        raise ConfigError(f"--cases {', '.join(outside)}: not in --set {', '.join(sets)}; name "
                          f"cases of the set, or drop --set.")
    chosen = [c for n, (s, c) in by_name.items()
              if (not sets or s in sets) and (not names or n in names) and (sets or names)]
    if not chosen:
        raise ConfigError("No cases chosen: pass --set NAME or --cases NAME ...")
    return chosen


# ---------------------------------------------------------------------------------------------
# Measurements


def timed_steps(step, state, batches, key, warmup: int, steps: int):
    """Runs `warmup` untimed then `steps` timed steps; returns (state, seconds per step)."""
    for i in range(warmup):
        state, metrics = step(state, batches[i % len(batches)], key)
    jax.block_until_ready(state)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batches[i % len(batches)], key)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return state, times


def state_bytes_on_first_device(state) -> int:
    """Bytes of the train state held by the first device: its one shard of every leaf (under
    pmap, its copy of the replicated state)."""
    device = jax.devices()[0]
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(state)
               for shard in leaf.addressable_shards if shard.device == device)


_CEILINGS: dict = {}


def matmul_ceiling(dtype, again: bool = False) -> float:
    """Measured dense-matmul FLOP/s of one device in the compute dtype, for the whole system
    (the fastest of 20 timings); timed once per run so that every case is held to the same
    ceiling, and timed `again` when a case beats it (it only ever rises)."""
    if dtype not in _CEILINGS or again:
        n = 1024 if jax.default_backend() == "cpu" else 8192
        per_device = peak.measure_matmul_flops(n=n, dtype=dtype, repeats=20)
        flops = per_device if jax.default_backend() == "cpu" else \
            per_device * jax.device_count()
        _CEILINGS[dtype] = max(flops, _CEILINGS.get(dtype, 0.0))
    return _CEILINGS[dtype]


def run_jax_case(case: Case, steps: int, warmup: int, profile_dir: Path | None,
                 overrides: tuple[str, ...] = ()) -> tuple[dict, list[dict]]:
    """(result row, the host batches it stepped on) for one case."""
    cfg = case.config(overrides)
    validate(cfg, jax.device_count())
    work = workload(cfg, case.rows)
    engine = build(cfg, work.task)
    key = jax.random.key(0)
    state = engine.init(key)
    batches = [engine.to_device(b) for b in work.host_batches]

    t0 = time.perf_counter()
    compiled = engine.step_fn.lower(state, batches[0], key).compile()
    compile_s = time.perf_counter() - t0
    row: dict = {"compile_s": compile_s}
    memory = compiled.memory_analysis()
    if isinstance(memory, (list, tuple)):
        memory = memory[0] if memory else None
    if memory is not None:
        row.update(mem_arguments_bytes=memory.argument_size_in_bytes,
                   mem_outputs_bytes=memory.output_size_in_bytes,
                   mem_temporaries_bytes=memory.temp_size_in_bytes)
    row["state_bytes_per_device"] = state_bytes_on_first_device(state)

    state, times = timed_steps(compiled, state, batches, key, warmup, steps)
    if profile_dir is not None:
        trace_dir = profile_dir / case.name
        trace_dir.mkdir(parents=True, exist_ok=True)
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            state, _ = timed_steps(compiled, state, batches, key, 0, 3)
        summary = profiling.summarize(trace_dir, compiled.as_text(), steps=3)
        (trace_dir / "summary.md").write_text(profiling.markdown(summary, case.name))
        row["profile"] = str(trace_dir)
        row["profile_ms_by_category"] = dict(summary["categories"])
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row["peak_bytes_in_use"] = stats["peak_bytes_in_use"]

    median = statistics.median(times)
    per_s = work.units_per_step / median
    compute_dtype, _ = dtypes(cfg.model)
    table_peak = peak.device_peak_flops()
    ceiling = matmul_ceiling(jnp.dtype(compute_dtype))
    if peak.mfu(per_s, work.flops_per_unit, ceiling) > 1:  # the machine was busy when timed
        ceiling = matmul_ceiling(jnp.dtype(compute_dtype), again=True)
    row.update(step_ms_median=median * 1e3, step_ms_min=min(times) * 1e3,
               step_ms_max=max(times) * 1e3, steps_timed=len(times),
               unit=work.unit, units_per_step=work.units_per_step, units_per_s=per_s,
               units_per_s_per_device=per_s / jax.device_count(),
               flops_per_unit=work.flops_per_unit, compute_dtype=str(compute_dtype),
               matmul_ceiling_flops=ceiling,
               mfu_vs_measured_ceiling=peak.mfu(per_s, work.flops_per_unit, ceiling))
    # Still above 100%: the ceiling is wrong, and every table says so.
    row["ceiling_too_low"] = row["mfu_vs_measured_ceiling"] > 1
    # The names earlier results and the language-model tables use.
    row[f"{work.unit}s_per_s"] = per_s
    if work.unit == "token":
        row.update(tokens_per_s_per_device=per_s / jax.device_count(),
                   flops_per_token=work.flops_per_unit)
    if table_peak is not None:
        row["mfu"] = peak.mfu(per_s, work.flops_per_unit, table_peak * jax.device_count())
    return row, work.host_batches


def load_torch_reference():
    """benchmarks/torch_reference.py, if PyTorch and transformers are installed and ptft runs
    from a source checkout (the reference is not part of the package); else None."""
    if importlib.util.find_spec("torch") is None or \
            importlib.util.find_spec("transformers") is None:
        return None
    if not TORCH_REFERENCE.is_file():
        log.warning("PyTorch is installed, but the PyTorch reference (benchmarks/"
                    "torch_reference.py) comes with a source checkout of ptft_jax, not with "
                    "the package: timing ptft alone")
        return None
    spec = importlib.util.spec_from_file_location("ptft_torch_reference", TORCH_REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(case_names: list[str], sets: list[str], steps: int, warmup: int, profile: bool,
        cases_file: Path, out_dir: Path, torch_steps: int | None = None,
        with_torch: bool = True, echo=print, overrides: tuple[str, ...] = ()) -> list[dict]:
    """Runs the chosen cases and writes JSONL, Markdown and PNG; `overrides` (config keys)
    shrink every case, for smoke tests."""
    cases = load_cases(cases_file, sets, case_names)
    refused = {}
    for case in cases:  # every case's config, checked before anything runs
        try:
            validate(case.config(overrides), jax.device_count())
        except ValueError as e:  # ConfigError and the checks that raise ValueError
            refused[case.name] = str(e).splitlines()[0]
            echo(f"[{case.name}] skipped: {refused[case.name]}")
    if len(refused) == len(cases):
        raise ConfigError(f"none of the {len(cases)} chosen case(s) of {cases_file} can run "
                          f"here (each one's reason is above); fix them, or choose others with "
                          f"--set / --cases.")
    env = environment()
    torch_ref = load_torch_reference() if with_torch else None
    if with_torch and torch_ref is None and any(c.torch for c in cases):
        echo("PyTorch reference skipped: torch and transformers are not installed "
             "(pip install torch==2.13.0 transformers).")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out_dir / device_slug(env)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        row = {"case": case.name, **dataclasses.asdict(case), **env}
        host_batches = None
        if case.name in refused:
            row["error"] = refused[case.name]
        else:
            echo(f"[{case.name}] ...")
            try:
                result, host_batches = run_jax_case(
                    case, steps, warmup, out / "profiles" if profile else None, overrides)
                row.update(result)
            except ValueError as e:  # ConfigError and the checks that raise ValueError
                row["error"] = str(e).splitlines()[0]
                echo(f"[{case.name}] skipped: {row['error']}")
        if case.torch and torch_ref is not None and "error" not in row:
            cfg = case.config(overrides)
            for compiled in (False, True):
                key = "torch_compile" if compiled else "torch_eager"
                try:
                    result = torch_ref.time_case(cfg, host_batches, compiled=compiled,
                                                 steps=torch_steps or steps, warmup=warmup)
                    row.update({f"{key}_{k}": v for k, v in result.items()})
                except Exception as e:  # the reference must never stop the suite
                    row[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
                    echo(f"[{case.name}] {key} failed: {row[f'{key}_error']}")
        rows.append(row)
        echo(summary_line(row))
        with open(out / f"{stamp}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    table = markdown_table(rows, env)
    (out / f"{stamp}.md").write_text(table)
    (out / f"latest-{'-'.join(sets) if sets else 'cases'}.md").write_text(table)
    plot(rows, env, out / f"{stamp}.png")
    echo(table)
    echo(f"results: {out}/{stamp}.{{jsonl,md,png}}")
    if all("error" in r for r in rows):
        raise ConfigError(f"no case produced a result: all {len(rows)} failed (why: above).")
    return rows
