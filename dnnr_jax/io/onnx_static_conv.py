"""The static int8 convolution of `compress.static_conv` as ONNX's `QLinearConv`.

jax2onnx lowers that layer (see its docstring) to a float chain around a `Conv`
on int32 casts, which ONNX does not define:

  Mul(x, 1/s_x) -> Round -> Add(z_x) -> Clip(0, 255) -> Sub(z_x) -> Cast<int32>
  -> Transpose -> Conv(., Transpose(Cast<int32>(w8))) -> Transpose -> Add(bias32)
  -> Cast<float> -> Mul(M) -> Round -> Add(z_y) -> Clip(0, 255) -> Sub(z_y) -> Mul(s_y)

`StaticConvPass` rewrites it to standard ONNX that onnxruntime runs on its
integer kernels:

  Flatten(x) -> Mul(1/s_x) -> QuantizeLinear(scale 1, z_x) -> Reshape -> Transpose
  -> QLinearConv(x_scale 1, z_x, w8, w_scale M, 0, y_scale 1, z_y, bias32)
  -> Transpose -> DequantizeLinear(s_y, z_y)

A kernel with |w| > 64 (8-bit codes) goes in as uint8 w + 128 with zero
point 128 (`onnx_integer.unsigned_weights`, folded when the session is
created): onnxruntime's AVX2-only uint8 x int8 kernel adds pairs of products
in int16, which 2 * 255 * 127 saturates; its uint8 x uint8 kernels add in
int32 on every CPU.

and where x is `Relu(DequantizeLinear(y, s, z))` of an earlier such output whose
grid the layer shares (`compress.static_conv.calibrated`), the input codes are
`Clip(y, min=z)`, once NumPy has checked on all 256 codes that the float chain
gives exactly that.

With x_scale = y_scale = 1, onnxruntime's requantization multiplier
x_scale · w_scale / y_scale is M itself, so it computes
`clip(round_half_even(float32(acc + bias32) · M) + z_y, 0, 255)` as JAX does;
`QuantizeLinear` with scale 1 rounds the very product JAX rounds. The
constants are those the graph holds (computed in NumPy at calibration), only
converted to the types the ops take. Anything that does not match is left
as it was.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from dnnr_jax.io.onnx_integer import fits_u8s8, unsigned_weights
from dnnr_jax.io.onnx_rewrite import NodeRewritePass, constant, constant_value, replace

_NCHW, _NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


class StaticConvPass(NodeRewritePass):
  """The chain of the module docstring, 2-D convolutions, -> QLinearConv."""
  op_type = 'Conv'

  def rewrite(self, node: ir.Node) -> bool:
    inputs = _input_side(node)
    outputs = _output_side(node)
    kernel = _kernel(node.inputs[1]) if len(node.inputs) == 2 else None
    if inputs is None or outputs is None or kernel is None:
      return False
    scaling, input_zero = inputs
    last, bias, multiplier, output_zero, output_scale = outputs
    graph, name = node.graph, node.name
    features = kernel.shape[0]
    multiplier = np.broadcast_to(multiplier.astype(np.float32).reshape(-1), (features,))
    bias = np.broadcast_to(bias.astype(np.int32).reshape(-1), (features,))

    def const(suffix, value):
      return constant(graph, f'{name}_{suffix}', np.ascontiguousarray(value))

    one = const('unit_scale', np.float32(1))
    x_zero = const('input_zero', np.uint8(input_zero))
    y_zero = const('output_zero', np.uint8(output_zero))
    codes, new_nodes = _input_codes(scaling, input_zero, one, x_zero, name)
    first = ir.node('Transpose', [codes], {'perm': _NCHW}, name=f'{name}_channels_first')
    attributes = {key: value for key, value in node.attributes.items()
                  if key in ('strides', 'pads', 'dilations')}
    weights = const('kernel', kernel)
    if fits_u8s8(255, int(np.max(np.abs(kernel.astype(np.int32)), initial=0))):
      weight_zero = const('kernel_zero', np.zeros(features, np.int8))
    else:
      weights, weight_zero = unsigned_weights(node, weights, new_nodes)
    conv = ir.node('QLinearConv', [
        first.outputs[0], one, x_zero, weights, const('multiplier', multiplier),
        weight_zero, one, y_zero, const('bias', bias)], attributes, name=f'{name}_qlinear')
    back = ir.node('Transpose', [conv.outputs[0]], {'perm': _NHWC}, name=f'{name}_channels_last')
    dequantized = ir.node('DequantizeLinear', [back.outputs[0], const('output_scale', np.float32(
        output_scale)), y_zero], name=f'{name}_dequantize')
    for new in (first, conv, back):
      new.outputs[0].dtype = ir.DataType.UINT8
    dequantized.outputs[0].dtype = ir.DataType.FLOAT
    dequantized.outputs[0].shape = last.outputs[0].shape
    graph.insert_after(last, [*new_nodes, first, conv, back, dequantized])
    replace(last.outputs[0], dequantized.outputs[0])
    return True  # the old chain is left unused; RemoveUnusedNodesPass drops it


def _input_codes(scaling: ir.Node, input_zero: float, one: ir.Value, x_zero: ir.Value,
                 name: str) -> tuple[ir.Value, list[ir.Node]]:
  """The uint8 input codes [B, H, W, C] and the nodes that compute them from x."""
  source, inverse = scaling.inputs[0], _scalar(scaling.inputs[1])
  earlier = _relu_of_codes(source)
  if earlier is not None:  # x = ReLU((y - z) · s): the codes may be y floored at z, exactly
    codes, scale, zero = earlier
    every = np.arange(256)
    dequantized = np.maximum((every - int(zero)).astype(np.float32) * np.float32(scale), 0)
    requantized = np.clip(np.round(dequantized * np.float32(inverse)) + input_zero, 0, 255)
    if np.array_equal(requantized, np.maximum(every, zero)):
      floor = ir.node('Clip', [codes, x_zero], name=f'{name}_floor')
      floor.outputs[0].dtype = ir.DataType.UINT8
      return floor.outputs[0], [floor]
  # x · (1 / s_x) on [B, -1]: onnxruntime 1.32 multiplies [B, H, W, 1] by a scalar
  # some 70x slower (11 ms against 0.15 ms at batch 256, 28 x 28).
  flat = ir.node('Flatten', [source], {'axis': 1}, name=f'{name}_flat')
  scaled = ir.node('Mul', [flat.outputs[0], scaling.inputs[1]], name=f'{name}_scale')
  quantized = ir.node('QuantizeLinear', [scaled.outputs[0], one, x_zero],
                      name=f'{name}_quantize')
  shape = ir.node('Shape', [source], name=f'{name}_input_shape')
  codes = ir.node('Reshape', [quantized.outputs[0], shape.outputs[0]], name=f'{name}_codes')
  flat.outputs[0].dtype = scaled.outputs[0].dtype = ir.DataType.FLOAT
  quantized.outputs[0].dtype = codes.outputs[0].dtype = ir.DataType.UINT8
  shape.outputs[0].dtype = ir.DataType.INT64
  return codes.outputs[0], [flat, scaled, quantized, shape, codes]


def _relu_of_codes(value: ir.Value) -> tuple[ir.Value, float, float] | None:
  """(y, s, z) when `value` is `Relu(DequantizeLinear(y, s, z))` (or Max with 0) of uint8 y,
  else None."""
  relu = _producer(value, 'Relu') or _producer(value, 'Max')  # jnp.maximum(x, 0) is Max
  if relu is not None and relu.op_type == 'Max':
    zero = [item for item in relu.inputs if _scalar(item) == 0.0]
    inputs = [item for item in relu.inputs if item not in zero]
    relu = relu if len(relu.inputs) == 2 and len(zero) == len(inputs) == 1 else None
  else:
    inputs = None if relu is None else relu.inputs
  dequantized = None if relu is None else _producer(inputs[0], 'DequantizeLinear')
  if dequantized is None or dequantized.inputs[0].dtype != ir.DataType.UINT8:
    return None
  scale, zero = _scalar(dequantized.inputs[1]), _scalar(dequantized.inputs[2])
  return None if scale is None or zero is None else (dequantized.inputs[0], scale, zero)


def _input_side(conv: ir.Node) -> tuple[ir.Node, float] | None:
  """(the Mul x · 1/s_x, z_x) when the Conv's input is the quantization chain, else None."""
  transpose = _producer(conv.inputs[0], 'Transpose')
  if transpose is None or list(transpose.attributes.get_ints('perm', ())) != _NCHW:
    return None
  to_int = _producer(transpose.inputs[0], 'Cast')
  if to_int is None or to_int.attributes.get_int('to') != ir.DataType.INT32:
    return None
  chain = [to_int]
  for op_type in ('Sub', 'Clip', 'Add', 'Round', 'Mul'):
    chain.append(_producer(chain[-1].inputs[0], op_type))
    if chain[-1] is None:
      return None
  centered, clipped, shifted, _, scaled = chain[1:]
  if _clip_0_255(clipped.outputs[0]) is None or _scalar(scaled.inputs[1]) is None:
    return None
  zero = _scalar(centered.inputs[1])
  if zero is None or zero != _scalar(shifted.inputs[1]) or not _is_code(zero):
    return None
  return scaled, zero


