"""Image components: a Vision Transformer and ResNets, and the classifier built on either.

Both encoders take float images [batch, height, width, channels] (normalised on device by the
task, see data/augment.py) and return pooled features [batch, width]. Their parameters live
under `image/` in every model built from them, so a pretrained image component restores into
a classifier (or, later, a two-tower model) by path. Blocks are named `layers_N` (or stacked
under `layers` with scan), the names the finetuning rules count layers by.

ResNet's BatchNorm statistics are the `batch_stats` collection, carried in the train state's
`model_state`. Under jit the batch axis is one global array, so the statistics are those of
the global batch; under pmap BatchNorm averages them across devices through `bn_axis_name`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptft_jax.config.schema import ModelConfig
from ptft_jax.models.layers import constrain, dense, dtypes, layer_norm, normal, zeros
from ptft_jax.models.transformer import CHECKPOINT_POLICIES, layer_stack, run_layers

IMAGE_ACT = ("act_batch", None, None, None)
# An image classifier's head: U(+-1 / sqrt(width)), PyTorch's nn.Linear default. For ResNet
# that is torchvision's recipe. For ViT it is a deviation: the ViT paper's code starts the
# head at zero, and measured (benchmarks/init_parity.py, issue 23), from scratch on small
# image sets a zero head made the whole ViT learn far slower (its body gets no gradient until
# the head has grown), slower than the same ViT at PyTorch's defaults.
HEAD_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class ViT(nn.Module):
    """Patch embedding, class token (or mean pooling), learned positions, pre-norm blocks.

    Initialised as the ViT paper's code does (google-research/vision_transformer and
    big_vision's vit.py): the patch embedding LeCun-normal, the class token zero, positions
    N(0, 1 / width), every block kernel Xavier-uniform (layers.kernel_init). One deviation, in
    `ImageClassifier`: the head is not zero (see HEAD_INIT)."""
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        dtype, param_dtype = dtypes(cfg)
        p, d = cfg.patch_size, cfg.hidden_size
        # A strided convolution is the patch embedding: one matmul per patch.
        self.patch_embed = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                                   param_dtype=param_dtype,
                                   kernel_init=nn.with_logical_partitioning(
                                       nn.initializers.lecun_normal(), (None, None, None,
                                                                        "embed")),
                                   bias_init=zeros(("embed",)))
        grid = cfg.image_size // p
        tokens = grid * grid + (cfg.image_pooling == "cls")
        # big_vision's learned positions: std 1 / sqrt(width), as large as a patch's share
        # of the token. (BERT's 0.02 made them nearly invisible beside the patch embedding.)
        self.pos_embed = self.param("pos_embed", normal(d ** -0.5, (None, "embed")),
                                    (tokens, d), param_dtype)
        if cfg.image_pooling == "cls":
            self.cls = self.param("cls", zeros((None, "embed")), (1, d), param_dtype)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = layer_stack(cfg, causal=False)
        self.final_norm = layer_norm(cfg, "final_norm")

    def __call__(self, images, train: bool = False, pooled: bool = True):
        """Pooled features [batch, width], or with `pooled=False` every token [batch, tokens,
        width] (what cross-attention fusion reads)."""
        cfg = self.cfg
        dtype, _ = dtypes(cfg)
        x = self.patch_embed(images.astype(dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, cfg.hidden_size)
        if cfg.image_pooling == "cls":
            x = jnp.concatenate([jnp.broadcast_to(self.cls.astype(dtype), (b, 1, x.shape[-1])),
                                 x], axis=1)
        x = x + self.pos_embed.astype(dtype)[None]
        x = self.dropout(x, deterministic=not train or cfg.dropout == 0)
        x = constrain(x, ("act_batch", "act_len", "act_embed"))
        x = run_layers(self.layers, x, None, train, cfg.scan_layers)
        x = self.final_norm(x)
        if not pooled:
            return x
        return x[:, 0] if cfg.image_pooling == "cls" else jnp.mean(x, axis=1)


class PointwiseConv(nn.Module):
    """A 1x1 convolution (strided: every stride-th pixel) as a matmul over channels, with
    nn.Conv's parameter (`kernel` [1, 1, in, out]), so checkpoints and conversions are
    unchanged. XLA's CPU backend runs it as a dot about 2x faster than as a convolution,
    forward and backward (ResNet-50's 1x1 shapes at batch 8); not measured on a GPU."""
    features: int
    stride: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    kernel_init: nn.initializers.Initializer

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                            self.param_dtype)
        if self.stride > 1:
            x = x[:, ::self.stride, ::self.stride, :]
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return jnp.einsum("bhwc,cd->bhwd", x, kernel[0, 0])


def _conv(cfg: ModelConfig, features: int, kernel: int, stride: int, name: str):
    dtype, param_dtype = dtypes(cfg)
    # He et al. 2015's initialisation, fan-out form (torchvision's ResNets).
    init = nn.with_logical_partitioning(
        nn.initializers.variance_scaling(2.0, "fan_out", "normal"), (None, None, None, "embed"))
    if kernel == 1:
        return PointwiseConv(features, stride, dtype, param_dtype, init, name=name)
    # (k - 1) / 2 pixels on every side, as torchvision's and transformers' ResNets pad: the
    # same output sizes as "SAME", but a strided conv then sees the same pixels as theirs
    # ("SAME" pads only the far side of an even input) and their weights compute the same.
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)),
                   use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name,
                   kernel_init=init)


