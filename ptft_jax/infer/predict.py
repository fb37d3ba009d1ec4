"""`ptft eval` and `ptft predict`: a finetuned run directory, loaded for inference.

A run directory holds what inference needs: config.yaml, tokenizer.json, labels.json and
checkpoints (best/ from evaluation, else the latest of checkpoints/). Parameters are restored
alone (no optimizer state) onto all local devices; eval and predict are batched and jitted.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Iterator

import jax
import numpy as np

from ptft_jax.ckpt.checkpoint import Checkpointer, CheckpointMismatch
from ptft_jax.ckpt.pretrained import first_intact
from ptft_jax.config.load import load_run_config
from ptft_jax.config.reading import read_jsonl, read_text
from ptft_jax.config.schema import (FINETUNE_TASKS, IMAGE_TASKS, MULTIMODAL_TASKS, ConfigError,
                                    MeshConfig)
from ptft_jax.config.resolve import resolve_mesh_shape, row_slots, task_for
from ptft_jax.config.validate import validate
from ptft_jax.core.files import writing_text
from ptft_jax.core.mesh import data_parallel_size
from ptft_jax.data.image_io import BadImage, decode
from ptft_jax.data.image_sources import IMAGE_SUFFIXES
from ptft_jax.data.images import ImageExamples, convert
from ptft_jax.data.labelled import LabelSpace, open_examples, predict_examples
from ptft_jax.data.opening import eval_split_of
from ptft_jax.data.packed_examples import PackedExamples
from ptft_jax.data.pairs import FilePairs, PairExamples
from ptft_jax.data.tokenizer import load_tokenizer
from ptft_jax.infer.quantize import quantized_engine, read_mode
from ptft_jax.jobs.images import image_split
from ptft_jax.jobs.pairs import pairs_split
from ptft_jax.tasks.factory import make_task
from ptft_jax.train.engine import build
from ptft_jax.train.evaluate import evaluate, predict_outputs


def load_run(run_dir: str | Path, batch_size: int | None = None):
    """(engine, state, cfg) of a finetuned run: its best checkpoint if it has one."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a ptft run directory (no config.yaml); give the "
                          f"run_dir of a ptft finetune run.")
    cfg = load_run_config(run_dir)
    kind = task_for(cfg)
    has_labels = (run_dir / "labels.json").is_file()
    if kind not in FINETUNE_TASKS + IMAGE_TASKS + MULTIMODAL_TASKS:
        raise ConfigError(f"{run_dir} was trained with train.task={task_for(cfg)}: it has no "
                          f"finetuned head to predict with. Give the run_dir of a ptft finetune "
                          f"run (one with labels.json).")
    # A finetuned run keeps what its head means and how it reads text beside its checkpoints.
    needed = [name for name, missing in (
        ("labels.json", kind != "contrastive" and not has_labels),
        ("tokenizer.json", kind not in IMAGE_TASKS and not (run_dir / "tokenizer.json").is_file()))
        if missing]
    if needed:
        raise ConfigError(f"{run_dir / needed[0]} is missing: the run wrote it when it started "
                          f"and reads it to predict. Restore it (from a copy of the run, or by "
                          f"running its training command again into a new run_dir).")
    if batch_size is not None:
        cfg.eval.batch_size = batch_size
    try:
        resolve_mesh_shape(cfg.mesh, jax.device_count())
    except ConfigError:  # trained on another number of devices: shard the rows over these
        cfg.mesh = MeshConfig(parallelism=cfg.mesh.parallelism)
    validate(cfg, jax.device_count())
    labels = LabelSpace.load(run_dir / "labels.json") if has_labels else None
    tokenizer_path = run_dir / "tokenizer.json"  # image runs have none
    task = make_task(cfg, labels, load_tokenizer(tokenizer_path)
                     if tokenizer_path.is_file() else None)
    engine = build(cfg, task)
    target = engine.restore_target()
    mode, unpack = read_mode(run_dir), None
    if mode is not None:  # exported with --quantize: Qwix's int8 model (infer/quantize.py)
        engine, params_target, unpack = quantized_engine(engine, mode)
        target = target.replace(params=params_target)

    def restore(step_dir: Path):
        ckpt = Checkpointer(step_dir.parent, async_save=False, read_only=True)
        try:
            return ckpt.restore(int(step_dir.name), target, params_only=True)[0]
        finally:
            ckpt.close()
    try:
        state, step_dir = first_intact(run_dir, restore, labels.names if labels else None)
    except ValueError as e:
        if isinstance(e, CheckpointMismatch):
            raise
        raise ConfigError(str(e)) from None
    source = f"{step_dir.parent} (step {step_dir.name})"
    if unpack is not None:
        state = state.replace(params=unpack(state.params))
    return engine, engine.place(state), cfg, source


