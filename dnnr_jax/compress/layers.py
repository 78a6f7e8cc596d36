"""The arithmetic of a quantized Dense, DenseGeneral or Conv layer, on any inputs.

Every supported layer is computed as one matrix product, so one set of
integer kernels (`quantize.int8_matmul` and friends) serves them all:

* Dense / DenseGeneral: the contracted input axes are flattened into F, the
  kernel [*in_axes, *features] into a matrix [F, prod(features)].
* Conv (channels last, any number of spatial axes): the input patches are
  gathered with slices (pad, then one strided slice per kernel offset,
  concatenated along channels), so a kernel [kh, kw, in, out] is the matrix
  [kh·kw·in, out] as it lies in memory. Slices, not
  `lax.conv_general_dilated_patches`, because that one is itself a
  convolution with a one-hot kernel: kh·kw·in times the work, in JAX and in
  the exported ONNX graph.
* Except an integer (dynamic or static) Conv: its input is quantized once,
  one scale per example (dynamic) or the calibrated one (static; calibrated
  by `calibrate_linen`/`calibrate_nnx` it is `compress.static_conv`'s uint8
  QLinearConv arithmetic, output requantized too), and the
  int8 codes are convolved with the int8 kernel in int32
  (`lax.conv_general_dilated`). One scale per input window, as a row of the
  patch matrix would get, cannot be written as a convolution; one per example
  can, and `dnnr_jax.io.onnx_conv` exports it as an integer GEMM over uint8
  windows.

`LayerSpec` is what a layer's attributes say about its geometry; it is read
from a Linen or an NNX module by duck typing (both spell the attributes
alike), so the Linen interceptor and the NNX layer swap share this code.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from dnnr_jax.compress import quantize, static_conv
from dnnr_jax.errors import QuantizationError

LINEN_KINDS = ('Dense', 'DenseGeneral', 'Conv', 'Einsum')  # Einsum: compress.einsum
NNX_KINDS = ('Linear', 'LinearGeneral', 'Conv')


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """The geometry of one layer.

  Attributes:
    kind: 'dense' or 'conv'.
    contracted: dense: the input axes contracted (negative, ascending).
    kernel_size: conv: the window; () for dense.
    strides, dilation: conv: one per spatial axis.
    padding: conv: (low, high) per spatial axis, or 'SAME' / 'VALID'.
  """
  kind: str
  contracted: tuple[int, ...] = (-1,)
  kernel_size: tuple[int, ...] = ()
  strides: tuple[int, ...] = ()
  dilation: tuple[int, ...] = ()
  padding: Any = 'VALID'


def spec_of(module: Any, path: str) -> LayerSpec:
  """The LayerSpec of a Linen nn.Dense/DenseGeneral/Conv or NNX nnx.Linear/Conv."""
  kind = type(module).__name__
  if kind in ('Dense', 'Linear'):
    return LayerSpec('dense')
  if kind in ('DenseGeneral', 'LinearGeneral'):
    axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
    if getattr(module, 'batch_dims', ()) or any(a >= 0 for a in axis):
      raise QuantizationError(
          f'layer {path!r} ({kind}) uses batch_dims or a non-negative axis, which the quantizer '
          'does not support; give it negative axes only or exclude it from the rules.')
    return LayerSpec('dense', contracted=tuple(sorted(axis)))
  size = tuple(module.kernel_size)
  if (_tuple(module.input_dilation, len(size)) != (1,) * len(size)
      or module.feature_group_count != 1
      or (isinstance(module.padding, str) and module.padding.upper() not in ('SAME', 'VALID'))):
    raise QuantizationError(
        f'layer {path!r} (Conv) uses input dilation, feature groups or {module.padding!r} padding, '
        'which the quantizer does not support; exclude it from the rules.')
  padding = module.padding
  if isinstance(padding, str):
    padding = padding.upper()
  elif isinstance(padding, int):
    padding = ((padding, padding),) * len(size)
  else:
    padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  return LayerSpec('conv', kernel_size=size, strides=_tuple(module.strides, len(size)),
                   dilation=_tuple(module.kernel_dilation, len(size)), padding=padding)


def expected_kernel_shape(spec: LayerSpec, module: Any, inputs: jax.Array) -> tuple[int, ...]:
  """The kernel shape the layer's attributes and `inputs` call for (Linen modules)."""
  if spec.kind == 'conv':
    return (*spec.kernel_size, inputs.shape[-1], module.features)
  features = module.features if isinstance(module.features, Sequence) else (module.features,)
  return (*(inputs.shape[axis] for axis in spec.contracted), *features)


