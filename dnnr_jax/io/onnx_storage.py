"""Compact, portable storage of pruned and 4-bit weights inside an ONNX file.

`compact_initializers` rewrites the initializers of a model (and of its `If`
branches) so that the file holds only what is not implied:

* a mostly-zero tensor becomes its non-zero values and the gaps between
  their flat positions (Deep Compression's relative indices), decoded
  inside the graph by standard operators:
  `Reshape(ScatterElements(ConstantOfShape(size), CumSum(Cast(gaps)),
  Cast(values)), shape)`. A gap longer than the widest code is bridged by
  filler entries of value zero. Gaps are 4-bit (UINT4) or 8-bit (UINT8),
  whichever makes the smaller tensor;
* int8 values that all lie in [-8, 7] (4-bit codes) are stored as ONNX INT4,
  two per byte, and cast back to int8 in the graph.

Every decoding node has only constant inputs, so onnxruntime folds it when
the session is created (its optimized graph holds the dense tensor again,
and each call costs what the dense file's call costs), while the file stays
standard ONNX: `onnx.checker.check_model(full_check=True)` accepts it and
`onnx.reference.ReferenceEvaluator` runs it. Values and positions are
exact, so the function computed does not change.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Smallest tensor worth rewriting: below this the decoding nodes cost more than they save.
MIN_ELEMENTS = 256
_INT4_MIN, _INT4_MAX = -8, 7
_GAP_TYPES = ((TensorProto.UINT4, 15, 0.5), (TensorProto.UINT8, 255, 1.0))


def compact_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
  """The model with its initializers stored compactly where that is smaller.

  Args:
    model: an ONNX model; left unchanged.

  Returns:
    A new model computing the same function: mostly-zero tensors as values
    and gaps, 4-bit int8 codes as INT4 (see the module docstring), in the
    main graph and in subgraphs (the branches of an `If`) alike, each
    decoded in the graph that holds it.
  """
  model = onnx.ModelProto.FromString(model.SerializeToString())
  _compact_graph(model.graph)
  return model


def _compact_graph(graph: onnx.GraphProto) -> None:
  """Rewrites `graph`'s initializers and those of its subgraphs, in place."""
  for node in graph.node:
    for attribute in node.attribute:
      if attribute.type == onnx.AttributeProto.GRAPH:
        _compact_graph(attribute.g)
      for subgraph in attribute.graphs:
        _compact_graph(subgraph)
  kept, decoders, added = [], [], []
  for tensor in graph.initializer:
    array = numpy_helper.to_array(tensor)
    encoded = _encode(tensor.name, array) if array.size >= MIN_ELEMENTS else None
    if encoded is None:
      kept.append(tensor)
      continue
    nodes, initializers = encoded
    decoders += nodes
    added += initializers
  if not decoders:
    return
  del graph.initializer[:]
  graph.initializer.extend(kept + added)
  nodes = list(graph.node)
  del graph.node[:]
  graph.node.extend(decoders + nodes)


def _encode(name: str, array: np.ndarray) -> tuple[list, list] | None:
  """Decoding nodes and their initializers for `array`, or None if the dense form is smaller."""
  flat = array.reshape(-1)
  positions = np.flatnonzero(flat)
  four_bit = array.dtype == np.int8 and _fits_int4(flat)
  value_bytes = 0.5 if four_bit else array.itemsize
  dense_bytes = array.size * value_bytes
  gaps, gap_type, gap_bytes = _smallest_gaps(positions, value_bytes)
  if gaps.size * (value_bytes + gap_bytes) + 64 < dense_bytes:
    return _sparse_decoder(name, array, flat, gaps, gap_type, four_bit)
  if four_bit:
    packed = _packed(f'{name}_int4', TensorProto.INT4, array.shape, flat)
    cast = helper.make_node('Cast', [packed.name], [name], to=TensorProto.INT8,
                            name=f'{name}_from_int4')
    return [cast], [packed]
  return None