def _output_side(conv: ir.Node) -> tuple | None:
  """(last node, bias32, M, z_y, s_y) when the Conv's output is the requantization chain."""
  transpose = _only_use(conv.outputs[0], 'Transpose')
  if transpose is None or list(transpose.attributes.get_ints('perm', ())) != _NHWC:
    return None
  chain = [transpose]
  for op_type in ('Add', 'Cast', 'Mul', 'Round', 'Add', 'Clip', 'Sub', 'Mul'):
    chain.append(_only_use(chain[-1].outputs[0], op_type))
    if chain[-1] is None:
      return None
  add_bias, to_float, scaled, _, shifted, clipped, centered, last = chain[1:]
  if to_float.attributes.get_int('to') != ir.DataType.FLOAT:
    return None
  bias, multiplier = constant_value(add_bias.inputs[1]), constant_value(scaled.inputs[1])
  zero, output_scale = _scalar(shifted.inputs[1]), _scalar(last.inputs[1])
  if (bias is None or bias.dtype != np.int32 or multiplier is None or output_scale is None
      or multiplier.dtype != np.float32 or zero is None or not _is_code(zero)
      or zero != _scalar(centered.inputs[1]) or _clip_0_255(clipped.outputs[0]) is None):
    return None
  return last, bias, multiplier, zero, output_scale


