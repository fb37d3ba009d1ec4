"""The model side of `ptft serve` (the HTTP side is infer/server.py): a run or an encoder loaded
once; each request checked and encoded on its own (`prepare`, off the event loop); requests
gathered by the server run together (`run`) as jitted calls at one of a few batch shapes, all
compiled at start-up (`warm_up`), so no request waits for a compile.

Texts are packed several to a row, each its own segment (data/packed_examples.py), as `ptft
predict` and `ptft embed` read them: a batch is a number of rows of `data.seq_len` tokens, and
the buckets are row counts (doubling, up to what the token budget fills). Images (and
image-text pairs) count one example each; their buckets are example counts.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptft_jax.ckpt.integrity import checksums
from ptft_jax.config import hf
from ptft_jax.config.schema import FINETUNE_TASKS, IMAGE_TASKS, PRETRAIN_TASKS, ConfigError
from ptft_jax.config.resolve import row_slots, task_for
from ptft_jax.core.mesh import data_parallel_size
from ptft_jax.core.params import count
from ptft_jax.data.image_io import BadImage, decode
from ptft_jax.data.images import ImageExamples, convert
from ptft_jax.data.labelled import encode_texts, examples_of_ids, predict_examples
from ptft_jax.data.packed_examples import PackedExamples
from ptft_jax.data.pairs import PairExamples
from ptft_jax.data.tokenizer import load_tokenizer
from ptft_jax.infer.embed import Embedder, load_encoder
from ptft_jax.infer.predict import checkpoint_step, load_run, prediction, run_task
from ptft_jax.train.evaluate import predict_outputs


class RequestError(ValueError):
    """A request the model cannot answer as it is: the HTTP status and one line saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Prepared:
    """One request, checked and encoded: what the server's batcher gathers."""
    count: int  # examples (texts, images) in the request
    cost: int  # what it takes of a batch's budget: tokens, or examples for images
    inputs: dict  # what `run` reads


