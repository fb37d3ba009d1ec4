"""Packed finetuning rows (data/packed_examples.py, models/heads.pool_segments): every example
once, each as its padded row would begin; the same loss sums and gradients as padded rows;
no example sees another; a packed evaluation gives the padded one's metrics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptft_jax.config.load import load_config
from ptft_jax.data.labelled import Examples, LabelSpace
from ptft_jax.data.packed_examples import PackedExamples, plan_rows
from ptft_jax.tasks.base import apply_model
from ptft_jax.tasks.classify import ClassifyTask

SEQ = 32


def _examples(n=23, pair=False, kind="classification", seed=0, cls=True):
    """`n` examples of random lengths (some cut to SEQ), labels of `kind`."""
    rng = np.random.default_rng(seed)

    def stream():
        docs = [rng.integers(5, 60, rng.integers(1, 26 if not pair else 14)) for _ in range(n)]
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
        return np.concatenate(docs).astype(np.int32), offsets
    labels = {"classification": rng.integers(0, 3, n).astype(np.int32),
              "multi_label": (rng.random((n, 3)) > 0.5).astype(np.float32),
              "regression": rng.normal(size=n).astype(np.float32)}[kind]
    return Examples(stream(), stream() if pair else None, labels, SEQ,
                    cls_id=2 if cls else None, sep_id=3)


def test_every_example_is_packed_once_within_the_row_and_slot_limits():
    lengths = np.random.default_rng(1).integers(3, SEQ + 1, 500)
    order = np.random.default_rng(2).permutation(500)
    members, starts = plan_rows(lengths, SEQ, 4, order)
    assert sorted(members.tolist()) == list(range(500))
    per_row = np.diff(starts)
    assert per_row.min() >= 1 and per_row.max() <= 4
    used = np.add.reduceat(lengths[members], starts[:-1])
    assert used.max() <= SEQ
    assert len(per_row) < 500 * 0.75  # it packs: fewer rows than examples
    again = plan_rows(lengths, SEQ, 4, order)
    assert np.array_equal(again[0], members) and np.array_equal(again[1], starts)


@pytest.mark.parametrize("pair", [False, True])
def test_a_packed_row_lays_each_example_out_as_its_padded_row_begins(pair):
    examples = _examples(pair=pair)
    packed = PackedExamples(examples, slots=4, seed=3)
    rows = packed.rows(np.arange(len(packed)))
    seen = []
    for r in range(len(packed)):
        for slot in range(4):
            where = rows["segment_ids"][r] == slot + 1
            if rows["weight"][r, slot] == 0:
                assert not where.any()
                continue
            example = int(packed.members[packed.starts[r] + slot])
            seen.append(example)
            alone = examples.rows([example])
            length = int(examples.lengths[example])
            assert where.sum() == length
            for name in ("tokens", "positions", "type_ids"):
                assert rows[name][r][where].tolist() == alone[name][0][:length].tolist(), name
            assert rows["label"][r, slot] == alone["label"][0]
    assert sorted(seen) == list(range(len(examples)))
    assert (rows["tokens"][rows["segment_ids"] == 0] == 0).all()


def _task(pooling, kind="classification", slots=None, decoder=False):
    cfg = load_config(None, ["model.preset=bert-tiny", "model.vocab_size=64",
                             f"model.max_len={SEQ}", "model.dropout=0.0",
                             *(["model.kind=decoder"] if decoder else [])]).model
    labels = LabelSpace(kind, () if kind == "regression" else ("a", "b", "c"))
    return ClassifyTask(cfg, labels, pooling, slots)


def _sums_and_grads(task, params, batch):
    def loss(p):
        sums, _ = task.sums(p, {}, batch, None, None, train=False)
        return sums["loss_sum"], sums
    (_, sums), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return sums, grads


@pytest.mark.parametrize("pooling,kind,pair,decoder", [
    ("cls", "classification", False, False), ("mean", "multi_label", True, False),
    ("mean", "regression", False, False), ("last", "classification", False, True)])
def test_packed_rows_give_the_padded_rows_sums_and_gradients(pooling, kind, pair, decoder):
    examples = _examples(kind=kind, pair=pair, cls=not decoder)
    task = _task(pooling, kind, slots=4, decoder=decoder)
    padded = examples.rows(np.arange(len(examples)))
    packed_split = PackedExamples(examples, 4, seed=5)
    packed = packed_split.rows(np.arange(len(packed_split)))
    assert len(packed_split) < len(examples)
    params = jax.jit(lambda: task.model.init(
        jax.random.key(0), *task.model_inputs(padded), train=False)["params"])()
    a, grad_a = _sums_and_grads(task, params, padded)
    b, grad_b = _sums_and_grads(task, params, packed)
    assert float(a["count"]) == float(b["count"]) == len(examples)
    np.testing.assert_allclose(float(a["loss_sum"]), float(b["loss_sum"]), rtol=1e-5)
    for path, (x, y) in zip(jax.tree_util.tree_leaves_with_path(grad_a),
                            zip(jax.tree.leaves(grad_a), jax.tree.leaves(grad_b))):
        scale = float(jnp.max(jnp.abs(x))) + 1e-6
        assert float(jnp.max(jnp.abs(x - y))) <= 1e-4 * scale, path[0]


def test_an_example_never_attends_to_another_in_its_row():
    examples = _examples()
    task = _task("mean", slots=4)
    packed_split = PackedExamples(examples, 4, seed=0)
    row = next(r for r in range(len(packed_split))
               if packed_split.starts[r + 1] - packed_split.starts[r] >= 2)
    batch = packed_split.rows([row])
    params = task.model.init(jax.random.key(0), *task.model_inputs(batch),
                             train=False)["params"]

    def logits(b):
        return apply_model(task.model, params, {}, *task.model_inputs(b), train=False,
                           slots=4)[0][0]
    changed = {k: v.copy() for k, v in batch.items()}
    other = changed["segment_ids"][0] == 2
    changed["tokens"][0][other] = (changed["tokens"][0][other] + 7) % 60 + 4
    before, after = logits(batch), logits(changed)
    np.testing.assert_array_equal(np.asarray(before[0]), np.asarray(after[0]))
    assert not np.allclose(np.asarray(before[1]), np.asarray(after[1]))


def test_a_packed_evaluation_gives_the_padded_metrics():
    examples = _examples(n=41, seed=4)
    task = _task("cls", slots=4)
    params = task.model.init(jax.random.key(1), *task.model_inputs(examples.rows([0])),
                             train=False)["params"]
    step = jax.jit(lambda b: task.sums(params, {}, b, None, None, train=False)[0])

    def metrics(split, batch_size):
        total = None
        for batch in split.batches(batch_size):
            sums = jax.tree.map(np.asarray, step(batch))
            total = sums if total is None else jax.tree.map(np.add, total, sums)
        return task.metrics(total)
    padded, packed = metrics(examples, 8), metrics(PackedExamples(examples, 4, None), 5)
    assert padded["confusion"] == packed["confusion"]
    assert padded["accuracy"] == packed["accuracy"] and padded["macro_f1"] == packed["macro_f1"]
    np.testing.assert_allclose(padded["loss"], packed["loss"], rtol=1e-5)
