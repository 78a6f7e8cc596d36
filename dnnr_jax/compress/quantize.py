"""Integer quantization of params pytrees, and the integer matmuls it feeds.

* `axis` is the one axis whose slices keep their own scale; `scale` has the
  value's rank, size 1 elsewhere. A Dense kernel [in, out] with `axis=-1`
  (stored as 1) is per output channel, scale [1, out]; `axis=None` is per
  tensor, scale [1, 1].
* Symmetric codes lie in [-qmax, qmax], qmax = 2**(bits - 1) - 1 (127 or 7),
  so negating a code never overflows; asymmetric codes use the whole
  [-qmax - 1, qmax] around an integer `zero_point`. 4-bit codes sit one per
  int8 in memory; `pack_int4` puts two in a byte for storage.
* `dequantize(quantize(w))` is within scale / 2 of `w` element-wise, up to
  float32 rounding. A channel whose scale would be zero or subnormal (an
  all-zero channel) gets scale 1 and zero codes, never NaN.
* Weight scales are rounded up to the nearest float16 value (where float16
  has one: normal, finite), so a checkpoint stores them in two bytes with
  nothing lost (see `compress.storage`); the step grows by at most 2**-10.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dnnr_jax.compress.paths import DEFAULT_PATTERNS, select
from dnnr_jax.config import CALIBRATION_METHODS, QUANTIZE_BITS
from dnnr_jax.errors import DnnrError, QuantizationError


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How to quantize the weights of a params pytree (qwix's `HowToQuantize`).

  One frozen object carries the settings through `quantize_params`,
  `qat.fake_quantize_params` and `qat.convert`, so the weights QAT trains
  against are the ones conversion produces.

  Attributes:
    bits: 8, 7 or 4.
    per_channel: one scale per output channel (last axis), else per tensor.
    symmetric: scale by max|w| around zero; otherwise map [min, max] onto
      the full code range with a zero point (see `quantize`).
    patterns: regular expressions, each fully matched against '/'-joined
      paths such as 'trunk_0/kernel'; each must match at least one leaf.
  """
  bits: int = 8
  per_channel: bool = True
  symmetric: bool = True
  patterns: tuple[str, ...] = DEFAULT_PATTERNS

  @property
  def axis(self) -> int | None:
    """The axis with its own scales: -1 per output channel, None per tensor."""
    return -1 if self.per_channel else None


DEFAULT_SPEC = QuantSpec()  # Symmetric int8 per output channel, every Dense kernel.


@flax.struct.dataclass
class QArray:
  """Integer codes and the scale (and zero point) that map them back to floats.

  Attributes:
    value: int8 codes, the original shape.
    scale: float32, the value's rank, size 1 on every axis but `axis`.
    zero_point: int8 code of 0.0 with the scale's shape; None when symmetric.
    bits: 8, 7 or 4.
    axis: the non-negative axis with its own scales, or None for one scale.
    symmetric: codes in [-qmax, qmax] and no zero point.
  """
  value: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None = None
  bits: int = flax.struct.field(pytree_node=False, default=8)
  axis: int | None = flax.struct.field(pytree_node=False, default=None)
  symmetric: bool = flax.struct.field(pytree_node=False, default=True)

  shape = property(lambda self: self.value.shape, doc='The original shape.')

  def dequantize(self) -> jax.Array:
    """float32 approximation of the original array."""
    return dequantize(self)

  def __jax_array__(self):
    # Reached when float code (a Flax layer outside the quantized context) takes a QArray.
    raise QuantizationError(
        f'a QArray of shape {self.shape} was used as a float array; run the model through '
        'compress.quantized_apply (Linen) or compress.quantize_nnx (NNX) with a rule for '
        'its layer, or dequantize_params first.')


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
  """The smallest and largest code: [-qmax, qmax] symmetric, else [-qmax - 1, qmax]."""
  if bits not in QUANTIZE_BITS:  # codes of every width are stored one per int8
    raise DnnrError(f'bits = {bits!r} is not supported; pass 8, 7 or 4.')
  qmax = 2 ** (bits - 1) - 1
  return (-qmax if symmetric else -qmax - 1), qmax


