"""Rewrites of jax2onnx graphs for onnxruntime: integer kernels and fewer nodes.

jax2onnx lowers the int8 dot `jnp.dot(x8, w8, preferred_element_type=int32)`
to `Cast(int32)`, `Cast(int32)`, `MatMul`: a 32-bit integer matmul that
onnxruntime runs several times slower than float. `optimize` rewrites it to
a uint8 x int8 `MatMulInteger` (`dnnr_jax.io.onnx_integer`), which onnxruntime runs
on its fast int8 GEMM kernels (VNNI or AMX where the CPU has them) with the
int8 weights kept as int8 initializers. The int32 result is the same on
every CPU, so outputs do not change.

It also removes work: a `ReduceLogSumExp` that recomputes exponentials the
graph already sums, a slow `ReduceSumSquare` (now a `Mul` and a
`ReduceSum`), a bias `Add` after a `Gemm` with zero bias (folded into the
`Gemm`), an `Expand` whose consumers broadcast anyway, a `Reshape` that
only appends unit axes (an `Unsqueeze`), `Abs` of a ReLU, `Identity` nodes,
`Transpose`s that move no axis, `Shape` + `Gather` + `Concat` chains that
read a tensor's batch size (one sliced `Shape`), repeated subexpressions (the
deep block and the shortcut quantize the same input), and the shape
arithmetic and the branch constants left unused.
Every pass computes the same function: bit for bit, or (the log-sum-exp,
sum-of-squares and Gemm bias rewrites) up to float rounding;
`dnnr_jax.io.export` proves the result in onnxruntime against JAX before it
writes anything.

Storing pruned and 4-bit weights compactly is `dnnr_jax.io.onnx_storage`'s
work.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common

from dnnr_jax.io.onnx_affine import ChannelAffinePass
from dnnr_jax.io.onnx_batch_quant import BatchQuantizeLinearPass, CentredMatMulPass
from dnnr_jax.io.onnx_conv import IntegerConvPass
from dnnr_jax.io.onnx_integer import (
    IntegerMatMulPass,
    RowQuantizeLinearPass,
    ScaleFloorPass,
    non_negative,
)
from dnnr_jax.io.onnx_rewrite import (
    NodeRewritePass,
    constant,
    constant_value,
    replace,
    substitute,
)
from dnnr_jax.io.onnx_static_conv import StaticConvPass

# Elementwise ops with multidirectional (numpy) broadcasting.
_BROADCASTING = frozenset({
    'Add', 'Sub', 'Mul', 'Div', 'Pow', 'Max', 'Min', 'Where', 'And', 'Or', 'Xor',
    'Equal', 'Greater', 'GreaterOrEqual', 'Less', 'LessOrEqual',
})


class BroadcastExpandPass(NodeRewritePass):
  """Drops an `Expand` that changes no shape or whose consumers all broadcast anyway."""
  op_type = 'Expand'

  def rewrite(self, node: ir.Node) -> bool:
    source, expanded = node.inputs[0], node.outputs[0]
    same = _known(source.shape) and list(source.shape) == list(expanded.shape)
    if expanded.is_graph_output() or not (same or all(
        _broadcasts_to(use.node, use.idx, expanded) for use in expanded.uses())):
      return False
    ir.convenience.replace_all_uses_with(expanded, source)
    node.graph.remove(node, safe=True)
    return True


class UnsqueezeReshapePass(NodeRewritePass):
  """`Reshape` of [d..] to [d.., 1, ..] with a computed shape -> `Unsqueeze`."""
  op_type = 'Reshape'

  def rewrite(self, node: ir.Node) -> bool:
    source, reshaped = node.inputs[0], node.outputs[0]
    if not _known(source.shape) or not _known(reshaped.shape):
      return False
    before, after = list(source.shape), list(reshaped.shape)
    if len(after) <= len(before) or after[:len(before)] != before or any(
        dim != 1 for dim in after[len(before):]):
      return False
    axes = constant(node.graph, f'{node.name}_axes',
                     np.arange(len(before), len(after), dtype=np.int64))
    unsqueeze = ir.node('Unsqueeze', [source, axes], name=f'{node.name}_unsqueeze')
    substitute(node, [unsqueeze], unsqueeze.outputs[0])
    return True


class LogOfSummedExpPass(NodeRewritePass):
  """`ReduceLogSumExp(x)` -> `Log(ReduceSum(Exp(x)))` when that sum already exists.

  jax2onnx turns `log(sum(exp(x)))` into `ReduceLogSumExp`, which recomputes
  every exponential (and is slow in onnxruntime) although the graph already
  sums them.
  """
  op_type = 'ReduceLogSumExp'

  def rewrite(self, node: ir.Node) -> bool:
    total = _existing_exp_sum(node)
    if total is None:
      return False
    log = ir.node('Log', [total], name=f'{node.name}_log')
    substitute(node, [log], log.outputs[0])
    return True


class GemmBiasPass(NodeRewritePass):
  """`Add(Gemm(a, b, zeros), bias)` -> `Gemm(a, b, bias)` for a constant bias [N] or [1, N].

  A `Reshape` of a constant with a constant shape is folded first, as
  jax2onnx reshapes Dense biases to [1, N].
  """
  op_type = 'Gemm'

  def rewrite(self, node: ir.Node) -> bool:
    if len(node.inputs) != 3:
      return False
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != 'Add' or node.outputs[0].is_graph_output():
      return False
    add = uses[0].node
    zeros = ir.convenience.get_const_tensor(node.inputs[2]) if node.inputs[2] else None
    bias = constant_value(add.inputs[1 - uses[0].idx])
    columns = node.outputs[0].shape[-1] if node.outputs[0].shape else None
    if (zeros is None or np.any(zeros.numpy()) or bias is None or not isinstance(columns, int)
        or bias.size != columns or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1)):
      return False
    node.replace_input_with(2, constant(node.graph, f'{node.name}_bias',
                                         bias.reshape(columns).astype(np.float32)))
    # The old C was zero, so its beta (jax2onnx writes 0) never mattered; now it must be 1.
    node.attributes['beta'] = ir.AttrFloat32('beta', 1.0)
    replace(add.outputs[0], node.outputs[0])
    add.graph.remove(add, safe=True)
    return True


class AbsOfReluPass(NodeRewritePass):
  """`Abs(x)` -> `x` where x is provably never negative (a ReLU's output, or a reshape of it)."""
  op_type = 'Abs'

  def rewrite(self, node: ir.Node) -> bool:
    producer = node.inputs[0].producer()
    if node.outputs[0].is_graph_output() or producer is None or not non_negative(node.inputs[0]):
      return False
    ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
    node.graph.remove(node, safe=True)
    return True


class SumOfSquaresPass(NodeRewritePass):
  """`ReduceSumSquare(x)` -> `ReduceSum(Mul(x, x))`: onnxruntime's ReduceSumSquare
  takes about four times as long over a [256, 784] batch on this project's CPUs."""
  op_type = 'ReduceSumSquare'

  def rewrite(self, node: ir.Node) -> bool:
    square = ir.node('Mul', [node.inputs[0], node.inputs[0]], name=f'{node.name}_square')
    square.outputs[0].dtype = node.inputs[0].dtype
    square.outputs[0].shape = node.inputs[0].shape
    total = ir.node('ReduceSum', [square.outputs[0], *node.inputs[1:]],
                    dict(node.attributes.items()), name=f'{node.name}_sum')
    substitute(node, [square, total], total.outputs[0])
    return True


class IdentityTransposePass(NodeRewritePass):
  """Removes a `Transpose` whose permutation keeps every axis in place (jax2onnx writes
  one for a `moveaxis` that moves nothing); onnxruntime would copy the tensor."""
  op_type = 'Transpose'

  def rewrite(self, node: ir.Node) -> bool:
    perm = node.attributes.get_ints('perm', None)
    if perm is None or list(perm) != list(range(len(perm))) or node.outputs[0].is_graph_output():
      return False
    ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
    node.graph.remove(node, safe=True)
    return True


class ShapeSlicePass(NodeRewritePass):
  """`Gather(Shape(t), [i, i+1, ..])` -> `Shape(t, start=i, end=..)`; a one-input `Concat` goes.

  jax2onnx reads a dynamic batch size as `Shape`, `Gather`, `Concat` before an
  `Expand` (the constant routes of an always-deep model). Two nodes fewer took
  about 5 µs off the always-deep early-exit export's batch-1 call in
  onnxruntime (46.5 against 53.1 µs, one thread, an AVX2 CPU).
  """
  op_type = 'Gather'

  def call(self, model: ir.Model) -> ir.passes.PassResult:
    if model.opset_imports.get('', 0) < 15:  # Shape's start and end
      return ir.passes.PassResult(model, False)
    result = super().call(model)
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
      if (node.op_type == 'Concat' and not node.domain and len(node.inputs) == 1
          and not node.outputs[0].is_graph_output()):
        ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
        node.graph.remove(node, safe=True)
        result = ir.passes.PassResult(model, True)
    return result

  def rewrite(self, node: ir.Node) -> bool:
    shape = node.inputs[0].producer()
    indices = constant_value(node.inputs[1])
    if (shape is None or shape.op_type != 'Shape' or shape.domain or shape.attributes
        or node.attributes.get_int('axis', 0) != 0 or indices is None or indices.ndim != 1
        or indices.size == 0 or np.any(indices < 0)
        or np.any(np.diff(indices) != 1)):
      return False
    start, end = int(indices[0]), int(indices[-1]) + 1
    sliced = ir.node('Shape', [shape.inputs[0]], {'start': start, 'end': end},
                     name=f'{node.name}_shape')
    substitute(node, [sliced], sliced.outputs[0])
    return True


class IdentityPass(NodeRewritePass):
  """Removes `Identity` nodes, keeping those that give a (sub)graph an output from outside it.

  onnx_ir's `IdentityEliminationPass` also removes an `Identity` whose input
  comes from an enclosing graph (an `If` branch that returns a captured
  value), leaving a branch output no node of the branch produces, which
  the ONNX checker rejects.
  """
  op_type = 'Identity'

  def rewrite(self, node: ir.Node) -> bool:
    if len(node.inputs) != 1 or len(node.outputs) != 1 or node.inputs[0] is None:
      return False
    source, output = node.inputs[0], node.outputs[0]
    if output.is_graph_output():
      producer = source.producer()
      if producer is None or producer.graph is not node.graph:
        return False
      ir.convenience.replace_all_uses_with(output, source, replace_graph_outputs=True)
      source.name = output.name
    else:
      ir.convenience.replace_all_uses_with(output, source)
    node.graph.remove(node, safe=True)
    return True


class SubgraphInitializersPass(ir.passes.InPlacePass):
  """Removes the initializers no node uses inside `If` and `Loop` bodies.

  `RemoveUnusedNodesPass` prunes the main graph's initializers only; jax2onnx
  leaves shape constants in a `lax.cond`'s branches that onnxruntime then
  warns about, once per session, as it drops them.
  """

  def call(self, model: ir.Model) -> ir.passes.PassResult:
    modified = False
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
      for attribute in node.attributes.values():
        if attribute.type == ir.AttributeType.GRAPH:
          subgraphs = [attribute.as_graph()]
        elif attribute.type == ir.AttributeType.GRAPHS:
          subgraphs = list(attribute.as_graphs())
        else:
          continue
        for subgraph in subgraphs:
          for value in list(subgraph.initializers.values()):
            if not value.uses() and not value.is_graph_output():
              del subgraph.initializers[value.name]
              modified = True
    return ir.passes.PassResult(model, modified)


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
  """The rewritten model: integer matmuls on int8 kernels, redundant nodes removed."""
  ir_model = ir.from_proto(model)
  ir.passes.Sequential(
      StaticConvPass(),
      common.RemoveUnusedNodesPass(),  # the int32 Conv chains StaticConvPass left
      IntegerMatMulPass(),
      CentredMatMulPass(),
      BatchQuantizeLinearPass(),
      IntegerConvPass(),
      RowQuantizeLinearPass(),
      ScaleFloorPass(),
      LogOfSummedExpPass(),
      SumOfSquaresPass(),
      GemmBiasPass(),
      ChannelAffinePass(),
      BroadcastExpandPass(),
      UnsqueezeReshapePass(),
      AbsOfReluPass(),
      ShapeSlicePass(),
      IdentityPass(),
      IdentityTransposePass(),
      # The deep block and the shortcut quantize the same input: compute it once
      # (equal constants first become one, so equal nodes have equal inputs).
      common.DeduplicateInitializersPass(),
      common.CommonSubexpressionEliminationPass(),
      common.RemoveUnusedNodesPass(),
      SubgraphInitializersPass(),
      common.TopologicalSortPass(),
      common.NameFixPass(),  # unique names for the new values, subgraphs included
  )(ir_model)
  return ir.to_proto(ir_model)


def _existing_exp_sum(node: ir.Node) -> ir.Value | None:
  """The output of `ReduceSum(Exp(x))` with `node`'s axes and keepdims, if present."""
  source = node.inputs[0]
  keepdims = node.attributes.get_int('keepdims', 1)
  axes = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
  for use in source.uses():
    exp = use.node
    if exp.op_type != 'Exp' or exp.domain:
      continue
    for sum_use in exp.outputs[0].uses():
      total = sum_use.node
      if (total.op_type == 'ReduceSum' and not total.domain and len(total.inputs) > 1
          and total.attributes.get_int('keepdims', 1) == keepdims
          and axes is not None and np.array_equal(constant_value(total.inputs[1]), axes)):
        return total.outputs[0]
  return None


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
