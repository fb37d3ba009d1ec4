"""XLA flags for the tests, in a module that imports nothing (conftest sets them before JAX
starts). The tests check what is computed, not how fast: XLA's CPU backend at optimisation
level 0 compiles the suite's hundreds of small programs about a third faster; the benchmarks,
not the tests, measure speed."""

COMPILE_FAST = "--xla_backend_optimization_level=0"


def fake_devices(n: int) -> str:
    """XLA_FLAGS for a process with n fake CPU devices (one: the CLI as a newcomer runs it)."""
    devices = f" --xla_force_host_platform_device_count={n}" if n > 1 else ""
    return COMPILE_FAST + devices
