"""The evaluation pass, and the one loop that runs a split through the model: every example
once, in order, in padded batches (data/batching.py), prefetched, with a progress bar, its
outputs gathered across hosts. Evaluation sums a task's batches into metrics; a task that
scores a split as a whole (retrieval, zero-shot) gets the model's outputs instead; prediction
and embedding read the same outputs."""
from __future__ import annotations

from typing import Iterable, Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from ptft_jax.core.mesh import gather_rows
from ptft_jax.data.loader import prefetch
from ptft_jax.tasks.base import add_sums
from ptft_jax.train.engine import Engine


def split_batches(engine: Engine, examples, batch_size: int, progress: bool = False,
                  desc: str = "eval") -> Iterator[dict]:
    """Every padded batch of `examples`, placed on the devices (this process's rows)."""
    rows = engine.rows_of(batch_size)
    batches: Iterable = prefetch((engine.to_device(b, batch_size)
                                  for b in examples.batches(batch_size, rows)), 2)
    if progress:
        batches = tqdm(batches, total=examples.num_batches(batch_size), desc=desc,
                       unit="batch", leave=False, dynamic_ncols=True)
    yield from batches


def predict_outputs(engine: Engine, state, examples, batch_size: int, progress: bool = False,
                    desc: str = "predict"):
    """Every example's predict outputs (an array, or a dict of them), in order, as host arrays
    (the padding of the last batch dropped; on multi-host, every process's rows)."""
    parts = [gather_rows(engine.step_fn.predict(state, batch))
             for batch in split_batches(engine, examples, batch_size, progress, desc)]
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:len(examples)], *parts)


def evaluate(engine: Engine, state, examples, batch_size: int, progress: bool = False) -> dict:
    """The task's metrics over the whole split: one finite pass, every example once, the last
    partial batch padded with rows of weight 0 (counted nowhere)."""
    task = engine.task
    if task.scores_split:
        outputs = predict_outputs(engine, state, examples, batch_size, progress, "eval")
        extra = {name: predict_outputs(engine, state, inputs, batch_size)
                 for name, inputs in task.split_inputs(examples).items()}
        return task.score_split(outputs, examples, extra)
    total = None
    for batch in split_batches(engine, examples, batch_size, progress, "eval"):
        total = add_sums(total, jax.device_get(engine.step_fn.evaluate(state, batch)))
    return task.metrics(total)
