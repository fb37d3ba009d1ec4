"""`ptft bench`: step time, throughput, MFU, compile time and memory for the cases in
`benchmarks/cases.yaml`, side by side with a PyTorch reference when one is installed.

Measured honestly: compile time apart (`lower().compile()`), warm-up steps discarded, each timed
step ends in `block_until_ready` on the new state, and the median, min and max of N steps are
reported. Rows are what `ptft pretrain` feeds: random documents (geometric lengths, mean 600
tokens) packed by the training Packer, with segment ids and restarting positions, so attention
carries the document mask; `rows: unmasked` cases drop the segment ids, to price that mask.
The input pipeline has its own benchmark. FLOPs follow `ptft_jax.perf` (PaLM convention) and
count only what the step computes (masked LM: the head at its masked slots).
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.util
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from ptft_jax import perf
from ptft_jax.config import ConfigError, load_config
from ptft_jax.data.packing import Packer
from ptft_jax.validation import validate
from ptft_jax.models.layers import dtypes
from ptft_jax.engine import build
from ptft_jax.jobs import lm_task
from ptft_jax.tasks.lm import MlmSpec

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CASES = REPO / "benchmarks" / "cases.yaml"
CASE_KEYS = ("name", "preset", "objective", "seq_len", "global_batch", "parallelism", "mesh",
             "dtype", "remat", "scan", "grad_accum", "vocab_size", "torch", "rows",
             "loss_chunk")
ROWS = ("packed", "unmasked")
SPECIAL_IDS = (0, 1, 2, 3, 4)  # synthetic data keeps ids below 5 free, as our tokenizers do


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    preset: str
    objective: str
    seq_len: int
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

    def config(self, overrides: tuple[str, ...] = ()):
        cfg = load_config(None, [
            f"model.preset={self.preset}", f"train.task={self.objective}",
            f"data.seq_len={self.seq_len}", f"train.global_batch={self.global_batch}",
            f"mesh.parallelism={self.parallelism}", f"mesh.data={self.mesh.get('data', -1)}",
            f"mesh.fsdp={self.mesh.get('fsdp', 1)}", f"mesh.tensor={self.mesh.get('tensor', 1)}",
            f"model.dtype={self.dtype}", f"model.remat={self.remat}",
            f"model.scan_layers={str(self.scan).lower()}", f"train.grad_accum={self.grad_accum}",
            "model.dropout=0.0", "train.steps=1000", "optim.warmup_steps=10",
            *([f"model.vocab_size={self.vocab_size}"] if self.vocab_size else []),
            *([f"model.max_len={max(self.seq_len, 128)}"] if self.preset == "gpt-tiny" else []),
            *([f"objective.loss_chunk={self.loss_chunk}"] if self.loss_chunk is not None
              else []),
            *overrides])
        return cfg


def load_cases(path: Path, sets: list[str], names: list[str]) -> list[Case]:
    if not path.is_file():
        raise ConfigError(f"No benchmark cases file at {path}; pass --cases-file.")
    doc = yaml.safe_load(path.read_text())
    defaults, all_sets = doc.get("defaults", {}), doc["sets"]
    for s in sets:
        if s not in all_sets:
            raise ConfigError(f"No benchmark set '{s}' in {path}; sets: {', '.join(all_sets)}.")
    by_name = {}
    for set_name, cases in all_sets.items():
        for raw in cases:
            unknown = set(raw) - set(CASE_KEYS)
            if unknown:
                raise ConfigError(f"{path}: case {raw.get('name')} has unknown keys {unknown}; "
                                  f"valid: {', '.join(CASE_KEYS)}.")
            case = Case(**{**defaults, **raw})
            if case.rows not in ROWS:
                raise ConfigError(f"{path}: case {case.name} has rows: {case.rows}; use one of "
                                  f"{', '.join(ROWS)}.")
            by_name[raw["name"]] = (set_name, case)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConfigError(f"No benchmark case(s) {missing} in {path}; cases: "
                          f"{', '.join(by_name)}.")
    chosen = [c for n, (s, c) in by_name.items() if s in sets or n in names]
    if not chosen:
        raise ConfigError("No cases chosen: pass --set NAME or --cases NAME ...")
    return chosen


# ---------------------------------------------------------------------------------------------
# Measurements


def synthetic_batches(cfg, n: int = 2, seed: int = 0, rows: str = "packed") -> list[dict]:
    """`n` global batches of packed rows (tokens, segment_ids, positions) from random
    documents, through the training Packer; `unmasked`: the tokens alone (no document mask)."""
    rng = np.random.default_rng(seed)
    B, T = cfg.train.global_batch, cfg.data.seq_len
    lengths = rng.geometric(1 / 600, size=n * B * T // 300 + 8)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(len(SPECIAL_IDS), cfg.model.vocab_size, int(offsets[-1]),
                          dtype=np.int32)
    bos = 2 if cfg.model.kind == "encoder" else None  # [CLS] / GPT-2 has no BOS
    packer = Packer(tokens, offsets, T, bos, 3, "pack")
    out = [packer.rows(np.arange(i * B, (i + 1) * B)) for i in range(n)]
    if rows == "unmasked":
        out = [{"tokens": b["tokens"]} for b in out]
    return out


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


@functools.lru_cache(maxsize=None)
def matmul_ceiling(dtype) -> float:
    """Measured dense-matmul FLOP/s of one device in the compute dtype, for the whole system;
    timed once per run (median of 20) so that every case is held to the same ceiling."""
    n = 1024 if jax.default_backend() == "cpu" else 8192
    per_device = perf.measure_matmul_flops(n=n, dtype=dtype, repeats=20)
    return per_device if jax.default_backend() == "cpu" else per_device * jax.device_count()


def run_jax_case(case: Case, steps: int, warmup: int, profile_dir: Path | None,
                 overrides: tuple[str, ...] = ()) -> dict:
    cfg = case.config(overrides)
    validate(cfg, jax.device_count())
    spec = MlmSpec(mask_id=4, special_ids=SPECIAL_IDS, random_low=len(SPECIAL_IDS),
                   random_high=cfg.model.vocab_size) if case.objective == "mlm" else None
    engine = build(cfg, lm_task(cfg, spec))
    key = jax.random.key(0)
    state = engine.init(key)
    host_batches = synthetic_batches(cfg, rows=case.rows)
    batches = [engine.to_device(b) for b in host_batches]

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
        from ptft_jax import profiling
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

    tokens = cfg.train.global_batch * cfg.data.seq_len
    median = statistics.median(times)
    flops_per_token = perf.train_flops_per_token(
        cfg.model, cfg.data.seq_len,
        predicted_positions=engine.task.predicted_positions(cfg.data.seq_len))
    tokens_per_s = tokens / median
    compute_dtype, _ = dtypes(cfg.model)
    table_peak = perf.device_peak_flops()
    ceiling = matmul_ceiling(jnp.dtype(compute_dtype))
    row.update(step_ms_median=median * 1e3, step_ms_min=min(times) * 1e3,
               step_ms_max=max(times) * 1e3, steps_timed=len(times),
               tokens_per_s=tokens_per_s,
               tokens_per_s_per_device=tokens_per_s / jax.device_count(),
               flops_per_token=flops_per_token, compute_dtype=str(compute_dtype),
               matmul_ceiling_flops=ceiling,
               mfu_vs_measured_ceiling=perf.mfu(tokens_per_s, flops_per_token, ceiling))
    if table_peak is not None:
        row["mfu"] = perf.mfu(tokens_per_s, flops_per_token, table_peak * jax.device_count())
    return row, host_batches


def load_torch_reference():
    """benchmarks/torch_reference.py, if PyTorch and transformers are installed; else None."""
    if importlib.util.find_spec("torch") is None or \
            importlib.util.find_spec("transformers") is None:
        return None
    path = REPO / "benchmarks" / "torch_reference.py"
    spec = importlib.util.spec_from_file_location("ptft_torch_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_pipeline_case(case: dict, work_dir: Path, num_tokens: int = 50_000_000,
                      batches: int = 100) -> dict:
    """Tokens/s from a memory-mapped token cache to device arrays, through the training
    loader (Packer + BatchLoader) and its prefetch thread. Documents have geometric lengths
    (mean 600 tokens); the token file is written once and reused."""
    from ptft_jax.data.loader import BatchLoader, prefetch
    from ptft_jax.data.packing import Packer
    from ptft_jax.mesh import batch_sharding, global_batch_array, make_mesh
    from ptft_jax.config import MeshConfig

    rng = np.random.default_rng(0)
    lengths = rng.geometric(1 / 600, size=num_tokens // 600)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    path = work_dir / f"pipeline_tokens_{num_tokens}.bin"
    if not path.exists() or path.stat().st_size != 2 * int(offsets[-1]):
        out = np.memmap(path, np.uint16, "w+", shape=(int(offsets[-1]),))
        out[:] = rng.integers(5, 30_000, len(out), dtype=np.uint16)
        out.flush()
        del out
    tokens = np.memmap(path, np.uint16, "r")
    seq_len, global_batch = case["seq_len"], case["global_batch"]
    packer = Packer(tokens, offsets, seq_len, 2, 3, case.get("packing", "pack"))
    sharding = batch_sharding(make_mesh(MeshConfig()))
    loader = BatchLoader(packer, global_batch, 0, slice(0, global_batch))

    t0 = time.perf_counter()
    for step in range(batches):
        loader.batch(step)
    host_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    stream = prefetch(global_batch_array(loader.batch(step), sharding, global_batch)
                      for step in range(batches))
    for batch in stream:
        jax.block_until_ready(batch)
    device_s = time.perf_counter() - t0
    tokens_moved = batches * global_batch * seq_len
    return {"case": case["name"], **case, "batches": batches,
            "host_tokens_per_s": tokens_moved / host_s,
            "to_device_tokens_per_s": tokens_moved / device_s}


def run_tokenization_case(work_dir: Path, copies: int = 10) -> dict:
    """Documents/s and tokens/s of `ptft data prepare` (the cache build, every core) on the
    bundled corpus repeated `copies` times, with a WordPiece tokenizer of 8192 trained on it."""
    import shutil
    from ptft_jax.data.cache import prepare_cache
    from ptft_jax.data.sources import from_arrays
    from ptft_jax.data.tokenizer import iter_texts, train_tokenizer

    kjv = open_documents_bundled()
    tokenizer_path = work_dir / "tokenization_tokenizer.json"
    train_tokenizer("encoder", iter_texts(kjv), 8192).save(str(tokenizer_path))
    texts = kjv.texts(0, len(kjv)) * copies
    cache_dir = work_dir / "tokenization_cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = prepare_cache(from_arrays(texts, name=f"kjv x{copies}"), tokenizer_path, cache_dir,
                          shard_docs=2_000, progress=False)
    stats = cache.stats
    shutil.rmtree(cache_dir, ignore_errors=True)
    return {"case": f"tokenize-kjv-x{copies}", "documents": stats.docs,
            "tokens": stats.tokens, "workers": stats.workers,
            "docs_per_s": stats.docs_per_s, "tokens_per_s": stats.tokens_per_s}


def open_documents_bundled():
    from ptft_jax.config import DataConfig
    from ptft_jax.data.opening import open_documents
    return open_documents(DataConfig(corpus="bundled:kjv"))


def run_pipeline(names: list[str], cases_file: Path, out_dir: Path, echo=print) -> list[dict]:
    doc = yaml.safe_load(cases_file.read_text())
    cases = [c for c in doc.get("pipeline", []) if not names or c["name"] in names]
    env = environment()
    out = out_dir / device_slug(env)
    out.mkdir(parents=True, exist_ok=True)
    tokenization = {**run_tokenization_case(out_dir), **env}
    echo(f"[{tokenization['case']}] {tokenization['docs_per_s']:,.0f} documents/s, "
         f"{tokenization['tokens_per_s'] / 1e6:.2f}M tokens/s on {tokenization['workers']} "
         f"worker(s)")
    rows = []
    for case in cases:
        row = {**run_pipeline_case(case, out_dir), **env}
        rows.append(row)
        echo(f"[{row['case']}] host {row['host_tokens_per_s'] / 1e6:.1f}M tokens/s, to device "
             f"{row['to_device_tokens_per_s'] / 1e6:.1f}M tokens/s")
    lines = ["| pipeline case | seq | batch | packing | host tokens/s | to device tokens/s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['seq_len']} | {r['global_batch']} | {r.get('packing')} | "
              f"{r['host_tokens_per_s'] / 1e6:.1f}M | {r['to_device_tokens_per_s'] / 1e6:.1f}M |"
              for r in rows]
    table = (f"Input pipeline on {env['machine']}, {env['isa']} ({env['device_kind']} "
             f"x{env['device_count']}),"
             f" commit {env['git_commit']}, {env['time']}\n\n" + "\n".join(lines) + "\n\n"
             f"Tokenization into the cache ({tokenization['case']}, "
             f"{tokenization['documents']:,} documents, {tokenization['workers']} worker(s)): "
             f"{tokenization['docs_per_s']:,.0f} documents/s, "
             f"{tokenization['tokens_per_s'] / 1e6:.2f}M tokens/s\n")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"pipeline-{stamp}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [tokenization, *rows]))
    (out / "pipeline-latest.md").write_text(table)
    echo(table)
    return rows


# ---------------------------------------------------------------------------------------------
# Context and reports


def environment() -> dict:
    import flax
    import optax
    env = {"machine": _cpu_name(), "isa": instruction_set(), "platform": jax.default_backend(),
           "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
           "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
           "git_commit": _git_commit(), "time": datetime.datetime.now().isoformat(
               timespec="seconds")}
    for name in ("torch", "transformers"):
        if importlib.util.find_spec(name) is not None:
            env[name] = __import__(name).__version__
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                import os
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def instruction_set() -> str:
    """The host CPU's widest vector / matrix extension (ratios against PyTorch differ a lot
    between AVX2, AVX-512 and AMX machines)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), [])
    except OSError:
        flags = []
    found = [name for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX-512"),
                                     ("avx2", "AVX2"), ("sve", "SVE"), ("asimd", "NEON"))
             if flag in flags]
    return found[0] if found else platform.machine()


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_slug(env: dict) -> str:
    kind = env["device_kind"] if env["platform"] != "cpu" else "cpu-" + env["machine"]
    slug = "".join(c if c.isalnum() else "-" for c in kind.lower())
    return "-".join(filter(None, slug.split("-")))[:60] + f"-x{env['device_count']}"


