"""A pretrained component restored into any model that holds it (`finetune.init_from`, a
multimodal model's `towers.*.init_from`), and a run's parameters for inference.

A parameter loads when the load / dont_load rules select it and the checkpoint holds it; every
other one must match `init_fresh`. Layer layouts (stacked or unrolled) convert, vocabulary rows
are sliced or padded, ViT position tables are interpolated for another image size, and every
mismatch is collected into one readable error before anything is placed. A component may be
read from under another subtree name (`rename`): a text encoder pretrained under
`transformer/` becomes a multimodal model's `text/` tower.
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

from ptft_jax.ckpt import integrity
from ptft_jax.ckpt.checkpoint import CheckpointMismatch
from ptft_jax.config import hf
from ptft_jax.config.reading import read_yaml
from ptft_jax.config.schema import (IMAGE_KINDS, MULTIMODAL_KINDS, ConfigError,
                                    FinetuneConfig, ModelConfig)
from ptft_jax.convert.hf import flat_params
from ptft_jax.core.lora import LORA_KEY, lora_spec, merge
from ptft_jax.core.params import (any_rule, check_rules_hit, flatten, for_inference, is_stacked,
                                  path_str, stack_layers, unflatten, unstack_layers)
from ptft_jax.models.vision import interpolate_positions

# Parameters whose rows are the vocabulary (path endings: a text tower's table is under text/).
VOCAB_ROWS = ("transformer/token_embed/embedding", "text/token_embed/embedding", "output_bias")
DEFAULT_INIT_FRESH = FinetuneConfig().init_fresh


def pretrained_source(path: str | Path) -> tuple[Path, int]:
    """(checkpoint step folder) from a run directory (its latest checkpoint), a checkpoints
    folder, or one step folder."""
    path = Path(path)
    if (path / "params").is_dir():
        return path, int(path.name) if path.name.isdigit() else 0
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted(int(p.name) for p in integrity.step_folders(folder)
                   if (p / "params").is_dir())
    if not steps:
        raise ValueError(f"finetune.init_from: {path} is not a ptft run (it holds no "
                         f"checkpoint step folder); give a run directory (with checkpoints/), "
                         f"its checkpoints folder or one step folder, or hf:NAME.")
    return folder / str(steps[-1]), steps[-1]


def check_init_from(path, image_task: bool, key: str = "finetune.init_from") -> None:
    """What init_from names, checked before anything is built or written: it exists, is a
    ptft run (or its checkpoints folder, or a step folder), and trained a component of the
    kind the task needs (text or image). ConfigError naming the key and the path."""
    if not path or is_hf_path(path):
        return  # none, or an HF directory: checked where it is opened
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist; give a ptft run directory, its "
                          f"checkpoints folder or one step folder, or hf:NAME for a Hugging "
                          f"Face model.")
    try:
        pretrained_source(path)
    except ValueError as e:  # not a ptft run
        raise ConfigError(str(e)) from None
    config = next((folder / "config.yaml" for folder in (path, *path.parents[:2])
                   if (folder / "config.yaml").is_file()), None)
    if config is None:
        return  # a bare checkpoints folder: the parameters' shapes are checked when loaded
    if (config.parent / "quantization.json").is_file():  # written by ptft export --quantize
        raise ConfigError(f"{key}: {config.parent} is a quantized run (int8, for inference); "
                          f"training starts from float weights: give the run it was exported "
                          f"from.")
    kind = ((read_yaml(config, "the run's config").get("model") or {}).get("kind")
            or ModelConfig.kind)
    if kind not in MULTIMODAL_KINDS and (kind in IMAGE_KINDS) != image_task:
        needed, has = ("an image", "a text") if image_task else ("a text", "an image")
        raise ConfigError(f"{key}: {path} is a run of {has} model (model.kind {kind}); this "
                          f"task needs {needed} component: give a run that trained one.")


def check_label_names(run_dir: Path, step_dir: Path, names) -> None:
    """The run's labels.json must name the labels, in order, that the step was trained with
    (its metadata keeps them): one edited after training would put other names on the head's
    outputs, or fail as a shape mismatch that blames the model config."""
    saved = (integrity.read_meta_file(step_dir).get("labels") or {}).get("names")
    if saved is not None and list(saved) != list(names):
        shown = ", ".join(map(str, saved[:12])) + (", ..." if len(saved) > 12 else "")
        raise ConfigError(f"{Path(run_dir) / 'labels.json'} does not name the labels "
                          f"{step_dir} was trained on ({len(saved)}, in this order: {shown}; "
                          f"it names {len(names)}): it was changed after training. Restore "
                          f"those names.")


def first_intact(run_dir: Path, read, label_names=None):
    """(read(step_dir), step_dir) of the first intact step of a run that inference reads: its
    best checkpoint, else the newest of checkpoints/, then the older ones. A damaged step
    (CheckpointDamaged from `read`) is passed over with one warning line naming it and the
    fault; the run directory is left as it is (training, not inference, moves steps aside).
    `label_names`: the run's labels.json, checked against the step (check_label_names)."""
    run_dir = Path(run_dir)
    candidates = [*integrity.step_folders(run_dir / "best"),
                  *integrity.step_folders(run_dir / "checkpoints")]
    if not candidates:
        raise ValueError(f"{run_dir} holds no checkpoint; give the run_dir of a ptft run that "
                         f"has saved one.")
    faults = []
    for step_dir in candidates:
        try:
            if label_names is not None:
                check_label_names(run_dir, step_dir, label_names)
            result = read(step_dir)
        except integrity.CheckpointDamaged as e:
            faults.append((f"{step_dir.parent.name}/{step_dir.name}", e.fault))
            continue
        for where, fault in faults:
            print(f"warning: checkpoint {where} of {run_dir} is damaged ({fault}); reading "
                  f"{step_dir.parent.name}/{step_dir.name} instead, the newest intact step.",
                  file=sys.stderr, flush=True)
        return result, step_dir
    faults = [f"{where}: {fault}" for where, fault in faults]
    raise ValueError(f"{run_dir} holds no intact checkpoint ({len(faults)} damaged; first: "
                     f"{faults[0]}). `ptft checkpoints verify {run_dir}` lists them; resuming "
                     f"its training run (same command) moves them aside and trains from the "
                     f"newest intact step, or from scratch.")


