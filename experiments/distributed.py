"""Data parallelism with `jax.sharding`: one mesh axis, `data`, over every device.

The train state is replicated; each global batch is split over the devices
along its first axis. Under `jax.jit` XLA then computes exactly the single-device
function (batch statistics and losses over the global batch), so results match
one device up to the order of floating-point sums. Several hosts join with
`initialize` before any other JAX call; each then reads and feeds only its own
slice of every global batch (`experiments.pipeline`).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Joins a multi-host run (arguments or `NPAS_COORDINATOR`, `NPAS_NUM_PROCESSES`,
    `NPAS_PROCESS_ID`); does nothing for a single process.

    Raises:
      ValueError: a coordinator without the number of processes or this one's id,
        an id out of range, or either of those without a coordinator.
    """
    coordinator = coordinator or os.environ.get("NPAS_COORDINATOR")
    num_processes = num_processes or _environment_int("NPAS_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _environment_int("NPAS_PROCESS_ID")
    if not coordinator:
        if num_processes is not None or process_id is not None:
            raise ValueError(
                "--num-processes and --process-id need --coordinator HOST:PORT "
                "(or NPAS_COORDINATOR)"
            )
        return
    if num_processes is None or process_id is None:
        raise ValueError(
            "a multi-host run needs --num-processes and --process-id (or NPAS_NUM_PROCESSES "
            "and NPAS_PROCESS_ID) beside the coordinator"
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is not in 0..{num_processes - 1}")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def _environment_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a whole number") from None


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
    """Puts every leaf on every device of `mesh` (every host passes the same values)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(leaf))
            global_data = jax.make_array_from_process_local_data(sharding, data, data.shape)
            return jax.random.wrap_key_data(global_data, impl=jax.random.key_impl(leaf))
        value = np.asarray(leaf)
        return jax.make_array_from_process_local_data(sharding, value, value.shape)

    return jax.tree_util.tree_map(put, tree)


def to_host(tree):
    """Numpy copies of `tree`'s arrays, gathered from every host when they span several."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def shard_local_batch(batch, mesh: Mesh):
    """The global batch whose piece on this process is `batch` (numpy), split over `mesh`'s
    data axis; each process passes its own contiguous piece, process 0's first."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)

    def local(array: np.ndarray):
        global_shape = (array.shape[0] * jax.process_count(), *array.shape[1:])
        return jax.make_array_from_process_local_data(sharding, array, global_shape)

    return jax.tree_util.tree_map(local, batch)
