"""`ptft export SOURCE --format onnx OUT_DIR`: a model as OUT_DIR/model.onnx, for onnxruntime.

jax2onnx traces what ptft itself computes, with the weights as constants (LoRA adapters merged):

    finetuned text classifier   input_ids, attention_mask, token_type_ids   int32 [batch, length]
      (a run)                   -> probabilities [batch, labels] (classification, multi_label)
                                   or value [batch] (regression): what `ptft predict` writes
    text encoder (a pretraining input_ids, attention_mask, token_type_ids
      run, or hf:...)           -> embeddings [batch, hidden], L2-normalised: `ptft embed`'s
    image classifier (a run)    pixels uint8 [batch, image_size, image_size, channels]
                                -> probabilities [batch, classes]

Batch is dynamic; for text, length too (up to the run's data.seq_len, or for embeddings
`ptft embed`'s default of 256 or max_len). Beside the model: for text, tokenizer.json set up
to write ptft's rows itself ([CLS] a [SEP] / a <|endoftext|>, pairs with type ids 1 on the
second text, truncation, padding to the longest text of a batch), so that a runtime with
`tokenizers` and `onnxruntime` and no JAX gets ptft's inputs; labels.json for classifiers;
onnx.json (what it came from, inputs, outputs, the check).

The export is checked before it is kept: onnxruntime runs it on inputs of several batch sizes
(and lengths), and its outputs must equal ptft's within ONNX_TOLERANCE; otherwise nothing is
written. jax2onnx's package metadata pins an older orbax-checkpoint than ptft's, though its
export does not use it: install it with `pip install --no-deps jax2onnx` (see the README).
"""
from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer, processors

from ptft_jax.config import hf
from ptft_jax.config.load import load_run_config
from ptft_jax.config.schema import FINETUNE_TASKS, IMAGE_TASKS, PRETRAIN_TASKS, ConfigError
from ptft_jax.config.resolve import task_for
from ptft_jax.core.files import atomic_write_json, building_folder, check_new_folder
from ptft_jax.data.tokenizer import TokenIds, load_tokenizer
from ptft_jax.infer.embed import load_encoder
from ptft_jax.infer.predict import load_run
from ptft_jax.infer.run_export import merged_params
from ptft_jax.models.heads import pool
from ptft_jax.models.transformer import Transformer

ONNX_TOLERANCE = 1e-4  # max abs difference from ptft's outputs, float32
# onnxruntime's dynamic int8: a scale per output channel, and 7-bit weights (reduce_range:
# onnxruntime's advice for CPUs without VNNI, where u8 x s8 products can saturate). On the
# fortunes classifier from all-MiniLM-L6-v2 (2-core AVX2 box) this lost 0.6 macro-F1 points
# where onnxruntime's defaults lost 1.6 (benchmarks/quantization.py, results quantization.md).
INT8_SETTINGS = {"per_channel": True, "reduce_range": True}
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
INSTALL = ("pip install onnx onnx-ir onnxruntime && pip install --no-deps jax2onnx==0.17.1 "
           "(or .venv/bin/pip install -e '.[onnx]' and the same --no-deps line)")


@dataclass
class Exportable:
    """What one kind of model exports as: the function traced and how to check it."""
    fn: Callable  # the inputs, in order -> one output
    inputs: dict  # name -> jax.ShapeDtypeStruct (symbolic dims by name)
    output: str
    samples: Callable  # rng -> list of input tuples to check with
    meta: dict
    tokenizer: object = None  # a configured tokenizers.Tokenizer, for text models
    copies: list = field(default_factory=list)  # files copied beside the model


def _runtime():
    try:
        import jax2onnx  # noqa: F401
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise ConfigError(f"--format onnx needs jax2onnx and onnxruntime ({e.name} is not "
                          f"installed): {INSTALL}.") from None
    return onnxruntime


