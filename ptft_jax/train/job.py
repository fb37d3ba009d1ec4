"""What the loop needs from a job: every kind of job (jobs/) prepares its data, tokenizer and
task and hands the loop one of these. The loop knows no task family: what it logs as
throughput and MFU, the job says (Throughput)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal

from ptft_jax.config.schema import Config
from ptft_jax.tasks.base import Task


@dataclasses.dataclass(frozen=True)
class Throughput:
    """How a job's work is counted: the unit its throughput is logged in, how many units a
    row holds, and (for MFU) the training FLOPs of one unit when every parameter trains."""
    unit: Literal["tokens", "examples"]  # an image or an image-text pair is one example
    units_per_row: int
    flops_per_unit: float
    size: str  # the model's size for the log's first line ("4.39M matmul params")


@dataclasses.dataclass
class Job:
    cfg: Config  # with model.vocab_size resolved from the tokenizer
    task: Task
    train_rows: object  # anything with len() and rows(index) -> dict of arrays
    describe: Callable[[], str]  # one line for the log
    meta: dict  # what checkpoints record beside the config
    save_files: Callable[[], None]  # writes the tokenizer (and labels) into the run directory
    throughput: Throughput
    eval_examples: object = None  # the eval split's examples (with rows()), or None
    init_from: Callable | None = None  # (engine, state) -> (state, report) with pretrained params
    # What config.yaml records when it is not `cfg`: packed finetuning steps on rows, while
    # the user's config counts its batches in examples (jobs/labelled.py).
    written_cfg: Config | None = None
