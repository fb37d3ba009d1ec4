"""Shared test helpers: tiny configs and synthetic batches (no tokenizer needed)."""
import jax
import numpy as np

from ptft_jax.config import load_config
from ptft_jax.engine import build
from ptft_jax.jobs import lm_task
from ptft_jax.tasks.lm import MlmSpec

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
    return build(cfg, task or lm_task(cfg, spec_for(cfg), devices), devices)


def batches(cfg, n, seed=0):
    """n global batches of random token ids [global_batch, seq_len]."""
    rng = np.random.default_rng(seed)
    shape = (cfg.train.global_batch, cfg.data.seq_len)
    return [{"tokens": rng.integers(5, VOCAB, shape, dtype=np.int32)} for _ in range(n)]


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
