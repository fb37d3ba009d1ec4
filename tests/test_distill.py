"""Knowledge distillation (distill.teacher, tasks/distill.py, jobs/distill.py): the soft term is
PyTorch's KL at temperature T, its gradients reach the student through its logits as
T * (p_student - p_teacher); hidden states are each layer's output, scanned or not; packed rows
give the padded rows' sums; a run keeps the teacher frozen, resumes exactly, and leaves a
plain classifier for predict and export; bad teachers are refused before anything is
written."""
import dataclasses
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ptft_jax.config.load import load_config
from ptft_jax.config.schema import ConfigError, ModelConfig
from ptft_jax.config.validate import validate
from ptft_jax.core.params import flatten, stack_layers
from ptft_jax.data.labelled import LabelSpace
from ptft_jax.data.packed_examples import PackedExamples
from ptft_jax.data.tokenizer import load_tokenizer
from ptft_jax.jobs.entry import finetune, pretrain
from ptft_jax.models.heads import Classifier
from ptft_jax.models.transformer import Transformer, hidden_states
from ptft_jax.tasks.classify import ClassifyTask
from ptft_jax.tasks.distill import TEACHER, DistillSpec, DistillTask, soft_kl
from ptft_jax.train.engine import build
from tests.helpers import ONE_DEVICE_AND_MESH, assert_same_gradients, tiny_config
from tests.test_hf_runs import FIXTURES, SHORT, _labelled
from tests.test_packed_finetune import SEQ, _examples


def _model(layers=2, width=16, **keys):
    return ModelConfig(vocab_size=64, hidden_size=width, num_layers=layers, num_heads=2,
                       mlp_dim=2 * width, max_len=SEQ, dropout=0.0, **keys)


def _task(alpha=0.5, temperature=2.0, hidden=(), slots=None):
    labels = LabelSpace("classification", ("a", "b", "c"))
    student_cfg, teacher_cfg = _model(), _model(layers=3, width=24)
    student = ClassifyTask(student_cfg, labels, "mean", slots)
    teacher = Classifier(teacher_cfg, 3, "mean")
    return DistillTask(student, teacher, DistillSpec(temperature, alpha, hidden), student_cfg,
                       teacher_cfg)


def _variables(task, batch):
    variables = task.init_variables(jax.random.key(0), {k: jnp.asarray(v)
                                                        for k, v in batch.items()})
    return nn.unbox(variables["params"]), {TEACHER: nn.unbox(variables[TEACHER])}


def _grads(task, params, state, batch):
    def loss(p):
        sums, _ = task.sums(p, state, batch, jnp.arange(len(batch["tokens"])),
                            jax.random.key(1), train=True)
        return sums["loss_sum"] / sums["count"], sums
    return jax.grad(loss, has_aux=True)(params)


def test_the_soft_term_is_torchs_kl_at_temperature_with_its_gradient():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 7)).astype(np.float32), 3 * rng.normal(size=(5, 7)).astype(
        np.float32)
    T = 3.0
    ours, grad = jax.value_and_grad(lambda x: jnp.sum(soft_kl(x, jnp.asarray(t), T)))(
        jnp.asarray(s))
    s_t = torch.tensor(s, requires_grad=True)
    theirs = torch.nn.functional.kl_div(torch.log_softmax(s_t / T, -1),
                                        torch.softmax(torch.tensor(t) / T, -1),
                                        reduction="sum") * T ** 2
    theirs.backward()
    np.testing.assert_allclose(float(ours), theirs.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), s_t.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_gradients_reach_the_student_as_T_times_the_difference_of_the_softened_outputs():
    """alpha = 0: the step's gradient equals the student model's VJP of the analytic
    d(T^2 KL)/d logits = T (softmax(s / T) - softmax(t / T)), per example weight / count;
    alpha = 1: the plain classifier's gradient. The teacher gets none."""
    batch = {k: jnp.asarray(v) for k, v in _examples(n=8).rows(np.arange(8)).items()}
    T = 2.5
    task = _task(alpha=0.0, temperature=T)
    params, state = _variables(task, batch)
    grads, sums = _grads(task, params, state, batch)
    inputs = task.model_inputs(batch)

    def student_logits(p):
        return task.model.apply({"params": p}, *inputs, train=True)
    s, vjp = jax.vjp(student_logits, params)
    t = task.teacher.apply({"params": state[TEACHER]}, *inputs, train=False)
    w = batch["weight"][:, None] / jnp.sum(batch["weight"])
    cotangent = T * (jax.nn.softmax(s / T) - jax.nn.softmax(t / T)) * w
    expected = vjp(cotangent)[0]
    for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=2e-4, atol=1e-7, err_msg=str(path))
    assert float(sums["kd_sum"]) > 0 and float(sums["loss_sum"]) == float(sums["kd_sum"])

    labels_only = _task(alpha=1.0)
    plain = labels_only.student
    grads, sums = _grads(labels_only, params, state, batch)
    plain_grads, plain_sums = _grads(plain, params, {}, batch)
    np.testing.assert_allclose(sums["loss_sum"], plain_sums["loss_sum"], rtol=1e-6)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("scanned", [False, True])
