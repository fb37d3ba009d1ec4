"""The device mesh (data, fsdp, tensor), the logical-axis rules, batch shardings, multi-host init.

The model names its axes (`embed`, `mlp`, ...); this table alone says how they map to the mesh.
- data:   pure data parallelism (parameters replicated).
- fsdp:   data parallelism with parameters and optimizer state sharded along `embed`.
- tensor: Megatron-style model parallelism over heads, MLP width and vocabulary.
"""
from __future__ import annotations

import logging

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ptft_jax.config.schema import Config, ConfigError, DistributedConfig, MeshConfig
from ptft_jax.config.resolve import resolve_mesh_shape

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

LOGICAL_RULES = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),  # the scanned layer axis is never sharded
    # activations
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = resolve_mesh_shape(cfg, len(devices))
    # Auto axes: shardings propagate through the step as XLA sees fit, guided by constraints.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def process_rows(sharding: NamedSharding, global_batch: int) -> slice:
    """The contiguous rows of the global batch whose data lives on this process's devices."""
    index_map = sharding.addressable_devices_indices_map((global_batch,))
    starts = sorted({(idx[0].start or 0) for idx in index_map.values()})
    stops = sorted({(idx[0].stop if idx[0].stop is not None else global_batch)
                    for idx in index_map.values()})
    rows = slice(starts[0], stops[-1])
    covered = sum(b - a for a, b in zip(starts, stops))
    if covered != rows.stop - rows.start:
        raise RuntimeError(f"This process's devices hold non-contiguous batch rows {starts}; "
                           f"order the mesh so that each process's devices are adjacent.")
    return rows


def global_batch_array(local: dict[str, np.ndarray], sharding: NamedSharding,
                       global_batch: int) -> dict[str, jax.Array]:
    """Builds global arrays from the rows this process holds (the whole batch on one host)."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch,) + v.shape[1:])
            for k, v in local.items()}


def initialize_distributed(cfg: DistributedConfig) -> None:
    """`jax.distributed.initialize` from config; must run before any other JAX call."""
    if not cfg.enabled:
        return
    # Nothing here may touch a backend (jax.process_count, jax.default_backend, ...): that would
    # initialise XLA, after which jax.distributed.initialize refuses to run.
    if jax.distributed.is_initialized():  # already initialised by the caller
        return
    # CPU processes need gloo for cross-process collectives; the setting only concerns the CPU
    # client, so it is harmless on GPU/TPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                                   num_processes=cfg.num_processes, process_id=cfg.process_id,
                                   local_device_ids=cfg.local_device_ids)
    except (ValueError, RuntimeError) as e:  # JAX found no cluster to join
        raise ConfigError(f"distributed.enabled=true, but JAX could not join a cluster "
                          f"({' '.join(str(e).split())[:200]}): set distributed."
                          f"coordinator_address=HOST:PORT, distributed.num_processes and "
                          f"distributed.process_id, or run where JAX finds them (SLURM, a TPU "
                          f"pod).") from None
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())


def gather_rows(tree):
    """Device outputs as host NumPy arrays holding every row of the global batch (on
    multi-host, every process's rows, in row order)."""
    def one(x):
        if jax.process_count() == 1:
            return np.asarray(jax.device_get(x))
        if getattr(x, "is_fully_addressable", True):  # pmap: this process's rows only
            return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(one, tree)


def broadcast_text(text: str) -> str:
    """Process 0's `text`, on every process."""
    data = np.frombuffer(text.encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    padded = np.zeros(size, np.uint8)
    padded[: min(size, len(data))] = data[:size]
    return bytes(multihost_utils.broadcast_one_to_all(padded)).decode()


def data_parallel_size(cfg: Config, devices=None) -> int:
    """How many ways the global batch is split: every device under pmap, data x fsdp under
    jit."""
    if cfg.mesh.parallelism == "pmap":
        return jax.device_count()
    data, fsdp, _ = resolve_mesh_shape(cfg.mesh, len(devices or jax.devices()))
    return data * fsdp