def _smallest_gaps(positions: np.ndarray, value_bytes: float) -> tuple[np.ndarray, int, float]:
  """The gap codes (fillers included), their ONNX type and bytes per gap, whichever
  stores the gaps and values (a filler has a value too) in fewer bytes."""
  best, best_bytes = None, None
  for onnx_type, widest, gap_bytes in _GAP_TYPES:
    gaps = _gaps(positions, widest)
    stored = gaps.size * (gap_bytes + value_bytes)
    if best is None or stored < best_bytes:
      best, best_bytes = (gaps, onnx_type, gap_bytes), stored
  return best


def _gaps(positions: np.ndarray, widest: int) -> np.ndarray:
  """Gaps between successive positions (the first from 0), each at most `widest`.

  A longer gap is split into steps of `widest` (each a filler entry of value
  zero) and a remainder, so `cumsum` of the result visits every position.
  """
  differences = np.diff(positions, prepend=0)
  fillers = np.maximum(differences - 1, 0) // widest
  gaps = np.full(differences.size + int(fillers.sum()), widest, np.int64)
  ends = np.cumsum(fillers + 1) - 1  # where each real entry's remainder goes
  gaps[ends] = differences - fillers * widest
  return gaps


def _sparse_decoder(name, array, flat, gaps, gap_type, four_bit):
  """Nodes decoding values and gaps into `name`, and the initializers they read."""
  positions = np.cumsum(gaps)
  values = flat[positions]  # fillers pick up their zero
  initializers = [
      _packed(f'{name}_values', TensorProto.INT4, [values.size], values)
      if four_bit else numpy_helper.from_array(values, f'{name}_values'),
      _packed(f'{name}_gaps', gap_type, [gaps.size], gaps)
      if gap_type == TensorProto.UINT4 else numpy_helper.from_array(
          gaps.astype(np.uint8), f'{name}_gaps'),
      numpy_helper.from_array(np.array(0, np.int64), f'{name}_axis'),
      numpy_helper.from_array(np.array([flat.size], np.int64), f'{name}_size'),
      numpy_helper.from_array(np.array(array.shape, np.int64), f'{name}_shape'),
  ]
  element_type = helper.np_dtype_to_tensor_dtype(array.dtype)
  zero = numpy_helper.from_array(np.zeros(1, array.dtype), f'{name}_zero')
  nodes = [
      helper.make_node('Cast', [f'{name}_gaps'], [f'{name}_gaps64'], to=TensorProto.INT64,
                       name=f'{name}_widen_gaps'),
      helper.make_node('CumSum', [f'{name}_gaps64', f'{name}_axis'], [f'{name}_positions'],
                       name=f'{name}_positions'),
      helper.make_node('ConstantOfShape', [f'{name}_size'], [f'{name}_zeros'], value=zero,
                       name=f'{name}_zeros'),
  ]
  values_name = f'{name}_values'
  if four_bit:
    nodes.append(helper.make_node('Cast', [values_name], [f'{name}_values8'],
                                  to=element_type, name=f'{name}_from_int4'))
    values_name = f'{name}_values8'
  nodes += [
      helper.make_node('ScatterElements', [f'{name}_zeros', f'{name}_positions', values_name],
                       [f'{name}_flat'], name=f'{name}_scatter'),
      helper.make_node('Reshape', [f'{name}_flat', f'{name}_shape'], [name],
                       name=f'{name}_reshape'),
  ]
  return nodes, initializers


def _fits_int4(values: np.ndarray) -> bool:
  return values.size == 0 or (values.min() >= _INT4_MIN and values.max() <= _INT4_MAX)


def _packed(name: str, onnx_type: int, shape, values: np.ndarray) -> onnx.TensorProto:
  """A 4-bit tensor, two values a byte, the first in the low nibble (as ONNX lays them out)."""
  nibbles = np.bitwise_and(values.reshape(-1).astype(np.int64), 0x0F).astype(np.uint8)
  nibbles = np.pad(nibbles, (0, nibbles.size % 2)).reshape(-1, 2)
  data = (nibbles[:, 0] | (nibbles[:, 1] << 4)).astype(np.uint8).tobytes()
  return helper.make_tensor(name, onnx_type, list(shape), data, raw=True)