def checkpoint_step(source: str) -> int:
    """The step of load_run's `source` ('DIR (step N)')."""
    return int(source.rsplit("step ", 1)[1].rstrip(")"))


def evaluate_run(run_dir, split: str | None = None, corpus: str | None = None,
                 batch_size: int | None = None, progress: bool = True) -> dict:
    engine, state, cfg, source = load_run(run_dir, batch_size)
    # Local files (--corpus, or the run's data.eval_corpus) are one split, whatever the
    # config's eval_split says.
    split = split or eval_split_of(dataclasses.replace(
        cfg.data, eval_corpus=corpus or cfg.data.eval_corpus))
    cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(run_dir) / "data_cache"
    try:
        if task_for(cfg) in MULTIMODAL_TASKS:
            examples, _ = pairs_split(cfg, Path(run_dir), split, corpus or cfg.data.eval_corpus,
                                      engine.task.tokenizer, engine.task.labels,
                                      0)
        elif task_for(cfg) in IMAGE_TASKS:
            examples, _ = image_split(cfg, Path(run_dir), split,
                                      corpus or cfg.data.eval_corpus, engine.task.labels, 0)
        else:
            examples, _ = open_examples(cfg.data, split, Path(run_dir) / "tokenizer.json",
                                        cache_root, engine.task.labels.kind,
                                        engine.task.labels, cfg.model.kind, progress=progress,
                                        corpus=corpus or cfg.data.eval_corpus)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    batch_size = cfg.eval.batch_size
    if task_for(cfg) in FINETUNE_TASKS:  # text: packed rows, the padded rows' metrics
        examples, batch_size = packed_for_inference(examples, cfg)
    metrics = evaluate(engine, state, examples, batch_size, progress=progress)
    n_examples = len(examples.examples) if isinstance(examples, PackedExamples) else \
        len(examples)
    return {"run_dir": str(run_dir), "checkpoint": source, "split": split,
            "examples": n_examples, **metrics}


def packed_for_inference(examples, cfg):
    """(the examples packed several to a row, eval.batch_size in rows): inference on short
    texts computes no padding it can avoid (data/packed_examples.py), whatever the run
    trained on; one compiled shape for every batch."""
    packed = PackedExamples(examples, row_slots(cfg.data.examples_per_row, cfg.data.seq_len),
                            None)
    return packed, packed.rows_holding(cfg.eval.batch_size, data_parallel_size(cfg))


def read_inputs(path: str | None) -> tuple[list[str], list[str] | None]:
    """Texts to predict: one per line of a text file or stdin ('-' or None), or the `text`
    (and `text_pair`) fields of a .jsonl file."""
    import sys
    if path in (None, "-"):
        lines, where = sys.stdin.read().splitlines(), "stdin"
    else:
        if Path(path).suffix.lower() == ".jsonl":
            return _jsonl_inputs(path)
        if Path(path).suffix.lower() == ".csv":
            return _csv_inputs(path)
        lines, where = read_text(path, "the --input file").splitlines(), path
    texts = [line.strip() for line in lines]
    while texts and not texts[-1]:
        texts.pop()  # trailing empty lines shift nothing
    if not texts:
        raise ConfigError(f"No text in {where}: give one text per line (or a .jsonl / .csv "
                          f"with a 'text' field).")
    if "" in texts:  # outputs are one per input line: an empty one would shift the rest
        raise ConfigError(f"{where}: line {texts.index('') + 1} is empty; outputs are written "
                          f"one per input line, in order: remove it (or give a .jsonl).")
    return texts, None


