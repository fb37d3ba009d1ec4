"""A pretrained component restores into any model that holds it: by path, through the rules,
across layer layouts and padded vocabularies, with errors that name the parameters."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ptft_jax.ckpt.checkpoint import BestCheckpointer, Checkpointer, CheckpointMismatch
from ptft_jax.ckpt.pretrained import load_pretrained
from ptft_jax.core import params as ptree
from ptft_jax.core.state import TrainState
from ptft_jax.models.heads import Classifier
from ptft_jax.models.transformer import LanguageModel
from tests.helpers import tiny_config

TOKENS = jnp.zeros((1, 16), jnp.int32)
KEEP = dict(load=[".*"], dont_load=[], init_fresh=["^head/"])
OPT = {"count": jnp.zeros(1)}  # Orbax refuses an empty item


def _init(model, seed):
    return nn.unbox(model.init(jax.random.key(seed), TOKENS)["params"])


def _save(path, params, model_state=None):
    ckpt = Checkpointer(path)
    ckpt.save(1, TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=OPT,
                            model_state=model_state or {}), {})
    ckpt.close()
    return path


def _model_cfg(**changes):
    return dataclasses.replace(tiny_config("encoder").model, **changes)


@pytest.mark.parametrize("source_scan,target_scan", [(False, False), (True, False),
                                                     (False, True)])
def test_the_component_loads_and_the_head_stays_fresh(tmp_path, source_scan, target_scan):
    pretrained = _init(LanguageModel(_model_cfg(scan_layers=source_scan)), 0)
    _save(tmp_path, pretrained)
    fresh = _init(Classifier(_model_cfg(scan_layers=target_scan), 3), 1)
    loaded, report = load_pretrained(tmp_path, fresh, **KEEP)
    want = ptree.flatten(ptree.stack_layers(pretrained) if target_scan and not source_scan else
                         ptree.unstack_layers(pretrained) if source_scan and not target_scan
                         else pretrained)
    for path, value in ptree.flatten(loaded).items():
        expected = ptree.flatten(fresh)[path] if path.startswith("head/") else want[path]
        assert np.array_equal(np.asarray(value), np.asarray(expected)), path
    assert any("mlm_head" in line for line in report)


def test_mismatched_shapes_name_the_paths(tmp_path):
    _save(tmp_path, _init(LanguageModel(_model_cfg()), 0))
    fresh = _init(Classifier(_model_cfg(mlp_dim=256), 3), 1)
    with pytest.raises(CheckpointMismatch, match="layers_0/mlp/wi/kernel: checkpoint"):
        load_pretrained(tmp_path, fresh, **KEEP)


def test_rules_that_match_nothing_or_leave_no_value_are_errors(tmp_path):
    _save(tmp_path, _init(LanguageModel(_model_cfg()), 0))
    fresh = _init(Classifier(_model_cfg(), 3), 1)
    with pytest.raises(ValueError,
                       match="finetune.dont_load: rule 'nothing_here' matches no parameter"):
        load_pretrained(tmp_path, fresh, [".*"], ["nothing_here"], ["^head/"])
    with pytest.raises(ValueError, match="no value: transformer/position_embed"):
        load_pretrained(tmp_path, fresh, [".*"], ["position_embed"], ["^head/"])
    loaded, _ = load_pretrained(tmp_path, fresh, [".*"], ["position_embed"],
                                ["^head/", "position_embed"])
    path = "transformer/position_embed/embedding"
    assert np.array_equal(ptree.flatten(loaded)[path], ptree.flatten(fresh)[path])


def test_padded_vocabularies_are_sliced_padded_or_refused(tmp_path):
    pretrained = _init(LanguageModel(_model_cfg(vocab_size=384)), 0)
    _save(tmp_path, pretrained)
    table = ptree.flatten(pretrained)["transformer/token_embed/embedding"]
    path = "transformer/token_embed/embedding"
    smaller = _init(Classifier(_model_cfg(vocab_size=300), 3), 1)
    loaded, _ = load_pretrained(tmp_path, smaller, **KEEP, vocab_rows=290)
    assert np.array_equal(ptree.flatten(loaded)[path], table[:300])
    bigger = _init(Classifier(_model_cfg(vocab_size=512), 3), 1)
    loaded, _ = load_pretrained(tmp_path, bigger, **KEEP)
    got = ptree.flatten(loaded)[path]
    assert np.array_equal(got[:384], table)
    assert np.array_equal(got[384:], ptree.flatten(bigger)[path][384:])
    with pytest.raises(CheckpointMismatch, match="model.vocab_size=384"):
        load_pretrained(tmp_path, smaller, **KEEP, vocab_rows=350)


def test_loaded_leaves_keep_the_models_shardings(tmp_path):
    _save(tmp_path, _init(LanguageModel(_model_cfg()), 0))
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    fresh = _init(Classifier(_model_cfg(), 3), 1)
    fresh = jax.tree.map(lambda x: jax.device_put(
        x, NamedSharding(mesh, P("fsdp") if x.ndim == 2 and x.shape[0] % 2 == 0 else P())),
        fresh)
    loaded, _ = load_pretrained(tmp_path, fresh, **KEEP)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(fresh)):
        assert a.sharding == b.sharding


def test_model_state_round_trips_and_the_best_checkpoint_is_kept(tmp_path):
    params = {"w": jnp.arange(4.0)}
    stats = {"batch_stats": {"mean": jnp.ones(3)}}
    ckpt = Checkpointer(tmp_path / "latest")
    ckpt.save(1, TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=OPT,
                            model_state=stats), {"note": 1})
    ckpt.close()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=x.sharding),
                          TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                     opt_state=OPT, model_state=stats))
    restored, meta = Checkpointer(tmp_path / "latest").restore(1, target)
    assert np.array_equal(restored.model_state["batch_stats"]["mean"], np.ones(3))
    best = BestCheckpointer(tmp_path / "best", "accuracy", "max")
    for step, accuracy in ((1, 0.5), (2, 0.7), (3, 0.6)):
        state = TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.full(4, step * 1.0)},
                           opt_state=OPT, model_state={})
        best.save(step, state, {}, {"accuracy": accuracy})
    assert best.best_step() == 2 and best.manager.all_steps() == [2]
    best.close()


def test_layer_layouts_and_splits_round_trip():
    params = _init(LanguageModel(_model_cfg()), 0)
    stacked = ptree.stack_layers(params)
    assert "layers" in stacked["transformer"] and "layers_0" not in stacked["transformer"]
    back = ptree.flatten(ptree.unstack_layers(stacked))
    for path, value in ptree.flatten(params).items():
        assert np.array_equal(back[path], value)
    kept, rest = ptree.split(params, lambda p: "layers_1/" in p)
    assert all("layers_1/" in p for p in ptree.flatten(kept))
    assert set(ptree.flatten(ptree.merge(kept, rest))) == set(ptree.flatten(params))
    assert ptree.layer_index("transformer/layers_3/mlp/wi/kernel") == 3
    assert ptree.layer_index("transformer/layers/mlp/wi/kernel") is None
