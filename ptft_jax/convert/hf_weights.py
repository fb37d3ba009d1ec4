"""Tensor names and layouts: Hugging Face BERT / GPT-2 / ViT <-> ptft parameter paths.

ptft keeps attention projections in their head-split shapes (query/key/value kernels
[d, heads, head_dim], the output kernel [heads, head_dim, d]) and dense kernels as [in, out].
PyTorch's `nn.Linear` (BERT) stores [out, in]; GPT-2's `Conv1D` stores [in, out] and fuses
query, key and value into one `c_attn` of [d, 3d]. Each mapping below is one small function
per direction, so that import and export are visibly each other's inverse; the unrolled
layout ('layers_0', ...) is the meeting point (scanned stacks convert through
`params.stack_layers` / `unstack_layers`).
"""
from __future__ import annotations

import re

import numpy as np

from ptft_jax.config.schema import ModelConfig
from ptft_jax.core.params import flatten
from ptft_jax.models.transformer import Transformer
from ptft_jax.models.vision import ViT

T = "transformer/"


def _heads(x, h):  # [..., h*k] -> [..., h, k]
    return x.reshape(*x.shape[:-1], h, x.shape[-1] // h)


# ---------------------------------------------------------------------------------------------
# BERT (BertModel / BertForMaskedLM / BertForSequenceClassification / BertForPreTraining)

def _bert_pairs(num_layers: int) -> list[tuple[str, str, str]]:
    """(HF name without the 'bert.' prefix, ptft path, layout) for the backbone."""
    pairs = [("embeddings.word_embeddings.weight", T + "token_embed/embedding", "copy"),
             ("embeddings.position_embeddings.weight", T + "position_embed/embedding", "copy"),
             ("embeddings.token_type_embeddings.weight", T + "type_embed/embedding", "copy"),
             ("embeddings.LayerNorm.weight", T + "embed_norm/scale", "copy"),
             ("embeddings.LayerNorm.bias", T + "embed_norm/bias", "copy")]
    for i in range(num_layers):
        hf, pt = f"encoder.layer.{i}.", f"{T}layers_{i}/"
        for name in ("query", "key", "value"):
            pairs += [(f"{hf}attention.self.{name}.weight", f"{pt}attn/{name}/kernel", "qkv"),
                      (f"{hf}attention.self.{name}.bias", f"{pt}attn/{name}/bias", "qkv_bias")]
        pairs += [(f"{hf}attention.output.dense.weight", f"{pt}attn/out/kernel", "attn_out"),
                  (f"{hf}attention.output.dense.bias", f"{pt}attn/out/bias", "copy"),
                  (f"{hf}attention.output.LayerNorm.weight", f"{pt}attn_norm/scale", "copy"),
                  (f"{hf}attention.output.LayerNorm.bias", f"{pt}attn_norm/bias", "copy"),
                  (f"{hf}intermediate.dense.weight", f"{pt}mlp/wi/kernel", "linear"),
                  (f"{hf}intermediate.dense.bias", f"{pt}mlp/wi/bias", "copy"),
                  (f"{hf}output.dense.weight", f"{pt}mlp/wo/kernel", "linear"),
                  (f"{hf}output.dense.bias", f"{pt}mlp/wo/bias", "copy"),
                  (f"{hf}output.LayerNorm.weight", f"{pt}mlp_norm/scale", "copy"),
                  (f"{hf}output.LayerNorm.bias", f"{pt}mlp_norm/bias", "copy")]
    return pairs


# Heads: present or not, depending on the architecture (full HF names).
BERT_HEADS = [("bert.pooler.dense.weight", "head/pooler/kernel", "linear"),
              ("bert.pooler.dense.bias", "head/pooler/bias", "copy"),
              ("classifier.weight", "head/out/kernel", "linear"),
              ("classifier.bias", "head/out/bias", "copy"),
              ("cls.predictions.transform.dense.weight", "mlm_head/transform/kernel", "linear"),
              ("cls.predictions.transform.dense.bias", "mlm_head/transform/bias", "copy"),
              ("cls.predictions.transform.LayerNorm.weight", "mlm_head/norm/scale", "copy"),
              ("cls.predictions.transform.LayerNorm.bias", "mlm_head/norm/bias", "copy"),
              ("cls.predictions.bias", "output_bias", "copy")]
# Read but not used: buffers, BERT's next-sentence head, tied copies (checked equal below).
BERT_IGNORED = re.compile(r"(^|\.)position_ids$|^cls\.seq_relationship\.|"
                          r"^cls\.predictions\.decoder\.(weight|bias)$")

# ---------------------------------------------------------------------------------------------
# GPT-2 (GPT2Model / GPT2LMHeadModel)


def _gpt2_pairs(num_layers: int) -> list[tuple[str, str, str]]:
    pairs = [("wte.weight", T + "token_embed/embedding", "copy"),
             ("wpe.weight", T + "position_embed/embedding", "copy"),
             ("ln_f.weight", T + "final_norm/scale", "copy"),
             ("ln_f.bias", T + "final_norm/bias", "copy")]
    for i in range(num_layers):
        hf, pt = f"h.{i}.", f"{T}layers_{i}/"
        pairs += [(f"{hf}ln_1.weight", f"{pt}attn_norm/scale", "copy"),
                  (f"{hf}ln_1.bias", f"{pt}attn_norm/bias", "copy"),
                  (f"{hf}attn.c_attn.weight", f"{pt}attn/{{query,key,value}}/kernel", "c_attn"),
                  (f"{hf}attn.c_attn.bias", f"{pt}attn/{{query,key,value}}/bias", "c_attn_bias"),
                  (f"{hf}attn.c_proj.weight", f"{pt}attn/out/kernel", "conv_out"),
                  (f"{hf}attn.c_proj.bias", f"{pt}attn/out/bias", "copy"),
                  (f"{hf}ln_2.weight", f"{pt}mlp_norm/scale", "copy"),
                  (f"{hf}ln_2.bias", f"{pt}mlp_norm/bias", "copy"),
                  (f"{hf}mlp.c_fc.weight", f"{pt}mlp/wi/kernel", "copy"),
                  (f"{hf}mlp.c_fc.bias", f"{pt}mlp/wi/bias", "copy"),
                  (f"{hf}mlp.c_proj.weight", f"{pt}mlp/wo/kernel", "copy"),
                  (f"{hf}mlp.c_proj.bias", f"{pt}mlp/wo/bias", "copy")]
    return pairs


def _gpt2_ignored(prefix: str) -> re.Pattern:
    """Read but not used: the causal-mask buffers of old exports, the tied LM head."""
    return re.compile(rf"^{re.escape(prefix)}h\.\d+\.attn\.(bias|masked_bias)$|^lm_head\.weight$")

# ---------------------------------------------------------------------------------------------
# ViT (ViTModel / ViTForImageClassification): a pre-norm encoder over patches, under image/

IMG = "image/"


def _vit_pairs(num_layers: int) -> list[tuple[str, str, str]]:
    pairs = [("embeddings.cls_token", IMG + "cls", "squeeze"),
             ("embeddings.position_embeddings", IMG + "pos_embed", "squeeze"),
             ("embeddings.patch_embeddings.projection.weight", IMG + "patch_embed/kernel",
              "conv"),
             ("embeddings.patch_embeddings.projection.bias", IMG + "patch_embed/bias", "copy"),
             ("layernorm.weight", IMG + "final_norm/scale", "copy"),
             ("layernorm.bias", IMG + "final_norm/bias", "copy")]
    for i in range(num_layers):
        hf, pt = f"encoder.layer.{i}.", f"{IMG}layers_{i}/"
        for name in ("query", "key", "value"):
            pairs += [(f"{hf}attention.attention.{name}.weight", f"{pt}attn/{name}/kernel",
                       "qkv"),
                      (f"{hf}attention.attention.{name}.bias", f"{pt}attn/{name}/bias",
                       "qkv_bias")]
        pairs += [(f"{hf}attention.output.dense.weight", f"{pt}attn/out/kernel", "attn_out"),
                  (f"{hf}attention.output.dense.bias", f"{pt}attn/out/bias", "copy"),
                  (f"{hf}layernorm_before.weight", f"{pt}attn_norm/scale", "copy"),
                  (f"{hf}layernorm_before.bias", f"{pt}attn_norm/bias", "copy"),
                  (f"{hf}intermediate.dense.weight", f"{pt}mlp/wi/kernel", "linear"),
                  (f"{hf}intermediate.dense.bias", f"{pt}mlp/wi/bias", "copy"),
                  (f"{hf}output.dense.weight", f"{pt}mlp/wo/kernel", "linear"),
                  (f"{hf}output.dense.bias", f"{pt}mlp/wo/bias", "copy"),
                  (f"{hf}layernorm_after.weight", f"{pt}mlp_norm/scale", "copy"),
                  (f"{hf}layernorm_after.bias", f"{pt}mlp_norm/bias", "copy")]
    return pairs


VIT_HEADS = [("classifier.weight", "head/kernel", "linear"),
             ("classifier.bias", "head/bias", "copy")]
# ViTModel's pooler (dense + tanh on the class token) has no counterpart: ptft's image
# classifier reads the normalised class token directly, as ViTForImageClassification does.
VIT_IGNORED = re.compile(r"(^|\.)pooler\.dense\.(weight|bias)$")

# ---------------------------------------------------------------------------------------------
# Layouts, both ways


def _to_ptft(layout: str, x: np.ndarray, heads: int):
    """HF array -> ptft array (or, for c_attn, the three query/key/value arrays)."""
    if layout == "copy":
        return x
    if layout == "linear":  # torch Linear [out, in] -> [in, out]
        return x.T
    if layout == "qkv":  # [h*k, d] -> [d, h, k]
        return _heads(x.T, heads)
    if layout == "qkv_bias":
        return _heads(x, heads)
    if layout == "attn_out":  # [d, h*k] -> [h, k, d]
        return x.T.reshape(heads, -1, x.shape[0])
    if layout == "conv_out":  # Conv1D [h*k, d] -> [h, k, d]
        return x.reshape(heads, -1, x.shape[1])
    if layout == "squeeze":  # ViT's [1, n, d] -> [n, d]
        return x.reshape(x.shape[-2], x.shape[-1])
    if layout == "conv":  # torch Conv2d [out, in, kh, kw] -> flax [kh, kw, in, out]
        return x.transpose(2, 3, 1, 0)
    if layout == "c_attn":  # [d, 3d] -> 3 x [d, h, k]
        return [_heads(part, heads) for part in np.split(x, 3, axis=1)]
    if layout == "c_attn_bias":
        return [_heads(part, heads) for part in np.split(x, 3)]
    raise AssertionError(layout)


def _to_hf(layout: str, x, heads: int) -> np.ndarray:
    """The inverse of `_to_ptft` (x is a list of three arrays for c_attn layouts)."""
    if layout == "copy":
        return x
    if layout == "linear":
        return x.T
    if layout == "qkv":
        return x.reshape(x.shape[0], -1).T
    if layout == "qkv_bias":
        return x.reshape(-1)
    if layout == "attn_out":
        return x.reshape(-1, x.shape[-1]).T
    if layout == "conv_out":
        return x.reshape(-1, x.shape[-1])
    if layout == "squeeze":
        return x[None]
    if layout == "conv":
        return x.transpose(3, 2, 0, 1)
    if layout == "c_attn":
        return np.concatenate([p.reshape(p.shape[0], -1) for p in x], axis=1)
    if layout == "c_attn_bias":
        return np.concatenate([p.reshape(-1) for p in x])
    raise AssertionError(layout)


def _head_name(hf: str, prefix: str) -> str:
    """BertModel's pooler has no 'bert.' prefix when the whole model is unprefixed."""
    return hf[len("bert."):] if not prefix and hf.startswith("bert.") else hf


def _expand(path: str) -> list[str]:
    return [path.replace("{query,key,value}", n) for n in ("query", "key", "value")] \
        if "{query,key,value}" in path else [path]


def _fix_old_names(name: str) -> str:
    """Early BERT checkpoints name LayerNorm parameters gamma / beta."""
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight",
                  re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


# transformers 5 saves ViTs under new names (layers.N.attention.q_proj, mlp.fc1, ...), while
# checkpoints on the Hub keep the 4.x names that ptft exports and transformers 5 still reads:
# both are imported, through the 4.x names.
_VIT_5X_NAMES = [(r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."),
                 (r"\.attention\.q_proj\.", ".attention.attention.query."),
                 (r"\.attention\.k_proj\.", ".attention.attention.key."),
                 (r"\.attention\.v_proj\.", ".attention.attention.value."),
                 (r"\.attention\.o_proj\.", ".attention.output.dense."),
                 (r"\.mlp\.fc1\.", ".intermediate.dense."),
                 (r"\.mlp\.fc2\.", ".output.dense.")]


def _vit_4x_name(name: str) -> str:
    for pattern, replacement in _VIT_5X_NAMES:
        name = re.sub(pattern, replacement, name)
    return name


def import_tensors(tensors: dict[str, np.ndarray], family: str, num_layers: int,
                   num_heads: int, where: str = "model.safetensors") -> tuple[dict, list[str]]:
    """HF tensors -> ({ptft path: array} in the unrolled layout, report lines). Raises
    ValueError naming missing backbone tensors, listing unexpected ones, or naming a tied
    copy that differs (an untied output layer ptft's models cannot hold)."""
    tensors = {_fix_old_names(k): v for k, v in tensors.items()}
    if family == "bert":
        # BertModel saves without a prefix; the task models put the backbone under 'bert.'.
        prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
        backbone = [(prefix + hf, pt, lay) for hf, pt, lay in _bert_pairs(num_layers)]
        heads = [(_head_name(hf, prefix), pt, lay) for hf, pt, lay in BERT_HEADS]
        ignored, tied = BERT_IGNORED, [("cls.predictions.decoder.weight",
                                        prefix + "embeddings.word_embeddings.weight")]
        type_embed = prefix + "embeddings.token_type_embeddings.weight"
    elif family == "vit":
        tensors = {_vit_4x_name(k): v for k, v in tensors.items()}
        prefix = "vit." if any(k.startswith("vit.") for k in tensors) else ""
        backbone = [(prefix + hf, pt, lay) for hf, pt, lay in _vit_pairs(num_layers)]
        heads, ignored, tied, type_embed = VIT_HEADS, VIT_IGNORED, [], None
    else:
        prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
        backbone = [(prefix + hf, pt, lay) for hf, pt, lay in _gpt2_pairs(num_layers)]
        heads = []
        ignored = _gpt2_ignored(prefix)
        tied = [("lm_head.weight", prefix + "wte.weight")]
        type_embed = None
    missing = [hf for hf, _, _ in backbone if hf not in tensors and hf != type_embed]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"{where} lacks {len(missing)} tensor(s) of a {num_layers}-layer "
                         f"{family} model: {shown}. Is config.json from the same model?")
    known = {hf for hf, _, _ in backbone + heads}
    unexpected = sorted(k for k in tensors if k not in known and not ignored.search(k))
    if unexpected:
        shown = ", ".join(unexpected[:12]) + (" ..." if len(unexpected) > 12 else "")
        raise ValueError(f"{where} holds {len(unexpected)} tensor(s) that a {family} model of "
                         f"config.json does not have: {shown}. (More layers than "
                         f"num_hidden_layers / n_layer, or another architecture?)")
    for copy, original in tied:
        if copy in tensors and not np.array_equal(tensors[copy], tensors[original]):
            raise ValueError(f"{where}: {copy} differs from {original}; ptft ties the output "
                             f"layer to the token embeddings and cannot hold an untied one.")
    out = {}
    for hf, pt, layout in backbone + heads:
        if hf not in tensors:
            continue
        check_weight(tensors[hf], hf, where)
        try:
            value = _to_ptft(layout, np.asarray(tensors[hf]), num_heads)
        except ValueError:  # a reshape that does not fit: the shape is wrong for the config
            raise ValueError(f"{where}: {hf} has shape {tuple(tensors[hf].shape)}, which does "
                             f"not fit config.json ({num_heads} heads).") from None
        for path, v in zip(_expand(pt), value if isinstance(value, list) else [value]):
            out[path] = v
    used_heads = sorted({pt.split("/")[0] for hf, pt, _ in heads if hf in tensors})
    skipped = sorted(k for k in tensors if k not in known)
    report = [f"{len(tensors)} tensor(s) read; backbone -> "
              f"{'image/' if family == 'vit' else 'transformer/'}"
              + (f"; heads -> {', '.join(used_heads)}" if used_heads else "")
              + (f"; not used: {', '.join(skipped)}" if skipped else "")]
    return out, report


def check_weight(value, name: str, where: str) -> None:
    """A weight ptft imports is floating point and finite: an integer tensor would load as
    whole numbers (near zeros once scaled), and a NaN would look like a diverged run."""
    value = np.asarray(value)
    if not np.issubdtype(value.dtype, np.floating):
        raise ValueError(f"{where}: {name} is stored as {value.dtype}, not floating point; a "
                         f"weight must be float32, float16 or bfloat16 (was the checkpoint "
                         f"quantized or written by another tool?).")
    if not np.all(np.isfinite(value)):
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        raise ValueError(f"{where}: {name} holds {bad} non-finite value(s) (NaN or inf); the "
                         f"checkpoint is damaged or was saved from a diverged run.")


def export_tensors(flat: dict[str, np.ndarray], family: str, num_layers: int,
                   with_type_embed: bool = True) -> dict[str, np.ndarray]:
    """{ptft path: array} (unrolled) -> HF tensors under the task model's naming: 'bert.' /
    'transformer.' prefixes when a head is present. Paths ptft has and HF does not are an
    an error naming them."""
    out = {}
    if family == "bert":
        prefix = "bert." if any(p.startswith(("head/out/", "mlm_head/")) for p in flat) else ""
        pairs = [(prefix + hf, pt, lay) for hf, pt, lay in _bert_pairs(num_layers)]
        pairs += [(_head_name(hf, prefix), pt, lay) for hf, pt, lay in BERT_HEADS]
    elif family == "vit":
        prefix = "vit." if "head/kernel" in flat else ""
        pairs = [(prefix + hf, pt, lay) for hf, pt, lay in _vit_pairs(num_layers)] + VIT_HEADS
    else:
        prefix = "transformer."
        pairs = [(prefix + hf, pt, lay) for hf, pt, lay in _gpt2_pairs(num_layers)]
    used = set()
    for hf, pt, layout in pairs:
        paths = _expand(pt)
        if not all(p in flat for p in paths):
            continue
        used.update(paths)
        values = [np.asarray(flat[p], np.float32) for p in paths]
        out[hf] = np.ascontiguousarray(_to_hf(layout, values if len(values) > 1 else values[0],
                                              num_heads_of(flat)))
    left = sorted(set(flat) - used)
    if left:
        raise ValueError(f"{len(left)} parameter(s) have no place in a Hugging Face {family} "
                         f"model: {', '.join(left[:6])}{' ...' if len(left) > 6 else ''}.")
    if family == "bert" and not with_type_embed:
        # HF's BERT always has token-type embeddings: one all-zero row adds nothing.
        d = out[prefix + "embeddings.word_embeddings.weight"].shape[1]
        out[prefix + "embeddings.token_type_embeddings.weight"] = np.zeros((1, d), np.float32)
    return out


def num_heads_of(flat: dict) -> int:
    """The head count, read off a query kernel [d, heads, k] (export needs no config)."""
    for path, value in flat.items():
        if path.endswith("attn/query/kernel"):
            return value.shape[1]
    raise ValueError("no attention query kernel in the parameters")


def check_backbone_shapes(flat: dict, keys: dict, where: str) -> None:
    """Every converted backbone tensor has the shape ptft's model of `keys` (config.json's
    model keys) gives it; a mismatch is named with both shapes."""
    import jax

    cfg = ModelConfig(**{k: v for k, v in keys.items() if k != "dropout"})
    if cfg.kind == "vit":
        images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.channels),
                                      np.float32)
        abstract = jax.eval_shape(lambda x: ViT(cfg).init(jax.random.key(0), x), images)
        root = IMG
    else:
        tokens = jax.ShapeDtypeStruct((1, 2), np.int32)
        abstract = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.key(0), t),
                                  tokens)
        root = T
    expected = {root + p: tuple(x.shape) for p, x in flatten(abstract["params"]).items()}
    expected = {p.replace("/value", "") if p.endswith("/value") else p: s
                for p, s in expected.items()}  # boxed leaves (logical axis names) end in /value
    wrong = [f"{p}: {tuple(flat[p].shape)} in the checkpoint, {s} for config.json"
             for p, s in expected.items() if p in flat and tuple(flat[p].shape) != s]
    if wrong:
        raise ValueError(f"{where}: {len(wrong)} tensor(s) do not fit config.json: "
                         + "; ".join(wrong[:4]) + (" ..." if len(wrong) > 4 else ""))
