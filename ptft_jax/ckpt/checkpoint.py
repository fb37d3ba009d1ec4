"""Orbax checkpoints: params, optimizer state, model state and metadata as separate items.

- `params` can be restored alone, and a component's subtree restores into any model that
  holds it (pretrained.py: finetuning starts from a pretrained encoder).
- The best checkpoint by an eval metric is kept apart from the latest ones (`BestCheckpointer`,
  on Orbax's own best tracking), so early stopping and keep-N never lose it.
- Restores go into targets that carry shardings, so a checkpoint written on one mesh or device
  count restores onto any other.
- Shapes are compared against the checkpoint's metadata first; a mismatch raises an error
  naming the parameter paths, before anything is read.
- Saves are asynchronous; an interrupted save never becomes the latest step (Orbax commits a
  step directory atomically), so a crash cannot corrupt the run directory.
- Every array's checksum goes into the step's metadata and is verified at restore
  (integrity.py); a step that is missing items, cannot be read or fails its checksums raises
  CheckpointDamaged, and the loop falls back to the newest intact step.
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from ptft_jax.ckpt import integrity
from ptft_jax.ckpt.integrity import CheckpointDamaged
from ptft_jax.core.params import TRAINING_ONLY, flatten
from ptft_jax.core.state import TrainState

ITEMS = ("params", "opt_state", "model_state", "meta")


def _handlers(*items):
    handlers = {"params": ocp.StandardCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(),
                "model_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return {k: handlers[k] for k in items}


def _has_leaves(tree) -> bool:
    return bool(jax.tree.leaves(tree))


class CheckpointMismatch(ValueError):
    """The checkpoint's parameters do not fit the model being restored into."""


class CheckpointSaveFailed(RuntimeError):
    """A save that failed (disk full, permissions): the run stops, earlier steps are intact."""

    def __init__(self, directory: Path, step: int, error: Exception):
        steps = committed_steps(directory)
        super().__init__(
            f"saving checkpoint step {step} into {directory} failed "
            f"({integrity.short_error(error)}). Training stopped; the earlier checkpoints are "
            f"intact (" + (f"newest: step {steps[-1]}" if steps else "none had been saved")
            + "). Free disk space or fix the folder's permissions, then run the same command "
              "to resume.")
        self.step = step


def committed_steps(directory: Path) -> list[int]:
    """Step folders on disk (an interrupted or failed save is a '*.orbax-checkpoint-tmp*'
    folder, never a step)."""
    return sorted(int(p.name) for p in integrity.step_folders(Path(directory)))


