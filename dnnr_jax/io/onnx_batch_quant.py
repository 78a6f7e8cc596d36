"""Per-batch activation quantization in the form onnxruntime fuses into one kernel.

A 'dynamic' layer with `activations='per_batch'` (`compress.quantize.quantize_batch`
and `batch_int8_matmul`) traces to about twenty nodes: the batch's minimum and
maximum, the scale and zero point, the codes, and an int32 `MatMul` of the
codes less the zero point. These passes write it as ONNX's own
`DynamicQuantizeLinear` and a u8s8 `MatMulInteger` with that zero point,
followed by `Cast`, `Mul` by (scale x column scales) and the bias `Add`: the
graph `onnxruntime.quantization.quantize_dynamic` writes, which onnxruntime
fuses into one `DynamicQuantizeMatMul` per layer when a session is created.
The file stays standard ONNX. Both passes compute what they replace exactly:
`quantize_batch` is `DynamicQuantizeLinear`'s definition, and
(a - z) @ w = `MatMulInteger(a, w, z)` in int32.

Both forms are exact on every CPU. Weights within |w| <= 64 (4-bit codes
always) stay u8s8; wider ones (8-bit) are shifted to uint8 (w + 128, zero
point 128: u8u8, `onnx_integer.unsigned_weights`), which onnxruntime fuses
the same way. Its AVX2-only u8s8 kernel adds pairs of uint8 x int8 products
in int16 and would saturate them, as it does in `quantize_dynamic`'s own
8-bit files.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from dnnr_jax.io.onnx_integer import fits_u8s8, int8_source, max_abs, unsigned_weights
from dnnr_jax.io.onnx_rewrite import NodeRewritePass, constant_value, replace


class BatchQuantizeLinearPass(NodeRewritePass):
  """`quantize_batch`'s nodes -> one `DynamicQuantizeLinear` (codes, scale, zero point).

  Matches `Cast<uint8>(Clip(Round(x / s) + z, 0, 255))` with
  s = `Where(hi > lo, (hi - lo) / 255, 1)`, hi = `Max(ReduceMax(x), 0)`,
  lo = `Min(ReduceMin(x), 0)` and z = `Clip(Round(-lo / s), 0, 255)`; the
  scale's and the zero point's uses (its uint8 casts) read the new node's.
  """
  op_type = 'Cast'

  def rewrite(self, node: ir.Node) -> bool:
    if node.attributes.get_int('to') != ir.DataType.UINT8:
      return False
    matched = _batch_quantized(node.inputs[0])
    if matched is None:
      return False
    source, scale, zero_point = matched
    quantize = ir.node('DynamicQuantizeLinear', [source], num_outputs=3,
                       name=f'{node.name}_dynamic_quantize')
    codes, new_scale, new_zero_point = quantize.outputs
    codes.dtype, codes.shape = ir.DataType.UINT8, node.outputs[0].shape
    new_scale.dtype, new_scale.shape = ir.DataType.FLOAT, ir.Shape([])
    new_zero_point.dtype, new_zero_point.shape = ir.DataType.UINT8, ir.Shape([])
    node.graph.insert_before(scale.producer(), [quantize])
    replace(node.outputs[0], codes)
    replace(scale, new_scale)
    for use in list(zero_point.uses()):
      cast = use.node
      if cast.op_type == 'Cast' and not cast.domain and cast.attributes.get_int(
          'to') == ir.DataType.UINT8:
        replace(cast.outputs[0], new_zero_point)
    node.graph.remove(node, safe=True)
    return True


class CentredMatMulPass(NodeRewritePass):
  """`MatMul(Cast<int32>(a) - Cast<int32>(z), Cast<int32>(w))` -> `MatMulInteger(a, w, z)`
  for uint8 codes a, a uint8 scalar zero point z and int8 weights w; weights too
  wide for u8s8 to stay exact on AVX2 go in as `MatMulInteger(a, w + 128, z, 128)`."""
  op_type = 'MatMul'

  def rewrite(self, node: ir.Node) -> bool:
    difference, weights = _op(node.inputs[0], 'Sub'), int8_source(node.inputs[1])
    if difference is None or weights is None or weights.dtype != ir.DataType.INT8:
      return False
    codes, zero_point = (int8_source(value) for value in difference.inputs)
    if (codes is None or zero_point is None or codes.dtype != ir.DataType.UINT8
        or zero_point.dtype != ir.DataType.UINT8 or zero_point.shape is None
        or len(zero_point.shape) != 0):
      return False
    inputs, new_nodes = [codes, weights, zero_point], []
    widest = max_abs(weights)
    if widest is None or not fits_u8s8(255, widest):
      unsigned, weight_zero_point = unsigned_weights(node, weights, new_nodes)
      inputs = [codes, unsigned, zero_point, weight_zero_point]
    integer = ir.node('MatMulInteger', inputs, name=f'{node.name}_integer')
    node.graph.insert_before(node, [*new_nodes, integer])
    integer.outputs[0].dtype, integer.outputs[0].shape = ir.DataType.INT32, node.outputs[0].shape
    replace(node.outputs[0], integer.outputs[0])
    node.graph.remove(node, safe=True)
    return True


def _batch_quantized(codes: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value] | None:
  """(x, s, z) when `codes` is `Clip(Round(x / s) + z, 0, 255)` as `quantize_batch`
  traces, else None."""
  clip = _clip(codes, 0, 255)
  total = _op(clip.inputs[0], 'Add') if clip is not None else None
  if total is None:
    return None
  for rounded, zero_point in (total.inputs, reversed(total.inputs)):
    division = _op(_input(_op(rounded, 'Round')), 'Div')
    if division is None:
      continue
    source, scale = division.inputs
    low = _scale_of(scale, source)
    if low is not None and _zero_point_of(zero_point, low, scale):
      return source, scale, zero_point
  return None


def _scale_of(scale: ir.Value, source: ir.Value) -> ir.Value | None:
  """lo when `scale` is `Where(hi > lo, (hi - lo) / 255, 1)` over `source`'s range, else None."""
  where = _op(scale, 'Where')
  if where is None or not _equals(where.inputs[2], 1):
    return None
  test, division = _op(where.inputs[0], 'Greater'), _op(where.inputs[1], 'Div')
  width = _op(division.inputs[0], 'Sub') if division is not None else None
  if test is None or width is None or not _equals(division.inputs[1], 255):
    return None
  high, low = width.inputs
  if list(test.inputs) != [high, low]:
    return None
  if not (_bound(high, 'Max', 'ReduceMax', source) and _bound(low, 'Min', 'ReduceMin', source)):
    return None
  return low


