"""Quantization: the round-trip law, int4 packing, params pytrees, integer matmuls."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnnr_jax.compress import quantize as q_lib
from dnnr_jax.errors import DnnrError
from dnnr_jax.model import DynamicMLP, init_variables
from tests.conftest import tree_allclose

FLOATS = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
# Zeros in the mix, so all-zero channels and exact-zero weights come up. Few
# shapes, since each one compiles.
WEIGHTS = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=1, max_dims=2, max_side=5),
    elements=st.one_of(st.just(0.0), FLOATS))
quantize_jit = jax.jit(q_lib.quantize, static_argnames=('bits', 'axis', 'symmetric'))


def _within_half_scale(w, q):
  """The law: |w - dequantize(q)| <= scale / 2, up to float32 rounding."""
  error = np.abs(w - np.asarray(q_lib.dequantize(q)))
  scale = np.broadcast_to(np.asarray(q.scale), w.shape)
  bound = scale / 2 + 1e-6 * np.abs(w)
  assert np.all(error <= bound), float(np.max(error - bound))


@settings(max_examples=30, deadline=None)
@given(w=WEIGHTS, bits=st.sampled_from([4, 7, 8]), per_channel=st.booleans(),
       symmetric=st.booleans())
def test_round_trip_error_is_at_most_half_a_step(w, bits, per_channel, symmetric):
  q = quantize_jit(w, bits=bits, axis=-1 if per_channel else None, symmetric=symmetric)
  _within_half_scale(w, q)
  qmin, qmax = q_lib.code_range(bits, symmetric)
  value = np.asarray(q.value)
  assert value.dtype == np.int8 and value.shape == w.shape
  assert value.min() >= qmin and value.max() <= qmax
  expected_scale_shape = [1] * w.ndim
  if per_channel:
    expected_scale_shape[-1] = w.shape[-1]
  assert q.scale.shape == tuple(expected_scale_shape)
  assert np.all(np.isfinite(np.asarray(q.scale)))


@pytest.mark.parametrize('bits', [4, 7, 8])
def test_symmetric_uses_the_whole_code_range(bits):
  w = np.array([[-2.0, 0.5], [1.0, -0.25]], np.float32)
  q = q_lib.quantize(w, bits=bits, axis=-1)
  qmax = 2 ** (bits - 1) - 1
  np.testing.assert_array_equal(np.asarray(q.value)[0], [-qmax, qmax])
  # max|w| / qmax, raised to the next float16 value.
  exact = np.array([[2.0 / qmax, 0.5 / qmax]], np.float32)
  scale = np.asarray(q.scale)
  assert np.all(scale >= exact) and np.all(scale <= exact * (1 + 2**-10))
  np.testing.assert_array_equal(scale.astype(np.float16).astype(np.float32), scale)
  assert q.axis == 1 and q.zero_point is None


@settings(deadline=None)
@given(x=hnp.arrays(np.float32, 64,
                    elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=False)))
def test_float16_ceil_is_the_least_float16_value_not_below(x):
  up = np.asarray(q_lib.float16_ceil(x))
  finfo = np.finfo(np.float16)
  in_range = (np.abs(x) >= finfo.tiny) & (np.abs(x) < finfo.max)
  np.testing.assert_array_equal(up[~in_range], x[~in_range])
  x, up = x[in_range], up[in_range]
  assert np.all(up >= x)
  np.testing.assert_array_equal(up.astype(np.float16).astype(np.float32), up)
  below = np.nextafter(up.astype(np.float16), np.float16(-np.inf)).astype(np.float32)
  assert np.all(below < x)


def test_float16_round_rounds_float_leaves_and_keeps_qarrays():
  w = np.array([[0.3, -1.7], [2.2, 0.05]], np.float32)
  tree = {'dense': {'kernel': q_lib.quantize(w, bits=4),
                    'bias': np.array([0.1, 1e-9, 3e-6, -7e-5, 7e5, 0.0, np.nan], np.float32)},
          'count': np.arange(3, dtype=np.int32)}
  rounded = q_lib.float16_round(tree)
  bias = np.asarray(rounded['dense']['bias'])
  # Each becomes its nearest float16 value, subnormals (3e-6) and zero (1e-9)
  # included; 7e5 (beyond float16) and NaN stay.
  np.testing.assert_array_equal(
      bias, np.array([np.float16(0.1), 0.0, np.float16(3e-6), np.float16(-7e-5), 7e5, 0.0,
                      np.nan], np.float32))
  assert np.float16(3e-6) != 0 and abs(np.float16(3e-6) - 3e-6) <= 2.0**-25
  assert rounded['dense']['kernel'] is tree['dense']['kernel']
  assert rounded['count'] is tree['count']


def test_asymmetric_keeps_zero_exact_and_spans_the_range():
  w = np.array([[0.1, 0.0], [0.7, -3.0], [0.3, 1.0]], np.float32)
  q = q_lib.quantize(w, bits=8, axis=-1, symmetric=False)
  value, zero_point = np.asarray(q.value), np.asarray(q.zero_point)
  assert zero_point.shape == (1, 2) and zero_point.dtype == np.int8
  # Column 0 is all positive: [0, 0.7] maps onto [-128, 127].
  assert zero_point[0, 0] == -128 and value[1, 0] == 127
  assert value[1, 1] == -128 and value[2, 1] == 127
  assert float(q_lib.dequantize(q)[0, 1]) == 0.0


@pytest.mark.parametrize('symmetric', [True, False])
def test_all_zero_channel_comes_back_as_zeros(symmetric):
  w = np.array([[0.0, 1.0], [0.0, -2.0]], np.float32)
  q = q_lib.quantize(w, bits=4, axis=-1, symmetric=symmetric)
  restored = np.asarray(q.dequantize())
  assert np.all(np.isfinite(restored))
  np.testing.assert_array_equal(restored[:, 0], [0.0, 0.0])
  assert float(q.scale[0, 0]) == 1.0
  whole = q_lib.quantize(np.zeros((3, 2), np.float32), bits=8, axis=None, symmetric=symmetric)
  np.testing.assert_array_equal(np.asarray(whole.dequantize()), np.zeros((3, 2)))


@settings(max_examples=40, deadline=None)
@given(values=hnp.arrays(np.int8, hnp.array_shapes(min_dims=1, max_dims=2, max_side=5),
                         elements=st.integers(-8, 7)))
def test_pack_int4_round_trips_exactly(values):
  packed = jax.jit(q_lib.pack_int4)(values)
  assert packed.dtype == jnp.uint8 and packed.shape == ((values.size + 1) // 2,)
  unpacked = np.asarray(jax.jit(q_lib.unpack_int4, static_argnums=1)(packed, values.shape))
  assert unpacked.dtype == np.int8
  np.testing.assert_array_equal(unpacked, values)


def test_pack_int4_puts_the_first_code_in_the_low_nibble():
  packed = np.asarray(q_lib.pack_int4(np.array([-1, 2, -8], np.int8)))
  np.testing.assert_array_equal(packed, [0x2F, 0x08])


def test_unpack_int4_rejects_the_wrong_byte_count():
  with pytest.raises(DnnrError, match='pack_int4'):
    q_lib.unpack_int4(np.zeros(3, np.uint8), (7,))


def _matmul_case(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((64, 256), np.float32)
  w = rng.standard_normal((256, 128), np.float32) / 16
  return jnp.asarray(x), jnp.asarray(w)


@pytest.mark.parametrize('axis', [-1, None])
def test_int8_matmul_is_close_to_float_and_exact_integer_arithmetic(axis):
  x, w = _matmul_case()
  q = q_lib.quantize(w, bits=8, axis=axis)
  actual = np.asarray(jax.jit(q_lib.int8_matmul)(x, q))
  expected = np.asarray(x @ w)
  assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 0.02

  x_int8, row_scale = (np.asarray(a) for a in q_lib.quantize_rows(x))
  np.testing.assert_array_equal(
      x_int8, np.clip(np.round(np.asarray(x) * (1 / row_scale)), -127, 127).astype(np.int8))
  accumulator = x_int8.astype(np.int32) @ np.asarray(q.value).astype(np.int32)
  reference = accumulator.astype(np.float32) * row_scale * np.asarray(q.scale)
  np.testing.assert_array_equal(actual, reference)


def test_int8_matmul_lowers_to_an_int8_dot_with_int32_accumulation():
  x, w = _matmul_case()
  jaxpr = jax.make_jaxpr(q_lib.int8_matmul)(x, q_lib.quantize(w))
  dots = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == 'dot_general']
  assert len(dots) == 1
  assert dots[0].params['preferred_element_type'] == jnp.int32
  assert [var.aval.dtype for var in dots[0].invars] == [jnp.int8, jnp.int8]


@pytest.mark.parametrize('kwargs', [{'symmetric': False}, {'axis': 0}])
def test_int8_matmul_rejects_weights_it_cannot_factor(kwargs):
  x, w = _matmul_case()
  with pytest.raises(DnnrError, match='symmetric'):
    q_lib.int8_matmul(x, q_lib.quantize(w, **kwargs))


def test_weight_only_matmul_uses_the_dequantized_weights():
  x, w = _matmul_case()
  q = q_lib.quantize(w, bits=4, symmetric=False)
  np.testing.assert_allclose(
      np.asarray(q_lib.weight_only_matmul(x, q)),
      np.asarray(x) @ np.asarray(q.dequantize()), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope='module')
def model_variables():
  model = DynamicMLP(hidden_sizes=(16, 16), deep_size=8, num_classes=4, routing='deep')
  # Jitted: one compile instead of one per primitive.
  return model, jax.jit(init_variables, static_argnums=(0, 2))(model, jax.random.PRNGKey(0), 12)


@pytest.mark.parametrize('per_channel', [True, False])
def test_quantize_params_selects_kernels_and_round_trips(model_variables, per_channel):
  model, variables = model_variables
  params = variables['params']
  spec = q_lib.QuantSpec(bits=8, per_channel=per_channel)
  quantized = jax.jit(lambda p: q_lib.quantize_params(p, spec))(params)
  assert set(quantized) == {'trunk_0', 'trunk_1', 'deep', 'shortcut', 'head'}
  for name, layer in quantized.items():
    kernel = layer['kernel']
    assert isinstance(kernel, q_lib.QArray) and kernel.value.dtype == jnp.int8
    assert kernel.scale.shape == ((1, kernel.shape[1]) if per_channel else (1, 1))
    assert not isinstance(layer['bias'], q_lib.QArray) and layer['bias'].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(layer['bias']), np.asarray(params[name]['bias']))
    _within_half_scale(np.asarray(params[name]['kernel']), kernel)
  restored = q_lib.dequantize_params(quantized)
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  x = np.random.default_rng(1).standard_normal((5, 12), np.float32)
  apply = jax.jit(model.apply)
  logits, _ = apply({**variables, 'params': restored}, x)
  tree_allclose(logits, apply(variables, x)[0], atol=0.05)


def test_a_quantized_pytree_maps_and_jits(model_variables):
  _, variables = model_variables
  quantized = jax.jit(lambda p: q_lib.quantize_params(p, q_lib.QuantSpec(bits=4, symmetric=False)))(
      variables['params'])
  # Kernels give value, scale and zero point; biases are one leaf each.
  assert len(jax.tree.leaves(quantized)) == 5 * 3 + 5
  doubled = jax.tree.map(lambda leaf: leaf * 2, quantized)
  kernel, doubled_kernel = quantized['head']['kernel'], doubled['head']['kernel']
  assert isinstance(doubled_kernel, q_lib.QArray) and doubled_kernel.bits == 4
  np.testing.assert_array_equal(np.asarray(doubled_kernel.scale), 2 * np.asarray(kernel.scale))
  jitted = jax.jit(q_lib.dequantize_params)(quantized)
  tree_allclose(jitted, q_lib.dequantize_params(quantized), rtol=0, atol=0)


@pytest.mark.parametrize('bits', [2, 3, 16])
def test_unsupported_bits_raise(model_variables, bits):
  with pytest.raises(DnnrError, match='pass 8, 7 or 4'):
    q_lib.quantize_params(model_variables[1]['params'], q_lib.QuantSpec(bits=bits))


def test_a_pattern_matching_nothing_raises(model_variables):
  params = model_variables[1]['params']
  with pytest.raises(DnnrError, match='kernal'):
    q_lib.quantize_params(params, q_lib.QuantSpec(patterns=(r'.*/kernel$', r'.*/kernal')))
  head_only = q_lib.QuantSpec(patterns=(r'head/.*',))
  only_head = jax.jit(lambda p: q_lib.quantize_params(p, head_only))(params)
  assert isinstance(only_head['head']['bias'], q_lib.QArray)
  assert not isinstance(only_head['deep']['kernel'], q_lib.QArray)


def _two_layer_mlp():
  rng = np.random.default_rng(2)
  params = {'dense_0': {'kernel': jnp.asarray(rng.standard_normal((10, 32), np.float32) / 3)},
            'dense_1': {'kernel': jnp.asarray(rng.standard_normal((32, 6), np.float32) / 6)}}
  batches = [jnp.asarray(rng.standard_normal((16, 10), np.float32)) for _ in range(4)]

  @jax.jit
  def activations(x):
    hidden = jax.nn.relu(x @ params['dense_0']['kernel'])
    return {'dense_0': x, 'dense_1': hidden}

  return params, batches, activations


def test_minmax_calibration_is_the_range_over_all_batches():
  _, batches, activations = _two_layer_mlp()
  ranges = q_lib.calibrate(activations, batches)
  for name in ('dense_0', 'dense_1'):
    seen = np.concatenate([np.asarray(activations(batch)[name]) for batch in batches])
    assert float(ranges[name].minimum) == seen.min()
    assert float(ranges[name].maximum) == seen.max()
  assert float(ranges['dense_1'].minimum) == 0.0  # After the ReLU.


def test_percentile_calibration_averages_batch_percentiles():
  _, batches, activations = _two_layer_mlp()
  minmax = q_lib.calibrate(activations, batches)
  ranges = q_lib.calibrate(activations, batches, method='percentile', percentile=90.0)
  for name in ('dense_0', 'dense_1'):
    expected = np.mean([np.percentile(np.abs(np.asarray(activations(batch)[name])), 90.0)
                        for batch in batches])
    np.testing.assert_allclose(float(ranges[name].maximum), expected, rtol=1e-5)
    assert float(ranges[name].minimum) == -float(ranges[name].maximum)
    absmax = max(-float(minmax[name].minimum), float(minmax[name].maximum))
    assert 0 < float(ranges[name].maximum) < absmax


@pytest.mark.parametrize('kwargs', [{'method': 'entropy'}, {'percentile': 0.0}])
def test_calibrate_rejects_bad_settings(kwargs):
  _, batches, activations = _two_layer_mlp()
  with pytest.raises(DnnrError, match=str(next(iter(kwargs.values())))):
    q_lib.calibrate(activations, batches, **kwargs)


def test_calibrate_needs_a_batch():
  _, _, activations = _two_layer_mlp()
  with pytest.raises(DnnrError, match='no batches'):
    q_lib.calibrate(activations, [])


def test_static_int8_matmul_is_close_to_float():
  params, batches, activations = _two_layer_mlp()
  ranges = q_lib.calibrate(activations, batches)
  q = q_lib.quantize(params['dense_0']['kernel'])
  x = batches[0]
  act_scale = ranges['dense_0'].scale()
  actual = np.asarray(jax.jit(q_lib.static_int8_matmul)(x, act_scale, q))
  expected = np.asarray(x @ params['dense_0']['kernel'])
  assert np.linalg.norm(actual - expected) / np.linalg.norm(expected) < 0.02
  codes = np.asarray(q_lib.quantize_static(x, act_scale))
  assert codes.dtype == np.int8
  # Beyond the calibrated range codes saturate instead of wrapping.
  saturated = np.asarray(q_lib.quantize_static(100 * x, act_scale))
  np.testing.assert_array_equal(np.abs(saturated[np.abs(codes) > 2]), 127)
  accumulator = codes.astype(np.int32) @ np.asarray(q.value).astype(np.int32)
  np.testing.assert_array_equal(
      actual, accumulator.astype(np.float32) * np.asarray(act_scale) * np.asarray(q.scale))
