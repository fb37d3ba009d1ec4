"""Finetuning tasks: single-label classification, multi-label classification and regression
of texts or text pairs, on a Transformer component with a new head (models/heads.py).

Batches are padded examples (data/labelled.py): tokens, segment ids (0 on padding), positions,
type ids, the label, and a `weight` that is 0 for the rows padding the last eval batch, so
that every sum counts real examples only.
"""
from __future__ import annotations

import numpy as np

from ptft_jax.config.schema import ModelConfig
from ptft_jax.data.labelled import LabelSpace
from ptft_jax.models.heads import Classifier
from ptft_jax.tasks import metrics
from ptft_jax.tasks.base import Task, apply_model


class ClassifyTask(Task):
    def __init__(self, cfg: ModelConfig, labels: LabelSpace, pooling: str):
        self.name = labels.kind
        self.labels = labels
        self.model = Classifier(cfg, labels.num_outputs, pooling)
        self.shown = {"classification": ("loss", "accuracy", "macro_f1"),
                      "multi_label": ("loss", "macro_f1", "exact_match"),
                      "regression": ("loss", "mae", "pearson")}[labels.kind]

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        zeros = np.zeros((batch_size, seq_len), np.int32)
        batch = {"tokens": zeros, "segment_ids": zeros + 1, "positions": zeros,
                 "type_ids": zeros, "weight": np.ones(batch_size, np.float32)}
        if self.labels.kind == "classification":
            batch["label"] = np.zeros(batch_size, np.int32)
        elif self.labels.kind == "multi_label":
            batch["label"] = np.zeros((batch_size, self.labels.num_outputs), np.float32)
        else:
            batch["label"] = np.zeros(batch_size, np.float32)
        return batch

    def sums(self, params, model_state, batch, example_ids, key, *, train, rngs=None):
        del example_ids, key
        logits, model_state = apply_model(self.model, params, model_state,
                                          *self.model_inputs(batch), train=train, rngs=rngs)
        weights = batch["weight"]
        kind = self.labels.kind
        if kind == "classification":
            sums = metrics.classification_sums(logits, batch["label"], weights,
                                                  self.labels.num_outputs)
        elif kind == "multi_label":
            sums = metrics.multi_label_sums(logits, batch["label"], weights)
        else:
            sums = metrics.regression_sums(logits[:, 0], batch["label"], weights)
        return sums, model_state

    def metrics(self, sums) -> dict:
        kind, names = self.labels.kind, list(self.labels.names)
        if kind == "classification":
            return metrics.classification_metrics(sums, names)
        if kind == "multi_label":
            return metrics.multi_label_metrics(sums, names)
        return metrics.regression_metrics(sums)

    def predict(self, params, model_state, batch):
        """Probabilities (or the regression value) per example: what `ptft predict` writes."""
        import jax
        logits, _ = apply_model(self.model, params, model_state, *self.model_inputs(batch),
                                train=False)
        if self.labels.kind == "classification":
            return jax.nn.softmax(logits, axis=-1)
        if self.labels.kind == "multi_label":
            return jax.nn.sigmoid(logits)
        return logits[:, 0]