@functools.partial(jax.jit, static_argnames=('bits', 'axis', 'symmetric'))
def quantize(
    w: jax.Array, *, bits: int = 8, axis: int | None = -1, symmetric: bool = True
) -> QArray:
  """`bits`-bit codes of `w`, one scale per slice along `axis`; error <= scale / 2.

  Jitted: one program per shape and setting, not a dozen eager operations
  that XLA compiles one by one for every new shape.

  Args:
    w: the float array.
    bits: 8, 7 or 4.
    axis: the axis that keeps its own scale (-1: per output channel of a
      [in, out] kernel); None for one scale for the whole array.
    symmetric: scale by max|w| around zero; otherwise map [min, max] (widened
      to include 0, so 0.0 stays exact) onto the full code range.
  """
  qmin, qmax = code_range(bits, symmetric)
  w = jnp.asarray(w, jnp.float32)
  axis = _normalize_axis(axis, w.ndim)
  shared_axes = tuple(i for i in range(w.ndim) if i != axis)
  if symmetric:
    scale = float16_ceil(_step(jnp.max(jnp.abs(w), axis=shared_axes, keepdims=True), qmax))
    return QArray(_codes(w, scale, qmin, qmax), scale, bits=bits, axis=axis)
  low = jnp.minimum(jnp.min(w, axis=shared_axes, keepdims=True), 0.0)
  high = jnp.maximum(jnp.max(w, axis=shared_axes, keepdims=True), 0.0)
  scale = float16_ceil(_step(high - low, qmax - qmin))
  inverse_scale = 1 / scale
  # low maps to qmin; the clip only absorbs float rounding.
  zero_point = jnp.clip(qmin - jnp.round(low * inverse_scale), qmin, qmax)
  value = jnp.clip(jnp.round(w * inverse_scale) + zero_point, qmin, qmax)
  return QArray(value.astype(jnp.int8), scale, zero_point.astype(jnp.int8),
                bits=bits, axis=axis, symmetric=False)


def float16_ceil(x: jax.Array) -> jax.Array:
  """float32 `x` raised to the nearest float16 value, where float16 has one.

  Values outside float16's normal range (or not finite) are returned as
  they are. Rounding up, never down, keeps a scale at least as wide as the
  range it covers, so no code clips that did not before.
  """
  x = jnp.asarray(x, jnp.float32)
  half = x.astype(jnp.float16)
  up = jnp.where(half.astype(jnp.float32) < x,
                 jnp.nextafter(half, jnp.asarray(np.inf, jnp.float16)), half)
  return jnp.where(_float16_normal(x) & jnp.isfinite(up), up.astype(jnp.float32), x)


def float16_round(tree: Any) -> Any:
  """Every float32 array leaf of `tree` (QArrays left alone) rounded to the
  nearest float16 value, where |x| is below float16's largest value.

  The quantized jobs store biases this way: two bytes each on disk, exact.
  Tiny values round into float16's subnormal range (or to zero), an
  absolute change of at most 2**-25, nothing beside a bias's other terms;
  larger ones, NaN and infinities stay as they are.
  """
  limit = float(np.finfo(np.float16).max)

  def round_leaf(leaf):
    if is_qarray(leaf) or getattr(leaf, 'dtype', None) != np.float32:
      return leaf
    # numpy, not XLA: XLA's CPU conversion may flush subnormals to zero.
    leaf = np.asarray(leaf)
    with np.errstate(over='ignore'):
      half = leaf.astype(np.float16).astype(np.float32)
    return jnp.asarray(np.where(np.abs(leaf) < limit, half, leaf))

  return jax.tree.map(round_leaf, tree, is_leaf=is_qarray)


