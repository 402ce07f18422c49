"""Data parallelism with `jax.sharding`: one mesh axis, `data`, over every device.

The train state is replicated; each global batch is split over the devices
along its first axis. Under `jax.jit` XLA then computes exactly the single-device
function (batch statistics and losses over the global batch), so results match
one device up to the order of floating-point sums. Several hosts join with
`initialize` before any other JAX call; each then feeds its own slice of every
global batch.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Joins a multi-host run (arguments or `NPAS_COORDINATOR`, `NPAS_NUM_PROCESSES`,
    `NPAS_PROCESS_ID`); does nothing for a single process."""
    coordinator = coordinator or os.environ.get("NPAS_COORDINATOR")
    if not coordinator:
        return
    num_processes = num_processes or int(os.environ["NPAS_NUM_PROCESSES"])
    process_id = process_id if process_id is not None else int(os.environ["NPAS_PROCESS_ID"])
    jax.distributed.initialize(coordinator, num_processes, process_id)


def data_mesh() -> Mesh:
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def check_batch(batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
    devices = mesh.devices.size
    if batch_size % devices:
        raise ValueError(
            f"the {what} {batch_size} does not divide over {devices} devices; use a multiple "
            f"of {devices}"
        )


def replicate(tree, mesh: Mesh):
    """Puts every leaf on every device of `mesh`."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch, mesh: Mesh):
    """A global batch (numpy, identical on every host) split over `mesh`'s data axis."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)

    def local(array: np.ndarray):
        per_process = array.shape[0] // jax.process_count()
        start = jax.process_index() * per_process
        return jax.make_array_from_process_local_data(
            sharding, array[start : start + per_process], array.shape
        )

    return jax.tree_util.tree_map(local, batch)
