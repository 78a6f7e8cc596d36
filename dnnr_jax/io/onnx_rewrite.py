"""Shared machinery of the ONNX graph rewrites (`onnx_passes`, `onnx_integer`).

A rewrite is an onnx-ir in-place pass that offers every node of one type to
a `rewrite` method; the helpers insert replacement nodes, redirect uses and
read or add constants.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


class NodeRewritePass(ir.passes.InPlacePass):
  """Offers every node of `op_type` (default domain, subgraphs included) to `rewrite`."""
  op_type: str

  def call(self, model: ir.Model) -> ir.passes.PassResult:
    modified = False
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
      if node.op_type == self.op_type and not node.domain:
        modified |= self.rewrite(node)
    return ir.passes.PassResult(model, modified)

  def rewrite(self, node: ir.Node) -> bool:
    """Rewrites `node` in place if it can; says whether it did."""
    raise NotImplementedError


def substitute(node: ir.Node, new_nodes: list[ir.Node], result: ir.Value) -> None:
  """Inserts `new_nodes` before `node`, lets `result` stand for its output, removes it."""
  node.graph.insert_before(node, new_nodes)
  result.dtype, result.shape = node.outputs[0].dtype, node.outputs[0].shape
  replace(node.outputs[0], result)
  node.graph.remove(node, safe=True)


def replace(old: ir.Value, new: ir.Value) -> None:
  """Points every use of `old` at the newly made `new`; a graph output keeps its name."""
  name = old.name if old.is_graph_output() else None
  ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
  if name is not None:
    old.name = f'{name}_replaced'
    new.name = name


def constant_value(value: ir.Value | None) -> np.ndarray | None:
  """The value of a constant, or of a Reshape of a constant by a constant shape."""
  if value is None:
    return None
  tensor = ir.convenience.get_const_tensor(value)
  if tensor is not None:
    return tensor.numpy()
  producer = value.producer()
  if producer is not None and producer.op_type == 'Reshape' and not producer.domain:
    data, shape = (constant_value(input_value) for input_value in producer.inputs[:2])
    if data is not None and shape is not None and not producer.attributes.get_int(
        'allowzero', 0) and 0 not in shape:
      return data.reshape(shape)
  return None


def constant(graph: ir.Graph, name: str, value: np.ndarray) -> ir.Value:
  """A new initializer of `graph`."""
  value = np.asarray(value)
  initializer = ir.Value(name=name, const_value=ir.tensor(value))
  initializer.dtype = ir.DataType.from_numpy(value.dtype)
  initializer.shape = ir.Shape(value.shape)
  graph.register_initializer(initializer)
  return initializer


def reshape(node: ir.Node, value: ir.Value, shape: list[int], suffix: str,
            new_nodes: list) -> ir.Value:
  """`Reshape(value, shape)` named after `node`, appended to `new_nodes`; a 0 keeps
  that input dimension (allowzero 0)."""
  reshaped = ir.node('Reshape', [value, constant(node.graph, f'{node.name}_{suffix}_shape',
                                                 np.array(shape, np.int64))],
                     name=f'{node.name}_{suffix}')
  reshaped.outputs[0].dtype = value.dtype
  new_nodes.append(reshaped)
  return reshaped.outputs[0]