def export_onnx(source, out_dir, quantize: str | None = None) -> dict:
    """Write OUT_DIR (model.onnx, onnx.json, and tokenizer.json / labels.json as the model
    needs) from a run's best (else latest) checkpoint or a Hugging Face encoder. `quantize`
    "int8": onnxruntime's dynamic quantization of the checked float32 model (INT8_SETTINGS;
    activations quantized per call), its difference from ptft measured and recorded."""
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize {quantize}: --format onnx quantizes to int8 only; give "
                          f"--quantize int8, or leave it out for float32.")
    ort = _runtime()
    out_dir = check_new_folder(Path(out_dir), "OUT_DIR")
    model = _exportable(str(source))
    with building_folder(out_dir, "onnx export", marked=False) as tmp:
        _convert(model, tmp / "model.onnx")
        diff, shapes = _check(ort, tmp / "model.onnx", model)
        if diff > ONNX_TOLERANCE:
            raise ValueError(f"the ONNX model's outputs differ from ptft's by up to {diff:.2e} "
                             f"(more than {ONNX_TOLERANCE:g}); nothing was written to "
                             f"{out_dir}. Report this with the source's config.")
        quantized = {}
        if quantize == "int8":
            quantized = _quantize_int8(ort, tmp / "model.onnx", model)
        if model.tokenizer is not None:
            model.tokenizer.save(str(tmp / "tokenizer.json"))
        for path in model.copies:
            shutil.copyfile(path, tmp / Path(path).name)
        meta = {**model.meta, "inputs": list(model.inputs), "output": model.output,
                "checked_shapes": shapes, "max_abs_diff_from_ptft": diff, **quantized}
        atomic_write_json(tmp / "onnx.json", meta)
    return {**meta, "out_dir": str(out_dir)}


def _exportable(source: str) -> Exportable:
    run_dir = Path(source)
    if hf.is_hf(source) or not (run_dir / "config.yaml").is_file():
        return _encoder(source)  # load_encoder names what a source must be
    kind = task_for(load_run_config(run_dir))
    if kind in PRETRAIN_TASKS:
        return _encoder(source)
    if kind not in FINETUNE_TASKS + IMAGE_TASKS:
        raise ConfigError(f"{run_dir} was trained with train.task={kind}: --format onnx exports "
                          f"text classifiers ({', '.join(FINETUNE_TASKS)}), image classifiers "
                          f"and text encoders (pretraining runs, hf:...) so far.")
    engine, state, cfg, checkpoint = load_run(run_dir)
    host, params, merged = merged_params(engine, state, cfg)
    task = engine.task
    meta = {"source": checkpoint, "task": kind, "lora_merged": merged}
    if kind in IMAGE_TASKS:
        m = cfg.model
        shape = (m.image_size, m.image_size, m.channels)

        def classify_images(pixels):
            return task.predict(params, host.model_state, {"image": pixels})
        return Exportable(
            classify_images, {"pixels": _spec(("batch", *shape), "uint8")}, "probabilities",
            lambda rng: [(rng.integers(0, 256, (b, *shape)).astype(np.uint8),) for b in (1, 3)],
            {**meta, "labels": list(task.class_names), "image_shape": list(shape)},
            copies=[run_dir / "labels.json"])

    def classify_texts(input_ids, attention_mask, token_type_ids):
        batch = {"tokens": input_ids, "segment_ids": attention_mask,
                 "positions": _positions(input_ids), "type_ids": token_type_ids,
                 "weight": _ones(input_ids)}
        return task.predict(params, host.model_state, batch)
    output = "value" if task.labels.kind == "regression" else "probabilities"
    return _text(classify_texts, output, cfg.model, cfg.data.seq_len,
                 bool(cfg.data.text_pair_column), load_tokenizer(run_dir / "tokenizer.json"),
                 {**meta, "labels": list(task.labels.names), "max_length": cfg.data.seq_len},
                 copies=[run_dir / "labels.json"])


def _encoder(source: str) -> Exportable:
    """A text encoder (or decoder) as `ptft embed` runs it: pooled, L2-normalised."""
    encoder = load_encoder(source)
    model, params = Transformer(encoder.cfg), encoder.params
    length = min(256, encoder.cfg.max_len)  # ptft embed's default --seq-len

    def embed(input_ids, attention_mask, token_type_ids):
        hidden = model.apply({"params": params}, input_ids, attention_mask,
                             _positions(input_ids), token_type_ids)
        pooled = pool(hidden.astype(jnp.float32), attention_mask, encoder.pooling)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return _text(embed, "embeddings", encoder.cfg, length, False, encoder.tokenizer,
                 {"source": encoder.description, "task": "embed", "pooling": encoder.pooling,
                  "max_length": length, "lora_merged": encoder.lora_merged})


