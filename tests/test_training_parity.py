"""Training parity with the PyTorch references, per model family: a masked-LM BERT
(`BertForMaskedLM`), a causal-LM GPT-2 (`GPT2LMHeadModel`), a finetuned text classifier
(`BertForSequenceClassification`), a ViT (`ViTForImageClassification`), a ResNet with
BatchNorm (transformers' `ResNetForImageClassification`) and the two-tower contrastive model
(transformers' `ViTModel` and `BertModel` towers under CLIP's loss). Each reference is built
at random, ptft starts from its weights (through ptft's HF import, or a direct copy where
ptft has none), both train 30 steps of AdamW on the same batches, and the loss curves must
agree step by step (torch_parity.py holds the shared harness).

Why not CLIPModel for the two towers: CLIP's towers are other architectures than ptft's (a
ViT with an extra LayerNorm before its blocks, a causal text Transformer pooled at its end
token, quick-GELU); ptft's two-tower model is a ViT and a BERT encoder, so its reference is
transformers' ViT and BERT with CLIP's symmetric loss (`image_text_contrastive_loss`).

Tolerance: float32 on both sides, dropout off; losses agree within RTOL relative at every
step. Measured on CPU: at most 2e-7 (BERT MLM) to 2.5e-6 (two towers) over the 30 steps;
a real difference is far larger (ptft's ResNet with "SAME" padding, where torch pads both
sides, was 5% off by step 3).
"""
import jax
import numpy as np
import pytest

from ptft_jax.config import hf
from ptft_jax.config.load import load_config
from ptft_jax.config.resolve import tower_model
from ptft_jax.convert.hf import flat_params
from ptft_jax.convert.hf_weights import import_tensors
from ptft_jax.core.params import flatten, match_rules, unflatten
from ptft_jax.data.labelled import LabelSpace
from ptft_jax.tasks.factory import make_task
from ptft_jax.tasks.classify import ClassifyTask
from ptft_jax.tasks.contrastive import ContrastiveTask
from ptft_jax.tasks.image import ImageClassifyTask
from ptft_jax.tasks.lm import MlmSpec, mask_positions
from ptft_jax.train.engine import build

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.clip.modeling_clip import image_text_contrastive_loss  # noqa: E402

from tests.torch_parity import (  # noqa: E402
    OVERRIDES,
    STEPS,
    assert_curves_agree,
    decay_flags,
    document_mask,
    packed_rows,
    ptft_losses,
    torch_losses,
)

RTOL = 1e-4
VOCAB, SEQ, BATCH = 96, 32, 8
TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=SEQ, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
VIT = dict(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
           num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
           attention_probs_dropout_prob=0.0)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the references' random initialisation


def _hf_config(model, tmp_path, family: str, prefix: str = "model", *overrides):
    """(ptft config for the saved HF model's shape, its {path: array} weights)."""
    directory = tmp_path / family
    model.save_pretrained(directory)
    opened = hf.open_model(f"hf:{directory}")
    keys = opened.model_keys()
    cfg = load_config(None, [f"{prefix}.{k}={v}" for k, v in keys.items()] + OVERRIDES + [
        f"data.seq_len={SEQ}", f"train.global_batch={BATCH}", *overrides])
    flat, _ = flat_params(opened)
    return cfg, flat


def _cycle(batches, steps=STEPS):
    return [batches[i % len(batches)] for i in range(steps)]


def _decayed(cfg, model, family):
    flags = decay_flags(cfg, {n: p.detach().numpy() for n, p in model.named_parameters()}, family)
    return lambda name: flags[name]


