"""The static int8 convolution: uint8 codes in, uint8 codes out, as ONNX's `QLinearConv`.

A 'static' rule on a Conv calibrates the range of the layer's input and of its
output. Each becomes uint8 codes with a zero point (`affine_uint8`: the range
widened to hold 0, spread over 255 steps), and the layer computes

  codes = clip(round(x · (1 / s_x)) + z_x, 0, 255)
  acc   = conv(codes - z_x, w8) + round(b / (s_x · s_w))            (int32)
  y     = clip(round(float32(acc) · float32(s_x · s_w / s_y)) + z_y, 0, 255)
  out   = (y - z_y) · s_y

which is what onnxruntime's `QLinearConv` computes (round half to even, the
multiplier applied to the int32 sum in float32), so
`dnnr_jax.io.onnx_static_conv.StaticConvPass` exports it as QuantizeLinear →
QLinearConv → DequantizeLinear, equal to JAX. Every constant (1 / s_x, the
int32 bias, the float32 multiplier per output channel) is computed here in
NumPy once, when the layer is calibrated, and travels in a `StaticConv`.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dnnr_jax.compress import quantize
from dnnr_jax.errors import QuantizationError

OUTPUT = ':output'  # calibration's name of a static Conv's output, after its module path


@flax.struct.dataclass
class StaticConv:
  """The calibrated constants of one static convolution (float32 unless said).

  Attributes:
    input_inverse: 1 / s_x, the input's codes per unit.
    input_zero: z_x, a whole number in [0, 255].
    bias_codes: int32 [out], round(b / (s_x · s_w)) (zeros without a bias).
    multiplier: [out], s_x · s_w / s_y.
    output_zero: z_y.
    output_scale: s_y.
  """
  input_inverse: jax.Array
  input_zero: jax.Array
  bias_codes: jax.Array
  multiplier: jax.Array
  output_zero: jax.Array
  output_scale: jax.Array


def affine_uint8(value: quantize.ActivationRange) -> tuple[np.float32, np.float32]:
  """(scale, zero point) of uint8 codes over the range widened to hold 0."""
  low = min(float(value.minimum), 0.0)
  high = max(float(value.maximum), 0.0)
  scale = np.float32((high - low) / 255)
  if not scale >= np.finfo(np.float32).tiny:
    scale = np.float32(1)
  return scale, np.float32(np.clip(np.round(-low / scale), 0, 255))


def calibrated(ranges: dict[str, quantize.ActivationRange], record: dict[str, jax.Array],
               layers: dict[str, tuple[quantize.QArray, Any]]) -> dict[str, StaticConv]:
  """{path: StaticConv} of each static convolution.

  Args:
    ranges: calibration's ranges: each layer's input at its path, its output at
      path + OUTPUT.
    record: the same activations of one calibration batch.
    layers: {path: (int8 kernel, float bias or None)}.

  A convolution whose input was exactly the ReLU of another one's output
  (on `record`) takes that output's grid as its input grid: its input codes
  are then the earlier codes floored at their zero point, with no second
  rounding (`dnnr_jax.io.onnx_static_conv` exports that as one `Clip`).
  """
  outputs = {path: affine_uint8(ranges[path + OUTPUT]) for path in layers}
  result = {}
  for path, (kernel, bias) in layers.items():
    grid = affine_uint8(ranges[path])
    for other in layers:
      output, inputs = record[other + OUTPUT], record[path]
      if (other != path and output.shape == inputs.shape
          and bool(jnp.array_equal(inputs, jnp.maximum(output, 0)))):
        grid = outputs[other]
    result[path] = constants(kernel, bias, grid, outputs[path])
  return result


def constants(kernel: quantize.QArray, bias, input_grid: tuple, output_grid: tuple) -> StaticConv:
  """The StaticConv of an int8 `kernel` [*k, in, out] and float `bias` [out] (or None),
  with (scale, zero point) of the input and of the output codes."""
  _check_kernel(kernel)
  features = kernel.shape[-1]
  input_scale, input_zero = (np.float32(value) for value in input_grid)
  output_scale, output_zero = (np.float32(value) for value in output_grid)
  kernel_scale = np.broadcast_to(np.asarray(kernel.scale, np.float32).reshape(-1), (features,))
  accumulator_scale = (input_scale * kernel_scale).astype(np.float32)
  bias = np.zeros(features, np.float32) if bias is None else np.asarray(bias, np.float32)
  return StaticConv(
      input_inverse=np.float32(1) / input_scale, input_zero=input_zero,
      bias_codes=np.round(bias / accumulator_scale).astype(np.int32),
      multiplier=(accumulator_scale / output_scale).astype(np.float32),
      output_zero=output_zero, output_scale=output_scale)


def forward(spec, kernel: quantize.QArray, conv: StaticConv, inputs: jax.Array) -> jax.Array:
  """float32 [*batch, *out_spatial, out]: the layer as the module docstring writes it."""
  _check_kernel(kernel)
  spatial = len(spec.kernel_size)
  batch_shape = inputs.shape[:inputs.ndim - spatial - 1]
  x = inputs.reshape(math.prod(batch_shape), *inputs.shape[-spatial - 1:]).astype(jnp.float32)
  codes = jnp.clip(jnp.round(x * conv.input_inverse) + conv.input_zero, 0, 255)
  ndim = spatial + 2
  channels_last = (0, ndim - 1, *range(1, ndim - 1))
  accumulator = jax.lax.conv_general_dilated(
      (codes - conv.input_zero).astype(jnp.int32), kernel.value.astype(jnp.int32),
      spec.strides, spec.padding, rhs_dilation=spec.dilation,
      dimension_numbers=jax.lax.ConvDimensionNumbers(
          channels_last, (ndim - 1, ndim - 2, *range(ndim - 2)), channels_last),
      preferred_element_type=jnp.int32)
  channels = (1,) * (ndim - 1) + (-1,)
  accumulator = accumulator + jnp.reshape(conv.bias_codes, channels)
  codes = jnp.clip(jnp.round(accumulator.astype(jnp.float32) * jnp.reshape(conv.multiplier,
                                                                           channels))
                   + conv.output_zero, 0, 255)
  outputs = (codes - conv.output_zero) * conv.output_scale
  return outputs.reshape(*batch_shape, *outputs.shape[1:])


def _check_kernel(kernel) -> None:
  if (not isinstance(kernel, quantize.QArray) or not kernel.symmetric
      or kernel.value.dtype != jnp.int8 or kernel.axis not in (None, kernel.value.ndim - 1)):
    raise QuantizationError(
        'a static convolution needs a symmetric int8-coded kernel scaled per output channel or '
        'per tensor; quantize it with compress.quantize_linen or quantize_nnx.')
