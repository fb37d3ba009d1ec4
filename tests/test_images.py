"""Image components: sources and the image cache, on-device augmentation, ViT and ResNet
layouts (scan == unrolled, sharded == one device == pmap with BatchNorm), and one
pretrain -> finetune run through the CLI on IDX files."""
import dataclasses
import gzip
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ptft_jax.config.load import load_config
from ptft_jax.config.schema import ConfigError
from ptft_jax.config.validate import validate
from ptft_jax.data.augment import augment
from ptft_jax.data.cache import CorruptCache, StaleCache
from ptft_jax.data.image_sources import open_images
from ptft_jax.data.images import ImageCache, prepare_image_cache
from ptft_jax.models.vision import ImageClassifier
from ptft_jax.tasks.image import ImageClassifyTask
from ptft_jax.train.engine import build
from tests.helpers import (ONE_DEVICE_AND_MESH, assert_same_gradients, host_params, mean_gradients,
                           run_steps)


def _write_idx(path, array):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def _images(n=12, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), \
        rng.integers(0, 3, n).astype(np.uint8)


@pytest.fixture
def idx_dir(tmp_path):
    images, labels = _images()
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    return tmp_path


def test_sources_agree_and_bad_images_are_named(idx_dir, tmp_path):
    from PIL import Image
    images, labels = _images()
    np.savez(tmp_path / "a.npz", image=images, label=labels)
    folder = tmp_path / "folder"
    for i, (im, y) in enumerate(zip(images, labels)):
        (folder / f"class{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im, "L").save(folder / f"class{y}" / f"{i:03d}.png")
    idx = prepare_image_cache(open_images(f"idx:{idx_dir}", "train"), tmp_path / "c1", 8, 1,
                              progress=False)
    npz = prepare_image_cache(open_images(str(tmp_path / "a.npz"), "train"), tmp_path / "c2", 8,
                              1, progress=False)
    np.testing.assert_array_equal(idx.images, images[..., None])
    np.testing.assert_array_equal(npz.images, idx.images)
    assert idx.labels == labels.tolist()
    # The folder lists files by class, then name: the same images in that order.
    fold = prepare_image_cache(open_images(str(folder), "train"), tmp_path / "c3", 8, 1,
                               progress=False)
    order = np.lexsort((np.arange(12), labels))
    np.testing.assert_array_equal(fold.images, images[order][..., None])
    assert fold.labels == [f"class{y}" for y in labels[order]]
    # Grayscale to RGB and a new size: converted once, in the cache, by two spawned workers
    # decoding three shards.
    rgb = prepare_image_cache(open_images(str(folder), "train"), tmp_path / "c4", 16, 3,
                              num_workers=2, shard_images=5, progress=False)
    assert len(rgb.meta["crc32"]) == 3
    assert rgb.images.shape == (12, 16, 16, 3)
    assert np.all(rgb.images[..., 0] == rgb.images[..., 2])

    (folder / "class0" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"1 image\(s\).*broken.png.*skip_bad_images"):
        prepare_image_cache(open_images(str(folder), "train"), tmp_path / "c5", 8, 1,
                            progress=False)
    skipped = prepare_image_cache(open_images(str(folder), "train"), tmp_path / "c6", 8, 1,
                                  skip_bad=True, progress=False)
    assert len(skipped) == 12 and skipped.meta["skipped"] == 1
    rgb_npz = tmp_path / "rgb.npz"
    np.savez(rgb_npz, image=np.repeat(images[..., None], 3, -1), label=labels)
    with pytest.raises(ValueError, match=r"3 channel\(s\).*model.channels=1.*channels=3"):
        prepare_image_cache(open_images(str(rgb_npz), "train"), tmp_path / "c8", 8, 1,
                            progress=False)
    with pytest.raises(ValueError, match=r"is 8x8 pixels, not model.image_size=16.*resize"):
        prepare_image_cache(open_images(str(tmp_path / "a.npz"), "train"), tmp_path / "c7", 16,
                            1, resize=False, progress=False)


def test_tfds_image_source_reads_array_records_without_tensorflow(tmp_path, monkeypatch):
    import sys

    import tensorflow_datasets as tfds
    images, labels = _images(6)

    class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            # A raw uint8 tensor: tfds encodes and decodes its Image feature with TensorFlow.
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                yield i, {"image": images[i][..., None], "label": int(labels[i])}
    tfds.disable_progress_bar()
    TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    source = open_images("tfds:tiny_images", "train")
    cache = prepare_image_cache(source, tmp_path / "cache", 8, 1, progress=False)
    # tfds orders records by key hash: compare (image, label) pairs as sets.
    got = {(a.tobytes(), int(y)) for a, y in zip(cache.images, cache.labels)}
    assert got == {(a[..., None].tobytes(), int(y)) for a, y in zip(images, labels)}
    assert "tensorflow" not in sys.modules
    with pytest.raises(ValueError, match="no column 'pixels' \\(data.image_column\\)"):
        open_images("tfds:tiny_images", "train", image_column="pixels")


def test_image_cache_resumes_and_detects_stale_and_corrupt(idx_dir, tmp_path):
    source = open_images(f"idx:{idx_dir}", "train")
    cache_dir = tmp_path / "cache"
    cache = prepare_image_cache(source, cache_dir, 8, 1, shard_images=5, progress=False)
    reference = np.array(cache.images)
    # Interrupted after two of three shards: a rerun decodes only the third.
    (cache_dir / "meta.json").unlink()
    partial = cache_dir / "partial"
    partial.mkdir()
    (partial / "plan.json").write_text(json.dumps(
        {**{k: cache.meta[k] for k in ("version", "source", "fingerprint", "size", "channels",
                                       "resize", "skip_bad", "num_source", "shard_images")}}))
    from ptft_jax.data.images import _ShardWork
    work = _ShardWork(source, partial, 8, 1, True, 5, len(source))
    work(0)
    work(1)
    first = (partial / "shard-000000.npz").stat().st_mtime_ns
    calls = []
    original = type(source).read

    def counting_read(self, start, stop):
        calls.append(start)
        return original(self, start, stop)
    type(source).read = counting_read
    try:
        again = prepare_image_cache(source, cache_dir, 8, 1, shard_images=5, progress=False)
    finally:
        type(source).read = original
    assert calls == [10]
    np.testing.assert_array_equal(again.images, reference)
    assert not partial.exists() and first > 0
    with pytest.raises(StaleCache, match="stale"):
        prepare_image_cache(source, cache_dir, 16, 1, shard_images=5, progress=False)
    data = bytearray((cache_dir / "images.bin").read_bytes())
    data[100] ^= 0xFF
    (cache_dir / "images.bin").write_bytes(bytes(data))
    with pytest.raises(CorruptCache, match="checksum"):
        ImageCache.open(cache_dir)
    (cache_dir / "images.bin").write_bytes(bytes(data[:-1]))
    with pytest.raises(CorruptCache, match="truncated"):
        ImageCache.open(cache_dir)


def _aug_config(**kw):
    return load_config(None, ["model.preset=vit-mini4", "model.image_size=16",
                              *[f"augment.{k}={v}" for k, v in kw.items()]])


def test_augmentation_is_the_same_on_one_and_eight_devices():
    cfg = _aug_config(random_resized_crop=True, flip=True, mixup=0.4, cutmix=1.0,
                      **{"crop_scale": "[0.3,1.0]"})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, 16)
    targets = jax.nn.one_hot(labels, 5)
    ids = jnp.arange(16)
    run = jax.jit(lambda x, t, i: augment(x, t, jax.random.key(3), i, cfg.augment))
    one = run(images, targets, ids)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = NamedSharding(mesh, P("data"))
    eight = run(jax.device_put(images, shard), jax.device_put(targets, shard),
                jax.device_put(ids, shard))
    for a, b in zip(one, eight):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    x, t = map(np.asarray, one)
    again = run(images, targets, ids)
    assert np.array_equal(np.asarray(again[0]), x)  # the same key, the same images
    other = np.asarray(jax.jit(lambda: augment(images, targets, jax.random.key(4), ids,
                                               cfg.augment))()[0])
    assert not np.allclose(other, x)
    assert x.shape == images.shape and x.dtype == np.float32
    assert x.min() >= -1 - 1e-5 and x.max() <= 1 + 1e-5  # (0 - 0.5) / 0.5 .. (1 - 0.5) / 0.5
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
    assert not np.allclose(x, (images / 255.0 - 0.5) / 0.5)  # something happened
    # Each row mixes only with its pair partner's label.
    partner = labels.reshape(8, 2)[:, ::-1].reshape(16)
    for row in range(16):
        assert set(np.flatnonzero(t[row] > 1e-6)) <= {labels[row], partner[row]}