def _float16_normal(x: jax.Array) -> jax.Array:
  """Where |x| lies in float16's normal range, so float16 rounds it to nearby."""
  finfo = np.finfo(np.float16)
  return (jnp.abs(x) >= finfo.tiny) & (jnp.abs(x) < finfo.max)


def dequantize(q: QArray) -> jax.Array:
  """float32 `(value - zero_point) * scale`, the original shape."""
  codes = q.value.astype(jnp.float32)
  if q.zero_point is not None:
    codes = codes - q.zero_point.astype(jnp.float32)
  return codes * q.scale


def pack_int4(values: jax.Array) -> jax.Array:
  """uint8 [ceil(size / 2)]: codes in [-8, 7] (any shape, C order) two per byte.

  The first code of a pair is the low nibble; an odd size gets a zero nibble
  of padding; codes outside [-8, 7] wrap modulo 16. `unpack_int4` inverts it.
  """
  nibbles = jnp.bitwise_and(jnp.ravel(jnp.asarray(values)).astype(jnp.int32), 0x0F)
  nibbles = jnp.pad(nibbles, (0, nibbles.shape[0] % 2)).reshape(-1, 2)
  return (nibbles[:, 0] | (nibbles[:, 1] << 4)).astype(jnp.uint8)


def unpack_int4(packed: jax.Array, shape: Sequence[int]) -> jax.Array:
  """int8 codes of `shape` from the bytes `pack_int4` wrote."""
  shape, packed = tuple(int(size) for size in shape), jnp.asarray(packed, jnp.uint8)
  size = math.prod(shape)
  if packed.shape != ((size + 1) // 2,):
    raise DnnrError(f'unpack_int4 got packed bytes of shape {packed.shape} for shape {shape}; '
                    f'pass the 1-D array of {(size + 1) // 2} bytes pack_int4 returned for it.')
  nibbles = jnp.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1)[:size].astype(jnp.int8)
  return jnp.where(nibbles >= 8, nibbles - 16, nibbles).reshape(shape)


def quantize_params(params: Any, spec: QuantSpec = DEFAULT_SPEC) -> Any:
  """The params with the leaves `spec.patterns` select as QArrays, the others unchanged.

  Args:
    params: a params pytree, e.g. `{'trunk_0': {'kernel': ..., 'bias': ...}}`.
    spec: bits, per-channel or per-tensor scales, symmetry and patterns.
  """
  code_range(spec.bits, spec.symmetric)  # Bad bits fail here even if no pattern matches.
  return map_matching_leaves(
      lambda w: quantize(w, bits=spec.bits, axis=spec.axis, symmetric=spec.symmetric),
      params, spec.patterns)


def dequantize_params(params: Any) -> Any:
  """The params with every QArray leaf dequantized to float32."""
  return jax.tree.map(lambda leaf: dequantize(leaf) if is_qarray(leaf) else leaf,
                      params, is_leaf=is_qarray)