def _zero_point_of(zero_point: ir.Value, low: ir.Value, scale: ir.Value) -> bool:
  """Whether `zero_point` is `Clip(Round(-low / scale), 0, 255)`."""
  clip = _clip(zero_point, 0, 255)
  division = _op(_input(_op(clip.inputs[0], 'Round')), 'Div') if clip is not None else None
  negated = _op(division.inputs[0], 'Neg') if division is not None else None
  return negated is not None and negated.inputs[0] is low and division.inputs[1] is scale


def _bound(value: ir.Value, op: str, reduce: str, source: ir.Value) -> bool:
  """Whether `value` is `op(reduce(source) over every axis, 0)`."""
  node = _op(value, op)
  if node is None or len(node.inputs) != 2:
    return False
  for reduced, zero in (node.inputs, reversed(node.inputs)):
    reduction = _op(reduced, reduce)
    if (reduction is not None and reduction.inputs[0] is source and _equals(zero, 0)
        and reduced.shape is not None and len(reduced.shape) == 0):
      return True
  return False


def _clip(value: ir.Value, low: float, high: float) -> ir.Node | None:
  clip = _op(value, 'Clip')
  if clip is None or len(clip.inputs) != 3:
    return None
  return clip if _equals(clip.inputs[1], low) and _equals(clip.inputs[2], high) else None


def _op(value: ir.Value | None, op_type: str) -> ir.Node | None:
  """The node of `op_type` (default domain) that produced `value`, through `Identity`s."""
  node = value.producer() if value is not None else None
  while node is not None and node.op_type == 'Identity' and not node.domain:
    node = node.inputs[0].producer()
  return node if node is not None and node.op_type == op_type and not node.domain else None


def _input(node: ir.Node | None) -> ir.Value | None:
  return node.inputs[0] if node is not None else None


def _equals(value: ir.Value | None, number: float) -> bool:
  """Whether `value` is a one-element constant equal to `number` (through `Identity`s)."""
  while value is not None and value.producer() is not None and (
      value.producer().op_type == 'Identity' and not value.producer().domain):
    value = value.producer().inputs[0]
  known = constant_value(value)
  return known is not None and known.size == 1 and float(np.ravel(known)[0]) == number
