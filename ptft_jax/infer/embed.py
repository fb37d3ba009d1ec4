"""`ptft embed SOURCE`: sentence embeddings of texts, L2-normalised, as .npy or JSONL.

SOURCE is a ptft run directory (its best checkpoint, else its latest; LoRA merged) or a Hugging
Face model directory (`hf:DIR`, `DIR` holding a config.json, or `hf:OWNER/NAME`). The
embedding pools the component's last hidden states: the mean over real tokens (what
sentence-transformers models such as all-MiniLM-L6-v2 are trained for) or the first token
(CLS). Batched and jitted on one device, with a progress bar.
"""
from __future__ import annotations

import functools

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ptft_jax.ckpt.pretrained import inference_params
from ptft_jax.config import hf
from ptft_jax.config.load import load_run_config
from ptft_jax.config.schema import ConfigError, ModelConfig
from ptft_jax.config.resolve import row_slots
from ptft_jax.convert.hf import flat_params
from ptft_jax.core.files import atomic_write, writing_text
from ptft_jax.core.params import unflatten
from ptft_jax.data.labelled import predict_examples
from ptft_jax.data.packed_examples import PackedExamples
from ptft_jax.data.tokenizer import load_tokenizer
from ptft_jax.models.heads import pool_segments
from ptft_jax.models.transformer import Transformer


@dataclass
class Encoder:
    cfg: ModelConfig
    params: dict  # the component's subtree (what sits under transformer/)
    tokenizer: object
    pooling: str  # the source's own pooling, when it says (sentence-transformers does)
    description: str
    lora_merged: bool = False  # a run's LoRA adapters were folded into `params`


def load_encoder(source: str) -> Encoder:
    path = Path(source)
    if not hf.is_hf(source) and (path / "config.yaml").is_file():
        return _from_run(path)
    if not hf.is_hf(source) and not (path / "config.json").is_file():
        raise ConfigError(f"{source} is neither a ptft run directory (config.yaml) nor a "
                          f"Hugging Face model directory (config.json); give one, or "
                          f"hf:OWNER/NAME.")
    return _from_hf(source if hf.is_hf(source) else hf.PREFIX + source)


def _from_hf(spec: str) -> Encoder:
    try:
        model = hf.open_model(spec)
        keys = model.model_keys()
        flat, _ = flat_params(model)
    except ValueError as e:  # config/hf.py speaks of finetune.init_from, its usual caller
        raise ConfigError(str(e).replace("finetune.init_from: ", "").replace(
            "set finetune.init_from=hf:DIR", "give DIR to ptft embed")) from None
    if model.tokenizer_path is None:
        raise ConfigError(f"{model.directory} has neither tokenizer.json nor vocab.txt.")
    keys["dropout"] = 0.0
    cfg = ModelConfig(**keys)
    default = model.pooling or ("mean" if cfg.kind == "encoder" else "last")
    return Encoder(cfg, unflatten(flat)["transformer"], load_tokenizer(model.tokenizer_path),
                   default, f"{model.directory} ({model.architecture})")


def _from_run(run_dir: Path) -> Encoder:
    cfg = load_run_config(run_dir)
    if cfg.model.kind not in ("encoder", "decoder"):
        raise ConfigError(f"{run_dir} is a run of a {cfg.model.kind} model; ptft embed reads a "
                          f"text encoder or decoder run (or hf:NAME): give one.")
    params, step_dir, merged = inference_params(run_dir, cfg)
    cfg.model.dropout = 0.0
    default = "mean" if cfg.model.kind == "encoder" else "last"
    return Encoder(cfg.model, params["transformer"],
                   load_tokenizer(run_dir / "tokenizer.json"), default, str(step_dir), merged)


class Embedder:
    """An encoder's embedding function, jitted: texts packed several to a row (each its own
    segment, pooled on its own; data/packed_examples.py), L2-normalised. Each batch's row
    count is one compiled shape; `ptft embed` uses one, `ptft serve` a few buckets."""

    def __init__(self, encoder: Encoder, pooling: str | None = None,
                 seq_len: int | None = None):
        self.pooling = pooling or encoder.pooling
        max_len = encoder.cfg.max_len
        if seq_len is None:
            seq_len = min(256, max_len)
        elif seq_len > max_len:
            raise ConfigError(f"--seq-len {seq_len} is past the model's {max_len} positions "
                              f"(its max_len); give --seq-len {max_len} or less.")
        self.encoder, self.seq_len = encoder, seq_len
        model, pooling = Transformer(encoder.cfg), self.pooling

        @functools.partial(jax.jit, static_argnames="slots")
        def one_batch(params, tokens, segment_ids, positions, slots: int):
            hidden = model.apply({"params": params}, tokens, segment_ids, positions)
            pooled = pool_segments(hidden.astype(jnp.float32), segment_ids, positions,
                                   pooling, slots)
            return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        self.one_batch = one_batch
        self.params = jax.device_put(encoder.params)

    def examples(self, texts: list[str]) -> PackedExamples:
        return self.packed(predict_examples(texts, self.encoder.tokenizer, self.seq_len,
                                            self.encoder.cfg.kind))

    def packed(self, examples) -> PackedExamples:
        """Rows of the examples' own length (`seq_len`, or a shorter row a server picks for
        short texts): each text its own segment, pooled on its own."""
        return PackedExamples(examples, row_slots(0, examples.seq_len), None)

    def __call__(self, examples: PackedExamples, rows: int, bar=None) -> np.ndarray:
        """[len(examples.examples), hidden] in input order, in batches of `rows` rows."""
        out = []
        for batch in examples.batches(rows):
            out.append(np.asarray(self.one_batch(self.params, batch["tokens"],
                                                 batch["segment_ids"], batch["positions"],
                                                 slots=examples.slots)))
            if bar is not None:
                bar.update()
        return examples.in_input_order(np.concatenate(out, axis=0)[:len(examples)])


def embed(encoder: Encoder, texts: list[str], pooling: str | None = None,
          seq_len: int | None = None, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """[len(texts), hidden] float32, each row of unit L2 norm. seq_len: tokens per text, at
    most the model's max_len (None: 256, or max_len if lower); `batch_size` counts texts, as
    rows that hold that many."""
    embedder = Embedder(encoder, pooling, seq_len)
    examples = embedder.examples(texts)
    rows = examples.rows_holding(batch_size)
    with tqdm(total=examples.num_batches(rows), unit="batch", desc="embed",
              disable=not progress, leave=False) as bar:
        return embedder(examples, rows, bar)


def write(vectors: np.ndarray, texts: list[str], output: str | None) -> None:
    """`.npy` (one row per text), else JSONL ({"text", "embedding"}) to a file or stdout. A
    file appears whole or not at all; non-finite vectors (a diverged model) are refused."""
    if not np.isfinite(vectors).all():
        raise ValueError("the model's embeddings are not all finite numbers (NaN or infinity): "
                         "its weights are non-finite, from a run that diverged. Use an earlier "
                         "checkpoint or retrain with a lower learning rate.")
    if output and output.endswith(".npy"):
        atomic_write(Path(output), lambda f: np.save(f, vectors))
        return

    def lines(out):
        for text, vector in zip(texts, vectors):
            out.write(json.dumps({"text": text,
                                  "embedding": [round(float(v), 7) for v in vector]}) + "\n")
    if output in (None, "-"):
        lines(sys.stdout)
    else:
        with writing_text(Path(output)) as out:
            lines(out)
