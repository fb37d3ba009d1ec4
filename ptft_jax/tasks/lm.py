"""Pretraining tasks: masked LM (BERT) and causal LM (GPT), as token-level loss sums.

Randomness is drawn per example from `fold_in(key, example_id)`, so an example is masked the
same way whether it sits in a microbatch, on another device, or in one big batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ptft_jax.config.schema import ModelConfig, ObjectiveConfig
from ptft_jax.models.transformer import LanguageModel
from ptft_jax.tasks.base import Task, apply_model
from ptft_jax.tasks.vocab_loss import ModelFns, token_sums


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

    def num_slots(self, seq_len: int) -> int:
        """Masked positions per row: ceil(mask_rate x seq_len), as BERT's
        max_predictions_per_seq (rounded first, so 0.15 x 100 gives 15, not 16)."""
        return max(1, math.ceil(round(self.mask_rate * seq_len, 6)))

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig, **token_ids) -> "MlmSpec":
        return cls(mask_rate=cfg.mask_rate, mask_token_rate=cfg.mask_token_rate,
                   random_token_rate=cfg.random_token_rate, **token_ids)


def mask_positions(key, tokens, spec: MlmSpec, num_slots: int, valid):
    """BERT masking of one sequence [len], on a fixed number of slots (BERT's
    max_predictions_per_seq): round(mask_rate x eligible tokens) positions, at least one when
    any token is eligible, chosen uniformly among the eligible ones; of those,
    `mask_token_rate` become [MASK], `random_token_rate` a random token, the rest stay.
    Slots past that count point at some position and carry weight 0.

    `valid` [len] marks real tokens (not padding). Returns (inputs [len], positions [slots],
    targets [slots], weights [slots]).
    """
    eligible = valid & ~jnp.isin(tokens, jnp.asarray(spec.special_ids, tokens.dtype))
    k_order, k_how, k_random = jax.random.split(key, 3)
    # Eligible positions in random order first: the lowest scores win the slots.
    score = jnp.where(eligible, jax.random.uniform(k_order, tokens.shape), 2.0)
    _, positions = jax.lax.top_k(-score, num_slots)
    n_eligible = jnp.sum(eligible)
    n_predict = jnp.minimum(jnp.maximum(jnp.round(n_eligible * spec.mask_rate), 1), n_eligible)
    selected = jnp.arange(num_slots) < n_predict
    how = jax.random.uniform(k_how, (num_slots,))
    to_mask = selected & (how < spec.mask_token_rate)
    to_random = selected & (how >= spec.mask_token_rate) & \
        (how < spec.mask_token_rate + spec.random_token_rate)
    random_tokens = jax.random.randint(k_random, (num_slots,), spec.random_low,
                                       spec.random_high, tokens.dtype)
    targets = tokens[positions]
    replaced = jnp.where(to_mask, spec.mask_id, jnp.where(to_random, random_tokens, targets))
    inputs = tokens.at[positions].set(replaced, unique_indices=True)
    return inputs, positions, targets, selected.astype(jnp.float32)


class LanguageModelTask(Task):
    """Shared by masked and causal LM: the model, its batches of packed rows, the metrics.

    `loss_chunk_tokens`: tokens per device whose logits are made at once (0: all; see
    vocab_loss.token_sums); `data_parallel`: how many ways the rows of a traced batch are
    split across devices (1 under pmap, whose step sees one device's rows)."""
    shown = ("loss", "accuracy")

    def __init__(self, cfg: ModelConfig, loss_chunk_tokens: int = 0, data_parallel: int = 1):
        self.model = LanguageModel(cfg)
        self.loss_chunk_tokens = loss_chunk_tokens
        self.data_parallel = data_parallel

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        zeros = np.zeros((batch_size, seq_len), np.int32)
        return {"tokens": zeros, "segment_ids": zeros + 1, "positions": zeros}

    def fns(self, model_state, train: bool, rngs) -> ModelFns:
        model = self.model

        def features(params, tokens, segment_ids, positions, predict_at=None):
            out, _ = apply_model(model, params, model_state, tokens, segment_ids, positions,
                                 None, predict_at, train=train, rngs=rngs,
                                 method=model.features)
            return out

        def logits(head, feats):
            return model.apply({"params": head}, feats, method=model.logits)
        return ModelFns(features, logits, LanguageModel.head_params)

    def loss_sums(self, fns, params, features, targets, weights) -> dict:
        rows = max(1, features.shape[0] // self.data_parallel)
        return token_sums(fns, params, features, targets, weights, self.loss_chunk_tokens,
                          rows_per_device=rows)

    def metrics(self, sums) -> dict:
        count = max(float(sums["count"]), 1.0)
        return {"loss": float(sums["loss_sum"]) / count,
                "accuracy": float(sums["correct_sum"]) / count,
                "tokens_in_loss": float(sums["count"])}


class MaskedLM(LanguageModelTask):
    """BERT's masked LM. Logits are computed only at the masked slots: their hidden states
    are gathered before the MLM transform, which cuts the vocabulary projection, the largest
    cost at real vocabulary sizes, to about mask_rate of the positions."""
    name = "mlm"

    def __init__(self, cfg: ModelConfig, spec: MlmSpec, loss_chunk_tokens: int = 0,
                 data_parallel: int = 1):
        super().__init__(cfg, loss_chunk_tokens, data_parallel)
        self.spec = spec

    def sums(self, params, model_state, batch, example_ids, key, *, train, rngs=None):
        tokens = batch["tokens"]
        valid = batch["segment_ids"] != 0 if "segment_ids" in batch else \
            jnp.ones(tokens.shape, bool)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids)
        slots = self.spec.num_slots(tokens.shape[1])
        inputs, positions, targets, weights = jax.vmap(
            lambda k, t, v: mask_positions(k, t, self.spec, slots, v))(keys, tokens, valid)
        fns = self.fns(model_state, train, rngs)
        features = fns.features(params, inputs, batch.get("segment_ids"),
                                batch.get("positions"), predict_at=positions)
        return self.loss_sums(fns, params, features, targets, weights), model_state


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
        return self.loss_sums(fns, params, features, targets, weights), model_state
