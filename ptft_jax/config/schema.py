"""The config's schema: dataclasses with every default in one place, `ConfigError`, the
allowed values of every key that has a fixed set (Literal types), and the task names.
resolve.py says what a config resolves to (its task, pooling, mesh), presets.py holds the
model shapes, ranges.py the range of every number.

load.py builds a Config from YAML and `a.b=value` overrides; validate.py checks what can be
checked without compiling, so a bad config fails in a second, not after a minute of XLA.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which key and how to fix it."""


IMAGE_KINDS = ("vit", "resnet")
# Multimodal models, built from `towers.image` and `towers.text`: two towers aligned by a
# contrastive loss, or both fused under a classification head (model.* then describes the
# fusion layers).
MULTIMODAL_KINDS = ("two_tower", "fusion")
FUSIONS = ("concat", "gated", "cross_attention")

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
OPTIMIZERS = ("adamw", "adam", "sgd", "lamb", "lion", "adafactor")
SCHEDULES = ("cosine", "linear", "constant", "step", "plateau")

PRETRAIN_TASKS = ("mlm", "clm")
FINETUNE_TASKS = ("classification", "multi_label", "regression")
# Supervised image classification is both: ptft pretrain trains an image component on one
# labelled set, ptft finetune puts a new head on it for another.
IMAGE_TASKS = ("image_classification",)
# Image-text pairs: contrastive alignment of two towers (ptft pretrain; a tower may be locked
# through finetune.freeze), and classification by the fused towers (ptft finetune).
MULTIMODAL_TASKS = ("contrastive", "multimodal_classification")
# What a student may learn under distill.teacher (tasks/distill.py).
DISTILL_TASKS = ("classification", "mlm")
TASKS = PRETRAIN_TASKS + FINETUNE_TASKS + IMAGE_TASKS + MULTIMODAL_TASKS


# Keys with a fixed set of values are typed as Literal: these types are the one place the
# values are written. load.py refuses any other value as it reads the YAML, and validate()
# checks every such field of a Config built in code (ranges.check_values, which also holds
# every number's range).
ModelKind = Literal[("encoder", "decoder") + IMAGE_KINDS + MULTIMODAL_KINDS]
TaskName = Literal[("auto",) + TASKS]


def check_choice(value: Any, typ: Any, key: str) -> None:
    """`value` must be one of the Literal type `typ`'s values."""
    options = get_args(typ)
    if value not in options:
        raise ConfigError(f"'{key}' is '{value}'; it must be one of: "
                          f"{', '.join(map(str, options))}.")


@dataclass
class ModelConfig:
    preset: str | None = None
    # encoder (BERT-style, MLM head) | decoder (GPT-style, LM head) | vit | resnet (images) |
    # two_tower | fusion (multimodal: the towers are `towers.image` and `towers.text`)
    kind: ModelKind = "encoder"
    vocab_size: int | None = None  # None: the tokenizer's size, rounded up to a multiple of 128
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int | None = None  # per attention head; null: hidden_size / num_heads (what
    #                              `ptft export --prune-heads` keeps when it drops heads)
    mlp_dim: int = 512
    max_len: int = 512
    type_vocab_size: int = 2  # BERT's segment (token type) embeddings; 0 for none
    dropout: float = 0.0
    norm: Literal["pre", "post"] = "post"  # post (BERT) | pre (GPT-2, with a final norm)
    activation: Literal["gelu", "gelu_tanh", "relu"] = "gelu"  # gelu: the exact form
    norm_eps: float | None = None  # LayerNorm epsilon; None: 1e-12 for post-norm (BERT),
    #                                1e-5 for pre-norm (GPT-2)
    # The compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = False
    remat: Literal[REMAT_POLICIES] = "none"
    # Attention: xla (jax.nn.dot_product_attention's XLA form), cudnn (its cuDNN kernel, NVIDIA
    # GPUs), auto (xla; on a CPU, models/layers.heads_major_attention, measured faster there)
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    # Image encoders. Images are resized to image_size once, when the image cache is built.
    image_size: int = 224
    channels: int = 3  # 1 for grayscale; grayscale sources are repeated to 3 channels if asked
    patch_size: int = 16  # ViT: square patches of this many pixels
    # ViT: cls (the class token) | gap (the mean of the patch tokens)
    image_pooling: Literal["cls", "gap"] = "cls"
    resnet_stages: list = field(default_factory=lambda: [2, 2, 2, 2])  # blocks per stage
    # basic (ResNet-18/34) | bottleneck (ResNet-50 and deeper)
    resnet_block: Literal["basic", "bottleneck"] = "basic"
    resnet_width: int = 64  # channels of the first stage (doubling per stage)
    # imagenet (7x7/2 conv + max pool) | small (3x3/1 conv)
    resnet_stem: Literal["imagenet", "small"] = "imagenet"
    # kind fusion: how the towers' outputs meet. concat (pooled features, concatenated, an
    # MLP) | gated (a learned gate mixes the pooled features) | cross_attention (num_layers
    # blocks in which the text tokens attend to the image tokens); hidden_size, num_heads,
    # mlp_dim, num_layers and dropout size the fusion layers.
    fusion: Literal[FUSIONS] = "concat"