def test_bert_mlm_trains_like_bert_for_masked_lm(tmp_path):
    reference = transformers.BertForMaskedLM(transformers.BertConfig(**TEXT))
    cfg, flat = _hf_config(reference, tmp_path, "bert")
    spec = MlmSpec(mask_id=4, special_ids=(0, 1, 2, 3, 4), random_low=5, random_high=VOCAB)
    engine = build(cfg, make_task(cfg, mlm=spec), jax.devices()[:1])
    rng = np.random.default_rng(0)
    batches = _cycle([packed_rows(rng, BATCH, SEQ, VOCAB) for _ in range(4)])
    ours, _ = ptft_losses(engine, flat, batches)

    # The reference sees the masks ptft's step drew: per example from fold_in(step key, row).
    key, slots = jax.random.key(0), spec.num_slots(SEQ)

    def masked(step, batch):
        step_key = jax.random.fold_in(key, step)
        keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(np.arange(BATCH))
        inputs, positions, targets, weights = jax.vmap(
            lambda k, t, v: mask_positions(k, t, spec, slots, v))(
                keys, batch["tokens"], batch["segment_ids"] != 0)
        labels = np.full((BATCH, SEQ), -100, np.int64)
        for r in range(BATCH):
            chosen = np.asarray(weights[r]) > 0
            labels[r, np.asarray(positions[r])[chosen]] = np.asarray(targets[r])[chosen]
        return {"input_ids": torch.tensor(np.asarray(inputs), dtype=torch.long),
                "attention_mask": document_mask(batch["segment_ids"], causal=False),
                "position_ids": torch.as_tensor(batch["positions"], dtype=torch.long),
                "labels": torch.as_tensor(labels)}
    inputs = [masked(s, b) for s, b in enumerate(batches)]
    theirs = torch_losses(reference, lambda m, b: m(**b).loss, inputs,
                          _decayed(cfg, reference, "bert"))
    assert_curves_agree(ours, theirs, RTOL, min_drop=0.3)


def test_gpt2_clm_trains_like_gpt2_lm_head_model(tmp_path):
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=SEQ, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0))
    cfg, flat = _hf_config(reference, tmp_path, "gpt2", "model", "train.task=clm")
    engine = build(cfg, make_task(cfg), jax.devices()[:1])
    rng = np.random.default_rng(1)
    batches = _cycle([packed_rows(rng, BATCH, SEQ, VOCAB) for _ in range(4)])
    ours, _ = ptft_losses(engine, flat, batches)

    def inputs(batch):
        seg = torch.as_tensor(batch["segment_ids"])
        labels = torch.as_tensor(batch["tokens"], dtype=torch.long).clone()
        labels[:, 1:][seg[:, 1:] != seg[:, :-1]] = -100  # no target across documents
        return {"input_ids": torch.as_tensor(batch["tokens"], dtype=torch.long),
                "attention_mask": document_mask(batch["segment_ids"], causal=True),
                "position_ids": torch.as_tensor(batch["positions"], dtype=torch.long),
                "labels": labels}
    theirs = torch_losses(reference, lambda m, b: m(**b).loss, [inputs(b) for b in batches],
                          _decayed(cfg, reference, "gpt2"))
    assert_curves_agree(ours, theirs, RTOL, min_drop=0.3)


def _labelled_rows(rng, classes: int):
    """Padded one-sentence examples as ptft's finetuning feeds them: [CLS] text [SEP] pad.
    A class draws most of its words from its own part of the vocabulary, so it is learnable."""
    lengths = rng.integers(4, SEQ + 1, BATCH)
    valid = np.arange(SEQ)[None, :] < lengths[:, None]
    labels = rng.integers(0, classes, BATCH)
    part = (VOCAB - 5) // classes
    own = 5 + labels[:, None] * part + rng.integers(0, part, (BATCH, SEQ))
    words = np.where(rng.random((BATCH, SEQ)) < 0.7, own, rng.integers(5, VOCAB, (BATCH, SEQ)))
    tokens = np.where(valid, words, 0)
    tokens[:, 0] = 2
    tokens[np.arange(BATCH), lengths - 1] = 3
    return {"tokens": tokens.astype(np.int32), "segment_ids": valid.astype(np.int32),
            "positions": np.where(valid, np.arange(SEQ), 0).astype(np.int32),
            "type_ids": np.zeros((BATCH, SEQ), np.int32),
            "label": labels.astype(np.int32), "weight": np.ones(BATCH, np.float32)}


