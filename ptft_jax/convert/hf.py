"""Reading a Hugging Face model's weights (config/hf.py finds the directory and reads its
config.json): `model.safetensors` or the shards listed in `model.safetensors.index.json`,
with `safetensors` only: never pickle, never remote code. hf_weights.py maps the tensors onto
ptft's parameter paths.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ptft_jax.config.hf import HfModel
from ptft_jax.convert.hf_weights import check_backbone_shapes, import_tensors

CONVERSION_RECIPE = ("python -c \"from transformers import AutoModel; AutoModel.from_pretrained("
                     "'DIR').save_pretrained('DIR_safetensors')\"")


def flat_params(model: HfModel) -> tuple[dict[str, np.ndarray], list[str]]:
    """({ptft path: array}, report lines): every tensor of `model` converted, the backbone's
    shapes checked against its config.json."""
    keys = model.model_keys()
    flat, report = import_tensors(read_tensors(model.directory), model.family,
                                  keys["num_layers"], keys["num_heads"],
                                  where=str(model.directory))
    check_backbone_shapes(flat, keys, str(model.directory))
    return flat, report


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors (or its shards), as NumPy arrays; nothing else is
    ever read (no pickle)."""
    from safetensors.numpy import load_file
    directory = Path(directory)
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index} is not a safetensors index ({e}).") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} lists shard(s) that are not there: {missing}.")
    else:
        others = sorted(p.name for p in directory.iterdir()
                        if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"))
        if not others:
            raise ValueError(f"{directory} holds no weights (no model.safetensors, no shards); "
                             f"give the model's whole directory, as downloaded.")
        raise ValueError(f"{directory} has no model.safetensors; ptft reads safetensors only. "
                         f"It holds {', '.join(others)}, which ptft never reads (pickle can run "
                         f"code). Convert once with: {CONVERSION_RECIPE}")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types on bad files
            raise ValueError(f"{f} could not be read as safetensors: {e}") from None
    # ptft keeps parameters in float32 (its dtype policy); bfloat16 and float16 checkpoints
    # (bfloat16 arrives as ml_dtypes' type, registered by JAX) are widened.
    return {k: v.astype(np.float32) if v.dtype.name in ("bfloat16", "float16") else v
            for k, v in tensors.items()}
