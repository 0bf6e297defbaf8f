"""Data parallelism on JAX's own engine: one ``Mesh`` over the devices, batches split along it.

jaxcam scales out the way JAX intends, with no process pools: a one-axis
:class:`jax.sharding.Mesh` named ``"data"`` spans every device, each batch is
placed with ``NamedSharding(mesh, PartitionSpec("data"))`` (rows split across
devices), parameters are replicated with ``PartitionSpec()``, and ``jax.jit``
partitions the computation to follow its inputs (GSPMD). Nothing else changes
in the jitted code: a Grad-CAM or a training step written for one device runs
unchanged on a sharded batch, and per-example work (every CAM method, eval-mode
forward) gives the same numbers as on one device. Cross-example reductions
(a mean loss, train-mode BatchNorm statistics) become all-reduces whose
summation order differs from one device's, so they agree to float32 rounding,
not bit for bit.

Typical use (explaining or training)::

    mesh = jaxcam.distributed.data_mesh()            # all local devices (all hosts, if initialised)
    variables = jaxcam.distributed.replicate(variables, mesh)
    for batch in batches:
        batch, n = jaxcam.distributed.pad_batch(batch, mesh.size)   # if the last batch is short
        batch = jaxcam.distributed.shard_batch(batch, mesh)
        out = step(variables, batch)                  # any jax.jit function, unchanged
        rows = jaxcam.distributed.local_rows(out)[:n]

Multi-host (several machines, each with local devices): call
:func:`initialize_distributed` once at start-up in every process, before any
other JAX call; :func:`data_mesh` then spans the devices of all processes, and
:func:`shard_batch` takes each process's *local* slice of the global batch
(``jax.make_array_from_process_local_data``), so every process feeds its own
data-pipeline shard (e.g. ``grain`` with ``shard_options``).

On CPU, several devices are simulated with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, which must be set
before JAX initialises its backend (the tests run such code in a subprocess).
Forced host devices share the machine's cores: they test correctness of the
sharding, not speed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

__all__ = [
    "DATA_AXIS",
    "data_mesh",
    "data_sharding",
    "replicated_sharding",
    "shard_batch",
    "replicate",
    "pad_batch",
    "local_rows",
    "initialize_distributed",
]


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis ``Mesh`` named ``"data"`` over ``devices`` (default: ``jax.devices()``).

    ``jax.devices()`` lists the devices of every process once
    :func:`initialize_distributed` has run, and the local ones otherwise.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device; got an empty list of devices.")
    return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """``NamedSharding`` splitting the leading (batch) axis over the mesh's ``"data"`` axis."""
    _check_mesh(mesh)
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """``NamedSharding`` holding a full copy on every device of ``mesh`` (for parameters)."""
    _check_mesh(mesh)
    return NamedSharding(mesh, PartitionSpec())


def _check_mesh(mesh: Any) -> None:
    if not isinstance(mesh, Mesh) or DATA_AXIS not in mesh.axis_names:
        raise ValueError(
            f"expected a jax.sharding.Mesh with a {DATA_AXIS!r} axis (build one with "
            f"jaxcam.distributed.data_mesh()); got {mesh!r}."
        )


def _leading_sizes(batch: Any) -> list[int]:
    sizes = []
    for leaf in jax.tree_util.tree_leaves(batch):
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                "every leaf of a batch needs a leading batch axis; found a scalar. "
                "Pass scalars (e.g. a step counter) outside the batch or replicate() them."
            )
        sizes.append(shape[0])
    if not sizes:
        raise ValueError("the batch is empty (no arrays in it).")
    if len(set(sizes)) != 1:
        raise ValueError(
            "all arrays in a batch must share the leading (batch) size; "
            f"got sizes {sorted(set(sizes))}."
        )
    return sizes


