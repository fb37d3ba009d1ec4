"""Checkpoint integrity: per-array checksums written at save and verified at restore, damaged
steps moved aside (never deleted), and the whole-run check behind `ptft checkpoints verify`.

A checksum is two uint32 sums over an array's bits, computed on device in one jitted pass:
the plain sum (any single flipped bit changes it) and the sums of its rows weighted by odd
factors of their position (rows swapped or shifted change it). Integer sums wrap exactly, so
the result does not depend on how the array is sharded or on which mesh restores it. They sit
in the step's metadata item, which Orbax commits atomically with the arrays. The same pass
counts non-finite values: a state holding one is never saved, and one read back is damage.

The metadata is checked like any input (check_meta): the right shape, and a step number and
data position that agree with the folder (a copy of step 15 named 20 is damage, not step 20).
Resume, `ptft checkpoints verify`, eval / predict / export all go through these checks.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ptft_jax.core.files import step_folders
from ptft_jax.core.params import flatten

DAMAGED_DIR = "checkpoints_damaged"  # beside checkpoints/, out of Orbax's (and keep-N's) sight
REASON_FILE = "DAMAGED.txt"


class StateNotFinite(ValueError):
    """A state to be saved holds NaN or inf: never written (the run has diverged)."""


class CheckpointDamaged(ValueError):
    """A checkpoint step that is missing items, cannot be read, or fails its checksums."""

    def __init__(self, step_dir: Path, fault: str):
        super().__init__(f"the checkpoint {step_dir} is damaged: {fault}. `ptft checkpoints "
                         f"verify RUN_DIR` checks every step.")
        self.step_dir, self.fault = Path(step_dir), fault


def _leaf_checksum(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize >= 4:  # 8-byte values become pairs of words (a trailing axis)
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        uint = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, uint).astype(jnp.uint32)
    # One pass over the data: the sums of each row (last axis), then the rows weighted by odd
    # factors of their flat position. The positions come from iotas over the (small) row
    # shape, so no reshape (which could move a sharded array between devices) is needed.
    rows = jnp.sum(bits, axis=-1, dtype=jnp.uint32) if bits.ndim >= 2 else bits
    position = jnp.zeros(rows.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(rows.ndim)):
        position = position + jax.lax.broadcasted_iota(jnp.uint32, rows.shape, axis) * \
            np.uint32(stride % 2 ** 32)
        stride *= rows.shape[axis]
    bad = (~jnp.isfinite(x)).astype(jnp.uint32) if jnp.issubdtype(x.dtype, jnp.inexact) \
        else jnp.zeros(rows.shape, jnp.uint32)
    if bad.shape != rows.shape:  # the non-finite values counted per row, as the bits were
        bad = jnp.sum(bad, axis=-1, dtype=jnp.uint32)
    # The three sums in one reduction: one collective per sharded array, not three (many
    # collectives in flight can deadlock XLA's CPU backend on faked devices).
    weighted = rows * (position * np.uint32(2) + np.uint32(1))
    stacked = jnp.stack([rows, weighted, bad])
    return jnp.sum(stacked, axis=tuple(range(1, stacked.ndim)), dtype=jnp.uint32)


# One program for a whole tree. (One per array compiled less, but on a CPU with faked devices
# hundreds of small sharded reductions in flight at once deadlocked XLA's collectives.)
_checksum_leaves = jax.jit(lambda leaves: [_leaf_checksum(x) for x in leaves])


def scan(tree) -> tuple[dict[str, list[int]], list[str]]:
    """({'a/b/c': [sum, weighted sum]} for every array of `tree`, the paths of the arrays
    holding a NaN or inf), device or host arrays, in one program."""
    flat = flatten(tree)
    if not flat:
        return {}, []
    values = jax.device_get(_checksum_leaves(list(flat.values())))
    sums = {path: [int(a), int(b)] for path, (a, b, _) in zip(flat, values)}
    return sums, [path for path, (_, _, bad) in zip(flat, values) if bad]


def checksums(tree) -> dict[str, list[int]]:
    return scan(tree)[0]


def _shown(paths: list[str]) -> str:
    return ", ".join(paths[:3]) + (" ..." if len(paths) > 3 else "")


def save_checksums(items: dict, step: int) -> dict[str, dict]:
    """checksums() of the items about to be saved as `step` ({'params': tree, ...}), in one
    program; StateNotFinite if any array holds a NaN or inf."""
    combined, nonfinite = scan(items)
    if nonfinite:
        raise StateNotFinite(f"the state at step {step} holds non-finite values in "
                             f"{len(nonfinite)} array(s) ({_shown(nonfinite)}); it was not saved")
    out = {item: {} for item in items}
    for path, value in combined.items():
        item, _, rest = path.partition("/")
        out[item][rest] = value
    return out


def compare(expected: dict | None, tree, item: str) -> str | None:
    """None if `tree` has exactly the checksums `expected` (None: a step written before
    checksums existed) and only finite values, else the fault in a few words."""
    got, nonfinite = scan(tree)
    if expected is not None:
        missing = sorted(set(expected) - set(got))
        if missing:
            return f"{item}: {len(missing)} array(s) missing ({missing[0]} ...)"
        bad = [p for p in expected if expected[p] != got[p]]
        if bad:
            return f"checksum mismatch in {len(bad)} array(s): " + \
                _shown([f"{item}/{p}" for p in bad])
    if nonfinite:
        return f"non-finite values (NaN or inf) in {len(nonfinite)} array(s): " + \
            _shown([f"{item}/{p}" for p in nonfinite])
    return None


def move_aside(step_dir: Path, fault: str) -> Path:
    """Moves a damaged step folder to run_dir/checkpoints_damaged/ with a note of the fault;
    returns where it went. Nothing is deleted."""
    step_dir = Path(step_dir)
    root = step_dir.parent.parent / DAMAGED_DIR
    root.mkdir(parents=True, exist_ok=True)
    target, n = root / step_dir.name, 1
    while target.exists():
        n += 1
        target = root / f"{step_dir.name}.{n}"
    shutil.move(str(step_dir), str(target))
    (target / REASON_FILE).write_text(fault + "\n", encoding="utf-8")
    return target


def _step_of(step_dir: Path) -> int:
    name = Path(step_dir).name.split(".")[0]
    return int(name) if name.isdigit() else -1


def move_aside_damaged(folder: Path) -> list[tuple[int, str, Path]]:
    """Every step folder of `folder` (best/) verified on the host; the damaged ones moved
    aside. [(step, fault, where it went)]."""
    moved = []
    for step_dir in step_folders(Path(folder)):
        try:
            check_step(step_dir)
        except CheckpointDamaged as e:
            moved.append((_step_of(step_dir), e.fault, move_aside(step_dir, e.fault)))
    return moved


# ---------------------------------------------------------------------------------------------
# Reading a step from disk alone (no model): `ptft checkpoints verify`, inference, init_from

def read_item(item_dir: Path):
    """An Orbax item folder as a tree of host NumPy arrays, whatever mesh wrote it."""
    import orbax.checkpoint as ocp
    quiet_orbax_once()
    # Reading one item of a step folder, Orbax also warns that the item has no step metadata
    # (that sits one level up): expected here.
    with quiet_orbax():
        tree = ocp.PyTreeCheckpointer().metadata(Path(item_dir).absolute()).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ocp.PyTreeCheckpointer().restore(
            Path(item_dir).absolute(), args=ocp.args.PyTreeRestore(restore_args=args))


def read_meta_file(step_dir: Path) -> dict:
    """The step's metadata item (Orbax's JSON handler writes it as meta/metadata), checked
    against its folder (check_meta)."""
    path = Path(step_dir) / "meta" / "metadata"
    if not path.is_file():
        raise CheckpointDamaged(step_dir, "the meta item is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointDamaged(step_dir, f"the meta item cannot be read ({short_error(e)})")
    check_meta(step_dir, meta)
    return meta


ARRAY_ITEMS = ("params", "opt_state", "model_state")


def check_meta(step_dir: Path, meta) -> None:
    """Metadata is data: CheckpointDamaged unless it is an object whose step is the folder's,
    whose data position is that step's, and whose checksums name exactly the array items the
    folder holds, each as a table of [sum, weighted sum] pairs."""
    step_dir = Path(step_dir)

    def damaged(fault):
        raise CheckpointDamaged(step_dir, f"its metadata {fault}")
    if not isinstance(meta, dict):
        damaged(f"is a JSON {type(meta).__name__}, not an object")
    step = meta.get("step")
    if type(step) is not int or step < 0:
        damaged(f"has no valid step (step: {step!r})")
    named = _step_of(step_dir)
    if named >= 0 and step != named:
        damaged(f"is step {step}'s, in a folder named {step_dir.name} (a copied or renamed "
                f"step)")
    for key in ("config", "data", "progress", "labels"):
        if key in meta and meta[key] is not None and not isinstance(meta[key], dict):
            damaged(f"has a {key} that is not an object")
    data = meta.get("data") or {}
    if "step" in data and data["step"] != step:
        damaged(f"has a data position for step {data['step']!r}, not {step}")
    batch = ((meta.get("config") or {}).get("train") or {}).get("global_batch")
    if "samples_seen" in data and type(batch) is int and data["samples_seen"] != step * batch:
        damaged(f"has a data position of {data['samples_seen']!r} samples, not step {step} x "
                f"train.global_batch {batch}")
    sums = meta.get("checksums")
    if sums is None:
        return  # written before checksums existed
    if not isinstance(sums, dict) or not all(
            isinstance(table, dict) and all(
                isinstance(pair, list) and len(pair) == 2 and
                all(type(v) is int for v in pair) for pair in table.values())
            for table in sums.values()):
        damaged("has checksums of the wrong shape")
    held = {item for item in ARRAY_ITEMS if (step_dir / item).is_dir()}
    absent, unlisted = sorted(set(sums) - held), sorted(held - set(sums))
    if absent:
        raise CheckpointDamaged(step_dir, f"the {absent[0]} item is missing")
    if unlisted:
        damaged(f"has no checksums for the {unlisted[0]} item the folder holds")


def check_item_files(step_dir: Path, item: str) -> None:
    """The files every Orbax array item has, before Orbax is asked to read it."""
    if not (step_dir / item).is_dir():
        raise CheckpointDamaged(step_dir, f"the {item} item is missing")
    metadata = step_dir / item / "_METADATA"
    if not metadata.is_file():
        raise CheckpointDamaged(step_dir, f"{item}/_METADATA is missing")
    if metadata.stat().st_size == 0:
        raise CheckpointDamaged(step_dir, f"{item}/_METADATA is empty")
    # An OCDBT item: a manifest at its root and one in each process's folder.
    processes = sorted((step_dir / item).glob("ocdbt.process_*"))
    for folder in ([step_dir / item, *processes] if processes else []):
        if not (folder / "manifest.ocdbt").is_file():
            raise CheckpointDamaged(step_dir, f"{folder.relative_to(step_dir)}/manifest.ocdbt "
                                              f"is missing")


def check_step(step_dir: Path, items=None) -> tuple[dict, dict]:
    """Reads and verifies a step folder on the host: (meta, {item: tree}). Raises
    CheckpointDamaged naming the fault. `items` limits what is read (default: every item the
    folder holds)."""
    step_dir = Path(step_dir)
    meta = read_meta_file(step_dir)
    sums = meta.get("checksums")
    wanted = list(items or (sums.keys() if sums else
                            [i for i in ARRAY_ITEMS if i == "params" or (step_dir / i).is_dir()]))
    trees = {}
    for item in wanted:
        check_item_files(step_dir, item)
        try:
            trees[item] = read_item(step_dir / item)
        except Exception as e:  # Orbax / TensorStore: any failure to read is damage here
            raise CheckpointDamaged(step_dir, f"{item} cannot be read ({short_error(e)})") from None
        fault = compare(sums.get(item) if sums is not None else None, trees[item], item)
        if fault:
            raise CheckpointDamaged(step_dir, fault)
    return meta, trees


def short_error(error: BaseException) -> str:
    """The root cause of an exception chain in one line (Orbax wraps TensorStore's precise
    message in a vaguer one)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split())
    if len(text) > 260:  # the cause is often at the end ("... File too large")
        text = f"{text[:120]} ... {text[-130:]}"
    return f"{type(error).__name__}: {text}"


