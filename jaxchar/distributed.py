"""Data parallelism with JAX's own runtime: a device mesh, shardings, multi-host start-up.

One mesh axis, `data`. The corpus ids are replicated on every device; the batch that the
jitted step gathers from them is constrained to be split along `data`, so each device
gathers and computes only its rows, while params and optimizer state are replicated and XLA
inserts the gradient all-reduce. The global batch (train.batch_size) means the same on 1 or
N devices: the same seed gives the same losses up to float summation order. No pmap, no
hand-written collectives.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


class DistributedError(RuntimeError):
    """A device or process layout that cannot run the requested training."""


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """jax.distributed.initialize: automatic on Slurm, Kubernetes and Cloud TPU (no
    arguments); elsewhere give the coordinator address, process count and this process' id.
    Must run before any other JAX call. On CPUs, collectives across processes use gloo."""
    # a config flag, not a JAX call: harmless on accelerators, needed for CPU processes
    with contextlib.suppress(AttributeError, ValueError):  # JAX versions without the option
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {
        k: v
        for k, v in {
            "coordinator_address": coordinator,
            "num_processes": num_processes,
            "process_id": process_id,
        }.items()
        if v is not None
    }
    jax.distributed.initialize(**kwargs)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D `data` mesh over all devices (of every process), or the first num_devices."""
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices):
        raise DistributedError(f"{n} devices asked for, {len(devices)} available")
    return Mesh(np.array(devices[:n]), (DATA_AXIS,))


def check_batch(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        lower = batch_size - batch_size % n
        options = ", ".join(str(b) for b in (lower, lower + n) if b > 0)
        raise DistributedError(
            f"train.batch_size {batch_size} does not split evenly over {n} devices: "
            f"use a multiple of {n} (e.g. {options})"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split along `data` (the leading axis), the rest whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Inside jit: constrain every array of a batch (or carry) to be split by rows."""
    if mesh is None:
        return tree
    spec = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, spec), tree)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Places host or device arrays on every device of the mesh (every process gives the
    same values: the corpus, freshly initialised params)."""
    if mesh is None:
        return tree
    spec = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, spec)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(spec, np.asarray(x)), tree)


MIN_SHARDED_SIZE = 1024  # smaller arrays (biases, scalars) stay replicated


def param_spec(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """FSDP-style: split an array's leading axis along `data` when it divides evenly and the
    array is large enough to matter; replicate the rest."""
    n = mesh.devices.size
    if len(shape) >= 1 and shape[0] % n == 0 and int(np.prod(shape)) >= MIN_SHARDED_SIZE:
        return NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return replicated(mesh)


def shard_params(tree: Any, mesh: Mesh | None) -> Any:
    """Inside jit: keep params (or optimizer state) split as param_spec says."""
    if mesh is None:
        return tree
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, param_spec(x.shape, mesh)), tree
    )


def place_sharded(tree: Any, mesh: Mesh) -> Any:
    """Outside jit: puts host or device arrays on the mesh split as param_spec says (each
    process supplies only the pieces its devices hold)."""

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, param_spec(x.shape, mesh), lambda i: x[i])

    return jax.tree.map(put, tree)


def is_single_process() -> bool:
    return jax.process_count() == 1


def barrier(name: str) -> None:
    """Waits until every process reaches the same named point."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def is_primary() -> bool:
    """Only process 0 prints and writes files that are not collective."""
    return jax.process_index() == 0


def start(
    multi_host: bool = False,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    num_devices: int | None = None,
) -> Mesh | None:
    """The devices a training run uses: `jax.distributed.initialize` first when `multi_host`
    (before any other JAX call), then a `data` mesh over all devices (or the first
    num_devices); None, plain single-device jit, when there is one device and one process."""
    if multi_host:
        initialize(coordinator, num_processes, process_id)
    if (num_devices or jax.device_count()) == 1 and jax.process_count() == 1:
        return None
    return make_mesh(num_devices)
