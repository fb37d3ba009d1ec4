"""Pretraining tasks: masked LM (BERT) and causal LM (GPT), as token-level loss sums.

Randomness is drawn per example from `fold_in(key, example_id)`, so an example is masked the
same way whether it sits in a microbatch, on another device, or in one big batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ptft_jax.config import ModelConfig, ObjectiveConfig
from ptft_jax.models.transformer import LanguageModel
from ptft_jax.tasks.base import Task, apply_model


@dataclass(frozen=True)
class MlmSpec:
    """What masking needs to know about the tokenizer (static: closed over by the jitted step)."""
    mask_id: int
    special_ids: tuple[int, ...]  # never selected for masking (CLS, SEP, PAD, ...)
    random_low: int  # random replacements are drawn from [random_low, random_high)
    random_high: int
    mask_rate: float = 0.15
    mask_token_rate: float = 0.8
    random_token_rate: float = 0.1

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig, **token_ids) -> "MlmSpec":
        return cls(mask_rate=cfg.mask_rate, mask_token_rate=cfg.mask_token_rate,
                   random_token_rate=cfg.random_token_rate, **token_ids)


def mask_tokens(key, tokens, spec: MlmSpec, valid=None):
    """BERT masking of one sequence [len]: select `mask_rate` of the eligible tokens; of those,
    `mask_token_rate` become [MASK], `random_token_rate` a random token, the rest stay.

    Returns (inputs, targets, weights): weights are 1.0 exactly at the selected positions.
    """
    eligible = ~jnp.isin(tokens, jnp.asarray(spec.special_ids, tokens.dtype))
    if valid is not None:
        eligible &= valid
    k_select, k_how, k_random = jax.random.split(key, 3)
    selected = eligible & (jax.random.uniform(k_select, tokens.shape) < spec.mask_rate)
    how = jax.random.uniform(k_how, tokens.shape)
    to_mask = selected & (how < spec.mask_token_rate)
    to_random = selected & (how >= spec.mask_token_rate) & \
        (how < spec.mask_token_rate + spec.random_token_rate)
    random_tokens = jax.random.randint(k_random, tokens.shape, spec.random_low, spec.random_high,
                                       tokens.dtype)
    inputs = jnp.where(to_mask, spec.mask_id, jnp.where(to_random, random_tokens, tokens))
    return inputs, tokens, selected.astype(jnp.float32)


class ModelFns(NamedTuple):
    """The model split at the vocabulary projection (see LanguageModel.features / .logits)."""
    features: Callable  # (params, tokens, segment_ids, positions) -> [batch, len, dim]
    logits: Callable  # (params, features) -> float32 logits [batch, len, vocab]


def logit_sums(logits, targets, weights) -> dict:
    """Cross-entropy and accuracy sums in float32 over weighted tokens."""
    logits = logits.astype(jnp.float32)
    # One max serves the stable log-sum-exp and the accuracy (the target is among the largest
    # logits): no separate argmax pass over the [tokens, vocab] logits.
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    log_z = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= top).astype(jnp.float32)
    return {"loss_sum": jnp.sum((log_z - target_logit) * weights),
            "correct_sum": jnp.sum(correct * weights),
            "count": jnp.sum(weights)}


def token_sums(fns: ModelFns, params, features, targets, weights, chunk: int = 0) -> dict:
    """Loss sums from features, `chunk` positions of every sequence at a time (0: all at once).

    Chunks are taken along the sequence axis, so the batch axis keeps its sharding, and each
    chunk's logits are recomputed in the backward pass rather than stored: the full
    [batch, len, vocab] float32 logits never exist. That saves their memory on accelerators
    and, on CPUs, keeps each chunk in cache.
    """
    length = features.shape[1]
    if not chunk or chunk >= length:
        return logit_sums(fns.logits(params, features), targets, weights)

    def split(x):
        return x.reshape(x.shape[0], length // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(p, f, t, w):
        return logit_sums(fns.logits(p, f), t, w)

    def body(total, xs):
        return jax.tree.map(jnp.add, total, one_chunk(params, *xs)), None

    zero = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct_sum", "count")}
    total, _ = jax.lax.scan(body, zero, (split(features), split(targets), split(weights)))
    return total


class LanguageModelTask(Task):
    """Shared by masked and causal LM: the model, its batches of packed rows, the metrics."""
    shown = ("loss", "accuracy")

    def __init__(self, cfg: ModelConfig, loss_chunk: int = 0):
        self.model = LanguageModel(cfg)
        self.loss_chunk = loss_chunk

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        zeros = np.zeros((batch_size, seq_len), np.int32)
        return {"tokens": zeros, "segment_ids": zeros + 1, "positions": zeros}

    def fns(self, model_state, train: bool, rngs) -> ModelFns:
        model = self.model

        def features(params, tokens, segment_ids, positions):
            out, _ = apply_model(model, params, model_state, tokens, segment_ids, positions,
                                 train=train, rngs=rngs, method=model.features)
            return out

        def logits(params, feats):
            return model.apply({"params": params}, feats, method=model.logits)
        return ModelFns(features, logits)

    def metrics(self, sums) -> dict:
        count = max(float(sums["count"]), 1.0)
        return {"loss": float(sums["loss_sum"]) / count,
                "accuracy": float(sums["correct_sum"]) / count,
                "tokens_in_loss": float(sums["count"])}


class MaskedLM(LanguageModelTask):
    name = "mlm"

    def __init__(self, cfg: ModelConfig, spec: MlmSpec, loss_chunk: int = 0):
        super().__init__(cfg, loss_chunk)
        self.spec = spec

    def sums(self, params, model_state, batch, example_ids, key, *, train, rngs=None):
        tokens = batch["tokens"]
        valid = batch["segment_ids"] != 0 if "segment_ids" in batch else None
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids)
        if valid is None:
            inputs, targets, weights = jax.vmap(
                lambda k, t: mask_tokens(k, t, self.spec))(keys, tokens)
        else:
            inputs, targets, weights = jax.vmap(
                lambda k, t, v: mask_tokens(k, t, self.spec, v))(keys, tokens, valid)
        fns = self.fns(model_state, train, rngs)
        features = fns.features(params, inputs, batch.get("segment_ids"),
                                batch.get("positions"))
        return token_sums(fns, params, features, targets, weights, self.loss_chunk), model_state


class CausalLM(LanguageModelTask):
    """Next-token prediction: position t predicts token t+1 (the last position has no target)."""
    name = "clm"

    def sums(self, params, model_state, batch, example_ids, key, *, train, rngs=None):
        tokens = batch["tokens"]
        fns = self.fns(model_state, train, rngs)
        features = fns.features(params, tokens, batch.get("segment_ids"),
                                batch.get("positions"))
        targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
        has_next = jnp.arange(tokens.shape[1]) < tokens.shape[1] - 1
        weights = jnp.broadcast_to(has_next, tokens.shape).astype(jnp.float32)
        if "segment_ids" in batch:  # no target across a document boundary or into padding
            seg = batch["segment_ids"]
            nxt = jnp.concatenate([seg[:, 1:], jnp.zeros_like(seg[:, :1])], axis=1)
            weights = weights * ((nxt == seg) & (nxt != 0))
        return token_sums(fns, params, features, targets, weights, self.loss_chunk), model_state
