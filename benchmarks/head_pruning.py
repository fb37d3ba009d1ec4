"""Attention-head pruning of the fortunes classifier finetuned from all-MiniLM-L6-v2 (12 heads of
32 in each of 6 layers; configs/finetune_fortunes_minilm_full.yaml): `ptft export
--prune-heads K` for K = 8, 6, 4, 2 (heads scored on 1,024 training examples), then each pruned
run finetuned again for --recover steps (the recipe's learning rate, from the pruned run).

Per model, on all 792 validation fortunes: accuracy and macro F1 (as pruned, and after the
recovery finetune), parameters, checkpoint size, and predict throughput (`ptft predict`'s
model, loaded and compiled once, median of three passes after a warm-up, batches of --batch
texts). Runs live under runs/head_pruning/ (a finished one is read, not rerun). Writes
benchmarks/results/<device>/head-pruning.{md,jsonl}.

    .venv/bin/python -m benchmarks.head_pruning [RUN_DIR] [--keep 8 6 4 2] [--recover 100]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.classifier_eval import (labelled_split, macro_f1, median_s, ptft_predictor,
                                        size_mb)
from benchmarks.fmnist_transfer import REPO, final_eval, ptft
from benchmarks.results_io import write_results
from ptft_jax.ckpt.pretrained import inference_params
from ptft_jax.config.load import load_run_config
from ptft_jax.core.params import count
from ptft_jax.infer.run_export import export_run

RUNS = REPO / "runs" / "head_pruning"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/fortunes_minilm_full")
    parser.add_argument("--keep", nargs="+", type=int, default=[8, 6, 4, 2])
    parser.add_argument("--recover", type=int, default=100, help="finetuning steps after")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    run = Path(args.run_dir).resolve()
    cfg = load_run_config(run)
    texts, truth, names = labelled_split(run)
    results = []

    def measure(name: str, folder: Path, heads: int, extra: dict) -> None:
        predict = ptft_predictor(folder, args.batch)
        predicted = predict(texts).argmax(1)
        params, step_dir, _ = inference_params(folder, load_run_config(folder))
        results.append({
            "model": name, "heads_per_layer": heads, "params": count(params),
            "checkpoint_mb": size_mb(step_dir / "params"),
            "accuracy": float(np.mean(predicted == truth)),
            "macro_f1": macro_f1(predicted, truth, len(names)),
            "texts_per_s": len(texts) / median_s(lambda: predict(texts)), **extra})

    RUNS.mkdir(parents=True, exist_ok=True)
    full = RUNS / "full"
    if not full.exists():
        export_run(run, full)
    def recover(name: str, start: Path) -> Path:
        """`start` finetuned --recover more steps with the recipe (its own process)."""
        recovered = RUNS / name
        if final_eval(recovered) is None:
            ptft("finetune", REPO / "configs" / "finetune_fortunes_minilm_full.yaml",
                 [f"run_dir={recovered}", f"finetune.init_from={start}",
                  f"train.steps={args.recover}", f"optim.warmup_steps={args.recover // 10}",
                  f"eval.every={args.recover}", f"checkpoint.every={args.recover}"])
        return recovered

    heads = cfg.model.num_heads
    measure(f"unpruned ({heads} heads)", full, heads, {})
    # The baseline for the recovered rows: the same extra steps without pruning.
    measure(f"unpruned, + {args.recover} finetuning steps", recover("full_recovered", full),
            heads, {})
    for keep in args.keep:
        pruned = RUNS / f"heads_{keep}"
        if not pruned.exists():
            export_run(run, pruned, keep_heads=keep)
        measure(f"{keep} heads per layer, as pruned", pruned, keep, {})
        measure(f"{keep} heads per layer, + {args.recover} finetuning steps",
                recover(f"heads_{keep}_recovered", pruned), keep, {})
    table = ["| model | params | checkpoint MB | accuracy | macro F1 | predict texts/s |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['checkpoint_mb']:.1f} | "
              f"{r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['texts_per_s']:.1f} |"
              for r in results]
    write_results("head-pruning", results, f"Attention-head pruning of {run.name} "
                  f"({len(texts)} validation texts; predict in batches of {args.batch})",
                  table, run=str(run), examples=len(texts), batch=args.batch)


if __name__ == "__main__":
    main()