def _norm(cfg: ModelConfig, train: bool, name: str, axis_name: str | None):
    dtype, param_dtype = dtypes(cfg)
    # Scale 1, bias 0, as He et al. 2016 and torchvision start every BatchNorm. (Zero scales
    # on each block's last norm, Goyal et al. 2017's large-batch trick, made resnet18-small
    # learn ten times slower over its first 50 steps on a small set: issue 23.)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, param_dtype=param_dtype, axis_name=axis_name, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                ("embed",)),
                        bias_init=zeros(("embed",)))


class ResNetBlock(nn.Module):
    """Basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1 x4) residual block."""
    cfg: ModelConfig
    features: int
    stride: int
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        cfg, f, axis = self.cfg, self.features, self.bn_axis_name
        bottleneck = cfg.resnet_block == "bottleneck"
        out_features = f * 4 if bottleneck else f
        residual = x
        if bottleneck:
            y = nn.relu(_norm(cfg, train, "bn1", axis)(_conv(cfg, f, 1, 1, "conv1")(x)))
            y = nn.relu(_norm(cfg, train, "bn2", axis)(_conv(cfg, f, 3, self.stride,
                                                             "conv2")(y)))
            y = _norm(cfg, train, "bn3", axis)(
                _conv(cfg, out_features, 1, 1, "conv3")(y))
        else:
            y = nn.relu(_norm(cfg, train, "bn1", axis)(_conv(cfg, f, 3, self.stride,
                                                             "conv1")(x)))
            y = _norm(cfg, train, "bn2", axis)(_conv(cfg, f, 3, 1, "conv2")(y))
        if residual.shape != y.shape:
            residual = _norm(cfg, train, "proj_bn", axis)(
                _conv(cfg, out_features, 1, self.stride, "proj")(residual))
        return constrain(nn.relu(residual + y), IMAGE_ACT)


class ResNet(nn.Module):
    cfg: ModelConfig
    bn_axis_name: str | None = None  # the pmap axis BatchNorm averages its statistics over

    @nn.compact
    def __call__(self, images, train: bool = False, pooled: bool = True):
        """Globally pooled features [batch, width], or with `pooled=False` the last feature
        map as tokens [batch, h * w, width]."""
        cfg = self.cfg
        dtype, _ = dtypes(cfg)
        x = images.astype(dtype)
        if cfg.resnet_stem == "small":
            x = _conv(cfg, cfg.resnet_width, 3, 1, "stem_conv")(x)
        else:
            x = _conv(cfg, cfg.resnet_width, 7, 2, "stem_conv")(x)
        x = nn.relu(_norm(cfg, train, "stem_bn", self.bn_axis_name)(x))
        if cfg.resnet_stem != "small":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        x = constrain(x, IMAGE_ACT)
        block = ResNetBlock
        if cfg.remat != "none":
            block = nn.remat(ResNetBlock, policy=CHECKPOINT_POLICIES[cfg.remat],
                             static_argnums=(2,))
        index = 0
        for stage, count in enumerate(cfg.resnet_stages):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                x = block(cfg, cfg.resnet_width * 2 ** stage, stride, self.bn_axis_name,
                          name=f"layers_{index}")(x, train)
                index += 1
        if not pooled:
            return x.reshape(x.shape[0], -1, x.shape[-1])
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)


def image_encoder(cfg: ModelConfig, bn_axis_name: str | None = None) -> nn.Module:
    if cfg.kind == "vit":
        return ViT(cfg)
    return ResNet(cfg, bn_axis_name)


def feature_size(cfg: ModelConfig) -> int:
    """Width of the pooled features an image encoder returns."""
    if cfg.kind == "vit":
        return cfg.hidden_size
    last = cfg.resnet_width * 2 ** (len(cfg.resnet_stages) - 1)
    return last * 4 if cfg.resnet_block == "bottleneck" else last


class ImageClassifier(nn.Module):
    """Image component under `image/` + a linear head under `head/` -> float32 logits."""
    cfg: ModelConfig
    num_classes: int
    bn_axis_name: str | None = None

    def setup(self):
        self.image = image_encoder(self.cfg, self.bn_axis_name)
        self.head_dropout = nn.Dropout(self.cfg.dropout)
        self.head = dense(self.cfg, self.num_classes, ("embed", None), "head", HEAD_INIT)

    def __call__(self, images, train: bool = False):
        x = self.image(images, train)
        x = self.head_dropout(x, deterministic=not train or self.cfg.dropout == 0)
        return self.head(constrain(x, ("act_batch", None))).astype(jnp.float32)


def interpolate_positions(table, old_grid: int, new_grid: int, has_cls: bool):
    """ViT position embeddings [tokens, dim] for a new image size: the patch grid's table is
    resized bilinearly (the class token's row is kept), as when finetuning at a higher
    resolution than pretraining."""
    cls, grid = (table[:1], table[1:]) if has_cls else (table[:0], table)
    dim = grid.shape[-1]
    grid = grid.reshape(old_grid, old_grid, dim)
    grid = jax.image.resize(grid, (new_grid, new_grid, dim), method="bilinear")
    return jnp.concatenate([cls, grid.reshape(new_grid * new_grid, dim)], axis=0)