def buckets(largest: int, step: int) -> list[int]:
    """Batch sizes 1, 2, 3, 4, 6, 8, 12, ... times `step` (which the mesh splits evenly), up
    to `largest` (a multiple of `step`), `largest` included: a batch pads at most a third of
    its rows (doublings alone pad up to half, and a CPU computes the padding in full)."""
    sizes, k = set(), 1
    while k * step < largest:
        sizes.update(m * step for m in (k, 3 * k // 2) if m and m * step < largest)
        k *= 2
    return sorted(sizes | {largest})


def bucket_for(sizes: list[int], needed: int) -> int:
    """The smallest bucket that holds `needed` rows (the largest, in several batches, if none
    does)."""
    return next((s for s in sizes if s >= needed), sizes[-1])


def row_lengths(seq_len: int) -> list[int]:
    """The row lengths a text model serves in: a batch of short texts (one short request,
    say) runs in short rows rather than paying for `seq_len` tokens per row."""
    return sorted({n for n in (seq_len // 4, seq_len // 2) if n >= 16} | {seq_len})


def in_shortest_rows(first: list, second: list | None, tokenizer, kind: str, lengths: list[int],
                     most_rows: int, pack) -> PackedExamples:
    """The texts (token ids) packed (`pack`: examples -> PackedExamples) into rows of the
    shortest of `lengths` that holds the longest of them (as the longest length truncates it)
    in at most `most_rows` rows; else rows of the longest length. Each text is the same
    segment whatever its row's length: the same outputs."""
    full = examples_of_ids(first, second, tokenizer, lengths[-1], kind)
    longest = int(full.lengths.max())
    for length in lengths:
        if length < longest:
            continue
        packed = pack(full if length == lengths[-1] else
                      examples_of_ids(first, second, tokenizer, length, kind))
        if len(packed) <= most_rows or length == lengths[-1]:
            return packed


def params_checksum(params) -> str:
    """One digest of a model's weights (the per-array checksums that checkpoints store): two
    servers answer alike when theirs agree."""
    sums = json.dumps(checksums(params), sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(sums).hexdigest()


class Served:
    """What every served model offers the server."""
    endpoint: str  # "predict" or "embed"
    budget: int  # the cost a batch may gather
    sizes: list[int]  # the compiled batch shapes
    calls: int = 0  # model calls run (a batch of gathered requests is one)

    def __init__(self, max_examples: int):
        self.max_examples = max_examples

    def prepare(self, body: dict) -> Prepared:
        raise NotImplementedError

    def run(self, parts: list[Prepared]) -> list[list]:
        """Each request's answers (one per example, in its order)."""
        raise NotImplementedError

    def warm_up(self) -> None:
        raise NotImplementedError

    def shapes(self) -> str:
        """The batch shapes warm_up compiles, in words."""
        return f"{len(self.sizes)} batch sizes {self.sizes}"

    def info(self) -> dict:
        raise NotImplementedError

    def texts(self, body: dict, key: str = "texts") -> list[str]:
        """body[key]: a non-empty list of non-empty strings, at most max_examples of them."""
        texts = body.get(key)
        if texts is None:
            raise RequestError(422, f"the request has no {key!r}: give {{\"{key}\": "
                                    f"[\"...\", ...]}}.")
        self.check_count(len(texts), key)
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise RequestError(422, f"{key}[{empty[0]}] is empty: every text needs at least "
                                    f"one non-blank character.")
        return texts

    def check_count(self, n: int, key: str) -> None:
        if n == 0:
            raise RequestError(422, f"{key!r} is an empty list: give at least one.")
        if n > self.max_examples:
            raise RequestError(413, f"{n} {key} in one request, over the server's limit of "
                                    f"{self.max_examples} (--max-texts): split the request.")

    def refuse_others(self, body: dict, allowed: tuple[str, ...], serves: str) -> None:
        extra = [k for k, v in body.items() if v is not None and k not in allowed]
        if extra:
            raise RequestError(422, f"{extra[0]!r} is not read by this server, which serves "
                                    f"{serves}: give " + " and ".join(repr(a) for a in allowed)
                               + ".")

    def split(self, outputs: list, parts: list[Prepared]) -> list[list]:
        ends = np.cumsum([p.count for p in parts])
        return [outputs[end - p.count:end] for end, p in zip(ends, parts)]


class RunModel(Served):
    """A finetuned run (ptft predict's model): its engine and params on the devices."""

    def __init__(self, run_dir: Path, max_examples: int):
        super().__init__(max_examples)
        self.run_dir = run_dir
        self.engine, self.state, self.cfg, self.source = load_run(run_dir)
        self.labels = self.engine.task.labels
        self.step = checkpoint_step(self.source)
        self.dp = data_parallel_size(self.cfg)
        self.checksum = params_checksum(self.engine.host_state(self.state).params)

    def outputs(self, examples, size: int):
        self.calls += 1
        return predict_outputs(self.engine, self.state, examples, size)

    def info(self) -> dict:
        return {"endpoint": "/v1/" + self.endpoint, "task": task_for(self.cfg),
                "labels": list(self.labels.names) if self.labels.kind != "regression" else [],
                "source": str(self.run_dir), "checkpoint": self.source, "step": self.step,
                "params_checksum": self.checksum,
                "parameters": count(self.engine.host_state(self.state).params),
                "batch_sizes": self.sizes}


class TextClassifier(RunModel):
    """`{"texts": [...]}` (and `"text_pairs"` for a run trained on pairs) -> predictions."""
    endpoint = "predict"

    def __init__(self, run_dir: Path, max_examples: int, max_batch_tokens: int):
        super().__init__(run_dir, max_examples)
        self.tokenizer = load_tokenizer(run_dir / "tokenizer.json")
        self.pairs = bool(self.cfg.data.text_pair_column)
        self.seq_len = self.cfg.data.seq_len
        self.budget = max_batch_tokens
        rows = max(self.dp, max_batch_tokens // self.seq_len // self.dp * self.dp)
        self.sizes = buckets(rows, self.dp)
        self.lengths = row_lengths(self.seq_len)

    def prepare(self, body: dict) -> Prepared:
        allowed = ("texts", "text_pairs") if self.pairs else ("texts",)
        self.refuse_others(body, allowed, "a classifier of text pairs" if self.pairs else
                           "a text classifier")
        texts = self.texts(body)
        inputs = {"texts": encode_texts(self.tokenizer, texts), "pairs": None}
        if self.pairs:
            pairs = self.texts(body, "text_pairs")
            if len(pairs) != len(texts):
                raise RequestError(422, f"{len(texts)} texts and {len(pairs)} text_pairs: give "
                                        f"one second text per text.")
            inputs["pairs"] = encode_texts(self.tokenizer, pairs)
        specials = 3 if self.pairs else 2
        cost = sum(min(self.seq_len, len(a) + (len(b) if self.pairs else 0) + specials)
                   for a, b in zip(inputs["texts"], inputs["pairs"] or inputs["texts"]))
        return Prepared(len(texts), cost, inputs)

    def packed(self, first: list, second: list | None) -> PackedExamples:
        """The texts in the shortest rows that hold them (in_shortest_rows)."""
        return in_shortest_rows(
            first, second, self.tokenizer, self.cfg.model.kind, self.lengths, self.sizes[-1],
            lambda examples: PackedExamples(examples, row_slots(
                self.cfg.data.examples_per_row, examples.seq_len), None))

    def run(self, parts: list[Prepared]) -> list[list]:
        first = [ids for p in parts for ids in p.inputs["texts"]]
        second = [ids for p in parts for ids in p.inputs["pairs"]] if self.pairs else None
        packed = self.packed(first, second)
        out = packed.in_input_order(self.outputs(packed, bucket_for(self.sizes, len(packed))))
        return self.split([prediction(self.labels, row) for row in out], parts)

    def warm_up(self) -> None:
        one = [[0]]  # one token: the shapes, not the text, are what compiles
        for length in self.lengths:
            examples = examples_of_ids(one, one if self.pairs else None, self.tokenizer,
                                       length, self.cfg.model.kind)
            for size in self.sizes:
                self.outputs(PackedExamples(examples, row_slots(
                    self.cfg.data.examples_per_row, length), None), size)
        self.calls = 0

    def shapes(self) -> str:
        return f"{len(self.sizes) * len(self.lengths)} batch shapes: {self.sizes} rows of " \
            f"{self.lengths} tokens"

    def info(self) -> dict:
        return {**super().info(), "inputs": ["texts", "text_pairs"] if self.pairs else
                ["texts"], "seq_len": self.seq_len, "row_lengths": self.lengths,
                "max_batch_tokens": self.budget}


def decode_images(body: dict, key: str, size: int, channels: int) -> np.ndarray:
    """body[key]'s base64 images as [n, size, size, channels] uint8, converted as the run's
    training cache was."""
    out = np.zeros((len(body[key]), size, size, channels), np.uint8)
    for i, text in enumerate(body[key]):
        where = f"{key}[{i}]"
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, f"{where} is not base64: give each image file's bytes "
                                    f"base64-encoded.") from None
        image = decode(raw, where)
        if isinstance(image, BadImage):
            raise RequestError(422, f"{where} does not decode as an image ({image.reason}).")
        try:
            out[i] = convert(image, size, channels, True, where)
        except ValueError as e:
            raise RequestError(422, str(e)) from None
    return out


class ImageClassifier(RunModel):
    """`{"images": [base64, ...]}` -> predictions; an image-text run reads `"texts"` too."""
    endpoint = "predict"

    def __init__(self, run_dir: Path, max_examples: int, max_batch_images: int):
        super().__init__(run_dir, max_examples)
        self.with_text = task_for(self.cfg) not in IMAGE_TASKS
        self.model_cfg = self.cfg.towers.image.model if self.with_text else self.cfg.model
        self.budget = max_batch_images
        self.sizes = buckets(max(self.dp, max_batch_images // self.dp * self.dp), self.dp)

    def prepare(self, body: dict) -> Prepared:
        allowed = ("images", "texts") if self.with_text else ("images",)
        self.refuse_others(body, allowed, "an image-text classifier" if self.with_text else
                           "an image classifier")
        if body.get("images") is None:
            raise RequestError(422, "the request has no 'images': give {\"images\": [base64 "
                                    "of each image file, ...]}.")
        self.check_count(len(body["images"]), "images")
        m = self.model_cfg
        inputs = {"images": decode_images(body, "images", m.image_size, m.channels)}
        if self.with_text:
            texts = self.texts(body)
            if len(texts) != len(inputs["images"]):
                raise RequestError(422, f"{len(inputs['images'])} images and {len(texts)} "
                                        f"texts: give one text per image.")
            inputs["texts"] = texts
        return Prepared(len(inputs["images"]), len(inputs["images"]), inputs)

    def examples(self, images: np.ndarray, texts: list[str] | None):
        if not self.with_text:
            return ImageExamples(images, np.zeros(len(images), np.int64))
        tokens = predict_examples(texts, self.engine.task.tokenizer, self.cfg.data.seq_len,
                                  "encoder")
        return PairExamples(images, tokens, texts, None)

    def run(self, parts: list[Prepared]) -> list[list]:
        images = np.concatenate([p.inputs["images"] for p in parts])
        texts = [t for p in parts for t in p.inputs["texts"]] if self.with_text else None
        out = self.outputs(self.examples(images, texts), bucket_for(self.sizes, len(images)))
        return self.split([prediction(self.labels, row) for row in out], parts)

    def warm_up(self) -> None:
        m = self.model_cfg
        one = self.examples(np.zeros((1, m.image_size, m.image_size, m.channels), np.uint8),
                            ["warm up"] if self.with_text else None)
        for size in self.sizes:
            self.outputs(one, size)
        self.calls = 0

    def info(self) -> dict:
        return {**super().info(), "inputs": ["images", "texts"] if self.with_text else
                ["images"], "image_size": self.model_cfg.image_size,
                "max_batch_images": self.budget}


class TextEncoder(Served):
    """`{"texts": [...]}` -> L2-normalised embeddings, as `ptft embed` writes them."""
    endpoint = "embed"

    def __init__(self, source: str, max_examples: int, max_batch_tokens: int,
                 seq_len: int | None):
        super().__init__(max_examples)
        self.source = source
        self.encoder = load_encoder(source)
        self.embedder = Embedder(self.encoder, None, seq_len)
        self.seq_len = self.embedder.seq_len
        self.budget = max_batch_tokens
        self.sizes = buckets(max(1, max_batch_tokens // self.seq_len), 1)
        self.lengths = row_lengths(self.seq_len)
        self.checksum = params_checksum(self.encoder.params)

    def prepare(self, body: dict) -> Prepared:
        self.refuse_others(body, ("texts",), "embeddings")
        ids = encode_texts(self.encoder.tokenizer, self.texts(body))
        return Prepared(len(ids), sum(min(self.seq_len, len(i) + 2) for i in ids), ids)

    def packed(self, ids: list) -> PackedExamples:
        """The texts in the shortest rows that hold them (in_shortest_rows)."""
        return in_shortest_rows(ids, None, self.encoder.tokenizer, self.encoder.cfg.kind,
                                self.lengths, self.sizes[-1], self.embedder.packed)

    def run(self, parts: list[Prepared]) -> list[list]:
        examples = self.packed([ids for p in parts for ids in p.inputs])
        self.calls += 1
        vectors = self.embedder(examples, bucket_for(self.sizes, len(examples)))
        if not np.isfinite(vectors).all():
            raise ValueError("the model's embeddings are not all finite numbers: its weights "
                             "are non-finite (a run that diverged).")
        return self.split([[round(float(v), 7) for v in row] for row in vectors], parts)

    def warm_up(self) -> None:
        for length in self.lengths:
            examples = self.embedder.packed(examples_of_ids(
                [[0]], None, self.encoder.tokenizer, length, self.encoder.cfg.kind))
            for size in self.sizes:
                self.embedder(examples, size)

    def shapes(self) -> str:
        return f"{len(self.sizes) * len(self.lengths)} batch shapes: {self.sizes} rows of " \
            f"{self.lengths} tokens"

    def info(self) -> dict:
        return {"endpoint": "/v1/embed", "task": "embedding", "source": self.source,
                "checkpoint": self.encoder.description, "params_checksum": self.checksum,
                "parameters": count(self.encoder.params), "pooling": self.embedder.pooling,
                "dimensions": self.encoder.cfg.hidden_size, "seq_len": self.seq_len,
                "row_lengths": self.lengths, "inputs": ["texts"],
                "max_batch_tokens": self.budget,
                "batch_sizes": self.sizes}


def load_served(source: str, max_examples: int, max_batch_tokens: int,
                max_batch_images: int, seq_len: int | None = None) -> Served:
    """The model `ptft serve SOURCE` answers with: a finetuned run (predictions), or a
    pretraining run or Hugging Face model (embeddings)."""
    task = None if hf.is_hf(source) else run_task(source)
    if task is None or task in PRETRAIN_TASKS:
        return TextEncoder(source, max_examples, max_batch_tokens, seq_len)
    if seq_len is not None:
        raise ConfigError(f"--seq-len is for embeddings; {source} is a finetuned run, which "
                          f"reads texts at its own data.seq_len: leave --seq-len out.")
    if task == "contrastive":
        raise ConfigError(f"{source} is a contrastive run: it has no classifier head to serve. "
                          f"Serve a finetuned run, or a text encoder for embeddings.")
    if task in FINETUNE_TASKS:
        return TextClassifier(Path(source), max_examples, max_batch_tokens)
    return ImageClassifier(Path(source), max_examples, max_batch_images)
