"""Classification of image-text pairs by a fused model: an image tower and a text tower whose
outputs meet in fusion layers under a head (models/multimodal.py). Every finetuning strategy
applies to it: per tower through regexes on `image/` and `text/`, layer-wise rules on each
tower's own depth, and the fusion layers train with the head.

Batches are pairs (data/pairs.py): uint8 images, token rows, the label and a `weight` (0 for
the rows padding the last eval batch). Training augments the images on device (crop, flip;
mixing two images would break their pairing); metrics are those of text classification.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from ptft_jax.config.schema import AugmentConfig, ModelConfig
from ptft_jax.data.augment import augment, normalize
from ptft_jax.data.labelled import LabelSpace
from ptft_jax.models.multimodal import FusionClassifier
from ptft_jax.tasks import metrics
from ptft_jax.tasks.base import Task, apply_model


class FusedClassifyTask(Task):
    name = "multimodal_classification"
    shown = ("loss", "accuracy", "macro_f1")

    def __init__(self, cfg: ModelConfig, image_cfg: ModelConfig, text_cfg: ModelConfig,
                 labels: LabelSpace | Sequence[str], text_pooling: str, aug: AugmentConfig,
                 tokenizer: Tokenizer | None = None, bn_axis_name: str | None = None):
        """`labels`: the label space, or bare class names."""
        self.image_cfg, self.aug, self.tokenizer = image_cfg, aug, tokenizer
        if isinstance(labels, LabelSpace):
            self.labels = labels
        self.class_names = tuple(labels.names if isinstance(labels, LabelSpace) else labels)
        self.num_classes = len(self.class_names)
        self.model = FusionClassifier(cfg, image_cfg, text_cfg, self.num_classes, text_pooling,
                                      bn_axis_name)

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        s, c = self.image_cfg.image_size, self.image_cfg.channels
        zeros = np.zeros((batch_size, seq_len), np.int32)
        return {"image": np.zeros((batch_size, s, s, c), np.uint8), "tokens": zeros,
                "segment_ids": zeros + 1, "positions": zeros, "type_ids": zeros,
                "label": np.zeros(batch_size, np.int32),
                "weight": np.ones(batch_size, np.float32)}

    def model_inputs(self, batch: dict) -> tuple:
        return (normalize(batch["image"], self.aug), batch["tokens"], batch["segment_ids"],
                batch["positions"], batch["type_ids"])

    def predicted_positions(self, seq_len: int) -> int:
        return 0

    def sums(self, params, model_state, batch, example_ids, key, *, train, rngs=None):
        inputs = self.model_inputs(batch)
        if train:
            with jax.named_scope("augment"):
                dummy = jnp.zeros((batch["image"].shape[0], 1), jnp.float32)
                images, _ = augment(batch["image"], dummy, key, example_ids, self.aug)
            inputs = (images, *inputs[1:])
        logits, model_state = apply_model(self.model, params, model_state, *inputs,
                                          train=train, rngs=rngs)
        return metrics.classification_sums(logits, batch["label"], batch["weight"],
                                              self.num_classes), model_state

    def metrics(self, sums) -> dict:
        return metrics.classification_metrics(sums, list(self.class_names))

    def predict(self, params, model_state, batch):
        logits, _ = apply_model(self.model, params, model_state, *self.model_inputs(batch),
                                train=False)
        return jax.nn.softmax(logits, axis=-1)
