"""int8 quantization of a finetuned text classifier: size, accuracy and predict speed.

For one finetuned run (default: the fortunes classifier from all-MiniLM-L6-v2,
configs/finetune_fortunes_minilm_full.yaml), on its validation split, accuracy, macro F1, texts
per second and size of:
- the run exported as a float32 ptft run (`ptft export`) and as Qwix's int8 models (`ptft export
  --quantize int8`, weights and activations; `--quantize int8-weights`), read by `ptft eval` and
  run as `ptft predict` runs them (packed rows, batches of `--batch` texts);
- the run exported to ONNX (`ptft export --format onnx`) in float32 and with `--quantize int8`
  (onnxruntime's dynamic quantization), run by onnxruntime as the README's script runs it (the
  exported tokenizer, batches padded to their longest text); and onnxruntime's other int8
  settings on the same model (its defaults, per channel alone, 7-bit alone), which is how
  `--quantize int8`'s were chosen.
Same process, one after another. Speed: each model loaded (and compiled) once, then the median
of three passes over the split after one warm-up pass. Size: the checkpoint's params on disk, or
model.onnx. Results: benchmarks/results/<device>/quantization.{md,jsonl}.

    .venv/bin/python -m benchmarks.quantization [RUN_DIR] [--batch 32]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

from benchmarks.classifier_eval import (labelled_split, macro_f1, median_s, ptft_predictor,
                                        size_mb)
from benchmarks.results_io import write_results
from ptft_jax.infer.onnx_export import as_matmuls, export_onnx
from ptft_jax.infer.predict import evaluate_run
from ptft_jax.infer.run_export import export_run


def onnx_predictor(folder: Path, batch: int):
    """The README script's model, loaded once: texts -> probabilities."""
    import onnxruntime
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"),
                                           providers=["CPUExecutionProvider"])

    def predict(texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch):
            rows = tokenizer.encode_batch(texts[i:i + batch])
            out.append(session.run(None, {
                name: np.array([getattr(r, field) for r in rows], np.int32) for name, field in
                (("input_ids", "ids"), ("attention_mask", "attention_mask"),
                 ("token_type_ids", "type_ids"))})[0])
        return np.concatenate(out)
    return predict


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/fortunes_minilm_full")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--split", default="validation")
    args = parser.parse_args()
    run = Path(args.run_dir)
    texts, truth, names = labelled_split(run, args.split)
    rows = []

    def measure(name: str, predict, file_mb: float, extra: dict) -> None:
        predicted = predict(texts).argmax(1)
        speed = median_s(lambda: predict(texts))
        rows.append({"model": name, "accuracy": float(np.mean(predicted == truth)),
                     "macro_f1": macro_f1(predicted, truth, len(names)),
                     "texts_per_s": len(texts) / speed, "file_mb": file_mb, **extra})

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for mode, name in ((None, "ptft float32 (`ptft export`)"),
                           ("int8", "ptft Qwix int8 (`--quantize int8`)"),
                           ("int8-weights", "ptft Qwix int8 weights only (`--quantize "
                                            "int8-weights`)")):
            folder = tmp / f"ptft-{mode or 'float32'}"
            export_run(run, folder, mode)
            metrics = evaluate_run(folder, args.split, progress=False)
            measure(name, ptft_predictor(folder, args.batch), size_mb(folder / "checkpoints"),
                    {"eval_accuracy": metrics["accuracy"], "eval_macro_f1": metrics["macro_f1"]})
        meta = export_onnx(run, tmp / "float32")
        measure("onnxruntime float32", onnx_predictor(tmp / "float32", args.batch),
                size_mb(tmp / "float32" / "model.onnx"),
                {"max_abs_diff_from_ptft": meta["max_abs_diff_from_ptft"]})
        meta = export_onnx(run, tmp / "int8", quantize="int8")
        measure("onnxruntime int8 (`--format onnx --quantize int8`: per channel, 7-bit)",
                onnx_predictor(tmp / "int8", args.batch), size_mb(tmp / "int8" / "model.onnx"),
                {"max_abs_diff_from_ptft": meta["int8_max_abs_diff_from_ptft"]})
        # The other settings of onnxruntime's dynamic quantizer, on the same folded model.
        quant_pre_process(str(tmp / "float32" / "model.onnx"), str(tmp / "folded.onnx"))
        as_matmuls(tmp / "folded.onnx")
        for name, settings in (("defaults", {}), ("per channel", {"per_channel": True}),
                               ("7-bit", {"reduce_range": True})):
            folder = tmp / name.replace(" ", "_")
            shutil.copytree(tmp / "float32", folder)
            quantize_dynamic(str(tmp / "folded.onnx"), str(folder / "model.onnx"),
                             weight_type=QuantType.QInt8, **settings)
            measure(f"onnxruntime int8, {name}", onnx_predictor(folder, args.batch),
                    size_mb(folder / "model.onnx"), {})
    table = ["| model | accuracy | macro F1 | texts/s | file MB |", "|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
              f"{r['texts_per_s']:.1f} | {r['file_mb']:.1f} |" for r in rows]
    write_results("quantization", rows, f"int8 quantization of {run} ({len(texts)} "
                  f"{args.split} texts, batches of {args.batch})", table, run=str(run),
                  split=args.split, examples=len(texts), batch=args.batch)


if __name__ == "__main__":
    main()