def map_matching_leaves(
    fn: Callable[[jax.Array], Any], params: Any, patterns: Sequence[str]) -> Any:
  """Applies `fn` to the leaves whose '/'-joined path fully matches a pattern.

  QArray leaves are left as they are. Raises DnnrError for a pattern that
  matches no leaf, since a typo would otherwise silently quantize nothing.
  """
  chosen = select(params, patterns, is_leaf=is_qarray)
  return jax.tree.map(lambda leaf, keep: fn(leaf) if keep and not is_qarray(leaf) else leaf,
                      params, chosen, is_leaf=is_qarray)


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Dynamic activation quantization: x [B, F] -> (int8 [B, F], row scales [B, 1]).

  One symmetric float32 scale per row; codes in [-127, 127].
  """
  x = jnp.asarray(x, jnp.float32)
  row_scale = _step(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 127)
  return _codes(x, row_scale, -127, 127), row_scale


def int8_matmul(x: jax.Array, q: QArray) -> jax.Array:
  """float32 [B, out]: x [B, F] quantized per row, times the [F, out] QArray in integers.

  The int32 accumulator is exact for F up to 133,000 (127 * 127 * F < 2**31).
  """
  x_int8, row_scale = quantize_rows(x)
  return _integer_matmul(x_int8, q).astype(jnp.float32) * row_scale * q.scale


def quantize_batch(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-batch activation quantization, ONNX's `DynamicQuantizeLinear` exactly.

  One asymmetric uint8 scale for the whole of `x` (every row of a batch), as
  `onnxruntime.quantization.quantize_dynamic` quantizes activations:
  scale = (max(0, max x) - min(0, min x)) / 255 (1 where that range is 0, as
  onnxruntime does), zero point = round(-min(0, min x) / scale) in [0, 255],
  codes = clip(round(x / scale) + zero point, 0, 255), rounding half to even.
  A prediction then depends on the rest of its batch.

  Returns:
    (uint8 codes, the float32 scale, the uint8 zero point), the scalars 0-D.
  """
  x = jnp.asarray(x, jnp.float32)
  low = jnp.minimum(jnp.min(x), 0.0)
  high = jnp.maximum(jnp.max(x), 0.0)
  # A true division, as onnxruntime's: XLA turns a division by a constant into
  # a product by its reciprocal, which rounds differently; the barrier hides it.
  steps = jax.lax.optimization_barrier(np.float32(255))
  scale = jnp.where(high > low, (high - low) / steps, np.float32(1))
  zero_point = jnp.clip(jnp.round(-low / scale), 0, 255)
  codes = jnp.clip(jnp.round(x / scale) + zero_point, 0, 255)
  return codes.astype(jnp.uint8), scale, zero_point.astype(jnp.uint8)


def batch_int8_matmul(x: jax.Array, q: QArray) -> jax.Array:
  """Like `int8_matmul`, with x [B, F] quantized per batch (`quantize_batch`).

  The product (codes - zero point) @ kernel is exact in int32 for F up to
  66,000 (255 * 127 * F < 2**31); then one float product by
  (scale * column scales), as `quantize_dynamic`'s graph computes it.
  """
  codes, scale, zero_point = quantize_batch(x)
  centred = codes.astype(jnp.int32) - zero_point.astype(jnp.int32)
  return _integer_matmul(centred, q).astype(jnp.float32) * (scale * q.scale)


def weight_only_matmul(x: jax.Array, q: QArray) -> jax.Array:
  """float32 x [B, F] times the dequantized [F, out] weights."""
  return jnp.asarray(x, jnp.float32) @ dequantize(q)


@flax.struct.dataclass
class ActivationRange:
  """The calibrated range [minimum, maximum] (float32 scalars) of one activation."""
  minimum: jax.Array
  maximum: jax.Array

  def scale(self) -> jax.Array:
    """The static symmetric int8 scale, max(|minimum|, |maximum|) / 127."""
    return _step(jnp.maximum(jnp.abs(self.minimum), jnp.abs(self.maximum)), 127)