def test_hidden_states_are_each_layers_output(scanned):
    """Layer k of a 3-layer model (post-norm: no final norm) is what the same model cut to k
    layers returns; the scanned layout gives the unrolled one's states."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(5, 60, (2, 12)), jnp.int32)
    segments = jnp.ones_like(tokens).at[1, 8:].set(0)
    full = Transformer(_model(layers=3))
    params = nn.unbox(full.init(jax.random.key(0), tokens, segments)["params"])
    _, sown = full.apply({"params": params}, tokens, segments, mutable=["intermediates"])
    states = hidden_states({"transformer": sown["intermediates"]}, 3)
    if scanned:
        stacked = Transformer(_model(layers=3, scan_layers=True))
        _, sown = stacked.apply({"params": stack_layers(params)}, tokens, segments,
                                mutable=["intermediates"])
        scanned_states = hidden_states({"transformer": sown["intermediates"]}, 3)
        for a, b in zip(states, scanned_states):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        return
    for k in (1, 2):
        cut = {n: v for n, v in params.items() if not n.startswith("layers_")
               or int(n.split("_")[1]) < k}
        out = Transformer(_model(layers=k)).apply({"params": cut}, tokens, segments)
        np.testing.assert_allclose(states[k], out, rtol=1e-5, atol=1e-6)
    assert states[0].shape == states[3].shape == (2, 12, 16)


def test_packed_rows_give_the_padded_rows_sums_and_gradients_hidden_states_included():
    examples = _examples(n=12)
    padded = {k: jnp.asarray(v) for k, v in examples.rows(np.arange(12)).items()}
    packed_rows = PackedExamples(examples, slots=4, seed=1)
    packed = {k: jnp.asarray(v) for k, v in packed_rows.rows(np.arange(len(packed_rows))).items()}
    hidden = ((1, 2), (2, 3), (0, 0))
    task_pad, task_pack = _task(hidden=hidden), _task(hidden=hidden, slots=4)
    params, state = _variables(task_pad, padded)
    g_pad, s_pad = _grads(task_pad, params, state, padded)
    g_pack, s_pack = _grads(task_pack, params, state, packed)
    for key in ("loss_sum", "label_loss_sum", "kd_sum", "hidden_sum", "count"):
        np.testing.assert_allclose(s_pack[key], s_pad[key], rtol=1e-4, err_msg=key)
    assert float(s_pad["hidden_sum"]) > 0 and "distill" in g_pad
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_pack), jax.tree.leaves(g_pad)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6, err_msg=str(path))


def _state_arrays(run_dir, step):
    out = {}
    for item in ("params", "model_state", "opt_state"):
        tree = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / item)
        out.update({f"{item}/{p}": np.asarray(v) for p, v in flatten(tree).items()})
    return out


def _student(tmp_path, run, *overrides):
    corpus = tmp_path / "train.jsonl"  # written once: a rewrite would make the cache stale
    if not corpus.exists():
        _labelled(tmp_path)
    return load_config(None, [
        f"run_dir={run}", f"distill.teacher=hf:{FIXTURES / 'bert_cls'}",
        f"data.corpus={corpus}", "data.label_column=label",
        "train.task=classification", "data.seq_len=24", "model.hidden_size=16",
        "model.num_layers=2", "model.num_heads=2", "model.mlp_dim=32", "model.max_len=40",
        "finetune.pooling=mean", *SHORT, *overrides])


def test_a_distilled_run_learns_the_teacher_keeps_it_frozen_resumes_and_predicts(tmp_path,
                                                                                    capsys):
    from ptft_jax.cli import main
    from ptft_jax.convert.hf import read_tensors
    run = tmp_path / "run"
    keys = ["train.steps=6", "checkpoint.every=3", "distill.alpha=0.2", "optim.learning_rate=3e-3",
            "distill.hidden_layers=[[2,2]]", "train.log_every=1", "finetune.pooling=cls"]
    finetune(_student(tmp_path, run, *keys))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd_loss"] for r in rows if "kd_loss" in r and "eval/loss" not in r]
    hidden = [r["hidden_loss"] for r in rows if "hidden_loss" in r]
    assert len(kd) == 6 and kd[-1] < kd[0] and hidden[-1] < hidden[0]
    unbroken = _state_arrays(run, 6)
    # The teacher, frozen: the HF classifier's output layer, unchanged after 6 steps.
    hf = read_tensors(FIXTURES / "bert_cls")
    np.testing.assert_array_equal(unbroken["model_state/teacher/head/out/kernel"],
                                  hf["classifier.weight"].T)
    assert not any(k.startswith("opt_state") and "teacher" in k for k in unbroken)
    # Resumed from step 3: bit-identical to the unbroken run, teacher included.
    shutil.rmtree(run / "checkpoints" / "6")
    finetune(_student(tmp_path, run, *keys))
    resumed = _state_arrays(run, 6)
    assert resumed.keys() == unbroken.keys()
    for k in unbroken:
        np.testing.assert_array_equal(resumed[k], unbroken[k], err_msg=k)
    # What reads the run sees the student alone.
    (tmp_path / "in.jsonl").write_text('{"text": "the lord said unto the king"}\n')
    capsys.readouterr()
    main(["predict", str(run), "--input", str(tmp_path / "in.jsonl")])
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert abs(sum(answer["probabilities"].values()) - 1) < 1e-4
    main(["export", str(run), str(tmp_path / "hf"), "--format", "hf"])
    exported = read_tensors(tmp_path / "hf")
    assert exported["bert.embeddings.word_embeddings.weight"].shape[1] == 16
    assert not any("teacher" in k or "distill" in k for k in exported)


def test_a_masked_lm_student_learns_from_an_hf_masked_lm_with_its_tokenizer(tmp_path,
                                                                            small_corpus):
    run = tmp_path / "mlm"
    summary = pretrain(load_config(None, [
        f"run_dir={run}", f"distill.teacher=hf:{FIXTURES / 'bert_mlm'}",
        f"data.corpus={small_corpus}", "train.steps=3", "data.seq_len=32",
        "model.hidden_size=16", "model.num_layers=2", "model.num_heads=2", "model.mlp_dim=32",
        "model.max_len=40", "distill.hidden_layers=[[2,2]]", "model.scan_layers=true",
        *SHORT]))
    assert summary["kd_loss"] > 0 and summary["hidden_loss"] > 0
    assert summary["tokens_in_loss"] > 0
    teachers = load_tokenizer(FIXTURES / "bert_mlm" / "vocab.txt").get_vocab()
    assert load_tokenizer(run / "tokenizer.json").get_vocab() == teachers


def test_bad_teachers_are_refused_before_anything_is_written(tmp_path, pretrained, lora_run):
    cases = [
        # another tokenizer than the teacher's
        ([f"data.tokenizer={pretrained / 'tokenizer.json'}"], "another tokenizer"),
        # a teacher with no classifier head
        ([f"distill.teacher=hf:{FIXTURES / 'bert_model'}"], "BertModel"),
        # a layer the teacher does not have
        (["distill.hidden_layers=[[1,9]]"], "teacher layer 9"),
        # a pretraining run as a classification teacher
        ([f"distill.teacher={pretrained}"], "train.task mlm"),
    ]
    for i, (overrides, message) in enumerate(cases):
        run = tmp_path / f"never{i}"
        with pytest.raises(ConfigError, match=message):
            finetune(_student(tmp_path, run, *overrides))
        assert not run.exists()
    # A ptft teacher trained on other labels: known once the data is read (its cache is
    # written into the run directory), before the run's config or any checkpoint.
    run = tmp_path / "labels"
    with pytest.raises(ConfigError, match="same labels"):
        finetune(_student(tmp_path, run, f"distill.teacher={lora_run}",
                          f"data.corpus={_other_labels(tmp_path)}"))
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    run = tmp_path / "never"
    for overrides, message in (
            (["train.task=regression"], "cannot be distilled"),
            (["distill.alpha=1.0"], "teacher would do nothing"),
            (["distill.hidden_layers=[[3,1]]"], "student layer 3"),
            (["distill.hidden_layers=[2,1]"], "pairs"),
            (["distill.teacher=null", "distill.hidden_layers=[[1,1]]"], "teacher is null")):
        with pytest.raises(ConfigError, match=message):
            validate(_student(tmp_path, run, *overrides), 8)


def _other_labels(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text("".join(json.dumps({"text": f"text number {i}", "label": "xy"[i % 2]}) + "\n"
                            for i in range(12)))
    return path


def test_sharded_gradients_equal_one_device():
    """The teacher in the model state is sharded by its logical axes like any model: on a
    (data 2, fsdp 2, tensor 2) mesh the distillation step's gradients (hidden states matched
    too) are those of one device."""
    engines = []
    labels = LabelSpace("classification", ("a", "b", "c"))
    for mesh, devices in ONE_DEVICE_AND_MESH:
        cfg = tiny_config("encoder", "train.task=classification", f"data.seq_len={SEQ}",
                          "data.packing=pad", *mesh)
        teacher_cfg = dataclasses.replace(cfg.model, num_layers=3, hidden_size=64, mlp_dim=128)
        task = DistillTask(ClassifyTask(cfg.model, labels, "mean"),
                           Classifier(teacher_cfg, 3, "mean"),
                           DistillSpec(2.0, 0.3, ((1, 2), (2, 3))), cfg.model, teacher_cfg)
        engines.append(build(cfg, task, devices))
    batch = _examples(n=8).rows(np.arange(8))
    grads, sums = assert_same_gradients(*engines, batch, rtol=2e-4, atol=2e-6, loss_rtol=2e-4)
    assert float(sums["kd_sum"]) > 0 and float(sums["hidden_sum"]) > 0
    assert np.abs(grads["distill"]["pair_1"]["kernel"]).max() > 0


def test_finetuning_strategies_apply_to_the_student_alone(tmp_path):
    """LoRA on the student: its adapters, head and projections get optimizer state, its
    backbone's kernels none; the teacher is in no plan at all (model state) and stays as
    loaded."""
    from ptft_jax.convert.hf import read_tensors
    run = tmp_path / "lora"
    finetune(_student(tmp_path, run, "finetune.lora_rank=2", "train.steps=2",
                      "distill.hidden_layers=[[1,1]]", "finetune.pooling=cls"))
    arrays = _state_arrays(run, 2)
    optimized = [k for k in arrays if k.startswith("opt_state/")]
    assert any("/lora/" in k for k in optimized) and any("/distill/" in k for k in optimized)
    assert any("/head/" in k for k in optimized)
    assert not any("teacher" in k for k in optimized)
    assert not any(k.endswith("transformer/layers_0/attn/query/kernel") for k in optimized)
    np.testing.assert_array_equal(arrays["model_state/teacher/head/out/kernel"],
                                  read_tensors(FIXTURES / "bert_cls")["classifier.weight"].T)
