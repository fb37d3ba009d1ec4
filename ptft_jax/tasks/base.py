"""What a task is: the unit of variation between training jobs; the loop and the step are one.

A task says what its batches hold (`example_batch`, for shapes), builds its model, turns a
batch into *sums* (loss, loss weight, metric counts) plus the model's new mutable state, and
turns accumulated sums into metrics. Sums rather than means make microbatches, devices and
the last partial eval batch add up exactly: mean = sum of sums / sum of counts.

Every task's sums hold `loss_sum` and `count` (the loss is `loss_sum / count`; gradients are
those of that mean). Masked LM and causal LM (tasks/lm.py) and classification, multi-label
classification and regression (tasks/classify.py) are tasks.
"""
from __future__ import annotations

import abc
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from tokenizers import Tokenizer

from ptft_jax.data.labelled import LabelSpace
from ptft_jax.tasks.metrics import DEFAULT_METRIC, classification_metrics


def apply_model(model: nn.Module, params, model_state: dict, *args, train: bool, rngs=None,
                method=None, **kwargs):
    """`model.apply` with the mutable collections in `model_state` (e.g. BatchNorm statistics):
    updated in training, read-only in evaluation. Returns (output, new model_state)."""
    variables = {"params": params, **model_state}
    if train and model_state:
        out, updates = model.apply(variables, *args, train=train, rngs=rngs, method=method,
                                   mutable=list(model_state), **kwargs)
        return out, {**model_state, **updates}
    return model.apply(variables, *args, train=train, rngs=rngs, method=method,
                       **kwargs), model_state


class Task(abc.ABC):
    """Everything the loop, the step, evaluation, prediction and the benchmarks ask of a task.
    A task is built with all it needs (labels, tokenizer); nothing is set on it afterwards."""
    name: str
    model: nn.Module
    # Metrics shown on the terminal each log step (all of them go to JSONL / TensorBoard).
    shown: tuple[str, ...] = ("loss", "accuracy")
    # The label space a finetuning task's head predicts (saved as labels.json), if any.
    labels: LabelSpace | None = None
    # A task that tokenizes on its own (zero-shot class prompts) holds its tokenizer.
    tokenizer: Tokenizer | None = None
    # True: evaluation scores the split as a whole from the model's outputs (`score_split`),
    # not by adding per-batch sums.
    scores_split: bool = False
    # model_state collections the task never changes (a distillation teacher): not averaged
    # across devices under pmap, where the others (BatchNorm statistics) are.
    constant_state: tuple[str, ...] = ()

    @property
    def eval_shown(self) -> tuple[str, ...]:
        """Metrics shown on the terminal at each evaluation."""
        return self.shown

    @property
    def default_metric(self) -> str:
        """What early stopping and the best checkpoint follow when eval.metric is auto."""
        return DEFAULT_METRIC.get(self.name, "loss")

    @abc.abstractmethod
    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        """A batch of the right keys, shapes and dtypes (zeros): what initialisation traces."""

    def init_variables(self, rng, batch: dict) -> dict:
        """The model's variables (params and any mutable collections), boxed with their
        logical axis names."""
        return self.model.init({"params": rng, "dropout": rng}, *self.model_inputs(batch),
                               train=False)

    def model_inputs(self, batch: dict) -> tuple:
        return (batch["tokens"], batch.get("segment_ids"), batch.get("positions"),
                batch.get("type_ids"))

    @abc.abstractmethod
    def sums(self, params, model_state: dict, batch: dict, example_ids, key, *, train: bool,
             rngs=None) -> tuple[dict, dict]:
        """(sums, new model_state) for one batch. `example_ids` are the rows' global indices
        (randomness keyed per example does not depend on microbatches or devices)."""

    @abc.abstractmethod
    def metrics(self, sums: dict[str, np.ndarray]) -> dict[str, Any]:
        """Metrics from sums accumulated on the host (NumPy, float64)."""

    def predict(self, params, model_state, batch: dict) -> Any:
        """Per row outputs (an array of probabilities or values, or a dict of embeddings) for
        `ptft predict` and split scoring; run by the step's jitted predict."""
        raise NotImplementedError(f"train.task {self.name} has no per-example predictions; "
                                  f"predict with a finetuned run.")

    def split_inputs(self, examples) -> dict[str, Any]:
        """With `scores_split`: further example sets whose outputs the split's score needs
        (e.g. class-name prompts for zero-shot), by name."""
        return {}

    def score_split(self, outputs: dict[str, np.ndarray], examples,
                    extra: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
        """With `scores_split`: the split's metrics from every example's predict outputs (in
        order) and those of `split_inputs`. Computes on the host; runs nothing."""
        raise NotImplementedError


class ClassNamesTask(Task):
    """A task whose model gives logits over `class_names` (image and image-text
    classification): classification metrics, softmax probabilities as predictions."""
    class_names: tuple[str, ...]

    def metrics(self, sums) -> dict:
        return classification_metrics(sums, list(self.class_names))

    def predict(self, params, model_state, batch):
        logits, _ = apply_model(self.model, params, model_state, *self.model_inputs(batch),
                                train=False)
        return jax.nn.softmax(logits, axis=-1)

def add_sums(total: dict | None, sums: dict) -> dict:
    """Host-side accumulation in float64 (eval passes and log intervals)."""
    sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
    if total is None:
        return sums
    return {k: total[k] + sums[k] for k in total}
