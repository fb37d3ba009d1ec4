"""Training parity with PyTorch, step for step: ptft and a PyTorch reference start from the same
weights, see the same batches and run the same optimizer; their loss curves are compared.

The optimizer on both sides is AdamW with the same LR schedule (linear warmup from 0, then
cosine to `end_lr_ratio` x the peak), global-norm clipping and weight decay on the same tensors:
ptft's `optim.weight_decay_rules` decide, and are carried over to the reference's tensors by
the HF conversion's own name mapping (`decay_flags`). ptft trains through its real engine
(`engine.build`, the jitted `train_step`); the reference is plain PyTorch. Dropout is off and
both compute in float32.
"""
from __future__ import annotations

import math

import jax
import numpy as np
import torch

from ptft_jax.convert.hf_weights import import_tensors
from ptft_jax.core import params as ptree
from ptft_jax.core.params import match_rules, unflatten
from ptft_jax.core.state import init_opt_state

STEPS = 30
# The shared optimizer: a peak LR high enough that 30 steps move the loss a long way.
OPTIM = dict(learning_rate=3e-3, warmup_steps=5, end_lr_ratio=0.1, weight_decay=0.01,
             clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8)
OVERRIDES = [f"optim.{k}={v}" for k, v in OPTIM.items()] + [
    f"train.steps={STEPS}", "model.dropout=0.0", "model.dtype=float32", "mesh.data=-1",
    "train.progress=false"]


def schedule(step: int, total: int = STEPS) -> float:
    """ptft's cosine schedule (optim.learning_rate_at) as a factor of the peak."""
    warmup, end = OPTIM["warmup_steps"], OPTIM["end_lr_ratio"]
    if step < warmup:
        return step / warmup
    frac = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return (1 - end) * 0.5 * (1 + math.cos(math.pi * frac)) + end


def decay_flags(cfg, tensors: dict[str, np.ndarray], family: str, model=None) -> dict[str, bool]:
    """{HF tensor name: decayed?} by ptft's decay rules on the ptft path each tensor becomes
    (`model`: the ModelConfig of the tensors, default cfg.model). Every tensor is imported
    filled with its own index, so the converted leaves name their source whatever the
    conversion transposes, splits or reshapes."""
    model = model or cfg.model
    names = sorted(tensors)
    marked = {n: np.full(tensors[n].shape, float(i), np.float32) for i, n in enumerate(names)}
    flat, _ = import_tensors(marked, family, model.num_layers, model.num_heads)
    rules = match_rules(unflatten(flat), cfg.optim.weight_decay_rules)
    flags: dict[str, bool] = {}
    for path, decayed in ptree.flatten(rules).items():
        source = names[int(np.ravel(flat[path])[0])]
        assert flags.setdefault(source, decayed) == decayed, source
    return flags


def torch_optimizer(named_params, decayed) -> tuple[torch.optim.Optimizer, object]:
    """AdamW over the reference's parameters (weight decay where `decayed(name)`) and its
    schedule, as ptft's optimizer is configured by OVERRIDES."""
    named = list(named_params)
    groups = [{"params": [p for n, p in named if decayed(n)],
               "weight_decay": OPTIM["weight_decay"]},
              {"params": [p for n, p in named if not decayed(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=OPTIM["learning_rate"], betas=(OPTIM["b1"], OPTIM["b2"]),
                            eps=OPTIM["eps"])
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def torch_losses(model, loss_fn, batches, decayed) -> list[float]:
    """Trains the reference one step per batch; the loss of each step, before its update."""
    torch.manual_seed(0)
    model.train()
    opt, sched = torch_optimizer(model.named_parameters(), decayed)
    losses = []
    for batch in batches:
        loss = loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["clip_norm"])
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def ptft_losses(engine, flat_params: dict[str, np.ndarray], batches, model_state=None,
                key=None) -> tuple[list[float], object]:
    """Trains ptft from `flat_params` ({path: array}, every parameter of the model) with its
    jitted step, one step per host batch; returns (the loss of each step, the final state)."""
    key = jax.random.key(0) if key is None else key
    state = engine.init(jax.random.key(0))
    expected = ptree.flatten(jax.device_get(state.params))
    assert set(flat_params) == set(expected), set(flat_params) ^ set(expected)
    for path, value in flat_params.items():
        assert value.shape == expected[path].shape, (path, value.shape, expected[path].shape)
    params = jax.device_put(unflatten({k: np.asarray(v, np.float32)
                                       for k, v in flat_params.items()}),
                            engine.shardings.params)
    state = state.replace(params=params, opt_state=init_opt_state(
        engine.tx, params, engine.plan.trainable, engine.shardings.opt_state))
    if model_state is not None:
        state = state.replace(model_state=jax.device_put(model_state,
                                                         engine.shardings.model_state))
    losses = []
    for batch in batches:
        state, metrics = engine.step_fn(state, engine.to_device(batch), key)
        losses.append(float(metrics["loss"]))
    return losses, state


def packed_rows(rng, rows: int, seq_len: int, vocab: int, low: int = 5):
    """Rows filled with documents of random length end to end (no padding), as pretraining
    packs them: segment ids 1, 2, ... per document, positions restarting at 0. A document
    repeats a short motif of tokens drawn with Zipf-like frequencies, so that a few steps
    of training have something to learn (token frequencies, then the repetition)."""
    ids = np.arange(low, vocab)
    weights = 1.0 / np.arange(1, len(ids) + 1)
    weights /= weights.sum()
    tokens = np.zeros((rows, seq_len), np.int32)
    segments = np.zeros((rows, seq_len), np.int32)
    positions = np.zeros((rows, seq_len), np.int32)
    for r in range(rows):
        start, doc = 0, 1
        while start < seq_len:
            length = min(int(rng.integers(4, seq_len)), seq_len - start)
            motif = rng.choice(ids, int(rng.integers(2, 5)), p=weights)
            tokens[r, start:start + length] = np.resize(motif, length)
            segments[r, start:start + length] = doc
            positions[r, start:start + length] = np.arange(length)
            start, doc = start + length, doc + 1
    return {"tokens": tokens, "segment_ids": segments, "positions": positions}


def document_mask(segment_ids, causal: bool) -> torch.Tensor:
    """ptft's attention mask for packed rows as a 4-D boolean mask [batch, 1, q, k]: a token
    sees its own document only (and, causal, no later token)."""
    seg = torch.as_tensor(segment_ids)
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    if causal:
        mask &= torch.ones(mask.shape[1:], dtype=torch.bool).tril()
    return mask[:, None]


def assert_curves_agree(ours: list[float], theirs: list[float], rtol: float,
                        min_drop: float) -> None:
    """The two loss curves agree step by step within `rtol`, and they do move: the loss falls
    by at least `min_drop` (a curve that stays put would agree with anything)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert np.all(np.isfinite(ours)) and np.all(np.isfinite(theirs))
    np.testing.assert_allclose(ours, theirs, rtol=rtol, err_msg=f"\nptft  {ours}\ntorch {theirs}")
    assert theirs[0] - theirs[-3:].mean() > min_drop, theirs
