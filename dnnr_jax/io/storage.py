"""Compact on-disk encodings: sparse kernels as relative indices plus values.

A pruned kernel is stored the way Deep Compression stores it (Han et al.
2016): the non-zero values in row-major order, and for each one the number
of zeros skipped since the previous one, as uint8. A run of more than 255
zeros is bridged by filler entries (gap 255, value 0), each advancing 256
positions. For s-sparse float32 weights this costs (1 + 4)·(1 − s)·n bytes
instead of 4·n; for int8 weights (1 + 1)·(1 − s)·n.

`encode_sparse` and `decode_sparse` are exact inverses for any array;
`encode_variables` picks the smallest encoding of every leaf of a variables
pytree (QArrays included), keeping the model's tree, and `decode_variables`
restores it exactly. A float32 array whose every value float16 holds exactly
(quantization scales and the biases of quantized models are rounded so) is
stored as float16. In a model with an encoded leaf, every array of every
leaf goes into one Brotli stream, the one uint8 leaf `entropy_coded`
(`dnnr_jax.io.entropy`; checkpoint format 8). `decode_variables` still reads
formats 6 and 7, which stored each layer as one uint8 leaf of frames,
`params/trunk_0/entropy_coded` (format 6 only the layers with an encoded
leaf, format 7 every group), and format 5, which kept each encoding's arrays
as named leaves (`params/trunk_0/kernel/{gaps, values}`). Checkpoint
formats 2 to 4 packed all arrays into one blob per dtype; `decode_blobs`
reads them. The format-4 to 7 layout rows are `compact_layout` and
`expand_layout`; format 8's are in `dnnr_jax.io.layout`.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pathlib
import tarfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dnnr_jax.compress import quantize
from dnnr_jax.compress.paths import path_name
from dnnr_jax.compress.quantize import is_qarray
from dnnr_jax.io import entropy

MAX_GAP = 255
CODED = 'entropy_coded'  # A coded layer's one leaf: params/trunk_0/entropy_coded.


def encode_sparse(array: np.ndarray) -> dict[str, np.ndarray]:
  """Relative-index encoding of an array's non-zeros.

  Args:
    array: any shape and dtype.

  Returns:
    {'gaps': uint8 [k], 'values': array.dtype [k]}: entry j advances the
    position by gaps[j] + 1 and writes values[j].
  """
  flat = np.asarray(array).reshape(-1)
  positions = np.flatnonzero(flat)
  skipped = np.diff(positions, prepend=-1) - 1
  fillers = skipped // (MAX_GAP + 1)
  remainders = skipped - fillers * (MAX_GAP + 1)
  # Each non-zero is preceded by its fillers: (255, 0) entries.
  per_entry = fillers + 1
  total = int(per_entry.sum())
  gaps = np.full(total, MAX_GAP, np.uint8)
  values = np.zeros(total, flat.dtype)
  ends = np.cumsum(per_entry) - 1
  gaps[ends] = remainders.astype(np.uint8)
  values[ends] = flat[positions]
  return {'gaps': gaps, 'values': values}


def decode_sparse(
    encoded: dict[str, np.ndarray], shape: tuple[int, ...], dtype=None
) -> np.ndarray:
  """Rebuilds the dense array from `encode_sparse`'s output."""
  gaps = np.asarray(encoded['gaps'], np.int64)
  values = np.asarray(encoded['values'])
  size = int(np.prod(shape, dtype=np.int64))
  dense = np.zeros(size, dtype or values.dtype)
  positions = np.cumsum(gaps + 1) - 1
  if positions.size and positions[-1] >= size:
    raise ValueError(
        f'sparse encoding reaches position {positions[-1]} of a {shape} array')
  dense[positions] = values
  return dense.reshape(shape)


