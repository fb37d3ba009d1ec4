"""The Transformer component (embeddings + layers) and the language models built on it.

`Transformer` is the reusable component: its parameters live under `transformer/` in every
model built from it, so a pretrained encoder can be restored alone into a classifier later.
`LanguageModel` adds the pretraining head: BERT's MLM head (transform + tied decoder + bias) for
encoders, GPT-2's tied LM head for decoders. Logits are returned in float32.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptft_jax.config.schema import ModelConfig
from ptft_jax.models.layers import (ACTIVATIONS, Block, constrain, dense, dtypes, embedding_init,
                                    init_recipe, layer_norm, zeros)

CHECKPOINT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def attention_mask(segment_ids):
    """[batch, len] segment ids (0 = padding) -> boolean [batch, 1, q, k]: a token attends to
    tokens of its own segment only, and padding attends to nothing."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & (segment_ids[:, None, :] != 0))[:, None, :, :]


def layer_stack(cfg: ModelConfig, causal: bool):
    """The blocks of a Transformer stack (text or ViT), with the scan and remat knobs: one
    scanned module whose parameters stack along `layers`, or a list of `layers_N` modules.
    Call it in `setup` and run it with `run_layers`."""
    block = Block
    if cfg.remat != "none":
        # `train` (argument 3, counting self) is a Python bool: static for remat.
        block = nn.remat(Block, policy=CHECKPOINT_POLICIES[cfg.remat],
                         prevent_cse=not cfg.scan_layers, static_argnums=(3,))
    if cfg.scan_layers:
        # Sown hidden states (distillation) stack along the layers too.
        stack = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        return stack(cfg, causal, name="layers")
    return [block(cfg, causal, name=f"layers_{i}") for i in range(cfg.num_layers)]


def run_layers(layers, x, mask, train: bool, scanned: bool):
    if scanned:
        return layers(x, mask, train)[0]
    for layer in layers:
        x, _ = layer(x, mask, train)
    return x


class Transformer(nn.Module):
    """Embeddings and a stack of blocks; returns hidden states [batch, len, hidden].

    Inputs: token ids; segment ids (0 = padding; packed documents or padded examples never
    attend across segments); positions (default 0..len-1); type ids (BERT's sentence A / B,
    default all 0). `train` (static) turns dropout on."""
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        dtype, param_dtype = dtypes(cfg)
        self.causal = cfg.kind == "decoder"
        self.token_embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                    param_dtype=param_dtype,
                                    embedding_init=embedding_init(cfg, ("vocab", "embed")))
        # GPT-2's released code draws positions with std 0.01, BERT's with its 0.02.
        position_std = 0.01 if init_recipe(cfg) == "gpt2" else 0.02
        self.position_embed = nn.Embed(cfg.max_len, cfg.hidden_size, dtype=dtype,
                                       param_dtype=param_dtype,
                                       embedding_init=embedding_init(cfg, ("pos", "embed"),
                                                                     position_std))
        if cfg.type_vocab_size:
            self.type_embed = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, dtype=dtype,
                                       param_dtype=param_dtype,
                                       embedding_init=embedding_init(cfg, ("type", "embed")))
        # Post-norm models normalise the embeddings; pre-norm models normalise the output.
        self.norm = layer_norm(cfg, "embed_norm" if cfg.norm == "post" else "final_norm")
        self.dropout = nn.Dropout(cfg.dropout)

        self.layers = layer_stack(cfg, self.causal)

    def __call__(self, tokens, segment_ids=None, positions=None, type_ids=None,
                 train: bool = False):
        cfg = self.cfg
        if positions is None:
            positions = jnp.arange(tokens.shape[1])[None, :]
        act = ("act_batch", "act_len", "act_embed")
        x = self._lookup(self.token_embed, tokens, "vocab", act)
        x = x + self._lookup(self.position_embed, positions, None,
                             (None, "act_len", "act_embed") if positions.shape[0] == 1 else act)
        if cfg.type_vocab_size:
            x = x + self._lookup(self.type_embed,
                                 jnp.zeros_like(tokens) if type_ids is None else type_ids,
                                 None, act)
        if cfg.norm == "post":
            x = self.norm(x)
        x = self.dropout(x, deterministic=not train or cfg.dropout == 0)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        self.sow("intermediates", "embedded", x)  # "layer 0" for distillation
        mask = None if segment_ids is None else attention_mask(segment_ids)
        x = run_layers(self.layers, x, mask, train, cfg.scan_layers)
        if cfg.norm == "pre":
            x = self.norm(x)
        return x

    def _lookup(self, embed: nn.Embed, ids, row_axis, out_axes):
        """Embedding lookup, gathering the table along `embed` first and constraining the result
        to the activation layout. (A lookup from a table sharded along `embed` comes out sharded
        along `embed`; XLA then meets the batch-sharded activations by replicating them whole.
        FSDP gathers every weight this way anyway.)"""
        dtype, _ = dtypes(self.cfg)
        table = constrain(embed.embedding, (row_axis, None))
        return constrain(jnp.take(table, ids, axis=0).astype(dtype), out_axes)

    def attend(self, x):
        """Tied output projection: hidden -> vocabulary logits, accumulated in float32."""
        dtype, _ = dtypes(self.cfg)
        table = self.token_embed.embedding.astype(dtype)
        logits = jnp.einsum("bld,vd->blv", x.astype(dtype), table,
                            preferred_element_type=jnp.float32)
        return constrain(logits, ("act_batch", "act_len", "act_vocab"))