def markdown_table(rows: list[dict], env: dict) -> str:
    head = (f"Device: {env['device_kind']} x{env['device_count']} ({env['platform']}; host "
            f"{env['machine']}, {env.get('isa', 'ISA unknown')}); jax {env['jax']}, "
            f"flax {env['flax']}"
            + (f", torch {env['torch']}" if "torch" in env else "")
            + f"; commit {env['git_commit']}; {env['time']}\n\n")
    cols = ["case", "compile s", "step ms (median)", "min-max", "tokens/s",
            "tokens/s/device", "MFU", "MFU vs measured", "state MB/device",
            "torch eager ms", "torch.compile ms", "ptft/eager", "ptft/compile"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} |" + " |" * (len(cols) - 2))
            continue
        lines.append("| " + " | ".join([
            r["case"], f"{r['compile_s']:.1f}", f"{r['step_ms_median']:.1f}",
            f"{r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}", f"{r['tokens_per_s']:,.0f}",
            f"{r['tokens_per_s_per_device']:,.0f}",
            f"{r['mfu']:.1%}" if "mfu" in r else "n/a",
            f"{r['mfu_vs_measured_ceiling']:.1%}",
            f"{r['state_bytes_per_device'] / 2**20:.1f}",
            _ms(r, "torch_eager"), _ms(r, "torch_compile"),
            _ratio(r, "torch_eager"), _ratio(r, "torch_compile")]) + " |")
    notes = memory_notes(rows)
    return head + "\n".join(lines) + ("\n\n" + notes if notes else "") + "\n"


