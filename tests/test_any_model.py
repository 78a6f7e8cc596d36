"""Quantized execution of user models: a hand-written Linen CNN and an NNX MLP."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dnnr_jax import compress
from dnnr_jax.compress import layers
from dnnr_jax.errors import DnnrError, QuantizationError


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding='SAME')(x))
    x = nn.relu(nn.Conv(8, (3, 3), padding=1, kernel_dilation=2)(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16)(x))
    return nn.DenseGeneral((2, 5))(x)


class WithTranspose(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.ConvTranspose(2, (3, 3))(x).reshape(x.shape[0], -1))


class SmallMLP(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(12, 16, rngs=rngs), nnx.Linear(16, 5, rngs=rngs)])

  def __call__(self, x):
    return self.layers[1](nnx.relu(self.layers[0](x)))


@pytest.fixture(scope='module')
def cnn():
  model = SmallCNN()
  inputs = jax.random.normal(jax.random.key(1), (3, 10, 10, 2))
  return model, model.init(jax.random.key(0), inputs)['params'], inputs


def test_conv_patches_equal_flax_conv(cnn):
  """The patch-matmul path with a float kernel computes Flax's convolution."""
  model, params, inputs = cnn
  rules = [compress.Rule('Conv_.*', mode='qat', bits=8)]
  # Float kernels exactly on the 8-bit grid: fake quantization leaves them as they are.
  on_grid = compress.dequantize_params(compress.quantize_linen(
      model, params, [compress.Rule('Conv_.*', mode='weight_only')], inputs))
  ours = jax.jit(compress.quantized_apply(model, rules))({'params': on_grid}, inputs)
  np.testing.assert_allclose(ours, model.apply({'params': on_grid}, inputs), atol=2e-5)


def test_unmatched_layers_are_bit_identical(cnn):
  model, params, inputs = cnn
  rules = [compress.Rule('Dense_0', mode='dynamic')]
  quantized = compress.quantize_linen(model, params, rules, inputs)
  assert isinstance(quantized['Dense_0']['kernel'], compress.QArray)
  assert not isinstance(quantized['Conv_0']['kernel'], compress.QArray)

  def features(apply, variables):  # The Conv_1 output, which no rule touches.
    return jax.jit(lambda v: apply(v, inputs, capture_intermediates=True, mutable=[
        'intermediates'])[1]['intermediates']['Conv_1']['__call__'][0])(variables)

  ours = features(compress.quantized_apply(model, rules), {'params': quantized})
  np.testing.assert_array_equal(ours, features(model.apply, {'params': params}))


@pytest.mark.parametrize('mode', ['weight_only', 'dynamic', 'static'])
def test_linen_modes_close_to_float(cnn, mode):
  model, params, inputs = cnn
  rules = [compress.Rule('.*', mode=mode)]
  quantized = compress.quantize_linen(model, params, rules, inputs)
  scales = compress.calibrate_linen(model, quantized, rules, [inputs]) if mode == 'static' else None
  assert scales is None or set(scales) == {'Conv_0', 'Conv_1', 'Dense_0', 'DenseGeneral_0'}
  ours = jax.jit(compress.quantized_apply(model, rules, scales))({'params': quantized}, inputs)
  reference = model.apply({'params': params}, inputs)
  assert ours.shape == reference.shape == (3, 2, 5)
  error = float(jnp.max(jnp.abs(ours - reference)))
  assert 0 < error < 0.05 * float(jnp.max(jnp.abs(reference)))


def test_int8_dense_equals_numpy_integers():
  """Dynamic int8: codes and int32 accumulation as a NumPy reference computes them."""
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(5, 7)).astype(np.float32)
  kernel = rng.normal(size=(7, 3)).astype(np.float32)
  model = nn.Dense(3, use_bias=False)
  rules = [compress.Rule('.*', mode='dynamic')]
  quantized = compress.quantize_linen(model, {'kernel': kernel}, rules, inputs)
  ours = jax.jit(compress.quantized_apply(model, rules))({'params': quantized}, inputs)
  q = quantized['kernel']
  weight_codes, weight_scale = np.asarray(q.value, np.int64), np.asarray(q.scale)
  assert np.all(np.abs(weight_codes) <= 127)
  row_scale = np.float32(np.abs(inputs).max(-1, keepdims=True) * np.float32(1 / 127))
  input_codes = np.clip(np.round(inputs * (1 / row_scale)), -127, 127).astype(np.int64)
  accumulator = input_codes @ weight_codes  # exact integers
  np.testing.assert_allclose(ours, accumulator.astype(np.float32) * row_scale * weight_scale,
                             rtol=1e-6, atol=1e-6)


