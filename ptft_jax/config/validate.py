"""Validation: everything about a config that can be known before compiling.

`validate(cfg, num_devices)` raises ConfigError naming the key at fault and how to fix it;
the training commands call it before building anything expensive or writing anything.
"""
from __future__ import annotations

import dataclasses
import re

from ptft_jax.config.ranges import check_values
from ptft_jax.config.schema import (DISTILL_TASKS, FINETUNE_TASKS, IMAGE_KINDS, IMAGE_TASKS,
                                    MULTIMODAL_KINDS, MULTIMODAL_TASKS, PRETRAIN_TASKS, Config,
                                    ConfigError)
from ptft_jax.config.resolve import prune_end, resolve_mesh_shape, task_for


def _validate_optimizer(cfg: Config) -> None:
    o = cfg.optim
    if o.nesterov and o.name != "sgd":
        raise ConfigError(f"optim.nesterov is SGD's option; optim.name is '{o.name}'. Set "
                          f"optim.name: sgd or drop optim.nesterov.")
    if o.schedule == "plateau" and (cfg.data.eval_split is None and cfg.data.eval_corpus is None
                                    or not cfg.eval.every):
        raise ConfigError("optim.schedule 'plateau' lowers the LR when the validation metric "
                          "stalls: set data.eval_split (or data.eval_corpus) and eval.every.")