class Checkpointer:
    def __init__(self, directory: str | Path, every: int = 0, keep: int = 3,
                 async_save: bool = True, read_only: bool = False):
        integrity.quiet_orbax_once()
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every if every > 0 else 1,
            # The folder is made at the first save, so that a run refused by a later check
            # leaves nothing behind.
            enable_async_checkpointing=async_save, create=False,
            # What a kill or a failed save left half-written is removed at the next start;
            # a reader (inference) leaves the folder alone: a run may still be saving into it.
            # (Orbax's own read_only option warns on every open: not used.)
            cleanup_tmp_directories=not read_only)
        self.every = every
        self.saving: int | None = None  # the step whose (async) save may still be running
        # What the cleanup below removes, for the log: a run whose only save was interrupted
        # starts again at step 0 and says why.
        self.interrupted_saves = sorted(
            int(p.name.split(".")[0]) for p in self.directory.glob("*.orbax-checkpoint-tmp*")
            if p.name.split(".")[0].isdigit()) if not read_only else []
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers=_handlers(*ITEMS))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def move_aside(self, step: int, fault: str) -> Path:
        """Moves a damaged step out of the manager's folder (process 0; every process then
        sees the new listing). It is kept, and no longer counts towards keep-N."""
        if jax.process_index() == 0:
            target = integrity.move_aside(self.step_dir(step), fault)
        else:
            target = self.directory.parent / integrity.DAMAGED_DIR / str(step)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"ptft moved aside step {step}")
        self.manager.reload()
        return target

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: TrainState, meta: dict) -> None:
        """Starts an (async) save of `state` as step `step`; `meta` must be JSON-serialisable.
        An empty model state (no mutable collections) is not written, nor a None optimizer
        state (a params-only checkpoint, restored with `params_only`)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        arrays = {"params": state.params}
        if state.opt_state is not None:  # None: a params-only checkpoint (an export)
            arrays["opt_state"] = state.opt_state
        if _has_leaves(state.model_state):
            arrays["model_state"] = state.model_state
        sums = integrity.save_checksums(arrays, step)  # StateNotFinite: nothing written
        items = {item: ocp.args.StandardSave(tree) for item, tree in arrays.items()}
        items["meta"] = ocp.args.JsonSave({**meta, "step": step, "checksums": sums})
        self.wait()  # the previous save's failure is reported as that step's
        self.saving = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            raise CheckpointSaveFailed(self.directory, step, e) from e

    def read_meta(self, step: int) -> dict:
        """A step's metadata alone (what the loop needs to know before building a model).
        Raises CheckpointDamaged when it cannot be read."""
        return integrity.read_meta_file(self.step_dir(step))

    def _stored_tree(self, step: int, item: str):
        """The item's tree of array metadata (shapes), read from its _METADATA file."""
        integrity.check_item_files(self.step_dir(step), item)
        try:
            with integrity.quiet_orbax():
                return self.manager.item_metadata(step)[item].tree
        except Exception as e:  # any failure to read metadata written at save is damage
            raise CheckpointDamaged(self.step_dir(step), f"{item} metadata cannot be read "
                                          f"({integrity.short_error(e)})") from None

    @staticmethod
    def _training_only(stored, abstract_params) -> dict:
        """Targets (replicated like the params' first leaf) for the TRAINING_ONLY subtrees of
        the `stored` params metadata that `abstract_params` does not hold."""
        extra = [k for k in TRAINING_ONLY if k in stored and k not in abstract_params]
        if not extra:
            return {}
        replicated = jax.tree.leaves(abstract_params)[0].sharding
        if isinstance(replicated, jax.sharding.NamedSharding):
            replicated = jax.sharding.NamedSharding(replicated.mesh,
                                                    jax.sharding.PartitionSpec())
        return {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                               sharding=replicated), stored[k])
                for k in extra}

    def check_shapes(self, step: int, abstract_params, stored=None) -> None:
        """Raises CheckpointMismatch listing every parameter whose path or shape differs.
        `stored`: the step's params metadata, if already read."""
        stored = self._stored_tree(step, "params") if stored is None else stored
        stored = {p: tuple(m.shape) for p, m in flatten(stored).items()}
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

    def check_opt_state(self, step: int, abstract_opt_state) -> None:
        """Raises CheckpointMismatch naming the optimizer-state arrays that differ: the
        optimizer's structure changed (optim.* or the finetuning strategy)."""
        stored = {p: tuple(m.shape) for p, m in
                  flatten(self._stored_tree(step, "opt_state")).items()}
        wanted = {p: tuple(a.shape) for p, a in flatten(abstract_opt_state).items()}
        if stored != wanted:
            differ = sorted(p for p in set(stored) | set(wanted)
                            if stored.get(p) != wanted.get(p))
            raise CheckpointMismatch(
                f"The optimizer state at {self.step_dir(step)} has another structure than "
                f"this config's optimizer ({len(differ)} array(s) differ, e.g. opt_state/"
                f"{differ[0]}): optim.* settings that shape it (clip_norm on/off, weight "
                f"decay rules, the optimizer) or the finetuning strategy changed. Restore them "
                f"to resume, or use a new run_dir.")

    def restore(self, step: int, target: TrainState, params_only: bool = False):
        """Restores into `target` (ShapeDtypeStructs with shardings) and verifies every
        array's checksum. Returns (state, meta); with `params_only`, the state's step and
        optimizer state are taken from `target`, and the checkpoint's training-only params
        (core/params.TRAINING_ONLY) that `target` lacks are read (checksums) and dropped.
        Raises CheckpointMismatch for a checkpoint that does not fit the config,
        CheckpointDamaged for one that is damaged."""
        meta = self.read_meta(step)
        stored, wanted = self._stored_tree(step, "params"), target.params
        if params_only:
            wanted = {**self._training_only(stored, target.params), **target.params}
        self.check_shapes(step, wanted, stored)
        args = {"params": ocp.args.StandardRestore(wanted)}
        if _has_leaves(target.model_state):
            self._stored_tree(step, "model_state")
            args["model_state"] = ocp.args.StandardRestore(target.model_state)
        if not params_only:
            self.check_opt_state(step, target.opt_state)
            args["opt_state"] = ocp.args.StandardRestore(target.opt_state)
        restored = _restore_verified(self.manager, step, self.step_dir(step), meta, args)
        model_state = restored["model_state"] if "model_state" in args else \
            target.model_state
        if params_only:
            params = {k: v for k, v in restored["params"].items() if k in target.params}
            return target.replace(params=params, model_state=model_state), meta
        step_array = jax.device_put(np.int32(meta["step"]), target.step.sharding)
        state = TrainState(step=step_array, params=restored["params"],
                           opt_state=restored["opt_state"], model_state=model_state)
        return state, meta

    def wait(self) -> None:
        """Waits for the running save; raises CheckpointSaveFailed if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointSaveFailed(self.directory, self.saving, e) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # a failed save was just reported by wait(); it re-raises here
                pass


class BestCheckpointer:
    """The best checkpoint by an eval metric (params, model state and metadata; no optimizer
    state), in a folder of its own, on Orbax's best-checkpoint tracking (keeps one)."""

    def __init__(self, directory: str | Path, metric: str, mode: str):
        self.directory = Path(directory).absolute()
        self.metric = metric
        options = ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics[metric], best_mode=mode,
            keep_checkpoints_without_metrics=False, create=False,
            enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=_handlers("params", "model_state",
                                                                     "meta"))

    def save(self, step: int, state: TrainState, meta: dict, metrics: dict) -> None:
        if step in self.manager.all_steps():
            return  # a resumed run replaying the steps after its checkpoint: the same state
        self.directory.mkdir(parents=True, exist_ok=True)
        arrays = {"params": state.params}
        if _has_leaves(state.model_state):
            arrays["model_state"] = state.model_state
        sums = integrity.save_checksums(arrays, step)  # StateNotFinite: nothing written
        items = {item: ocp.args.StandardSave(tree) for item, tree in arrays.items()}
        items["meta"] = ocp.args.JsonSave({
            **meta, "step": step, "metrics": _json_safe(metrics), "checksums": sums})
        try:
            self.manager.save(step, args=ocp.args.Composite(**items),
                              metrics={self.metric: float(metrics[self.metric])}, force=True)
        except Exception as e:
            raise CheckpointSaveFailed(self.directory, step, e) from e

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def restore(self, step: int, target: TrainState):
        step_dir = self.directory / str(step)
        meta = integrity.read_meta_file(step_dir)
        args = {"params": ocp.args.StandardRestore(target.params)}
        if _has_leaves(target.model_state):
            args["model_state"] = ocp.args.StandardRestore(target.model_state)
        restored = _restore_verified(self.manager, step, step_dir, meta, args)
        state = target.replace(params=restored["params"],
                               model_state=restored.get("model_state", target.model_state))
        return state, meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _restore_verified(manager, step: int, step_dir: Path, meta: dict, args: dict) -> dict:
    """The items `args` names, read by Orbax and checked against the step's checksums."""
    try:
        with integrity.quiet_orbax():
            restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # shapes and leaf paths were checked: a failed read is damage ...
        cause = integrity.short_error(e)
        if "structure" in cause:  # ... unless Orbax says the trees differ: the config's fault
            raise CheckpointMismatch(f"The checkpoint at {step_dir} has another tree structure "
                                     f"than this config's state ({cause}). Restore the settings "
                                     f"it was written with, or use a new run_dir.") from None
        raise CheckpointDamaged(step_dir, f"its arrays cannot be read ({cause})") from None
    sums = meta.get("checksums")
    for item in args:
        fault = integrity.compare(sums.get(item) if sums is not None else None,
                                  restored[item], item)
        if fault:
            raise CheckpointDamaged(step_dir, fault)
    return restored


def _json_safe(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, list))}
