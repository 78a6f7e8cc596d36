"""Saving and loading any params pytree, compressed, as an Orbax checkpoint.

`save` writes the params of any model (float, pruned, QArray leaves, or a mix)
with the compact encodings of `dnnr_jax.io.storage`: each leaf by its path in
the layout, stored dense, sparse (relative indices and values) or, for 4-bit
codes, packed two per byte, whichever is smallest. `load` restores the same
pytree exactly. The report compares the bytes on disk with the dense float32
tree.

Example:
  >>> report = dnnr_jax.save_params('models/cnn_int8', quantized_params)
  >>> report.ratio  # dense float32 bytes / bytes on disk
  >>> params = dnnr_jax.load_params('models/cnn_int8')
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any

import jax

from dnnr_jax.compress import quantize
from dnnr_jax.errors import CheckpointError
from dnnr_jax.io import checkpoint, storage

KIND = 'params'


@dataclasses.dataclass(frozen=True)
class SavedParams:
  """Where the params went and how small they are.

  Attributes:
    path: the checkpoint directory.
    bytes_on_disk: every file under it.
    dense_bytes: the same tree as float32 arrays (4 bytes per weight).
    ratio: dense_bytes / bytes_on_disk.
  """
  path: pathlib.Path
  bytes_on_disk: int
  dense_bytes: int
  ratio: float


def dense_bytes(params: Any) -> int:
  """Bytes of `params` with every leaf (QArrays included) as float32."""
  leaves = jax.tree.leaves(params, is_leaf=lambda leaf: isinstance(leaf, quantize.QArray))
  return sum(4 * math.prod(leaf.shape) for leaf in leaves)


def save(path: str | os.PathLike, params: Any, *, metadata: dict[str, Any] | None = None,
         overwrite: bool = False) -> SavedParams:
  """Writes `params` compressed; an existing `path` is replaced only with `overwrite`.

  Args:
    path: the checkpoint directory to create.
    params: any pytree of nested dicts of arrays and QArrays.
    metadata: JSON-ready entries kept beside the layout.
    overwrite: replace an existing checkpoint, once the new one is complete.
  """
  written = checkpoint.save_checkpoint(
      path, {'params': params}, {'kind': KIND, **(metadata or {})}, overwrite=overwrite)
  on_disk, dense = storage.directory_bytes(written), dense_bytes(params)
  return SavedParams(written, on_disk, dense, dense / on_disk)


def load(path: str | os.PathLike) -> Any:
  """The params pytree `save` wrote at `path`, QArrays and all."""
  metadata = checkpoint.read_metadata(path)
  if metadata.get('kind') != KIND:
    raise CheckpointError(f'{path} holds a {metadata.get("kind")!r} checkpoint, not params '
                          'written by save_params; load it with load_model.')
  return checkpoint.restore_variables(path, metadata['layout'])['params']
