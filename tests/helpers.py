"""Shared test helpers: tiny configs and synthetic batches (no tokenizer needed)."""
import jax
import numpy as np

from ptft_jax.config.load import load_config
from ptft_jax.data.packing import Packer
from ptft_jax.tasks.factory import make_task
from ptft_jax.tasks.lm import MlmSpec
from ptft_jax.train.engine import build

VOCAB = 256
SPECIAL_IDS = (0, 1, 2, 3, 4)  # as our WordPiece tokenizer lays them out; 4 = [MASK]


def tiny_config(kind="encoder", *overrides):
    preset = "bert-tiny" if kind == "encoder" else "gpt-tiny"
    return load_config(None, [f"model.preset={preset}", f"model.vocab_size={VOCAB}",
                              "model.max_len=32", "model.dropout=0.0", "model.num_heads=2",
                              "data.seq_len=16", "train.global_batch=8", "train.steps=10",
                              "optim.warmup_steps=2", "mesh.data=-1", *overrides])


def spec_for(cfg):
    if cfg.model.kind != "encoder":
        return None
    return MlmSpec(mask_id=4, special_ids=SPECIAL_IDS, random_low=5, random_high=VOCAB)


def engine_for(cfg, devices=None, task=None):
    """The engine of a tiny LM config (masked LM with synthetic special ids for encoders)."""
    return build(cfg, task or make_task(cfg, mlm=spec_for(cfg), devices=devices), devices)


def batches(cfg, n, seed=0, mode="pack"):
    """n global batches as training feeds them: random documents of random lengths, packed
    (several documents per row, segment ids and restarting positions) or padded."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, cfg.data.seq_len + 8, 400)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(5, VOCAB, int(offsets[-1]), dtype=np.int32)
    packer = Packer(tokens, offsets, cfg.data.seq_len, 2 if cfg.model.kind == "encoder" else None,
                    3, mode)
    B = cfg.train.global_batch
    return [packer.rows(np.arange(i * B, (i + 1) * B) % len(packer)) for i in range(n)]


def run_steps(engine, state, host_batches, key=None):
    """Runs one step per batch; returns (state, [metrics as floats]): the task's metrics from
    the step's sums, the gradient norm and the learning rate."""
    key = jax.random.key(1) if key is None else key
    history = []
    for b in host_batches:
        state, metrics = engine.step_fn(state, engine.to_device(b), key)
        metrics = jax.tree.map(np.asarray, jax.device_get(engine.host_state(metrics)))
        row = {k: v for k, v in engine.task.metrics(metrics["sums"]).items() if np.isscalar(v)}
        row.update(grad_norm=float(metrics["grad_norm"]),
                   learning_rate=float(metrics["learning_rate"]))
        history.append(row)
    return state, history


def host_params(engine, state):
    return jax.tree.map(np.asarray, jax.device_get(engine.host_state(state).params))


def mean_gradients(engine, state, host_batch, key=None):
    """(gradient of the step's mean loss, the task's sums) for one batch, computed by the
    step's own `accumulate` on the engine's mesh (jit engines only)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from ptft_jax.core import params as ptree
    from ptft_jax.core.mesh import LOGICAL_RULES
    from ptft_jax.train.step import accumulate
    key = jax.random.key(1) if key is None else key
    cfg = engine.cfg

    def grads(state, batch):
        train, frozen = ptree.split(state.params, engine.plan.trainable.__contains__)
        ids = jnp.arange(cfg.train.global_batch)
        with nn.logical_axis_rules(LOGICAL_RULES):
            g, sums, _ = accumulate(train, frozen, state.model_state, batch, ids,
                                    jax.random.fold_in(key, state.step), task=engine.task,
                                    lora=None, grad_accum=cfg.train.grad_accum)
        return jax.tree.map(lambda x: x / sums["count"], g), sums
    with jax.set_mesh(engine.step_fn.mesh):
        out = jax.jit(grads)(state, engine.to_device(host_batch))
    return jax.tree.map(np.asarray, jax.device_get(out))


# One device, and the 2 x 2 x 2 mesh of the 8 fake devices: (config overrides, devices).
ONE_DEVICE_AND_MESH = ((["mesh.data=1"], jax.devices()[:1]),
                       (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], None))


def assert_same_gradients(engine_a, engine_b, host_batch, rtol=1e-3, atol=1e-6,
                          loss_rtol=1e-5):
    """Both engines, from the same initial parameters, give the same loss sum and the same
    whole gradient tree for `host_batch` (a gradient wrong by a constant factor shows, where
    one Adam step would hide it). Returns engine_a's (gradients, sums)."""
    a, b = (mean_gradients(e, e.init(jax.random.key(0)), host_batch)
            for e in (engine_a, engine_b))
    np.testing.assert_allclose(a[1]["loss_sum"], b[1]["loss_sum"], rtol=loss_rtol)
    assert float(a[1]["count"]) == float(b[1]["count"]) > 0
    paths = jax.tree_util.tree_leaves_with_path(a[0])
    assert len(paths) == len(jax.tree.leaves(b[0]))
    for (path, x), y in zip(paths, jax.tree.leaves(b[0])):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))
    return a


def lora_classifier(tmp, seq_len: int = 24):
    """A classifier finetuned with LoRA from the small BERT fixture, mean pooling, on 30
    labelled texts (3 steps): the run the inference tests read (export, quantize, serve)."""
    from ptft_jax.jobs.entry import finetune
    from tests.test_hf_runs import FIXTURES, SHORT, _labelled
    finetune(load_config(None, [
        f"run_dir={tmp / 'run'}", f"finetune.init_from=hf:{FIXTURES / 'bert_cls'}",
        f"data.corpus={_labelled(tmp)}", "data.label_column=label",
        "train.task=classification", "train.steps=3", f"data.seq_len={seq_len}",
        "finetune.pooling=mean", "finetune.lora_rank=2", *SHORT]))
    return tmp / "run"


def resnet_run(tmp):
    """(a small ResNet finetuned 2 steps on 24 random 8x8 grey images (BatchNorm statistics in
    its model state), the images)."""
    from ptft_jax.jobs.entry import finetune
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 8, 8), dtype=np.uint8)
    np.savez(tmp / "images.npz", image=images, label=rng.integers(0, 3, 24).astype(np.uint8))
    finetune(load_config(None, [
        f"run_dir={tmp / 'resnet'}", f"data.corpus={tmp / 'images.npz'}", "data.resize=false",
        "model.preset=resnet18-small", "model.resnet_width=4", "model.image_size=8",
        "model.channels=1", "train.task=image_classification", "train.steps=2",
        "train.global_batch=8", "checkpoint.every=0", "train.progress=false",
        "optim.warmup_steps=0"]))
    return tmp / "resnet", images
