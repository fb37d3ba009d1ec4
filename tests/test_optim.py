"""Optimizers and schedules: each optimizer against optax's own over several steps, the
schedules' values, reduce-on-plateau, hyperparameters changed without a recompile, and every
optimizer's state sharded and resumed like AdamW's."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ptft_jax.ckpt.checkpoint import Checkpointer
from ptft_jax.config.load import load_config
from ptft_jax.config.schema import OPTIMIZERS, ConfigError, OptimConfig
from ptft_jax.config.validate import validate
from ptft_jax.core.params import match_rules
from ptft_jax.train.optim import (get_hyperparam, make_optimizer, make_schedule, plateau_step,
                                  set_hyperparams)
from tests.helpers import batches, engine_for, host_params, run_steps, tiny_config

LR, WD = 0.05, 0.1


def _problem():
    """A small least-squares problem with parameters that decay (kernels) and that do not
    (bias, LayerNorm scale), some big enough for Adafactor to factor."""
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(130, 129)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(129,)), jnp.float32)},
              "norm": {"scale": jnp.ones((129,), jnp.float32)}}
    x = jnp.asarray(rng.normal(size=(16, 130)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 129)), jnp.float32)

    def loss(p):
        return jnp.mean((((x @ p["dense"]["kernel"]) + p["dense"]["bias"]) * p["norm"]["scale"]
                         - y) ** 2)
    return params, jax.grad(loss)


def _reference(name, mask):
    """optax's own optimizer for `name`, with the decay our config means."""
    if name == "adamw":
        return optax.adamw(LR, weight_decay=WD, mask=mask)
    if name == "adam":  # L2 on the gradient, then Adam
        return optax.chain(optax.add_decayed_weights(WD, mask), optax.adam(LR))
    if name == "sgd":
        return optax.chain(optax.add_decayed_weights(WD, mask),
                           optax.sgd(LR, momentum=0.9, nesterov=True))
    if name == "lamb":
        return optax.lamb(LR, eps=1e-8, weight_decay=WD, mask=mask)
    if name == "lion":
        return optax.lion(LR, b1=0.9, b2=0.99, weight_decay=WD, mask=mask)
    # optax's Adafactor adds the decay after the LR: its rate is ours times the LR.
    return optax.adafactor(LR, multiply_by_parameter_scale=False, weight_decay_rate=LR * WD,
                           weight_decay_mask=mask)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_follows_optax_over_several_steps(name):
    params, grad = _problem()
    cfg = OptimConfig(name=name, learning_rate=LR, weight_decay=WD, warmup_steps=0,
                      schedule="constant", clip_norm=0.0, nesterov=name == "sgd",
                      b2=0.99 if name == "lion" else 0.999)
    ours, _ = make_optimizer(cfg, total_steps=10)
    ref = _reference(name, match_rules(params, cfg.weight_decay_rules, "rules"))
    mine, theirs = params, params
    s_mine, s_theirs = ours.init(params), ref.init(params)
    for _ in range(4):
        u, s_mine = ours.update(grad(mine), s_mine, mine)
        mine = optax.apply_updates(mine, u)
        u, s_theirs = ref.update(grad(theirs), s_theirs, theirs)
        theirs = optax.apply_updates(theirs, u)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), mine, params)
    assert min(jax.tree.leaves(moved)) > 0  # every parameter trained
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5),
                 mine, theirs)


def test_schedules_warm_up_then_decay():
    cos = make_schedule(OptimConfig(learning_rate=1.0, warmup_steps=10, end_lr_ratio=0.1), 110)
    assert float(cos(0)) == 0.0
    np.testing.assert_allclose([float(cos(5)), float(cos(10)), float(cos(60)),
                                float(cos(110))], [0.5, 1.0, 0.55, 0.1], rtol=1e-5)
    step = make_schedule(OptimConfig(learning_rate=1.0, warmup_steps=10, schedule="step",
                                     decay_every=30, decay_factor=0.1), 200)
    np.testing.assert_allclose([float(step(s)) for s in (5, 10, 39, 40, 70, 199)],
                               [0.5, 1.0, 1.0, 0.1, 0.01, 1e-6], rtol=1e-5)
    const = make_schedule(OptimConfig(learning_rate=0.3, warmup_steps=0,
                                      schedule="constant"), 50)
    assert float(const(0)) == float(const(49)) == pytest.approx(0.3)