def validate(cfg: Config, num_devices: int) -> None:
    """Raises ConfigError naming the key at fault. Call before building anything expensive."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    check_values(cfg)  # every key's own choices, finiteness and range (config/ranges.py)
    if not all(isinstance(t, str) and t for t in cfg.data.extra_special_tokens):
        raise ConfigError("data.extra_special_tokens must be a list of non-empty strings, e.g. "
                          "['<doc>', '<title>'].")
    d = cfg.data
    _check_columns(cfg)
    _check_local_splits(cfg)
    for key, off in (("keep_labels", "null"), ("per_class", "0")):  # single-label tasks only
        if str(getattr(d, key)).replace("None", "null") != off and \
                task_for(cfg) not in IMAGE_TASKS + MULTIMODAL_TASKS + ("classification",):
            raise ConfigError(f"data.{key} selects examples by their one class; train.task "
                              f"{task_for(cfg)} does not read it. Filter the labelled file "
                              f"itself, or set data.{key}={off}.")
    if d.keep_labels and "classification" in task_for(cfg) and \
            len({str(v) for v in d.keep_labels}) < 2:
        raise ConfigError(f"data.keep_labels={d.keep_labels} keeps one class; a classifier "
                          f"needs at least 2: list more, or null for all.")
    text = cfg.towers.text.model if m.kind in MULTIMODAL_KINDS else m  # the text model
    if d.tokenizer is None:
        check_tokenizer_size(d.tokenizer_vocab_size, text.kind)
    if m.attention == "cudnn" and _backend() not in ("gpu", "cuda"):
        raise ConfigError(f"model.attention 'cudnn' needs an NVIDIA GPU; this machine's JAX "
                          f"backend is '{_backend()}'. Use model.attention=auto.")
    if m.head_dim is None and m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size ({m.hidden_size}) must be divisible by "
                          f"model.num_heads ({m.num_heads}) (or set model.head_dim).")
    max_len_key = "towers.text.model.max_len" if m.kind in MULTIMODAL_KINDS else "model.max_len"
    if cfg.data.seq_len > text.max_len:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds {max_len_key} "
                          f"({text.max_len}); lower data.seq_len or raise {max_len_key}.")
    if (task_for(cfg) in IMAGE_TASKS) != (m.kind in IMAGE_KINDS):
        raise ConfigError(f"train.task '{task_for(cfg)}' does not fit model.kind '{m.kind}': "
                          f"image_classification needs an image encoder (model.kind vit or "
                          f"resnet, e.g. model.preset=vit-ti16), and text tasks a text one.")
    if m.kind in IMAGE_KINDS:
        _validate_images(cfg)
    if (task_for(cfg) in MULTIMODAL_TASKS) or (m.kind in MULTIMODAL_KINDS):
        _validate_multimodal(cfg)
    if task_for(cfg) == "mlm" and m.kind != "encoder":
        raise ConfigError("train.task 'mlm' needs model.kind 'encoder' (bidirectional); "
                          "use 'clm' for a decoder.")
    if task_for(cfg) == "clm" and m.kind != "decoder":
        raise ConfigError("train.task 'clm' needs model.kind 'decoder' (causal); "
                          "use 'mlm' for an encoder.")
    ob = cfg.objective
    if ob.mask_token_rate + ob.random_token_rate > 1:
        raise ConfigError("objective.mask_token_rate and objective.random_token_rate must sum "
                          "to at most 1.")
    if t.loss_spike_factor != 0 and t.loss_spike_factor <= 1:
        raise ConfigError(f"train.loss_spike_factor ({t.loss_spike_factor}) must be above 1 "
                          f"(e.g. 5: stop when a step's loss is 5x the recent mean), or 0 "
                          f"to turn the check off.")
    _validate_optimizer(cfg)
    _check_rules(o.weight_decay_rules, "optim.weight_decay_rules", bool)
    _validate_finetune(cfg)

    # Batch layout: the global batch is split into grad_accum microbatches, each of which is
    # split across the data-parallel devices (data * fsdp axes, or every device under pmap).
    if cfg.mesh.parallelism == "pmap":
        split = [f"mesh.{k}={getattr(cfg.mesh, k)}" for k in ("fsdp", "tensor")
                 if getattr(cfg.mesh, k) != 1]
        if split:
            raise ConfigError(f"mesh.parallelism=pmap is pure data parallelism, but "
                              f"{' and '.join(split)} asks to split the model: use "
                              f"mesh.parallelism=jit for that, or set it to 1.")
        dp = num_devices
        where = f"the {num_devices} devices (mesh.parallelism=pmap)"
    else:
        data, fsdp, _ = resolve_mesh_shape(cfg.mesh, num_devices)
        dp = data * fsdp
        where = f"the data-parallel size mesh.data*mesh.fsdp = {data}*{fsdp} = {dp}"
    if t.global_batch % t.grad_accum:
        raise ConfigError(f"train.global_batch ({t.global_batch}) is not divisible by "
                          f"train.grad_accum ({t.grad_accum}).")
    if task_for(cfg) in FINETUNE_TASKS + IMAGE_TASKS + MULTIMODAL_TASKS and \
            cfg.eval.batch_size % dp:
        raise ConfigError(f"eval.batch_size ({cfg.eval.batch_size}) must be divisible by {where}. "
                          f"Try eval.batch_size={_round_up(cfg.eval.batch_size, dp)}.")
    micro = t.global_batch // t.grad_accum
    mixing = cfg.augment.mixup > 0 or cfg.augment.cutmix > 0
    if m.kind in IMAGE_KINDS and mixing and (micro // dp) % 2:
        raise ConfigError(f"augment.mixup / augment.cutmix mix rows in pairs, so each device's "
                          f"share of a microbatch ({micro} / {dp}) must be even. Try "
                          f"train.global_batch={_round_up(t.global_batch, 2 * dp * t.grad_accum)}.")
    if micro % dp:
        raise ConfigError(f"Each microbatch (train.global_batch / train.grad_accum = {micro}) "
                          f"must be divisible by {where}. Try train.global_batch="
                          f"{_round_up(t.global_batch, dp * t.grad_accum)}.")


def _validate_finetune(cfg: Config) -> None:
    f, e, task = cfg.finetune, cfg.eval, task_for(cfg)
    for key in ("load", "dont_load", "init_fresh", "freeze"):
        _check_regexes(getattr(f, key), f"finetune.{key}")
    _check_regexes([f.lora_targets], "finetune.lora_targets")
    _check_pruning(cfg)
    _check_distill(cfg)
    if f.lr_multipliers:
        _check_rules(f.lr_multipliers, "finetune.lr_multipliers")
        for pattern, factor in f.lr_multipliers:
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
                raise ConfigError(f"finetune.lr_multipliers: the factor for {pattern!r} must be "
                                  f"a non-negative number, got {factor!r}.")
    if task in PRETRAIN_TASKS:
        if f.linear_probe or f.lora_rank or f.unfreeze != "none" or f.freeze:
            raise ConfigError(f"train.task is '{task}' (pretraining); the finetune.* strategies "
                              f"(linear_probe, lora_rank, unfreeze, freeze) need a finetuning "
                              f"task: one of {', '.join(FINETUNE_TASKS)}. (finetune.init_from "
                              f"works for both: pretraining continues from it.)")
        return
    if cfg.data.label_column is None and task not in IMAGE_TASKS + ("contrastive",):
        raise ConfigError(f"train.task '{task}' needs labels: set data.label_column to the "
                          f"column that holds them.")
    if f.unfreeze == "adaptive" and cfg.data.eval_split is None:
        raise ConfigError("finetune.unfreeze 'adaptive' unfreezes when the validation metric "
                          "stops improving: set data.eval_split (and eval.every).")
    if (e.early_stopping or f.unfreeze == "adaptive") and e.every == 0:
        raise ConfigError("eval.early_stopping and finetune.unfreeze 'adaptive' act on periodic "
                          "evaluations: set eval.every to a number of steps.")
    # What finetune.linear_probe (the head only) cannot be combined with: (is it on, what it
    # trains, the value that turns it off).
    beside_probe = {"unfreeze": (f.unfreeze != "none", "unfreezes backbone layers", "none"),
                    "lora_rank": (f.lora_rank > 0, "trains adapters inside the backbone", 0)}
    for key, (on, what, off) in beside_probe.items():
        if f.linear_probe and on:
            raise ConfigError(f"finetune.linear_probe trains the head only; finetune.{key} "
                              f"({getattr(f, key)}) {what}. Choose one: "
                              f"finetune.linear_probe=false or finetune.{key}={off}.")


def _check_pruning(cfg: Config) -> None:
    f = cfg.finetune
    if not f.prune_sparsity:
        return
    _check_regexes([f.prune_targets], "finetune.prune_targets")
    end = prune_end(cfg)
    if not f.prune_start < end <= cfg.train.steps:
        raise ConfigError(f"finetune.prune_start ({f.prune_start}) and prune_end ({end}) must "
                          f"satisfy prune_start < prune_end <= train.steps ({cfg.train.steps}).")
    # What pruning cannot be combined with: the weights it prunes are frozen (LoRA trains
    # adapters beside them), or the optimizer state that holds its masks restarts per phase.
    for key, on, why in (("lora_rank", f.lora_rank > 0, "freezes the weights pruning zeroes"),
                         ("unfreeze", f.unfreeze != "none", "restarts the optimizer state "
                                                            "(and the masks) each phase")):
        if on:
            raise ConfigError(f"finetune.prune_sparsity with finetune.{key}={getattr(f, key)}: "
                              f"it {why}. Choose one.")


def _check_distill(cfg: Config) -> None:
    """What can be checked of distill.* without reading the teacher (jobs/distill.py checks
    the teacher itself: its tokenizer, labels and layers)."""
    d = cfg.distill
    if d.teacher is None:
        if d.hidden_layers:
            raise ConfigError("distill.hidden_layers is set but distill.teacher is null; name "
                              "the teacher (a ptft run or hf:...) or drop hidden_layers.")
        return
    if task_for(cfg) not in DISTILL_TASKS:
        raise ConfigError(f"distill.teacher: train.task {task_for(cfg)} cannot be distilled; "
                          f"distillation trains {' or '.join(DISTILL_TASKS)} students.")
    if not isinstance(d.hidden_layers, list) or not all(
            isinstance(pair, (list, tuple)) and len(pair) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in pair)
            for pair in d.hidden_layers):
        raise ConfigError(f"distill.hidden_layers must be a list of [student_layer, "
                          f"teacher_layer] pairs of layer numbers (0 = the embeddings), e.g. "
                          f"[[2, 4], [4, 6]]; got {d.hidden_layers!r}.")
    for s, _ in d.hidden_layers:
        if s > cfg.model.num_layers:
            raise ConfigError(f"distill.hidden_layers: student layer {s} is past the student's "
                              f"model.num_layers ({cfg.model.num_layers}).")
    if d.alpha == 1.0 and not (d.hidden_layers and d.hidden_weight):
        raise ConfigError("distill.alpha=1 trains on the labels alone and no hidden layers are "
                          "matched: the teacher would do nothing. Lower distill.alpha, or set "
                          "distill.teacher=null.")


# The data.*_column keys each kind of task reads, the labels last; what each column holds.
COLUMNS = {"text": ("text_column", "text_pair_column", "label_column"),
           "image": ("image_column", "label_column"),
           "pairs": ("image_column", "text_column", "label_column")}
HOLDS = {"text_column": "texts", "text_pair_column": "second texts", "image_column": "images",
         "label_column": "labels"}


def _check_columns(cfg: Config) -> None:
    """Each column a task reads is a different one: labels read from the text column would
    train the model to copy its input (or fail on a duplicate column)."""
    task = task_for(cfg)
    kind = "image" if task in IMAGE_TASKS else "pairs" if task in MULTIMODAL_TASKS else "text"
    seen: dict[str, str] = {}
    for key in COLUMNS[kind]:
        column = getattr(cfg.data, key)
        if column is not None and column in seen:
            raise ConfigError(f"data.{key} and data.{seen[column]} both name the column "
                              f"'{column}'; set data.{key} to the column that holds the "
                              f"{HOLDS[key]}.")
        seen.setdefault(column, key)


def check_tokenizer_size(size: int, kind: str) -> None:
    """A tokenizer ptft trains needs room for its alphabet and special tokens."""
    smallest = 128 if kind == "encoder" else 257  # a byte-level BPE starts from 256 bytes
    if size < smallest:
        name = "WordPiece" if kind == "encoder" else "byte-level BPE"
        raise ConfigError(f"data.tokenizer_vocab_size ({size}) is too small to train a {name} "
                          f"tokenizer; use at least {smallest} (8192 or more is usual).")


def local_files(corpus: str | None) -> bool:
    """Whether a text corpus names local files (one split), not a dataset with splits."""
    return corpus is not None and not corpus.startswith(("hf:", "tfds:", "bundled:"))


def _check_local_splits(cfg: Config) -> None:
    """Local text files are one split: an eval split asked of them is a config that could
    only fail once the training data is tokenized (a shipped config's eval_split, say)."""
    d = cfg.data
    if not local_files(d.corpus) or task_for(cfg) in IMAGE_TASKS + MULTIMODAL_TASKS:
        return
    if d.eval_split not in (None, "train") and d.eval_corpus is None:
        raise ConfigError(f"data.eval_split is '{d.eval_split}' but data.corpus '{d.corpus}' "
                          f"is local files, which have one split: give labelled evaluation "
                          f"files as data.eval_corpus=FILE, or set data.eval_split=null to "
                          f"train without evaluation.")


def _check_regexes(patterns, key: str) -> None:
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"'{key}' must be a list of regex strings, got {patterns!r}.")
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ConfigError(f"'{key}': regex {p!r} does not compile: {e}.") from None


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _backend() -> str:
    import jax
    return jax.default_backend()


