"""`distill.teacher`: the teacher a distillation run learns from (tasks/distill.py), checked
before anything is built (its kind, task, tokenizer, labels and layers), the task wrapped
around the student's, and the teacher's weights loaded into the train state when a run starts
(a resumed run reads them from its own checkpoint)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from tokenizers import Tokenizer

from ptft_jax.ckpt.pretrained import check_init_from, load_pretrained
from ptft_jax.config.hf import is_hf, open_model
from ptft_jax.config.load import load_run_config
from ptft_jax.config.schema import Config, ConfigError, ModelConfig
from ptft_jax.config.resolve import pooling_for, task_for
from ptft_jax.data.labelled import LabelSpace
from ptft_jax.data.tokenizer import load_tokenizer
from ptft_jax.models.heads import Classifier
from ptft_jax.models.transformer import LanguageModel
from ptft_jax.tasks.base import Task
from ptft_jax.tasks.distill import TEACHER, DistillSpec, DistillTask

log = logging.getLogger(__name__)

# What an HF teacher's architecture must be for each student task.
HF_HEADS = {"classification": ("ForSequenceClassification",),
            "mlm": ("ForMaskedLM", "ForPreTraining")}


@dataclasses.dataclass(frozen=True)
class Teacher:
    source: str  # a ptft run (or checkpoints / step folder) or hf:...
    model: ModelConfig
    pooling: str
    tokenizer: Path
    run_dir: Path | None = None  # a ptft teacher's run directory (its labels.json)


def open_teacher(cfg: Config) -> Teacher:
    """The teacher distill.teacher names, or ConfigError: it must have been trained for the
    student's task (a classifier, or a masked LM), have a tokenizer, and have the layers
    distill.hidden_layers names."""
    spec, kind = cfg.distill.teacher, task_for(cfg)
    if is_hf(spec):
        try:
            source = open_model(spec)
        except ValueError as e:
            raise ConfigError(f"distill.teacher: {e}") from None
        if source.family != "bert" or not source.architecture.endswith(HF_HEADS[kind]):
            raise ConfigError(f"distill.teacher: {source.directory} is a {source.architecture}; "
                              f"a {kind} student needs a BERT-family teacher with a "
                              f"{' or '.join(HF_HEADS[kind])} head (finetune one with ptft "
                              f"and give that run).")
        model = dataclasses.replace(ModelConfig(), **source.model_keys())
        pooling, theirs = source.pooling or "cls", source.tokenizer_path
    else:
        check_init_from(spec, image_task=False, key="distill.teacher")
        path = Path(spec)
        folder = next((f for f in (path, *path.parents[:2]) if (f / "config.yaml").is_file()),
                      None)
        if folder is None:
            raise ConfigError(f"distill.teacher: {path} has no config.yaml beside its "
                              f"checkpoints; give the teacher's run directory.")
        run = load_run_config(folder)
        if task_for(run) != kind:
            raise ConfigError(f"distill.teacher: {folder} was trained with train.task "
                              f"{task_for(run)}; a {kind} student learns from a {kind} "
                              f"teacher.")
        model, pooling, theirs = run.model, pooling_for(run), folder / "tokenizer.json"
    folder = None if is_hf(spec) else folder
    if theirs is None or not Path(theirs).is_file():
        raise ConfigError(f"distill.teacher: {spec} has no tokenizer (tokenizer.json or "
                          f"vocab.txt); distillation needs the teacher's to check it is the "
                          f"student's.")
    for _, t in cfg.distill.hidden_layers:
        if t > model.num_layers:
            raise ConfigError(f"distill.hidden_layers: teacher layer {t} is past the teacher's "
                              f"{model.num_layers} layers.")
    # The teacher only runs forward: the run's dtype policy, no dropout, no remat.
    model = dataclasses.replace(model, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                dropout=0.0, remat="none", attention=cfg.model.attention)
    return Teacher(spec, model, pooling, Path(theirs), folder)


def with_teacher_tokenizer(cfg: Config, teacher: Teacher) -> Config:
    """A student with no tokenizer of its own (no data.tokenizer, no finetune.init_from to
    take one from) reads text with the teacher's."""
    if cfg.data.tokenizer or cfg.finetune.init_from:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                             tokenizer=str(teacher.tokenizer)))


def check_same_tokenizer(teacher: Teacher, tokenizer: Tokenizer, tokenizer_path) -> None:
    if load_tokenizer(teacher.tokenizer).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"distill.teacher: {teacher.source} reads text with another tokenizer "
                          f"({teacher.tokenizer}) than the student ({tokenizer_path}); the "
                          f"teacher's outputs only mean something on its own token ids. Give "
                          f"the student the teacher's tokenizer (data.tokenizer="
                          f"{teacher.tokenizer}).")


def check_teacher_labels(teacher: Teacher, labels: LabelSpace) -> None:
    """A ptft teacher's labels.json must name the data's labels in the same order (the
    student's output i is matched to the teacher's output i). An HF teacher's labels are
    matched by name when its weights load."""
    if teacher.run_dir is None:
        return
    found = teacher.run_dir / "labels.json"
    if not found.is_file():
        raise ConfigError(f"distill.teacher: {teacher.source} has no labels.json; give the "
                          f"run directory of a ptft finetune run.")
    theirs = LabelSpace.load(found)
    if list(theirs.names) != list(labels.names):
        raise ConfigError(f"distill.teacher: {found} names labels {list(theirs.names)[:10]} and "
                          f"the data's are {list(labels.names)[:10]}; the teacher must be "
                          f"finetuned on the same labels.")


def distill_task(cfg: Config, student: Task, teacher: Teacher, vocab_size: int) -> DistillTask:
    d = cfg.distill
    model = Classifier(teacher.model, student.labels.num_outputs, teacher.pooling) \
        if task_for(cfg) == "classification" else LanguageModel(teacher.model)
    spec = DistillSpec(d.temperature, d.alpha, tuple(tuple(p) for p in d.hidden_layers),
                       d.hidden_weight)
    return DistillTask(student, model, spec, cfg.model, teacher.model, vocab_size)


def teacher_init(teacher: Teacher, vocab_rows: int, label_names=None, then=None):
    """The job's init_from hook: the student's own init_from first (`then`), if any, then the
    teacher's weights into model_state["teacher"], every parameter from the teacher's
    checkpoint (nothing may start fresh)."""
    def init_from(engine, state):
        report = []
        if then is not None:
            state, report = then(engine, state)
        host = engine.host_state(state)
        try:
            params, more = load_pretrained(teacher.source, host.model_state[TEACHER], [".*"],
                                           [], [], vocab_rows=vocab_rows,
                                           label_names=label_names, key="distill.teacher")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for line in more:
            log.info("distill.teacher: %s", line)
        state = host.replace(model_state={**host.model_state, TEACHER: params})
        return engine.place(state), report + [f"teacher: {line}" for line in more]
    return init_from