@dataclass
class TowerConfig:
    """One tower of a multimodal model: its encoder, where it starts, its projection."""
    model: ModelConfig = field(default_factory=ModelConfig)
    # A ptft run (its image/ or transformer/ component, by the tower's kind), or a Hugging
    # Face model "hf:DIR" / "hf:OWNER/NAME" / "hf:pkg:PACKAGE/DIR", whose config.json then
    # sets model.*; None: a fresh initialisation.
    init_from: str | None = None
    projection_dim: int = 128  # two_tower: width of the shared embedding space
    pooling: Literal["mean", "cls"] = "mean"  # the text tower's: mean (over real tokens) | cls


def _image_tower() -> TowerConfig:
    return TowerConfig(model=ModelConfig(kind="vit"))


@dataclass
class TowersConfig:
    image: TowerConfig = field(default_factory=_image_tower)
    text: TowerConfig = field(default_factory=TowerConfig)


@dataclass
class DataConfig:
    # Where the text comes from: a file, folder or glob of .txt / .txt.gz (one document per
    # line), .jsonl / .json, .csv or .parquet files; a Hugging Face hub dataset "hf:NAME",
    # "hf:OWNER/NAME" or "hf:OWNER/NAME/CONFIG"; TensorFlow Datasets through array_record,
    # "tfds:NAME[/CONFIG][:VERSION]" (TFDS_DATA_DIR locates it); or "bundled:kjv".
    corpus: str = "bundled:kjv"
    # auto: from the extension (.jsonl and .json are jsonl)
    format: Literal["auto", "text", "jsonl", "csv", "parquet"] = "auto"
    text_column: str = "text"
    label_column: str | None = None
    split: str = "train"
    tokenizer: str | None = None  # a tokenizer.json or vocab.txt; None = train one on the corpus
    tokenizer_vocab_size: int = 8192
    # Added to a trained tokenizer after the ones the objective needs ([PAD] [UNK] [CLS] [SEP]
    # [MASK] for WordPiece, <|endoftext|> for byte-level BPE); never masked by MLM.
    extra_special_tokens: list = field(default_factory=list)
    seq_len: int = 128
    # pack: documents (pretraining) or labelled examples (finetuning) share rows, segment ids
    # keeping them apart | pad: one per row. Packing is the default for finetuning too: at
    # the lengths of real labelled text most of a padded row is padding (README, "Packed
    # finetuning rows").
    packing: Literal["pack", "pad"] = "pack"
    # Packed finetuning rows hold at most this many examples (a static number of label
    # slots per row); 0: data.seq_len // 8.
    examples_per_row: int = 0
    cache_dir: str | None = None  # the pre-tokenized cache; None = <run_dir>/data_cache
    num_workers: int = 0  # tokenizing processes for the cache; 0 = every core
    shuffle_seed: int = 0
    prefetch: int = 2  # batches placed on the devices ahead of the step
    # Finetuning (classification, multi-label, regression): labelled examples.
    text_pair_column: str | None = None  # a second text column: text-pair tasks (type ids 0/1)
    eval_split: str | None = None  # evaluated every eval.every steps and at the end; None: none
    eval_corpus: str | None = None  # where the eval split lives, if not in data.corpus (local
    #                                 files have one split each: point this at the eval files)
    # Images (model.kind vit | resnet). data.corpus is then an image source: "idx:PATH" (the
    # MNIST format: a folder holding <split>-images-idx3-ubyte[.gz] and the labels file, or
    # one images file), a .npz / .npy file, a folder with one subfolder of image files per
    # class ("folder:PATH", or a folder path), "hf:NAME" (an image column) or "tfds:NAME".
    image_column: str = "image"
    resize: bool = True  # resize every image to model.image_size (bilinear); false: sizes
    #                      that differ are an error
    skip_bad_images: bool = False  # unreadable image files: counted and skipped, not an error
    keep_labels: list | None = None  # only these classes (e.g. five of Fashion-MNIST's ten)
    per_class: int = 0  # > 0: the first N examples of each class (after a seeded shuffle)


