"""Structured (output-channel) masks for any params tree, chosen by module-path rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dnnr_jax import compress
from dnnr_jax.errors import DnnrError


class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=2)(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope='module')
def cnn():
  model = TinyCNN()
  inputs = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
  params = model.init(jax.random.key(0), inputs)['params']
  # Nonzero biases, so that masked bias entries show up as zeros.
  params = jax.tree.map(lambda leaf: leaf + 0.1 if leaf.ndim == 1 else leaf, params)
  return model, params, inputs


def test_hand_computed_dense_columns():
  kernel = np.array([[3.0, 0.0, 1.0, 0.5], [4.0, 0.1, 0.0, -0.5]], np.float32)
  params = {'Dense_0': {'kernel': kernel, 'bias': np.array([1.0, 2.0, 3.0, 4.0], np.float32)},
            'Dense_1': {'kernel': np.ones((4, 2), np.float32), 'bias': np.ones(2, np.float32)}}
  # Column norms 5, 0.1, 1, 0.707: at 50 % columns 1 and 3 go.
  masks = compress.channel_masks(params, [compress.ChannelRule('Dense_0', 0.5)])
  np.testing.assert_array_equal(masks['Dense_0']['kernel'], [[1, 0, 1, 0]] * 2)
  np.testing.assert_array_equal(masks['Dense_0']['bias'], [1, 0, 1, 0])
  assert masks['Dense_1'] == {'kernel': None, 'bias': None}
  pruned = compress.apply_masks(params, masks)
  np.testing.assert_array_equal(pruned['Dense_0']['kernel'], [[3, 0, 1, 0], [4, 0, 0, 0]])
  np.testing.assert_array_equal(pruned['Dense_0']['bias'], [1, 0, 3, 0])
  assert compress.pruned_channels(masks) == {'Dense_0': (1, 3)}
  # Ties keep the lower index; the first matching rule decides.
  tie = {'kernel': np.array([[1.0, -1.0, 1.0]], np.float32)}
  rules = [compress.ChannelRule('', 1 / 3), compress.ChannelRule('.*', 0.9)]
  np.testing.assert_array_equal(compress.channel_masks(tie, rules)['kernel'], [[1, 1, 0]])


def test_linen_cnn_channels_by_norm(cnn):
  model, params, inputs = cnn
  masks = compress.channel_masks(params, [compress.ChannelRule('Conv_.*', 0.5)])
  kernel = np.asarray(params['Conv_1']['kernel'])
  norms = np.sqrt(np.sum(kernel ** 2, axis=(0, 1, 2)))
  assert compress.pruned_channels(masks) == {
      'Conv_0': tuple(sorted(np.argsort(np.sqrt(np.sum(
          np.asarray(params['Conv_0']['kernel']) ** 2, axis=(0, 1, 2))))[:2])),
      'Conv_1': tuple(sorted(np.argsort(norms)[:3]))}
  assert masks['Dense_0'] == {'kernel': None, 'bias': None}
  report = compress.sparsity_report(params, masks)
  for path in ('Conv_0/kernel', 'Conv_0/bias', 'Conv_1/kernel', 'Conv_1/bias'):
    assert report[path]['sparsity'] == 0.5
  assert 'Dense_0/kernel' not in report
  pruned = compress.apply_masks(params, masks)

  def conv_0(p):  # A pruned channel's output is exactly zero after relu(0 + 0).
    _, state = model.apply({'params': p}, inputs, capture_intermediates=True,
                           mutable=['intermediates'])
    return state['intermediates']['Conv_0']['__call__'][0]

  out = conv_0(pruned)
  for channel in range(4):
    assert bool(jnp.all(out[..., channel] == 0)) == (channel in compress.pruned_channels(
        masks)['Conv_0'])


def test_masks_stay_through_keep_masked(cnn):
  model, params, inputs = cnn
  masks = compress.channel_masks(params, [compress.ChannelRule('.*', 0.25)])
  tx = compress.keep_masked(optax.adam(1e-2), masks)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    grads = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, inputs) ** 2))(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  trained, state = step(*step(params, state))
  report = compress.sparsity_report(trained, masks)
  # round(0.25 * 6) = 2 of 6 channels, 3x3x4 weights each, and nothing else is zero.
  assert report['Conv_1/kernel']['zeros'] == 3 * 3 * 4 * 2
  assert report['Conv_1/bias']['zeros'] == 2
  assert report['Dense_0/bias']['zeros'] == 2  # 2 of 10 (round(2.5) = 2)
  assert not np.array_equal(trained['Dense_0']['kernel'], params['Dense_0']['kernel'])


def test_bad_rules_name_the_fix(cnn):
  _, params, _ = cnn
  with pytest.raises(DnnrError, match=r"'Dense_9' matches no module.*Conv_0"):
    compress.channel_masks(params, [compress.ChannelRule('Dense_9', 0.5)])
  with pytest.raises(DnnrError, match=r'sparsity 1.0, not in \[0, 1\)'):
    compress.channel_masks(params, [compress.ChannelRule('.*', 1.0)])