def forward(spec: LayerSpec, mode: str, kernel: Any, bias: Any, inputs: jax.Array,
            activation_scale: jax.Array | None = None,
            activations: str = 'per_row') -> jax.Array:
  """The layer's output with `kernel` used as `mode` says.

  Args:
    spec: the layer's geometry.
    mode: 'weight_only', 'dynamic', 'static' (QArray kernel) or 'qat' (a float
      kernel, already fake-quantized by the caller).
    kernel: a QArray, or a float array for 'qat'.
    bias: None or the float bias, [*features].
    inputs: dense: [..., *in]; conv: [*batch, *spatial, in] channels last.
    activation_scale: for 'static', the calibrated scalar scale, or for a Conv
      its `static_conv.StaticConv` (then the bias is the one it holds).
    activations: 'per_row' or 'per_batch', for 'dynamic' (see `compress.rules`).
  """
  if isinstance(activation_scale, static_conv.StaticConv) and spec.kind == 'conv':
    return static_conv.forward(spec, kernel, activation_scale, inputs)
  if spec.kind == 'conv' and mode in ('dynamic', 'static'):
    if activations != 'per_row':
      raise QuantizationError(
          f"activations {activations!r} apply to Dense layers only; give the convolutions a "
          "rule with activations='per_row'.")
    outputs = _integer_conv(spec, mode, kernel, inputs, activation_scale)
    if bias is None:
      return outputs
    return outputs + jnp.reshape(bias, (1,) * (outputs.ndim - 1) + (-1,))
  if spec.kind == 'conv':
    rows, out_shape = _patches(spec, inputs)
  else:
    rows, out_shape = _dense_rows(spec, inputs)
  ndim = len(kernel.shape)
  out_ndim = 1 if spec.kind == 'conv' else ndim - len(spec.contracted)
  features = tuple(kernel.shape[ndim - out_ndim:])
  outputs = matmul(mode, rows, kernel, out_ndim, activation_scale, activations)
  outputs = outputs.reshape(*out_shape, *features)
  if bias is not None:
    outputs = outputs + jnp.reshape(bias, (1,) * (outputs.ndim - bias.ndim) + bias.shape)
  return outputs


def matmul(mode: str, rows: jax.Array, kernel: Any, out_ndim: int,
           activation_scale, activations: str = 'per_row') -> jax.Array:
  """rows [N, F] times the kernel [*in, *out] read as [F, prod(out)], as `mode` says."""
  rows = rows.astype(jnp.float32)
  if mode == 'qat':
    return rows @ kernel.reshape(rows.shape[-1], -1)
  matrix = as_matrix(kernel, out_ndim)
  if mode == 'weight_only':
    return quantize.weight_only_matmul(rows, matrix)
  if mode == 'static':
    return quantize.static_int8_matmul(rows, activation_scale, matrix)
  if activations == 'per_batch':
    return quantize.batch_int8_matmul(rows, matrix)
  return quantize.int8_matmul(rows, matrix)


def _integer_conv(spec: LayerSpec, mode: str, kernel: quantize.QArray, inputs: jax.Array,
                  activation_scale) -> jax.Array:
  """float32 [*batch, *out_spatial, out]: int8 codes of `inputs` convolved with the int8
  kernel in int32, scaled back (see the module docstring)."""
  if not kernel.symmetric or kernel.axis not in (None, kernel.value.ndim - 1):
    raise QuantizationError(
        f'an integer convolution needs a symmetric kernel scaled per output channel or per '
        f'tensor, got symmetric={kernel.symmetric}, axis={kernel.axis}; quantize with '
        'symmetric=True and axis=-1 or None.')
  spatial = len(spec.kernel_size)
  batch_shape = inputs.shape[:inputs.ndim - spatial - 1]
  x = inputs.reshape(math.prod(batch_shape), *inputs.shape[-spatial - 1:]).astype(jnp.float32)
  if mode == 'static':
    codes, scale = quantize.quantize_static(x, activation_scale), activation_scale
  else:  # quantize_rows over each example's every value: one scale per example
    rows, row_scale = quantize.quantize_rows(x.reshape(x.shape[0], -1))
    codes, scale = rows.reshape(x.shape), row_scale
  ndim = spatial + 2
  channels_last = (0, ndim - 1, *range(1, ndim - 1))
  accumulator = jax.lax.conv_general_dilated(
      codes, kernel.value, spec.strides, spec.padding, rhs_dilation=spec.dilation,
      dimension_numbers=jax.lax.ConvDimensionNumbers(
          channels_last, (ndim - 1, ndim - 2, *range(ndim - 2)), channels_last),
      preferred_element_type=jnp.int32)
  channel_scale = jnp.reshape(kernel.scale, (1,) * (ndim - 1) + (-1,))
  outputs = accumulator.astype(jnp.float32) * jnp.reshape(scale, (-1,) + (1,) * (ndim - 1))
  outputs = outputs * channel_scale
  return outputs.reshape(*batch_shape, *outputs.shape[1:])