def pad_batch(batch: Any, multiple: int) -> tuple[Any, int]:
    """Pad every leaf's leading axis to a multiple of ``multiple`` by repeating the last row.

    Returns ``(padded_batch, n_valid)``; results for rows ``n_valid:`` are to be
    discarded. Repeating a real row (not zeros) keeps padded rows inside the
    model's normal input range, so they cannot produce NaNs or warnings.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1; got {multiple}.")
    n = _leading_sizes(batch)[0]
    if n == 0:
        raise ValueError("cannot pad an empty batch (leading size 0).")
    target = -(-n // multiple) * multiple
    if target == n:
        return batch, n

    def pad(leaf):
        leaf = np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf
        reps = [leaf[-1:]] * (target - n)
        if isinstance(leaf, jax.Array):
            return jax.numpy.concatenate([leaf, *reps], axis=0)
        return np.concatenate([leaf, *reps], axis=0)

    return jax.tree_util.tree_map(pad, batch), n


def map_padded(fn: Callable[..., Any], arrays: Sequence[Any], batch_size: int) -> Any:
    """``fn(*chunk)`` over consecutive chunks of ``batch_size`` rows of ``arrays`` (same
    leading size ``N``), the last chunk padded by :func:`pad_batch` so that ``fn`` sees
    one shape (and a jitted ``fn`` compiles once); returns ``fn``'s output pytree with
    the valid rows of every chunk concatenated (numpy, leading size ``N``)."""
    n = _leading_sizes(tuple(arrays))[0]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    outs = []
    for start in range(0, n, batch_size):
        chunk, k = pad_batch(tuple(a[start:start + batch_size] for a in arrays), batch_size)
        outs.append(jax.tree.map(lambda v, k=k: np.asarray(v)[:k], fn(*chunk)))
    return jax.tree.map(lambda *vs: np.concatenate(vs), *outs)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a batch (array or pytree of arrays) with rows split over ``mesh``'s ``"data"`` axis.

    Single process: ``batch`` is the whole batch; its leading size must be a
    multiple of the number of devices (use :func:`pad_batch`). Multi-process:
    ``batch`` is this process's local slice; the global array has
    ``process_count`` times as many rows, assembled with
    ``jax.make_array_from_process_local_data``.
    """
    sharding = data_sharding(mesh)
    n = _leading_sizes(batch)[0]
    if jax.process_count() == 1:
        if n % mesh.size:
            raise ValueError(
                f"batch size {n} is not a multiple of the {mesh.size} devices in the mesh; "
                f"pad it first with jaxcam.distributed.pad_batch(batch, {mesh.size}) "
                "and drop the padded rows from the results."
            )
        return jax.device_put(batch, sharding)
    local_devices = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    if local_devices and n % local_devices:
        raise ValueError(
            f"local batch size {n} is not a multiple of this process's {local_devices} devices; "
            f"pad it with jaxcam.distributed.pad_batch(batch, {local_devices})."
        )
    return jax.tree_util.tree_map(
        lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)), batch
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copy a pytree (model variables, optimizer state) onto every device of ``mesh``."""
    return jax.device_put(tree, replicated_sharding(mesh))


def local_rows(tree: Any) -> Any:
    """The rows of each (possibly sharded) array held by this process, as numpy, in order.

    Single process: the whole array. Multi-process with a ``"data"``-sharded
    array: this process's rows, i.e. the results for the local batch slice
    it fed to :func:`shard_batch`. Replicated or unsharded leaves come back whole.
    """

    def rows(leaf):
        if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
            return np.asarray(leaf)
        shards = sorted(leaf.addressable_shards, key=lambda s: s.index[0].start or 0)
        seen, parts = set(), []
        for shard in shards:
            start = shard.index[0].start or 0
            if start not in seen:  # a row block replicated on several local devices counts once
                seen.add(start)
                parts.append(np.asarray(shard.data))
        return np.concatenate(parts, axis=0)

    return jax.tree_util.tree_map(rows, tree)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Join a multi-host JAX job (thin wrapper over ``jax.distributed.initialize``).

    Call once per process, before any other JAX call. With no arguments, JAX
    auto-detects the cluster (SLURM, Open MPI, Cloud TPU, Kubernetes/GKE);
    otherwise pass ``coordinator_address`` ("host:port" of process 0),
    ``num_processes`` and ``process_id``, or set the environment variables
    ``JAXCAM_COORDINATOR``, ``JAXCAM_NUM_PROCESSES`` and ``JAXCAM_PROCESS_ID``.

    CPU processes exchange data through gloo collectives
    (``jax_cpu_collectives_implementation="gloo"``, set here when a job is
    joined; without it a multi-process CPU run cannot all-gather). GPU and TPU
    backends use their own collectives.

    Returns ``True`` when a multi-process job was joined, ``False`` when this
    is a plain single-process run (no arguments, no cluster detected, no
    environment variables) — in which case nothing is done, so scripts can call
    it unconditionally.

    Example, two machines::

        # host 0: JAXCAM_COORDINATOR=10.0.0.1:1234 JAXCAM_NUM_PROCESSES=2 JAXCAM_PROCESS_ID=0
        # host 1: JAXCAM_COORDINATOR=10.0.0.1:1234 JAXCAM_NUM_PROCESSES=2 JAXCAM_PROCESS_ID=1
        jaxcam.distributed.initialize_distributed()
        mesh = jaxcam.distributed.data_mesh()   # spans both hosts' devices
    """
    coordinator_address = coordinator_address or os.environ.get("JAXCAM_COORDINATOR")
    if num_processes is None and "JAXCAM_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAXCAM_NUM_PROCESSES"])
    if process_id is None and "JAXCAM_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAXCAM_PROCESS_ID"])
    explicit = coordinator_address is not None or num_processes is not None
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        raise ValueError(
            "a multi-host run needs all three of coordinator_address, num_processes and "
            "process_id (or JAXCAM_COORDINATOR, JAXCAM_NUM_PROCESSES, JAXCAM_PROCESS_ID); "
            f"got coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}."
        )
    if explicit and num_processes == 1:
        return False
    if not explicit:
        try:
            jax.distributed.initialize(local_device_ids=local_device_ids)
        except ValueError as err:
            # jax raises "coordinator_address should be defined" when it detects
            # no cluster: a plain single-process run.
            if "coordinator_address" not in str(err):
                raise
            return False
        return jax.process_count() > 1
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True
