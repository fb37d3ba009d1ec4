"""Classification of image-text pairs by a fused model: an image tower and a text tower whose
outputs meet in fusion layers under a head (models/multimodal.py). Every finetuning strategy
applies to it: per tower through regexes on `image/` and `text/`, layer-wise rules on each
tower's own depth, and the fusion layers train with the head.

Batches are pairs (data/pairs.py): uint8 images, token rows, the label and a `weight` (0 for
the rows padding the last eval batch). Training augments the images on device (crop, flip;
mixing two images would break their pairing); metrics are those of text classification.
"""
from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer

from ptft_jax.config.schema import AugmentConfig, ModelConfig
from ptft_jax.data.labelled import LabelSpace
from ptft_jax.models.multimodal import FusionClassifier
from ptft_jax.tasks import metrics
from ptft_jax.tasks.base import ClassNamesTask
from ptft_jax.tasks.image_text import ImageTextTask


class FusedClassifyTask(ImageTextTask, ClassNamesTask):
    name = "multimodal_classification"
    shown = ("loss", "accuracy", "macro_f1")
    labelled = True

    def __init__(self, cfg: ModelConfig, image_cfg: ModelConfig, text_cfg: ModelConfig,
                 labels: LabelSpace | Sequence[str], text_pooling: str, aug: AugmentConfig,
                 tokenizer: Tokenizer | None = None, bn_axis_name: str | None = None):
        """`labels`: the label space, or bare class names."""
        self.image_cfg, self.aug, self.tokenizer = image_cfg, aug, tokenizer
        if isinstance(labels, LabelSpace):
            self.labels = labels
        self.class_names = tuple(labels.names if isinstance(labels, LabelSpace) else labels)
        self.num_classes = len(self.class_names)
        self.model = FusionClassifier(cfg, image_cfg, text_cfg, self.num_classes, text_pooling,
                                      bn_axis_name)

    def sums(self, params, model_state, batch, example_ids, key, *, train, rngs=None):
        logits, model_state = self.apply(params, model_state, batch, example_ids, key, train,
                                         rngs)
        return metrics.classification_sums(logits, batch["label"], batch["weight"],
                                              self.num_classes), model_state
