"""What stops a run or makes it save outside the step schedule: the divergence guard, signals
(preemption, Ctrl-C) and the checkpoint clock. Each decision is the same on every process."""
from __future__ import annotations

import signal
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils


class DivergenceGuard:
    """Watches the per-step `skipped` flags and losses the step returns, read only at log and
    save steps (no host sync per step). `check()` says why to stop, or None."""

    def __init__(self, cfg):
        self.max_skipped = cfg.train.max_skipped_steps
        self.spike_factor = cfg.train.loss_spike_factor
        self.window: list[float] = []
        self.window_size = cfg.train.loss_spike_window
        self.in_a_row = 0  # consecutive skipped steps, up to the last one checked
        self.queue: list = []  # (step, skipped, loss) device scalars not read yet

    def add(self, step: int, metrics: dict) -> None:
        self.queue.append((step, metrics["skipped"], metrics["loss"]))

    def check(self) -> str | None:
        flags = jax.device_get([(s, k, l) for s, k, l in self.queue])
        self.queue = []
        for step, skipped, loss in flags:
            skipped, loss = int(np.max(skipped)), float(np.mean(loss))
            if skipped:
                self.in_a_row += 1
                if self.in_a_row >= self.max_skipped:
                    return (f"diverged: {self.in_a_row} steps in a row with a non-finite loss "
                            f"or gradient (last at step {step}); they were skipped, and "
                            f"nothing was saved after the last good step")
                continue
            self.in_a_row = 0
            if self.spike_factor and len(self.window) == self.window_size:
                mean = sum(self.window) / len(self.window)
                if loss > self.spike_factor * mean:
                    return (f"diverged: the loss at step {step} ({loss:.4g}) is over "
                            f"train.loss_spike_factor={self.spike_factor:g} x the mean of the "
                            f"previous {self.window_size} steps ({mean:.4g})")
            self.window = (self.window + [loss])[-self.window_size:]
        return None

    @property
    def suspect(self) -> bool:
        """The last step checked was skipped: the state may be one that diverges."""
        return self.in_a_row > 0


class StopOnSignal:
    """Turns SIGINT / SIGTERM (Ctrl-C, preemption) into a request to stop between steps, so
    the loop saves a checkpoint instead of dying inside a step whose inputs were donated.
    A second signal interrupts at once. On multi-host, processes agree at log steps."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # the second time: stop now
            signal.default_int_handler(signum, frame)
        self.signal_name = signal.Signals(signum).name

    def agreed(self, check_all_processes: bool) -> bool:
        """Whether to stop now. Single-process: at once. Multi-host: only when every process
        asks together (at log steps), so that none waits alone in a collective."""
        if jax.process_count() == 1:
            return self.signal_name is not None
        if not check_all_processes:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
        if flags.any() and self.signal_name is None:
            self.signal_name = "another process"
        return bool(flags.any())

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class SaveClock:
    """`checkpoint.every_minutes`: a save is due when that much wall time has passed since the
    last one (preemptible machines). On multi-host, processes agree at log steps (any
    process's clock counts), so every process saves the same step."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.last = time.monotonic()

    def due(self, at_log: bool) -> bool:
        if not self.seconds:
            return False
        late = time.monotonic() - self.last >= self.seconds
        if jax.process_count() == 1:
            return late
        if not at_log:
            return False
        return bool(multihost_utils.process_allgather(np.int32(late)).any())

    def saved(self) -> None:
        self.last = time.monotonic()
