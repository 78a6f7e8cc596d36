"""Integer matmuls in the forms onnxruntime runs fast, exact on every CPU.

jax2onnx lowers the int8 dot `jnp.dot(x8, w8, preferred_element_type=int32)`
to `Cast(int32)`, `Cast(int32)`, `MatMul`, and `quantize_rows` to `Abs`,
`ReduceMax`, `Mul`, `Where`, `Div`, `Mul`, `Round`, `Clip`, `Cast`. These
passes turn them into a u8s8 `MatMulInteger` fed by one blocked
`QuantizeLinear` per row-quantized input; see each pass for what it keeps
exact.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from dnnr_jax.io.onnx_rewrite import (
    NodeRewritePass,
    constant,
    constant_value,
    substitute,
)

_INT8 = (ir.DataType.INT8, ir.DataType.UINT8)


class IntegerMatMulPass(NodeRewritePass):
  """`MatMul(Cast<int32>(a8), Cast<int32>(b8))` -> `MatMulInteger` on uint8 codes.

  u8s8 is the form onnxruntime runs on its fast int8 kernels (VNNI, AMX);
  its s8s8 kernel is a portable loop several times slower than float on x86.
  Every form below gives the exact int32 products on every CPU, AVX2 alone
  included (see `fits_u8s8`):

  * activation codes that cannot be negative (a ReLU's, [0, 127]) are cast
    to uint8 as they are, whatever the weights;
  * signed codes are shifted to uint8 (+128, zero point 128) when every
    |weight| <= 64 (4-bit codes always);
  * signed codes with wider weights are shifted too and multiply each
    weight in two halves of |w| <= 64: activations [a, a] times [w1; w2]
    with w1 + w2 = w. The halves are constant expressions that onnxruntime
    folds when the session is created, so the file keeps one int8 kernel;
  * uint8 codes (up to 255) with weights wider than |w| <= 64 take the
    weights as uint8 w + 128 with zero point 128 (u8u8, `unsigned_weights`).

  Without constant weights the s8s8 `MatMulInteger` stays, and uint8 codes
  keep the int32 `MatMul`.
  """
  op_type = 'MatMul'

  def rewrite(self, node: ir.Node) -> bool:
    sources = [int8_source(value) for value in node.inputs]
    if None in sources:
      return False
    activations, weights = sources
    new_nodes, widest = [], max_abs(weights)
    if (activations.dtype == ir.DataType.UINT8 and widest is not None
        and not fits_u8s8(255, widest)):
      # uint8 codes times wide weights: u8u8, whose kernels add in int32.
      unsigned, weight_zero_point = unsigned_weights(node, weights, new_nodes)
      inputs = [activations, unsigned,
                constant(node.graph, f'{node.name}_zero_point', np.uint8(0)), weight_zero_point]
    else:
      unsigned = to_uint8(node, activations, widest, new_nodes)
      if unsigned is None:
        return False  # Weights not constant: the int32 MatMul stays, slow but exact.
      activations, zero_point, halves = unsigned
      if halves:
        doubled = ir.node('Concat', [activations, activations], {'axis': -1},
                          name=f'{node.name}_activations_twice')
        doubled.outputs[0].dtype = ir.DataType.UINT8
        new_nodes.append(doubled)
        activations, weights = doubled.outputs[0], weight_halves(node, weights, new_nodes)
      inputs = [activations, weights] + ([zero_point] if zero_point else [])
    integer = ir.node('MatMulInteger', inputs, name=f'{node.name}_integer')
    substitute(node, [*new_nodes, integer], integer.outputs[0])
    integer.outputs[0].dtype = ir.DataType.INT32
    return True


def to_uint8(node: ir.Node, activations: ir.Value, widest: int | None,
             new_nodes: list) -> tuple[ir.Value, ir.Value | None, bool] | None:
  """The u8s8 form of int8 (or uint8) `activations` times int8 weights up to `widest`
  in magnitude (None: weights not constant), appending the nodes it needs.

  Returns:
    (uint8 activations, their zero point or None, whether each weight must be
    split in halves), or None when no exact u8s8 form exists (uint8 codes
    against wide or computed weights). With weights that are not constant the
    int8 activations stay as they are (s8s8, exact everywhere).
  """
  if activations.dtype == ir.DataType.UINT8:
    return None if widest is None or not fits_u8s8(255, widest) else (activations, None, False)
  if widest is None:
    return activations, None, False
  if non_negative(activations):
    return cast(node, float_codes(activations) or activations, ir.DataType.UINT8,
                 'to_uint8', new_nodes), None, False
  activations, zero_point = _shift_to_uint8(node, activations, new_nodes)
  return activations, zero_point, not fits_u8s8(255, widest)


class RowQuantizeLinearPass(NodeRewritePass):
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
      offsets = [constant_value(value) for value in producer.inputs]
      if offsets[1] is not None and offsets[1].size == 1 and float(offsets[1]) == 128:
        codes, shifted = producer.inputs[0], True
    matched = _row_quantized(codes)
    if matched is None or (not shifted and not non_negative(codes)):
      return False
    rows, scale = matched
    inputs, new_nodes = [rows, scale], []
    if shifted:  # a zero point of 128 for every row: the scale's shape, as blocks need
      shape = ir.node('Shape', [scale], name=f'{node.name}_scale_shape')
      offset = constant(node.graph, f'{node.name}_zero_point', np.full((1, 1), 128, np.uint8))
      expand = ir.node('Expand', [offset, shape.outputs[0]], name=f'{node.name}_zero_points')
      expand.outputs[0].dtype, expand.outputs[0].shape = ir.DataType.UINT8, scale.shape
      new_nodes += [shape, expand]
      inputs.append(expand.outputs[0])
    quantize = ir.node('QuantizeLinear', inputs,
                       {'axis': 1, 'block_size': int(rows.shape[1])},
                       name=f'{node.name}_quantize_rows')
    substitute(node, [*new_nodes, quantize], quantize.outputs[0])
    return True


class ScaleFloorPass(NodeRewritePass):
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
        or test.inputs[0] is not scale or not _is_one(fallback) or not non_negative(scale)):
      return False
    floor = constant_value(test.inputs[1])
    if floor is None or floor.size != 1 or float(floor) != float(np.finfo(np.float32).tiny):
      return False
    maximum = ir.node('Max', [scale, test.inputs[1]], name=f'{node.name}_floor')
    substitute(node, [maximum], maximum.outputs[0])
    return True


def int8_source(value: ir.Value | None) -> ir.Value | None:
  """The int8 value that `value` is the int32 cast of, else None."""
  node = value.producer() if value is not None else None
  if node is None or node.op_type != 'Cast' or node.domain:
    return None
  if node.attributes.get_int('to') != ir.DataType.INT32:
    return None
  source = node.inputs[0]
  return source if source.dtype in _INT8 else None


def max_abs(weights: ir.Value) -> int | None:
  """The largest |code| of constant int8 weights, else None."""
  values = constant_value(weights)
  return None if values is None else int(np.max(np.abs(values.astype(np.int32)), initial=0))


def fits_u8s8(activation_max: int, weight_max: int) -> bool:
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
                             'Squeeze', 'Expand', 'Transpose', 'Gather'})


def non_negative(value: ir.Value | None, depth: int = 12) -> bool:
  """Whether `value` provably holds no negative number (a conservative check)."""
  if value is None or depth == 0:
    return False
  known = constant_value(value)
  if known is not None:
    return known.dtype != np.bool_ and bool(np.all(known >= 0))
  node = value.producer()
  if node is None or node.domain:
    return False
  op, inputs = node.op_type, node.inputs
  if op in _NON_NEGATIVE_OPS:
    return True
  if op in _PRESERVING_OPS:
    return non_negative(inputs[0], depth - 1)
  if op in ('Mul', 'Div', 'Add', 'Min'):
    return all(non_negative(item, depth - 1) for item in inputs)
  if op == 'Max':
    return any(non_negative(item, depth - 1) for item in inputs)
  if op == 'Where':
    return all(non_negative(item, depth - 1) for item in inputs[1:])
  if op == 'Clip':
    return non_negative(inputs[0], depth - 1) or (
        len(inputs) > 1 and non_negative(inputs[1], depth - 1))
  return False


def float_codes(codes: ir.Value) -> ir.Value | None:
  """The whole floats that int8 `codes` were cast from (a Clip of a Round), else None."""
  producer = codes.producer()
  if producer is not None and producer.op_type == 'Cast' and _whole_int8_floats(
      producer.inputs[0]):
    return producer.inputs[0]
  return None


def cast(node: ir.Node, value: ir.Value, dtype: ir.DataType, suffix: str,
          new_nodes: list) -> ir.Value:
  """`Cast(value, to=dtype)` (appended to `new_nodes`)."""
  cast = ir.node('Cast', [value], {'to': dtype}, name=f'{node.name}_{suffix}')
  cast.outputs[0].dtype, cast.outputs[0].shape = dtype, value.shape
  new_nodes.append(cast)
  return cast.outputs[0]


def weight_halves(node: ir.Node, weights: ir.Value, new_nodes: list) -> ir.Value:
  """[w1; w2] stacked along axis 0, w1 = floor(w / 2), w2 = w - w1: |w1|, |w2| <= 64, and
  [a, a] times them is a times w (appends the nodes, constant expressions of `weights`)."""
  graph = node.graph
  as_float = cast(node, weights, ir.DataType.FLOAT, 'weights_to_float', new_nodes)
  halved = ir.node('Mul', [as_float, constant(graph, f'{node.name}_half', np.float32(0.5))],
                   name=f'{node.name}_weights_halved')
  floored = ir.node('Floor', [halved.outputs[0]], name=f'{node.name}_weights_floored')
  new_nodes += [halved, floored]
  low = cast(node, floored.outputs[0], ir.DataType.INT8, 'low_half', new_nodes)
  high = ir.node('Sub', [weights, low], name=f'{node.name}_high_half')
  stacked = ir.node('Concat', [low, high.outputs[0]], {'axis': 0},
                    name=f'{node.name}_weight_halves')
  for value in (high.outputs[0], stacked.outputs[0]):
    value.dtype = ir.DataType.INT8
  new_nodes += [high, stacked]
  return stacked.outputs[0]


def unsigned_weights(node: ir.Node, weights: ir.Value,
                     new_nodes: list) -> tuple[ir.Value, ir.Value]:
  """uint8 weights w + 128 and their zero point 128, for a u8u8 `MatMulInteger`.

  onnxruntime's x86 u8u8 kernels widen both operands to int16 and add their
  products in int32 (`vpmaddwd`), so any uint8 activations times any int8
  weights are exact on every CPU, AVX2 alone included. The shift is a
  constant expression of the int8 initializer, folded when the session is
  created (appends the nodes).
  """
  graph = node.graph
  wide = cast(node, weights, ir.DataType.INT16, 'weights_to_int16', new_nodes)
  shifted = ir.node('Add', [wide, constant(graph, f'{node.name}_weight_offset', np.int16(128))],
                    name=f'{node.name}_weights_shifted')
  shifted.outputs[0].dtype, shifted.outputs[0].shape = ir.DataType.INT16, weights.shape
  new_nodes.append(shifted)
  unsigned = cast(node, shifted.outputs[0], ir.DataType.UINT8, 'weights_to_uint8', new_nodes)
  return unsigned, constant(graph, f'{node.name}_weight_zero_point', np.uint8(128))


def _shift_to_uint8(node, codes, new_nodes):
  """uint8 codes + 128 of int8 `codes`, and the zero point 128 (appends nodes)."""
  graph = node.graph
  producer = codes.producer()
  offset = constant(graph, f'{node.name}_offset', np.float32(128))
  zero_point = constant(graph, f'{node.name}_zero_point', np.uint8(128))
  if producer is not None and producer.op_type == 'Cast' and _whole_int8_floats(
      producer.inputs[0]):
    # Codes cast from whole floats in [-128, 127]: shift before the cast.
    shifted = ir.node('Add', [producer.inputs[0], offset], name=f'{node.name}_shift')
    unsigned = ir.node('Cast', [shifted.outputs[0]], {'to': ir.DataType.UINT8},
                       name=f'{node.name}_to_uint8')
    new_nodes += [shifted, unsigned]
  else:
    widened = ir.node('Cast', [codes], {'to': ir.DataType.INT16}, name=f'{node.name}_to_int16')
    offset16 = constant(graph, f'{node.name}_offset16', np.int16(128))
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
  known = constant_value(value)
  return known is not None and known.size == 1 and float(known) == 1.0


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