def _csv_inputs(path: str) -> tuple[list[str], list[str] | None]:
    """The `text` (and `text_pair`) column of a .csv with a header row."""
    import csv
    import io
    reader = csv.DictReader(io.StringIO(read_text(path, "the --input file",
                                                  universal_newlines=False), newline=""))
    columns = reader.fieldnames or []
    if "text" not in columns:
        raise ConfigError(f"{path}: line 1: the header has no 'text' column (it has "
                          f"{columns}); give the texts under a 'text' column.")
    rows = []
    for row in reader:
        if not (row.get("text") or "").strip():
            raise ConfigError(f"{path}: line {reader.line_num}: the 'text' field is empty.")
        rows.append(row)
    pairs = [row.get("text_pair") or "" for row in rows] if "text_pair" in columns else None
    return [row["text"] for row in rows], pairs


def _jsonl_inputs(path: str) -> tuple[list[str], list[str] | None]:
    """The `text` (and `text_pair`, if the first line has one) of each line of a .jsonl."""
    texts, pairs = [], None
    for number, row in read_jsonl(path, "the --input file"):
        if pairs is None and not texts and "text_pair" in row:
            pairs = []
        for key in ("text",) + (("text_pair",) if pairs is not None else ()):
            if not isinstance(row.get(key), str):
                raise ConfigError(f"{path}: line {number}: no {key!r} string in {sorted(row)}; "
                                  f"each JSON line needs a 'text' field" + (
                                      " and, as the first line has one, a 'text_pair'"
                                      if key == "text_pair" else "") + ".")
        texts.append(row["text"])
        if pairs is not None:
            pairs.append(row["text_pair"])
    if not texts:
        raise ConfigError(f"{path}: holds no JSON lines; give one {{\"text\": ...}} per line.")
    return texts, pairs


def predict_run(run_dir, texts: list[str], pairs: list[str] | None = None,
                batch_size: int | None = None, progress: bool = True) -> Iterator[dict]:
    """One dict per text: the label and every label's probability (classification), the labels
    over 0.5 (multi-label) or the value (regression)."""
    engine, state, cfg, _ = load_run(run_dir, batch_size)
    trained_on_pairs = bool(cfg.data.text_pair_column)
    if trained_on_pairs != (pairs is not None):  # the model reads what it was trained on
        raise ConfigError(
            f"{run_dir} was trained on text pairs (data.text_pair_column): give a .jsonl or "
            f".csv input with 'text' and 'text_pair'." if trained_on_pairs else
            f"{run_dir} was trained on single texts, and the input has 'text_pair': give "
            f"'text' alone (or predict with a run trained on pairs).")
    labels: LabelSpace = engine.task.labels
    tokenizer = load_tokenizer(Path(run_dir) / "tokenizer.json")
    examples = predict_examples(texts, tokenizer, cfg.data.seq_len, cfg.model.kind, pairs)
    packed, rows = packed_for_inference(examples, cfg)
    outputs = predict_outputs(engine, state, packed, rows, progress)
    for row in packed.in_input_order(outputs):
        yield prediction(labels, row)


def image_files(path: str | None) -> list[Path]:
    """Images to predict: an image file, a folder of them (sorted, recursively), or a text file
    listing one image path per line."""
    if path in (None, "-"):
        raise ConfigError("ptft predict on an image run needs --input: an image file, a folder "
                          "of images, or a text file listing image paths.")
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    elif p.suffix.lower() in IMAGE_SUFFIXES:
        files = [p]
    elif p.is_file():
        files = [Path(line.strip()) for line in
                 read_text(p, "the --input file").splitlines() if line.strip()]
    else:
        raise ConfigError(f"--input '{path}' does not exist.")
    missing = [f for f in files if not f.is_file()]
    if missing or not files:
        raise ConfigError(f"--input '{path}': " + (f"{len(missing)} listed image(s) do not "
                                                    f"exist, e.g. {missing[0]}" if missing else
                                                    "holds no image files") + ".")
    return files


