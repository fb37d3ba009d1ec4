"""Knowledge distillation on the bundled fortunes (10 categories, scored on all 792 validation
fortunes): the classifier finetuned from all-MiniLM-L6-v2 (the teacher,
configs/finetune_fortunes_minilm_full.yaml) taught to two smaller students, each beside the
same student trained on the labels alone with the same recipe and budget:

- a 3-layer MiniLM that starts from the teacher's lower layers
  (configs/finetune_fortunes_distill_minilm3.yaml); also with its hidden states matched to the
  teacher's (layers 1, 2, 3 to 2, 4, 6);
- bert-mini (4 layers, width 256) from a random init
  (configs/finetune_fortunes_distill_bert_mini.yaml).

Per model: accuracy and macro F1 of the final evaluation, parameters, the training step time
(distilled runs include the teacher's forward pass: the median of a separate --step-steps
run of the same recipe, all of them one after another at the end, apart from the training
runs), the training run's wall time (jsonl only), and predict throughput (`ptft
predict`'s model, loaded and compiled once, median of three passes over the split after a
warm-up, batches of --batch texts). Every run is its own process and run directory under
runs/distill/ (a finished run is read, not rerun). Writes
benchmarks/results/<device>/distillation.{md,jsonl}.

    .venv/bin/python -m benchmarks.distillation [--teacher runs/fortunes_minilm_full]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.classifier_eval import labelled_split, macro_f1, median_s, ptft_predictor
from benchmarks.fmnist_transfer import REPO, final_eval, ptft
from benchmarks.results_io import write_results
from ptft_jax.ckpt.pretrained import inference_params
from ptft_jax.config.load import load_run_config
from ptft_jax.core.params import count

RUNS = REPO / "runs" / "distill"
CONFIGS = REPO / "configs"
HIDDEN = "distill.hidden_layers=[[1,2],[2,4],[3,6]]"
# (name, config, overrides); the teacher is set by --teacher.
STUDENTS = [
    ("minilm3_labels", "finetune_fortunes_distill_minilm3.yaml", ["distill.teacher=null"]),
    ("minilm3_distilled", "finetune_fortunes_distill_minilm3.yaml", []),
    ("minilm3_distilled_hidden", "finetune_fortunes_distill_minilm3.yaml", [HIDDEN]),
    ("bert_mini_labels", "finetune_fortunes_distill_bert_mini.yaml", ["distill.teacher=null"]),
    ("bert_mini_distilled", "finetune_fortunes_distill_bert_mini.yaml", []),
]


def recipe_keys(name: str, overrides: list[str], teacher: Path) -> list[str]:
    """A student's overrides, with the teacher run (and the start, for the MiniLM student)."""
    keys = [f"finetune.init_from={teacher}"] if "minilm3" in name else []
    if "distill.teacher=null" not in overrides:
        keys.append(f"distill.teacher={teacher}")
    return keys + overrides


def train(name: str, config: str, overrides: list[str], teacher: Path) -> Path:
    run_dir = RUNS / name
    if final_eval(run_dir) is None:
        seconds = ptft("finetune", CONFIGS / config,
                       [f"run_dir={run_dir}", *recipe_keys(name, overrides, teacher)])
        (run_dir / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
    return run_dir


def step_time(config: Path, overrides: list[str], steps: int) -> float:
    """The median logged step time of a short run of the recipe (its own process)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptft("finetune", config, [*overrides, f"run_dir={tmp}/run", f"train.steps={steps}",
                                  "train.log_every=1", "eval.every=0", "checkpoint.every=0"])
        rows = [json.loads(line) for line in
                (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r][2:]  # after warm-up
    return statistics.median(times)


def describe(name: str, run_dir: Path, texts, truth, batch: int) -> dict:
    """Final evaluation, size and predict speed of one finetuned run."""
    cfg = load_run_config(run_dir)
    final = final_eval(run_dir) or {}
    predict = ptft_predictor(run_dir, batch)
    predicted = predict(texts).argmax(1)
    wall = run_dir / "wall_seconds.txt"
    return {"model": name, "layers": cfg.model.num_layers, "width": cfg.model.hidden_size,
            "params": count(inference_params(run_dir, cfg)[0]),
            "eval_accuracy": final.get("eval/accuracy"),
            "eval_macro_f1": final.get("eval/macro_f1"),
            "accuracy": float(np.mean(predicted == truth)),
            "macro_f1": macro_f1(predicted, truth, int(truth.max()) + 1),
            "run_seconds": float(wall.read_text()) if wall.exists() else None,
            "texts_per_s": len(texts) / median_s(lambda: predict(texts))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="runs/fortunes_minilm_full")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--only", nargs="*", help="student names (default: all)")
    parser.add_argument("--step-steps", type=int, default=20,
                        help="steps of each recipe's step-time run")
    args = parser.parse_args()
    teacher = Path(args.teacher).resolve()
    if final_eval(teacher) is None:
        ptft("finetune", CONFIGS / "finetune_fortunes_minilm_full.yaml", [f"run_dir={teacher}"])
    texts, truth, _ = labelled_split(teacher)
    students = [s for s in STUDENTS if not args.only or s[0] in args.only]
    runs = [("teacher (all-MiniLM-L6-v2, finetuned)", teacher)] + [
        (name, train(name, config, overrides, teacher)) for name, config, overrides in students]
    results = [describe(name, run, texts, truth, args.batch) for name, run in runs]
    recipes = [("finetune_fortunes_minilm_full.yaml", [])] + [
        (config, recipe_keys(name, overrides, teacher)) for name, config, overrides in students]
    for result, (config, keys) in zip(results, recipes):
        result["step_time_s"] = step_time(CONFIGS / config, keys, args.step_steps)
    table = ["| model | layers x width | params | accuracy | macro F1 | step ms | "
             "predict texts/s |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['layers']} x {r['width']} | {r['params'] / 1e6:.1f}M | "
              f"{r['accuracy']:.3f} | {r['macro_f1']:.3f} | {1000 * r['step_time_s']:.0f} | "
              f"{r['texts_per_s']:.1f} |" for r in results]
    write_results("distillation", results, f"Distillation on fortunes ({len(texts)} validation "
                  f"texts; predict in batches of {args.batch})", table, teacher=str(teacher),
                  examples=len(texts), batch=args.batch)


if __name__ == "__main__":
    main()
