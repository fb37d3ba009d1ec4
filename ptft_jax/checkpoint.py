"""Orbax checkpoints: params, optimizer state and metadata saved as separate items.

- `params` can be restored alone (finetuning starts from pretrained weights only).
- Restores go into targets that carry shardings, so a checkpoint written on one mesh or device
  count restores onto any other.
- Shapes are compared against the checkpoint's metadata first; a mismatch raises an error
  naming the parameter paths, before anything is read.
- Saves are asynchronous; an interrupted save never becomes the latest step (Orbax commits a
  step directory atomically), so a crash cannot corrupt the run directory.
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from ptft_jax.params import flatten
from ptft_jax.state import TrainState

ITEMS = ("params", "opt_state", "meta")


class CheckpointMismatch(ValueError):
    """The checkpoint's parameters do not fit the model being restored into."""


class Checkpointer:
    def __init__(self, directory: str | Path, every: int = 0, keep: int = 3,
                 async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every if every > 0 else 1,
            enable_async_checkpointing=async_save, create=True)
        self.every = every
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"params": ocp.StandardCheckpointHandler(),
                           "opt_state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: TrainState, meta: dict) -> None:
        """Starts an (async) save of `state` as step `step`; `meta` must be JSON-serialisable."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave({**meta, "step": step})), force=True)

    def check_shapes(self, step: int, abstract_params) -> None:
        """Raises CheckpointMismatch listing every parameter whose path or shape differs."""
        stored = self.manager.item_metadata(step)["params"]
        stored = {p: tuple(m.shape) for p, m in flatten(stored.tree).items()}
        wanted = {p: tuple(a.shape) for p, a in flatten(abstract_params).items()}
        problems = []
        for path in sorted(set(stored) | set(wanted)):
            if path not in stored:
                problems.append(f"  {path}: in the model {wanted[path]}, not in the checkpoint")
            elif path not in wanted:
                problems.append(f"  {path}: in the checkpoint {stored[path]}, not in the model")
            elif stored[path] != wanted[path]:
                problems.append(f"  {path}: checkpoint {stored[path]} vs model {wanted[path]}")
        if problems:
            shown = "\n".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
            hint = "Check the model config (preset, sizes, scan_layers) against the run that " \
                   "wrote it."
            stored_scanned = any("/layers/" in p for p in stored)
            if stored_scanned != any("/layers/" in p for p in wanted):
                hint = (f"The checkpoint was written with model.scan_layers="
                        f"{str(stored_scanned).lower()} and the model has the other layout; set "
                        f"model.scan_layers={str(stored_scanned).lower()}.")
            raise CheckpointMismatch(
                f"The checkpoint at {self.directory / str(step)} does not fit the model "
                f"({len(problems)} parameter(s) differ):\n{shown}\n{hint}")

    def restore(self, step: int, target: TrainState, params_only: bool = False):
        """Restores into `target` (ShapeDtypeStructs with shardings). Returns (state, meta);
        with `params_only`, the state's step and optimizer state are taken from `target`."""
        self.check_shapes(step, target.params)
        args = {"params": ocp.args.StandardRestore(target.params),
                "meta": ocp.args.JsonRestore()}
        if not params_only:
            args["opt_state"] = ocp.args.StandardRestore(target.opt_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        meta = restored["meta"]
        if params_only:
            return target.replace(params=restored["params"]), meta
        step_array = jax.device_put(np.int32(meta["step"]), target.step.sharding)
        state = TrainState(step=step_array, params=restored["params"],
                           opt_state=restored["opt_state"])
        return state, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