class _RepeatedSaveErrors(logging.Filter):
    """Orbax logs a failed write with a traceback from each thread it passes through before
    raising it; ptft reports the raised error itself, in one line."""
    MARKS = ("raised an exception", "Save Finalize thread", "Checkpointer failed",
             "Failed to run", "exception was never retrieved")

    def filter(self, record) -> bool:
        message = record.getMessage()
        if record.name == "asyncio" and "orbax" not in message and \
                "OCDBT" not in message:
            return True  # asyncio's own records about code that is not Orbax's
        return not (record.levelno >= logging.ERROR and
                    any(mark in message for mark in self.MARKS))


def quiet_orbax_once() -> None:
    """Installed once (by every reader and writer of checkpoints): the filter above, and an
    unraisable-exception hook that drops what Orbax's and TensorStore's abandoned coroutines
    raise after a failed read or write ('Event loop is closed', an array read whose error was
    already raised); every other unraisable exception still goes to the previous hook."""
    if getattr(quiet_orbax_once, "done", False):
        return
    quiet_orbax_once.done = True
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_RepeatedSaveErrors())
    previous = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if (isinstance(unraisable.exc_value, RuntimeError) and
                "Event loop is closed" in str(unraisable.exc_value)) or \
                (code is not None and "orbax" in code.co_filename):
            return
        previous(unraisable)
    sys.unraisablehook = hook


