"""Contrastive image-text alignment of two towers: CLIP's softmax loss or SigLIP's sigmoid
loss, over the global batch.

Under `jax.jit` the batch is one global array, so the [batch, batch] similarities hold every
negative of the global batch whatever the mesh (XLA gathers the embeddings it needs). Under
`pmap` each device all-gathers the other devices' embeddings and scores its own rows against
all of them; the step then adds the devices' sums, so the loss equals the one-device loss and
autodiff's transpose of the gather returns every device's share of each gradient. Microbatches
would drop negatives, so `validate()` refuses `train.grad_accum` > 1 for this task.

Rows with weight 0 (the padding of a last eval batch) are neither scored nor used as
negatives. Evaluation embeds the whole split once and computes, on the host, retrieval
recall@1/5/10 in both directions (pairs that share a text count as each other's matches) and
zero-shot classification: every class name goes through every prompt template, the text
embeddings of a class are averaged, and each image takes the class nearest to it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ptft_jax.config.schema import AugmentConfig, ModelConfig, ObjectiveConfig
from ptft_jax.data.batching import PaddedBatches
from ptft_jax.data.labelled import predict_examples
from ptft_jax.models.multimodal import TwoTower
from ptft_jax.tasks import metrics
from ptft_jax.tasks.image_text import ImageTextTask

RECALL_AT = (1, 5, 10)
NEG_INF = -1e9


def pair_losses(image_emb, text_emb, scale, bias, weights, kind: str, axis_name=None):
    """Per row of this device's batch: the pair's contrastive loss against every valid pair
    of the global batch, and whether its own text is its nearest one (in-batch accuracy).

    CLIP: (image->text cross-entropy + text->image cross-entropy) / 2, so the mean over rows
    is CLIP's symmetric loss. SigLIP: the row's sum over every text of -log sigmoid(z * logit)
    (z = 1 for its own text, -1 otherwise), whose mean over rows is SigLIP's loss."""
    all_images, all_texts, all_weights = image_emb, text_emb, weights
    offset = 0
    if axis_name is not None:
        all_images, all_texts, all_weights = (jax.lax.all_gather(x, axis_name, tiled=True)
                                              for x in (image_emb, text_emb, weights))
        offset = jax.lax.axis_index(axis_name) * image_emb.shape[0]
    rows = offset + jnp.arange(image_emb.shape[0])
    own = jax.nn.one_hot(rows, all_texts.shape[0], dtype=jnp.float32)
    valid_cols = (all_weights > 0)[None, :]
    i2t = scale * image_emb @ all_texts.T  # [rows, global]
    t2i = scale * text_emb @ all_images.T
    if kind == "clip":
        def xent(logits):
            logits = jnp.where(valid_cols, logits, NEG_INF)
            return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(logits * own, axis=-1)
        loss = (xent(i2t) + xent(t2i)) / 2
    else:
        z = 2 * own - 1
        terms = -jax.nn.log_sigmoid(z * (i2t + bias))
        loss = jnp.sum(jnp.where(valid_cols, terms, 0.0), axis=-1)
    nearest = jnp.argmax(jnp.where(valid_cols, i2t, NEG_INF), axis=-1)
    return loss, (nearest == rows).astype(jnp.float32)


