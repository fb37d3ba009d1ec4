"""What a run's MFU is measured against: accelerator peaks from the vendors' datasheets (dense
bf16, without sparsity), or on a CPU a dense matmul timed on the spot; and MFU itself
(models/flops.py counts the FLOPs).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip, from the vendors' datasheets (without sparsity).
PEAK_FLOPS = {
    "h100 sxm": 989e12,
    "h100 pcie": 756e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
}


def device_peak_flops(device=None) -> float | None:
    """The table's dense bf16 peak for this device kind, or None when unknown (e.g. CPU)."""
    device = device or jax.devices()[0]
    kind = device.device_kind.lower()
    if device.platform == "gpu" and "h100" in kind:
        return PEAK_FLOPS["h100 pcie"] if "pcie" in kind else PEAK_FLOPS["h100 sxm"]
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name in kind:
            return PEAK_FLOPS[name]
    return None


def measure_matmul_flops(n: int = 1024, dtype=jnp.float32, repeats: int = 20) -> float:
    """Achieved FLOP/s of one large dense matmul on the first device: the practical ceiling.
    The fastest of `repeats` timings counts: another process on the machine can only slow a
    timing down, so the best one is the least disturbed (a median taken while the machine was
    busy once gave a CPU ceiling a third of the real one, and MFU above 100%)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


MEASURED = "measured dense-matmul ceiling"


def system_peak_flops() -> tuple[float, str]:
    """(peak FLOP/s of all devices together, where the figure came from)."""
    devices = jax.devices()
    peak = device_peak_flops(devices[0])
    if peak is not None:
        return peak * len(devices), f"datasheet bf16 peak of {devices[0].device_kind}"
    # CPU (or an unknown chip): every fake CPU device shares the same cores, so the ceiling of
    # the whole host is one measured matmul, not one per device.
    measured = measure_matmul_flops()
    if devices[0].platform != "cpu":
        measured *= len(devices)
    return measured, MEASURED


class MfuReference:
    """What a run's MFU is measured against: a datasheet peak, or a measured ceiling that is
    timed again whenever a figure exceeds it (the machine may have been busy the first time);
    the ceiling only ever rises. `too_low` says when even the re-timed ceiling is below what
    the run achieved: then the MFU figure is not to be trusted, and says so."""

    def __init__(self, measure=system_peak_flops):
        self._measure = measure
        self.flops, self.source = measure()
        self.too_low = False
        self._warned = False

    def mfu(self, units_per_s: float, flops_per_unit: float) -> float:
        value = mfu(units_per_s, flops_per_unit, self.flops)
        if value > 1 and self.source == MEASURED:
            self.flops = max(self.flops, self._measure()[0])
            value = mfu(units_per_s, flops_per_unit, self.flops)
        self.too_low = value > 1
        return value

    def warning_once(self, value: float) -> str | None:
        """The warning for an MFU above 100%, the first time only."""
        if not self.too_low or self._warned:
            return None
        self._warned = True
        return (f"MFU {value:.0%} is above 100%: the {self.source} ({self.flops / 1e12:.3g} "
                f"TFLOP/s, timed again) is lower than what this run achieves, so the machine "
                f"was busy while it was timed; read the MFU figures of this run as unreliable")


def mfu(tokens_per_second: float, flops_per_token: float, peak: float) -> float:
    return tokens_per_second * flops_per_token / peak
