"""Knowledge distillation: a student task (text classification, or masked LM) trained against a
frozen teacher whose forward pass runs inside the same jitted step.

The student is the task's own model, with its parameters where they always are (`transformer/`,
`head/`), so that everything that reads a run (eval, predict, serve, export, a later
init_from) sees a plain classifier or language model. The teacher's parameters ride in the
train state's mutable collections (`model_state["teacher"]`): checkpointed and sharded with the
run, but outside `params`, so no gradient, optimizer state, LoRA adapter, pruning mask or
freezing rule ever reaches them, and a resumed run does not read the teacher's source again.
Hidden-state matching trains one projection per matched pair (student width -> teacher width,
TinyBERT's W_h) under `params["distill"]`, which only training reads.

Per example (or masked token), with temperature T and weight alpha:
    loss = alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))
           + hidden_weight * sum over pairs of the mean squared error of the matched states
(Hinton et al. 2015; the T^2 keeps the soft term's gradients at the hard term's scale). The
hidden term of an example is the mean over its tokens, so it adds up as a per-example sum like
the rest (a packed row's examples each count once).
"""
from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptft_jax.config.schema import ModelConfig
from ptft_jax.core.params import TRAINING_ONLY
from ptft_jax.models.layers import dense
from ptft_jax.models.transformer import hidden_states
from ptft_jax.tasks import metrics
from ptft_jax.tasks.base import Task
from ptft_jax.tasks.classify import ClassifyTask
from ptft_jax.tasks.lm import MaskedLM, mask_positions
from ptft_jax.tasks.vocab_loss import logit_sums

TEACHER = "teacher"  # the model_state collection holding the frozen teacher's parameters
PROJECTIONS = TRAINING_ONLY[0]  # the params subtree of the hidden-state projections


@dataclass(frozen=True)
class DistillSpec:
    temperature: float
    alpha: float
    hidden_layers: tuple[tuple[int, int], ...] = ()  # (student layer, teacher layer); 0: embeddings
    hidden_weight: float = 1.0


class Projections(nn.Module):
    """One dense layer per matched pair: the student's hidden width to the teacher's."""
    cfg: ModelConfig  # the student's
    pairs: int
    width: int  # the teacher's hidden size

    @nn.compact
    def __call__(self, states):
        return [dense(self.cfg, self.width, ("embed", None), f"pair_{i}")(x)
                for i, x in enumerate(states)]


def soft_kl(student_logits, teacher_logits, temperature: float):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) over the last axis, float32."""
    t = teacher_logits.astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    log_p_teacher = jax.nn.log_softmax(t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - jax.nn.log_softmax(s, axis=-1)),
                 axis=-1)
    return temperature ** 2 * kl


def token_factors(segment_ids, example_weights):
    """[batch, len] weight of each token in the hidden-state loss: its example's weight over its
    example's token count (so an example's tokens add up to its mean). `example_weights` is
    [batch] (one example per row) or [batch, slots] (segment s + 1 in slot s)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    tokens = jnp.sum(same, axis=-1).astype(jnp.float32)
    if example_weights.ndim == 1:
        weight = jnp.broadcast_to(example_weights[:, None], segment_ids.shape)
    else:
        slot = jnp.clip(segment_ids - 1, 0, example_weights.shape[1] - 1)
        weight = jnp.take_along_axis(example_weights, slot, axis=1)
    return jnp.where(segment_ids != 0, weight / tokens, 0.0)