@dataclass
class ObjectiveConfig:
    mask_rate: float = 0.15  # MLM: fraction of eligible tokens selected
    mask_token_rate: float = 0.8  # of the selected: replaced by [MASK]
    random_token_rate: float = 0.1  # of the selected: replaced by a random token (rest: kept)
    # Tokens per device whose vocabulary logits the loss computes at once, with the gradient
    # fused in (the full [tokens, vocab] logits never exist: a memory saving on accelerators);
    # 0 = all at once; null = the measured default (tasks/vocab_loss.py: all at once).
    loss_chunk: int | None = None
    label_smoothing: float = 0.0  # image classification: mass spread evenly over the classes
    # Two towers: clip (softmax over the global batch, both directions; Radford et al. 2021)
    # | siglip (a sigmoid per pair; Zhai et al. 2023), with a learned temperature (initial
    # value below; SigLIP's paper starts at 0.1) and, for siglip, a learned bias.
    contrastive_loss: Literal["clip", "siglip"] = "clip"
    temperature: float = 0.07
    learn_temperature: bool = True
    siglip_bias: float = -10.0


@dataclass
class AugmentConfig:
    """Image augmentation, on device inside the jitted step, keyed per example (the same key
    gives the same images on 1 or 8 devices). Evaluation only normalises."""
    random_resized_crop: bool = False  # Inception-style crop, resized back to image_size
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])  # area fraction range
    crop_ratio: list = field(default_factory=lambda: [0.75, 1.3333333])  # aspect range
    flip: bool = False  # horizontal flip with probability 1/2
    mixup: float = 0.0  # Beta(alpha, alpha) mixing of an example with its partner; 0: off
    cutmix: float = 0.0  # Beta(alpha, alpha) box pasted from the partner; 0: off
    mix_prob: float = 1.0  # chance that an example is mixed at all (when mixup/cutmix is on)
    # Per-channel normalisation of pixels scaled to [0, 1]; one value applies to every channel.
    mean: list = field(default_factory=lambda: [0.5])
    std: list = field(default_factory=lambda: [0.5])


@dataclass
class MeshConfig:
    # jit (sharded over the mesh below) | pmap (pure data parallel)
    parallelism: Literal["jit", "pmap"] = "jit"
    data: int = -1  # -1: every device not used by the other axes
    fsdp: int = 1
    tensor: int = 1


@dataclass
class OptimConfig:
    # adamw | adam (L2 decay on the gradient) | sgd (with momentum; L2 decay) | lamb (large-
    # batch BERT pretraining) | lion (b1, b2; use a ~3-10x lower LR) | adafactor (factored
    # second moments, update clipping). Every one takes the same decay rules, freezing and
    # LR factors.
    name: Literal[OPTIMIZERS] = "adamw"
    learning_rate: float = 1e-3  # the peak
    warmup_steps: int = 100
    # After warmup: cosine | linear (to end_lr_ratio * peak at train.steps) | constant |
    # step (x decay_factor every decay_every steps) | plateau (constant, x plateau_factor
    # when the validation metric eval.metric stalls for plateau_patience evaluations)
    schedule: Literal[SCHEDULES] = "cosine"
    end_lr_ratio: float = 0.1  # final LR as a fraction of the peak
    decay_every: int = 1000
    decay_factor: float = 0.1
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    plateau_cooldown: int = 0
    plateau_threshold: float = 1e-4  # the metric must beat its best by this much (absolute)
    plateau_min_scale: float = 0.0
    b1: float = 0.9  # adamw, adam, lamb, lion
    b2: float = 0.999  # adamw, adam, lamb, lion (Lion's paper: 0.99)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    weight_decay: float = 0.01
    clip_norm: float = 1.0  # global-norm clipping; 0 turns it off
    # (path regex, decay?) first match wins; every parameter must match one rule.
    weight_decay_rules: list = field(default_factory=lambda: [
        [r"bias$", False],  # every bias, the MLM output bias too
        [r"(^|/)scale$", False],  # LayerNorm scales
        [r"embed", False],  # token, position and type embeddings
        [r".*", True],
    ])


@dataclass
class TrainConfig:
    # mlm | clm | classification | multi_label | regression | auto (mlm for encoders, clm for
    # decoders). ptft pretrain and ptft finetune run the same loop; the task is what differs.
    task: TaskName = "auto"
    steps: int = 1000
    global_batch: int = 32
    grad_accum: int = 1  # microbatches per step, accumulated inside the jitted step
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    # Divergence guard: a step with a non-finite loss, gradient or update is skipped on device.
    # The run stops (exit code 3, nothing saved from then on) after this many skipped steps in
    # a row, or when a step's loss exceeds loss_spike_factor x the mean of the previous
    # loss_spike_window steps (0: no spike check).
    max_skipped_steps: int = 10
    loss_spike_factor: float = 0.0
    loss_spike_window: int = 50