def _check_rules(rules, key: str, value_type=None) -> None:
    if not isinstance(rules, list) or not rules:
        raise ConfigError(f"'{key}' must be a non-empty list of [regex, value] pairs.")
    for rule in rules:
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(f"'{key}': each rule must be [regex, value], got {rule!r}.")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ConfigError(f"'{key}': rule regex {rule[0]!r} does not compile: {e}.") from None
        if value_type is bool and not isinstance(rule[1], bool):
            raise ConfigError(f"'{key}': the value for {rule[0]!r} must be true or false, got "
                              f"{rule[1]!r} (a string such as \"no\" would count as true).")


def _validate_images(cfg: Config, prefix: str = "model") -> None:
    m, a = cfg.model, cfg.augment
    if m.channels not in (1, 3):
        raise ConfigError(f"{prefix}.channels ({m.channels}) must be 1 (grayscale) or 3 (RGB).")
    if m.kind == "vit" and m.image_size % m.patch_size:
        raise ConfigError(f"{prefix}.image_size ({m.image_size}) must be a multiple of "
                          f"{prefix}.patch_size ({m.patch_size}) for a ViT.")
    if m.kind == "resnet":
        if m.scan_layers:
            raise ConfigError(f"{prefix}.scan_layers stacks identical layers; a ResNet's stages "
                              f"differ in shape. Set {prefix}.scan_layers=false.")
        stages = m.resnet_stages
        if not stages or not all(isinstance(s, int) and s >= 1 for s in stages):
            raise ConfigError(f"{prefix}.resnet_stages ({stages}) must be a list of block counts "
                              f">= 1, e.g. [2, 2, 2, 2] (ResNet-18).")
        if m.num_layers != sum(stages):
            raise ConfigError(f"{prefix}.num_layers ({m.num_layers}) must equal the blocks of "
                              f"{prefix}.resnet_stages ({sum(stages)}); leave it unset.")
    for key, pair, low, high in (("augment.crop_scale", a.crop_scale, 0, 1),
                                 ("augment.crop_ratio", a.crop_ratio, 0, None)):
        ok = isinstance(pair, list) and len(pair) == 2 and \
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
        if not ok or not low < pair[0] <= pair[1] or (high is not None and pair[1] > high):
            raise ConfigError(f"{key} ({pair}) must be [low, high] with {low} < low <= high"
                              + (f" <= {high}" if high is not None else "") + ".")
    for key, values in (("augment.mean", a.mean), ("augment.std", a.std)):
        if not isinstance(values, list) or len(values) not in (1, m.channels) or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{key} ({values}) must be a list of 1 or model.channels="
                              f"{m.channels} numbers.")
    if any(v <= 0 for v in a.std):
        raise ConfigError(f"augment.std ({a.std}) must be positive.")
    if cfg.data.keep_labels is not None and not cfg.data.keep_labels:
        raise ConfigError("data.keep_labels is an empty list; list the classes to keep, or "
                          "null for all.")