class DistillTask(Task):
    """`student` (a ClassifyTask or MaskedLM) learning from `teacher`, a model of the same
    kind (Classifier or LanguageModel) over the same tokenizer; its weights are loaded into
    model_state["teacher"] by the job (jobs/distill.py)."""
    constant_state = (TEACHER,)

    def __init__(self, student: Task, teacher: nn.Module, spec: DistillSpec,
                 student_cfg: ModelConfig, teacher_cfg: ModelConfig,
                 vocab_size: int | None = None):
        """`vocab_size`: the tokenizer's (masked LM): the models' vocabularies may be padded
        past it each their own way, and only the tokenizer's ids are compared."""
        if not isinstance(student, (ClassifyTask, MaskedLM)):
            raise TypeError(f"distillation trains classification or mlm students, not "
                            f"{student.name}")
        self.student, self.teacher, self.spec = student, teacher, spec
        self.vocab_size = vocab_size
        self.name, self.labels, self.model = student.name, student.labels, student.model
        self.shown = student.shown + ("kd_loss",)
        self.student_layers, self.teacher_layers = student_cfg.num_layers, teacher_cfg.num_layers
        self.projections = Projections(student_cfg, len(spec.hidden_layers),
                                       teacher_cfg.hidden_size) if spec.hidden_layers else None

    @property
    def eval_shown(self):
        return self.student.eval_shown + ("kd_loss",)

    @property
    def default_metric(self) -> str:
        return self.student.default_metric

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        return self.student.example_batch(batch_size, seq_len)

    def init_variables(self, rng, batch: dict) -> dict:
        variables = dict(self.student.init_variables(rng, batch))
        teacher = self.teacher.init({"params": jax.random.fold_in(rng, 1)},
                                    *self.student.model_inputs(batch), train=False)
        variables[TEACHER] = teacher["params"]
        if self.projections is not None:
            width = self.model.cfg.hidden_size
            states = [jnp.zeros((1, 1, width), jnp.float32)] * len(self.spec.hidden_layers)
            variables["params"] = {**variables["params"], PROJECTIONS: self.projections.init(
                jax.random.fold_in(rng, 2), states)["params"]}
        return variables

    @staticmethod
    def split(params, model_state):
        """(the student's params, the student's model_state, the projections' params, the
        teacher's params)."""
        student = {k: v for k, v in params.items() if k != PROJECTIONS}
        state = {k: v for k, v in model_state.items() if k != TEACHER}
        return student, state, params.get(PROJECTIONS), model_state[TEACHER]

    def _apply(self, model, variables, args, kwargs, train, rngs, method=None):
        """(output, new mutable collections, hidden states or None)."""
        want_hidden = self.projections is not None
        mutable = [k for k in variables if k != "params"] if train else []
        mutable += ["intermediates"] if want_hidden else []
        if not mutable:
            return model.apply(variables, *args, train=train, rngs=rngs, method=method,
                               **kwargs), {}, None
        out, updates = model.apply(variables, *args, train=train, rngs=rngs, method=method,
                                   mutable=mutable, **kwargs)
        inter = updates.pop("intermediates", None)
        layers = self.teacher_layers if model is self.teacher else self.student_layers
        return out, updates, (hidden_states(inter, layers) if want_hidden else None)

    def sums(self, params, model_state, batch, example_ids, key, *, train, rngs=None):
        student, state, projections, teacher = self.split(params, model_state)
        if isinstance(self.student, MaskedLM):
            outputs = self._masked_lm(student, state, teacher, batch, example_ids, key,
                                      train, rngs)
        else:
            outputs = self._classify(student, state, teacher, batch, train, rngs)
        s_logits, t_logits, label_sums, weights, s_hidden, t_hidden, factors, state = outputs
        t_logits = jax.lax.stop_gradient(t_logits)
        kd_sum = jnp.sum(soft_kl(s_logits, t_logits, self.spec.temperature) * weights)
        alpha = self.spec.alpha
        loss = alpha * label_sums["loss_sum"] + (1 - alpha) * kd_sum
        sums = {**label_sums, "label_loss_sum": label_sums["loss_sum"], "kd_sum": kd_sum}
        if self.projections is not None:
            projected = self.projections.apply({"params": projections}, [
                s_hidden[s] for s, _ in self.spec.hidden_layers])
            hidden_sum = 0.0
            for x, (_, t) in zip(projected, self.spec.hidden_layers):
                target = jax.lax.stop_gradient(t_hidden[t]).astype(jnp.float32)
                error = jnp.mean((x.astype(jnp.float32) - target) ** 2, axis=-1)
                hidden_sum = hidden_sum + jnp.sum(error * factors)
            sums["hidden_sum"] = hidden_sum
            loss = loss + self.spec.hidden_weight * hidden_sum
        sums["loss_sum"] = loss
        return sums, {**state, TEACHER: teacher}

    def _classify(self, student, state, teacher, batch, train, rngs):
        weights, labels = batch["weight"], batch["label"]
        slots = weights.shape[1] if weights.ndim == 2 else None
        args = self.student.model_inputs(batch)
        s_logits, updates, s_hidden = self._apply(
            self.model, {"params": student, **state}, args, {"slots": slots}, train, rngs)
        t_logits, _, t_hidden = self._apply(self.teacher, {"params": teacher}, args,
                                            {"slots": slots}, False, None)
        factors = None if s_hidden is None else token_factors(batch["segment_ids"], weights)
        if slots is not None:
            s_logits = s_logits.reshape(-1, s_logits.shape[-1])
            t_logits = t_logits.reshape(-1, t_logits.shape[-1])
            weights, labels = weights.reshape(-1), labels.reshape(-1)
        label_sums = metrics.classification_sums(s_logits, labels, weights,
                                                 self.labels.num_outputs)
        return (s_logits, t_logits, label_sums, weights, s_hidden, t_hidden, factors,
                {**state, **updates})

    def _masked_lm(self, student, state, teacher, batch, example_ids, key, train, rngs):
        """BERT masking as MaskedLM does (the same positions for teacher and student); both
        models' logits at the masked slots, over the whole vocabulary (the soft targets need
        all of it: no chunking here)."""
        tokens, spec = batch["tokens"], self.student.spec
        valid = batch["segment_ids"] != 0
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_ids)
        slots = spec.num_slots(tokens.shape[1])
        inputs, positions, targets, weights = jax.vmap(
            lambda k, t, v: mask_positions(k, t, spec, slots, v))(keys, tokens, valid)
        args = (inputs, batch["segment_ids"], batch.get("positions"), None, positions)
        s_feats, updates, s_hidden = self._apply(self.model, {"params": student, **state},
                                                 args, {}, train, rngs, self.model.features)
        s_logits = self.model.apply({"params": student}, s_feats, method=self.model.logits)
        t_feats, _, t_hidden = self._apply(self.teacher, {"params": teacher}, args, {}, False,
                                           None, self.teacher.features)
        t_logits = self.teacher.apply({"params": teacher}, t_feats, method=self.teacher.logits)
        label_sums = logit_sums(s_logits, targets, weights)
        s_logits, t_logits = s_logits[..., :self.vocab_size], t_logits[..., :self.vocab_size]
        factors = None
        if s_hidden is not None:  # each row's masked count spread over its tokens
            row = jnp.sum(weights, axis=1)
            factors = jnp.where(valid, (row / jnp.maximum(jnp.sum(valid, axis=1), 1))[:, None],
                                0.0)
        return (s_logits, t_logits, label_sums, weights, s_hidden, t_hidden, factors,
                {**state, **updates})

    def metrics(self, sums) -> dict:
        out = self.student.metrics(sums)
        count = max(float(sums["count"]), 1.0)
        out["label_loss"] = float(sums["label_loss_sum"]) / count
        out["kd_loss"] = float(sums["kd_sum"]) / count
        if "hidden_sum" in sums:
            out["hidden_loss"] = float(sums["hidden_sum"]) / count
        return out

    def predict(self, params, model_state, batch):
        student, state, _, _ = self.split(params, model_state)
        return self.student.predict(student, state, batch)