def _ms(r, key):
    return f"{r[key + '_step_ms_median']:.1f}" if key + "_step_ms_median" in r else "-"


def _ratio(r, key):
    return f"{r['step_ms_median'] / r[key + '_step_ms_median']:.2f}" \
        if key + "_step_ms_median" in r else "-"


def memory_notes(rows: list[dict]) -> str:
    """Per-device state bytes of each layout relative to pure data parallelism on the same
    model: the `-dp8` case of the memory set."""
    def model(r):
        return r["preset"], r["objective"], r["seq_len"], r["global_batch"]

    lines = []
    for base in (r for r in rows if r["case"].endswith("-dp8") and "error" not in r):
        for r in rows:
            if r is not base and "error" not in r and model(r) == model(base):
                ratio = r["state_bytes_per_device"] / base["state_bytes_per_device"]
                lines.append(f"- {r['case']}: {ratio:.3f} of {base['case']}'s per-device "
                             f"parameter + optimizer bytes")
    return "Per-device state memory:\n" + "\n".join(lines) if lines else ""


def plot(rows: list[dict], env: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    labels = [r["case"] for r in ok]
    series = [("ptft (JAX)", [r["tokens_per_s"] for r in ok])]
    for key, name in (("torch_eager", "PyTorch eager"), ("torch_compile", "torch.compile")):
        if any(key + "_tokens_per_s" in r for r in ok):
            series.append((name, [r.get(key + "_tokens_per_s", 0) for r in ok]))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(ok)), 4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series):
        ax.bar(np.arange(len(ok)) + i * width, values, width, label=name)
    ax.set_xticks(np.arange(len(ok)) + width * (len(series) - 1) / 2)
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("tokens / s (median step)")
    ax.set_title(f"{env['device_kind']} x{env['device_count']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(case_names: list[str], sets: list[str], steps: int, warmup: int, profile: bool,
        cases_file: Path, out_dir: Path, torch_steps: int | None = None,
        with_torch: bool = True, echo=print, overrides: tuple[str, ...] = ()) -> list[dict]:
    """Runs the chosen cases and writes JSONL, Markdown and PNG; `overrides` (config keys)
    shrink every case, for smoke tests."""
    cases = load_cases(cases_file, sets, case_names)
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
        echo(f"[{case.name}] ...")
        row = {"case": case.name, **dataclasses.asdict(case), **env}
        host_batches = None
        try:
            result, host_batches = run_jax_case(
                case, steps, warmup, out / "profiles" if profile else None, overrides)
            row.update(result)
        except (ConfigError, ValueError) as e:
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
        echo(_summary_line(row))
        with open(out / f"{stamp}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    table = markdown_table(rows, env)
    (out / f"{stamp}.md").write_text(table)
    (out / "latest.md").write_text(table)
    plot(rows, env, out / f"{stamp}.png")
    echo(table)
    echo(f"results: {out}/{stamp}.{{jsonl,md,png}}")
    return rows


def _summary_line(r: dict) -> str:
    if "error" in r:
        return f"[{r['case']}] error"
    parts = [f"[{r['case']}] compile {r['compile_s']:.1f}s", f"step {r['step_ms_median']:.1f} ms",
             f"{r['tokens_per_s']:,.0f} tok/s",
             f"MFU {r['mfu']:.1%}" if "mfu" in r else
             f"MFU vs measured ceiling {r['mfu_vs_measured_ceiling']:.1%}"]
    for key in ("torch_eager", "torch_compile"):
        if key + "_step_ms_median" in r:
            parts.append(f"{key} {r[key + '_step_ms_median']:.1f} ms "
                         f"(ptft/{key.split('_')[1]} {_ratio(r, key)})")
    return " | ".join(parts)