def hidden_states(intermediates: dict, num_layers: int) -> list:
    """[embeddings, layer 1, ..., layer L] outputs [batch, len, dim] of the Transformer under
    `transformer/`, from the `intermediates` a model applied with that collection mutable
    sowed (the last one before a pre-norm model's final norm)."""
    sown = intermediates["transformer"]
    if "layers" in sown:  # scanned: one array stacked along the layers
        stacked = sown["layers"]["hidden"][0]
        layers = [stacked[i] for i in range(num_layers)]
    else:
        layers = [sown[f"layers_{i}"]["hidden"][0] for i in range(num_layers)]
    return [sown["embedded"][0], *layers]


class MlmHead(nn.Module):
    """BERT's MLM transform (dense, activation, norm) before the tied decoder."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        x = dense(cfg, cfg.hidden_size, ("embed", "mlp"), "transform")(x)
        # Keep these constraints: without them, XLA's partitioner (jax 0.10.2, Shardy) gave
        # wrong gradients for this norm on a (data 2, fsdp 2, tensor 2) mesh, while the loss
        # stayed right. tests/test_parallel.py catches it.
        act = ("act_batch", "act_len", "act_embed")
        x = constrain(ACTIVATIONS[cfg.activation](x), act)
        return constrain(layer_norm(cfg, "norm", axis_name="mlp")(x), act)


class LanguageModel(nn.Module):
    """Transformer + pretraining head -> float32 logits [batch, len, vocab].

    `features` and `logits` split the work at the vocabulary projection, so that the loss can
    compute logits a chunk of tokens at a time (see tasks/vocab_loss.py)."""
    cfg: ModelConfig

    def setup(self):
        self.transformer = Transformer(self.cfg)
        if self.cfg.kind == "encoder":
            self.mlm_head = MlmHead(self.cfg)
            self.output_bias = self.param("output_bias", zeros(("vocab",)),
                                          (self.cfg.vocab_size,), jnp.float32)

    def features(self, tokens, segment_ids=None, positions=None, type_ids=None,
                 predict_at=None, train: bool = False):
        """What the vocabulary projection reads: the last hidden states, after BERT's MLM
        transform for encoders. `predict_at` [batch, slots] gathers the positions to predict
        first, so that the transform and the projection run on those alone."""
        x = self.transformer(tokens, segment_ids, positions, type_ids, train)
        if predict_at is not None:
            x = jnp.take_along_axis(x, predict_at[..., None], axis=1)
            x = constrain(x, ("act_batch", "act_len", "act_embed"))
        return self.mlm_head(x) if self.cfg.kind == "encoder" else x

    def logits(self, features):
        logits = self.transformer.attend(features)
        return logits + self.output_bias if self.cfg.kind == "encoder" else logits

    @staticmethod
    def head_params(params):
        """The parameters `logits` reads: the tied embedding table and the output bias."""
        head = {"transformer": {"token_embed": params["transformer"]["token_embed"]}}
        if "output_bias" in params:
            head["output_bias"] = params["output_bias"]
        return head

    def __call__(self, tokens, segment_ids=None, positions=None, type_ids=None,
                 train: bool = False):
        return self.logits(self.features(tokens, segment_ids, positions, type_ids, train=train))
