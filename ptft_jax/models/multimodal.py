"""Multimodal models built from an image tower and a text tower.

Both hold their encoders under `image/` (a ViT or ResNet, as in `ImageClassifier`) and `text/`
(the `Transformer` component, as under `transformer/` in the text models), so a component
pretrained on its own, or one aligned by a contrastive run, restores into either by path.

- `TwoTower`: each tower's pooled features projected into one shared space and L2-normalised
  (`image_proj/`, `text_proj/`), plus the learned temperature and SigLIP bias under
  `contrastive/` (CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023; the temperature is
  stored as log(1 / T), as CLIP does, so it stays positive).
- `FusionClassifier`: the towers' outputs meet under `fusion/` and a head under `head/`:
  concatenation (pooled features into one hidden layer), a gated sum (Arevalo et al. 2017's
  gated multimodal unit), or cross-attention blocks in which the text tokens attend to the
  image tokens. Fusion blocks are named `block_N`, not `layers_N`: layer-wise rules count
  the towers' layers, and the fusion layers train with the head.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptft_jax.config.schema import ModelConfig
from ptft_jax.models.heads import pool
from ptft_jax.models.layers import ACTIVATIONS, Attention, Mlp, constrain, dense, layer_norm
from ptft_jax.models.transformer import Transformer
from ptft_jax.models.vision import image_encoder

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned scale at 100


def l2_normalize(x):
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class ContrastiveScale(nn.Module):
    """The learned log inverse temperature (`scale`) and, for SigLIP, the logit `bias`."""
    temperature: float
    bias: float
    learn_temperature: bool = True

    @nn.compact
    def __call__(self):
        scale = self.param("scale", nn.initializers.constant(math.log(1 / self.temperature)),
                           (), jnp.float32)
        bias = self.param("bias", nn.initializers.constant(self.bias), (), jnp.float32)
        if not self.learn_temperature:
            scale = jax.lax.stop_gradient(scale)
        return jnp.exp(jnp.minimum(scale, MAX_LOGIT_SCALE)), bias


class TwoTower(nn.Module):
    image_cfg: ModelConfig
    text_cfg: ModelConfig
    projection_dim: int
    text_pooling: str = "mean"
    temperature: float = 0.07
    bias: float = -10.0
    learn_temperature: bool = True
    bn_axis_name: str | None = None

    def setup(self):
        self.image = image_encoder(self.image_cfg, self.bn_axis_name)
        self.text = Transformer(self.text_cfg)
        self.image_proj = dense(self.image_cfg, self.projection_dim, ("embed", None),
                                "image_proj")
        self.text_proj = dense(self.text_cfg, self.projection_dim, ("embed", None), "text_proj")
        self.contrastive = ContrastiveScale(self.temperature, self.bias, self.learn_temperature)

    def embed_images(self, images, train: bool = False):
        """Unit-length float32 embeddings [batch, projection_dim] of float images."""
        x = self.image(images, train)
        return l2_normalize(self.image_proj(constrain(x, ("act_batch", None))))

    def embed_texts(self, tokens, segment_ids=None, positions=None, type_ids=None,
                    train: bool = False):
        """Unit-length float32 embeddings of token rows (padding has segment id 0)."""
        hidden = self.text(tokens, segment_ids, positions, type_ids, train)
        x = pool(hidden, segment_ids, self.text_pooling)
        return l2_normalize(self.text_proj(constrain(x, ("act_batch", None))))

    def __call__(self, images, tokens, segment_ids=None, positions=None, type_ids=None,
                 train: bool = False):
        """(image embeddings, text embeddings, logit scale, logit bias)."""
        scale, bias = self.contrastive()
        return (self.embed_images(images, train),
                self.embed_texts(tokens, segment_ids, positions, type_ids, train), scale, bias)


class CrossBlock(nn.Module):
    """Pre-norm: text tokens attend to image tokens, then an MLP, each with a residual."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, image_tokens, train: bool = False):
        cfg = self.cfg
        dropout = nn.Dropout(cfg.dropout, deterministic=not train or cfg.dropout == 0)
        kv = layer_norm(cfg, "kv_norm")(image_tokens)
        # Pre-norm blocks: GPT-2's initialisation, residual projections scaled down.
        x = x + dropout(Attention(cfg, False, recipe="gpt2", name="attn")(
            layer_norm(cfg, "attn_norm")(x), None, kv=kv))
        x = x + dropout(Mlp(cfg, recipe="gpt2", name="mlp")(layer_norm(cfg, "mlp_norm")(x)))
        return constrain(x, ("act_batch", "act_len", "act_embed"))


class Fusion(nn.Module):
    """The towers' outputs -> one feature vector [batch, hidden_size] (model.fusion)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, image, text, segment_ids=None, train: bool = False):
        cfg = self.cfg
        act = ACTIVATIONS[cfg.activation]
        width = cfg.hidden_size
        if cfg.fusion == "concat":
            x = jnp.concatenate([image.astype(text.dtype), text], axis=-1)
            return act(dense(cfg, width, (None, "mlp"), "hidden")(x))
        if cfg.fusion == "gated":
            h_image = jnp.tanh(dense(cfg, width, ("embed", "mlp"), "image_in")(image))
            h_text = jnp.tanh(dense(cfg, width, ("embed", "mlp"), "text_in")(text))
            both = jnp.concatenate([image.astype(text.dtype), text], axis=-1)
            gate = jax.nn.sigmoid(dense(cfg, width, (None, "mlp"), "gate")(both))
            return gate * h_image + (1 - gate) * h_text
        # cross_attention: image [batch, tokens, width_i], text [batch, len, width_t]
        kv = dense(cfg, width, ("embed", "mlp"), "image_in")(image)
        x = dense(cfg, width, ("embed", "mlp"), "text_in")(text)
        for i in range(cfg.num_layers):
            x = CrossBlock(cfg, name=f"block_{i}")(x, kv, train)
        x = layer_norm(cfg, "final_norm")(x)
        return pool(x, segment_ids, "mean")


class FusionClassifier(nn.Module):
    """Image tower + text tower + fusion + linear head -> float32 logits [batch, classes]."""
    cfg: ModelConfig  # the fusion layers
    image_cfg: ModelConfig
    text_cfg: ModelConfig
    num_classes: int
    text_pooling: str = "mean"
    bn_axis_name: str | None = None

    def setup(self):
        self.image = image_encoder(self.image_cfg, self.bn_axis_name)
        self.text = Transformer(self.text_cfg)
        self.fusion = Fusion(self.cfg)
        self.head_dropout = nn.Dropout(self.cfg.dropout)
        self.head = dense(self.cfg, self.num_classes, ("embed", None), "head")

    def __call__(self, images, tokens, segment_ids=None, positions=None, type_ids=None,
                 train: bool = False):
        tokens_wanted = self.cfg.fusion == "cross_attention"
        image = self.image(images, train, pooled=not tokens_wanted)
        text = self.text(tokens, segment_ids, positions, type_ids, train)
        if not tokens_wanted:
            text = pool(text, segment_ids, self.text_pooling)
        x = self.fusion(image, text, segment_ids, train)
        x = self.head_dropout(x, deterministic=not train or self.cfg.dropout == 0)
        return self.head(constrain(x, ("act_batch", None))).astype(jnp.float32)
