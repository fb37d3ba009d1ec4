"""Transformer building blocks shared by the encoder (BERT-style) and decoder (GPT-style).

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, ...) and
activations are constrained with `act_*` names; `ptft_jax.core.mesh.LOGICAL_RULES` maps both to mesh
axes. Parameters are stored in `param_dtype`; matmuls run in `dtype`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptft_jax.config.schema import ModelConfig

INIT_STD = 0.02  # BERT's and GPT-2's weight scale; ViT's positions use it too

ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


def dtypes(cfg: ModelConfig) -> tuple[Any, Any]:
    """(compute dtype, parameter dtype). 'auto' computes in bfloat16 on GPU/TPU, float32 on CPU."""
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return jnp.dtype(dtype), jnp.dtype(cfg.param_dtype)


def normal(std: float, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


# ---------------------------------------------------------------------------------------------
# Initialisation: each model family starts as its published recipe says. A from-scratch model
# trains as its reference does only if it starts like it: one N(0, 0.02) for every kernel
# (BERT's scale) made a width-192 ViT learn at a fraction of the speed of the same ViT with
# PyTorch's or the ViT paper's initialisation (issue 23; benchmarks/init_parity.py measures it).


def init_recipe(cfg: ModelConfig) -> str:
    """The published initialisation a model follows: 'vit' for ViTs, 'gpt2' for pre-norm
    Transformers (GPT-2's), 'bert' for post-norm ones (BERT's)."""
    if cfg.kind == "vit":
        return "vit"
    return "gpt2" if cfg.norm == "pre" else "bert"


def kernel_init(cfg: ModelConfig, in_axis=-2, out_axis=-1, residual: bool = False,
                recipe: str | None = None):
    """A matmul kernel's initialiser by the model's recipe (`init_recipe`, or `recipe`):

    - vit (Dosovitskiy et al. 2021, google-research/vision_transformer): Xavier-uniform,
      Var = 2 / (fan_in + fan_out), the fans taken over `in_axis` and `out_axis` (a
      [width, heads, head_dim] kernel has fan_out heads * head_dim);
    - bert (Devlin et al. 2019, google-research/bert): truncated normal, std 0.02, cut at 2 std;
    - gpt2 (Radford et al. 2019): normal, std 0.02; a `residual` projection (attention out,
      MLP out) scaled by 1 / sqrt(2 * layers), as the paper describes.
    """
    recipe = recipe or init_recipe(cfg)
    if recipe == "vit":
        return nn.initializers.xavier_uniform(in_axis=in_axis, out_axis=out_axis)
    if recipe == "gpt2":
        return nn.initializers.normal(INIT_STD / (2 * cfg.num_layers) ** 0.5 if residual
                                      else INIT_STD)
    return nn.initializers.truncated_normal(INIT_STD)


def embedding_init(cfg: ModelConfig, axes: tuple[str, ...], std: float = INIT_STD):
    """Token, position and type tables: BERT's truncated normal, else a normal of `std`
    (GPT-2 draws token embeddings with std 0.02 and positions with 0.01)."""
    init = nn.initializers.truncated_normal(std) if init_recipe(cfg) == "bert" else \
        nn.initializers.normal(std)
    return nn.with_logical_partitioning(init, axes)


def zeros(axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def layer_norm(cfg: ModelConfig, name: str, axis_name: str = "embed") -> nn.LayerNorm:
    dtype, param_dtype = dtypes(cfg)
    return nn.LayerNorm(
        # BERT's and GPT-2's published values unless the config says otherwise (HF imports).
        epsilon=cfg.norm_eps if cfg.norm_eps is not None else
        (1e-12 if cfg.norm == "post" else 1e-5),
        dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
        bias_init=zeros((axis_name,)))


def constrain(x, axes: tuple[str, ...]):
    return nn.with_logical_constraint(x, axes)


class Projection(nn.Module):
    """x's last `in_axes` axes contracted with the kernel's first ones, + bias; the kernel is
    created in its final, named shape ([d, heads, k] or [heads, k, d]).

    (flax's DenseGeneral initialises a flattened kernel and applies the logical-axis constraint
    to it, which fails under a mesh; this keeps the named shape from the start.) It runs as one
    `lax.dot_general` of x's rows with the kernel as it is: what Qwix's int8 quantization
    intercepts (infer/quantize.py; an operator `@` or a reshaped kernel it cannot see as a
    weight), and what an ONNX export writes as a MatMul with a constant weight, which
    onnxruntime's int8 quantizer takes (an einsum exports as an Einsum, which it skips).
    """
    cfg: ModelConfig
    in_axes: int
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    bias_shape: tuple[int, ...]
    bias_axes: tuple[str, ...]
    init: Any  # the kernel's initialiser (kernel_init)

    @nn.compact
    def __call__(self, x):
        dtype, param_dtype = dtypes(self.cfg)
        kernel = self.param("kernel", nn.with_logical_partitioning(self.init, self.kernel_axes),
                            self.kernel_shape, param_dtype)
        bias = self.param("bias", zeros(self.bias_axes), self.bias_shape, param_dtype)
        n = self.in_axes
        outer, inner, out = x.shape[:-n], self.kernel_shape[:n], self.kernel_shape[n:]
        # flax's promote_dtype and lax.dot_general on the kernel as it is: what Qwix's int8
        # quantization intercepts (infer/quantize.py).
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=dtype)
        y = jax.lax.dot_general(x.reshape(-1, *inner), kernel,
                                ((tuple(range(1, n + 1)), tuple(range(n))), ((), ())))
        return y.reshape(*outer, *out) + bias.astype(dtype)


def heads_major_attention(q, k, v, mask, causal: bool):
    """Softmax attention over q, k, v [batch, len, heads, k] as jax.nn.dot_product_attention
    computes it (float32 scores scaled by 1/sqrt(k), masked, float32 softmax), with the
    heads moved ahead of the positions first. On XLA's CPU backend its batched products
    then run on contiguous [len, k] blocks: the finetuning steps were 1-11% faster than with
    jax's form, interleaved in one process (benchmarks/results/cpu-*/matmul-gap-attention.md).
    """
    qh, kh, vh = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    # Batched matmuls, not einsums: an ONNX export writes these as MatMul (onnx_export.py).
    scores = jnp.matmul(qh, kh.swapaxes(-1, -2), preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(q.shape[-1] ** -0.5)
    if causal:
        below = jnp.tril(jnp.ones(scores.shape[-2:], bool))
        mask = below if mask is None else mask & below
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.matmul(weights, vh).transpose(0, 2, 1, 3)


class Attention(nn.Module):
    """Multi-head attention: self-attention, or cross-attention from `x` to `kv` (the fusion
    layers). `mask` is a boolean [batch, 1, q, k] (True = may attend) or None.
    `model.attention`: xla runs `jax.nn.dot_product_attention`'s XLA form; cudnn runs cuDNN's
    fused kernel on NVIDIA GPUs, which takes the document mask as a dense bias; auto is xla,
    except on a CPU, where it is `heads_major_attention` (the same function, faster there)."""
    cfg: ModelConfig
    causal: bool
    recipe: str | None = None  # kernel_init's; None: the model's own

    @nn.compact
    def __call__(self, x, mask, kv=None):
        cfg = self.cfg
        d, h = cfg.hidden_size, cfg.num_heads
        k = cfg.head_dim or d // h  # head_dim: set when heads were pruned (h * k < d)

        def project(name, inputs):
            y = Projection(cfg, 1, (d, h, k), ("embed", "heads", "kv"), (h, k),
                           ("heads", "kv"), kernel_init(cfg, 0, (1, 2), recipe=self.recipe),
                           name=name)(inputs)
            return constrain(y, ("act_batch", "act_len", "act_heads", "act_kv"))

        source = x if kv is None else kv
        q, k_, v = project("query", x), project("key", source), project("value", source)
        if cfg.attention == "auto" and jax.default_backend() == "cpu":
            out = heads_major_attention(q, k_, v, mask, self.causal)
        else:
            implementation = None if cfg.attention == "auto" else cfg.attention
            out = jax.nn.dot_product_attention(q, k_, v, mask=mask, is_causal=self.causal,
                                               implementation=implementation)
        out = Projection(cfg, 2, (h, k, d), ("heads", "kv", "embed"), (d,),
                         ("embed",), kernel_init(cfg, (0, 1), 2, residual=True,
                                                 recipe=self.recipe), name="out")(out)
        return constrain(out, ("act_batch", "act_len", "act_embed"))


def dense(cfg: ModelConfig, features: int, axes: tuple[str, str], name: str | None,
          init=None) -> nn.Dense:
    """A dense layer whose kernel carries logical `axes` (in, out) and whose bias the out axis;
    its kernel starts by the model's recipe (`kernel_init`) unless `init` says otherwise.
    `name` None: a module built in `setup`, named by the attribute it is assigned to."""
    dtype, param_dtype = dtypes(cfg)
    init = kernel_init(cfg) if init is None else init
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.with_logical_partitioning(init, axes),
                    bias_init=zeros((axes[1],)), name=name)


class Mlp(nn.Module):
    cfg: ModelConfig
    recipe: str | None = None  # kernel_init's; None: the model's own

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        # (The ViT paper's code draws these biases from N(0, 1e-6): zeros here, as good as.)
        h = dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "wi",
                  kernel_init(cfg, recipe=self.recipe))(x)
        h = constrain(ACTIVATIONS[cfg.activation](h), ("act_batch", "act_len", "act_mlp"))
        out = dense(cfg, cfg.hidden_size, ("mlp", "embed"), "wo",
                    kernel_init(cfg, residual=True, recipe=self.recipe))(h)
        return constrain(out, ("act_batch", "act_len", "act_embed"))


class Block(nn.Module):
    """One Transformer layer: post-norm (BERT) or pre-norm (GPT-2).

    Returns `(x, None)` so that the same module serves `nn.scan` (carry, per-layer output).
    `train` (a Python bool, static) turns dropout on. The output is also sown as
    `intermediates/.../hidden` (kept only when that collection is mutable: distillation
    matches hidden states, models/transformer.hidden_states).
    """
    cfg: ModelConfig
    causal: bool

    @nn.compact
    def __call__(self, x, mask, train: bool = False):
        cfg = self.cfg
        dropout = nn.Dropout(cfg.dropout, deterministic=not train or cfg.dropout == 0)
        attn = Attention(cfg, self.causal, name="attn")
        mlp = Mlp(cfg, name="mlp")
        if cfg.norm == "pre":
            x = x + dropout(attn(layer_norm(cfg, "attn_norm")(x), mask))
            x = x + dropout(mlp(layer_norm(cfg, "mlp_norm")(x)))
        else:
            x = layer_norm(cfg, "attn_norm")(x + dropout(attn(x, mask)))
            x = layer_norm(cfg, "mlp_norm")(x + dropout(mlp(x)))
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        self.sow("intermediates", "hidden", x)
        return x, None
