"""`ptft eval`, `ptft predict`, `ptft embed` and `ptft export` as commands (cli.py parses
their arguments). Each returns the process's exit code; bad input raises ConfigError or
ValueError, which the command line prints as one line (exit code 2)."""
from __future__ import annotations

import json
import sys

import numpy as np
from pathlib import Path

from ptft_jax.config.schema import PRETRAIN_TASKS, ConfigError
from ptft_jax.core.files import check_new_folder, check_output_file
from ptft_jax.infer.embed import embed as embed_texts
from ptft_jax.infer.embed import load_encoder, write
from ptft_jax.infer.export import export_hf
from ptft_jax.infer.onnx_export import describe, export_onnx
from ptft_jax.infer.quantize import read_mode
from ptft_jax.infer.run_export import export_run
from ptft_jax.infer.predict import (evaluate_run, image_files, is_image_run,
                                    predict_images, predict_pairs, predict_run, read_inputs,
                                    run_task, write_jsonl)


def evaluate(args) -> int:
    result = evaluate_run(args.run_dir, args.split, args.corpus, args.batch_size,
                          progress=sys.stderr.isatty())
    confusion = result.pop("confusion", None)
    try:
        text = json.dumps(result, indent=1, allow_nan=False)  # NaN is not JSON
    except ValueError:
        bad = sorted(k for k, v in result.items() if isinstance(v, float) and not np.isfinite(v))
        raise ValueError(f"{args.run_dir}: the evaluation gave non-finite {', '.join(bad)}: the "
                         f"checkpoint's weights are not finite numbers, from a run that "
                         f"diverged. Evaluate an earlier checkpoint or retrain with a lower "
                         f"learning rate.") from None
    print(text)
    if confusion is not None:
        print("confusion matrix (rows: true, columns: predicted)", file=sys.stderr)
        for row in confusion:
            print("  " + " ".join(f"{int(v):5d}" for v in row), file=sys.stderr)
    return 0


def export(args) -> int:
    check_new_folder(Path(args.out_dir), "OUT_DIR")  # before the run is read
    if args.prune_heads is not None and args.format != "ptft":
        raise ConfigError(f"--prune-heads writes a ptft run (--format ptft); export that run "
                          f"with --format {args.format} afterwards.")
    if args.quantize and args.format == "hf":
        raise ConfigError(f"--quantize {args.quantize} writes a ptft run (--format ptft, Qwix) "
                          f"or an ONNX model (--format onnx); transformers reads float weights: "
                          f"leave --quantize out for --format hf.")
    if args.format != "ptft" and read_mode(args.run_dir) is not None:
        raise ConfigError(f"{args.run_dir} is a quantized run (ptft export --quantize): "
                          f"--format {args.format} exports float weights; export the float run "
                          f"it came from.")
    if args.format == "onnx":
        print(describe(export_onnx(args.run_dir, args.out_dir, args.quantize)))
        return 0
    if args.format == "hf":
        result = export_hf(args.run_dir, args.out_dir)
        print(f"exported {result['source']} to {result['out_dir']} as {result['architecture']}: "
              f"{result['tensors']} tensors, {result['parameters']:,} parameters"
              + (" (LoRA adapters merged)" if result["lora_merged"] else ""))
        return 0
    if run_task(args.run_dir) in PRETRAIN_TASKS:
        raise ConfigError(f"{args.run_dir} is a pretraining run ({run_task(args.run_dir)}): "
                          f"--format ptft exports finetuned runs. A pretraining run is read as "
                          f"it is by finetune.init_from={args.run_dir}; --format hf exports it "
                          f"for transformers.")
    result = export_run(args.run_dir, args.out_dir, args.quantize, args.prune_heads)
    q, heads = result["quantization"], result["head_pruning"]
    print(f"exported {result['source']} to {result['out_dir']}: {result['parameters']:,} "
          f"parameters" + (" (LoRA adapters merged)" if result["lora_merged"] else "") + (
              f"; {q['mode']} with {q['library']}: {q['float_bytes'] / 1e6:.1f} -> "
              f"{q['quantized_bytes'] / 1e6:.1f} MB of weights" if q else "") + (
              f"; attention heads pruned to {heads['heads_per_layer']} of {heads['of']} per "
              f"layer (scored on {heads['scored_on_examples']} training examples)"
              if heads else ""))
    return 0


def check_output(args) -> None:
    """--output: a file that may be written, checked before any work (core/files.py)."""
    if args.output not in (None, "-"):
        check_output_file(args.output, "--output", [args.input], args.overwrite)


EMBED_SUFFIXES = (".npy", ".jsonl", ".json")  # what `embed -o` writes: an array, or JSON lines


def embed(args) -> int:
    check_output(args)
    if args.output not in (None, "-") and Path(args.output).suffix not in EMBED_SUFFIXES:
        raise ConfigError(f"--output {args.output}: ptft embed writes a NumPy array (.npy) or "
                          f"JSON lines (.jsonl); give a file name ending in one of them.")
    if (args.seq_len is not None and args.seq_len < 3) or args.batch_size < 1:
        raise ValueError("--seq-len must be at least 3 and --batch-size at least 1.")
    texts, _ = read_inputs(args.input)
    encoder = load_encoder(args.source)
    if args.pooling == "cls" and encoder.cfg.kind == "decoder":
        raise ConfigError("--pooling cls on a decoder: its first token sees only itself (causal "
                          "attention), so it embeds nothing of the text; use --pooling last or "
                          "mean.")
    vectors = embed_texts(encoder, texts, args.pooling, args.seq_len, args.batch_size,
                          progress=sys.stderr.isatty())
    write(vectors, texts, args.output)
    print(f"embedded {len(texts)} text(s) with {encoder.description}: {vectors.shape[1]} dims, "
          f"{args.pooling or encoder.pooling} pooling"
          + (f", into {args.output}" if args.output else ""), file=sys.stderr)
    return 0


def predict(args) -> int:
    check_output(args)
    progress = sys.stderr.isatty()
    if run_task(args.run_dir) in ("contrastive", "multimodal_classification"):
        rows = predict_pairs(args.run_dir, args.input, args.batch_size, progress=progress)
    elif is_image_run(args.run_dir):
        rows = predict_images(args.run_dir, image_files(args.input), args.batch_size,
                              progress=progress)
    else:
        texts, pairs = read_inputs(args.input)
        rows = predict_run(args.run_dir, texts, pairs, args.batch_size, progress=progress)
    n = write_jsonl(rows, args.output)
    print(f"predicted {n} example(s)" + (f" into {args.output}" if args.output else ""),
          file=sys.stderr)
    return 0

