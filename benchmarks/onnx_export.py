"""ONNX export of a finetuned text classifier: size, accuracy and predict speed beside ptft.

For one finetuned run (default: the fortunes classifier from all-MiniLM-L6-v2,
configs/finetune_fortunes_minilm_full.yaml), on its validation split: `ptft eval`'s accuracy and
macro F1 and `ptft predict`'s texts per second, beside the same run exported with `ptft export
--format onnx` in float32 and with `--quantize int8` (onnxruntime's dynamic quantization) and run
by onnxruntime, as the README's script runs it (the exported tokenizer, batches padded to their
longest text); and onnxruntime's other int8 settings on the same model (its defaults, per channel
alone, 7-bit alone), which is how `--quantize int8`'s were chosen. Same process, one after another;
predict speed is the median of three passes over the split after one warm-up pass (ptft: its second
call, after the compile). Results: benchmarks/results/<device>/onnx-export.{md,jsonl}.

    .venv/bin/python -m benchmarks.onnx_export [RUN_DIR] [--batch 32]
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

from ptft_jax.bench.report import device_slug, environment
from ptft_jax.config.load import load_run_config
from ptft_jax.data.opening import open_documents
from ptft_jax.infer.onnx_export import gemms_as_matmuls, export_onnx
from ptft_jax.infer.predict import evaluate_run, predict_run

RESULTS = Path(__file__).parent / "results"


def macro_f1(predicted: np.ndarray, truth: np.ndarray, classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = np.sum((predicted == c) & (truth == c))
        fp, fn = np.sum((predicted == c) & (truth != c)), np.sum((predicted != c) & (truth == c))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def median_s(fn, passes: int = 3) -> float:
    fn()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def onnx_predict(folder: Path, texts: list[str], batch: int) -> np.ndarray:
    import onnxruntime
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    out = []
    for i in range(0, len(texts), batch):
        rows = tokenizer.encode_batch(texts[i:i + batch])
        out.append(session.run(None, {
            name: np.array([getattr(r, field) for r in rows], np.int32) for name, field in
            (("input_ids", "ids"), ("attention_mask", "attention_mask"),
             ("token_type_ids", "type_ids"))})[0])
    return np.concatenate(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/fortunes_minilm_full")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--split", default="validation")
    args = parser.parse_args()
    run = Path(args.run_dir)
    cfg = load_run_config(run)
    documents = open_documents(cfg.data, args.split)
    texts, raw = documents.texts(0, len(documents)), documents.labels(0, len(documents))
    names = json.loads((run / "labels.json").read_text())["names"]
    truth = np.array([names.index(str(v)) for v in raw])
    rows = []

    metrics = evaluate_run(run, args.split, progress=False)
    speed = median_s(lambda: list(predict_run(run, texts, progress=False)))
    rows.append({"model": "ptft predict (JAX, float32)", "accuracy": metrics["accuracy"],
                 "macro_f1": metrics["macro_f1"], "texts_per_s": len(texts) / speed,
                 "file_mb": None})
    def measure(name: str, folder: Path, extra: dict) -> None:
        predicted = onnx_predict(folder, texts, args.batch).argmax(1)
        speed = median_s(lambda: onnx_predict(folder, texts, args.batch))
        rows.append({"model": name, "accuracy": float(np.mean(predicted == truth)),
                     "macro_f1": macro_f1(predicted, truth, len(names)),
                     "texts_per_s": len(texts) / speed,
                     "file_mb": (folder / "model.onnx").stat().st_size / 1e6, **extra})

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        meta = export_onnx(run, tmp / "float32")
        measure("onnxruntime float32", tmp / "float32",
                {"max_abs_diff_from_ptft": meta["max_abs_diff_from_ptft"]})
        meta = export_onnx(run, tmp / "int8", quantize="int8")
        measure("onnxruntime int8 (`--quantize int8`: per channel, 7-bit)", tmp / "int8",
                {"max_abs_diff_from_ptft": meta["int8_max_abs_diff_from_ptft"]})
        # The other settings of onnxruntime's dynamic quantizer, on the same folded model.
        quant_pre_process(str(tmp / "float32" / "model.onnx"), str(tmp / "folded.onnx"))
        gemms_as_matmuls(tmp / "folded.onnx")
        for name, settings in (("defaults", {}), ("per channel", {"per_channel": True}),
                               ("7-bit", {"reduce_range": True})):
            folder = tmp / name.replace(" ", "_")
            shutil.copytree(tmp / "float32", folder)
            quantize_dynamic(str(tmp / "folded.onnx"), str(folder / "model.onnx"),
                             weight_type=QuantType.QInt8, **settings)
            measure(f"onnxruntime int8, {name}", folder, {})
    env = environment()
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    out = RESULTS / device_slug(env)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "onnx-export.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "run": str(run), "split": args.split, "examples": len(texts),
                                "batch": args.batch, "time": stamp, **env}) + "\n")
    lines = [f"ONNX export of {run} ({len(texts)} {args.split} texts, batches of {args.batch}); "
             f"{env.get('machine', '')} {env.get('isa', '')}; {stamp}", "",
             "| model | accuracy | macro F1 | texts/s | file MB |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
              f"{r['texts_per_s']:.1f} | "
              f"{'-' if r['file_mb'] is None else format(r['file_mb'], '.1f')} |" for r in rows]
    (out / "onnx-export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