def test_finetuned_classifier_trains_like_bert_for_sequence_classification(tmp_path):
    reference = transformers.BertForSequenceClassification(
        transformers.BertConfig(**TEXT, num_labels=3))
    cfg, flat = _hf_config(reference, tmp_path, "bert", "model", "train.task=classification")
    task = ClassifyTask(cfg.model, LabelSpace("classification", ("a", "b", "c")), "cls")
    engine = build(cfg, task, jax.devices()[:1])
    rng = np.random.default_rng(2)
    batches = _cycle([_labelled_rows(rng, 3) for _ in range(3)])
    ours, _ = ptft_losses(engine, flat, batches)

    def loss(model, b):
        return model(input_ids=torch.as_tensor(b["tokens"], dtype=torch.long),
                     attention_mask=torch.as_tensor(b["segment_ids"]),
                     labels=torch.as_tensor(b["label"], dtype=torch.long)).loss
    theirs = torch_losses(reference, loss, batches, _decayed(cfg, reference, "bert"))
    assert_curves_agree(ours, theirs, RTOL, min_drop=0.15)


def _image_batches(rng, size: int, classes: int, n: int = 3):
    return _cycle([{"image": rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8),
                    "label": rng.integers(0, classes, BATCH).astype(np.int32),
                    "weight": np.ones(BATCH, np.float32)} for _ in range(n)])


def _pixels(batch):
    """ptft's on-device normalisation (augment.mean / std 0.5), as NCHW for PyTorch."""
    x = (batch["image"].astype(np.float32) / 255.0 - 0.5) / 0.5
    return torch.as_tensor(x.transpose(0, 3, 1, 2))


def _image_loss(model, batch):
    logits = model(pixel_values=_pixels(batch)).logits
    return torch.nn.functional.cross_entropy(logits, torch.as_tensor(batch["label"]).long())


def test_vit_trains_like_vit_for_image_classification(tmp_path):
    reference = transformers.ViTForImageClassification(
        transformers.ViTConfig(**VIT, num_labels=5))
    cfg, flat = _hf_config(reference, tmp_path, "vit", "model",
                           "train.task=image_classification")
    task = ImageClassifyTask(cfg.model, [str(i) for i in range(5)], cfg.augment)
    engine = build(cfg, task, jax.devices()[:1])
    batches = _image_batches(np.random.default_rng(3), 8, 5)
    ours, _ = ptft_losses(engine, flat, batches)
    theirs = torch_losses(reference, _image_loss, batches, _decayed(cfg, reference, "vit"))
    assert_curves_agree(ours, theirs, RTOL, min_drop=0.3)


# ResNet: transformers' ResNet (torchvision's layout: 7x7 stem, max pooling, basic blocks with
# a 1x1 projection shortcut), its weights copied into ptft's tree by hand (ptft has no HF
# ResNet import). BatchNorm trains on batch statistics, so the training losses compare the
# whole BN path; the running means must agree after training too.
RESNET = dict(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
              layer_type="basic", downsample_in_first_stage=False)