def test_cutmix_target_share_is_the_pasted_pixels():
    cfg = _aug_config(cutmix=1.0)
    images = np.zeros((8, 16, 16, 1), np.uint8)
    images[1::2] = 255  # partners: black (even rows) and white (odd rows)
    cfg = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, mean=[0.0],
                                                               std=[1.0]))
    targets = jax.nn.one_hot(np.array([0, 1] * 4), 2)
    x, t = jax.jit(lambda: augment(images, targets, jax.random.key(0), jnp.arange(8),
                                   cfg.augment))()
    own = np.where(np.arange(8)[:, None, None, None] % 2 == 0, 1 - np.asarray(x),
                   np.asarray(x))
    share = own.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(t)[np.arange(8), np.arange(8) % 2], share, atol=1e-6)
    assert (share < 1).any()


def test_vit_scanned_equals_unrolled():
    cfg = load_config(None, ["model.preset=vit-mini4", "model.image_size=16",
                             "model.num_layers=2", "model.hidden_size=32", "model.num_heads=2",
                             "model.mlp_dim=64"]).model
    images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)
    unrolled = ImageClassifier(cfg, 3)
    scanned = ImageClassifier(dataclasses.replace(cfg, scan_layers=True), 3)
    params = nn.unbox(unrolled.init(jax.random.key(0), images)["params"])
    image = dict(params["image"])
    stack = [image.pop(f"layers_{i}") for i in range(2)]
    image["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *stack)
    stacked = {**params, "image": image}

    def loss(model, p):
        return jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, images))[:, 1])
    l_u, g_u = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p)))(params)
    l_s, g_s = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(stacked)
    np.testing.assert_allclose(l_u, l_s, rtol=1e-5)
    np.testing.assert_allclose(g_u["image"]["layers_1"]["mlp"]["wi"]["kernel"],
                               g_s["image"]["layers"]["mlp"]["wi"]["kernel"][1], rtol=1e-4,
                               atol=1e-6)


