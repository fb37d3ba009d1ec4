"""What the classifier benchmarks share (quantization, distillation, head pruning): the
validation texts and their label ids, `ptft predict`'s model loaded once, macro F1, a median
time, sizes on disk."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ptft_jax.config.load import load_run_config
from ptft_jax.data.labelled import predict_examples
from ptft_jax.data.opening import open_documents
from ptft_jax.data.tokenizer import load_tokenizer
from ptft_jax.infer.predict import load_run, packed_for_inference
from ptft_jax.train.evaluate import predict_outputs

def labelled_split(run: Path, split: str = "validation") -> tuple[list[str], np.ndarray, list]:
    """(texts, label ids in the run's labels.json order, label names) of the run's data."""
    documents = open_documents(load_run_config(run).data, split)
    texts, raw = documents.texts(0, len(documents)), documents.labels(0, len(documents))
    names = json.loads((run / "labels.json").read_text())["names"]
    return texts, np.array([names.index(str(v)) for v in raw]), names


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


def ptft_predictor(run: Path, batch: int):
    """`ptft predict`'s model, loaded and compiled once: texts -> probabilities."""
    engine, state, cfg, _ = load_run(run, batch)
    tokenizer = load_tokenizer(run / "tokenizer.json")

    def predict(texts: list[str]) -> np.ndarray:
        packed, rows = packed_for_inference(
            predict_examples(texts, tokenizer, cfg.data.seq_len, cfg.model.kind), cfg)
        return packed.in_input_order(predict_outputs(engine, state, packed, rows))
    return predict


def size_mb(path: Path) -> float:
    """A file's size, or a folder's files' together."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6
