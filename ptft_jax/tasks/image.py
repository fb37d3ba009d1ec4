"""Image classification: the pretraining task of an image component, and its finetuning task
(a new head on a pretrained component, with every finetuning strategy).

Batches are uint8 images [batch, h, w, c] as the image cache holds them, int32 labels and a
`weight` (0 for the rows padding the last eval batch). Augmentation and normalisation run
here, on device (data/augment.py). The training loss is cross-entropy against soft targets:
one-hot, mixed with the partner's by mixup / cutmix, then label-smoothed. Evaluation reads the
images unaugmented and reports the plain cross-entropy, accuracy, macro F1 and the confusion
matrix (as text classification does).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ptft_jax.config.schema import AugmentConfig, ModelConfig
from ptft_jax.data.augment import augment, normalize
from ptft_jax.data.labelled import LabelSpace
from ptft_jax.models.vision import ImageClassifier
from ptft_jax.tasks import metrics
from ptft_jax.tasks.base import ClassNamesTask, apply_model


class ImageClassifyTask(ClassNamesTask):
    name = "image_classification"
    shown = ("loss", "accuracy", "macro_f1")

    def __init__(self, cfg: ModelConfig, class_names, aug: AugmentConfig,
                 label_smoothing: float = 0.0, bn_axis_name: str | None = None,
                 labels: LabelSpace | None = None):
        self.cfg, self.labels = cfg, labels
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.aug = aug
        self.label_smoothing = label_smoothing
        self.model = ImageClassifier(cfg, self.num_classes, bn_axis_name)

    def example_batch(self, batch_size: int, seq_len: int = 0) -> dict[str, np.ndarray]:
        del seq_len
        s, c = self.cfg.image_size, self.cfg.channels
        return {"image": np.zeros((batch_size, s, s, c), np.uint8),
                "label": np.zeros(batch_size, np.int32),
                "weight": np.ones(batch_size, np.float32)}

    def model_inputs(self, batch: dict) -> tuple:
        return (normalize(batch["image"], self.aug),)

    def sums(self, params, model_state, batch, example_ids, key, *, train, rngs=None):
        labels, weights = batch["label"], batch["weight"]
        if not train:
            logits, model_state = apply_model(self.model, params, model_state,
                                              *self.model_inputs(batch), train=False)
            return metrics.classification_sums(logits, labels, weights,
                                                   self.num_classes), model_state
        targets = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32)
        with jax.named_scope("augment"):  # what profiles attribute its ops to
            images, targets = augment(batch["image"], targets, key, example_ids, self.aug)
        if self.label_smoothing:
            targets = targets * (1 - self.label_smoothing) + \
                self.label_smoothing / self.num_classes
        logits, model_state = apply_model(self.model, params, model_state, images,
                                          train=True, rngs=rngs)
        sums = metrics.classification_sums(logits, labels, weights, self.num_classes)
        loss = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
        sums["loss_sum"] = jnp.sum(loss * weights)
        return sums, model_state
