"""What a config resolves to: its task (train.task auto), a tower's model, the packed
rows' slots, pooling, the pruning schedule's end and the mesh shape. schema.py holds the
config itself; validate.py checks the rest."""
from __future__ import annotations

import dataclasses

from ptft_jax.config.schema import (FINETUNE_TASKS, IMAGE_KINDS, MULTIMODAL_KINDS, Config,
                                    ConfigError, MeshConfig, ModelConfig)


def task_for(cfg: Config) -> str:
    """train.task, with auto resolved: masked LM for encoders, causal LM for decoders, image
    classification for image encoders."""
    if cfg.train.task != "auto":
        return cfg.train.task
    if cfg.model.kind in IMAGE_KINDS:
        return "image_classification"
    if cfg.model.kind in MULTIMODAL_KINDS:
        return "contrastive" if cfg.model.kind == "two_tower" else "multimodal_classification"
    return "mlm" if cfg.model.kind == "encoder" else "clm"


def tower_model(cfg: Config, name: str) -> ModelConfig:
    """The model config of tower `name` ('image' or 'text'), computing in the run's
    model.dtype / model.param_dtype (one dtype policy for every part of a multimodal
    model)."""
    tower = getattr(cfg.towers, name).model
    return dataclasses.replace(tower, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype)


def row_slots(examples_per_row: int, seq_len: int) -> int:
    """At most how many examples a packed row of `seq_len` holds: data.examples_per_row, or
    (0) seq_len // 8."""
    return examples_per_row or max(1, seq_len // 8)


def prune_end(cfg: Config) -> int:
    """The step where pruning reaches finetune.prune_sparsity (default: 2/3 of the steps)."""
    e = cfg.finetune.prune_end
    return e if e is not None else max(cfg.finetune.prune_start + 1, 2 * cfg.train.steps // 3)


def slots_for(cfg: Config) -> int | None:
    """Examples per packed finetuning row, or None where a row holds one example."""
    if task_for(cfg) not in FINETUNE_TASKS or cfg.data.packing != "pack":
        return None
    return row_slots(cfg.data.examples_per_row, cfg.data.seq_len)


def pooling_for(cfg: Config) -> str:
    if cfg.finetune.pooling != "auto":
        return cfg.finetune.pooling
    return "cls" if cfg.model.kind == "encoder" else "last"


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Fills the one -1 axis so that data * fsdp * tensor == num_devices."""
    sizes = [mesh.data, mesh.fsdp, mesh.tensor]
    names = ["mesh.data", "mesh.fsdp", "mesh.tensor"]
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError("At most one of mesh.data, mesh.fsdp, mesh.tensor may be -1.")
    for s, n in zip(sizes, names):
        if s == 0 or s < -1:
            raise ConfigError(f"'{n}' is {s}; use a positive size or -1 for 'the rest'.")
    known = 1
    for s in sizes:
        if s != -1:
            known *= s
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"The mesh axes set ({known} devices) do not divide the "
                              f"{num_devices} devices available.")
        sizes[sizes.index(-1)] = num_devices // known
    if sizes[0] * sizes[1] * sizes[2] != num_devices:
        raise ConfigError(f"Mesh data*fsdp*tensor = {sizes[0]}*{sizes[1]}*{sizes[2]} = "
                          f"{sizes[0] * sizes[1] * sizes[2]}, but {num_devices} devices are "
                          f"available. Set one axis to -1 to use the rest.")
    return tuple(sizes)
