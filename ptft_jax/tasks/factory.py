"""`make_task`: the one place that builds the task a config names, for the training jobs,
predict / eval / embed and the benchmarks alike. Each task name maps to one builder (a table,
not if/else); what a task needs beyond the config (the label space, the tokenizer, the
tokenizer's masking ids) is passed in, never set on the task afterwards."""
from __future__ import annotations

import dataclasses
from typing import Callable

from tokenizers import Tokenizer

from ptft_jax.config.schema import Config, ConfigError
from ptft_jax.config.resolve import pooling_for, slots_for, task_for, tower_model
from ptft_jax.core.mesh import data_parallel_size
from ptft_jax.data.labelled import LabelSpace
from ptft_jax.data.tokenizer import TokenIds
from ptft_jax.tasks.base import Task
from ptft_jax.tasks.classify import ClassifyTask
from ptft_jax.tasks.contrastive import ContrastiveTask
from ptft_jax.tasks.fused import FusedClassifyTask
from ptft_jax.tasks.image import ImageClassifyTask
from ptft_jax.tasks.lm import CausalLM, MaskedLM, MlmSpec
from ptft_jax.tasks.vocab_loss import LOSS_CHUNK_AUTO_TOKENS


@dataclasses.dataclass(frozen=True)
class TaskInputs:
    """What a task may need beyond the config."""
    labels: LabelSpace | None = None  # the training split's (or a finetuned run's) labels
    tokenizer: Tokenizer | None = None  # image-text tasks tokenize prompts and queries
    mlm: MlmSpec | None = None  # masked LM: the tokenizer's mask and special ids
    devices: list | None = None  # the devices the step runs on (default: all)


def mlm_spec(cfg: Config, ids: TokenIds) -> MlmSpec:
    first_regular = max(ids.special_ids) + 1  # our tokenizers put special tokens first
    return MlmSpec.from_config(cfg.objective, mask_id=ids.mask_id, special_ids=ids.special_ids,
                               random_low=first_regular, random_high=ids.vocab_size)


def resolve_loss_chunk(cfg: Config) -> int:
    """objective.loss_chunk (tokens per device per chunk of the vocabulary loss), or for null
    the measured default: LOSS_CHUNK_AUTO_TOKENS (see benchmarks/loss_chunk.py)."""
    if cfg.objective.loss_chunk is not None:
        return cfg.objective.loss_chunk
    return LOSS_CHUNK_AUTO_TOKENS


def _rows_split(cfg: Config, devices) -> int:
    # Under pmap the step traces one device's rows; under jit, the global batch.
    return 1 if cfg.mesh.parallelism == "pmap" else data_parallel_size(cfg, devices)


def _bn_axis(cfg: Config) -> str | None:
    # pmap: BatchNorm statistics are averaged across devices over the pmapped axis.
    return "batch" if cfg.mesh.parallelism == "pmap" else None


def _needs(value, what: str, task: str):
    if value is None:
        raise ConfigError(f"train.task {task} needs {what}.")
    return value


def _masked_lm(cfg: Config, inputs: TaskInputs) -> Task:
    return MaskedLM(cfg.model, _needs(inputs.mlm, "the tokenizer's masking ids", "mlm"),
                    resolve_loss_chunk(cfg), _rows_split(cfg, inputs.devices))


def _causal_lm(cfg: Config, inputs: TaskInputs) -> Task:
    return CausalLM(cfg.model, resolve_loss_chunk(cfg), _rows_split(cfg, inputs.devices))


def _classify(cfg: Config, inputs: TaskInputs) -> Task:
    return ClassifyTask(cfg.model, _needs(inputs.labels, "a label space", task_for(cfg)),
                        pooling_for(cfg), slots_for(cfg))


def _image_classify(cfg: Config, inputs: TaskInputs) -> Task:
    labels = _needs(inputs.labels, "a label space", "image_classification")
    return ImageClassifyTask(cfg.model, labels.names, cfg.augment,
                             cfg.objective.label_smoothing, _bn_axis(cfg), labels)


def _contrastive(cfg: Config, inputs: TaskInputs) -> Task:
    labels = inputs.labels
    names = cfg.eval.zero_shot_classes or (list(labels.names) if labels else None)
    return ContrastiveTask(tower_model(cfg, "image"), tower_model(cfg, "text"),
                           cfg.towers.image.projection_dim, cfg.towers.text.pooling,
                           cfg.objective, cfg.augment, inputs.tokenizer, cfg.data.seq_len,
                           cfg.eval.prompts, names, _bn_axis(cfg))


def _fused_classify(cfg: Config, inputs: TaskInputs) -> Task:
    return FusedClassifyTask(cfg.model, tower_model(cfg, "image"), tower_model(cfg, "text"),
                             _needs(inputs.labels, "a label space", "multimodal_classification"),
                             cfg.towers.text.pooling, cfg.augment, inputs.tokenizer,
                             _bn_axis(cfg))


BUILDERS: dict[str, Callable[[Config, TaskInputs], Task]] = {
    "mlm": _masked_lm, "clm": _causal_lm,
    "classification": _classify, "multi_label": _classify, "regression": _classify,
    "image_classification": _image_classify,
    "contrastive": _contrastive, "multimodal_classification": _fused_classify,
}


def make_task(cfg: Config, labels: LabelSpace | None = None, tokenizer: Tokenizer | None = None,
              mlm: MlmSpec | None = None, devices=None) -> Task:
    """The task `cfg` trains (train.task, auto resolved)."""
    return BUILDERS[task_for(cfg)](cfg, TaskInputs(labels, tokenizer, mlm, devices))
