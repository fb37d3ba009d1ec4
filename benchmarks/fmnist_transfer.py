"""Does pretraining an image component pay off? Fashion-MNIST, five classes to pretrain on,
the other five to finetune on with few labels, every finetuning strategy against training
from scratch.

    python -m benchmarks.fmnist_transfer [--models vit resnet] [--per-class 10 100]

For each model it pretrains once (configs/pretrain_fmnist_<model>.yaml, skipped when the run
directory already holds its last step), then finetunes configs/finetune_fmnist_<model>.yaml
with each strategy's overrides at each label budget, every run in its own process and run
directory under runs/fmnist/. The score is the final evaluation on all 5,000 test images of
the five new classes (no checkpoint is picked by its test score). Needs Debian's
dataset-fashion-mnist. Writes benchmarks/results/<device>/fmnist-transfer.{md,jsonl}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

STRATEGIES = {
    "scratch": ["finetune.init_from=null"],
    "full": [],
    "linear_probe": ["finetune.linear_probe=true", "optim.learning_rate=3e-3"],
    "lora_r8": ["finetune.lora_rank=8", "optim.learning_rate=2e-3"],  # ViT only
    "gradual": ["finetune.unfreeze=gradual"],
    # Adaptive unfreezing decides on evaluations of the test split (the only one here).
    "adaptive": ["finetune.unfreeze=adaptive", "finetune.unfreeze_patience=1", "eval.every=25"],
    "layer_decay_0.75": ["finetune.layer_decay=0.75"],
}


def ptft(command: str, config: Path, overrides: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ptft_jax.cli", command, "--config", str(config),
                    "train.progress=false", *overrides], cwd=REPO, check=True)
    return time.perf_counter() - t0


def final_eval(run_dir: Path) -> dict | None:
    """The run's last evaluation, if it finished (an interrupted run is resumed instead)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists() or not (run_dir / "config.yaml").exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps = __import__("yaml").safe_load((run_dir / "config.yaml").read_text())["train"]["steps"]
    evals = [r for r in rows if "eval/accuracy" in r and r.get("step") == steps]
    return evals[-1] if evals else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["vit", "resnet"])
    parser.add_argument("--per-class", nargs="+", type=int, default=[10, 100])
    parser.add_argument("--out", default=None, help="results folder (default: by device)")
    args = parser.parse_args()
    from ptft_jax.bench.report import device_slug, environment
    env = environment()
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / device_slug(env)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        pre_cfg = REPO / "configs" / f"pretrain_fmnist_{model}.yaml"
        pre_dir = REPO / "runs" / "fmnist" / f"{model}_pre"
        seconds = 0.0
        if final_eval(pre_dir) is None:  # not run, or interrupted: (re)run, which resumes
            seconds = ptft("pretrain", pre_cfg, [f"run_dir={pre_dir}"])
        pre = final_eval(pre_dir)
        rows.append({"model": model, "strategy": "pretraining (classes 0-4)", "per_class": 6000,
                     "accuracy": pre["eval/accuracy"], "macro_f1": pre["eval/macro_f1"],
                     "seconds": seconds})
        for per_class in args.per_class:
            for name, overrides in STRATEGIES.items():
                if model != "vit" and name.startswith("lora"):
                    continue
                if name == "adaptive" and per_class != max(args.per_class):
                    continue  # evaluations cost as much as the training here: one budget
                run_dir = REPO / "runs" / "fmnist" / f"{model}_{name}_{per_class}"
                extra = [f"run_dir={run_dir}", f"data.per_class={per_class}",
                         f"finetune.init_from={pre_dir}", *overrides]
                seconds = ptft("finetune", REPO / "configs" / f"finetune_fmnist_{model}.yaml",
                               extra) if final_eval(run_dir) is None else 0.0
                result = final_eval(run_dir)
                rows.append({"model": model, "strategy": name, "per_class": per_class,
                             "accuracy": result["eval/accuracy"],
                             "macro_f1": result["eval/macro_f1"], "seconds": seconds})
                print(rows[-1], flush=True)
    with open(out / "fmnist-transfer.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({**row, "machine": env["machine"], "isa": env["isa"],
                                "commit": env["git_commit"]}) + "\n")
    lines = ["# Fashion-MNIST transfer: pretrain on classes 0-4, finetune on 5-9",
             "", f"Machine: {env['machine']} ({env['isa']}), commit {env['git_commit']}. "
             f"Scores: the final evaluation on the 5,000 test images of classes 5-9 "
             f"(pretraining row: classes 0-4).", "",
             "| model | strategy | labels per class | accuracy | macro F1 | wall s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['strategy']} | {r['per_class']} | "
                     f"{r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['seconds']:.0f} |")
    (out / "fmnist-transfer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
