"""`ptft export RUN_DIR --format onnx OUT_DIR`: a finetuned text classifier as an ONNX model.

jax2onnx traces what `ptft predict` computes (the classifier, then softmax, sigmoid or the
regression value) with the weights as constants (LoRA adapters merged) into OUT_DIR/model.onnx:

    inputs   input_ids, attention_mask, token_type_ids   int32 [batch, length]
    output   probabilities [batch, labels]   (classification, multi_label)
             value [batch]                   (regression)

Batch and length are both dynamic (length up to the run's data.seq_len). Beside the model:
tokenizer.json, set up to write ptft's rows itself ([CLS] a [SEP] / a <|endoftext|>, pairs
with type ids 1 on the second text, truncation to data.seq_len, padding to the longest text
of a batch), so that a runtime with `tokenizers` and `onnxruntime` and no JAX gets the same
inputs; labels.json; and onnx.json (what it came from, its inputs and outputs, the check).

The export is checked before it is kept: onnxruntime runs it on rows of several batch sizes
and lengths, and its outputs must equal ptft's within ONNX_TOLERANCE; otherwise nothing is
written. jax2onnx's package metadata pins an older orbax-checkpoint than ptft's, though its
export does not use it: install it with `pip install --no-deps jax2onnx` (see the README).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ptft_jax.config.load import load_run_config
from ptft_jax.config.schema import FINETUNE_TASKS, ConfigError, task_for
from ptft_jax.core.files import atomic_write_json, building_folder, check_new_folder
from ptft_jax.core.lora import LORA_KEY, lora_spec, merge
from ptft_jax.data.tokenizer import TokenIds, load_tokenizer
from ptft_jax.infer.predict import load_run

ONNX_TOLERANCE = 1e-4  # max abs difference from ptft's outputs, float32
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
INSTALL = ("pip install onnx onnx-ir onnxruntime && pip install --no-deps jax2onnx==0.17.1 "
           "(or .venv/bin/pip install -e '.[onnx]' and the same --no-deps line)")


def _runtime():
    try:
        import jax2onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise ConfigError(f"--format onnx needs jax2onnx and onnxruntime ({e.name} is not "
                          f"installed): {INSTALL}.") from None
    return onnxruntime


def export_onnx(run_dir, out_dir) -> dict:
    """Write OUT_DIR (model.onnx, tokenizer.json, labels.json, onnx.json) from a finetuned
    text classifier's best (else latest) checkpoint; returns what was written and checked."""
    ort = _runtime()
    run_dir, out_dir = Path(run_dir), check_new_folder(Path(out_dir), "OUT_DIR")
    kind = task_for(load_run_config(run_dir)) if (run_dir / "config.yaml").is_file() else None
    if kind is not None and kind not in FINETUNE_TASKS:
        raise ConfigError(f"{run_dir} was trained with train.task={kind}: --format onnx exports "
                          f"finetuned text classifiers ({', '.join(FINETUNE_TASKS)}) so far. "
                          f"Export a finetune run, or use --format hf for a pretraining run.")
    engine, state, cfg, source = load_run(run_dir)
    host = engine.host_state(state)
    params, spec = host.params, lora_spec(cfg)
    if spec is not None and LORA_KEY in params:
        params = merge(params, spec)
    predict = _predict_fn(engine.task, params, host.model_state)
    output = "value" if engine.task.labels.kind == "regression" else "probabilities"
    with building_folder(out_dir, "onnx export", marked=False) as tmp:
        _convert(predict, tmp / "model.onnx", output)
        diff, shapes = _check(ort, tmp / "model.onnx", predict, cfg)
        if diff > ONNX_TOLERANCE:
            raise ValueError(f"the ONNX model's outputs differ from ptft's by up to {diff:.2e} "
                             f"(more than {ONNX_TOLERANCE:g}); nothing was written to "
                             f"{out_dir}. Report this with the run's config.yaml.")
        tokenizer = runtime_tokenizer(run_dir / "tokenizer.json", cfg.model.kind,
                                      cfg.data.seq_len)
        tokenizer.save(str(tmp / "tokenizer.json"))
        shutil.copyfile(run_dir / "labels.json", tmp / "labels.json")
        meta = {"source": source, "task": engine.task.labels.kind,
                "labels": list(engine.task.labels.names), "inputs": list(INPUTS),
                "output": output, "max_length": cfg.data.seq_len,
                "lora_merged": spec is not None, "checked_shapes": shapes,
                "max_abs_diff_from_ptft": diff}
        atomic_write_json(tmp / "onnx.json", meta)
    return {**meta, "out_dir": str(out_dir)}


