"""Validation: everything about a config that can be known before compiling.

`validate(cfg, num_devices)` raises ConfigError naming the key at fault and how to fix it;
the training commands call it before building anything expensive or writing anything.
"""
from __future__ import annotations

import dataclasses
import re

from ptft_jax.config.schema import (FINETUNE_TASKS, IMAGE_KINDS, IMAGE_TASKS, MULTIMODAL_KINDS,
                                    MULTIMODAL_TASKS, PRETRAIN_TASKS, Config, ConfigError,
                                    check_choices, resolve_mesh_shape, task_for)


def _validate_optimizer(cfg: Config) -> None:
    o = cfg.optim
    for key in ("b1", "b2", "momentum"):
        if not 0 <= getattr(o, key) < 1:
            raise ConfigError(f"optim.{key} ({getattr(o, key)}) must be in [0, 1), e.g. 0.9.")
    if o.nesterov and o.name != "sgd":
        raise ConfigError(f"optim.nesterov is SGD's option; optim.name is '{o.name}'. Set "
                          f"optim.name: sgd or drop optim.nesterov.")
    if o.schedule == "step" and (o.decay_every < 1 or not 0 < o.decay_factor <= 1):
        raise ConfigError(f"optim.schedule 'step' needs optim.decay_every >= 1 (steps) and "
                          f"optim.decay_factor in (0, 1] (e.g. 0.1); got {o.decay_every} and "
                          f"{o.decay_factor}.")
    if o.schedule == "plateau":
        if cfg.data.eval_split is None and cfg.data.eval_corpus is None or not cfg.eval.every:
            raise ConfigError("optim.schedule 'plateau' lowers the LR when the validation "
                              "metric stalls: set data.eval_split (or data.eval_corpus) and "
                              "eval.every.")
        if not 0 < o.plateau_factor < 1 or o.plateau_patience < 1 or o.plateau_cooldown < 0 \
                or not o.plateau_threshold > 0 or not 0 <= o.plateau_min_scale < 1:
            raise ConfigError("optim.plateau_factor must be in (0, 1), optim.plateau_patience "
                              ">= 1 (evaluations), optim.plateau_cooldown >= 0, "
                              "optim.plateau_threshold > 0, optim.plateau_min_scale in [0, 1).")


