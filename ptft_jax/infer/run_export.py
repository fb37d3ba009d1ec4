"""`ptft export RUN_DIR OUT_DIR` (--format ptft): a finetuned run as a new run directory
holding one params-only checkpoint, LoRA adapters merged; with `--quantize`, Qwix's int8 model
(infer/quantize.py). What `ptft eval`, `ptft predict`, `ptft serve` and `finetune.init_from`
(float runs) read."""
from __future__ import annotations

import dataclasses
import json
import shutil
from importlib.metadata import version
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from ptft_jax.ckpt.checkpoint import Checkpointer
from ptft_jax.config.schema import ConfigError
from ptft_jax.config.load import load_run_config
from ptft_jax.core.files import building_folder, check_new_folder
from ptft_jax.core.lora import LORA_KEY, lora_spec, merge
from ptft_jax.core.params import count
from ptft_jax.core.state import TrainState
from ptft_jax.infer.head_pruning import (check_prunable, head_importance, importance_batches,
                                         kept_heads, prune_heads, pruned_config)
from ptft_jax.infer.predict import checkpoint_step, load_run
from ptft_jax.infer.quantize import QUANTIZATION_FILE, quantize_params, quantized_task, read_mode
from ptft_jax.tasks.factory import make_task


def merged_params(engine, state, cfg):
    """(host state, its params with LoRA adapters folded into the weights they adapt, whether
    there were adapters to fold) of a loaded run: what every export writes."""
    host = engine.host_state(state)
    params, spec = host.params, lora_spec(cfg)
    merged = spec is not None and LORA_KEY in params
    return host, merge(params, spec) if merged else params, merged


def export_run(run_dir, out_dir, quantize: str | None = None, keep_heads: int | None = None,
               head_examples: int = 1024) -> dict:
    """A finetuned run as a new run directory holding one params-only checkpoint (the best, or
    the latest), with LoRA adapters merged into the weights they adapt: what `ptft eval`,
    `ptft predict`, `ptft serve` and `finetune.init_from` read. `keep_heads`: only each
    layer's that many most important attention heads (infer/head_pruning.py, scored on
    `head_examples` training examples). `quantize` (int8, int8-weights): Qwix's int8 model
    (infer/quantize.py), which eval, predict and serve read. Refuses to write into a
    non-empty folder."""
    run_dir, out_dir = Path(run_dir), check_new_folder(Path(out_dir), "OUT_DIR")
    if read_mode(run_dir) is not None:
        raise ConfigError(f"{run_dir} is already quantized ({QUANTIZATION_FILE}): export the "
                          f"float run it came from.")
    if keep_heads is not None and (run_dir / "config.yaml").is_file():
        check_prunable(load_run_config(run_dir), keep_heads)  # before the run is loaded
    engine, state, cfg, source = load_run(run_dir)
    host, params, merged = merged_params(engine, state, cfg)
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, lora_rank=0,
                                                                init_from=None))
    task, pruning = engine.task, None
    if keep_heads is not None:
        params = jax.tree.map(np.asarray, params)
        batches = importance_batches(cfg, run_dir, task, head_examples)
        importance = head_importance(task, params, host.model_state, batches,
                                     cfg.model.num_layers)
        kept = kept_heads(importance, keep_heads)
        params, cfg = prune_heads(params, kept), pruned_config(cfg, keep_heads)
        task = make_task(cfg, task.labels)
        pruning = {"heads_per_layer": keep_heads, "of": int(importance.shape[1]),
                   "kept": kept.tolist(), "importance": importance.round(6).tolist(),
                   "scored_on_examples": sum(len(b["tokens"]) for b in batches)}
    quantization = None
    if quantize is not None:
        float_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
        params = quantize_params(quantized_task(task, quantize), params, cfg.data.seq_len)
        quantization = {"mode": quantize, "library": f"qwix {version('qwix')}",
                        "weights": "int8, one float32 scale per output channel (absmax)",
                        "activations": "int8 per call" if quantize == "int8" else "float32",
                        "embedding_table": "int8 rows, one scale each; float once loaded",
                        "float_bytes": int(float_bytes),
                        "quantized_bytes": int(sum(x.nbytes for x in jax.tree.leaves(params))),
                        "exported_from": source}
    # Built in a hidden sibling and renamed into place: a killed export leaves no
    # half-written run at out_dir.
    with building_folder(out_dir, "run") as tmp:
        for name in ("tokenizer.json", "labels.json"):
            if (run_dir / name).is_file():  # image runs have no tokenizer
                shutil.copyfile(run_dir / name, tmp / name)
        step = checkpoint_step(source)
        ckpt = Checkpointer(tmp / "checkpoints", async_save=False)
        ckpt.save(step, TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                   opt_state=None, model_state=host.model_state),
                  {"config": cfg.to_dict(), "exported_from": source, "lora_merged": merged,
                   "quantization": quantize, "head_pruning": pruning,
                   # what init_from reads to keep the head only for the same labels
                   "labels": dataclasses.asdict(task.labels) if task.labels else None})
        ckpt.close()
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if quantization is not None:
            (tmp / QUANTIZATION_FILE).write_text(json.dumps(quantization, indent=1) + "\n")
    return {"out_dir": str(out_dir), "source": source, "lora_merged": merged,
            "parameters": count(params), "quantization": quantization,
            "head_pruning": pruning}
