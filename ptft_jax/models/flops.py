"""Training FLOPs of each model family (train/peak.py holds what they are measured against).

FLOPs convention (PaLM, Chowdhery et al. 2022, appendix B): training costs
    6 * N + 12 * L * T * D   FLOPs per token,
where N counts the weights of every matrix multiply (attention and MLP kernels, the MLM
transform, and the tied vocabulary projection V * D; not the embedding lookups, biases or
norms), L is the depth, T the sequence length and D the width. Masked LM runs its head (MLM
transform and projection) only at its masked slots, so those weights count for that share
of the tokens. The attention term counts the
full T x T score matrix even for causal models, as PaLM does.
"""
from __future__ import annotations

from ptft_jax.config.schema import ModelConfig
from ptft_jax.config.resolve import tower_model
from ptft_jax.models.vision import feature_size


def attention_width(cfg: ModelConfig) -> int:
    """heads x head_dim: the model's width unless heads were pruned (model.head_dim)."""
    return cfg.num_heads * cfg.head_dim if cfg.head_dim else cfg.hidden_size


def _layer_and_head_params(cfg: ModelConfig) -> tuple[int, int]:
    d, f, L, v = cfg.hidden_size, cfg.mlp_dim, cfg.num_layers, cfg.vocab_size or 0
    per_layer = 4 * d * attention_width(cfg) + 2 * d * f  # q, k, v, out projections; MLP
    head = v * d + (d * d if cfg.kind == "encoder" else 0)  # tied projection (+ MLM transform)
    return L * per_layer, head


def matmul_params(cfg: ModelConfig, vocab_projection: bool = True) -> int:
    """N: weights that take part in a matrix multiply per token (see module docstring).
    Without `vocab_projection` (a classifier: its head runs once per example, not per
    token), the component's layers alone."""
    layers, head = _layer_and_head_params(cfg)
    return layers + (head if vocab_projection else 0)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, vocab_projection: bool = True,
                          predicted_positions: int | None = None) -> float:
    """Training FLOPs per token. `predicted_positions`: how many positions of each row the
    head runs on (masked LM computes logits at its masked slots only); default all, so that
    MFU never credits work the step skips."""
    layers, head = _layer_and_head_params(cfg)
    head_share = 0.0 if not vocab_projection else \
        (predicted_positions if predicted_positions is not None else seq_len) / seq_len
    return 6 * (layers + head * head_share) + \
        12 * cfg.num_layers * seq_len * attention_width(cfg)


def image_train_flops(cfg: ModelConfig, num_classes: int = 0) -> float:
    """Training FLOPs per image of an image encoder (3x the forward matmuls and convolutions:
    forward, and the two backward products), counted analytically like the text models.
    ViT: the patch embedding, then the Transformer terms above over its tokens. ResNet: every
    convolution, 2 * k^2 * C_in * C_out per output pixel."""
    s = cfg.image_size
    if cfg.kind == "vit":
        p, d = cfg.patch_size, cfg.hidden_size
        tokens = (s // p) ** 2 + (cfg.image_pooling == "cls")
        layers, _ = _layer_and_head_params(cfg)
        patch = 2 * (s // p) ** 2 * p * p * cfg.channels * d
        forward = patch + tokens * (2 * layers + 4 * cfg.num_layers * tokens * d) \
            + 2 * d * num_classes
        return 3.0 * forward
    forward = 0.0

    def conv(size, k, cin, cout):
        return 2.0 * size * size * k * k * cin * cout
    width = cfg.resnet_width
    if cfg.resnet_stem == "small":
        size = s
        forward += conv(size, 3, cfg.channels, width)
    else:
        size = -(-s // 2)
        forward += conv(size, 7, cfg.channels, width)
        size = -(-size // 2)  # max pool
    cin = width
    for stage, count in enumerate(cfg.resnet_stages):
        f = width * 2 ** stage
        for i in range(count):
            out_size = -(-size // 2) if stage > 0 and i == 0 else size
            if cfg.resnet_block == "bottleneck":
                cout = 4 * f
                forward += conv(size, 1, cin, f) + conv(out_size, 3, f, f) + \
                    conv(out_size, 1, f, cout)
            else:
                cout = f
                forward += conv(out_size, 3, cin, f) + conv(out_size, 3, f, f)
            if cin != cout or out_size != size:
                forward += conv(out_size, 1, cin, cout)
            cin, size = cout, out_size
    return 3.0 * (forward + 2 * cin * num_classes)


def text_tower_forward_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of a text encoder over one row of `seq_len` tokens (no vocabulary head):
    a third of the training count above."""
    return train_flops_per_token(cfg, seq_len, vocab_projection=False) * seq_len / 3.0


def multimodal_train_flops(cfg, frozen: tuple[str, ...] = ()) -> float:
    """Training FLOPs of one image-text pair in a two-tower or fused model, counted like the
    rest (3x the forward matmuls and convolutions). A tower in `frozen` ('image', 'text')
    costs its forward pass only: nothing below the fusion layers needs a gradient."""
    image, text = tower_model(cfg, "image"), tower_model(cfg, "text")
    T = cfg.data.seq_len
    forward = {"image": image_train_flops(image) / 3.0,
               "text": text_tower_forward_flops(text, T)}
    total = sum(f * (1.0 if name in frozen else 3.0) for name, f in forward.items())
    di, dt = feature_size(image), text.hidden_size
    if cfg.model.kind == "two_tower":
        p, b = cfg.towers.image.projection_dim, cfg.train.global_batch
        # projections, then the [batch, batch] similarities both ways
        return total + 3.0 * (2 * (di + dt) * p + 2 * 2 * b * p)
    m = cfg.model
    h, f = m.hidden_size, m.mlp_dim
    if m.fusion == "concat":
        fusion = 2 * (di + dt) * h
    elif m.fusion == "gated":
        fusion = 2 * (di * h + dt * h + (di + dt) * h)
    else:
        if image.kind == "vit":
            n = (image.image_size // image.patch_size) ** 2 + (image.image_pooling == "cls")
        else:  # the last stage's feature map
            stride = (4 if image.resnet_stem == "imagenet" else 1) * \
                2 ** (len(image.resnet_stages) - 1)
            n = (-(-image.image_size // stride)) ** 2
        per_layer = T * (2 * h * h + 2 * 2 * h * f) + n * 2 * 2 * h * h + 2 * 2 * T * n * h
        fusion = 2 * n * di * h + 2 * T * dt * h + m.num_layers * per_layer
    return total + 3.0 * fusion
