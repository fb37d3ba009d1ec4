"""`ptft`: the command line.

    ptft pretrain --config configs/pretrain_tiny_mlm.yaml [key.sub=value ...]
    ptft finetune --config configs/finetune_fortunes_full.yaml [key.sub=value ...]
    ptft eval RUN_DIR [--split NAME] [--corpus PATH]
    ptft predict RUN_DIR [--input FILE] [--output FILE]
    ptft export RUN_DIR OUT_DIR [--format ptft|hf]   (LoRA adapters merged into the weights)
    ptft embed SOURCE [--input FILE] [--output FILE.npy|.jsonl] [--pooling mean|cls]
    ptft tokenizer train --config FILE [key.sub=value ...] [--out PATH] [--force]
    ptft data prepare --config FILE [key.sub=value ...] [--overwrite]
    ptft checkpoints verify RUN_DIR   (every step's checksums; exit 1 if one is damaged)
    ptft bench --set cpu [--cases NAME ...] [--steps N] [--profile]
    ptft experiment pretrain-vs-end-to-end --config FILE
    ptft sweep --config FILE --space SPACE.yaml [key.sub=value ...] [--trials N] [--sampler ...]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ptft_jax.config.load import load_config
from ptft_jax.config.schema import ConfigError

# Each command imports what it runs inside its own function, so that `ptft --help` and a
# mistyped argument answer at once, without loading JAX (seconds of start-up).


def _train(args) -> int:
    from ptft_jax.ckpt.checkpoint import CheckpointMismatch, CheckpointSaveFailed
    from ptft_jax.jobs.entry import finetune, pretrain
    cfg = load_config(args.config, args.overrides)
    try:
        summary = (pretrain if args.command == "pretrain" else finetune)(cfg)
    except (ConfigError, CheckpointMismatch, ValueError) as e:
        print(f"ptft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except CheckpointSaveFailed as e:
        print(f"ptft {args.command}: error: {e}", file=sys.stderr)
        return 4
    if summary.get("stopped_by_signal"):
        return 130
    if summary.get("diverged"):
        kept = summary["last_saved_step"]
        print(f"ptft {args.command}: error: {summary['stop_reason']}; "
              + (f"the last checkpoint, step {kept}, is intact." if kept else
                 "no checkpoint was saved."), file=sys.stderr)
        return 3
    line = (f"done: {summary['steps']} steps in {summary['run_dir']} | "
            f"loss {summary.get('loss', float('nan')):.4f} | "
            f"step {summary.get('step_time_s', float('nan')) * 1e3:.1f} ms | "
            + (f"{summary['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in summary else
               f"{summary.get('examples_per_s', 0):,.0f} examples/s"))
    if "mfu" in summary:
        line += f" | MFU {summary['mfu']:.1%}" + (
            " (above 100%: the measured ceiling was too low)"
            if summary.get("mfu_ceiling_too_low") else "")
    if summary.get("metric"):
        line += (f" | eval {summary['metric']} {summary.get('eval/' + summary['metric'], 0):.4f}"
                 f" (best {summary['best']:.4f} at step {summary['best_step']})")
    print(line)
    return 0


def _eval(args) -> int:
    import json

    from ptft_jax.infer.predict import evaluate_run
    result = evaluate_run(args.run_dir, args.split, args.corpus, args.batch_size,
                          progress=sys.stderr.isatty())
    confusion = result.pop("confusion", None)
    print(json.dumps(result, indent=1))
    if confusion is not None:
        print("confusion matrix (rows: true, columns: predicted)", file=sys.stderr)
        for row in confusion:
            print("  " + " ".join(f"{int(v):5d}" for v in row), file=sys.stderr)
    return 0


def _export(args) -> int:
    if args.format == "hf":
        from ptft_jax.infer.export import export_hf
        result = export_hf(args.run_dir, args.out_dir)
        print(f"exported {result['source']} to {result['out_dir']} as {result['architecture']}: "
              f"{result['tensors']} tensors, {result['parameters']:,} parameters"
              + (" (LoRA adapters merged)" if result["lora_merged"] else ""))
        return 0
    from ptft_jax.infer.predict import export_run
    result = export_run(args.run_dir, args.out_dir)
    print(f"exported {result['source']} to {result['out_dir']}: {result['parameters']:,} "
          f"parameters" + (" (LoRA adapters merged)" if result["lora_merged"] else ""))
    return 0


def _embed(args) -> int:
    from pathlib import Path

    from ptft_jax.infer.embed import embed, load_encoder, write
    from ptft_jax.infer.predict import read_inputs
    if args.output and args.output != "-" and not Path(args.output).parent.is_dir():
        return _error("embed", f"--output {args.output}: folder {Path(args.output).parent} "
                               f"does not exist.")
    if args.seq_len < 3 or args.batch_size < 1:
        return _error("embed", "--seq-len must be at least 3 and --batch-size at least 1.")
    texts, _ = read_inputs(args.input)
    encoder = load_encoder(args.source)
    vectors = embed(encoder, texts, args.pooling, args.seq_len, args.batch_size,
                    progress=sys.stderr.isatty())
    write(vectors, texts, args.output)
    print(f"embedded {len(texts)} text(s) with {encoder.description}: {vectors.shape[1]} dims, "
          f"{args.pooling or encoder.pooling} pooling"
          + (f", into {args.output}" if args.output else ""), file=sys.stderr)
    return 0


def _predict(args) -> int:
    from ptft_jax.infer.predict import (image_files, is_image_run, predict_images, predict_pairs,
                                        predict_run, read_inputs, run_task, write_jsonl)
    if run_task(args.run_dir) in ("contrastive", "multimodal_classification"):
        rows = predict_pairs(args.run_dir, args.input, args.batch_size,
                             progress=sys.stderr.isatty())
    elif is_image_run(args.run_dir):
        rows = predict_images(args.run_dir, image_files(args.input), args.batch_size,
                              progress=sys.stderr.isatty())
    else:
        texts, pairs = read_inputs(args.input)
        rows = predict_run(args.run_dir, texts, pairs, args.batch_size,
                           progress=sys.stderr.isatty())
    n = write_jsonl(rows, args.output)
    print(f"predicted {n} example(s)" + (f" into {args.output}" if args.output else ""),
          file=sys.stderr)
    return 0


def _checkpoints_verify(args) -> int:
    from pathlib import Path

    from ptft_jax.ckpt.integrity import verify_run
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        return _error("checkpoints", f"{run_dir} is not a folder; give a ptft run directory.")
    rows = verify_run(run_dir)
    if not rows:
        return _error("checkpoints", f"{run_dir} holds no checkpoint (no checkpoints/ or best/ "
                                     f"step folders).")
    print(f"{'folder':<20} {'step':>8} {'arrays':>7} {'MB':>9}  status")
    for r in rows:
        print(f"{r['folder']:<20} {r['step']:>8} {r['arrays']:>7} {r['bytes'] / 1e6:>9.2f}  "
              f"{r['status']}")
    count = {kind: sum(r["status"].startswith(kind) for r in rows)
             for kind in ("ok", "DAMAGED", "moved aside")}
    print(f"{count['ok']} step(s) intact, {count['DAMAGED']} damaged, {count['moved aside']} "
          f"moved aside earlier"
          + (". A resume moves damaged steps to checkpoints_damaged/ and falls back to the "
             "newest intact one." if count["DAMAGED"] else "."))
    return 1 if count["DAMAGED"] else 0


def _tokenizer_train(args) -> int:
    from ptft_jax.data.commands import tokenizer_train
    return tokenizer_train(args)


def _data_prepare(args) -> int:
    from ptft_jax.data.commands import data_prepare
    return data_prepare(args)


def _error(command: str, message) -> int:
    print(f"ptft {command}: error: {message}", file=sys.stderr)
    return 2


def _bench(args) -> int:
    if args.steps < 1 or args.warmup < 0 or (args.torch_steps is not None and
                                             args.torch_steps < 1):
        return _error("bench", "--steps and --torch-steps must be at least 1, --warmup at "
                               "least 0.")
    if args.fake_cpu_devices:  # must happen before JAX initialises
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count="
                                   f"{args.fake_cpu_devices}").strip()
    from pathlib import Path

    from ptft_jax.bench import benchmark, report
    cases = Path(args.cases_file) if args.cases_file else benchmark.DEFAULT_CASES
    out = Path(args.out) if args.out else report.default_results_dir()
    if args.pipeline:
        from ptft_jax.bench import pipeline as bench_pipeline
        bench_pipeline.run_pipeline(args.cases or [], cases, out)
        return 0
    if args.finetune:
        from ptft_jax.bench import finetune as bench_finetune
        bench_finetune.run(args.cases or [], cases, out, args.steps,
                           args.warmup, with_torch=not args.no_torch)
        return 0
    benchmark.run(args.cases or [], args.set or [], args.steps, args.warmup, args.profile,
                  cases, out, torch_steps=args.torch_steps,
                  with_torch=not args.no_torch)
    return 0


def _experiment(args) -> int:
    from ptft_jax.studies import experiment
    rows = experiment.run(args.config)
    print(f"experiment done: {len(rows)} run(s); table, plot and JSONL in "
          f"{experiment.load_experiment(args.config).dir}")
    return 0


def _sweep(args) -> int:
    import dataclasses

    from ptft_jax.studies.sweep.space import load_space
    from ptft_jax.studies.sweep.study import SweepOptions, prepare, resolve_options
    from ptft_jax.studies.sweep.trials import run_sweep
    cli = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(SweepOptions)}
    _, from_space = load_space(args.space)
    sweep = prepare(resolve_options(cli, from_space))
    report = run_sweep(sweep)
    best = (f"best: trial {report['best_trial']}, {sweep.metric} {report['best_value']:.4g} "
            f"(config: {report['dir']}/best_config.yaml)" if report["best_trial"] is not None
            else "no trial completed")
    print(f"sweep {'interrupted' if report['interrupted'] else 'done'}: {report['trials']} "
          f"trial(s); {best}; table and plots in {report['dir']}/trials.md")
    return 130 if report["interrupted"] else 0


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config file and `key.sub=value` overrides every config-driven command takes."""
    parser.add_argument("--config", "-c", help="a YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*",
                        help="key.sub=value overrides, e.g. train.steps=100")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pretrain a language model (MLM or causal LM)")
    _config_arguments(p)
    p.set_defaults(func=_train)
    f = sub.add_parser("finetune", help="finetune a (pretrained) component on labelled data: "
                                        "classification, multi-label, regression")
    _config_arguments(f)
    f.set_defaults(func=_train)
    e = sub.add_parser("eval", help="evaluate a finetuned run directory on a split")
    e.add_argument("run_dir")
    e.add_argument("--split", help="the split to evaluate (default: data.eval_split)")
    e.add_argument("--corpus", help="another corpus (e.g. local files) holding the split")
    e.add_argument("--batch-size", type=int, help="examples per batch (default: eval.batch_size)")
    e.set_defaults(func=_eval)
    pr = sub.add_parser("predict", help="predict labels for texts with a finetuned run "
                                        "directory; JSONL out")
    pr.add_argument("run_dir")
    pr.add_argument("--input", "-i", help="a text file (one text per line) or .jsonl with "
                                          "'text' (and 'text_pair'); default: stdin. For an "
                                          "image run: an image, a folder of images, or a "
                                          "file listing image paths. For an image-text run: "
                                          "a .jsonl / .csv with 'image' and 'text'")
    pr.add_argument("--output", "-o", help="where to write JSONL (default: stdout)")
    pr.add_argument("--batch-size", type=int, help="examples per batch (default: "
                                                   "eval.batch_size)")
    pr.set_defaults(func=_predict)
    em = sub.add_parser("embed", help="L2-normalised sentence embeddings of texts, from a "
                                      "ptft run or a Hugging Face model directory")
    em.add_argument("source", help="a ptft run directory, a Hugging Face model directory, or "
                                   "hf:OWNER/NAME")
    em.add_argument("--input", "-i", help="a text file (one text per line) or .jsonl with "
                                          "'text'; default: stdin")
    em.add_argument("--output", "-o", help="FILE.npy (an array, one row per text) or a JSONL "
                                           "file; default: JSONL on stdout")
    em.add_argument("--pooling", choices=("mean", "cls", "last"),
                    help="default: the model's own (sentence-transformers' 1_Pooling), else "
                         "mean for encoders and last for decoders")
    em.add_argument("--seq-len", type=int, default=256, help="tokens per text, at most the "
                                                             "model's max_len (default 256)")
    em.add_argument("--batch-size", type=int, default=64, help="texts per batch (default 64)")
    em.set_defaults(func=_embed)
    ex = sub.add_parser("export", help="a run as a params-only run directory (--format ptft) "
                                       "or a Hugging Face model directory (--format hf), LoRA "
                                       "adapters merged into the weights")
    ex.add_argument("run_dir")
    ex.add_argument("out_dir")
    ex.add_argument("--format", choices=("ptft", "hf"), default="ptft",
                    help="ptft: a finetuned run for ptft eval / predict / init_from; hf: "
                         "config.json + model.safetensors + tokenizer files for transformers")
    ex.set_defaults(func=_export)
    t = sub.add_parser("tokenizer", help="tokenizer tools")
    t_sub = t.add_subparsers(dest="action", required=True)
    tt = t_sub.add_parser("train", help="train a tokenizer on data.corpus: WordPiece for "
                                        "encoders, byte-level BPE for decoders")
    _config_arguments(tt)
    tt.add_argument("--out", help="where to save tokenizer.json (default: <run_dir>/"
                                  "tokenizer.json, where pretraining looks)")
    tt.add_argument("--force", action="store_true", help="replace an existing file")
    tt.set_defaults(func=_tokenizer_train)
    d = sub.add_parser("data", help="data tools")
    d_sub = d.add_subparsers(dest="action", required=True)
    dp = d_sub.add_parser("prepare", help="tokenize data.corpus once into the cache at "
                                          "data.cache_dir (resumes when interrupted)")
    _config_arguments(dp)
    dp.add_argument("--overwrite", action="store_true",
                    help="replace a cache built from another tokenizer or source (it stays "
                         "usable until the new one is complete)")
    dp.add_argument("--shard-docs", type=int, default=10_000,
                    help="documents per resumable shard (default 10000)")
    dp.set_defaults(func=_data_prepare)
    c = sub.add_parser("checkpoints", help="checkpoint tools")
    c_sub = c.add_subparsers(dest="action", required=True)
    cv = c_sub.add_parser("verify", help="read every checkpoint step of a run directory and "
                                         "check each array's checksum; prints a table")
    cv.add_argument("run_dir")
    cv.set_defaults(func=_checkpoints_verify)
    b = sub.add_parser("bench", help="benchmark step time, throughput, MFU, compile time and "
                                     "memory, beside a PyTorch reference")
    b.add_argument("--set", action="append", help="a set of cases in the cases file "
                                                  "(cpu, memory, accelerator); repeatable")
    b.add_argument("--cases", nargs="+", help="case names to run")
    b.add_argument("--steps", type=int, default=20, help="timed steps per case (default 20)")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    b.add_argument("--torch-steps", type=int, help="timed steps for PyTorch (default --steps)")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    b.add_argument("--profile", action="store_true", help="write a jax.profiler trace per case")
    b.add_argument("--pipeline", action="store_true",
                   help="benchmark the input pipeline alone (the cases file's pipeline list)")
    b.add_argument("--finetune", action="store_true",
                   help="benchmark finetuning strategies (the cases file's finetune list)")
    b.add_argument("--fake-cpu-devices", type=int, default=0,
                   help="on a CPU, fake this many devices (for the memory set: 8)")
    b.add_argument("--cases-file", help="a cases YAML (default: the one that ships with ptft, "
                                        "ptft_jax/bench/cases.yaml)")
    b.add_argument("--out", help="results folder, one subfolder per device (default: "
                                 "benchmarks/results in a source checkout, else under the "
                                 "working directory)")
    b.set_defaults(func=_bench)
    x = sub.add_parser("experiment", help="experiments that train several runs and compare "
                                          "them")
    x.add_argument("name", choices=["pretrain-vs-end-to-end"],
                   help="pretrain-vs-end-to-end: pretrain the towers apart, align them, or "
                        "train the fused model end to end, under equal training FLOPs")
    x.add_argument("--config", "-c", required=True, help="an experiment config (see "
                                                         "configs/experiment_emoji.yaml)")
    x.set_defaults(func=_experiment)
    sw = sub.add_parser("sweep", help="hyperparameter search over any config keys (grid, "
                                      "random or TPE; pruning; a study several processes "
                                      "and hosts share); every trial is a run directory")
    sw.add_argument("--config", "-c", required=True, help="the config every trial starts from")
    sw.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config, "
                                                 "e.g. train.steps=300")
    sw.add_argument("--space", "-s", required=True,
                    help="a YAML of config keys to choices or ranges (see "
                         "configs/sweep_fortunes_space.yaml); a sweep: section may set the "
                         "options below")
    sw.add_argument("--trials", type=int, help="complete + pruned trials to run (default: "
                                               "the grid's size, else 20)")
    sw.add_argument("--sampler", choices=("grid", "random", "tpe"),
                    help="default tpe (Bayesian)")
    sw.add_argument("--metric", help="the validation metric to optimise (default: the task's "
                                     "eval.metric, e.g. macro_f1)")
    sw.add_argument("--direction", choices=("maximize", "minimize"),
                    help="default: the metric's (loss: minimize, the rest: maximize)")
    sw.add_argument("--pruner", choices=("median", "halving", "none"),
                    help="stop unpromising trials at an evaluation (default median)")
    sw.add_argument("--storage", help="SQLAlchemy URL of the study (default: sqlite:///"
                                      "<dir>/study.db); hosts that share it share the sweep")
    sw.add_argument("--study-name", dest="study_name", help="default: the config's file stem")
    sw.add_argument("--dir", help="where trials and the report go (default runs/sweep_<stem>)")
    sw.add_argument("--workers", type=int, help="trial processes on this machine, each with "
                                                "its own devices (GPUs: one each)")
    sw.add_argument("--seed", type=int, help="the sampler's seed (default 0)")
    sw.set_defaults(func=_sweep)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"ptft {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad input found while reading data or checkpoints
        print(f"ptft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