@contextlib.contextmanager
def quiet_orbax():
    """Orbax logs every failed read with a traceback; ptft reports the fault itself."""
    from absl import logging as absl_logging
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.FATAL)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


def verify_run(run_dir: Path) -> list[dict]:
    """One row per checkpoint step of a run directory (checkpoints/, best/ and what was moved
    aside): where, step, arrays, bytes and status ('ok', 'no checksums' or the fault)."""
    run_dir = Path(run_dir)
    rows = []
    for folder in ("checkpoints", "best", DAMAGED_DIR):
        root = run_dir / folder
        if not root.is_dir():
            continue
        for step_dir in sorted((p for p in root.iterdir() if p.is_dir() and
                                p.name.split(".")[0].isdigit()),
                               key=lambda p: (_step_of(p), p.name)):
            if ".orbax-checkpoint-tmp" in step_dir.name:
                continue  # an interrupted save: never a step (Orbax ignores it too)
            rows.append(verify_step(step_dir, folder))
    return rows


def verify_step(step_dir: Path, folder: str) -> dict:
    """verify_run's row for one step folder."""
    row = {"folder": folder, "step": step_dir.name, "arrays": 0,
           "bytes": sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())}
    if folder == DAMAGED_DIR:
        reason = step_dir / REASON_FILE
        row["status"] = "moved aside: " + (reason.read_text().strip() if reason.is_file()
                                           else "(no note)")
        return row
    try:
        meta, trees = check_step(step_dir)
        row["arrays"] = sum(len(flatten(t)) for t in trees.values())
        row["status"] = "ok" if "checksums" in meta else "ok (no checksums: written before " \
                                                         "they existed)"
    except CheckpointDamaged as e:
        row["status"] = f"DAMAGED: {e.fault}"
    return row
