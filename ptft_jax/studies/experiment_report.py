"""The pretrain-vs-end-to-end experiment's report: results.jsonl (one row per arm and seed),
results.md (mean ± standard deviation over seeds) and accuracy against training FLOPs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ptft_jax.studies.experiment import ExperimentConfig

NAME = "pretrain-vs-end-to-end"
ARM_TITLES = {"a": "a: end to end from scratch", "b": "b: components pretrained apart",
              "c": "c: towers aligned (contrastive)", "d_b": "d: components, towers frozen",
              "d_c": "d: aligned, towers frozen"}


def write_report(cfg: ExperimentConfig, rows: list[dict]) -> str:
    root = Path(cfg.dir)
    with open(root / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

    def stat(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return f"{np.mean(values):.3f} ± {sd:.3f}"
    lines = [f"# {NAME}: {cfg.finetune.get('data', {}).get('corpus')}", "",
             f"Budget {cfg.budget_flops:.3g} training FLOPs per arm; seeds {cfg.seeds}; "
             f"mean ± standard deviation over seeds of the last evaluation on the validation "
             f"split.", "",
             "| arm | val accuracy | val macro F1 | training FLOPs | wall time s | stages "
             "(steps) |", "|---|---|---|---|---|---|"]
    for arm in cfg.arms:
        mine = [r for r in rows if r["arm"] == arm]
        walls = [r["wall_s"] for r in mine if r["wall_s"] is not None]
        stages = ", ".join(f"{s['stage']} ({s['steps']})" for s in mine[0]["stages"])
        lines.append(f"| {ARM_TITLES[arm]} | {stat([r['accuracy'] for r in mine])} | "
                     f"{stat([r['macro_f1'] for r in mine])} | {mine[0]['flops']:.3g} | "
                     f"{np.mean(walls):.0f} | {stages} |" if walls else
                     f"| {ARM_TITLES[arm]} | {stat([r['accuracy'] for r in mine])} | "
                     f"{stat([r['macro_f1'] for r in mine])} | {mine[0]['flops']:.3g} | - | "
                     f"{stages} |")
    table = "\n".join(lines) + "\n"
    (root / "results.md").write_text(table)
    plot(cfg, rows, root / "accuracy_vs_flops.png")
    return table


def plot(cfg: ExperimentConfig, rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in cfg.arms:
        curves = [r["curve"] for r in rows if r["arm"] == arm and r["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        x = np.mean([[p[0] for p in c[:n]] for c in curves], axis=0)
        y = np.array([[p[1] for p in c[:n]] for c in curves])
        ax.plot(x, y.mean(0), marker="o", ms=3, label=ARM_TITLES[arm])
        if len(curves) > 1:
            ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.15)
    ax.axvline(cfg.budget_flops, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training FLOPs (pretraining stages included)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{NAME} ({len(cfg.seeds)} seed(s))", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

