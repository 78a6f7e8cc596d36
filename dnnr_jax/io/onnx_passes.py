"""Rewrites of jax2onnx graphs for onnxruntime: integer kernels and fewer nodes.

jax2onnx lowers the int8 dot `jnp.dot(x8, w8, preferred_element_type=int32)`
to `Cast(int32)`, `Cast(int32)`, `MatMul`: a 32-bit integer matmul that
onnxruntime runs several times slower than float. `optimize` rewrites it to
a uint8 x int8 `MatMulInteger` (`IntegerMatMulPass`), which onnxruntime runs
on its fast int8 GEMM kernels (VNNI or AMX where the CPU has them) with the
int8 weights kept as int8 initializers. The int32 result is the same on
every CPU, so outputs do not change.

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

Storing pruned and 4-bit weights compactly is `dnnr_jax.io.onnx_storage`'s
work.
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
  """`MatMul(Cast<int32>(a8), Cast<int32>(b8))` -> `MatMulInteger` on uint8 x int8 (u8s8).

  u8s8 is the form onnxruntime runs on its fast int8 kernels (VNNI, AMX);
  its s8s8 kernel is a portable loop several times slower than float on x86.
  Every form below gives the exact int32 products on every CPU, AVX2 alone
  included (see `_pairs_fit`):

  * activation codes that cannot be negative (a ReLU's, [0, 127]) are cast
    to uint8 as they are, whatever the weights;
  * signed codes are shifted to uint8 (+128, zero point 128) when every
    |weight| <= 64 (4-bit codes always);
  * signed codes with wider weights are shifted too and multiply each
    weight in two halves of |w| <= 64: activations [a, a] times [w1; w2]
    with w1 + w2 = w. The halves are constant expressions that onnxruntime
    folds when the session is created, so the file keeps one int8 kernel.

  Without constant weights the s8s8 `MatMulInteger` stays.
  """
  op_type = 'MatMul'

  def rewrite(self, node: ir.Node) -> bool:
    sources = [_int8_source(value) for value in node.inputs]
    if None in sources:
      return False
    activations, weights = sources
    widest = _max_abs(weights)
    new_nodes, zero_point = [], None
    if activations.dtype == ir.DataType.UINT8:
      if widest is None or not _pairs_fit(255, widest):
        return False  # The int32 MatMul stays: slow, but exact.
    elif widest is None:
      pass  # s8s8: exact on every CPU.
    elif _non_negative(activations):
      activations = _cast(node, _float_codes(activations) or activations, ir.DataType.UINT8,
                          'to_uint8', new_nodes)
    else:
      activations, zero_point = _shift_to_uint8(node, activations, new_nodes)
      if not _pairs_fit(255, widest):
        activations, weights = _in_halves(node, activations, weights, new_nodes)
    integer = ir.node(
        'MatMulInteger', [activations, weights] + ([zero_point] if zero_point else []),
        name=f'{node.name}_integer')
    _substitute(node, [*new_nodes, integer], integer.outputs[0])
    integer.outputs[0].dtype = ir.DataType.INT32
    return True


class RowQuantizeLinearPass(_NodeRewritePass):
  """`Cast<uint8>(Clip(Round(x * (1 / s))) [+ 128])` -> `QuantizeLinear(x, s [, 128])`.

  The per-row activation quantization (`quantize_rows`: s [B, 1]) as one
  blocked `QuantizeLinear` (a block per row) instead of five or six nodes;
  onnxruntime's per-node cost dominates a small model's batch-1 call. The
  codes may differ only where x * (1 / s) and x / s, its division, round a
  tie apart: one activation code, within the export's integer tolerance.
  `QuantizeLinear` saturates to [0, 255], which the clipped codes (or
  codes + 128) never leave.
  """
  op_type = 'Cast'

  def rewrite(self, node: ir.Node) -> bool:
    if node.attributes.get_int('to') != ir.DataType.UINT8:
      return False
    codes, shifted = node.inputs[0], False
    producer = codes.producer()
    if producer is not None and producer.op_type == 'Add' and not producer.domain:
      offsets = [_constant_value(value) for value in producer.inputs]
      if offsets[1] is not None and offsets[1].size == 1 and float(offsets[1]) == 128:
        codes, shifted = producer.inputs[0], True
    matched = _row_quantized(codes)
    if matched is None or (not shifted and not _non_negative(codes)):
      return False
    rows, scale = matched
    inputs, new_nodes = [rows, scale], []
    if shifted:  # a zero point of 128 for every row: the scale's shape, as blocks need
      shape = ir.node('Shape', [scale], name=f'{node.name}_scale_shape')
      offset = _constant(node.graph, f'{node.name}_zero_point', np.full((1, 1), 128, np.uint8))
      expand = ir.node('Expand', [offset, shape.outputs[0]], name=f'{node.name}_zero_points')
      expand.outputs[0].dtype, expand.outputs[0].shape = ir.DataType.UINT8, scale.shape
      new_nodes += [shape, expand]
      inputs.append(expand.outputs[0])
    quantize = ir.node('QuantizeLinear', inputs,
                       {'axis': 1, 'block_size': int(rows.shape[1])},
                       name=f'{node.name}_quantize_rows')
    _substitute(node, [*new_nodes, quantize], quantize.outputs[0])
    return True


class ScaleFloorPass(_NodeRewritePass):
  """`Where(s >= tiny, s, 1)` -> `Max(s, tiny)` for a non-negative scale s.

  `quantize_rows` gives a row whose scale would be zero or subnormal the
  scale 1. With `Max` such a row gets the smallest normal float32 instead:
  an all-zero row still has zero codes and a zero product, and a row below
  127 * 1.2e-38 in magnitude gives products below 1e-36 instead of zero.
  One node instead of two, per quantized layer.
  """
  op_type = 'Where'

  def rewrite(self, node: ir.Node) -> bool:
    condition, scale, fallback = node.inputs
    test = condition.producer() if condition is not None else None
    if (test is None or test.op_type != 'GreaterOrEqual' or test.domain
        or test.inputs[0] is not scale or not _is_one(fallback) or not _non_negative(scale)):
      return False
    floor = _constant_value(test.inputs[1])
    if floor is None or floor.size != 1 or float(floor) != float(np.finfo(np.float32).tiny):
      return False
    maximum = ir.node('Max', [scale, test.inputs[1]], name=f'{node.name}_floor')
    _substitute(node, [maximum], maximum.outputs[0])
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


def optimize(model: onnx.ModelProto) -> onnx.ModelProto:
  """The rewritten model: integer matmuls on int8 kernels, redundant nodes removed."""
  ir_model = ir.from_proto(model)
  ir.passes.Sequential(
      IntegerMatMulPass(),
      RowQuantizeLinearPass(),
      ScaleFloorPass(),
      LogOfSummedExpPass(),
      SumOfSquaresPass(),
      GemmBiasPass(),
      BroadcastExpandPass(),
      UnsqueezeReshapePass(),
      AbsOfReluPass(),
      common.IdentityEliminationPass(),
      # The deep block and the shortcut quantize the same input: compute it once
      # (equal constants first become one, so equal nodes have equal inputs).
      common.DeduplicateInitializersPass(),
      common.CommonSubexpressionEliminationPass(),
      common.RemoveUnusedNodesPass(),
      common.TopologicalSortPass(),
      common.NameFixPass(),  # unique names for the new values, subgraphs included
  )(ir_model)
  return ir.to_proto(ir_model)


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


def _max_abs(weights: ir.Value) -> int | None:
  """The largest |code| of constant int8 weights, else None."""
  values = _constant_value(weights)
  return None if values is None else int(np.max(np.abs(values.astype(np.int32)), initial=0))


def _pairs_fit(activation_max: int, weight_max: int) -> bool:
  """Whether uint8 activations up to `activation_max` times int8 weights up to
  `weight_max` in magnitude are exact on every CPU.

  Without VNNI (AVX2 alone), onnxruntime's u8s8 kernel adds pairs of
  uint8 x int8 products in int16 (`vpmaddubsw`), which saturates beyond
  32767; VNNI and AMX accumulate in int32 and never do.
  """
  return 2 * activation_max * weight_max <= np.iinfo(np.int16).max


_NON_NEGATIVE_OPS = frozenset({'Relu', 'Abs', 'Sigmoid', 'Exp', 'Softmax', 'Sqrt'})
_PRESERVING_OPS = frozenset({'Round', 'Ceil', 'Floor', 'Cast', 'Identity', 'ReduceMax',
                             'ReduceMin', 'ReduceSum', 'ReduceMean', 'Reshape', 'Unsqueeze',
                             'Squeeze', 'Expand'})


def _non_negative(value: ir.Value | None, depth: int = 12) -> bool:
  """Whether `value` provably holds no negative number (a conservative check)."""
  if value is None or depth == 0:
    return False
  constant = _constant_value(value)
  if constant is not None:
    return constant.dtype != np.bool_ and bool(np.all(constant >= 0))
  node = value.producer()
  if node is None or node.domain:
    return False
  op, inputs = node.op_type, node.inputs
  if op in _NON_NEGATIVE_OPS:
    return True
  if op in _PRESERVING_OPS:
    return _non_negative(inputs[0], depth - 1)
  if op in ('Mul', 'Div', 'Add', 'Min'):
    return all(_non_negative(item, depth - 1) for item in inputs)
  if op == 'Max':
    return any(_non_negative(item, depth - 1) for item in inputs)
  if op == 'Where':
    return all(_non_negative(item, depth - 1) for item in inputs[1:])
  if op == 'Clip':
    return _non_negative(inputs[0], depth - 1) or (
        len(inputs) > 1 and _non_negative(inputs[1], depth - 1))
  return False


def _float_codes(codes: ir.Value) -> ir.Value | None:
  """The whole floats that int8 `codes` were cast from (a Clip of a Round), else None."""
  producer = codes.producer()
  if producer is not None and producer.op_type == 'Cast' and _whole_int8_floats(
      producer.inputs[0]):
    return producer.inputs[0]
  return None


def _cast(node: ir.Node, value: ir.Value, dtype: ir.DataType, suffix: str,
          new_nodes: list) -> ir.Value:
  """`Cast(value, to=dtype)` (appended to `new_nodes`)."""
  cast = ir.node('Cast', [value], {'to': dtype}, name=f'{node.name}_{suffix}')
  cast.outputs[0].dtype, cast.outputs[0].shape = dtype, value.shape
  new_nodes.append(cast)
  return cast.outputs[0]


def _in_halves(node: ir.Node, activations: ir.Value, weights: ir.Value,
               new_nodes: list) -> tuple[ir.Value, ir.Value]:
  """[a, a] and [w1; w2], w1 = floor(w / 2), w2 = w - w1: |w1|, |w2| <= 64, same product."""
  graph = node.graph
  doubled = ir.node('Concat', [activations, activations], {'axis': -1},
                    name=f'{node.name}_activations_twice')
  doubled.outputs[0].dtype = ir.DataType.UINT8
  as_float = _cast(node, weights, ir.DataType.FLOAT, 'weights_to_float', new_nodes)
  halved = ir.node('Mul', [as_float, _constant(graph, f'{node.name}_half', np.float32(0.5))],
                   name=f'{node.name}_weights_halved')
  floored = ir.node('Floor', [halved.outputs[0]], name=f'{node.name}_weights_floored')
  new_nodes += [halved, floored]
  low = _cast(node, floored.outputs[0], ir.DataType.INT8, 'low_half', new_nodes)
  high = ir.node('Sub', [weights, low], name=f'{node.name}_high_half')
  stacked = ir.node('Concat', [low, high.outputs[0]], {'axis': 0},
                    name=f'{node.name}_weight_halves')
  for value in (high.outputs[0], stacked.outputs[0]):
    value.dtype = ir.DataType.INT8
  new_nodes += [doubled, high, stacked]
  return doubled.outputs[0], stacked.outputs[0]


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


def _row_quantized(codes: ir.Value) -> tuple[ir.Value, ir.Value] | None:
  """(x [B, K], s [B, 1]) when `codes` is `Clip(Round(x * Div(1, s)))` within int8, else None."""
  if not _whole_int8_floats(codes):
    return None
  product = codes.producer().inputs[0].producer().inputs[0].producer()
  if product is None or product.op_type != 'Mul' or product.domain:
    return None
  for rows, reciprocal in (product.inputs, reversed(product.inputs)):
    division = reciprocal.producer()
    if (division is None or division.op_type != 'Div' or division.domain
        or not _is_one(division.inputs[0])):
      continue
    scale = division.inputs[1]
    if (rows.shape is not None and scale.shape is not None and len(rows.shape) == 2
        and isinstance(rows.shape[1], int) and len(scale.shape) == 2 and scale.shape[1] == 1):
      return rows, scale
  return None


def _is_one(value: ir.Value) -> bool:
  constant = _constant_value(value)
  return constant is not None and constant.size == 1 and float(constant) == 1.0


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
