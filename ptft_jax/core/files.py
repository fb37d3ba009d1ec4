"""Files and folders ptft writes, under two rules.

1. A file appears whole or not at all: it is written to a temporary file beside it (a name
   no one else uses), flushed to disk, renamed into place, and the folder is synced. A killed
   process or a full disk leaves the old file (or none), never half of one.
2. ptft deletes or replaces only what it made. Each folder it owns (a run directory, a cache,
   an export, a sweep or experiment folder) holds a marker file naming its kind; a folder
   that is neither empty nor marked is the user's and is refused, with its path. An output
   file never replaces an input, and replaces an existing file only when asked to.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, TextIO

from ptft_jax.config.schema import ConfigError

MARKER = ".ptft"         # in every folder ptft owns: {"kind": ...}
TMP_SUFFIX = ".ptft-tmp"  # temporary files on their way into place


# A run directory is a folder ptft marks as a "run"; one made before ptft marked its folders
# is known by its config and its checkpoints.
LEGACY_RUN = ("config.yaml", "checkpoints")


def write_tmp(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Writes a temporary file beside `path` (a fresh name: nothing is overwritten) and
    flushes it to disk; the caller renames it into place. Removed again if writing fails."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(name, 0o666 & ~_umask())  # as open() would have made it, not mkstemp's 0600
    except BaseException as e:
        Path(name).unlink(missing_ok=True)
        raise _naming(e, path)
    return Path(name)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`path` appears whole or not at all, even if the process is killed mid-write."""
    os.replace(write_tmp(path, write), path)
    fsync_dir(Path(path).parent)


@contextlib.contextmanager
def writing_text(path: Path) -> Iterator[TextIO]:
    """A text file to write in a `with` block: it appears at `path` whole when the block
    ends, and not at all if the block fails (the temporary file is removed)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(name, 0o666 & ~_umask())
        os.replace(name, path)
    except BaseException as e:
        Path(name).unlink(missing_ok=True)
        raise _naming(e, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: Path, obj, indent: int | None = 1) -> None:
    """JSON as the standard defines it: a NaN or infinity is an error, not `NaN`."""
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def fsync_dir(path: Path) -> None:
    """Makes renames in `path` durable (survive a power loss, not only a killed process)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _naming(e: BaseException, path: Path) -> BaseException:
    """An OSError from writing `path` (a full disk: EFBIG, ENOSPC) that names the file."""
    if isinstance(e, OSError) and e.filename is None and e.errno is not None:
        return OSError(e.errno, e.strerror, str(path))
    return e


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- folders ptft owns ------------------------------------------------------------------------

def marked_kind(folder: Path) -> str | None:
    """The kind of ptft folder `folder` is, from its marker; None if it has none."""
    try:
        kind = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def check_ownable(folder: Path, kind: str, key: str, legacy: Iterable[str] = ()) -> None:
    """Refuses `folder` unless ptft may write there as a `kind` folder: it does not exist
    yet, or is empty, or is marked as that kind, or (made before markers) holds every path
    of `legacy`. `key` names the setting that chose the folder. Writes nothing."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is a file, not a folder; give a new folder.")
    found = marked_kind(folder)
    if found == kind:
        return
    if found is not None:
        raise ConfigError(f"{key}: {folder} is a ptft {found} folder, not a {kind} folder; "
                          f"give another folder.")
    legacy = list(legacy)
    if legacy and all((folder / p).exists() for p in legacy):
        return
    if any(folder.iterdir()):
        raise ConfigError(f"{key}: {folder} already holds files ptft did not make (it has no "
                          f"{MARKER} marker); ptft writes only into a new or empty folder, or "
                          f"one it made. Give a new folder.")


def claim_folder(folder: Path, kind: str, key: str, legacy: Iterable[str] = ()) -> Path:
    """Creates `folder` (or takes an ownable one, see check_ownable) and marks it as a ptft
    `kind` folder. Returns it."""
    folder = Path(folder)
    check_ownable(folder, kind, key, legacy)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "run":
        lock_folder(folder, key)
    if marked_kind(folder) != kind:
        atomic_write_json(folder / MARKER, {"kind": kind})
    return folder


_LOCKED: dict[Path, int] = {}  # folder -> the open descriptor holding its lock


def lock_folder(folder: Path, key: str) -> None:
    """An exclusive advisory lock on an existing `folder` itself (flock on its descriptor:
    nothing is written), held by this process until release_folders() or its end, a kill
    included: a second ptft run refuses a run directory another one is training in."""
    folder = Path(folder).resolve()
    if folder in _LOCKED or not folder.is_dir():
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"{key}: {folder} is in use by another ptft process (a run training "
                          f"there now); wait for it to end, or give another folder.") from None
    _LOCKED[folder] = fd


def release_folders() -> None:
    for fd in _LOCKED.values():
        os.close(fd)  # closing the descriptor releases its lock
    _LOCKED.clear()


def step_folders(folder: Path) -> list[Path]:
    """The step folders of a checkpoints/ or best/ folder, newest first: those named by a
    number (an interrupted save's temporary folder is never a step)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()),
                  key=lambda p: int(p.name), reverse=True)


def check_new_folder(path: Path, name: str) -> Path:
    """An output folder must be new or empty: a file or a non-empty folder there is refused."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        what = "a file" if not path.is_dir() else "a folder that is not empty"
        raise ConfigError(f"{name} {path} is {what}; give a new folder.")
    return path


@contextlib.contextmanager
def building_folder(path: Path, kind: str, marked: bool = True) -> Iterator[Path]:
    """A hidden, marked sibling of `path` to fill in a `with` block: renamed onto `path`
    (missing or empty, see check_new_folder) when the block ends, removed if it fails. A
    killed writer's leftover has a name no later build takes, and the next build of `path`
    removes it. `marked=False` drops the marker at the end (a folder for another tool)."""
    path = Path(path)
    try:  # an error here names the folder asked for, not the temporary one beside it
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
            if stale.is_dir() and marked_kind(stale) == kind:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX,
                                    dir=path.parent))
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror} (cannot create a folder in {path.parent})",
                      str(path)) from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # as mkdir would have made it, not mkdtemp's 0700
        atomic_write_json(tmp / MARKER, {"kind": kind})
        yield tmp
        if not marked:
            (tmp / MARKER).unlink()
        if path.exists():
            path.rmdir()  # empty, checked before the work started
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


# -- output files -----------------------------------------------------------------------------

def check_output_file(path: str | Path, option: str, inputs: Iterable[str | Path] = (),
                      overwrite: bool = False) -> Path:
    """Refuses an output file that cannot or should not be written, before any work: its
    folder missing, a folder in its place, one of the command's inputs, or an existing file
    (unless `overwrite`)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder; give a file name.")
    if not path.parent.is_dir():
        raise ConfigError(f"{option} {path}: the folder {path.parent} does not exist; create "
                          f"it first.")
    for source in inputs:
        if source not in (None, "-") and Path(source).exists() and path.exists() \
                and os.path.samefile(source, path):
            raise ConfigError(f"{option} {path} is the input {source}; write the output to "
                              f"another file.")
    if path.exists() and not overwrite:
        raise ConfigError(f"{option} {path} already exists; ptft does not replace a file it "
                          f"did not just make. Give a new name, or add --overwrite.")
    return path