def inference_params(run_dir: Path, cfg, label_names=None) -> tuple[dict, Path, bool]:
    """(params as host arrays, the step folder read, whether LoRA was merged) of a run: its
    best checkpoint, else its latest intact one, with LoRA adapters folded into the
    weights. `label_names`: see first_intact."""
    params, step_dir = first_intact(run_dir, read_params, label_names)
    params = for_inference(params)
    spec = lora_spec(cfg)
    merged = spec is not None and LORA_KEY in params
    return (merge(params, spec) if merged else params), step_dir, merged


def read_params(step_dir: Path) -> dict:
    """A checkpoint's params item as host NumPy arrays, whatever mesh wrote it, checksums
    verified (CheckpointDamaged if they fail)."""
    return integrity.check_step(step_dir, ["params"])[1]["params"]


def read_source(path, label_names=None) -> tuple[dict, str, list[str]]:
    """(params tree as host arrays, a description, report lines) of what finetune.init_from
    names: a ptft checkpoint, or a Hugging Face model ('hf:...', converted to ptft's paths).
    An HF classifier's output layer is kept only for the same label names (reordered to
    `label_names`); other labels leave it out, to be initialised fresh."""
    if hf.is_hf(str(path)):
        source = hf.open_model(str(path))
        flat, report = flat_params(source)
        if "head/out/kernel" in flat or "head/kernel" in flat:
            report.append(_match_hf_labels(flat, source.config, label_names))
        return unflatten(flat), f"{source.directory} ({source.architecture})", report
    step_dir, step = pretrained_source(path)
    tree, report = read_params(step_dir), []
    # A classifier head trained on other classes (an image component pretrained on five
    # classes, finetuned on five others) is left out, to be initialised fresh.
    saved = (integrity.read_meta_file(step_dir).get("labels") or {}).get("names")
    if "head" in tree and label_names is not None and saved is not None and \
            list(saved) != list(label_names):
        del tree["head"]
        report.append(f"classifier head left out: trained on labels {list(saved)[:10]}, the "
                      f"data's are {list(label_names)[:10]}")
    return tree, f"{step_dir} (step {step})", report


