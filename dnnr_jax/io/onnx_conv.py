"""Integer convolutions as one u8s8 GEMM over gathered uint8 windows, exact on every CPU.

jax2onnx lowers the int8 convolution of `compress` (`lax.conv_general_dilated`
of int8 codes and an int8 kernel, `preferred_element_type=int32`) to a `Conv`
on int32 casts between two layout `Transpose`s, which ONNX does not define
(`Conv` takes floats). `IntegerConvPass` rewrites it to what onnxruntime runs
fast, channels last throughout:

  Reshape [B, positions, C] -> (Pad one position) -> Gather(windows)
  -> Reshape [B, *out, taps * C] -> MatMulInteger(uint8, int8 [taps * C, out])

The codes become uint8 as for a matmul (`onnx_integer.to_uint8`: a ReLU's
codes as they are, signed codes + 128 with zero point 128); with signed codes
and weights beyond +-64 each window is gathered twice against the weight
halves, so AVX2's int16 pair sums never saturate. Padded taps read one extra
position that holds the zero point. The window indices are constant
expressions of one small vector per spatial axis, the kernel matrix is the
stored kernel reshaped; onnxruntime folds both when the session is created.

With fewer than `MIN_GATHERED_CHANNELS` input channels (a first layer on
images) the `Gather` copies too few bytes per index to be fast, and the
codes run through a float `Conv` instead, exact because every partial sum is
a whole number below 2**24 (`_exact_in_float32`).

Measured on an AVX-512 VNNI + AMX Xeon (onnxruntime 1.32, a micro-benchmark
of the second convolution of `scripts/compress_cnn.py` at batch 256):
`ConvInteger` ran 2-6x slower than the float `Conv` (int8 and uint8 weights
alike), the windows gathered with nine strided `Slice`s and a `Concat` about
as fast as the float `Conv`, one `Gather` about 2.5x faster. The int32 sums
equal JAX's exactly.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from dnnr_jax.io.onnx_integer import (
  cast,
  float_codes,
  int8_source,
  max_abs,
  to_uint8,
  weight_halves,
)
from dnnr_jax.io.onnx_rewrite import NodeRewritePass, constant, constant_value, replace, reshape

# Fewer input channels than this: a float Conv on the codes. The one-channel first layer of
# scripts/compress_cnn.py gathered its windows in 34 ms of a 120 ms batch-256 call (a byte
# per index, each twice for the halves); its float Conv took 2-4 ms.
MIN_GATHERED_CHANNELS = 8


class IntegerConvPass(NodeRewritePass):
  """`Transpose(Conv(Cast<int32>(Transpose(x8)), Cast<int32>(w8)))` -> a u8s8 `MatMulInteger`
  over gathered windows, or for few input channels a float `Conv` on the codes (see the
  module docstring); other convolutions stay."""
  op_type = 'Conv'

  def rewrite(self, node: ir.Node) -> bool:
    sources = [int8_source(value) for value in node.inputs[:2]]
    if len(node.inputs) != 2 or None in sources:
      return False
    codes, kernel = _channels_last(sources[0]), _kernel(sources[1])
    outputs = _channels_last_outputs(node)
    if codes is None or kernel is None or outputs is None:
      return False
    spatial = kernel.ndim - 2
    geometry = _geometry(node, spatial)
    if (geometry is None or codes.shape is None or len(codes.shape) != spatial + 2
        or not all(isinstance(dim, int) for dim in codes.shape[1:])):
      return False
    new_nodes = []
    if kernel.shape[1] < MIN_GATHERED_CHANNELS and _exact_in_float32(kernel):
      result = _float_conv(node, codes, kernel, new_nodes)
    else:
      result = _gathered_matmul(node, codes, kernel, geometry, new_nodes)
      if result is None:
        return False
    node.graph.insert_before(node, new_nodes)
    for transpose in outputs:
      result.shape = transpose.outputs[0].shape
      replace(transpose.outputs[0], result)
      node.graph.remove(transpose, safe=True)
    node.graph.remove(node, safe=True)
    _skip_round_trip(result)
    return True


def _skip_round_trip(result: ir.Value) -> None:
  """`Cast<float>(Cast<int32>(f))` -> `f` for the float Conv's whole-number output f."""
  to_int32 = result.producer()
  if to_int32.op_type != 'Cast' or to_int32.inputs[0].dtype != ir.DataType.FLOAT:
    return
  for use in list(result.uses()):
    node = use.node
    if (node.op_type == 'Cast' and not node.domain and node.attributes.get_int('to')
        == ir.DataType.FLOAT and not node.outputs[0].is_graph_output()):
      ir.convenience.replace_all_uses_with(node.outputs[0], to_int32.inputs[0])
      node.graph.remove(node, safe=True)


