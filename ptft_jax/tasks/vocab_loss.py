"""Cross-entropy over a vocabulary: the loss that dominates LM steps at real vocabulary sizes.

At 30k-50k tokens the vocabulary projection and its float32 [tokens, vocab] logits cost more
than the layers of a small model. `token_sums` computes the loss either at once (plain
autodiff) or a chunk of tokens at a time with the gradient fused into the forward pass:
each chunk's logits are made, turned into the loss and d(loss)/d(logits), and pushed back
through the projection before the next chunk starts. So the full logits never exist, and
unlike recomputing each chunk in the backward pass (jax.checkpoint), no projection is done
twice: the FLOPs are those of the unchunked loss.

Chunks cover `rows x positions` tokens. Their size has a floor, because every chunk reads
the whole [vocab, dim] table three times (logits, input gradient, table gradient): the old
cache-sized heuristic cut 4 positions at a time at a 50k vocabulary and made the step 1.5x
slower. Chunking is the memory option, off by default: on the 2-core CPU the fused form is
slower than plain autodiff of the whole loss even as one chunk (4.0 s against 3.2 s for
gpt-mini, batch 8 x 256, vocabulary 50257). See benchmarks/loss_chunk.py and its results.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

SUM_KEYS = ("loss_sum", "correct_sum", "count")

# objective.loss_chunk: null. Measured on the 2-core AVX2 CPU (benchmarks/loss_chunk.py; results
# in benchmarks/results/cpu-*/loss-chunk-*.md): chunks of 512-1024 tokens were within noise of no
# chunking at 30522 and 50257 tokens (batch 8 x 256) but 6-9% slower at 8192, and 4096-token
# chunks were 7-10% slower at 50257 (batch 32 x 256). So the default is no chunking, on every
# backend (no GPU measurement yet); chunking is the memory option: at gpt2-small, batch
# 16 x 1024, 2048-token chunks cut the step's temporaries by 4.8 GiB.
LOSS_CHUNK_AUTO_TOKENS = 0


class ModelFns(NamedTuple):
    """The model split at the vocabulary projection (see LanguageModel.features / .logits).

    `head_params` picks the parameters `logits` reads, so that the chunked loss carries a
    gradient accumulator for those alone, not for the whole model."""
    features: Callable  # (params, tokens, segment_ids, positions, ...) -> [batch, len, dim]
    logits: Callable  # (head_params, features) -> float32 logits [batch, len, vocab]
    head_params: Callable = lambda params: params


def logit_sums(logits, targets, weights) -> dict:
    """Cross-entropy and accuracy sums in float32 over weighted tokens."""
    logits = logits.astype(jnp.float32)
    # One max serves the stable log-sum-exp and the accuracy (the target is among the largest
    # logits): no separate argmax pass over the [tokens, vocab] logits.
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    log_z = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
    return _sums(logits, top, log_z, targets, weights)


def _sums(logits, top, log_z, targets, weights) -> dict:
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (target_logit >= top).astype(jnp.float32)
    return {"loss_sum": jnp.sum((log_z - target_logit) * weights),
            "correct_sum": jnp.sum(correct * weights),
            "count": jnp.sum(weights)}


def _sums_and_dlogits(logits, targets, weights):
    """logit_sums, and d(loss_sum)/d(logits) = weight * (softmax - one_hot(target))."""
    logits = logits.astype(jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    exp = jnp.exp(logits - top)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    sums = _sums(logits, top[..., 0], (top + jnp.log(total))[..., 0], targets, weights)
    is_target = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == \
        targets[..., None]
    dlogits = (exp / total - is_target) * weights[..., None]
    return sums, dlogits


def positions_per_chunk(rows: int, length: int, chunk_tokens: int) -> int:
    """The positions per chunk: the smallest divisor of `length` whose chunk of `rows` rows
    holds at least `chunk_tokens` tokens (the matmul-size floor); `length` (one chunk) when
    chunking is off (0) or no smaller chunk reaches the floor."""
    if chunk_tokens <= 0 or rows * length <= chunk_tokens:
        return length
    for c in range(1, length + 1):
        if length % c == 0 and rows * c >= chunk_tokens:
            return c
    return length


def token_sums(fns: ModelFns, params, features, targets, weights, chunk_tokens: int = 0,
               rows_per_device: int | None = None) -> dict:
    """Loss sums over features [rows, len, dim], in chunks of at least `chunk_tokens` tokens
    per device (0: all at once). Chunks are cut along the position axis, so the row axis
    keeps its data-parallel sharding; `rows_per_device` (default: all rows) sizes them."""
    rows, length = features.shape[:2]
    c = positions_per_chunk(rows_per_device or rows, length, chunk_tokens)
    head = fns.head_params(params)
    with jax.named_scope("vocab_loss"):  # what profiles attribute the loss's ops to
        if c == length:
            return logit_sums(fns.logits(head, features), targets, weights)
        return _chunked_sums(fns.logits, c, head, features, targets, weights)


def _chunked_sums(logits_fn, c: int, head, features, targets, weights):
    rows, length = features.shape[:2]

    def split(x):  # [rows, len, ...] -> [chunks, rows, c, ...]
        return x.reshape(rows, length // c, c, *x.shape[2:]).swapaxes(0, 1)

    def add(a, b):
        return jax.tree.map(jnp.add, a, b)

    zero = {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}

    @jax.custom_vjp
    def chunked(head, features, targets, weights):
        def body(total, chunk):
            f, t, w = chunk
            return add(total, logit_sums(logits_fn(head, f), t, w)), None
        return jax.lax.scan(body, zero, (split(features), split(targets), split(weights)))[0]

    def forward(head, features, targets, weights):
        def body(carry, chunk):
            total, d_head = carry
            f, t, w = chunk
            logits, pullback = jax.vjp(logits_fn, head, f)
            sums, dlogits = _sums_and_dlogits(logits, t, w)
            dh, df = pullback(dlogits.astype(logits.dtype))
            return (add(total, sums), add(d_head, dh)), df

        d_zero = jax.tree.map(jnp.zeros_like, head)
        (total, d_head), d_feats = jax.lax.scan(
            body, (zero, d_zero), (split(features), split(targets), split(weights)))
        d_feats = d_feats.swapaxes(0, 1).reshape(features.shape)
        return total, (d_head, d_feats)

    def backward(residuals, cotangent):
        # Only loss_sum has a gradient: accuracy and count are step functions of the logits.
        d_head, d_feats = residuals
        g = cotangent["loss_sum"]
        return (jax.tree.map(lambda x: (x * g).astype(x.dtype), d_head),
                (d_feats * g).astype(d_feats.dtype), None, None)

    chunked.defvjp(forward, backward)
    return chunked(head, features, targets, weights)
