"""Writing files so that a killed process or a power loss never leaves half of one: a
temporary file in the same folder, flushed to disk, renamed into place, the folder synced."""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def write_tmp(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Writes `path`.tmp and flushes it to disk; the caller renames it into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`path` appears whole or not at all, even if the process is killed mid-write."""
    os.replace(write_tmp(path, write), path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Makes renames in `path` durable (survive a power loss, not only a killed process)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