def _gathered_matmul(node, codes, kernel, geometry, new_nodes) -> ir.Value | None:
  """int32 [B, *out, O]: `MatMulInteger` of the uint8 windows and the kernel matrix."""
  # [O, I, *k] -> [*k, I, O] -> [taps * I, O]: the gathered windows' order.
  matrix = np.transpose(kernel, (*range(2, kernel.ndim), 1, 0)).reshape(-1, kernel.shape[0])
  weights = constant(node.graph, f'{node.name}_kernel_matrix', np.ascontiguousarray(matrix))
  unsigned = to_uint8(node, _row_codes(codes), max_abs(weights), new_nodes)
  if unsigned is None:
    return None
  activations, zero_point, halves = unsigned
  activations = _restore_shape(node, codes, activations, new_nodes)
  if halves:
    weights = weight_halves(node, weights, new_nodes)
  patches = _windows(node, activations, zero_point, list(codes.shape[1:]), kernel.shape[2:],
                     geometry, 2 if halves else 1, new_nodes)
  integer = ir.node('MatMulInteger', [patches, weights] + ([zero_point] if zero_point else []),
                    name=f'{node.name}_integer')
  integer.outputs[0].dtype = ir.DataType.INT32
  new_nodes.append(integer)
  return integer.outputs[0]


def _float_conv(node, codes, kernel, new_nodes) -> ir.Value:
  """int32 [B, *out, O]: the float `Conv` of the codes (whole numbers) and the kernel,
  which is exact (`_exact_in_float32`), cast back."""
  rows = _row_codes(codes)
  whole = float_codes(rows)  # the float codes the int8 ones were cast from, if any
  source = whole if whole is not None else cast(node, rows, ir.DataType.FLOAT,
                                                  'codes_to_float', new_nodes)
  if rows is not codes:
    source = reshape(node, source, [0, *codes.shape[1:]], 'float_codes', new_nodes)
  rank = kernel.ndim
  first = ir.node('Transpose', [source], {'perm': [0, rank - 1, *range(1, rank - 1)]},
                  name=f'{node.name}_channels_first')
  stored = constant(node.graph, f'{node.name}_kernel', np.ascontiguousarray(kernel))
  weights = cast(node, stored, ir.DataType.FLOAT, 'kernel_to_float', new_nodes)
  conv = ir.node('Conv', [first.outputs[0], weights], dict(node.attributes.items()),
                 name=f'{node.name}_float')
  last = ir.node('Transpose', [conv.outputs[0]], {'perm': [0, *range(2, rank), 1]},
                 name=f'{node.name}_channels_last')
  for value in (first.outputs[0], conv.outputs[0], last.outputs[0]):
    value.dtype = ir.DataType.FLOAT
  new_nodes += [first, conv, last]
  return cast(node, last.outputs[0], ir.DataType.INT32, 'to_int32', new_nodes)


def _exact_in_float32(kernel: np.ndarray) -> bool:
  """Whether every partial sum of int8 codes (|a| <= 128) times the kernel's columns is a
  whole number below 2**24, so float32 adds them exactly in any order."""
  taps = int(np.prod(kernel.shape[1:]))
  return taps * 128 * int(np.max(np.abs(kernel.astype(np.int32)), initial=0)) < 2 ** 24


def _channels_last(value: ir.Value) -> ir.Value | None:
  """x [B, *spatial, C] when `value` is its Transpose to [B, C, *spatial], else None."""
  node = value.producer()
  if node is None or node.op_type != 'Transpose' or node.domain:
    return None
  rank = len(node.attributes.get_ints('perm', ()))
  if list(node.attributes.get_ints('perm', ())) != [0, rank - 1, *range(1, rank - 1)]:
    return None
  return node.inputs[0]


def _kernel(value: ir.Value) -> np.ndarray | None:
  """The constant int8 kernel [O, I, *k], possibly a Transpose of a stored one."""
  known = constant_value(value)
  if known is not None:
    return known
  node = value.producer()
  if node is None or node.op_type != 'Transpose' or node.domain:
    return None
  stored = constant_value(node.inputs[0])
  perm = node.attributes.get_ints('perm', None)
  return None if stored is None or perm is None else np.transpose(stored, perm)


def _channels_last_outputs(node: ir.Node) -> list[ir.Node] | None:
  """The Transposes back to channels last that are the only uses of the Conv's output."""
  uses = list(node.outputs[0].uses())
  rank = node.outputs[0].shape.rank() if node.outputs[0].shape is not None else None
  if rank is None or not uses or node.outputs[0].is_graph_output():
    return None
  expected = [0, *range(2, rank), 1]
  transposes = [use.node for use in uses]
  if any(t.op_type != 'Transpose' or t.domain or list(t.attributes.get_ints('perm', ()))
         != expected for t in transposes):
    return None
  return transposes


def _geometry(node: ir.Node, spatial: int) -> dict | None:
  """Strides, dilations and (begin, end) pads per spatial axis; None if not plain."""
  if node.attributes.get_int('group', 1) != 1 or node.attributes.get_string(
      'auto_pad', 'NOTSET') != 'NOTSET':
    return None
  pads = list(node.attributes.get_ints('pads', [0] * 2 * spatial))
  return {'strides': list(node.attributes.get_ints('strides', [1] * spatial)),
          'dilations': list(node.attributes.get_ints('dilations', [1] * spatial)),
          'pads': list(zip(pads[:spatial], pads[spatial:], strict=True))}