def validate(cfg: Config, num_devices: int) -> None:
    """Raises ConfigError naming the key at fault. Call before building anything expensive."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    check_choices(cfg)  # every key with a fixed set of values (Literal types in schema.py)
    if not all(isinstance(t, str) and t for t in cfg.data.extra_special_tokens):
        raise ConfigError("data.extra_special_tokens must be a list of non-empty strings, e.g. "
                          "['<doc>', '<title>'].")
    for key, value in [("model.hidden_size", m.hidden_size), ("model.num_layers", m.num_layers),
                       ("model.num_heads", m.num_heads), ("model.mlp_dim", m.mlp_dim),
                       ("model.max_len", m.max_len), ("data.seq_len", cfg.data.seq_len),
                       ("train.steps", t.steps), ("train.global_batch", t.global_batch),
                       ("train.grad_accum", t.grad_accum), ("train.log_every", t.log_every),
                       ("train.max_skipped_steps", t.max_skipped_steps),
                       ("train.loss_spike_window", t.loss_spike_window),
                       ("checkpoint.keep", cfg.checkpoint.keep)]:
        if value < 1:
            raise ConfigError(f"'{key}' is {value}; it must be at least 1.")
    if m.vocab_size is not None and m.vocab_size < 8:
        raise ConfigError(f"'model.vocab_size' is {m.vocab_size}; use null to take the "
                          f"tokenizer's size, or a size of at least the tokenizer's vocabulary.")
    if m.norm_eps is not None and not 0 < m.norm_eps < 1:
        raise ConfigError(f"model.norm_eps ({m.norm_eps}) must be in (0, 1); null takes the "
                          f"norm's usual value.")
    d = cfg.data
    if d.shuffle_seed < 0:
        raise ConfigError(f"data.shuffle_seed ({d.shuffle_seed}) must be a non-negative "
                          f"integer.")
    if d.prefetch < 1:
        raise ConfigError(f"data.prefetch ({d.prefetch}) must be at least 1: the number of "
                          f"batches placed on the devices ahead of the step (2 is usual).")
    text = cfg.towers.text.model if m.kind in MULTIMODAL_KINDS else m  # the text model
    smallest = 128 if text.kind == "encoder" else 257  # a byte-level BPE starts from 256 bytes
    if d.tokenizer is None and d.tokenizer_vocab_size < smallest:
        raise ConfigError(f"data.tokenizer_vocab_size ({d.tokenizer_vocab_size}) is too small "
                          f"to train a {'WordPiece' if text.kind == 'encoder' else 'byte-level BPE'}"
                          f" tokenizer; use at least {smallest} (8192 or more is usual).")
    if m.attention == "cudnn" and _backend() not in ("gpu", "cuda"):
        raise ConfigError(f"model.attention 'cudnn' needs an NVIDIA GPU; this machine's JAX "
                          f"backend is '{_backend()}'. Use model.attention=auto.")
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size ({m.hidden_size}) must be divisible by "
                          f"model.num_heads ({m.num_heads}).")
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
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout ({m.dropout}) must be in [0, 1).")
    ob = cfg.objective
    if not 0 < ob.mask_rate < 1:
        raise ConfigError(f"objective.mask_rate ({ob.mask_rate}) must be in (0, 1).")
    if ob.mask_token_rate < 0 or ob.random_token_rate < 0 or \
            ob.mask_token_rate + ob.random_token_rate > 1:
        raise ConfigError("objective.mask_token_rate and objective.random_token_rate must be "
                          "non-negative and sum to at most 1.")
    if ob.loss_chunk is not None and ob.loss_chunk < 0:
        raise ConfigError(f"objective.loss_chunk ({ob.loss_chunk}) must be a number of tokens "
                          f"per device (e.g. 4096), 0 to turn chunking off, or null for the "
                          f"default.")
    if t.loss_spike_factor != 0 and t.loss_spike_factor <= 1:
        raise ConfigError(f"train.loss_spike_factor ({t.loss_spike_factor}) must be above 1 "
                          f"(e.g. 5: stop when a step's loss is 5x the recent mean), or 0 "
                          f"to turn the check off.")
    if o.learning_rate <= 0:
        raise ConfigError(f"optim.learning_rate ({o.learning_rate}) must be positive.")
    if o.warmup_steps < 0 or o.clip_norm < 0 or o.weight_decay < 0:
        raise ConfigError("optim.warmup_steps, optim.clip_norm and optim.weight_decay must be "
                          "non-negative.")
    _validate_optimizer(cfg)
    if cfg.checkpoint.every < 0:
        raise ConfigError("checkpoint.every must be >= 0 (0 saves only at the end).")
    if not cfg.checkpoint.every_minutes >= 0:  # also refuses NaN
        raise ConfigError(f"checkpoint.every_minutes ({cfg.checkpoint.every_minutes}) must be "
                          f">= 0 (0: no time-based saves; e.g. 30 saves every half hour).")
    _check_rules(o.weight_decay_rules, "optim.weight_decay_rules", bool)
    _validate_finetune(cfg)

    # Batch layout: the global batch is split into grad_accum microbatches, each of which is
    # split across the data-parallel devices (data * fsdp axes, or every device under pmap).
    if cfg.mesh.parallelism == "pmap":
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
    if f.lr_multipliers:
        _check_rules(f.lr_multipliers, "finetune.lr_multipliers")
        for pattern, factor in f.lr_multipliers:
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
                raise ConfigError(f"finetune.lr_multipliers: the factor for {pattern!r} must be "
                                  f"a non-negative number, got {factor!r}.")
    if not 0 < f.layer_decay <= 1:
        raise ConfigError(f"finetune.layer_decay ({f.layer_decay}) must be in (0, 1]; 1 turns "
                          f"it off (0.65-0.9 are usual).")
    for key in ("unfreeze_every", "unfreeze_patience", "unfreeze_layers"):
        if getattr(f, key) < 1:
            raise ConfigError(f"'finetune.{key}' is {getattr(f, key)}; it must be at least 1.")
    if f.lora_rank < 0 or f.lora_alpha <= 0 or not 0 <= f.lora_dropout < 1:
        raise ConfigError("finetune.lora_rank must be >= 0 (0: no LoRA), finetune.lora_alpha "
                          "positive and finetune.lora_dropout in [0, 1).")
    if e.every < 0 or e.early_stopping < 0 or e.batch_size < 1:
        raise ConfigError("eval.every and eval.early_stopping must be >= 0 and eval.batch_size "
                          ">= 1.")
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
    if f.linear_probe and f.unfreeze != "none":
        raise ConfigError("finetune.linear_probe trains the head only; it cannot be combined "
                          "with finetune.unfreeze (which unfreezes backbone layers).")


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
    if m.image_size < 8 or m.patch_size < 1:
        raise ConfigError(f"{prefix}.image_size ({m.image_size}) must be at least 8 and "
                          f"{prefix}.patch_size ({m.patch_size}) at least 1.")
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
    for key in ("mixup", "cutmix"):
        if getattr(a, key) < 0:
            raise ConfigError(f"augment.{key} ({getattr(a, key)}) must be >= 0 (the Beta "
                              f"distribution's alpha; 0 turns it off, 0.2-1 are usual).")
    if not 0 <= a.mix_prob <= 1:
        raise ConfigError(f"augment.mix_prob ({a.mix_prob}) must be in [0, 1].")
    for key, values in (("augment.mean", a.mean), ("augment.std", a.std)):
        if not isinstance(values, list) or len(values) not in (1, m.channels) or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{key} ({values}) must be a list of 1 or model.channels="
                              f"{m.channels} numbers.")
    if any(v <= 0 for v in a.std):
        raise ConfigError(f"augment.std ({a.std}) must be positive.")
    if not 0 <= cfg.objective.label_smoothing < 1:
        raise ConfigError(f"objective.label_smoothing ({cfg.objective.label_smoothing}) must "
                          f"be in [0, 1).")
    if cfg.data.per_class < 0:
        raise ConfigError(f"data.per_class ({cfg.data.per_class}) must be >= 0 (0: every "
                          f"example).")
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
        if min(dims) < 1:
            raise ConfigError(f"towers.image.projection_dim and towers.text.projection_dim "
                              f"({dims[0]}, {dims[1]}) must be at least 1.")
        if dims[0] != dims[1]:
            raise ConfigError(f"towers.image.projection_dim ({dims[0]}) and "
                              f"towers.text.projection_dim ({dims[1]}) differ: the two towers "
                              f"project into one shared space, so set both to the same width.")
        ob = cfg.objective
        if not ob.temperature > 0:
            raise ConfigError(f"objective.temperature ({ob.temperature}) must be positive "
                              f"(CLIP starts at 0.07, SigLIP at 0.1).")
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
