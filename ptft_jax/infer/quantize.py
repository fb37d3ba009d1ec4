"""Post-training int8 quantization of a finetuned run with Qwix: `ptft export RUN OUT
--quantize int8` (or `int8-weights`) writes a run directory that `ptft eval`, `ptft predict`
and `ptft serve` read like any other, running the quantized model.

- Qwix's PTQ provider intercepts `lax.dot_general`: every matmul weight (the attention and MLP
  projections, the head; models/layers.py calls dot_general on its kernels for this) becomes
  int8 with one float32 scale per output channel (absmax), from the float weights with LoRA
  merged. `int8` quantizes the activations too, per call (dynamic range: int8 x int8
  matmuls); `int8-weights` keeps them float (the weights are dequantized before a float
  matmul: a smaller model, not a faster one).
- Qwix quantizes ops, and an embedding lookup is not one of its ops: the token embedding
  table (most of a small encoder's weights) is stored here as int8 rows with one scale each
  and dequantized when the run is loaded: the file shrinks, the table in memory does not.
- The quantized tree is stored as nested dicts of arrays (what Orbax and the checkpoint
  checksums take) and rebuilt into Qwix's structure from the quantized model's abstract
  params when loaded; quantization.json in the run directory says which mode.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from ptft_jax.config.schema import ConfigError
from ptft_jax.core.mesh import LOGICAL_RULES, replicated
from ptft_jax.core.params import flatten, path_str, unflatten
from ptft_jax.train.step import JitStep, eval_step, predict_step

QUANTIZATION_FILE = "quantization.json"
MODES = {"int8": "int8", "int8-weights": None}  # --quantize -> the activations' type
TABLE = "token_embed/embedding"  # the lookup table quantized by hand (its path's end)


def read_mode(run_dir: Path) -> str | None:
    """The run's quantization mode, or None for a float run."""
    path = Path(run_dir) / QUANTIZATION_FILE
    if not path.is_file():
        return None
    try:
        mode = json.loads(path.read_text(encoding="utf-8"))["mode"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} cannot be read ({e}); it was written by `ptft export "
                          f"--quantize`: export the run again.") from None
    if mode not in MODES:
        raise ConfigError(f"{path}: mode {mode!r} is not one of {sorted(MODES)}.")
    return mode


def quantized_task(task, mode: str):
    """A copy of `task` whose model runs its matmuls through Qwix's int8 PTQ."""
    # Products with a weight only: the attention core (scores, weighted values) and the
    # segment pooling run as einsums, which this rule leaves in float.
    rule = qwix.QuantizationRule(module_path=".*", op_names=("dot_general",),
                                 weight_qtype="int8", act_qtype=MODES[mode])
    quantized = copy.copy(task)
    quantized.model = qwix.quantize_model(task.model, qwix.PtqProvider([rule]))
    return quantized


def abstract_params(task, seq_len: int):
    """The quantized model's params as shapes (Qwix's WithAux / QArray structure)."""
    example = task.example_batch(1, seq_len)
    variables = jax.eval_shape(lambda: task.init_variables(jax.random.key(0), example))
    return nn.unbox(variables["params"])


def quantize_params(task, params, seq_len: int) -> dict:
    """Float params (LoRA merged) -> the quantized tree as stored: nested dicts of arrays."""
    quantized = qwix.quantize_params(jax.tree.map(jnp.asarray, params),
                                     abstract_params(task, seq_len))
    flat = {path: np.asarray(leaf) for path, leaf in flatten(quantized).items()}
    for path in [p for p in flat if p.endswith(TABLE)]:
        table = flat.pop(path).astype(np.float32)
        scale = np.maximum(np.abs(table).max(axis=1, keepdims=True), 1e-12) / 127
        flat[path + "/qvalue"] = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
        flat[path + "/scale"] = scale.astype(np.float32)
    return unflatten(flat)


def storage_target(abstract, sharding) -> dict:
    """What a quantized run's params item holds, as ShapeDtypeStructs (Orbax's target)."""
    flat = {}
    for path, leaf in flatten(abstract).items():
        if path.endswith(TABLE):
            flat[path + "/qvalue"] = jax.ShapeDtypeStruct(leaf.shape, jnp.int8,
                                                          sharding=sharding)
            flat[path + "/scale"] = jax.ShapeDtypeStruct((leaf.shape[0], 1), jnp.float32,
                                                         sharding=sharding)
        else:
            flat[path] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    return unflatten(flat)


def unpack(stored: dict, abstract):
    """The stored tree -> Qwix's structure, the embedding table dequantized."""
    flat = flatten(stored)
    for path in [p[:-len("/qvalue")] for p in flat if p.endswith(TABLE + "/qvalue")]:
        flat[path] = flat.pop(path + "/qvalue").astype(jnp.float32) * flat.pop(path + "/scale")
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    return jax.tree_util.tree_unflatten(treedef, [flat[path_str(p)] for p, _ in paths])


class QuantizedSteps(JitStep):
    """The eval and predict steps of a quantized model (train/step.py's, with the parameters
    replicated: a quantized model is one that fits); no train step."""

    def __init__(self, task, mesh):  # pylint: disable=super-init-not-called
        self.mesh = mesh
        self.jitted_eval = jax.jit(functools.partial(eval_step, task=task,
                                                     rules=LOGICAL_RULES))
        self.jitted_predict = jax.jit(functools.partial(predict_step, task=task,
                                                        rules=LOGICAL_RULES))


def quantized_engine(engine, mode: str):
    """(the engine with the quantized task and steps, the restore target's params, what turns
    the restored params into the model's)."""
    if engine.pmap:
        raise ConfigError("a quantized run is read under mesh.parallelism=jit; set it so.")
    task = quantized_task(engine.task, mode)
    abstract = abstract_params(task, engine.cfg.data.seq_len)
    steps = QuantizedSteps(task, engine.step_fn.mesh)
    target = storage_target(abstract, replicated(engine.step_fn.mesh))
    return dataclasses.replace(engine, task=task, step_fn=steps), target, \
        functools.partial(unpack, abstract=abstract)
