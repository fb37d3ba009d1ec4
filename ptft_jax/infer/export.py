"""`ptft export RUN_DIR --format hf OUT_DIR`: a ptft run as a Hugging Face model directory.

Writes `config.json`, `model.safetensors` and the tokenizer files (`tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json`), with LoRA adapters merged. What it
covers, and the `transformers` class that reads it:

- a pretrained encoder (MLM run)       -> BertForMaskedLM (AutoModel reads its backbone);
- a pretrained decoder (CLM run)       -> GPT2LMHeadModel;
- a finetuned encoder classifier with CLS pooling -> BertForSequenceClassification, with the
  label names in id2label.

What HF's classes cannot express is refused with the reason, before anything is written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ptft_jax.ckpt.pretrained import inference_params
from ptft_jax.config.load import load_run_config
from ptft_jax.config.reading import read_json
from ptft_jax.config.schema import FINETUNE_TASKS, ConfigError
from ptft_jax.config.resolve import pooling_for, task_for
from ptft_jax.convert.hf_weights import export_tensors
from ptft_jax.core.files import building_folder, check_new_folder
from ptft_jax.core.params import flatten, unstack_layers
from ptft_jax.data.tokenizer import BPE_SPECIALS, WORDPIECE_SPECIALS, load_tokenizer

# ptft's model.activation -> HF's name (hidden_act for BERT, activation_function for GPT-2).
_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_PROBLEM_TYPES = {"classification": "single_label_classification",
                  "multi_label": "multi_label_classification", "regression": "regression"}


def check_exportable(cfg, labels: dict | None) -> tuple[str, str]:
    """(family, architecture), or a ConfigError saying what HF's classes cannot hold."""
    m = cfg.model
    if m.kind not in ("encoder", "decoder"):
        raise ConfigError(f"This run's model is a {m.kind} (model.kind); --format hf exports "
                          f"text encoders (as BERT) and decoders (as GPT-2). Export it in "
                          f"ptft's own format instead (ptft export RUN OUT --format ptft).")
    if m.head_dim is not None and m.head_dim * m.num_heads != m.hidden_size:
        raise ConfigError(f"This model's attention heads were pruned ({m.num_heads} heads of "
                          f"{m.head_dim}, width {m.hidden_size}): Hugging Face's BERT and "
                          f"GPT-2 configs cannot say so. Export it as ONNX (--format onnx) or "
                          f"as a ptft run.")
    if m.kind == "encoder":
        if m.norm != "post":
            raise ConfigError("model.norm is 'pre': BERT is post-norm, so this encoder has no "
                              "Hugging Face equivalent to export to.")
        if labels is None:
            return "bert", "BertForMaskedLM"
        if pooling_for(cfg) != "cls":
            raise ConfigError(f"finetune.pooling is '{pooling_for(cfg)}': "
                              f"BertForSequenceClassification pools the [CLS] token through "
                              f"BERT's pooler, so only CLS-pooled classifiers export.")
        return "bert", "BertForSequenceClassification"
    if m.norm != "pre" or m.type_vocab_size:
        raise ConfigError("GPT-2 is pre-norm without token-type embeddings; this decoder "
                          "(model.norm / model.type_vocab_size) has no equivalent to export to.")
    if labels is not None:
        raise ConfigError("A decoder classifier has no Hugging Face equivalent to export to "
                          "(GPT2ForSequenceClassification's head has no bias); export the "
                          "pretraining run, or finetune an encoder.")
    return "gpt2", "GPT2LMHeadModel"