def calibrate(
    apply_with_activations: Callable[[Any], dict[str, jax.Array]],
    batches: Iterable[Any], *, method: str = 'minmax', percentile: float = 99.99,
) -> dict[str, ActivationRange]:
  """{name: ActivationRange} of each named activation over calibration batches.

  Args:
    apply_with_activations: batch -> {name: activation}, e.g. the input to each
      Dense layer; traceable, since it is jitted.
    batches: the calibration batches (at least one).
    method: 'minmax': the running min and max over all batches. 'percentile':
      the `percentile` of |x| in each batch, averaged over batches (so one
      batch's outliers move it by 1/N), as the symmetric range [-p, p].
    percentile: in (0, 100], for 'percentile'.
  """
  if method not in CALIBRATION_METHODS:
    raise DnnrError(f'calibration method {method!r} is not one of: minmax, percentile.')
  if not 0 < percentile <= 100:
    raise DnnrError(f'percentile = {percentile} is not in (0, 100]; pass e.g. 99.99.')

  def batch_range(x):
    if method == 'minmax':
      return jnp.min(x), jnp.max(x)
    bound = jnp.percentile(jnp.abs(x), percentile)
    return -bound, bound

  batch_ranges = jax.jit(lambda batch: {
      name: batch_range(x) for name, x in apply_with_activations(batch).items()})
  per_batch = [batch_ranges(batch) for batch in batches]
  if not per_batch:
    raise DnnrError('calibrate got no batches; pass at least one calibration batch.')
  # {name: (lows [N], highs [N])} over the N batches.
  stacked = jax.tree.map(lambda *values: jnp.stack(values), *per_batch)
  reduce_low, reduce_high = (jnp.min, jnp.max) if method == 'minmax' else (jnp.mean, jnp.mean)
  return {name: ActivationRange(minimum=reduce_low(lows), maximum=reduce_high(highs))
          for name, (lows, highs) in stacked.items()}


def quantize_static(x: jax.Array, act_scale: jax.Array) -> jax.Array:
  """int8 codes in [-127, 127] of `x` at a fixed, calibrated scale; beyond it saturates."""
  return _codes(jnp.asarray(x, jnp.float32), act_scale, -127, 127)


def static_int8_matmul(x: jax.Array, act_scale: jax.Array, q: QArray) -> jax.Array:
  """Like `int8_matmul`, with one calibrated activation scale (a scalar)."""
  accumulator = _integer_matmul(quantize_static(x, act_scale), q)
  return accumulator.astype(jnp.float32) * act_scale * q.scale


def _integer_matmul(x_int8: jax.Array, q: QArray) -> jax.Array:
  if not q.symmetric or q.value.ndim != 2 or q.axis not in (None, 1):
    raise DnnrError(f'integer matmul needs a symmetric [in, out] QArray per output channel or '
                    f'per tensor, got symmetric={q.symmetric}, shape={q.shape}, axis={q.axis}; '
                    'quantize with symmetric=True and axis=-1 or None.')
  # Exactly this form: jax2onnx exports an integer matmul only as jnp.dot with
  # preferred_element_type (`@`, dot_general and einsum give invalid ONNX).
  return jnp.dot(x_int8, q.value, preferred_element_type=jnp.int32)


def _codes(x: jax.Array, scale: jax.Array, qmin: int, qmax: int) -> jax.Array:
  # Not x / scale: under jit XLA rewrites that into this product, so writing it
  # out keeps eager and jitted codes equal bit for bit (`qat.convert` needs it).
  return jnp.clip(jnp.round(x * (1 / scale)), qmin, qmax).astype(jnp.int8)


def _step(width: jax.Array, num_steps: int) -> jax.Array:
  """The scale that spreads `width` over `num_steps` codes; 1 where that is ~0."""
  scale = width * np.float32(1 / num_steps)  # A product for the reason in `_codes`.
  # A zero or subnormal (XLA flushes those) scale gives inf/NaN; such a channel is ~0 anyway.
  return jnp.where(scale >= np.finfo(np.float32).tiny, scale, 1.0).astype(jnp.float32)


def _normalize_axis(axis: int | None, ndim: int) -> int | None:
  if axis is not None and not -ndim <= axis < ndim:
    raise DnnrError(f'axis = {axis} is out of range for a {ndim}-D array; pass an axis '
                    f'in [{-ndim}, {ndim - 1}] or None for per-tensor.')
  return None if axis is None else axis % ndim


def is_qarray(leaf: Any) -> bool:
  """`is_leaf` that keeps a QArray whole in `jax.tree` functions."""
  return isinstance(leaf, QArray)