def _match_hf_labels(flat: dict, config: dict, label_names) -> str:
    names = [str(n) for _, n in sorted((int(i), n) for i, n in
                                       (config.get("id2label") or {}).items())]
    out = "head/out/" if "head/out/kernel" in flat else "head/"  # text / image classifiers
    if label_names is not None and sorted(names) == sorted(label_names) and \
            len(names) == flat[out + "kernel"].shape[1]:
        order = [names.index(n) for n in label_names]
        flat[out + "kernel"] = flat[out + "kernel"][:, order]
        flat[out + "bias"] = flat[out + "bias"][order]
        return f"classifier output layer kept: same labels {list(label_names)}"
    del flat[out + "kernel"], flat[out + "bias"]
    return (f"classifier output layer left out: its labels {names} are not the data's "
            f"{list(label_names or [])}")


def load_pretrained(path, model_params, load, dont_load, init_fresh,
                    vocab_rows: int | None = None, label_names=None,
                    rename: dict[str, str] | None = None,
                    key: str = "finetune.init_from") -> tuple[dict, list[str]]:
    """`model_params` (freshly initialised, placed) with the parameters the rules select taken
    from the checkpoint at `path`; returns (params, report lines).

    A model parameter is loaded when a `load` regex matches its path and no `dont_load` regex
    does; every other one must match an `init_fresh` regex. The checkpoint's layer layout
    (stacked or unrolled) is converted to the model's. Vocabulary rows may differ: extra
    checkpoint rows that no token id reaches are sliced off, extra model rows keep their fresh
    values. Every problem is collected and raised together, before anything is placed.
    `rename` ({'transformer': 'text'}) keeps only those top-level subtrees of the checkpoint,
    under the model's names for them. `key`: the config key errors name."""
    wanted = flatten(model_params)
    paths = list(wanted)
    # The default init_fresh rules ('^head/', '^lora/') may match nothing (no LoRA, say);
    # a regex the user wrote may not.
    user_fresh = [r for r in init_fresh if r not in DEFAULT_INIT_FRESH]
    for rule_key, patterns in (("finetune.load", load), ("finetune.dont_load", dont_load),
                               ("finetune.init_fresh", user_fresh)):
        check_rules_hit(paths, patterns, rule_key)
    stored_tree, source, source_report = read_source(path, label_names)
    if rename is not None:
        found = {new: stored_tree[old] for old, new in rename.items() if old in stored_tree}
        if not found:
            raise CheckpointMismatch(f"{source} holds no {' or '.join(f'{k}/' for k in rename)} "
                                     f"component (it has: {', '.join(sorted(stored_tree))}); "
                                     f"point the init_from at a run that trained one.")
        stored_tree = found
    model_stacked = any(is_stacked(p) for p in paths)
    stored_stacked = any(is_stacked(p) for p in flatten(stored_tree))
    if model_stacked and not stored_stacked:
        stored_tree = stack_layers(stored_tree)
    elif stored_stacked and not model_stacked:
        stored_tree = unstack_layers(stored_tree)
    stored = flatten(stored_tree)

    def selected(p):
        return any_rule(p, load) and not any_rule(p, dont_load)

    def fresh_ok(p):
        return any_rule(p, init_fresh)

    loaded, fresh, problems, no_value, notes = {}, [], [], [], []
    for p, leaf in wanted.items():
        if not selected(p) or p not in stored:
            if fresh_ok(p):
                fresh.append(p)
            elif selected(p):
                problems.append(f"  {p}: in the model {tuple(leaf.shape)}, not in the "
                                f"checkpoint")
            else:
                no_value.append(p)
            continue
        value, shape = stored[p], tuple(leaf.shape)
        if value.shape != shape and p.endswith(VOCAB_ROWS) and value.shape[1:] == shape[1:]:
            value, problem = _fit_vocab_rows(p, value, leaf, vocab_rows)
            if problem:
                problems.append(problem)
                continue
        if value.shape != shape and p.endswith("pos_embed") and value.shape[1:] == shape[1:]:
            value = _fit_positions(value, shape)
            if value.shape == shape:
                notes.append(f"{p}: interpolated from {stored[p].shape[0]} to {shape[0]} "
                             f"positions (another image size)")
        if value.shape != shape:
            problems.append(f"  {p}: checkpoint {value.shape} vs model {shape}")
            continue
        loaded[p] = value.astype(leaf.dtype)
    if no_value:
        shown = ", ".join(no_value[:5]) + (" ..." if len(no_value) > 5 else "")
        raise ValueError(f"finetune.dont_load / finetune.load leave {len(no_value)} parameter(s) "
                         f"with no value: {shown}. Load them, or list them in "
                         f"finetune.init_fresh to train them from a fresh init.")
    if problems:
        shown = "\n".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise CheckpointMismatch(f"{key}: the checkpoint at {source} does not fit "
                                 f"the model ({len(problems)} parameter(s)):\n{shown}\nCheck "
                                 f"model.* (preset, sizes) against the pretraining run's "
                                 f"config.yaml, or leave these out with finetune.dont_load.")
    unused = sorted(set(stored) - set(loaded))
    params = jax.tree_util.tree_map_with_path(
        lambda kp, leaf: _place(loaded[_path(kp)], leaf) if _path(kp) in loaded else leaf,
        model_params)
    report = source_report + notes + [f"loaded {len(loaded)} tensor(s) from {source}",
              f"fresh init: {len(fresh)} tensor(s)"
              + (f" ({', '.join(sorted({'/'.join(p.split('/')[:1]) for p in fresh}))})"
                 if fresh else "")]
    if unused:
        groups = sorted({p.split("/")[0] if not p.startswith("transformer/") else p
                         for p in unused})
        report.append(f"not used from the checkpoint: {len(unused)} tensor(s) "
                      f"({', '.join(groups[:6])}{' ...' if len(groups) > 6 else ''})")
    return params, report