def hf_config(cfg, family: str, architecture: str, tokenizer, labels: dict | None) -> dict:
    m = cfg.model
    act = _ACTIVATIONS[m.activation]
    if family == "bert":
        eps = m.norm_eps if m.norm_eps is not None else 1e-12
        out = {"architectures": [architecture], "model_type": "bert",
               "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
               "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
               "intermediate_size": m.mlp_dim, "hidden_act": act,
               "hidden_dropout_prob": m.dropout,
               # ptft has no dropout on attention probabilities; 0 keeps the model the same.
               "attention_probs_dropout_prob": 0.0,
               "max_position_embeddings": m.max_len,
               "type_vocab_size": max(m.type_vocab_size, 1), "layer_norm_eps": eps,
               "position_embedding_type": "absolute", "initializer_range": 0.02,
               "pad_token_id": tokenizer.token_to_id("[PAD]") or 0}
    else:
        eps = m.norm_eps if m.norm_eps is not None else 1e-5
        eos = tokenizer.token_to_id("<|endoftext|>")
        out = {"architectures": [architecture], "model_type": "gpt2",
               "vocab_size": m.vocab_size, "n_embd": m.hidden_size, "n_layer": m.num_layers,
               "n_head": m.num_heads, "n_inner": m.mlp_dim, "n_positions": m.max_len,
               "activation_function": act, "layer_norm_epsilon": eps,
               "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": 0.0,
               "bos_token_id": eos, "eos_token_id": eos, "tie_word_embeddings": True,
               "initializer_range": 0.02}
    if labels is not None:
        names = list(labels["names"]) or ["value"]
        out["id2label"] = {str(i): n for i, n in enumerate(names)}
        out["label2id"] = {n: i for i, n in enumerate(names)}
        out["num_labels"] = len(names)
        out["problem_type"] = _PROBLEM_TYPES[labels["kind"]]
    out["torch_dtype"] = "float32"
    out["exported_by"] = "ptft_jax"
    return out


def _tokenizer_files(tokenizer, family: str, max_len: int, out: Path) -> None:
    """tokenizer.json with the special tokens a HF user expects added by the tokenizer itself
    (ptft adds them in its own data code), plus the configs AutoTokenizer reads."""
    from tokenizers import processors
    if family == "bert":
        specials = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"),
                            WORDPIECE_SPECIALS))
        tokenizer.post_processor = processors.BertProcessing(
            ("[SEP]", tokenizer.token_to_id("[SEP]")), ("[CLS]", tokenizer.token_to_id("[CLS]")))
    else:
        specials = {"bos_token": BPE_SPECIALS[0], "eos_token": BPE_SPECIALS[0],
                    "unk_token": BPE_SPECIALS[0]}
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
         **specials}, indent=1))


def export_hf(run_dir, out_dir) -> dict:
    """Writes the HF directory into a temporary sibling first and renames it into place, so an
    interrupted export leaves nothing half-written at `out_dir`."""
    from safetensors.numpy import save_file

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a ptft run directory (no config.yaml).")
    check_new_folder(out_dir, "OUT_DIR")
    cfg = load_run_config(run_dir)
    finetuned = task_for(cfg) in FINETUNE_TASKS
    labels = read_json(run_dir / "labels.json", "a run's labels.json") if finetuned else None
    family, architecture = check_exportable(cfg, labels)
    params, step_dir, merged = inference_params(run_dir, cfg,
                                                labels.get("names") if labels else None)
    flat = {p: np.asarray(v) for p, v in flatten(unstack_layers(params)).items()}
    tensors = export_tensors(flat, family, cfg.model.num_layers,
                             with_type_embed=cfg.model.type_vocab_size > 0)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    config = hf_config(cfg, family, architecture, tokenizer, labels)
    config["exported_from"] = str(step_dir)

    # A Hugging Face folder: nothing of ptft's own (no marker) is left in it.
    with building_folder(out_dir, "hf export", marked=False) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / "model.safetensors", 0o666 & ~umask)  # safetensors writes it 0600
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        _tokenizer_files(tokenizer, family, cfg.model.max_len, tmp)
    return {"out_dir": str(out_dir), "source": str(step_dir), "architecture": architecture,
            "tensors": len(tensors), "parameters": int(sum(t.size for t in tensors.values())),
            "lora_merged": merged}