def sparse_nbytes(array: np.ndarray) -> int:
  """Bytes `encode_sparse` would use, without encoding."""
  flat = np.asarray(array).reshape(-1)
  positions = np.flatnonzero(flat)
  skipped = np.diff(positions, prepend=-1) - 1
  entries = int((skipped // (MAX_GAP + 1) + 1).sum())
  return entries * (1 + flat.dtype.itemsize)


def directory_bytes(path: str | os.PathLike) -> int:
  """Total size of the regular files under `path`."""
  return sum(file.stat().st_size
             for file in pathlib.Path(path).rglob('*') if file.is_file())


def gzip_bytes(path: str | os.PathLike) -> int:
  """Size of the directory as a gzip-compressed (level 9) tar archive."""
  buffer = io.BytesIO()
  with gzip.GzipFile(fileobj=buffer, mode='wb', compresslevel=9, mtime=0) as zipped:
    with tarfile.open(fileobj=zipped, mode='w') as archive:
      archive.add(str(path), arcname=pathlib.Path(path).name)
  return buffer.tell()


def encode_variables(
    variables: Any, *, compact: bool = True,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
  """The arrays to save for a variables pytree, as the model's own tree, and a JSON layout.

  This is the one step between a model and what Orbax writes. A leaf stored
  dense stays a leaf of the variables' tree ('params/trunk_0/kernel'; a
  `jax.Array` stays one, with its sharding, so every process writes its own
  shards). Where a leaf is encoded (a sparse kernel `{'gaps', 'values'}`, a
  QArray `{'codes' | 'packed' | 'gaps', 'values', 'scale'[, 'zero_point']}`),
  every array of every leaf, biases and thresholds included, goes into one
  Brotli stream, the one uint8 leaf `CODED` at the root of the tree
  (`dnnr_jax.io.entropy`; checkpoint format 8).

  Args:
    variables: params and thresholds (QArrays allowed).
    compact: pick each leaf's smallest encoding (float arrays dense or
      sparse, float32 narrowed to float16 where exact; a QArray's codes
      dense int8, packed int4 or sparse) and entropy-code the model if a
      leaf is encoded. False stores every leaf as it is, as periodic
      checkpoints do so that they restore into sharded targets.

  Returns:
    (arrays, layout): the tree to save, and for each path such as
    'params/trunk_0/kernel' a JSON-ready spec of its encoding (with
    'stream', the coded stream's length in bytes, where the leaf is in it,
    and each array's byte offset in the decoded stream); `decode_variables`
    inverts it exactly.
  """
  entries, layout = encode_leaves(variables, compact)
  coded_leaves = _coded_leaves(entries, layout) if compact else []
  arrays: dict[str, Any] = {}
  if coded_leaves:
    coded = entropy.encode_stream(
        [array for path in coded_leaves for array in entries[path].values()])
    offset = 0
    for path in coded_leaves:
      layout[path]['stream'] = int(coded.size)
      for array in layout[path]['arrays'].values():  # [shape, dtype, byte offset]
        array[2] = offset
        offset += math.prod(array[0]) * np.dtype(array[1]).itemsize
    arrays[CODED] = coded
  for path, spec in layout.items():
    if 'stream' not in spec:
      entry = entries[path]
      _put(arrays, path, entry['dense'] if _is_dense(spec) else entry)
  return arrays, layout


def encode_leaves(variables: Any, compact: bool = True
                  ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
  """Each leaf's smallest encoding, before any entropy coding.

  Args:
    variables: params and thresholds (QArrays allowed).
    compact: as for `encode_variables`.

  Returns:
    (entries, layout): by path, the leaf's arrays by name (`{'dense': leaf}`
    for a dense one, `{'gaps', 'values'}` for a sparse one, ...), and its
    layout spec.
  """
  entries, layout = {}, {}
  leaves = jax.tree_util.tree_flatten_with_path(variables, is_leaf=is_qarray)[0]
  for key_path, leaf in leaves:
    path = path_name(key_path)
    if is_qarray(leaf):
      codes = np.asarray(leaf.value)
      entry, spec = _encode_codes(codes, leaf.bits)
      entry['scale'] = np.asarray(leaf.scale)
      if leaf.zero_point is not None:
        entry['zero_point'] = np.asarray(leaf.zero_point)
      spec.update(kind='qarray', bits=leaf.bits, axis=leaf.axis, symmetric=leaf.symmetric)
    elif not compact or not _on_this_host(leaf):
      entry = {'dense': leaf}
      spec = {'kind': 'array', 'shape': list(leaf.shape),
              'dtype': np.dtype(leaf.dtype).name, 'encoding': 'dense', 'arrays': {}}
    else:
      entry, spec = _encode_dense_or_sparse(np.asarray(leaf))
    if spec['encoding'] == 'sparse' and not entry['gaps'].size:
      # All zeros. Orbax saves no empty array: one entry writes a zero at position 0.
      entry.update(gaps=np.zeros(1, np.uint8), values=np.zeros(1, entry['values'].dtype))
    if compact:
      entry = {name: _narrowed(np.asarray(array)) if _on_this_host(array) else array
               for name, array in entry.items()}
    for name, array in entry.items():
      spec['arrays'][name] = [list(array.shape), np.dtype(array.dtype).name, 0]
    entries[path], layout[path] = entry, spec
  return entries, layout


def _coded_leaves(entries: dict[str, dict], layout: dict[str, dict]) -> list[str]:
  """The leaves to entropy-code into the one stream, in layout order.

  Where any leaf is encoded (sparse, int4 or a QArray), every leaf this
  process holds whole is coded, the thresholds and float layers too: each
  Orbax array costs a `.zarray` file, tree metadata and a digest (format 8).
  A model with no encoded leaf (a final or periodic checkpoint) keeps plain
  leaves, so it restores into shardings.
  """
  if any(path.split('/', 1)[0] == CODED for path in layout):  # The name is taken.
    return []
  codable = [path for path in layout
             if all(_on_this_host(array) for array in entries[path].values())]
  if not any(not _is_dense(layout[path]) for path in codable):
    return []
  return codable


def _is_dense(spec: dict[str, Any]) -> bool:
  return spec['kind'] == 'array' and spec['encoding'] == 'dense'


def abstract_variables(layout: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """The tree `encode_variables` saved, as shapes and dtypes to restore it.

  A leaf with 'stream' is in the one coded leaf at the root (format 8); one
  with 'frames' in its layer's coded leaf (formats 6 and 7).
  """
  tree: dict[str, Any] = {}
  coded: dict[str, int] = {}
  for path, spec in layout.items():
    if 'stream' in spec:
      coded[CODED] = spec['stream']
      continue
    if 'frames' in spec:
      parent = f'{path.rsplit("/", 1)[0]}/{CODED}'
      coded[parent] = coded.get(parent, 0) + sum(spec['frames'].values())
      continue
    entry = {name: jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
             for name, (shape, dtype, _) in spec['arrays'].items()}
    _put(tree, path, entry['dense'] if _is_dense(spec) else entry)
  for path, size in coded.items():
    _put(tree, path, jax.ShapeDtypeStruct((size,), np.uint8))
  return tree


def decode_variables(arrays: dict[str, Any], layout: dict[str, dict[str, Any]]) -> Any:
  """Rebuilds the variables pytree (QArrays included) from the saved tree.

  Raises:
    ValueError: the coded stream or frames do not decode (a damaged array).
  """
  decoded = {**_decode_stream(arrays, layout), **_decode_layers(arrays, layout)}
  variables: dict[str, Any] = {}
  for path, spec in layout.items():
    if path in decoded:
      entry = decoded[path]
    else:
      node = _get(arrays, path)
      entry = node if isinstance(node, dict) else {'dense': node}
    _put(variables, path, _decode_leaf(
        {name: np.asarray(array) for name, array in entry.items()}, spec))
  return variables


def _decode_stream(arrays: dict[str, Any], layout: dict[str, dict[str, Any]]
                   ) -> dict[str, dict[str, np.ndarray]]:
  """The arrays of every leaf in the one coded stream (format 8), by path and name."""
  names = [(path, name) for path, spec in layout.items() if 'stream' in spec
           for name in spec['arrays']]
  if not names:
    return {}
  specs = [(layout[path]['arrays'][name][1], layout[path]['arrays'][name][0])
           for path, name in names]
  decoded: dict[str, dict[str, np.ndarray]] = {}
  streams = entropy.decode_stream(np.asarray(arrays[CODED]), specs)
  for (path, name), stream in zip(names, streams, strict=True):
    decoded.setdefault(path, {})[name] = stream
  return decoded


def _decode_layers(arrays: dict[str, Any], layout: dict[str, dict[str, Any]]
                   ) -> dict[str, dict[str, np.ndarray]]:
  """The arrays of every leaf of the coded layers (formats 6 and 7), by path and name."""
  layers: dict[str, list[str]] = {}
  for path, spec in layout.items():
    if 'frames' in spec:
      layers.setdefault(path.rsplit('/', 1)[0], []).append(path)
  decoded = {}
  for parent, paths in layers.items():
    names = [(path, name) for path in paths for name in layout[path]['arrays']]
    specs = [(layout[path]['arrays'][name][1], layout[path]['arrays'][name][0],
              layout[path]['frames'][name]) for path, name in names]
    streams = entropy.decode_frames(np.asarray(_get(arrays, f'{parent}/{CODED}')), specs)
    for (path, name), stream in zip(names, streams, strict=True):
      decoded.setdefault(path, {})[name] = stream
  return decoded


def encode_blobs(variables: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
  """Formats 2 to 4: every leaf encoded, then one flat blob per dtype.

  Only read now (`decode_blobs`); this writer is kept so that tests write
  real checkpoints of those formats.

  Returns:
    (blobs, layout): {dtype name: 1-D array}, and per path where its arrays
    sit in the blobs.
  """
  blobs: dict[str, list[np.ndarray]] = {}
  entries, layout = encode_leaves(variables)
  for path, spec in layout.items():
    for name, array in entries[path].items():
      array = np.asarray(array)
      parts = blobs.setdefault(array.dtype.name, [])
      spec['arrays'][name][2] = sum(part.size for part in parts)
      parts.append(array.reshape(-1))
  blobs = {dtype: np.concatenate(parts) for dtype, parts in blobs.items()}
  return {dtype: blob for dtype, blob in blobs.items() if blob.size}, layout


def compact_layout(layout: dict[str, dict[str, Any]]) -> list[list[Any]]:
  """A layout as formats 4 to 7 stored it: short rows (format 8: `io.layout.pack_layout`).

  One row per leaf, in blob order: [path, dtype, shape, encoding, arrays]
  with arrays [[name, dtype, shape(, frame length)], ...] (the frame
  length where the leaf's layer is entropy-coded), and a QArray's [bits,
  axis, symmetric] appended. The offsets are left out, since blobs and
  frames are filled in row order; `expand_layout` recomputes them. 60 % of
  the bytes: 2.4 -> 1.4 kB for the default MNIST model.
  """
  rows = []
  for path, spec in layout.items():
    frames = spec.get('frames', {})
    row = [path, spec['dtype'], spec['shape'], spec['encoding'],
           [[name, dtype, shape, *([frames[name]] if name in frames else [])]
            for name, (shape, dtype, _) in spec['arrays'].items()]]
    if spec['kind'] == 'qarray':
      row.append([spec['bits'], spec['axis'], spec['symmetric']])
    rows.append(row)
  return rows


def expand_layout(rows: list[list[Any]]) -> dict[str, dict[str, Any]]:
  """The layout `compact_layout` shortened, offsets included: its exact inverse.

  Raises:
    ValueError: `rows` is not a compact layout.
  """
  layout, filled = {}, {}
  try:
    for path, dtype, shape, encoding, arrays, *quantized in rows:
      spec = {'kind': 'qarray' if quantized else 'array', 'shape': list(shape),
              'dtype': dtype, 'encoding': encoding, 'arrays': {}}
      frames = {}
      for name, array_dtype, array_shape, *frame in arrays:
        offset = filled.get(array_dtype, 0)
        spec['arrays'][name] = [list(array_shape), array_dtype, offset]
        filled[array_dtype] = offset + math.prod(array_shape)
        if frame:
          (frames[name],) = frame
          if not isinstance(frames[name], int) or frames[name] < 0:
            raise ValueError(f'frame length {frames[name]!r} of {path}/{name}')
      if frames and len(frames) != len(spec['arrays']):
        raise ValueError(f'{path} has frames for some of its arrays only')
      if frames:
        spec['frames'] = frames
      if quantized:
        (spec['bits'], spec['axis'], spec['symmetric']), = quantized
      layout[path] = spec
  except (TypeError, ValueError) as error:
    raise ValueError(f'not a compact layout: {error}') from None
  return layout


def abstract_blobs(layout: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """The blobs of formats 2 to 4, as shapes and dtypes to restore them."""
  sizes: dict[str, int] = {}
  for spec in layout.values():
    for shape, dtype, offset in spec['arrays'].values():
      sizes[dtype] = max(sizes.get(dtype, 0), offset + math.prod(shape))
  return {dtype: jax.ShapeDtypeStruct((size,), np.dtype(dtype))
          for dtype, size in sizes.items() if size}


def decode_blobs(blobs: dict[str, Any], layout: dict[str, dict[str, Any]]) -> Any:
  """Rebuilds the variables pytree from the blobs of formats 2 to 4."""
  variables: dict[str, Any] = {}
  blobs = {dtype: np.asarray(blob) for dtype, blob in blobs.items()}
  for path, spec in layout.items():
    entry = {name: blobs.get(dtype, np.zeros(0, dtype))[offset:offset + math.prod(shape)]
             .reshape(shape) for name, (shape, dtype, offset) in spec['arrays'].items()}
    _put(variables, path, _decode_leaf(entry, spec))
  return variables


def _decode_leaf(entry: dict[str, np.ndarray], spec: dict[str, Any]) -> Any:
  shape, dtype = tuple(spec['shape']), np.dtype(spec['dtype'])
  if spec['encoding'] == 'sparse':
    value = decode_sparse(entry, shape, dtype)
  elif spec['encoding'] == 'int4':
    value = np.asarray(quantize.unpack_int4(entry['packed'], shape))
  else:
    value = np.asarray(entry['codes' if 'codes' in entry else 'dense'], dtype)
  if spec['kind'] == 'qarray':
    return quantize.QArray(
        jnp.asarray(value), jnp.asarray(entry['scale'], jnp.float32),
        jnp.asarray(entry['zero_point']) if 'zero_point' in entry else None,
        bits=spec['bits'], axis=spec['axis'], symmetric=spec['symmetric'])
  return jnp.asarray(value)


def _on_this_host(leaf: Any) -> bool:
  """Whether every value of `leaf` can be read here (not sharded across processes)."""
  return (not isinstance(leaf, jax.Array) or leaf.is_fully_addressable
          or leaf.is_fully_replicated)


def _get(tree: dict[str, Any], path: str) -> Any:
  for part in path.split('/'):
    tree = tree[part]
  return tree


def _narrowed(array: np.ndarray) -> np.ndarray:
  """float16 if that holds every value of a float32 array exactly, else the array."""
  if array.dtype == np.float32 and array.size:
    half = array.astype(np.float16)
    if np.array_equal(half.astype(np.float32), array):  # NaN is never equal: kept.
      return half
  return array


def _put(tree: dict[str, Any], path: str, value: Any) -> None:
  *parents, name = path.split('/')
  for part in parents:
    tree = tree.setdefault(part, {})
  tree[name] = value


def _encode_dense_or_sparse(array: np.ndarray) -> tuple[dict, dict]:
  spec = {'kind': 'array', 'shape': list(array.shape), 'dtype': array.dtype.name}
  if array.ndim >= 2 and sparse_nbytes(array) < array.nbytes:
    entry = encode_sparse(array)
    spec['encoding'] = 'sparse'
  else:
    entry = {'dense': array}
    spec['encoding'] = 'dense'
  spec['arrays'] = {}
  return entry, spec


def _encode_codes(codes: np.ndarray, bits: int) -> tuple[dict, dict]:
  spec = {'shape': list(codes.shape), 'dtype': 'int8'}
  options = [('dense', {'codes': codes})]
  if bits == 4:
    options.append(('int4', {'packed': np.asarray(quantize.pack_int4(codes))}))
  if sparse_nbytes(codes) < codes.nbytes:
    options.append(('sparse', encode_sparse(codes)))
  encoding, entry = min(
      options, key=lambda option: sum(array.nbytes for array in option[1].values()))
  spec['encoding'] = encoding
  spec['arrays'] = {}
  return dict(entry), spec