def as_matrix(q: quantize.QArray, out_ndim: int) -> quantize.QArray:
  """A QArray kernel [*in, *out] (scaled per tensor or along its last axis) as the
  [prod(in), prod(out)] QArray the matmuls take, one scale per column."""
  ndim = q.value.ndim
  if ndim == 2 and out_ndim == 1 and q.axis in (None, 1):
    return q  # Already the matrix: no reshapes, so the traced graph has none.
  if q.axis is not None and q.axis < ndim - out_ndim:
    raise QuantizationError(
        f'a kernel of shape {q.shape} is scaled along input axis {q.axis}; quantize it per '
        'output channel (axis=-1) or per tensor.')
  out_shape = q.shape[ndim - out_ndim:]
  target = out_shape if q.axis is not None else (1,) * out_ndim

  def columns(per_axis):  # scale or zero point: [1, prod(out)] (or [1, 1])
    trailing = per_axis.reshape(per_axis.shape[ndim - out_ndim:])
    return jnp.broadcast_to(trailing, target).reshape(1, -1)

  zero_point = None if q.zero_point is None else columns(q.zero_point)
  return quantize.QArray(q.value.reshape(-1, math.prod(out_shape)), columns(q.scale), zero_point,
                         bits=q.bits, axis=None if q.axis is None else 1,
                         symmetric=q.symmetric)


def _dense_rows(spec: LayerSpec, inputs: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
  count = len(spec.contracted)
  trailing = tuple(range(-count, 0))
  # No identity moveaxis: traced for ONNX, it would leave a Transpose in the graph.
  moved = inputs if spec.contracted == trailing else jnp.moveaxis(inputs, spec.contracted,
                                                                  trailing)
  batch_shape = moved.shape[:-count]
  return moved.reshape(math.prod(batch_shape), -1), batch_shape


def _patches(spec: LayerSpec, inputs: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
  """Rows [N, kh·kw·in] of the input windows, and the output's leading shape."""
  spatial = len(spec.kernel_size)
  batch_shape = inputs.shape[:inputs.ndim - spatial - 1]
  x = inputs.reshape(math.prod(batch_shape), *inputs.shape[-spatial - 1:])
  window = tuple(d * (k - 1) + 1 for k, d in zip(spec.kernel_size, spec.dilation, strict=True))
  pads = (jax.lax.padtype_to_pads(x.shape[1:-1], window, spec.strides, spec.padding)
          if isinstance(spec.padding, str) else spec.padding)
  x = _zero_pad(x, pads)
  out_sizes = tuple((size - w) // s + 1 for size, w, s in
                    zip(x.shape[1:-1], window, spec.strides, strict=True))
  pieces = []
  for offset in itertools.product(*(range(k) for k in spec.kernel_size)):
    index = tuple(slice(o * d, o * d + (n - 1) * s + 1, s) for o, d, n, s in
                  zip(offset, spec.dilation, out_sizes, spec.strides, strict=True))
    pieces.append(x[(slice(None), *index, slice(None))])
  patches = jnp.concatenate(pieces, axis=-1)
  return patches.reshape(-1, patches.shape[-1]), (*batch_shape, *out_sizes)


def _zero_pad(x: jax.Array, pads: Sequence[tuple[int, int]]) -> jax.Array:
  """`jnp.pad` with zeros, spatial axes only, written as concatenations.

  jax2onnx cannot lower `lax.pad` of a traced jaxpr with a symbolic batch axis
  (`dnnr_jax.io.export_function` exports from one); zeros concatenated are
  the same array.
  """
  for axis, (low, high) in enumerate(pads, start=1):
    if low < 0 or high < 0:
      raise QuantizationError(f'padding {tuple(pads)} is negative; pass padding >= 0.')
    if low or high:
      zero = jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis))
      x = jnp.concatenate([zero] * low + [x] + [zero] * high, axis=axis)
  return x


def _tuple(value: int | Sequence[int] | None, length: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * length
  return (value,) * length if isinstance(value, int) else tuple(value)
