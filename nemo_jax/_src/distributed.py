"""Multi-device and multi-host helpers for population evaluation.

The population axis ``P`` of a batch of configurations is sharded over a 1-D device mesh
with the axis name ``"pop"`` (:func:`population_mesh`); images, labels and model
variables are replicated. On one host the mesh spans all local devices; after
:func:`initialize` it spans every device of every process.

Convention: every process holds the SAME full host copy of the population (the search is
a pure function of ``(state, key)`` and runs replicated on every host), so building the
global arrays needs no communication (:func:`put_global`), and the results are gathered
back to every host (:func:`to_host`).

Launching on several hosts
--------------------------
Call :func:`initialize` once per process, before any other JAX call, then run the same
program everywhere.

* Several processes on one machine (tests, debugging; CPU collectives go over Gloo)::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
        python prog.py --coordinator 127.0.0.1:12355 --num-processes 2 --process-id $I

  with ``initialize("127.0.0.1:12355", 2, I)`` for ``I`` in ``0, 1``.

* GPU cluster under SLURM (one process per node, or one per GPU): ``srun`` sets
  ``SLURM_NTASKS``/``SLURM_PROCID``/node lists, which ``jax.distributed.initialize()``
  detects, so ``initialize()`` without arguments suffices::

    srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 python prog.py

  Without SLURM, pass them explicitly: ``initialize("node0:12355", num_nodes, rank)``
  (e.g. from ``torchrun``-style env vars), optionally ``local_device_ids``.

* TPU pod slice: run the same command on every worker, with ``initialize()`` (no
  arguments; the TPU metadata server provides the coordinator)::

    gcloud compute tpus tpu-vm ssh NAME --worker=all --command="python prog.py"
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

POP_AXIS = "pop"
"""Name of the mesh axis the population is sharded over."""


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None,
               initialization_timeout: int = 300) -> None:
  """Joins this process to a multi-host JAX job (``jax.distributed.initialize``).

  Must be called before any other JAX computation in the process (note: importing
  ``evosax`` runs one, so call this before importing the search modules, or call
  ``jax.distributed.initialize`` with the same arguments first thing). With no arguments
  the cluster is auto-detected (SLURM, TPU pods, Open MPI); see the module docstring for
  launch lines.

  Args:
    coordinator_address: ``"host:port"`` of process 0's coordinator service.
    num_processes: total number of processes.
    process_id: this process's rank in ``[0, num_processes)``.
    local_device_ids: optional subset of local devices this process drives.
    initialization_timeout: seconds to wait for all processes to join.
  """
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes={num_processes!r}; allowed: a positive integer")
  if (process_id is not None and num_processes is not None
      and not 0 <= process_id < num_processes):
    raise ValueError(f"process_id={process_id!r}; allowed: 0..{num_processes - 1}")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids,
                             initialization_timeout=initialization_timeout)


def is_multihost() -> bool:
  """True when this JAX job spans more than one process."""
  return jax.process_count() > 1


def population_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``"pop"`` over ``devices`` (default: all global devices)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("devices: empty; allowed: a non-empty list of jax devices")
  return Mesh(np.asarray(devices, dtype=object), (POP_AXIS,))


def population_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of an array whose leading axis is the population."""
  return NamedSharding(mesh, PartitionSpec(POP_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of an array copied to every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def put_global(tree: Any, sharding: NamedSharding) -> Any:
  """Builds global arrays from a full host copy held by every process.

  Each process materialises only the shards of its addressable devices, so this works
  unchanged on one host and on many (no communication).

  Args:
    tree: pytree of arrays (numpy or jax); the same values on every process.
    sharding: target sharding for every leaf.

  Returns:
    The pytree of global ``jax.Array``.
  """
  def put(x):
    if isinstance(x, jax.Array) and not is_multihost():
      return jax.device_put(x, sharding)  # already on device: no host round trip
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(put, tree)


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host) global array, as numpy, on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