def _validate_multimodal(cfg: Config) -> None:
    """Two towers or a fused model: each tower checked as a model of its own, and what the
    pairing needs (equal projection widths, prompt templates with a slot, no microbatches for
    a loss over the whole batch)."""
    m, task, towers = cfg.model, task_for(cfg), cfg.towers
    wanted = {"contrastive": "two_tower", "multimodal_classification": "fusion"}.get(task)
    if wanted is None or m.kind != wanted:
        raise ConfigError(f"train.task '{task}' does not fit model.kind '{m.kind}': contrastive "
                          f"trains model.kind two_tower, multimodal_classification model.kind "
                          f"fusion (both built from towers.image and towers.text).")
    image, text = towers.image.model, towers.text.model
    if image.kind not in IMAGE_KINDS:
        raise ConfigError(f"towers.image.model.kind is '{image.kind}'; it must be an image "
                          f"encoder: one of {', '.join(IMAGE_KINDS)} (e.g. "
                          f"towers.image.model.preset=vit-ti16).")
    if text.kind != "encoder":
        raise ConfigError(f"towers.text.model.kind is '{text.kind}'; the text tower is a "
                          f"bidirectional encoder (e.g. towers.text.model.preset=bert-tiny).")
    for name, tower in (("image", image), ("text", text)):
        if tower.hidden_size % tower.num_heads:
            raise ConfigError(f"towers.{name}.model.hidden_size ({tower.hidden_size}) must be "
                              f"divisible by towers.{name}.model.num_heads ({tower.num_heads}).")
    _validate_images(dataclasses.replace(cfg, model=image), prefix="towers.image.model")
    if task == "contrastive":
        dims = (towers.image.projection_dim, towers.text.projection_dim)
        if dims[0] != dims[1]:
            raise ConfigError(f"towers.image.projection_dim ({dims[0]}) and "
                              f"towers.text.projection_dim ({dims[1]}) differ: the two towers "
                              f"project into one shared space, so set both to the same width.")
        if cfg.train.grad_accum > 1:
            raise ConfigError(f"train.grad_accum ({cfg.train.grad_accum}) would split the batch "
                              f"into microbatches, and a contrastive loss needs every negative "
                              f"of the global batch in one pass: set train.grad_accum=1 and "
                              f"lower train.global_batch (or add devices).")
        prompts = cfg.eval.prompts
        if not isinstance(prompts, list) or not prompts or \
                not all(isinstance(t, str) for t in prompts):
            raise ConfigError("eval.prompts must be a list of templates such as "
                              "['a photo of a {}.'].")
        for template in prompts:
            if template.count("{}") != 1:
                raise ConfigError(f"eval.prompts: template {template!r} must hold exactly one "
                                  f"{{}} slot, where the class name goes (e.g. 'an emoji of "
                                  f"{{}}.').")
        names = cfg.eval.zero_shot_classes
        if names is not None and (not isinstance(names, list) or not names or
                                  not all(isinstance(n, str) and n for n in names)):
            raise ConfigError("eval.zero_shot_classes must be a non-empty list of class names, "
                              "or null to take the eval split's labels.")
    else:
        if m.hidden_size % m.num_heads:
            raise ConfigError(f"model.hidden_size ({m.hidden_size}) must be divisible by "
                              f"model.num_heads ({m.num_heads}) (the fusion layers).")
    a = cfg.augment
    if a.mixup or a.cutmix:
        raise ConfigError("augment.mixup / augment.cutmix mix two images, which would break "
                          "their image-text pairing; turn them off for image-text tasks.")