def test_reduce_on_plateau_counts_evaluations_without_improvement():
    cfg = OptimConfig(schedule="plateau", plateau_patience=2, plateau_factor=0.5)
    saved, scales = None, []
    for value in [0.50, 0.60, 0.60, 0.60, 0.61, 0.61, 0.61, 0.70]:
        saved, scale = plateau_step(cfg, saved, value, "max")
        scales.append(scale)
    # Two evaluations that do not beat 0.60 halve it; 0.61 is an improvement.
    assert scales == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]
    saved, scale = plateau_step(cfg, None, 2.0, "min")
    for loss in (2.5, 2.1):
        saved, scale = plateau_step(cfg, saved, loss, "min")
    assert scale == 0.5


def test_hyperparameters_change_without_a_recompile():
    cfg = tiny_config("encoder", "mesh.data=8", "optim.schedule=constant",
                      "optim.warmup_steps=0")
    engine = engine_for(cfg)
    state = engine.init(jax.random.key(0))
    state, hist = run_steps(engine, state, batches(cfg, 1))
    assert hist[0]["learning_rate"] == pytest.approx(1e-3)
    state = state.replace(opt_state=set_hyperparams(state.opt_state,
                                                    {"lr_scale": 0.5, "learning_rate": 4e-3}))
    assert get_hyperparam(state.opt_state, "lr_scale") == 0.5
    state, hist = run_steps(engine, state, batches(cfg, 1, seed=1))
    assert hist[0]["learning_rate"] == pytest.approx(2e-3)
    assert engine.step_fn.jitted._cache_size() == 1


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_state_shards_and_resumes_like_adamws(name, tmp_path):
    cfg = tiny_config("encoder", "mesh.fsdp=4", "mesh.tensor=2", f"optim.name={name}",
                      "model.num_layers=1", "model.mlp_dim=128")
    engine = engine_for(cfg)
    state, _ = run_steps(engine, engine.init(jax.random.key(0)), batches(cfg, 2))
    # Moments of a parameter's shape live where the parameter does (their path ends with
    # the parameter's).
    keystr = jax.tree_util.keystr
    params = {keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    split = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
        owner = [x for p, x in params.items() if keystr(path).endswith(p)]
        if owner and owner[0].shape == leaf.shape:
            assert leaf.sharding == owner[0].sharding, keystr(path)
            split += not leaf.sharding.is_fully_replicated
    assert split, "no optimizer state is split over the mesh"
    ckpt = Checkpointer(tmp_path, keep=1)
    ckpt.save(2, state, {})
    ckpt.close()
    more = batches(cfg, 4)[2:]
    straight, _ = run_steps(engine, state, more)
    ckpt = Checkpointer(tmp_path)
    restored, _ = ckpt.restore(2, engine.restore_target())
    ckpt.close()
    resumed, _ = run_steps(engine, restored, more)
    jax.tree.map(np.testing.assert_array_equal, host_params(engine, straight),
                 host_params(engine, resumed))


@pytest.mark.parametrize("override,message", [
    ("optim.name=adamax", "adamw, adam, sgd, lamb, lion, adafactor"),
    ("optim.schedule=exponential", "cosine, linear, constant, step, plateau"),
    ("optim.nesterov=true", "nesterov is SGD's option"),
    ("optim.b2=1.0", "optim.b2"),
    ("optim.schedule=plateau", "data.eval_split"),
])
def test_bad_optimizer_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, [override]), 1)
