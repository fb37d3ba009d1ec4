"""Orbax checkpoints: restore onto another mesh or layout, params-only restore, readable
mismatch errors."""
import jax
import numpy as np
import pytest

from ptft_jax.ckpt.checkpoint import Checkpointer, CheckpointMismatch
from tests.helpers import batches, engine_for, host_params, run_steps, tiny_config


def _trained(cfg, steps=2):
    engine = engine_for(cfg)
    state, _ = run_steps(engine, engine.init(jax.random.key(0)), batches(cfg, steps))
    return engine, state


def _assert_equal_trees(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


@pytest.mark.parametrize("target_mesh", [("mesh.data=8",), ("mesh.fsdp=4", "mesh.tensor=2"),
                                         ("mesh.parallelism=pmap",)])
def test_save_on_one_mesh_restore_on_another(tmp_path, target_mesh):
    src_cfg = tiny_config("encoder", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    src, state = _trained(src_cfg)
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save(2, state, {"note": "hello"})
    ckpt.close()

    dst = engine_for(tiny_config("encoder", *target_mesh))
    ckpt = Checkpointer(tmp_path)
    restored, meta = ckpt.restore(ckpt.latest_step(), dst.restore_target())
    ckpt.close()
    assert meta["step"] == 2 and meta["note"] == "hello"
    assert int(restored.step) == 2
    # Same values, new layout.
    _assert_equal_trees(jax.device_get(restored.params), host_params(src, state))
    _assert_equal_trees(jax.device_get(restored.opt_state),
                        jax.device_get(src.host_state(state).opt_state))
    for leaf, sh in zip(jax.tree.leaves(restored.params), jax.tree.leaves(dst.shardings.params)):
        assert leaf.sharding == sh
    # And it trains on: one more step on the new layout runs.
    restored = dst.place(restored)
    run_steps(dst, restored, batches(src_cfg, 1, seed=9))


def test_params_only_restore_keeps_fresh_optimizer_state(tmp_path):
    cfg = tiny_config("decoder")
    src, state = _trained(cfg)
    with_opt = Checkpointer(tmp_path)
    with_opt.save(2, state, {})
    with_opt.close()
    dst = engine_for(cfg)
    fresh = dst.init(jax.random.key(5))
    ckpt = Checkpointer(tmp_path)
    restored, _ = ckpt.restore(2, fresh, params_only=True)
    ckpt.close()
    _assert_equal_trees(jax.device_get(restored.params), host_params(src, state))
    _assert_equal_trees(jax.device_get(restored.opt_state), jax.device_get(fresh.opt_state))
    assert int(restored.step) == 0


def test_mismatched_shapes_name_the_parameters(tmp_path):
    cfg = tiny_config("encoder")
    _, state = _trained(cfg, steps=1)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, state, {})
    ckpt.close()
    wider = engine_for(tiny_config("encoder", "model.mlp_dim=256"))
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointMismatch) as err:
        ckpt.restore(1, wider.restore_target())
    ckpt.close()
    message = str(err.value)
    assert "transformer/layers_0/mlp/wi/kernel" in message
    assert "(128, 512) vs model (128, 256)" in message
    assert "attn/query/kernel" not in message  # only the parameters that differ are named


def test_scanned_checkpoint_into_unrolled_model_is_refused(tmp_path):
    cfg = tiny_config("decoder", "model.scan_layers=true")
    _, state = _trained(cfg, steps=1)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, state, {})
    ckpt.close()
    unrolled = engine_for(tiny_config("decoder"))
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointMismatch, match="written with model.scan_layers=true"):
        ckpt.restore(1, unrolled.restore_target())
    ckpt.close()


def test_keeps_only_the_last_k_steps(tmp_path):
    cfg = tiny_config("decoder")
    _, state = _trained(cfg, steps=1)
    ckpt = Checkpointer(tmp_path, every=1, keep=2)
    for step in (1, 2, 3, 4):
        ckpt.save(step, state, {})
    ckpt.close()
    assert Checkpointer(tmp_path).all_steps() == [3, 4]