def predict_images(run_dir, files: list[Path], batch_size: int | None = None,
                   progress: bool = True) -> Iterator[dict]:
    """One dict per image file: its label and every label's probability. Each image is
    decoded and converted to the run's size and channels as its training cache was."""
    engine, state, cfg, _ = load_run(run_dir, batch_size)
    m = cfg.model
    images = np.zeros((len(files), m.image_size, m.image_size, m.channels), np.uint8)
    for i, f in enumerate(files):
        image = decode(f.read_bytes(), str(f))
        if isinstance(image, BadImage):
            raise ConfigError(f"{f} cannot be read as an image ({image.reason}).")
        try:
            images[i] = convert(image, m.image_size, m.channels, True, str(f))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    examples = ImageExamples(images, np.zeros(len(files), np.int64))
    out = predict_outputs(engine, state, examples, cfg.eval.batch_size, progress)
    for f, row in zip(files, out):
        yield {"file": str(f), **prediction(engine.task.labels, row)}


def run_task(run_dir) -> str | None:
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        return None
    return task_for(load_run_config(run_dir))


def is_image_run(run_dir) -> bool:
    return run_task(run_dir) in IMAGE_TASKS


def predict_pairs(run_dir, path: str | None, batch_size: int | None = None,
                  progress: bool = True) -> Iterator[dict]:
    """A fused classifier's label for each image-text pair of a .jsonl / .csv file (columns
    `image`, a path relative to the file, and `text`)."""
    if path in (None, "-") or Path(path).suffix not in (".jsonl", ".csv"):
        raise ConfigError("ptft predict on an image-text run needs --input FILE.jsonl (or .csv) "
                          "with an 'image' path and a 'text' per row.")
    if not Path(path).is_file():
        raise ConfigError(f"--input '{path}' does not exist.")
    try:  # read before the run is loaded: a bad file fails before anything compiles
        pairs = FilePairs(Path(path), "image", "text", None)
        texts = pairs.texts()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    engine, state, cfg, _ = load_run(run_dir, batch_size)
    if task_for(cfg) != "multimodal_classification":
        raise ConfigError(f"{run_dir} is a contrastive run: it has no classifier to predict "
                          f"with (ptft eval reports its retrieval and zero-shot scores).")
    m = cfg.towers.image.model
    images = np.zeros((len(pairs), m.image_size, m.image_size, m.channels), np.uint8)
    for i, image in enumerate(pairs.read(0, len(pairs))):
        if isinstance(image, BadImage):
            raise ConfigError(f"{image.where} cannot be read as an image ({image.reason}).")
        images[i] = convert(image, m.image_size, m.channels, True, image_where(pairs, i))
    tokens = predict_examples(texts, engine.task.tokenizer, cfg.data.seq_len, "encoder")
    examples = PairExamples(images, tokens, texts, None)
    out = predict_outputs(engine, state, examples, cfg.eval.batch_size, progress)
    for index, row in enumerate(out):
        yield {"image": str(pairs.rows[index]["image"]), "text": texts[index],
               **prediction(engine.task.labels, row)}


def image_where(pairs, i: int) -> str:
    return f"{pairs.path} row {i + 1} ({pairs.rows[i]['image']})"


def prediction(labels: LabelSpace, row) -> dict:
    if labels.kind == "regression":
        return {"value": float(row)}
    probs = {name: round(float(p), 6) for name, p in zip(labels.names, row)}
    if labels.kind == "multi_label":
        return {"labels": [n for n, p in probs.items() if p > 0.5], "probabilities": probs}
    return {"label": labels.names[int(np.argmax(row))], "probabilities": probs}


def write_jsonl(rows: Iterable[dict], path: str | None) -> int:
    """One JSON line per row, to stdout or to `path` (which appears whole once every row is
    written, and not at all if one fails). A row with a non-finite number is an error: NaN
    is not JSON, and a model that outputs it has diverged."""
    import sys

    def write(out) -> int:
        n = 0
        for n, row in enumerate(rows, 1):
            out.write(json_line(row))
        return n
    if path in (None, "-"):
        return write(sys.stdout)
    with writing_text(Path(path)) as out:
        return write(out)


def json_line(row: dict) -> str:
    try:
        return json.dumps(row, allow_nan=False) + "\n"
    except ValueError:
        raise ValueError("the model's output is not a finite number (NaN or infinity): its "
                         "checkpoint holds non-finite weights, from a run that diverged. "
                         "Use an earlier checkpoint or retrain with a lower learning rate.") \
            from None