def _row_codes(codes: ir.Value) -> ir.Value:
  """The int8 codes `codes` reshapes (per-example rows quantized at once), else `codes`."""
  node = codes.producer()
  if (node is not None and node.op_type == 'Reshape' and not node.domain
      and node.inputs[0].dtype == ir.DataType.INT8):
    return node.inputs[0]
  return codes


def _restore_shape(node: ir.Node, codes: ir.Value, unsigned: ir.Value,
                   new_nodes: list) -> ir.Value:
  """`unsigned` in the shape of `codes` (it may be their rows), by a constant shape, so
  that nothing reads the int8 codes any more."""
  if _row_codes(codes) is codes:
    return unsigned
  return reshape(node, unsigned, [0, *codes.shape[1:]], 'unsigned', new_nodes)


def _windows(node, activations, zero_point, shape, kernel_size, geometry, repeats, new_nodes):
  """uint8 [B, *out, repeats * taps * C]: every input window of the convolution, in
  kernel order (taps row-major, then channels), from channels-last codes [B, *shape].

  The codes are flattened to [B, positions, C]; with padding one more position
  holding the zero point stands for every padded one (a `Pad` of that axis alone,
  which copies whole rows, unlike a spatial `Pad`).
  """
  graph, name = node.graph, node.name
  sizes, channels = shape[:-1], shape[-1]
  positions = math.prod(sizes)
  flat = reshape(node, activations, [0, positions, channels], 'positions', new_nodes)
  out, terms = _window_indices(sizes, kernel_size, geometry)
  if any(np.max(term) >= positions for term in terms):
    pads = constant(graph, f'{name}_pads', np.array([0, 0, 0, 0, 1, 0], np.int64))
    fill = zero_point or constant(graph, f'{name}_pad_value', np.uint8(0))
    pad = ir.node('Pad', [flat, pads, fill], name=f'{name}_padding_position')
    pad.outputs[0].dtype = ir.DataType.UINT8
    new_nodes.append(pad)
    flat = pad.outputs[0]
  indices = _index_constant(node, out, terms, positions, repeats, new_nodes)
  gather = ir.node('Gather', [flat, indices],
                   {'axis': 1}, name=f'{name}_windows')
  gather.outputs[0].dtype = ir.DataType.UINT8
  new_nodes.append(gather)
  return reshape(node, gather.outputs[0],
                 [0, *out, repeats * math.prod(kernel_size) * channels], 'patches', new_nodes)


def _window_indices(sizes, kernel_size, geometry) -> tuple[list[int], list[np.ndarray]]:
  """The output's spatial shape and one int32 term per axis, shaped to broadcast to
  [*out, *k]: their sum is each tap's flat position, or at least prod(sizes) where
  the tap falls in the padding."""
  positions = math.prod(sizes)
  out, terms = [], []
  for axis, (size, k) in enumerate(zip(sizes, kernel_size, strict=True)):
    begin, end = geometry['pads'][axis]
    stride, dilation = geometry['strides'][axis], geometry['dilations'][axis]
    count = (size + begin + end - dilation * (k - 1) - 1) // stride + 1
    out.append(count)
    where = np.arange(count)[:, None] * stride + np.arange(k)[None, :] * dilation - begin
    term = np.where((where >= 0) & (where < size), where * math.prod(sizes[axis + 1:]),
                    positions)
    shape = [1] * (2 * len(sizes))
    shape[axis], shape[len(sizes) + axis] = count, k
    terms.append(term.reshape(shape).astype(np.int32))
  return out, terms


def _index_constant(node, out, terms, positions, repeats, new_nodes) -> ir.Value:
  """int32 [*out, repeats * taps]: the sum of the per-axis terms, capped at the padding
  position, each window's taps `repeats` times. Constant expressions of small
  vectors (onnxruntime folds them), so the file holds no index table."""
  graph, name = node.graph, node.name
  total = constant(graph, f'{name}_window_axis_0', terms[0])
  for axis, term in enumerate(terms[1:], start=1):
    total = _binary(node, 'Add', total, constant(graph, f'{name}_window_axis_{axis}', term),
                    f'window_sum_{axis}', new_nodes)
  if any(np.max(term) >= positions for term in terms):
    total = _binary(node, 'Min', total, constant(graph, f'{name}_padding_index',
                                                 np.int32(positions)), 'window_cap', new_nodes)
  total = reshape(node, total, [*out, -1], 'window_indices', new_nodes)
  if repeats > 1:
    twice = ir.node('Concat', [total] * repeats, {'axis': -1}, name=f'{name}_windows_twice')
    twice.outputs[0].dtype = ir.DataType.INT32
    new_nodes.append(twice)
    total = twice.outputs[0]
  return total


def _binary(node, op_type, left, right, suffix, new_nodes) -> ir.Value:
  result = ir.node(op_type, [left, right], name=f'{node.name}_{suffix}')
  result.outputs[0].dtype = ir.DataType.INT32
  new_nodes.append(result)
  return result.outputs[0]
