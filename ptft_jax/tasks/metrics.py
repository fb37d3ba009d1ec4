"""Evaluation metrics: sums on device, metrics on the host.

The eval step returns sums over a batch whose rows carry a `weight` (0 for the rows padding
the last batch), so batches and devices add up exactly; the host accumulates them in float64
and turns them into metrics. Counts are float32 on device: exact up to 2^24 examples.
Precision or recall of a class that has no prediction or no example is 0 (as sklearn's
`zero_division=0`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ptft_jax.config.schema import Config, ConfigError

METRIC_MODES = {"loss": "min", "mse": "min", "mae": "min", "accuracy": "max",
                "macro_f1": "max", "micro_f1": "max", "macro_precision": "max",
                "macro_recall": "max", "exact_match": "max", "pearson": "max",
                # two towers (tasks/contrastive.py)
                "retrieval_mean": "max", "zero_shot_accuracy": "max",
                "zero_shot_macro_f1": "max",
                **{f"{d}_r{k}": "max" for d in ("i2t", "t2i") for k in (1, 5, 10)}}


_CLASSIFY = ("loss", "accuracy", "macro_f1", "macro_precision", "macro_recall")
# The scalar metrics each task's evaluation reports (what eval.metric and ptft sweep's
# --metric may name).
TASK_METRICS = {"classification": _CLASSIFY, "image_classification": _CLASSIFY,
                "multimodal_classification": _CLASSIFY,
                "multi_label": ("loss", "macro_f1", "micro_f1", "exact_match"),
                "regression": ("loss", "mse", "mae", "pearson"),
                "mlm": ("loss", "accuracy"), "clm": ("loss", "accuracy"),
                "contrastive": ("loss", "retrieval_mean", "zero_shot_accuracy",
                                "zero_shot_macro_f1",
                                *(f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)))}


# Which metric early stopping and the best checkpoint follow when eval.metric is auto.
DEFAULT_METRIC = {"classification": "macro_f1", "multi_label": "macro_f1",
                  "regression": "pearson", "image_classification": "accuracy",
                  "contrastive": "retrieval_mean", "multimodal_classification": "macro_f1"}


def metric_mode(name: str) -> str:
    if name not in METRIC_MODES:
        raise ValueError(f"unknown metric '{name}'; choose one of: {', '.join(METRIC_MODES)}.")
    return METRIC_MODES[name]


# ---------------------------------------------------------------------------------------------
# On device


def classification_sums(logits, labels, weights, num_classes: int) -> dict:
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    predicted = jnp.argmax(logits, axis=-1)
    confusion = jnp.einsum("n,ni,nj->ij", weights, jax.nn.one_hot(labels, num_classes),
                           jax.nn.one_hot(predicted, num_classes))
    return {"loss_sum": jnp.sum(nll * weights), "count": jnp.sum(weights),
            "confusion": confusion}


def multi_label_sums(logits, labels, weights) -> dict:
    logits = logits.astype(jnp.float32)
    bce = jnp.sum(jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits))),
                  axis=-1)
    predicted = (logits > 0).astype(jnp.float32)
    w = weights[:, None]
    return {"loss_sum": jnp.sum(bce * weights), "count": jnp.sum(weights),
            "true_pos": jnp.sum(w * predicted * labels, axis=0),
            "false_pos": jnp.sum(w * predicted * (1 - labels), axis=0),
            "false_neg": jnp.sum(w * (1 - predicted) * labels, axis=0),
            "exact_match": jnp.sum(weights * jnp.all(predicted == labels, axis=-1))}


def regression_sums(predictions, targets, weights) -> dict:
    p, t = predictions.astype(jnp.float32), targets.astype(jnp.float32)
    return {"loss_sum": jnp.sum(weights * (p - t) ** 2), "count": jnp.sum(weights),
            "abs_sum": jnp.sum(weights * jnp.abs(p - t)), "sum_p": jnp.sum(weights * p),
            "sum_t": jnp.sum(weights * t), "sum_pp": jnp.sum(weights * p * p),
            "sum_tt": jnp.sum(weights * t * t), "sum_pt": jnp.sum(weights * p * t)}


# ---------------------------------------------------------------------------------------------
# On the host


def _ratio(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def _prf(tp, fp, fn):
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return precision, recall, _ratio(2 * precision * recall, precision + recall)


def classification_metrics(sums: dict, names: list[str]) -> dict:
    confusion = np.asarray(sums["confusion"], np.float64)
    count = max(float(sums["count"]), 1.0)
    tp = np.diag(confusion)
    precision, recall, f1 = _prf(tp, confusion.sum(0) - tp, confusion.sum(1) - tp)
    out = {"loss": float(sums["loss_sum"]) / count, "accuracy": float(tp.sum()) / count,
           "macro_precision": float(precision.mean()), "macro_recall": float(recall.mean()),
           "macro_f1": float(f1.mean())}
    for i, name in enumerate(names):
        out[f"precision/{name}"] = float(precision[i])
        out[f"recall/{name}"] = float(recall[i])
        out[f"f1/{name}"] = float(f1[i])
    out["confusion"] = np.rint(confusion).astype(int).tolist()
    return out


def multi_label_metrics(sums: dict, names: list[str]) -> dict:
    count = max(float(sums["count"]), 1.0)
    tp, fp, fn = (np.asarray(sums[k], np.float64) for k in ("true_pos", "false_pos",
                                                             "false_neg"))
    precision, recall, f1 = _prf(tp, fp, fn)
    _, _, micro = _prf(tp.sum(), fp.sum(), fn.sum())
    out = {"loss": float(sums["loss_sum"]) / count, "macro_f1": float(f1.mean()),
           "micro_f1": float(micro), "exact_match": float(sums["exact_match"]) / count}
    for i, name in enumerate(names):
        out[f"precision/{name}"] = float(precision[i])
        out[f"recall/{name}"] = float(recall[i])
        out[f"f1/{name}"] = float(f1[i])
    return out


def regression_metrics(sums: dict) -> dict:
    n = max(float(sums["count"]), 1.0)
    mean_p, mean_t = float(sums["sum_p"]) / n, float(sums["sum_t"]) / n
    cov = float(sums["sum_pt"]) / n - mean_p * mean_t
    var_p = float(sums["sum_pp"]) / n - mean_p ** 2
    var_t = float(sums["sum_tt"]) / n - mean_t ** 2
    pearson = cov / np.sqrt(var_p * var_t) if var_p > 0 and var_t > 0 else 0.0
    mse = float(sums["loss_sum"]) / n
    return {"loss": mse, "mse": mse, "mae": float(sums["abs_sum"]) / n,
            "pearson": float(pearson)}


def eval_metric(cfg: Config, task) -> tuple[str, str]:
    """(name, "min" or "max") of the metric that decides the best checkpoint and early
    stopping: eval.metric, or the task's default for "auto"."""
    name = cfg.eval.metric if cfg.eval.metric != "auto" else task.default_metric
    try:
        return name, metric_mode(name)
    except ValueError as e:
        raise ConfigError(f"eval.metric: {e}") from None
