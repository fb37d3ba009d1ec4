"""What the loop needs from a job: every kind of job (jobs/) prepares its data, tokenizer and
task and hands the loop one of these."""
from __future__ import annotations

import dataclasses
from typing import Callable

from ptft_jax.config.schema import Config


@dataclasses.dataclass
class Job:
    cfg: Config  # with model.vocab_size resolved from the tokenizer
    task: object
    train_rows: object  # anything with len() and rows(index) -> dict of arrays
    describe: str  # one line for the log
    meta: dict  # what checkpoints record beside the config
    save_files: Callable[[], None]  # writes the tokenizer (and labels) into the run directory
    eval_examples: object = None  # data.labelled.Examples of the eval split, or None
    init_from: Callable | None = None  # (engine, state) -> state with pretrained params
    tokens_per_row: int = 0
    # Training FLOPs of one row when every parameter trains (MFU); None: the loop derives them
    # from the model (language models per token, image models per image).
    flops_per_row: float | None = None
