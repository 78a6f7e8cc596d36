"""IDX files (the MNIST format), read with NumPy alone.

No JAX here: `dnnr predict` serves with onnxruntime and reads its images
through this module.
"""

from __future__ import annotations

import gzip
import math
import os
import pathlib
import zlib

import numpy as np

from dnnr_jax.errors import DataError

_IDX_MAGIC = {'images': 0x00000803, 'labels': 0x00000801}
_FIX = 're-download it or replace it with a good copy'


def read_idx(path: str | os.PathLike, *, kind: str) -> np.ndarray:
  """Reads one IDX file of unsigned bytes, gzipped (.gz) or not.

  Args:
    path: the file.
    kind: 'images' (3 dimensions) or 'labels' (1 dimension).

  Returns:
    A read-only uint8 array: [N, rows, cols] for images, [N] for labels.

  Raises:
    DataError: the file is unreadable, not valid gzip, not an IDX file of
      `kind`, or its payload is shorter or longer than its header says.
  """
  if kind not in _IDX_MAGIC:
    raise ValueError(f'kind must be images or labels, got {kind!r}')
  path = pathlib.Path(path)
  try:
    if path.suffix == '.gz':
      with gzip.open(path, 'rb') as stream:
        data = stream.read()
    else:
      data = path.read_bytes()
  except (OSError, EOFError, zlib.error) as error:
    raise DataError(
        f'{path} cannot be read or is not valid gzip ({error}); '
        f'{_FIX}.') from None
  ndim = _IDX_MAGIC[kind] & 0xFF
  header_size = 4 + 4 * ndim
  if len(data) < header_size:
    raise DataError(
        f'{path} is {len(data)} bytes long, too short for an IDX {kind} '
        f'header; {_FIX}.')
  magic, *dims = np.frombuffer(data, dtype='>u4', count=1 + ndim).tolist()
  if magic != _IDX_MAGIC[kind]:
    raise DataError(
        f'{path} is not an IDX {kind} file: magic number 0x{magic:08x}, '
        f'expected 0x{_IDX_MAGIC[kind]:08x} (unsigned bytes, {ndim} '
        f'dimension{"s" if ndim > 1 else ""}); {_FIX}.')
  expected = math.prod(dims)
  actual = len(data) - header_size
  if actual != expected:
    shape = ' x '.join(map(str, dims))
    state = 'truncated' if actual < expected else 'over-long'
    raise DataError(
        f'{path} is {state}: its header promises {shape} = {expected} bytes '
        f'of data but it holds {actual}; {_FIX}.')
  return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)
