"""Rewrites of jax2onnx graphs for onnxruntime: integer kernels and fewer nodes.

jax2onnx lowers the int8 dot `jnp.dot(x8, w8, preferred_element_type=int32)`
to `Cast(int32)`, `Cast(int32)`, `MatMul`: a 32-bit integer matmul that
onnxruntime runs several times slower than float. `optimize` rewrites it to
`MatMulInteger(x8, w8)`, which onnxruntime runs on its int8 GEMM kernels
(VNNI where the CPU has it) with the int8 weights kept as int8 initializers.
The int32 result is the same, so outputs do not change.

It also removes work: a `ReduceLogSumExp` that recomputes exponentials the
graph already sums, a slow `ReduceSumSquare` (now a `Mul` and a
`ReduceSum`), a bias `Add` after a `Gemm` with zero bias (folded into the
`Gemm`), an `Expand` whose consumers broadcast anyway, a `Reshape` that
only appends unit axes (an `Unsqueeze`), `Abs` of a ReLU, `Identity` nodes,
repeated subexpressions (the deep block and the shortcut quantize the same
input), and the shape arithmetic left unused. Every pass computes the same
function: bit for bit, or (the log-sum-exp, sum-of-squares and Gemm bias
rewrites) up to float rounding; `dnnr_jax.io.export` proves the result in
onnxruntime against JAX before it writes anything.

`sparse_initializers` then stores a pruned kernel as an ONNX sparse
initializer (its non-zeros and their int64 positions) where that is
smaller, so a pruned model's file shrinks with its weights. onnxruntime
densifies sparse initializers when it loads the model, so the graph and its
speed are those of the dense file.
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


class _NodeRewritePass(ir.passes.InPlacePass):
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


class IntegerMatMulPass(_NodeRewritePass):
  """`MatMul(Cast<int32>(a8), Cast<int32>(b8))` -> `MatMulInteger(a8, b8)`.

  Activations are shifted to uint8 (u8s8, onnxruntime's fast kernel) only
  where that is exact on every CPU (see `_u8s8_exact`).
  """
  op_type = 'MatMul'

  def rewrite(self, node: ir.Node) -> bool:
    sources = [_int8_source(value) for value in node.inputs]
    if None in sources:
      return False
    activations, weights = sources
    if activations.dtype == ir.DataType.UINT8 and not _u8s8_exact(weights):
      return False  # The int32 MatMul stays: slow, but exact.
    new_nodes = []
    if activations.dtype == ir.DataType.INT8 and _u8s8_exact(weights):
      # onnxruntime's fast int8 GEMM wants uint8 activations (u8s8):
      # a + 128 with zero point 128 gives the same int32 products.
      activations, zero_point = _shift_to_uint8(node, activations, new_nodes)
    else:
      zero_point = None
    integer = ir.node(
        'MatMulInteger', [activations, weights] + ([zero_point] if zero_point else []),
        name=f'{node.name}_integer')
    _substitute(node, [*new_nodes, integer], integer.outputs[0])
    integer.outputs[0].dtype = ir.DataType.INT32
    return True


class BroadcastExpandPass(_NodeRewritePass):
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


class UnsqueezeReshapePass(_NodeRewritePass):
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
    axes = _constant(node.graph, f'{node.name}_axes',
                     np.arange(len(before), len(after), dtype=np.int64))
    unsqueeze = ir.node('Unsqueeze', [source, axes], name=f'{node.name}_unsqueeze')
    _substitute(node, [unsqueeze], unsqueeze.outputs[0])
    return True


class LogOfSummedExpPass(_NodeRewritePass):
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
    _substitute(node, [log], log.outputs[0])
    return True


class GemmBiasPass(_NodeRewritePass):
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
    bias = _constant_value(add.inputs[1 - uses[0].idx])
    columns = node.outputs[0].shape[-1] if node.outputs[0].shape else None
    if (zeros is None or np.any(zeros.numpy()) or bias is None or not isinstance(columns, int)
        or bias.size != columns or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1)):
      return False
    node.replace_input_with(2, _constant(node.graph, f'{node.name}_bias',
                                         bias.reshape(columns).astype(np.float32)))
    # The old C was zero, so its beta (jax2onnx writes 0) never mattered; now it must be 1.
    node.attributes['beta'] = ir.AttrFloat32('beta', 1.0)
    _replace(add.outputs[0], node.outputs[0])
    add.graph.remove(add, safe=True)
    return True


class AbsOfReluPass(_NodeRewritePass):
  """`Abs(Relu(x))` -> `Relu(x)`: a ReLU's output is never negative."""
  op_type = 'Abs'

  def rewrite(self, node: ir.Node) -> bool:
    producer = node.inputs[0].producer()
    if (node.outputs[0].is_graph_output() or producer is None or producer.op_type != 'Relu'
        or producer.domain):
      return False
    ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
    node.graph.remove(node, safe=True)
    return True


class SumOfSquaresPass(_NodeRewritePass):
  """`ReduceSumSquare(x)` -> `ReduceSum(Mul(x, x))`: onnxruntime's ReduceSumSquare
  takes about four times as long over a [256, 784] batch on this project's CPUs."""
  op_type = 'ReduceSumSquare'

  def rewrite(self, node: ir.Node) -> bool:
    square = ir.node('Mul', [node.inputs[0], node.inputs[0]], name=f'{node.name}_square')
    square.outputs[0].dtype = node.inputs[0].dtype
    square.outputs[0].shape = node.inputs[0].shape
    total = ir.node('ReduceSum', [square.outputs[0], *node.inputs[1:]],
                    dict(node.attributes.items()), name=f'{node.name}_sum')
    _substitute(node, [square, total], total.outputs[0])
    return True


class IdentityPass(_NodeRewritePass):
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


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
  """The rewritten model: integer matmuls on int8 kernels, redundant nodes removed."""
  ir_model = ir.from_proto(model)
  ir.passes.Sequential(
      IntegerMatMulPass(),
      LogOfSummedExpPass(),
      SumOfSquaresPass(),
      GemmBiasPass(),
      BroadcastExpandPass(),
      UnsqueezeReshapePass(),
      AbsOfReluPass(),
      IdentityPass(),
      # The deep block and the shortcut quantize the same input: compute it once
      # (equal constants first become one, so equal nodes have equal inputs).
      common.DeduplicateInitializersPass(),
      common.CommonSubexpressionEliminationPass(),
      common.RemoveUnusedNodesPass(),
      common.TopologicalSortPass(),
      common.NameFixPass(),  # unique names for the new values, subgraphs included
  )(ir_model)
  return ir.to_proto(ir_model)


def sparse_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
  """The model with every mostly-zero initializer of its main graph stored sparse.

  An initializer becomes a `SparseTensorProto` (values, and int64 linear
  indices as the ONNX checker requires) when that takes fewer bytes than the
  dense tensor: below a third non-zero for float32, a ninth for int8. Values
  and positions are exact, so the function does not change.
  """
  graph = model.graph
  kept, sparse = [], []
  for tensor in graph.initializer:
    array = onnx.numpy_helper.to_array(tensor)
    positions = np.flatnonzero(array)
    if array.ndim < 1 or positions.size * (8 + array.itemsize) >= array.nbytes:
      kept.append(tensor)
      continue
    values = onnx.numpy_helper.from_array(array.reshape(-1)[positions], tensor.name)
    indices = onnx.numpy_helper.from_array(positions.astype(np.int64), f'{tensor.name}_indices')
    sparse.append(onnx.helper.make_sparse_tensor(values, indices, array.shape))
  if sparse:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.sparse_initializer.extend(sparse)
  return model


def _substitute(node: ir.Node, new_nodes: list[ir.Node], result: ir.Value) -> None:
  """Inserts `new_nodes` before `node`, lets `result` stand for its output, removes it."""
  node.graph.insert_before(node, new_nodes)
  result.dtype, result.shape = node.outputs[0].dtype, node.outputs[0].shape
  _replace(node.outputs[0], result)
  node.graph.remove(node, safe=True)


def _replace(old: ir.Value, new: ir.Value) -> None:
  """Points every use of `old` at the newly made `new`; a graph output keeps its name."""
  name = old.name if old.is_graph_output() else None
  ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
  if name is not None:
    old.name = f'{name}_replaced'
    new.name = name


def _existing_exp_sum(node: ir.Node) -> ir.Value | None:
  """The output of `ReduceSum(Exp(x))` with `node`'s axes and keepdims, if present."""
  source = node.inputs[0]
  keepdims = node.attributes.get_int('keepdims', 1)
  axes = _constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
  for use in source.uses():
    exp = use.node
    if exp.op_type != 'Exp' or exp.domain:
      continue
    for sum_use in exp.outputs[0].uses():
      total = sum_use.node
      if (total.op_type == 'ReduceSum' and not total.domain and len(total.inputs) > 1
          and total.attributes.get_int('keepdims', 1) == keepdims
          and axes is not None and np.array_equal(_constant_value(total.inputs[1]), axes)):
        return total.outputs[0]
  return None


def _constant_value(value: ir.Value | None) -> np.ndarray | None:
  """The value of a constant, or of a Reshape of a constant by a constant shape."""
  if value is None:
    return None
  tensor = ir.convenience.get_const_tensor(value)
  if tensor is not None:
    return tensor.numpy()
  producer = value.producer()
  if producer is not None and producer.op_type == 'Reshape' and not producer.domain:
    data, shape = (_constant_value(input_value) for input_value in producer.inputs[:2])
    if data is not None and shape is not None and not producer.attributes.get_int(
        'allowzero', 0) and 0 not in shape:
      return data.reshape(shape)
  return None


def _int8_source(value: ir.Value | None) -> ir.Value | None:
  """The int8 value that `value` is the int32 cast of, else None."""
  node = value.producer() if value is not None else None
  if node is None or node.op_type != 'Cast' or node.domain:
    return None
  if node.attributes.get_int('to') != ir.DataType.INT32:
    return None
  source = node.inputs[0]
  return source if source.dtype in _INT8 else None


def _u8s8_exact(weights: ir.Value) -> bool:
  """Whether uint8 activations times these int8 weights are exact on every CPU.

  Without VNNI (AVX2 alone), onnxruntime's u8s8 kernel adds pairs of
  uint8 x int8 products in int16 (`vpmaddubsw`), which saturates: with
  activations up to 255 a pair stays within 32767 only while every |weight|
  <= 64. 4-bit codes (|w| <= 7) always pass; full 8-bit codes keep s8s8,
  which is exact everywhere.
  """
  values = _constant_value(weights)
  return values is not None and int(np.max(np.abs(values.astype(np.int32)), initial=0)) <= 64


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
