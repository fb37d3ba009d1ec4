"""Every example of a split once, in order, in padded batches: how evaluation and prediction
read labelled texts, images and image-text pairs alike (train/evaluate.py)."""
from __future__ import annotations

from typing import Iterator

import numpy as np


class PaddedBatches:
    """For an example set with `__len__` and `rows(index) -> {name: array}`: batches of
    `batch_size` in order, the last one padded with weight-0 copies of example 0 (counted
    nowhere), so every batch has the one compiled shape."""

    def __len__(self) -> int:
        raise NotImplementedError

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def batches(self, batch_size: int, rows: slice | None = None) -> Iterator[dict]:
        """`rows`: this process's share of each batch (multi-host)."""
        n = len(self)
        for start in range(0, n, batch_size):
            index = np.arange(start, start + batch_size)
            real = index < n
            batch = self.rows(np.where(real, index, 0))
            weight = real.astype(np.float32)
            if "weight" in batch:  # rows of several examples (packed_examples.py) weigh each
                own = batch["weight"]
                weight = own * weight.reshape((-1,) + (1,) * (own.ndim - 1))
            batch["weight"] = weight
            if rows is not None:
                batch = {k: v[rows] for k, v in batch.items()}
            yield batch