class ContrastiveTask(ImageTextTask):
    name = "contrastive"
    shown = ("loss", "batch_i2t_accuracy")
    eval_shown = ("loss", "i2t_r1", "t2i_r1", "retrieval_mean", "zero_shot_accuracy")
    scores_split = True

    def __init__(self, image_cfg: ModelConfig, text_cfg: ModelConfig, projection_dim: int,
                 text_pooling: str, objective: ObjectiveConfig, aug: AugmentConfig,
                 tokenizer=None, seq_len: int = 0, prompts=("{}",), class_names=None,
                 axis_name: str | None = None):
        self.image_cfg, self.text_cfg, self.aug = image_cfg, text_cfg, aug
        self.kind = objective.contrastive_loss
        self.axis_name = axis_name  # pmap: gather the other devices' embeddings
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.prompts, self.class_names = list(prompts), class_names
        self.model = TwoTower(image_cfg, text_cfg, projection_dim, text_pooling,
                              objective.temperature, objective.siglip_bias,
                              objective.learn_temperature, axis_name)

    def sums(self, params, model_state, batch, example_ids, key, *, train, rngs=None):
        (image_emb, text_emb, scale, bias), model_state = self.apply(
            params, model_state, batch, example_ids, key, train, rngs)
        weights = batch["weight"]
        loss, correct = pair_losses(image_emb, text_emb, scale, bias, weights, self.kind,
                                    self.axis_name)
        sums = {"loss_sum": jnp.sum(loss * weights), "count": jnp.sum(weights),
                "correct": jnp.sum(correct * weights),
                # The learned temperature, weighted so that summed over devices and steps it
                # averages like the loss.
                "temperature_sum": jnp.sum(weights) / scale}
        return sums, model_state

    def metrics(self, sums) -> dict:
        count = max(float(sums["count"]), 1.0)
        return {"loss": float(sums["loss_sum"]) / count,
                "batch_i2t_accuracy": float(sums["correct"]) / count,
                "temperature": float(sums["temperature_sum"]) / count}

    def predict(self, params, model_state, batch):
        """Per row: both embeddings and the pair's loss within this batch (what evaluation
        reads: one pass over the split)."""
        (image_emb, text_emb, scale, bias), _ = self.apply(params, model_state, batch, None,
                                                            None, False)
        loss, _ = pair_losses(image_emb, text_emb, scale, bias, batch["weight"], self.kind)
        return {"image": image_emb, "text": text_emb, "loss": loss}

    # -----------------------------------------------------------------------------------------
    # Evaluation over a whole split, from every example's embeddings (train/evaluate.py)

    def split_inputs(self, examples) -> dict:
        if not self.class_names or examples.label_ids is None:
            return {}
        return {"class_prompts": ClassPrompts(self, self.class_names)}

    def score_split(self, outputs, examples, extra) -> dict:
        metrics = {"loss": float(np.mean(outputs["loss"])) if len(outputs["loss"]) else 0.0}
        metrics.update(retrieval_recall(outputs["image"], outputs["text"],
                                        examples.caption_groups()))
        if "class_prompts" in extra:
            classes = class_embeddings(extra["class_prompts"]["text"], len(self.class_names),
                                       len(self.prompts))
            labels = examples.label_ids[examples.index]
            metrics.update(zero_shot(outputs["image"], classes, labels, self.class_names))
        return metrics


class ClassPrompts(PaddedBatches):
    """Each class name through every prompt template, as rows of text (with blank images)
    for the two-tower model's predict: their text embeddings are the zero-shot classes."""

    def __init__(self, task: ContrastiveTask, names):
        texts = [t.format(n) for n in names for t in task.prompts]
        self.texts = predict_examples(texts, task.tokenizer, task.seq_len, "encoder")
        self.image_shape = (task.image_cfg.image_size, task.image_cfg.image_size,
                            task.image_cfg.channels)

    def __len__(self) -> int:
        return len(self.texts)

    def rows(self, index) -> dict[str, np.ndarray]:
        out = self.texts.rows(index)
        out["image"] = np.zeros((len(index), *self.image_shape), np.uint8)
        return out


def class_embeddings(text_emb: np.ndarray, classes: int, prompts: int) -> np.ndarray:
    """[classes, dim]: the prompts' text embeddings averaged over templates and normalised
    again (CLIP's prompt ensembling)."""
    mean = text_emb.reshape(classes, prompts, -1).mean(axis=1)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def retrieval_recall(image_emb, text_emb, groups, ks=RECALL_AT, chunk: int = 1024) -> dict:
    """Recall@k both ways: the share of images whose best-scoring correct text (one with the
    same caption group) ranks within the top k of all texts, and of texts likewise for
    images. Ties count against the query (a text scored like the right one outranks it)."""
    groups = np.asarray(groups)

    def recall(queries, keys):
        hits = np.zeros(len(ks))
        for start in range(0, len(queries), chunk):
            sim = queries[start:start + chunk] @ keys.T
            same = groups[start:start + chunk, None] == groups[None, :]
            best = np.max(np.where(same, sim, -np.inf), axis=1)
            rank = np.sum(sim > best[:, None], axis=1) + \
                np.sum((sim == best[:, None]) & ~same, axis=1)
            hits += [np.sum(rank < k) for k in ks]
        return hits / max(len(queries), 1)
    i2t, t2i = recall(image_emb, text_emb), recall(text_emb, image_emb)
    out = {f"i2t_r{k}": float(v) for k, v in zip(ks, i2t)}
    out.update({f"t2i_r{k}": float(v) for k, v in zip(ks, t2i)})
    out["retrieval_mean"] = float(np.mean([*i2t, *t2i]))
    return out


def zero_shot(image_emb, class_emb, labels, names) -> dict:
    """Accuracy and macro F1 of nearest-class predictions (labels: ids into `names`)."""
    predicted = np.argmax(image_emb @ class_emb.T, axis=-1)
    n = len(names)
    valid = (labels >= 0) & (labels < n)
    confusion = np.zeros((n, n))
    np.add.at(confusion, (labels[valid], predicted[valid]), 1.0)
    m = metrics.classification_metrics({"confusion": confusion, "count": valid.sum(),
                                           "loss_sum": 0.0}, list(names))
    return {"zero_shot_accuracy": m["accuracy"], "zero_shot_macro_f1": m["macro_f1"]}
