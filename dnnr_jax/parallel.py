"""Data parallelism over a device mesh.

One mesh axis, 'data', over the devices `training.mesh` chooses (every
device of every process by default). The batch is sharded along it
(`P('data')`); the training split is sharded by rows, each process feeding
only its own rows (`jax.make_array_from_process_local_data`); parameters and
optimizer state are replicated, or with `training.mesh.shard_params` split
along their first axis (FSDP-style: XLA gathers them where a step needs
them). A step on N devices computes the gradient of the same batch as on
one: only the order in which the per-example gradients are summed differs.

Example:
  >>> mesh = mesh_from_config(config.training.mesh)
  >>> train, count = shard_rows(dataset.train, mesh, pad=True)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dnnr_jax.config import MeshConfig
from dnnr_jax.errors import DnnrError
from dnnr_jax.train import Split

DATA = 'data'


def mesh_from_config(settings: MeshConfig) -> Mesh:
  """A one-axis mesh ('data') over the first `settings.devices` devices (0: all).

  Raises:
    DnnrError: more devices are asked for than there are.
  """
  devices = jax.devices()
  if settings.devices < 0:
    raise DnnrError(
        f'training.mesh.devices = {settings.devices} is negative; give a device count, '
        'or 0 for all of them.')
  count = settings.devices or len(devices)
  if count > len(devices):
    raise DnnrError(
        f'training.mesh.devices = {count} is more than the {len(devices)} '
        f'{jax.default_backend()} devices present; lower it, or set 0 for all of them.')
  if count % jax.process_count():
    raise DnnrError(
        f'training.mesh.devices = {count} does not divide over the {jax.process_count()} '
        'processes; give each process as many devices.')
  if jax.process_count() > 1:
    # Every process's first devices, so that each one holds part of the mesh.
    per_process = count // jax.process_count()
    devices = [device for process in range(jax.process_count())
               for device in _process_devices(devices, process)[:per_process]]
  # Auto axes: XLA places the collectives (jax.make_mesh's default is Explicit).
  return jax.make_mesh((count,), (DATA,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:count])


def within_reach(settings: MeshConfig) -> MeshConfig:
  """`settings`, or every device when they ask for more than there are.

  For jobs that start from a checkpoint trained elsewhere (fine-tuning):
  its mesh is where it was trained, not where it must go on.
  """
  if settings.devices > jax.device_count():
    return dataclasses.replace(settings, devices=0)
  return settings


def check_batch(batch_size: int, mesh: Mesh) -> None:
  """Raises DnnrError unless `batch_size` divides evenly over the mesh."""
  if batch_size % mesh.size:
    raise DnnrError(
        f'training.batch_size = {batch_size} does not divide evenly over the {mesh.size} '
        f'devices of the mesh; choose a multiple of {mesh.size} or set '
        'training.mesh.devices.')


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[steps, batch, ...] arrays: each step's batch split along 'data'."""
  return NamedSharding(mesh, P(None, DATA))


def state_shardings(state: Any, mesh: Mesh, shard_params: bool = False) -> Any:
  """A sharding for every leaf of `state`: replicated, or FSDP-style.

  With `shard_params`, a leaf of two or more axes whose first axis divides
  over the mesh is split along it (kernels and their Adam moments); the
  rest (biases, scalars, keys) stay replicated.
  """
  def sharding(leaf):
    shape = np.shape(leaf)
    if shard_params and len(shape) >= 2 and shape[0] % mesh.size == 0:
      return NamedSharding(mesh, P(DATA))
    return replicated(mesh)

  return jax.tree.map(sharding, state)


def put(tree: Any, shardings: Any) -> Any:
  """Places a tree that every process holds whole onto `shardings`.

  Each process hands over only the pieces its own devices hold
  (`jax.make_array_from_callback`), so this works across processes too.
  """
  def place(leaf, sharding):
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(place, tree, shardings)


def shard_rows(split: Split, mesh: Mesh, *, pad: bool) -> tuple[Split, int]:
  """A split sharded by rows over the mesh, each process feeding its own rows.

  Args:
    split: the whole split, as every process loaded it.
    mesh: the mesh.
    pad: pad the rows to a multiple of the mesh size with zeros, which the
      training epoch never draws (it shuffles only the real rows). Without
      padding, a split whose rows do not divide is replicated instead.

  Returns:
    (the split on the mesh, its real number of rows).
  """
  images, labels = np.asarray(split.images), np.asarray(split.labels)
  count = labels.shape[0]
  rows = math.ceil(count / mesh.size) * mesh.size if pad else count
  if rows % mesh.size:
    sharding = replicated(mesh)
  else:
    sharding = NamedSharding(mesh, P(DATA))
    images = np.pad(images, ((0, rows - count), (0, 0)))
    labels = np.pad(labels, (0, rows - count))
  local = _process_rows(sharding, rows)
  return Split(
      jax.make_array_from_process_local_data(sharding, images[local], images.shape),
      jax.make_array_from_process_local_data(sharding, labels[local], labels.shape),
  ), count


def _process_rows(sharding: NamedSharding, rows: int) -> slice:
  """The rows this process's devices hold (contiguous: the mesh is process-major)."""
  slices = [index[0] for index in sharding.addressable_devices_indices_map((rows,)).values()]
  return slice(min(s.start or 0 for s in slices),
               max(rows if s.stop is None else s.stop for s in slices))


def _process_devices(devices: list, process: int) -> list:
  return [device for device in devices if device.process_index == process]
