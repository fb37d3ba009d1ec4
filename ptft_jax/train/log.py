"""Where metrics go: the terminal (with a progress bar), a JSONL file and TensorBoard events."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm.auto import tqdm

from ptft_jax.core.files import atomic_write_text


class MetricsWriter:
    """Writes on process 0 only; every other process gets a writer that does nothing."""

    def __init__(self, run_dir: Path, total_steps: int, initial_step: int, enabled: bool,
                 progress: bool = True):
        self.enabled = enabled
        self.bar = None
        self.tb = None
        if not enabled:
            return
        supersede_rows_after(run_dir / "metrics.jsonl", initial_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # optional at run time; a dependency of the package
            self.tb = None
        if progress:
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step",
                            dynamic_ncols=True)

    def write(self, step: int, metrics: dict, shown=None) -> None:
        """Appends a JSONL row and TensorBoard scalars (every numeric value) and prints a
        line with the `shown` keys (default: all)."""
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        # JSON has no NaN / Infinity: such values are written as null, and named in
        # "nonfinite" so that a reader can tell them from missing ones.
        nonfinite = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        record = {k: (None if k in nonfinite else v) for k, v in row.items()}
        if nonfinite:
            record["nonfinite"] = nonfinite
        self.jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and \
                        k not in nonfinite:
                    self.tb.add_scalar(k, v, step)
        keys = ["step", *(k for k in (shown or row) if k in row and k not in ("step", "time"))]
        line = "  ".join(_fmt(k, row[k]) for k in keys)
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def info(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()


def supersede_rows_after(path: Path, step: int) -> int:
    """A resumed run trains the steps after its checkpoint again: their old rows move from
    `path` to metrics.superseded.jsonl (kept, not lost), so every step appears once. The file
    is rewritten through a temporary file and a rename, never left half-written. Returns how
    many rows moved."""
    if not path.is_file():
        return 0
    keep, moved = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):  # a line cut by a kill: not a row
            moved.append(line)
            continue
        (moved if row_step > step else keep).append(line)
    if moved:
        with open(path.with_name("metrics.superseded.jsonl"), "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in moved))
        atomic_write_text(path, "".join(line + "\n" for line in keep))
    return len(moved)


def _plain(v):
    try:
        return v.item()
    except AttributeError:
        return v


def _fmt(k, v) -> str:
    if isinstance(v, float):
        if k in ("learning_rate",):
            return f"{k}={v:.2e}"
        if k.startswith("tokens_per"):
            return f"{k}={v:,.0f}"
        return f"{k}={v:.4g}"
    return f"{k}={v}"
