"""Model presets: the published shapes `model.preset` names, filled in before the explicit
model keys (config/load.py)."""
from __future__ import annotations

from typing import Any

# Published shapes. BERT: Turc et al. 2019 (tiny/mini/small) and Devlin et al. 2018 (base);
# GPT-2: Radford et al. 2019. gpt-tiny is ours: a decoder small enough for CPU tests.
PRESETS: dict[str, dict[str, Any]] = {
    "bert-tiny": dict(kind="encoder", num_layers=2, hidden_size=128, num_heads=2, mlp_dim=512),
    "bert-mini": dict(kind="encoder", num_layers=4, hidden_size=256, num_heads=4, mlp_dim=1024),
    "bert-small": dict(kind="encoder", num_layers=4, hidden_size=512, num_heads=8, mlp_dim=2048),
    "bert-base": dict(kind="encoder", num_layers=12, hidden_size=768, num_heads=12, mlp_dim=3072),
    "gpt-tiny": dict(kind="decoder", num_layers=2, hidden_size=128, num_heads=2, mlp_dim=512,
                     max_len=256, vocab_size=50257),
    "gpt-mini": dict(kind="decoder", num_layers=4, hidden_size=256, num_heads=4, mlp_dim=1024),
    "gpt2-small": dict(kind="decoder", num_layers=12, hidden_size=768, num_heads=12, mlp_dim=3072),
    "gpt2-medium": dict(kind="decoder", num_layers=24, hidden_size=1024, num_heads=16,
                        mlp_dim=4096),
    # ViT: Dosovitskiy et al. 2020 (B/16) and Touvron et al. 2021 (DeiT's Ti/16, S/16).
    # The /4 variants are ours: patches of 4 px for 28-64 px images (Fashion-MNIST, CIFAR).
    "vit-ti16": dict(kind="vit", num_layers=12, hidden_size=192, num_heads=3, mlp_dim=768),
    "vit-s16": dict(kind="vit", num_layers=12, hidden_size=384, num_heads=6, mlp_dim=1536),
    "vit-b16": dict(kind="vit", num_layers=12, hidden_size=768, num_heads=12, mlp_dim=3072),
    "vit-ti4": dict(kind="vit", num_layers=12, hidden_size=192, num_heads=3, mlp_dim=768,
                    patch_size=4, image_size=32),
    "vit-mini4": dict(kind="vit", num_layers=4, hidden_size=192, num_heads=3, mlp_dim=768,
                      patch_size=4, image_size=32),
    # ResNet: He et al. 2015. The -small variants use a 3x3 stride-1 stem without max pooling
    # (the usual CIFAR form), so 28-64 px images keep their detail.
    "resnet18": dict(kind="resnet", resnet_stages=[2, 2, 2, 2], resnet_block="basic"),
    "resnet50": dict(kind="resnet", resnet_stages=[3, 4, 6, 3], resnet_block="bottleneck"),
    "resnet18-small": dict(kind="resnet", resnet_stages=[2, 2, 2, 2], resnet_block="basic",
                           resnet_stem="small", image_size=32),
}
_BERT_COMMON = dict(vocab_size=30522, max_len=512, dropout=0.1, norm="post", activation="gelu",
                    type_vocab_size=2)
_GPT_COMMON = dict(vocab_size=50257, max_len=1024, dropout=0.1, norm="pre",
                   activation="gelu_tanh", type_vocab_size=0)
_VIT_COMMON = dict(dropout=0.0, norm="pre", activation="gelu", norm_eps=1e-6,
                   type_vocab_size=0, patch_size=16, image_size=224)
_RESNET_COMMON = dict(image_size=224, resnet_width=64, resnet_stem="imagenet")
_COMMON = {"encoder": _BERT_COMMON, "decoder": _GPT_COMMON, "vit": _VIT_COMMON,
           "resnet": _RESNET_COMMON}
for _name, _shape in PRESETS.items():
    PRESETS[_name] = {**_COMMON[_shape["kind"]], **_shape}
