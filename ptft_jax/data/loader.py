"""A deterministic, stateless batch loader: the batch for step s is a pure function of
(seed, s), so resuming at step s yields exactly the batches an uninterrupted run would."""
from __future__ import annotations

import queue
import threading
from functools import lru_cache

import numpy as np


class BatchLoader:
    """Shuffles `examples` [N, len] anew each epoch from `seed`; serves the `rows` slice of each
    global batch (this process's share on multi-host)."""

    def __init__(self, examples: np.ndarray, global_batch: int, seed: int, rows: slice):
        self.examples = examples
        self.global_batch = global_batch
        self.seed = seed
        self.rows = rows
        self._permutation = lru_cache(maxsize=2)(self._permutation_uncached)

    def _permutation_uncached(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def indices(self, step: int) -> np.ndarray:
        """Example indices of this process's rows of the global batch for `step`."""
        n = len(self.examples)
        positions = step * self.global_batch + np.arange(self.rows.start, self.rows.stop)
        epochs, offsets = np.divmod(positions, n)
        return np.array([self._permutation(int(e))[o] for e, o in zip(epochs, offsets)])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return {"tokens": self.examples[self.indices(step)]}

    def position(self, step: int) -> dict:
        """What a checkpoint records to resume the data stream exactly."""
        return {"seed": self.seed, "step": step, "samples_seen": step * self.global_batch,
                "epoch": step * self.global_batch // len(self.examples)}


def prefetch(iterator, size: int = 2):
    """Runs `iterator` (host batches -> device arrays) in a background thread, `size` ahead, so
    the next batch is on the devices when a step ends."""
    q: queue.Queue = queue.Queue(maxsize=size)
    sentinel = object()

    def worker():
        try:
            for item in iterator:
                q.put(item)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)
        q.put(sentinel)

    threading.Thread(target=worker, daemon=True).start()
    while True:
        item = q.get()
        if item is sentinel:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
