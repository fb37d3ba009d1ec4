"""Where a benchmark ran and what it reports: the machine (CPU model and instruction set,
device, library versions, commit), the results folder, and the Markdown table, memory notes
and chart of a run's rows."""
from __future__ import annotations

import datetime
import importlib.util
import platform
import subprocess
from pathlib import Path

import jax
import numpy as np

# The source checkout, when ptft runs from one: `benchmarks/` lies beside `ptft_jax/`.
REPO = Path(__file__).resolve().parents[2]


def default_results_dir() -> Path:
    """The checkout's benchmarks/results when ptft runs from a source checkout, else
    benchmarks/results under the working directory (an installed package)."""
    results = REPO / "benchmarks" / "results"
    return results if results.is_dir() else Path("benchmarks") / "results"


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
    cols = ["case", "compile s", "step ms (median)", "min-max", "throughput",
            "per device", "MFU", "MFU vs measured", "state MB/device",
            "torch eager ms", "torch.compile ms", "ptft/eager", "ptft/compile"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} |" + " |" * (len(cols) - 2))
            continue
        lines.append("| " + " | ".join([
            r["case"], f"{r['compile_s']:.1f}", f"{r['step_ms_median']:.1f}",
            f"{r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}", _throughput(r),
            _throughput(r, per_device=True),
            f"{r['mfu']:.1%}" if "mfu" in r else "n/a",
            _vs_ceiling(r),
            f"{r['state_bytes_per_device'] / 2**20:.1f}",
            _ms(r, "torch_eager"), _ms(r, "torch_compile"),
            _ratio(r, "torch_eager"), _ratio(r, "torch_compile")]) + " |")
    notes = memory_notes(rows)
    return head + "\n".join(lines) + ("\n\n" + notes if notes else "") + "\n"


def _vs_ceiling(r) -> str:
    value = f"{r['mfu_vs_measured_ceiling']:.1%}"
    return value + " (ceiling too low)" if r.get("ceiling_too_low") else value


def _throughput(r, per_device: bool = False) -> str:
    value = r["units_per_s_per_device" if per_device else "units_per_s"]
    return f"{value:,.{0 if value >= 100 else 1}f} {r['unit']}s/s"


def _ms(r, key):
    return f"{r[key + '_step_ms_median']:.1f}" if key + "_step_ms_median" in r else "-"


def _ratio(r, key):
    return f"{r['step_ms_median'] / r[key + '_step_ms_median']:.2f}" \
        if key + "_step_ms_median" in r else "-"


def memory_notes(rows: list[dict]) -> str:
    """Per-device state bytes of each layout relative to pure data parallelism on the same
    model: the `-dp8` case of the memory set."""
    def model(r):
        return r["preset"], r["objective"], r.get("seq_len"), r["global_batch"]

    lines = []
    for base in (r for r in rows if r["case"].endswith("-dp8") and "error" not in r):
        for r in rows:
            if r is not base and "error" not in r and model(r) == model(base):
                ratio = r["state_bytes_per_device"] / base["state_bytes_per_device"]
                lines.append(f"- {r['case']}: {ratio:.3f} of {base['case']}'s per-device "
                             f"parameter + optimizer bytes")
    return "Per-device state memory:\n" + "\n".join(lines) if lines else ""


def plot(rows: list[dict], env: dict, path: Path) -> None:
    """Throughput bars, ptft beside the PyTorch reference: one panel per unit (tokens/s,
    images/s), since the scales do not compare."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    units = list(dict.fromkeys(r["unit"] for r in ok))
    fig, axes = plt.subplots(1, len(units), squeeze=False,
                             figsize=(max(6, 1.6 * len(ok)), 4))
    for ax, unit in zip(axes[0], units):
        group = [r for r in ok if r["unit"] == unit]
        series = [("ptft (JAX)", [r["units_per_s"] for r in group])]
        for key, name in (("torch_eager", "PyTorch eager"), ("torch_compile", "torch.compile")):
            if any(key + "_units_per_s" in r for r in group):
                series.append((name, [r.get(key + "_units_per_s", 0) for r in group]))
        width = 0.8 / len(series)
        for i, (name, values) in enumerate(series):
            ax.bar(np.arange(len(group)) + i * width, values, width, label=name)
        ax.set_xticks(np.arange(len(group)) + width * (len(series) - 1) / 2)
        ax.set_xticklabels([r["case"] for r in group], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(f"{unit}s / s (median step)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{env['device_kind']} x{env['device_count']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_line(r: dict) -> str:
    """One case's row as the line printed while the run goes on."""
    if "error" in r:
        return f"[{r['case']}] error"
    parts = [f"[{r['case']}] compile {r['compile_s']:.1f}s", f"step {r['step_ms_median']:.1f} ms",
             _throughput(r),
             f"MFU {r['mfu']:.1%}" if "mfu" in r else
             f"MFU vs measured ceiling {_vs_ceiling(r)}"]
    for key in ("torch_eager", "torch_compile"):
        if key + "_step_ms_median" in r:
            parts.append(f"{key} {r[key + '_step_ms_median']:.1f} ms "
                         f"(ptft/{key.split('_')[1]} {_ratio(r, key)})")
    return " | ".join(parts)
