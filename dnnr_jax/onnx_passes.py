"""Rewrites of jax2onnx graphs for onnxruntime: integer kernels and fewer nodes.

jax2onnx lowers the int8 dot `jnp.dot(x8, w8, preferred_element_type=int32)`
to `Cast(int32)`, `Cast(int32)`, `MatMul`: a 32-bit integer matmul that
onnxruntime runs several times slower than float. `optimize` rewrites it to
`MatMulInteger(x8, w8)`, which onnxruntime runs on its int8 GEMM kernels
(VNNI where the CPU has it) with the int8 weights kept as int8 initializers.
The int32 result is the same, so outputs do not change.

It also removes what broadcasting already does: an `Expand` whose consumers
broadcast anyway, a `Reshape` that only appends unit axes (an `Unsqueeze`),
`Identity` nodes, and the shape arithmetic left unused. Every pass keeps the
graph's outputs bit for bit; `dnnr_jax.export` proves the result in
onnxruntime against JAX before it writes anything.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common

# Elementwise ops with multidirectional (numpy) broadcasting.
_BROADCASTING = frozenset({
    'Add', 'Sub', 'Mul', 'Div', 'Pow', 'Max', 'Min', 'Where', 'And', 'Or', 'Xor',
    'Equal', 'Greater', 'GreaterOrEqual', 'Less', 'LessOrEqual',
})
_INT8 = (ir.DataType.INT8, ir.DataType.UINT8)


class IntegerMatMulPass(ir.passes.InPlacePass):
  """`MatMul(Cast<int32>(a8), Cast<int32>(b8))` -> `MatMulInteger(a8, b8)`."""

  def call(self, model: ir.Model) -> ir.passes.PassResult:
    modified = False
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
      if node.op_type != 'MatMul' or node.domain:
        continue
      sources = [_int8_source(value) for value in node.inputs]
      if None in sources:
        continue
      activations, weights = sources
      new_nodes = []
      if activations.dtype == ir.DataType.INT8:
        # onnxruntime's int8 GEMM wants uint8 activations (u8s8, VNNI):
        # a + 128 with zero point 128 gives the same int32 products.
        activations, zero_point = _shift_to_uint8(node, activations, new_nodes)
      else:
        zero_point = None
      integer = ir.node(
          'MatMulInteger', [activations, weights] + ([zero_point] if zero_point else []),
          name=f'{node.name}_integer')
      new_nodes.append(integer)
      node.graph.insert_before(node, new_nodes)
      output = integer.outputs[0]
      output.dtype, output.shape = ir.DataType.INT32, node.outputs[0].shape
      ir.convenience.replace_all_uses_with(node.outputs[0], output, replace_graph_outputs=True)
      node.graph.remove(node, safe=True)
      modified = True
    return ir.passes.PassResult(model, modified)


class BroadcastExpandPass(ir.passes.InPlacePass):
  """Drops an `Expand` that changes no shape or whose consumers all broadcast anyway."""

  def call(self, model: ir.Model) -> ir.passes.PassResult:
    modified = False
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
      if node.op_type != 'Expand' or node.domain:
        continue
      source, expanded = node.inputs[0], node.outputs[0]
      same = _known(source.shape) and list(source.shape) == list(expanded.shape)
      if expanded.is_graph_output() or not (same or all(
          _broadcasts_to(use.node, use.idx, expanded) for use in expanded.uses())):
        continue
      ir.convenience.replace_all_uses_with(expanded, source)
      node.graph.remove(node, safe=True)
      modified = True
    return ir.passes.PassResult(model, modified)


class UnsqueezeReshapePass(ir.passes.InPlacePass):
  """`Reshape` of [d..] to [d.., 1, ..] with a computed shape -> `Unsqueeze`."""

  def call(self, model: ir.Model) -> ir.passes.PassResult:
    modified = False
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
      if node.op_type != 'Reshape' or node.domain:
        continue
      source, reshaped = node.inputs[0], node.outputs[0]
      if not _known(source.shape) or not _known(reshaped.shape):
        continue
      before, after = list(source.shape), list(reshaped.shape)
      if len(after) <= len(before) or after[:len(before)] != before or any(
          dim != 1 for dim in after[len(before):]):
        continue
      axes = _constant(node.graph, f'{node.name}_axes',
                       np.arange(len(before), len(after), dtype=np.int64))
      unsqueeze = ir.node('Unsqueeze', [source, axes], name=f'{node.name}_unsqueeze')
      node.graph.insert_before(node, unsqueeze)
      output = unsqueeze.outputs[0]
      output.dtype, output.shape = reshaped.dtype, reshaped.shape
      ir.convenience.replace_all_uses_with(reshaped, output, replace_graph_outputs=True)
      node.graph.remove(node, safe=True)
      modified = True
    return ir.passes.PassResult(model, modified)


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
  """The rewritten model: integer matmuls on int8 kernels, redundant nodes removed."""
  ir_model = ir.from_proto(model)
  ir.passes.Sequential(
      IntegerMatMulPass(),
      BroadcastExpandPass(),
      UnsqueezeReshapePass(),
      common.IdentityEliminationPass(),
      common.RemoveUnusedNodesPass(),
      common.TopologicalSortPass(),
      common.NameFixPass(),  # unique names for the new values, subgraphs included
  )(ir_model)
  return ir.to_proto(ir_model)


def _int8_source(value: ir.Value | None) -> ir.Value | None:
  """The int8 value that `value` is the int32 cast of, else None."""
  node = value.producer() if value is not None else None
  if node is None or node.op_type != 'Cast' or node.domain:
    return None
  if node.attributes.get_int('to') != ir.DataType.INT32:
    return None
  source = node.inputs[0]
  return source if source.dtype in _INT8 else None


def _shift_to_uint8(node, codes, new_nodes):
  """uint8 codes + 128 of int8 `codes`, and the zero point 128 (appends nodes)."""
  graph = node.graph
  producer = codes.producer()
  offset = _constant(graph, f'{node.name}_offset', np.float32(128))
  zero_point = _constant(graph, f'{node.name}_zero_point', np.uint8(128))
  if producer is not None and producer.op_type == 'Cast' and _whole_int8_floats(
      producer.inputs[0]):
    # Codes cast from whole floats in [-128, 127]: shift before the cast.
    shifted = ir.node('Add', [producer.inputs[0], offset], name=f'{node.name}_shift')
    unsigned = ir.node('Cast', [shifted.outputs[0]], {'to': ir.DataType.UINT8},
                       name=f'{node.name}_to_uint8')
    new_nodes += [shifted, unsigned]
  else:
    widened = ir.node('Cast', [codes], {'to': ir.DataType.INT16}, name=f'{node.name}_to_int16')
    offset16 = _constant(graph, f'{node.name}_offset16', np.int16(128))
    shifted = ir.node('Add', [widened.outputs[0], offset16], name=f'{node.name}_shift')
    unsigned = ir.node('Cast', [shifted.outputs[0]], {'to': ir.DataType.UINT8},
                       name=f'{node.name}_to_uint8')
    new_nodes += [widened, shifted, unsigned]
  output = unsigned.outputs[0]
  output.dtype, output.shape = ir.DataType.UINT8, codes.shape
  return output, zero_point


def _whole_int8_floats(value: ir.Value) -> bool:
  """`value` is Clip(Round(.), lo, hi) in float with constant -128 <= lo <= hi <= 127."""
  clip = value.producer()
  if value.dtype != ir.DataType.FLOAT or clip is None or clip.op_type != 'Clip' or len(
      clip.inputs) != 3:
    return False
  source = clip.inputs[0].producer()
  bounds = [ir.convenience.get_const_tensor(bound) for bound in clip.inputs[1:]]
  if source is None or source.op_type != 'Round' or None in bounds:
    return False
  low, high = (float(bound.numpy()) for bound in bounds)
  return -128 <= low <= high <= 127


def _constant(graph: ir.Graph, name: str, value: np.ndarray) -> ir.Value:
  """A new initializer of `graph`."""
  value = np.asarray(value)
  constant = ir.Value(name=name, const_value=ir.tensor(value))
  constant.dtype, constant.shape = ir.DataType.from_numpy(value.dtype), ir.Shape(value.shape)
  graph.register_initializer(constant)
  return constant


def _broadcasts_to(consumer: ir.Node, index: int, expanded: ir.Value) -> bool:
  """Whether `consumer` gives the same output when input `index` is not expanded.

  True when the op broadcasts and another input already has the expanded
  shape, so the output shape cannot shrink.
  """
  if consumer.op_type not in _BROADCASTING or consumer.domain or not _known(expanded.shape):
    return False
  return any(
      other is not None and other is not expanded and _known(other.shape)
      and list(other.shape) == list(expanded.shape)
      for position, other in enumerate(consumer.inputs) if position != index)


def _known(shape: ir.Shape | None) -> bool:
  """Every dimension is an int or a named symbol (so equality means equal)."""
  return shape is not None and all(
      isinstance(dim, int) or (isinstance(dim, ir.SymbolicDim) and dim.value is not None)
      for dim in shape)
