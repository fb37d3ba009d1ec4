"""Finetuning tasks: single-label classification, multi-label classification and regression
of texts or text pairs, on a Transformer component with a new head (models/heads.py).

Batches are padded examples (data/labelled.py): tokens, segment ids (0 on padding), positions,
type ids, the label, and a `weight` that is 0 for the rows padding the last eval batch, so
that every sum counts real examples only; or packed rows of several examples
(data/packed_examples.py), with a label and a weight per slot.
"""
from __future__ import annotations

import numpy as np

from ptft_jax.config.schema import ModelConfig
from ptft_jax.data.labelled import LabelSpace
from ptft_jax.models.heads import Classifier
from ptft_jax.tasks import metrics
from ptft_jax.tasks.base import Task, apply_model


class ClassifyTask(Task):
    def __init__(self, cfg: ModelConfig, labels: LabelSpace, pooling: str,
                 slots: int | None = None):
        """`slots`: training rows pack up to that many examples (data/packed_examples.py);
        None: one example per row. Either kind of batch is accepted (shapes tell)."""
        self.name = labels.kind
        self.labels = labels
        self.slots = slots
        self.model = Classifier(cfg, labels.num_outputs, pooling)
        self.shown = {"classification": ("loss", "accuracy", "macro_f1"),
                      "multi_label": ("loss", "macro_f1", "exact_match"),
                      "regression": ("loss", "mae", "pearson")}[labels.kind]

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        zeros = np.zeros((batch_size, seq_len), np.int32)
        per_row = (batch_size,) if self.slots is None else (batch_size, self.slots)
        batch = {"tokens": zeros, "segment_ids": zeros + 1, "positions": zeros,
                 "type_ids": zeros, "weight": np.ones(per_row, np.float32)}
        if self.labels.kind == "classification":
            batch["label"] = np.zeros(per_row, np.int32)
        elif self.labels.kind == "multi_label":
            batch["label"] = np.zeros((*per_row, self.labels.num_outputs), np.float32)
        else:
            batch["label"] = np.zeros(per_row, np.float32)
        return batch

    def sums(self, params, model_state, batch, example_ids, key, *, train, rngs=None):
        del example_ids, key
        weights, labels = batch["weight"], batch["label"]
        # Packed rows (data/packed.py) hold examples in slots: weight [batch, slots]. Each
        # example is then one more row of the sums, and an empty slot weighs 0.
        slots = weights.shape[1] if weights.ndim == 2 else None
        logits, model_state = apply_model(self.model, params, model_state,
                                          *self.model_inputs(batch), train=train, rngs=rngs,
                                          slots=slots)
        if slots is not None:
            logits = logits.reshape(-1, logits.shape[-1])
            weights = weights.reshape(-1)
            labels = labels.reshape(-1, *labels.shape[2:])
        kind = self.labels.kind
        if kind == "classification":
            sums = metrics.classification_sums(logits, labels, weights, self.labels.num_outputs)
        elif kind == "multi_label":
            sums = metrics.multi_label_sums(logits, labels, weights)
        else:
            sums = metrics.regression_sums(logits[:, 0], labels, weights)
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
        slots = batch["weight"].shape[1] if batch["weight"].ndim == 2 else None
        logits, _ = apply_model(self.model, params, model_state, *self.model_inputs(batch),
                                train=False, slots=slots)  # [batch(, slots), outputs]
        if self.labels.kind == "classification":
            return jax.nn.softmax(logits, axis=-1)
        if self.labels.kind == "multi_label":
            return jax.nn.sigmoid(logits)
        return logits[..., 0]