def _resnet_weights(reference) -> tuple[dict, dict]:
    """(ptft params {path: array}, ptft batch_stats) of a transformers ResNet."""
    sd = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    params, stats = {}, {}

    def conv_bn(hf: str, conv: str, bn: str):
        params[f"image/{conv}/kernel"] = sd[f"{hf}.convolution.weight"].transpose(2, 3, 1, 0)
        params[f"image/{bn}/scale"] = sd[f"{hf}.normalization.weight"]
        params[f"image/{bn}/bias"] = sd[f"{hf}.normalization.bias"]
        stats[f"image/{bn}/mean"] = sd[f"{hf}.normalization.running_mean"]
        stats[f"image/{bn}/var"] = sd[f"{hf}.normalization.running_var"]
    conv_bn("resnet.embedder.embedder", "stem_conv", "stem_bn")
    index = 0
    for stage, depth in enumerate(RESNET["depths"]):
        for i in range(depth):
            hf, pt = f"resnet.encoder.stages.{stage}.layers.{i}", f"layers_{index}"
            conv_bn(f"{hf}.layer.0", f"{pt}/conv1", f"{pt}/bn1")
            conv_bn(f"{hf}.layer.1", f"{pt}/conv2", f"{pt}/bn2")
            if f"{hf}.shortcut.convolution.weight" in sd:
                conv_bn(f"{hf}.shortcut", f"{pt}/proj", f"{pt}/proj_bn")
            index += 1
    params["head/kernel"] = sd["classifier.1.weight"].T
    params["head/bias"] = sd["classifier.1.bias"]
    return params, {"batch_stats": unflatten(stats)}


def test_resnet_with_batchnorm_trains_like_transformers_resnet(tmp_path):
    reference = transformers.ResNetForImageClassification(
        transformers.ResNetConfig(**RESNET, num_labels=5))
    cfg = load_config(None, OVERRIDES + [
        "model.kind=resnet", "model.resnet_stages=[1,1]", "model.resnet_width=8",
        "model.resnet_block=basic", "model.resnet_stem=imagenet", "model.image_size=16",
        "model.channels=3", "train.task=image_classification", f"train.global_batch={BATCH}"])
    task = ImageClassifyTask(cfg.model, [str(i) for i in range(5)], cfg.augment)
    engine = build(cfg, task, jax.devices()[:1])
    params, model_state = _resnet_weights(reference)
    batches = _image_batches(np.random.default_rng(4), 16, 5)
    ours, state = ptft_losses(engine, params, batches, model_state)
    # ptft's decay rules pick the kernels (conv and head), as ndim > 1 does here.
    decayed = {n: p.ndim > 1 for n, p in reference.named_parameters()}
    rules = flatten(match_rules(unflatten(params), cfg.optim.weight_decay_rules))
    assert {p for p, d in rules.items() if d} == {p for p in params if p.endswith("kernel")}
    theirs = torch_losses(reference, _image_loss, batches, lambda n: decayed[n])
    assert_curves_agree(ours, theirs, RTOL, min_drop=0.3)
    # BatchNorm's running statistics: flax's momentum 0.9 is torch's 0.1.
    ours_mean = flatten(jax.device_get(state.model_state["batch_stats"]))["image/stem_bn/mean"]
    theirs_mean = reference.state_dict()["resnet.embedder.embedder.normalization.running_mean"]
    np.testing.assert_allclose(ours_mean, theirs_mean.numpy(), rtol=1e-3, atol=1e-5)


class _TwoTowers(torch.nn.Module):
    """ptft's two-tower model in transformers' parts: a ViT and a BERT encoder, each pooled
    at its class token, linear projections, L2 normalisation, CLIP's learned temperature."""

    def __init__(self, dim: int, temperature: float):
        super().__init__()
        self.vit = transformers.ViTModel(transformers.ViTConfig(**VIT), add_pooling_layer=False)
        self.bert = transformers.BertModel(transformers.BertConfig(**TEXT),
                                           add_pooling_layer=False)
        self.image_proj = torch.nn.Linear(VIT["hidden_size"], dim)
        self.text_proj = torch.nn.Linear(TEXT["hidden_size"], dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(np.log(1 / temperature),
                                                            dtype=torch.float32))

    def forward(self, batch):
        normal = torch.nn.functional.normalize
        image = self.vit(pixel_values=_pixels(batch)).last_hidden_state[:, 0]
        text = self.bert(input_ids=torch.as_tensor(batch["tokens"], dtype=torch.long),
                         attention_mask=torch.as_tensor(batch["segment_ids"])
                         ).last_hidden_state[:, 0]
        image, text = normal(self.image_proj(image), dim=-1), normal(self.text_proj(text), dim=-1)
        logits_per_text = self.logit_scale.exp() * text @ image.T
        return image_text_contrastive_loss(logits_per_text)