def _resnet(*overrides):
    return load_config(None, ["model.preset=resnet18-small", "model.image_size=8",
                              "model.resnet_width=8", "model.resnet_stages=[1,1]",
                              "model.channels=1", "train.global_batch=16", "train.steps=10",
                              "optim.warmup_steps=1", "augment.flip=true", *overrides])


def _image_batches(cfg, n):
    rng = np.random.default_rng(1)
    s = cfg.model.image_size
    return [{"image": rng.integers(0, 256, (16, s, s, 1), dtype=np.uint8),
             "label": rng.integers(0, 3, 16).astype(np.int32),
             "weight": np.ones(16, np.float32)} for _ in range(n)]


def _resnet_engine(cfg, devices=None):
    bn_axis = "batch" if cfg.mesh.parallelism == "pmap" else None
    task = ImageClassifyTask(cfg.model, ["a", "b", "c"], cfg.augment, 0.1, bn_axis)
    return build(cfg, task, devices)


def test_resnet_batchnorm_is_global_on_a_mesh_and_under_pmap():
    runs = {}
    for name, cfg, devices in (("one", _resnet("mesh.data=1"), jax.devices()[:1]),
                               ("mesh", _resnet("mesh.data=4", "mesh.fsdp=2"), None),
                               ("pmap", _resnet("mesh.parallelism=pmap"), None)):
        validate(cfg, len(devices or jax.devices()))
        engine = _resnet_engine(cfg, devices)
        state = engine.init(jax.random.key(0))
        if name != "pmap":
            runs[name + "_grads"] = mean_gradients(engine, state, _image_batches(cfg, 1)[0])
        state, history = run_steps(engine, state, _image_batches(cfg, 2))
        host = engine.host_state(state)
        runs[name] = (history, host_params(engine, state),
                      jax.tree.map(np.asarray, jax.device_get(host.model_state)))
    (g1, s1), (g8, s8) = runs["one_grads"], runs["mesh_grads"]
    np.testing.assert_allclose(s1["loss_sum"], s8["loss_sum"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
    stats = runs["one"][2]["batch_stats"]["image"]["stem_bn"]["mean"]
    assert np.abs(stats).max() > 0  # the running statistics moved
    for name in ("mesh", "pmap"):  # losses, parameters and BatchNorm statistics
        for a, b in zip(runs["one"][0], runs[name][0]):
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
        for a, b in zip(jax.tree.leaves(runs["one"][1:]), jax.tree.leaves(runs[name][1:])):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_bad_image_configs_are_refused():
    cases = [
        (["model.preset=vit-ti16", "model.image_size=100"], "multiple of model.patch_size"),
        (["model.preset=resnet18", "model.scan_layers=true"], "scan_layers"),
        (["model.preset=resnet18", "augment.crop_scale=[0.9,0.2]"], "augment.crop_scale"),
        (["model.preset=vit-ti16", "augment.mixup=0.2", "train.global_batch=8", "mesh.data=8"],
         "must be even"),
        (["model.preset=vit-ti16", "train.task=mlm"], "does not fit model.kind"),
        (["model.preset=vit-ti16", "augment.std=[0.5,0.5]"], "augment.std"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate(load_config(None, overrides), 8)


def test_pretrain_then_finetune_on_other_classes(idx_dir, tmp_path):
    """The CLI end to end: pretrain a ViT on classes 0-1, finetune a linear probe on the
    same images' classes 1-2 at another image size (positions interpolated, head fresh)."""
    from ptft_jax.cli import main
    common = [f"data.corpus=idx:{idx_dir}", "model.preset=vit-mini4", "model.num_layers=1",
              "model.image_size=8", "model.channels=1", "train.global_batch=16",
              "train.progress=false", "eval.batch_size=8", "checkpoint.every=0",
              f"data.cache_dir={tmp_path / 'cache'}"]
    pre = tmp_path / "pre"
    assert main(["pretrain", *common, f"run_dir={pre}", "train.steps=3",
                 "data.keep_labels=[0,1]", "augment.flip=true", "augment.mixup=0.2"]) == 0
    assert json.loads((pre / "labels.json").read_text())["names"] == ["0", "1"]
    ft = tmp_path / "ft"
    assert main(["finetune", *common, f"run_dir={ft}", "train.steps=2", "model.image_size=16",
                 "data.keep_labels=[1,2]", f"finetune.init_from={pre}",
                 "finetune.linear_probe=true", "data.eval_split=train"]) == 0
    log = (ft / "metrics.jsonl").read_text()
    assert "eval/accuracy" in log
    assert main(["eval", str(ft)]) == 0
    # ptft predict on image files of another size (resized like the cache).
    from PIL import Image
    images, _ = _images(3)
    folder = tmp_path / "to_predict"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im, "L").save(folder / f"{i}.png")
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", str(ft), "--input", str(folder), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in rows] == [str(folder / f"{i}.png") for i in range(3)]
    for r in rows:
        assert r["label"] in ("1", "2")
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-4


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "hf"


@pytest.mark.parametrize("name", ["vit_cls", "vit_model"])
def test_hf_vit_imports_with_parity(name):
    """ViTForImageClassification / ViTModel from safetensors: the same logits (or normalised
    class token) as transformers computed, within 1e-4."""
    from ptft_jax.config.hf import open_model
    from ptft_jax.convert.hf import flat_params
    from ptft_jax.core.params import unflatten
    from ptft_jax.models.vision import ViT
    source = open_model(f"hf:{FIXTURES / name}")
    cfg = load_config(None, [f"finetune.init_from=hf:{FIXTURES / name}"]).model
    assert cfg.kind == "vit" and cfg.activation == ("gelu" if name == "vit_cls" else "gelu_tanh")
    flat, report = flat_params(source)
    expected = np.load(FIXTURES / name / "expected.npz")
    pixels = expected["pixels_nhwc"]
    if name == "vit_cls":
        logits = ImageClassifier(cfg, 3).apply({"params": unflatten(flat)}, pixels)
        np.testing.assert_allclose(logits, expected["logits"], atol=1e-4, rtol=1e-4)
    else:
        assert "pooler" in report[0]  # read, reported, not used
        out = ViT(cfg).apply({"params": unflatten(flat)["image"]}, pixels)
        np.testing.assert_allclose(out, expected["hidden"][:, 0], atol=1e-4, rtol=1e-4)


def test_position_interpolation_keeps_the_grid_and_the_class_token():
    from ptft_jax.models.vision import interpolate_positions
    g = 4
    ys, xs = np.meshgrid(np.arange(g) + 0.5, np.arange(g) + 0.5, indexing="ij")
    linear = (ys + 2 * xs).reshape(g * g, 1) * np.ones((1, 3))  # f(y, x) = y + 2x per dim
    table = np.concatenate([np.full((1, 3), 7.0), linear]).astype(np.float32)
    same = np.asarray(interpolate_positions(table, g, g, True))
    np.testing.assert_allclose(same, table, atol=1e-6)
    fine = np.asarray(interpolate_positions(table, g, 2 * g, True))
    assert fine.shape == (1 + 4 * g * g, 3) and np.all(fine[0] == 7.0)
    # A linear function of position stays that function on the finer grid (away from the
    # border, where bilinear resizing clamps).
    grid = fine[1:, 0].reshape(2 * g, 2 * g)
    yy, xx = np.meshgrid((np.arange(2 * g) + 0.5) / 2, (np.arange(2 * g) + 0.5) / 2,
                         indexing="ij")
    inner = slice(1, 2 * g - 1)
    np.testing.assert_allclose(grid[inner, inner], (yy + 2 * xx)[inner, inner], atol=1e-5)


def test_resnet_eval_uses_running_statistics():
    cfg = _resnet().model
    model = ImageClassifier(cfg, 3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 8, 8, 1)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    params, stats = nn.unbox(variables["params"]), variables["batch_stats"]
    # One training pass moves the statistics; eval then reads them, row by row.
    _, updates = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                             mutable=["batch_stats"])
    stats = updates["batch_stats"]
    whole = model.apply({"params": params, "batch_stats": stats}, x)
    alone = model.apply({"params": params, "batch_stats": stats}, x[:1])
    np.testing.assert_allclose(whole[:1], alone, rtol=1e-5, atol=1e-6)
    train_whole, _ = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                 mutable=["batch_stats"])
    train_alone, _ = model.apply({"params": params, "batch_stats": stats}, x[:2], train=True,
                                 mutable=["batch_stats"])
    assert not np.allclose(train_whole[:1], train_alone[:1], atol=1e-4)  # batch statistics


def test_vit_sharded_gradients_equal_one_device():
    overrides = ["model.preset=vit-mini4", "model.image_size=8", "model.num_layers=2",
                 "model.hidden_size=32", "model.num_heads=2", "model.mlp_dim=64",
                 "model.channels=1", "train.global_batch=16", "augment.flip=true",
                 "augment.mixup=0.5"]
    engines = []
    for mesh, devices in ONE_DEVICE_AND_MESH:
        cfg = load_config(None, [*overrides, *mesh])
        task = ImageClassifyTask(cfg.model, ["a", "b", "c"], cfg.augment, 0.1)
        engines.append(build(cfg, task, devices))
    assert_same_gradients(*engines, _image_batches(cfg, 1)[0])


def test_image_run_resumes_exactly(idx_dir, tmp_path):
    """A ResNet run resumed from its step-2 checkpoint ends bit-identical to the run that
    went on: parameters, optimizer state and BatchNorm statistics, augmentation on."""
    from ptft_jax.ckpt.checkpoint import committed_steps
    from ptft_jax.ckpt.integrity import check_step
    from ptft_jax.jobs.entry import pretrain
    common = [f"data.corpus=idx:{idx_dir}", "model.preset=resnet18-small",
              "model.resnet_width=8", "model.resnet_stages=[1,1]", "model.image_size=8",
              "model.channels=1", "train.global_batch=8", "train.progress=false",
              "checkpoint.every=2", "checkpoint.async_save=false", "augment.flip=true",
              "augment.random_resized_crop=true", "mesh.data=2", "mesh.fsdp=4",
              f"data.cache_dir={tmp_path / 'cache'}"]
    import shutil
    cfg = load_config(None, [*common, f"run_dir={tmp_path / 'run'}", "train.steps=4"])
    pretrain(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    _, a = check_step(ckpts / "4")
    shutil.rmtree(ckpts / "4")  # as if the run had been stopped after its step-2 save
    summary = pretrain(cfg)
    assert summary["start_step"] == 2 and committed_steps(ckpts)[-1] == 4
    _, b = check_step(ckpts / "4")
    for item in ("params", "opt_state", "model_state"):
        for x, y in zip(jax.tree.leaves(a[item]), jax.tree.leaves(b[item])):
            assert np.array_equal(x, y), item


@pytest.mark.parametrize("stride", [1, 2])
def test_a_1x1_convolution_as_a_dot_computes_what_nn_conv_does(stride):
    """PointwiseConv (a ResNet's 1x1 convs, as a matmul for XLA's CPU backend) has nn.Conv's
    parameter and init, and the same outputs and gradients, strided or not."""
    import flax.linen as nn

    from ptft_jax.models.vision import PointwiseConv
    init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    ours = PointwiseConv(6, stride, jnp.float32, jnp.float32, init)
    theirs = nn.Conv(6, (1, 1), strides=(stride, stride), padding=((0, 0), (0, 0)),
                     use_bias=False, kernel_init=init)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, 7, 5)), jnp.float32)
    params = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == \
        jax.tree.map(jnp.shape, theirs.init(jax.random.key(0), x))

    def loss(module, p, x):
        return jnp.sum(jnp.tanh(module.apply(p, x)))
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), atol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.grad(loss, argnums=(1, 2))(ours, params, x)),
                    jax.tree.leaves(jax.grad(loss, argnums=(1, 2))(theirs, params, x))):
        np.testing.assert_allclose(a, b, atol=1e-5)