def _fit_positions(value: np.ndarray, shape) -> np.ndarray:
    """A ViT's position table for another image size: the patch grid resized bilinearly, the
    class token's row (when there is one on both sides) kept. Unchanged if it cannot fit."""

    def grid(n):  # (grid side, has a class token)
        for cls in (0, 1):
            g = int(round((n - cls) ** 0.5))
            if g * g == n - cls:
                return g, bool(cls)
        return None, None
    (old, old_cls), (new, new_cls) = grid(value.shape[0]), grid(shape[0])
    if old is None or new is None or old_cls != new_cls:
        return value
    return np.asarray(interpolate_positions(value, old, new, old_cls), value.dtype)


def load_pretrained_state(path, model_state: dict, load, dont_load) -> tuple[dict, list[str]]:
    """The checkpoint's mutable model collections (BatchNorm statistics) for the modules the
    load / dont_load rules select, by path without the collection name; others keep theirs."""
    if not model_state or is_hf_path(path):
        return model_state, []
    step_dir, _ = pretrained_source(path)
    if not (step_dir / "model_state").is_dir():
        return model_state, ["the checkpoint holds no model state (BatchNorm statistics): "
                             "they start fresh"]
    stored = flatten(integrity.check_step(step_dir, ["model_state"])[1]["model_state"])
    taken = 0

    def pick(kp, leaf):
        nonlocal taken
        p = _path(kp)
        bare = p.split("/", 1)[1] if "/" in p else p
        ok = any_rule(bare, load) and not any_rule(bare, dont_load)
        if ok and p in stored and stored[p].shape == tuple(leaf.shape):
            taken += 1
            return _place(stored[p].astype(leaf.dtype), leaf)
        return leaf
    state = jax.tree_util.tree_map_with_path(pick, model_state)
    return state, [f"loaded {taken} model-state tensor(s) (BatchNorm statistics)"]


def is_hf_path(path) -> bool:
    return hf.is_hf(str(path))


def _path(key_path) -> str:
    return path_str(key_path)


def _fit_vocab_rows(path, value, leaf, vocab_rows):
    """(rows fitted to the model's vocabulary, or a problem line)."""
    have, want = value.shape[0], leaf.shape[0]
    if have > want:
        if vocab_rows is not None and vocab_rows <= want:
            return value[:want], None
        return value, (f"  {path}: the checkpoint's vocabulary has {have} rows, the model "
                       f"{want}; set model.vocab_size={have} (the tokenizer's ids must fit "
                       f"the model's rows)")
    fresh = np.asarray(jax.device_get(leaf))
    return np.concatenate([value, fresh[have:]], axis=0), None


def _place(value: np.ndarray, leaf):
    """`value` with the sharding of the model's leaf (built per shard, multi-host safe)."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return value
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
