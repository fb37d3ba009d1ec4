"""What a benchmark case trains: its task, the synthetic host batches it steps on, and the
unit its throughput counts (a token for language models, an image for image classification)
with the training FLOPs of one unit (`ptft_jax.models.flops`: only what the step computes).

Language models step on the rows `ptft pretrain` feeds: random documents (geometric lengths,
mean 600 tokens) packed by the training Packer, with segment ids and restarting positions, so
attention carries the document mask (`rows: unmasked` drops the segment ids, to price it).
Image classification steps on random uint8 images of the case's size with 1000 classes, the
step `ptft pretrain` runs on images: flip augmentation and normalisation on device,
label-smoothed cross-entropy. Contrastive cases step on random image-text pairs (texts of
random length, padded) through a two-tower model with CLIP's loss over the global batch.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ptft_jax.data.labelled import LabelSpace
from ptft_jax.data.packing import Packer
from ptft_jax.jobs.lm import lm_throughput
from ptft_jax.models.flops import image_train_flops, multimodal_train_flops
from ptft_jax.tasks.factory import make_task
from ptft_jax.tasks.lm import MlmSpec

SPECIAL_IDS = (0, 1, 2, 3, 4)  # synthetic data keeps ids below 5 free, as our tokenizers do
IMAGE_CLASSES = 1000  # ImageNet's, the head size the published image models train with


@dataclasses.dataclass
class Workload:
    task: object
    host_batches: list[dict]
    unit: str  # what throughput counts: "token", "image" or "pair"
    units_per_step: int
    flops_per_unit: float


def synthetic_batches(cfg, n: int = 2, seed: int = 0, rows: str = "packed") -> list[dict]:
    """`n` global batches of packed rows (tokens, segment_ids, positions) from random
    documents, through the training Packer; `unmasked`: the tokens alone (no document mask)."""
    rng = np.random.default_rng(seed)
    B, T = cfg.train.global_batch, cfg.data.seq_len
    lengths = rng.geometric(1 / 600, size=n * B * T // 300 + 8)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(len(SPECIAL_IDS), cfg.model.vocab_size, int(offsets[-1]),
                          dtype=np.int32)
    bos = 2 if cfg.model.kind == "encoder" else None  # [CLS] / GPT-2 has no BOS
    packer = Packer(tokens, offsets, T, bos, 3, "pack")
    out = [packer.rows(np.arange(i * B, (i + 1) * B)) for i in range(n)]
    if rows == "unmasked":
        out = [{"tokens": b["tokens"]} for b in out]
    return out


def synthetic_images(cfg, n: int = 2, seed: int = 0) -> list[dict]:
    """`n` global batches of random uint8 images [batch, size, size, channels] with labels."""
    rng = np.random.default_rng(seed)
    B, s, c = cfg.train.global_batch, cfg.model.image_size, cfg.model.channels
    return [{"image": rng.integers(0, 256, (B, s, s, c), dtype=np.uint8),
             "label": rng.integers(0, IMAGE_CLASSES, B).astype(np.int32),
             "weight": np.ones(B, np.float32)} for _ in range(n)]


def language_model(cfg, rows: str) -> Workload:
    spec = MlmSpec(mask_id=4, special_ids=SPECIAL_IDS, random_low=len(SPECIAL_IDS),
                   random_high=cfg.model.vocab_size) if cfg.train.task == "mlm" else None
    task = make_task(cfg, mlm=spec)
    return Workload(task, synthetic_batches(cfg, rows=rows), "token",
                    cfg.train.global_batch * cfg.data.seq_len,
                    lm_throughput(cfg, task).flops_per_unit)


def image_classification(cfg) -> Workload:
    # The step trains with label smoothing 0.1, as the published image recipes do.
    cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective,
                                                                 label_smoothing=0.1))
    labels = LabelSpace("classification", tuple(str(i) for i in range(IMAGE_CLASSES)))
    task = make_task(cfg, labels)
    return Workload(task, synthetic_images(cfg), "image", cfg.train.global_batch,
                    image_train_flops(cfg.model, IMAGE_CLASSES))


def synthetic_pairs(cfg, n: int = 2, seed: int = 0) -> list[dict]:
    """`n` global batches of random image-text pairs: uint8 images of the image tower's size,
    token rows of random length (a quarter to all of data.seq_len), padded."""
    rng = np.random.default_rng(seed)
    image = cfg.towers.image.model
    B, T, s, c = cfg.train.global_batch, cfg.data.seq_len, image.image_size, image.channels
    vocab = cfg.towers.text.model.vocab_size
    out = []
    for _ in range(n):
        lengths = rng.integers(max(1, T // 4), T + 1, B)
        valid = np.arange(T)[None, :] < lengths[:, None]
        out.append({"image": rng.integers(0, 256, (B, s, s, c), dtype=np.uint8),
                    "tokens": np.where(valid, rng.integers(len(SPECIAL_IDS), vocab, (B, T)),
                                       0).astype(np.int32),
                    "segment_ids": valid.astype(np.int32),
                    "positions": np.where(valid, np.arange(T), 0).astype(np.int32),
                    "type_ids": np.zeros((B, T), np.int32),
                    "weight": np.ones(B, np.float32)})
    return out


def contrastive(cfg) -> Workload:
    task = make_task(cfg)
    return Workload(task, synthetic_pairs(cfg), "pair", cfg.train.global_batch,
                    multimodal_train_flops(cfg))


def workload(cfg, rows: str = "packed") -> Workload:
    if cfg.train.task in ("mlm", "clm"):
        return language_model(cfg, rows)
    if cfg.train.task == "image_classification":
        return image_classification(cfg)
    if cfg.train.task == "contrastive":
        return contrastive(cfg)
    raise ValueError(f"no benchmark workload for train.task '{cfg.train.task}'")
