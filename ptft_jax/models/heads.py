"""Task heads, and the classifier that puts one on a Transformer component.

`Classifier` keeps the component under `transformer/` (the same paths as in `LanguageModel`),
so a pretrained component restores into it by path, and adds `head/`: pooling, BERT's pooler
(dense + tanh, for CLS pooling) and an output projection. One head serves single-label and
multi-label classification and regression; only the number of outputs and the loss differ.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ptft_jax.config.schema import ModelConfig
from ptft_jax.models.layers import constrain, dense
from ptft_jax.models.transformer import Transformer

POOLINGS = ("cls", "mean", "last")


def pool(hidden, segment_ids, pooling: str):
    """[batch, len, dim] -> [batch, dim]: the first token (CLS), the mean over real tokens, or
    the last real token (what a causal decoder has read everything up to)."""
    if pooling == "cls":
        return hidden[:, 0]
    valid = (segment_ids != 0) if segment_ids is not None else \
        jnp.ones(hidden.shape[:2], bool)
    if pooling == "mean":
        weights = valid.astype(hidden.dtype)[..., None]
        return jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1)
    last = jnp.maximum(jnp.sum(valid, axis=1) - 1, 0)  # padding is at the end of a row
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def pool_segments(hidden, segment_ids, positions, pooling: str, slots: int):
    """[batch, len, dim] -> [batch, slots, dim]: `pool` for each of the examples packed into a
    row, segment s + 1 in slot s (an empty slot pools to zeros). One [slots, len] weight
    matrix per row picks the segment's first token (CLS), averages its tokens (mean) or picks
    its last (last), applied as a matmul."""
    member = segment_ids[:, :, None] == jnp.arange(1, slots + 1)[None, None, :]  # [b, l, s]
    if pooling == "cls":
        member &= (positions == 0)[:, :, None]
    elif pooling == "last":  # the token whose successor belongs to another segment
        following = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
        member &= (following != segment_ids)[:, :, None]
    weights = member.astype(jnp.float32)
    if pooling == "mean":
        weights = weights / jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1)
    return jnp.einsum("bls,bld->bsd", weights.astype(hidden.dtype), hidden)


class ClassifierHead(nn.Module):
    cfg: ModelConfig
    num_outputs: int
    pooling: str

    def setup(self):
        cfg = self.cfg
        if self.pooling == "cls":  # BERT's pooler, which its pretraining also trained
            self.pooler = dense(cfg, cfg.hidden_size, ("embed", None), None)
        # Named as the compact form named it: dropout draws its masks by module path, so a
        # run (and a resumed one) keeps drawing the same masks as before the change.
        self.Dropout_0 = nn.Dropout(cfg.dropout)
        self.out = dense(cfg, self.num_outputs, ("embed", None), None)

    def features(self, hidden, segment_ids, positions=None, slots: int | None = None):
        """What the output layer reads: the pooled hidden states, through BERT's pooler
        (dense + tanh) for CLS pooling (HF's `pooler_output`); [batch, slots, dim] for rows
        of `slots` packed examples."""
        x = pool(hidden, segment_ids, self.pooling) if slots is None else \
            pool_segments(hidden, segment_ids, positions, self.pooling, slots)
        return jnp.tanh(self.pooler(x)) if self.pooling == "cls" else x

    def __call__(self, hidden, segment_ids, train: bool = False, positions=None,
                 slots: int | None = None):
        x = self.Dropout_0(self.features(hidden, segment_ids, positions, slots),
                         deterministic=not train or self.cfg.dropout == 0)
        x = constrain(x, ("act_batch",) + (None,) * (x.ndim - 1))
        return self.out(x).astype(jnp.float32)


class Classifier(nn.Module):
    """Transformer component + classification / regression head -> float32 [batch, outputs]."""
    cfg: ModelConfig
    num_outputs: int
    pooling: str = "cls"

    def setup(self):
        self.transformer = Transformer(self.cfg)
        self.head = ClassifierHead(self.cfg, self.num_outputs, self.pooling)

    def __call__(self, tokens, segment_ids=None, positions=None, type_ids=None,
                 train: bool = False, slots: int | None = None):
        """`slots`: rows pack up to that many examples (segments 1..slots): the outputs are
        [batch, slots, outputs]. None: one example per row, [batch, outputs]."""
        hidden = self.transformer(tokens, segment_ids, positions, type_ids, train)
        return self.head(hidden, segment_ids, train, positions, slots)
