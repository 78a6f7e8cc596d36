"""Per-channel scale and bias as one `BatchNormalization`, for onnxruntime.

A dequantized layer of `compress` ends with the column (or output-channel)
scales and the bias: `Add(Mul(x, w), b)`. `ChannelAffinePass` writes that as
a `BatchNormalization` with mean 0, variance 1 and epsilon 0, which computes
the same two roundings, x * w then + b (tested bit for bit against the two
nodes in onnxruntime and ONNX's reference evaluator).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from dnnr_jax.io.onnx_rewrite import NodeRewritePass, constant, constant_value, reshape, substitute


class ChannelAffinePass(NodeRewritePass):
  """`Add(Mul(x, w), b)` with constant w, b per last-axis channel -> one `BatchNormalization`
  (mean 0, variance 1, epsilon 0: the same two roundings), on x viewed as [rows, C].

  The dequantized layers end so (column scales, then the bias). onnxruntime's
  broadcasting `Mul` and `Add` over a short last axis take about three times as
  long as its `BatchNormalization` over a [50176, 32] tensor (the first
  convolution of `scripts/compress_cnn.py` at batch 256), and a call runs one
  node instead of two.
  """
  op_type = 'Add'

  def rewrite(self, node: ir.Node) -> bool:
    for position in (0, 1):
      product, bias = node.inputs[position].producer(), constant_value(node.inputs[1 - position])
      if product is not None and product.op_type == 'Mul' and not product.domain:
        break
    else:
      return False
    source, weights = product.inputs[0], constant_value(product.inputs[1])
    shape = node.outputs[0].shape
    if (weights is None or bias is None or len(product.outputs[0].uses()) != 1
        or shape is None or source.shape is None or list(source.shape) != list(shape)
        or len(shape) < 2 or not all(isinstance(dim, int) for dim in shape[1:])):
      return False
    channels = shape[-1]
    if not all(_per_channel(array, len(shape), channels) for array in (weights, bias)):
      return False
    graph, name, new_nodes = node.graph, node.name, []
    parameters = [constant(graph, f'{name}_{label}', np.broadcast_to(
        value.reshape(-1), (channels,)).astype(np.float32)) for label, value in (
            ('scale', weights), ('bias', bias))]
    count = constant(graph, f'{name}_channels', np.array([channels], np.int64))
    for label, value in (('mean', 0.0), ('variance', 1.0)):  # an Expand: the file holds a scalar
      filled = ir.node('Expand', [constant(graph, f'{name}_{label}', np.float32(value)), count],
                       name=f'{name}_{label}')
      filled.outputs[0].dtype, filled.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([channels])
      new_nodes.append(filled)
      parameters.append(filled.outputs[0])
    rows = source
    if len(shape) > 2:
      rows = reshape(node, source, [-1, channels], 'rows', new_nodes)
    affine = ir.node('BatchNormalization', [rows, *parameters], {'epsilon': 0.0},
                     name=f'{name}_channel_affine')
    affine.outputs[0].dtype = ir.DataType.FLOAT
    new_nodes.append(affine)
    result = affine.outputs[0]
    if len(shape) > 2:
      result = reshape(node, result, [-1, *shape[1:]], 'restored', new_nodes)
    substitute(node, new_nodes, result)
    return True


def _per_channel(array: np.ndarray, rank: int, channels: int) -> bool:
  """A float array that broadcasts along the last of `rank` axes only."""
  return (array.dtype == np.float32 and array.ndim <= rank and array.size in (1, channels)
          and all(dim == 1 for dim in array.shape[:-1]))