def _kernel(value: ir.Value) -> np.ndarray | None:
  """The int8 kernel [O, I, kh, kw] of `Transpose(Cast<int32>(w8))` or `Cast<int32>(w8)`."""
  node = value.producer()
  perm = None
  if node is not None and node.op_type == 'Transpose' and not node.domain:
    perm, node = node.attributes.get_ints('perm', None), node.inputs[0].producer()
  if node is None or node.op_type != 'Cast' or node.attributes.get_int('to') != ir.DataType.INT32:
    return None
  stored = constant_value(node.inputs[0])
  if stored is None or stored.dtype != np.int8 or stored.ndim != 4:
    return None
  return stored if perm is None else np.transpose(stored, list(perm))


def _clip_0_255(value: ir.Value) -> ir.Node | None:
  node = _producer(value, 'Clip')
  if node is None or len(node.inputs) != 3:
    return None
  low, high = _scalar(node.inputs[1]), _scalar(node.inputs[2])
  return node if (low, high) == (0.0, 255.0) else None


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
  node = value.producer() if value is not None else None
  return node if node is not None and node.op_type == op_type and not node.domain else None


def _only_use(value: ir.Value, op_type: str) -> ir.Node | None:
  uses = list(value.uses())
  if len(uses) != 1 or value.is_graph_output():
    return None
  node = uses[0].node
  return node if node.op_type == op_type and not node.domain and uses[0].idx == 0 else None


def _scalar(value: ir.Value | None) -> float | None:
  known = constant_value(value)
  return float(known.reshape(-1)[0]) if known is not None and known.size == 1 else None


def _is_code(value: float) -> bool:
  return value == round(value) and 0 <= value <= 255
