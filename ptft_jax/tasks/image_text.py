"""What the two image-text tasks share (contrastive.py, fused.py): batches of pairs (uint8
images, token rows, a `weight`), the model's inputs, and applying the model with the images
augmented on device while training (crop, flip; mixing two images would break their
pairing)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ptft_jax.config.schema import AugmentConfig, ModelConfig
from ptft_jax.data.augment import augment, normalize
from ptft_jax.tasks.base import Task, apply_model


class ImageTextTask(Task):
    image_cfg: ModelConfig
    aug: AugmentConfig
    labelled = False  # whether batches carry a `label`

    def example_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        s, c = self.image_cfg.image_size, self.image_cfg.channels
        zeros = np.zeros((batch_size, seq_len), np.int32)
        batch = {"image": np.zeros((batch_size, s, s, c), np.uint8), "tokens": zeros,
                 "segment_ids": zeros + 1, "positions": zeros, "type_ids": zeros,
                 "weight": np.ones(batch_size, np.float32)}
        if self.labelled:
            batch["label"] = np.zeros(batch_size, np.int32)
        return batch

    def model_inputs(self, batch: dict) -> tuple:
        return (normalize(batch["image"], self.aug), batch["tokens"], batch["segment_ids"],
                batch["positions"], batch["type_ids"])

    def apply(self, params, model_state, batch, example_ids, key, train: bool, rngs=None):
        """(model outputs, new model_state); training augments the images, keyed per
        example."""
        inputs = self.model_inputs(batch)
        if train:
            with jax.named_scope("augment"):
                dummy = jnp.zeros((batch["image"].shape[0], 1), jnp.float32)
                images, _ = augment(batch["image"], dummy, key, example_ids, self.aug)
            inputs = (images, *inputs[1:])
        return apply_model(self.model, params, model_state, *inputs, train=train, rngs=rngs)
