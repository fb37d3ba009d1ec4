"""The evaluation pass: a task's metrics over a whole split, every example once."""
from __future__ import annotations

import jax

from ptft_jax.data.loader import prefetch
from ptft_jax.tasks.base import add_sums
from ptft_jax.train.engine import Engine


def evaluate(engine: Engine, state, examples, batch_size: int, progress: bool = False) -> dict:
    """The task's metrics over the whole split: one finite pass, every example once, the last
    partial batch padded with rows of weight 0 (counted nowhere). A task that scores the
    split as a whole (retrieval, zero-shot) has its own `evaluate_split`."""
    if hasattr(engine.task, "evaluate_split"):
        return engine.task.evaluate_split(engine, state, examples, batch_size, progress)
    rows = engine.rows_of(batch_size)
    batches = prefetch((engine.to_device(b, batch_size)
                        for b in examples.batches(batch_size, rows)), 2)
    total = None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=examples.num_batches(batch_size), desc="eval", unit="batch",
                   leave=False, dynamic_ncols=True)
    for batch in batches:
        total = add_sums(total, jax.device_get(engine.step_fn.evaluate(state, batch)))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return engine.task.metrics(total)