def test_two_towers_train_like_transformers_towers_under_clip_loss():
    dim, temperature = 16, 0.07
    reference = _TwoTowers(dim, temperature)
    cfg = load_config(None, OVERRIDES + [
        "model.kind=two_tower", f"towers.image.projection_dim={dim}",
        f"towers.text.projection_dim={dim}", "towers.text.pooling=cls",
        f"objective.temperature={temperature}", f"data.seq_len={SEQ}",
        f"train.global_batch={BATCH}", "train.task=contrastive",
        *[f"towers.image.model.{k}={v}" for k, v in dict(
            kind="vit", image_size=8, patch_size=4, channels=3, hidden_size=32, num_layers=2,
            num_heads=2, mlp_dim=64, norm="pre", activation="gelu", norm_eps=1e-12,
            image_pooling="cls", type_vocab_size=0).items()],
        *[f"towers.text.model.{k}={v}" for k, v in dict(
            kind="encoder", vocab_size=VOCAB, max_len=SEQ, hidden_size=32, num_layers=2,
            num_heads=4, mlp_dim=64, norm="post", activation="gelu", norm_eps=1e-12,
            type_vocab_size=2).items()]])
    image_cfg, text_cfg = tower_model(cfg, "image"), tower_model(cfg, "text")
    task = ContrastiveTask(image_cfg, text_cfg, dim, "cls", cfg.objective, cfg.augment)
    engine = build(cfg, task, jax.devices()[:1])

    def tensors(module):
        return {n: p.detach().numpy() for n, p in module.state_dict().items()}
    image, _ = import_tensors(tensors(reference.vit), "vit", 2, 2)
    text, _ = import_tensors(tensors(reference.bert), "bert", 2, 4)
    flat = {**image, **{"text/" + k.split("/", 1)[1]: v for k, v in text.items()}}
    for name in ("image_proj", "text_proj"):
        layer = getattr(reference, name)
        flat[f"{name}/kernel"] = layer.weight.detach().numpy().T
        flat[f"{name}/bias"] = layer.bias.detach().numpy()
    flat["contrastive/scale"] = reference.logit_scale.detach().numpy()
    flat["contrastive/bias"] = np.float32(cfg.objective.siglip_bias)  # unused by CLIP's loss

    rng = np.random.default_rng(5)
    batches = []
    for _ in range(3):  # pairs whose text names the image's colour, so they can be aligned
        colours = rng.integers(0, 4, BATCH)
        rows = _labelled_rows(rng, 4)
        rows["tokens"][:, 1] = 5 + colours
        image = rng.integers(0, 60, (BATCH, 8, 8, 3))
        image[np.arange(BATCH), :, :, colours % 3] += 160 + 30 * (colours // 3)[:, None, None]
        image = image.astype(np.uint8)
        batches.append({"image": image, "tokens": rows["tokens"],
                        "segment_ids": rows["segment_ids"], "positions": rows["positions"],
                        "type_ids": rows["type_ids"], "weight": rows["weight"]})
    batches = _cycle(batches)
    ours, _ = ptft_losses(engine, flat, batches)

    flags = {**{"vit." + n: d for n, d in decay_flags(
        cfg, tensors(reference.vit), "vit", image_cfg).items()},
        **{"bert." + n: d for n, d in decay_flags(
            cfg, tensors(reference.bert), "bert", text_cfg).items()},
        "image_proj.weight": True, "text_proj.weight": True, "image_proj.bias": False,
        "text_proj.bias": False, "logit_scale": False}
    theirs = torch_losses(reference, lambda m, b: m(b), batches, lambda n: flags[n])
    assert_curves_agree(ours, theirs, RTOL, min_drop=0.3)
