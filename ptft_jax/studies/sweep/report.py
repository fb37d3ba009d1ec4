"""What a sweep leaves in its directory: trials.md and trials.csv (every trial's parameters,
metric, status, steps and time), best_config.yaml (the best trial's config, runnable as it
is), history.png and importance.png (Optuna's plots, drawn with matplotlib), and the hparams
view of TensorBoard (tensorboard/)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import yaml

from ptft_jax.config.reading import read_yaml

STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
          "WAITING": "queued"}


def _rows(study, sweep) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if a.get("surplus"):
            continue
        state = STATES.get(t.state.name, t.state.name.lower())
        if state == "failed" and a.get("failed_because"):
            state = f"failed ({a['failed_because'][:60]})"
        value = t.value if t.value is not None else \
            (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values
             else None)
        rows.append({"trial": t.number, "state": state,
                     **{p.name: t.params.get(p.name) for p in sweep.params},
                     sweep.metric: value, "steps": a.get("steps"),
                     "seconds": a.get("seconds"), "compile_s": a.get("compile_seconds"),
                     "run_dir": a.get("run_dir")})
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _plots(study, out: Path) -> list[str]:
    """Optuna's optimisation history and parameter importances, as PNG."""
    import warnings

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm
    written, notes = [], []
    for name, draw in (("history.png", ovm.plot_optimization_history),
                       ("importance.png", ovm.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = draw(study)
            fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
            fig.set_size_inches(8, 4.5)
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            written.append(name)
        except (ValueError, RuntimeError) as e:  # e.g. importances need 2+ complete trials
            notes.append(f"{name}: not drawn ({str(e).splitlines()[0]})")
    return written + notes


def _tensorboard(rows: list[dict], sweep, out: Path) -> None:
    """One hparams entry per trial that has a value (TensorBoard's HPARAMS tab)."""
    from tensorboardX import SummaryWriter
    with SummaryWriter(str(out / "tensorboard")) as writer:
        for r in rows:
            if r[sweep.metric] is None or not r["state"].startswith(("complete", "pruned")):
                continue
            hparams = {p.name: r[p.name] if isinstance(r[p.name], (int, float, str, bool))
                       else str(r[p.name]) for p in sweep.params}
            writer.add_hparams(hparams, {f"hparam/{sweep.metric}": float(r[sweep.metric])},
                               name=f"trial_{r['trial']:04d}")


def write_report(study, sweep) -> dict:
    out = Path(sweep.dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(study, sweep)
    columns = ["trial", "state", *(p.name for p in sweep.params), sweep.metric, "steps",
               "seconds", "compile_s", "run_dir"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns)
    w.writeheader()
    w.writerows(rows)
    (out / "trials.csv").write_text(buf.getvalue())

    complete = [t for t in study.get_trials(deepcopy=False)
                if t.state.name == "COMPLETE" and not t.user_attrs.get("surplus")]
    best = None
    if complete:
        best = (max if sweep.direction == "maximize" else min)(complete, key=lambda t: t.value)
    compiles = [r["compile_s"] for r in rows if r["compile_s"]]
    reused = sum(1 for r in rows if r["compile_s"] == 0 and r["state"] != "queued")
    lines = [f"# Sweep {sweep.study_name}", "",
             f"ptft {sweep.command} on `{sweep.opts.config}` over `{sweep.opts.space}`: "
             f"{sweep.opts.sampler} sampler, {sweep.opts.pruner} pruner, objective "
             f"{sweep.direction} validation {sweep.metric} (best over a trial's "
             f"evaluations). {len(rows)} trial(s): "
             + ", ".join(f"{sum(r['state'].startswith(s) for r in rows)} {s}"
                         for s in ("complete", "pruned", "failed", "running", "queued")
                         if any(r["state"].startswith(s) for r in rows)) + ".", ""]
    if compiles:
        lines += [f"Compiled steps: {len(compiles)} compile(s), {sum(compiles):.1f} s; "
                  f"{reused} trial(s) reused a compiled step (about "
                  f"{reused * sum(compiles) / len(compiles):.0f} s saved).", ""]
    if best is not None:
        lines += [f"Best: trial {best.number}, {sweep.metric} {best.value:.4g}: " +
                  ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()) +
                  ". Its config: `best_config.yaml`.", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in sorted(rows, key=lambda r: r["trial"]):
        lines.append("| " + " | ".join(_fmt(r[c]) for c in columns) + " |")
    plots = _plots(study, out) if rows else []
    lines += ["", *(f"![{p}]({p})" if p.endswith(".png") else f"- {p}" for p in plots)]
    (out / "trials.md").write_text("\n".join(lines) + "\n")

    if best is not None:
        config = Path(best.user_attrs["run_dir"]) / "config.yaml"
        if config.is_file():
            doc = read_yaml(config, "a trial's config.yaml")
            doc["run_dir"] = f"runs/{sweep.study_name}_best"
            header = (f"# ptft {sweep.command} --config {out / 'best_config.yaml'}\n"
                      f"# The best trial ({best.number}) of sweep {sweep.study_name}: "
                      f"{sweep.metric} {best.value:.4g}.\n")
            (out / "best_config.yaml").write_text(header + yaml.safe_dump(doc, sort_keys=False))
    _tensorboard(rows, sweep, out)
    return {"trials": len(rows), "best_trial": best.number if best else None,
            "best_value": best.value if best else None, "dir": str(out), "rows": rows,
            "compiles": len(compiles)}
