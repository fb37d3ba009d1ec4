"""A deterministic, stateless batch loader: the batch for step s is a pure function of
(seed, s), so resuming at step s yields exactly the batches an uninterrupted run would."""
from __future__ import annotations

import queue
import threading
from functools import lru_cache

import numpy as np


class BatchLoader:
    """Serves this process's rows of each global batch from `source` (anything with `len()`
    and `rows(index) -> dict of arrays`, e.g. a Packer), shuffled anew each epoch from `seed`.

    The batch for step s is a pure function of (seed, s): resuming at step s yields exactly the
    batches an uninterrupted run would, and processes holding different `rows` slices together
    read every row of an epoch exactly once."""

    def __init__(self, source, global_batch: int, seed: int, rows: slice):
        self.source = source
        self.global_batch = global_batch
        self.seed = seed
        self.rows = rows
        self._permutation = lru_cache(maxsize=2)(self._permutation_uncached)

    def _permutation_uncached(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.source))

    def indices(self, step: int) -> np.ndarray:
        """Row indices of this process's share of the global batch for `step`."""
        n = len(self.source)
        positions = step * self.global_batch + np.arange(self.rows.start, self.rows.stop)
        epochs, offsets = np.divmod(positions, n)
        out = np.empty(len(positions), np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            out[here] = self._permutation(int(epoch))[offsets[here]]
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return self.source.rows(self.indices(step))

    def position(self, step: int) -> dict:
        """What a checkpoint records about the data stream (resuming needs only the step)."""
        samples = step * self.global_batch
        return {"seed": self.seed, "step": step, "samples_seen": samples,
                "epoch": samples // len(self.source), "rows_per_epoch": len(self.source)}


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