def test_int8_conv_equals_numpy_integers():
  """Dynamic int8 Conv: one activation scale per example, int32 sums over each window."""
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(3, 6, 5, 2)).astype(np.float32)
  inputs[1] *= 10  # another example's range must not change this one's codes
  model = nn.Conv(4, (3, 2), strides=(2, 1), padding='SAME', use_bias=False)
  kernel = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
  rules = [compress.Rule('.*', mode='dynamic')]
  quantized = compress.quantize_linen(model, {'kernel': kernel}, rules, inputs)
  ours = jax.jit(compress.quantized_apply(model, rules))({'params': quantized}, inputs)
  q = quantized['kernel']
  weight_codes, weight_scale = np.asarray(q.value, np.int64), np.asarray(q.scale).reshape(-1)
  example_scale = np.float32(np.abs(inputs).reshape(3, -1).max(-1) * np.float32(1 / 127))
  codes = np.clip(np.round(inputs * (1 / example_scale)[:, None, None, None]), -127, 127)
  padded = np.pad(codes.astype(np.int64), ((0, 0), (0, 1), (0, 1), (0, 0)))  # SAME: 3x5 out
  accumulator = np.zeros((3, 3, 5, 4), np.int64)
  for row, column in np.ndindex(3, 5):
    window = padded[:, 2 * row:2 * row + 3, column:column + 2, :]
    accumulator[:, row, column] = np.einsum('bhwi,hwio->bo', window, weight_codes)
  expected = (accumulator.astype(np.float32) * example_scale[:, None, None, None]) * weight_scale
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


def test_qat_gradients_flow_straight_through(cnn):
  model, params, inputs = cnn
  apply = compress.quantized_apply(model, [compress.Rule('.*', mode='qat', bits=4)])

  @jax.jit
  def grads(p):
    return jax.grad(lambda p: jnp.sum(apply({'params': p}, inputs)))(p)

  ours = grads(params)
  # STE: the gradient is that of the float model evaluated at the fake-quantized kernels.
  fake = compress.dequantize_params(compress.quantize_linen(
      model, params, [compress.Rule('.*', mode='weight_only', bits=4)], inputs))
  expected = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, inputs)))(fake)
  for path in ('Dense_0', 'Conv_0'):
    assert float(jnp.sum(jnp.abs(ours[path]['kernel']))) > 0
    np.testing.assert_allclose(ours[path]['kernel'], expected[path]['kernel'], atol=1e-4)


def test_bad_input_names_module_and_fix(cnn):
  model, params, inputs = cnn
  with pytest.raises(QuantizationError, match=r"'Dense_9' matches no layer.*Conv_0"):
    compress.quantize_linen(model, params, [compress.Rule('Dense_9')], inputs)
  with pytest.raises(QuantizationError, match=r'Dense_0.*\(16, 16\).*\(72, 16\)'):
    bad = {**params, 'Dense_0': {**params['Dense_0'], 'kernel': jnp.zeros((16, 16))}}
    compress.quantize_linen(model, bad, [compress.Rule('.*')], inputs)
  quantized = compress.quantize_linen(model, params, [compress.Rule('.*')], inputs)
  with pytest.raises(DnnrError, match='quantized_apply'):
    model.apply({'params': quantized}, inputs)
  transpose = WithTranspose()
  x = jnp.ones((1, 4, 4, 1))
  variables = transpose.init(jax.random.key(0), x)
  with pytest.raises(QuantizationError, match=r"'ConvTranspose_0' is a nn.ConvTranspose.*narrow"):
    compress.quantize_linen(transpose, variables['params'], [compress.Rule('.*')], x)


def test_nnx_mlp_quantized_and_qat():
  model = SmallMLP(nnx.Rngs(0))
  inputs = jax.random.normal(jax.random.key(1), (4, 12))
  reference = model(inputs)
  quantized = compress.quantize_nnx(model, [compress.Rule('layers/1', mode='dynamic')])
  assert isinstance(quantized.layers[1], compress.QuantizedLayer)
  assert isinstance(model.layers[1], nnx.Linear)  # the user's model is left alone
  hidden = nnx.relu(model.layers[0](inputs))
  np.testing.assert_array_equal(nnx.relu(quantized.layers[0](inputs)), hidden)
  kernel = quantized.layers[1].kernel.get_value()
  expected = layers.forward(layers.LayerSpec('dense'), 'dynamic', kernel,
                            model.layers[1].bias[...], hidden)
  np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(quantized, inputs), expected)
  assert float(jnp.max(jnp.abs(expected - reference))) < 0.05
  with pytest.raises(QuantizationError, match='matches no layer'):
    compress.quantize_nnx(model, [compress.Rule('layers/7')])

  trained = compress.quantize_nnx(model, [compress.Rule('.*', mode='qat')])
  optimizer = nnx.Optimizer(trained, optax.sgd(0.1), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(inputs) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  before = np.asarray(trained.layers[0].kernel[...])
  first, second = step(trained, optimizer), step(trained, optimizer)
  assert float(second) < float(first)
  assert not np.array_equal(before, trained.layers[0].kernel[...])


def test_nnx_static_uses_calibrated_scales():
  model = SmallMLP(nnx.Rngs(0))
  inputs = jax.random.normal(jax.random.key(2), (6, 12))
  rules = [compress.Rule('.*', mode='static')]
  scales = compress.calibrate_nnx(model, rules, [inputs])
  np.testing.assert_allclose(scales['layers/0'], np.abs(np.asarray(inputs)).max() / 127, rtol=1e-6)
  with pytest.raises(QuantizationError, match="'layers/0' has a static rule but no activation"):
    compress.quantize_nnx(model, rules)
  quantized = compress.quantize_nnx(model, rules, scales)
  error = float(jnp.max(jnp.abs(quantized(inputs) - model(inputs))))
  assert 0 < error < 0.05
