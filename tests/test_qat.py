"""Quantization-aware training: the STE gradient, exact conversion, a short fine-tune."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dnnr_jax import config as config_lib
from dnnr_jax.compress import qat
from dnnr_jax.compress import quantize as q_lib
from dnnr_jax.errors import DnnrError
from dnnr_jax.io import data as data_lib
from tests.conftest import tree_allclose

CONFIGS = [(4, -1, True), (8, None, True), (4, None, False), (8, -1, False), (7, -1, True)]


def _weights(seed=0, shape=(12, 7)):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


@pytest.mark.parametrize('bits,axis,symmetric', CONFIGS)
def test_forward_is_the_round_trip_and_the_gradient_is_identity(bits, axis, symmetric):
  w = _weights()
  fake = jax.jit(lambda w: qat.fake_quantize(w, bits=bits, axis=axis, symmetric=symmetric))
  q = q_lib.quantize(w, bits=bits, axis=axis, symmetric=symmetric)
  np.testing.assert_array_equal(np.asarray(fake(w)), np.asarray(q.dequantize()))
  assert not np.array_equal(np.asarray(fake(w)), np.asarray(w))
  gradient = jax.jit(jax.grad(lambda w: jnp.sum(fake(w))))(w)
  np.testing.assert_array_equal(np.asarray(gradient), np.ones(w.shape))


def test_the_gradient_passes_the_cotangent_through():
  w = _weights()
  weights = _weights(seed=1)
  gradient = jax.grad(lambda w: jnp.sum(weights * qat.fake_quantize(w, bits=4)))(w)
  np.testing.assert_array_equal(np.asarray(gradient), np.asarray(weights))


def _mlp_params(num_features, num_classes, seed=0):
  rng = np.random.default_rng(seed)

  def dense(fan_in, fan_out):
    kernel = rng.standard_normal((fan_in, fan_out), np.float32) / np.sqrt(fan_in)
    return {'kernel': jnp.asarray(kernel), 'bias': jnp.zeros(fan_out)}

  return {'dense_0': dense(num_features, 32), 'head': dense(32, num_classes)}


def _logits(params, images):
  hidden = jax.nn.relu(images @ params['dense_0']['kernel'] + params['dense_0']['bias'][None, :])
  return hidden @ params['head']['kernel'] + params['head']['bias'][None, :]


def _loss(params, images, labels):
  return optax.softmax_cross_entropy_with_integer_labels(_logits(params, images), labels).mean()


def test_params_gradient_is_the_float_gradient_at_the_fake_weights():
  params = _mlp_params(6, 3)
  images = np.random.default_rng(3).standard_normal((8, 6), np.float32)
  labels = jnp.arange(8) % 3
  fake = qat.fake_quantize_params(params, q_lib.QuantSpec(bits=4))
  assert fake['head']['bias'] is params['head']['bias']

  def qat_loss(params):
    return _loss(qat.fake_quantize_params(params, q_lib.QuantSpec(bits=4)), images, labels)

  actual = jax.jit(jax.grad(qat_loss))(params)
  tree_allclose(actual, jax.jit(jax.grad(_loss))(fake, images, labels), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('bits,axis,symmetric', CONFIGS)
def test_convert_equals_fake_quantization_exactly(bits, axis, symmetric):
  params = _mlp_params(10, 4, seed=bits)
  spec = q_lib.QuantSpec(bits=bits, per_channel=axis is not None, symmetric=symmetric)
  converted = qat.convert(params, spec)
  assert isinstance(converted['dense_0']['kernel'], q_lib.QArray)
  fake = jax.jit(lambda p: qat.fake_quantize_params(p, spec))(params)
  tree_allclose(q_lib.dequantize_params(converted), fake, rtol=0, atol=0)


def test_bad_bits_and_patterns_raise():
  with pytest.raises(DnnrError, match='pass 8, 7 or 4'):
    qat.fake_quantize(_weights(), bits=2)
  with pytest.raises(DnnrError, match='dense_9'):
    qat.fake_quantize_params(_mlp_params(4, 2), q_lib.QuantSpec(patterns=(r'dense_9/kernel',)))


def _train(params, split, steps, transform):
  optimizer = optax.adam(1e-2)

  @jax.jit
  def run(params):
    def step(carry, _):
      params, opt_state = carry
      gradient = jax.grad(lambda p: _loss(transform(p), split.images, split.labels))(params)
      updates, opt_state = optimizer.update(gradient, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), length=steps)
    return params

  return run(params)


def _accuracy(params, split):
  return float(jnp.mean(jnp.argmax(_logits(params, split.images), -1) == split.labels))


def test_a_short_qat_fine_tune_keeps_digits_accuracy():
  dataset = data_lib.load_dataset(
      config_lib.DataConfig(dataset='digits', mean=0.3053, std=0.3760))
  spec = q_lib.QuantSpec(bits=4, per_channel=False)
  trained = _train(_mlp_params(dataset.num_features, dataset.num_classes), dataset.train,
                   150, lambda p: p)
  float_accuracy = _accuracy(trained, dataset.test)
  assert float_accuracy > 0.9
  fake = jax.jit(lambda p: qat.fake_quantize_params(p, spec))
  tuned = _train(trained, dataset.train, 60, fake)
  # The fine-tune at least halves the loss of the quantized model (0.025 to
  # 0.008), which only a working straight-through gradient can do.
  train = dataset.train
  assert _loss(fake(tuned), train.images, train.labels) < 0.5 * _loss(
      fake(trained), train.images, train.labels)
  int4 = q_lib.dequantize_params(qat.convert(tuned, spec))
  assert _accuracy(int4, dataset.test) >= float_accuracy - 0.02