def _predict_fn(task, params, model_state):
    """(input_ids, attention_mask, token_type_ids) -> what `ptft predict` computes."""
    import jax.numpy as jnp

    def predict(input_ids, attention_mask, token_type_ids):
        batch = {"tokens": input_ids, "segment_ids": attention_mask,
                 # Positions from a cumulative sum: jnp.arange of a dynamic length does not
                 # trace in jax2onnx; padding's positions do not matter (it is masked).
                 "positions": jnp.cumsum(jnp.ones_like(input_ids), axis=1) - 1,
                 "type_ids": token_type_ids,
                 "weight": jnp.ones_like(input_ids[:, 0], dtype=jnp.float32)}
        return task.predict(params, model_state, batch)
    return predict


def _convert(predict, path: Path, output: str) -> None:
    import jax
    import jax.numpy as jnp
    from jax2onnx import to_onnx
    spec = jax.ShapeDtypeStruct(("batch", "length"), jnp.int32)
    to_onnx(predict, [spec, spec, spec], input_names=list(INPUTS), output_names=[output],
            return_mode="file", output_path=str(path))


def _check(ort, path: Path, predict, cfg) -> tuple[float, list]:
    """The largest |onnxruntime - ptft| over rows of several batch sizes and lengths."""
    import jax
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if names != list(INPUTS):
        raise ValueError(f"the ONNX model's inputs are {names}, not {list(INPUTS)}")
    rng = np.random.default_rng(0)
    T, vocab, pairs = cfg.data.seq_len, cfg.model.vocab_size, bool(cfg.data.text_pair_column)
    worst, shapes = 0.0, []
    for batch, length in ((1, min(T, 5)), (3, T), (8, max(2, T // 2))):
        lengths = rng.integers(1, length + 1, batch)
        lengths[0] = length  # one row fills the batch's length, as padding to the longest does
        mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
        ids = np.where(mask, rng.integers(5, vocab, (batch, length)), 0).astype(np.int32)
        types = ((np.arange(length)[None] >= lengths[:, None] // 2) & (mask == 1)).astype(
            np.int32) if pairs else np.zeros_like(ids)
        ours = np.asarray(jax.jit(predict)(ids, mask, types))
        theirs = session.run(None, dict(zip(INPUTS, (ids, mask, types))))[0]
        worst = max(worst, float(np.max(np.abs(ours - theirs))))
        shapes.append([batch, length])
    return worst, shapes


def runtime_tokenizer(path: Path, model_kind: str, seq_len: int):
    """The run's tokenizer, set up to write ptft's rows (data/labelled.py) on its own."""
    from tokenizers import processors
    tokenizer = load_tokenizer(path)
    ids = TokenIds.of(tokenizer, model_kind)
    end = tokenizer.id_to_token(ids.eos_id)
    if ids.bos_id is not None:
        start = tokenizer.id_to_token(ids.bos_id)
        single, pair = f"{start} $A {end}", f"{start} $A {end} $B:1 {end}:1"
        special = [(start, ids.bos_id), (end, ids.eos_id)]
    else:
        single, pair = f"$A {end}", f"$A {end} $B:1 {end}:1"
        special = [(end, ids.eos_id)]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                             special_tokens=special)
    tokenizer.enable_truncation(seq_len, strategy="longest_first")
    pad = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=pad if pad is not None else 0,
                             pad_token=tokenizer.id_to_token(pad if pad is not None else 0))
    return tokenizer


def describe(result: dict) -> str:
    return (f"exported {result['source']} to {result['out_dir']}/model.onnx "
            f"({result['task']}, output '{result['output']}', dynamic batch and length up to "
            f"{result['max_length']}" + ("; LoRA adapters merged" if result["lora_merged"]
                                         else "") +
            f"): onnxruntime matches ptft within {result['max_abs_diff_from_ptft']:.1e}")