@dataclass
class FinetuneConfig:
    # Start from a pretrained component: a ptft run directory, its checkpoints/ folder or one
    # step folder; or a Hugging Face model, "hf:DIR" (config.json, model.safetensors and a
    # tokenizer) or "hf:OWNER/NAME" (from the hub), whose config.json then sets model.*
    # (BERT-family encoders and GPT-2; pretraining can continue from one too). Rules are
    # regexes on parameter paths ('transformer/layers_0/attn/...'):
    # a parameter is loaded when it matches a `load` regex and no `dont_load` regex; every
    # parameter not loaded must match `init_fresh` (else it is an error, not a silent init).
    init_from: str | None = None
    load: list = field(default_factory=lambda: [".*"])
    dont_load: list = field(default_factory=list)
    init_fresh: list = field(default_factory=lambda: [
        "^head/", "^lora/", "^mlm_head/", "^output_bias$",
        # multimodal: what a contrastive run adds to its towers, and the fusion layers
        "^image_proj/", "^text_proj/", "^contrastive/", "^fusion/",
        "^distill/"])  # distillation's hidden-state projections
    # auto: cls for encoders, last for decoders
    pooling: Literal["auto", "cls", "mean", "last"] = "auto"
    # Which parameters train. All of these combine.
    linear_probe: bool = False  # train the head only
    freeze: list = field(default_factory=list)  # regexes of parameters that never train
    lr_multipliers: list = field(default_factory=list)  # [[regex, factor], ...] first match wins
    layer_decay: float = 1.0  # layer-wise LR decay: layer l of L trains at decay^(L - l)
    # gradual: on a step schedule; adaptive: when the eval metric plateaus
    unfreeze: Literal["none", "gradual", "adaptive"] = "none"
    unfreeze_every: int = 100  # gradual: steps per phase
    unfreeze_patience: int = 1  # adaptive: evaluations without improvement before a phase
    unfreeze_layers: int = 1  # layers unfrozen per phase, top down
    lora_rank: int = 0  # > 0: LoRA adapters on `lora_targets`; the base weights freeze
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = r"attn/(query|value)/kernel$"
    # Magnitude pruning (train/prune.py): the smallest weights of `prune_targets` are set to
    # zero, their share rising on a cubic schedule from 0 at step `prune_start` to
    # `prune_sparsity` at `prune_end` (null: two thirds of train.steps), the masks recomputed
    # every `prune_every` steps over all targets at once (global) or array by array.
    prune_sparsity: float = 0.0  # 0: no pruning
    prune_targets: str = r"^transformer/.*kernel$"
    prune_scope: Literal["global", "per_layer"] = "global"
    prune_start: int = 0
    prune_end: int | None = None
    prune_every: int = 10


@dataclass
class DistillConfig:
    # Knowledge distillation (tasks/distill.py): a frozen teacher (a ptft run or "hf:...", same
    # tokenizer) runs inside each step; the student (classification or masked LM) learns
    # alpha x label loss + (1 - alpha) x T^2 x KL(teacher || student) at temperature T, plus
    # hidden_weight x the squared error of student layer s (through a learned projection) to
    # teacher layer t for each [s, t] in hidden_layers (0 = the embeddings).
    teacher: str | None = None  # null: no distillation
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_layers: list = field(default_factory=list)  # [[student_layer, teacher_layer], ...]
    hidden_weight: float = 1.0


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N steps (and always at the end); 0: only at the end
    batch_size: int = 64  # examples per eval batch; the last batch is padded, never dropped
    metric: str = "auto"  # what early stopping and the best checkpoint follow; auto: macro_f1
    #                       (classification and multi-label), pearson (regression)
    early_stopping: int = 0  # stop after N evaluations without improvement; 0: never
    # Two towers: zero-shot classification embeds each class name through every template
    # (each holds one {} slot) and averages; the classes are these names, else the eval
    # split's labels (data.label_column). Retrieval recall@1/5/10 runs on every evaluation.
    prompts: list = field(default_factory=lambda: ["{}"])
    zero_shot_classes: list | None = None


@dataclass
class CheckpointConfig:
    every: int = 500  # save every N steps (and always at the end); 0 = only at the end
    every_minutes: float = 0.0  # also save when this much wall time passed (0 = off)
    keep: int = 3
    async_save: bool = True


@dataclass
class DistributedConfig:
    enabled: bool = False  # call jax.distributed.initialize before anything else
    coordinator_address: str | None = None  # host:port; None = auto-detect (SLURM, TPU, ...)
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list | None = None


@dataclass
class Config:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    towers: TowersConfig = field(default_factory=TowersConfig)  # model.kind two_tower | fusion
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
