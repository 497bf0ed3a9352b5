"""Mesh over every device of every process, with one `data` axis.

Host-local numpy batches become global `jax.Array`s sharded on `data`; state is replicated.
Methods never touch devices directly: they call `to_global` and jit with these shardings.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D `data` mesh over every device of every process (or the given ones)."""
    if devices is None:
        # Auto axes: shardings are propagated by XLA (jax >= 0.7 defaults to Explicit).
        return jax.make_mesh((jax.device_count(),), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,))
    return Mesh(np.asarray(devices), ("data",))


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_global_batch(global_batch: int, mesh: Mesh, key: str = "batch_size") -> None:
    """A global batch must split evenly over the devices; the error names the config key."""
    if global_batch <= 0 or global_batch % mesh.devices.size:
        raise ValueError(f"config.train.{key}={global_batch}: the global batch must be a "
                         f"positive multiple of the {mesh.devices.size} devices")


def to_global(batch: Any, mesh: Mesh) -> Any:
    """Host-local numpy pytree (leading axis = this process's rows) -> global jax.Arrays."""
    sharding = data_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a host pytree (identical on every process) replicated on the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding, np.asarray(x), np.shape(x)), tree)


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy on every process (gathers across hosts when needed)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)

    def get(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(get, tree)


def is_lead_process() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (no-op for one process): what the lead
    wrote before it is there for the others after it."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