def _text(fn, output, model_cfg, length, pairs, tokenizer, meta, copies=()) -> Exportable:
    vocab = model_cfg.vocab_size

    def samples(rng):
        out = []
        for batch, width in ((1, min(length, 5)), (3, length), (8, max(2, length // 2))):
            lengths = rng.integers(1, width + 1, batch)
            lengths[0] = width  # one row fills the batch's length, as padding to the longest
            mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
            ids = np.where(mask, rng.integers(5, vocab, (batch, width)), 0).astype(np.int32)
            second = (np.arange(width)[None] >= lengths[:, None] // 2) & (mask == 1)
            out.append((ids, mask, (second & pairs).astype(np.int32)))
        return out
    specs = {name: _spec(("batch", "length"), "int32") for name in TEXT_INPUTS}
    return Exportable(fn, specs, output, samples, meta,
                      runtime_tokenizer(tokenizer, model_cfg.kind, length), list(copies))


def _spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _positions(input_ids):
    # A cumulative sum, not jnp.arange: an arange of a dynamic length does not trace in
    # jax2onnx. Padding's positions do not matter (it is masked).
    return jnp.cumsum(jnp.ones_like(input_ids), axis=1) - 1


def _ones(input_ids):
    return jnp.ones_like(input_ids[:, 0], dtype=jnp.float32)


def _convert(model: Exportable, path: Path) -> None:
    from jax2onnx import to_onnx
    import onnx
    # jax2onnx logs a traceback for each of its example plugins whose library (equinox) is
    # not installed, and onnx_ir a warning per shape-only value it does not serialise: noise
    # about things ptft's models do not use. Errors still show.
    quiet = [logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # jax2onnx's tracing asks JAX for float64 constants
            warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")
            to_onnx(model.fn, list(model.inputs.values()), input_names=list(model.inputs),
                    output_names=[model.output], return_mode="file", output_path=str(path))
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    # jax2onnx annotates some intermediate values of convolutions with channels-last shapes
    # that its channels-first ONNX ops contradict (onnxruntime warns on every load); the
    # annotations are optional, and onnxruntime infers the shapes itself without them.
    graph = onnx.load(str(path))
    del graph.graph.value_info[:]
    onnx.save(graph, str(path))


def _quantize_int8(ort, path: Path, model: Exportable) -> dict:
    """Replace the float32 model at `path` by its int8 form; what that cost, measured."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic
    float_path, folded = path.with_name("float32.onnx"), path.with_name("folded.onnx")
    path.rename(float_path)
    # onnxruntime's pre-processing folds the weights' reshapes into constants (the quantizer
    # only quantizes matmuls whose weight is a constant), then quantizes.
    quant_pre_process(str(float_path), str(folded))
    as_matmuls(folded)
    quantize_dynamic(str(folded), str(path), **INT8_SETTINGS, weight_type=QuantType.QInt8)
    float_bytes = float_path.stat().st_size
    float_path.unlink()
    folded.unlink()
    diff, _ = _check(ort, path, model)
    return {"quantized": "int8 (onnxruntime dynamic: int8 weights per output channel, 7-bit; "
                         "activations quantized per call)",
            "float32_bytes": float_bytes, "int8_bytes": path.stat().st_size,
            "int8_max_abs_diff_from_ptft": diff}


def as_matmuls(path: Path) -> None:
    """Rewrite each product with a constant weight as the MatMul that onnxruntime's dynamic
    quantizer quantizes (it skips Gemm and Einsum): a Gemm (jax2onnx's 2-D matmuls) as MatMul
    + Add of its bias; an Einsum that contracts x's trailing axes with the weight's leading ones
    (models/layers.py's projections, e.g. 'ab,bcd->acd') as Reshape, MatMul with the weight
    flattened to 2-D, Reshape."""
    import onnx
    from onnx import helper, numpy_helper
    model = onnx.load(str(path))
    graph = model.graph
    constants = {i.name: i for i in graph.initializer}
    nodes = []

    def constant(name: str, value: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Einsum" and node.input[1] in constants:
            rewritten = _einsum_as_matmul(node, attrs["equation"].decode(),
                                          numpy_helper.to_array(constants[node.input[1]]),
                                          constant, helper)
            nodes.extend(rewritten or [node])
            continue
        if node.op_type != "Gemm" or node.input[1] not in constants or attrs.get("transA", 0) \
                or attrs.get("alpha", 1.0) != 1.0:
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):  # store the weight as MatMul reads it
            weight = constant(f"{node.input[1]}_t",
                              numpy_helper.to_array(constants[node.input[1]]).T.copy())
        beta = attrs.get("beta", 1.0)
        has_bias = len(node.input) > 2 and node.input[2] and beta != 0.0
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product],
                                      name=f"{node.name}_matmul"))
        if has_bias:
            bias = node.input[2]
            if beta != 1.0:
                bias = constant(f"{node.input[2]}_beta",
                                beta * numpy_helper.to_array(constants[node.input[2]]))
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]],
                                          name=f"{node.name}_bias"))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))


def _einsum_as_matmul(node, equation: str, weight: np.ndarray, constant, helper):
    """The nodes computing `node` (x, weight -> y) as Reshape / MatMul / Reshape, or None
    where its equation is not 'rows + contracted, contracted + kept -> rows + kept'."""
    inputs, _, out = equation.replace(" ", "").partition("->")
    x, _, w = inputs.partition(",")
    k = len(x) - 1  # x: one row axis, then the contracted ones
    if k < 1 or w[:k] != x[1:] or out != x[0] + w[k:] or len(set(w)) != len(w):
        return None
    inner, kept = int(np.prod(weight.shape[:k])), list(weight.shape[k:])
    name = node.name or node.output[0]
    flat = constant(f"{name}_weight2d", weight.reshape(inner, -1).copy())
    rows_shape = constant(f"{name}_rows", np.array([-1, inner], np.int64))
    out_shape = constant(f"{name}_out", np.array([-1, *kept], np.int64))
    return [helper.make_node("Reshape", [node.input[0], rows_shape], [f"{name}_x2d"],
                             name=f"{name}_x2d"),
            helper.make_node("MatMul", [f"{name}_x2d", flat], [f"{name}_y2d"],
                             name=f"{name}_matmul"),
            helper.make_node("Reshape", [f"{name}_y2d", out_shape], [node.output[0]],
                             name=f"{name}_y")]


def _check(ort, path: Path, model: Exportable) -> tuple[float, list]:
    """The largest |onnxruntime - ptft| over the model's sample inputs."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if names != list(model.inputs):
        raise ValueError(f"the ONNX model's inputs are {names}, not {list(model.inputs)}")
    worst, shapes, ours_fn = 0.0, [], jax.jit(model.fn)
    for inputs in model.samples(np.random.default_rng(0)):
        ours = np.asarray(ours_fn(*inputs))
        theirs = session.run(None, dict(zip(names, inputs)))[0]
        worst = max(worst, float(np.max(np.abs(ours - theirs))))
        shapes.append(list(inputs[0].shape))
    return worst, shapes


def runtime_tokenizer(tokenizer, model_kind: str, max_length: int):
    """A copy of `tokenizer` set up to write ptft's rows (data/labelled.py) on its own."""
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
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
    tokenizer.enable_truncation(max_length, strategy="longest_first")
    pad = tokenizer.token_to_id("[PAD]") or 0
    tokenizer.enable_padding(pad_id=pad, pad_token=tokenizer.id_to_token(pad))
    return tokenizer


def describe(result: dict) -> str:
    shape = (f"pixels {result['image_shape']}" if "image_shape" in result else
             f"length up to {result['max_length']}")
    return (f"exported {result['source']} to {result['out_dir']}/model.onnx ({result['task']}, "
            f"output '{result['output']}', dynamic batch, {shape}"
            + ("; LoRA adapters merged" if result["lora_merged"] else "") +
            f"): onnxruntime matches ptft within {result['max_abs_diff_from_ptft']:.1e}"
            + (f"; int8: {result['float32_bytes'] / 1e6:.1f} -> {result['int8_bytes'] / 1e6:.1f}"
               f" MB, outputs within {result['int8_max_abs_diff_from_ptft']:.1e} of ptft's"
               if "quantized" in result else ""))
