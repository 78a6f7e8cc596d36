"""Gradual pruning: the cubic schedule, the optax wrappers, and real training under masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from dnnr_jax.compress import gradual, prune
from dnnr_jax.config import DataConfig
from dnnr_jax.errors import DnnrError
from dnnr_jax.io.data import load_dataset
from dnnr_jax.model import DynamicMLP, init_variables

FINAL_SPARSITY = 0.8
# With zero thresholds every example takes one route, so the other path's
# parameters never get a gradient; these layers always do.
TRAINED_LAYERS = ('trunk_0', 'trunk_1', 'head')


@pytest.mark.parametrize('count, expected', [
    (0, 0.1), (10, 0.1), (15, 0.9 - 0.8 * 0.75**3), (20, 0.8), (25, 0.9 - 0.8 * 0.25**3),
    (30, 0.9), (1000, 0.9)])
def test_cubic_schedule_matches_hand_computed_values(count, expected):
  schedule = gradual.cubic_sparsity_schedule(0.1, 0.9, begin_step=10, end_step=30)
  np.testing.assert_allclose(float(schedule(count)), expected, rtol=1e-6)


def test_cubic_schedule_is_monotone_clamped_and_compiled_once():
  traces = []

  @jax.jit
  def schedule(count):
    traces.append(None)
    return gradual.cubic_sparsity_schedule(0.0, 0.75, begin_step=5, end_step=45)(count)

  values = np.array([float(schedule(jnp.int32(count))) for count in range(60)])
  assert len(traces) == 1
  assert np.all(np.diff(values) >= 0)
  assert np.all(values[:6] == 0.0) and np.all(values[45:] == np.float32(0.75))
  assert np.all(np.diff(values[5:46]) > 0)


@pytest.mark.parametrize('args, match', [
    ((0.0, 1.0, 0, 10), 'final_sparsity 1.0'),
    ((0.5, 0.2, 0, 10), 'initial_sparsity 0.5 exceeds'),
    ((0.0, 0.5, 10, 10), 'begin_step=10, end_step=10'),
])
def test_cubic_schedule_rejects_bad_arguments(args, match):
  with pytest.raises(DnnrError, match=match):
    gradual.cubic_sparsity_schedule(*args)


def _toy_params():
  rng = np.random.default_rng(0)
  return {'a': {'kernel': jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
                'bias': jnp.zeros(4)},
          'b': {'kernel': jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)}}


def _toy_loss(params, target):
  return sum(jnp.sum((leaf - goal) ** 2)
             for leaf, goal in zip(jax.tree.leaves(params), jax.tree.leaves(target), strict=True))


def _toy_target():
  return jax.tree.map(lambda leaf: leaf + 1.0, _toy_params())


def test_update_compiles_once_and_follows_the_schedule():
  schedule = gradual.cubic_sparsity_schedule(0.0, 0.5, begin_step=0, end_step=9)
  tx = gradual.pruning(optax.adam(0.05), prune.magnitude_pruner(schedule), update_every=3)
  params, target = _toy_params(), _toy_target()
  traces = []

  @jax.jit
  def step(params, opt_state):
    traces.append(None)
    updates, opt_state = tx.update(jax.grad(_toy_loss)(params, target), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  total = 8 * 4 + 4 * 6
  pruned_counts = []
  for _ in range(12):
    params, opt_state = step(params, opt_state)
    masks = gradual.final_masks(opt_state)
    pruned_counts.append(sum(int((~np.asarray(mask)).sum()) for mask in jax.tree.leaves(masks)))
    for name in params:
      kernel = np.asarray(params[name]['kernel'])
      assert np.all(kernel[~np.asarray(masks[name]['kernel'])] == 0.0)
  assert len(traces) == 1
  assert masks['a']['bias'] is None
  # Masks change only at counts 0, 3, 6, 9, to round(schedule(count) * total).
  expected = [round(float(schedule(count - count % 3)) * total) for count in range(12)]
  assert pruned_counts == expected
  assert pruned_counts[-1] == round(0.5 * total)


def test_nm_method_waits_for_the_schedule_then_holds_the_pattern():
  schedule = gradual.cubic_sparsity_schedule(0.0, 0.5, begin_step=4, end_step=5)
  tx = gradual.pruning(optax.adam(0.05), prune.nm_pruner(1, 4, sparsity_schedule=schedule),
                       update_every=2)
  params, target = _toy_params(), _toy_target()
  step = jax.jit(lambda params, state: tx.update(
      jax.grad(_toy_loss)(params, target), state, params))
  opt_state = tx.init(params)
  history = []
  for _ in range(20):
    updates, opt_state = step(params, opt_state)
    params = optax.apply_updates(params, updates)
    history.append(jax.tree.map(np.asarray, gradual.final_masks(opt_state)))
  assert all(mask.all() for mask in jax.tree.leaves(history[4]))  # schedule still 0
  for masks in history[6:]:
    for name in params:
      keep = masks[name]['kernel']
      np.testing.assert_array_equal(keep, history[-1][name]['kernel'])
      assert np.all(keep.reshape(-1, 4, keep.shape[1]).sum(axis=1) == 1)
  for name in params:
    assert np.all(np.asarray(params[name]['kernel'])[~history[-1][name]['kernel']] == 0.0)


def test_wrapper_arguments_are_checked():
  adam = optax.adam(1e-3)
  with pytest.raises(DnnrError, match='sparsity_schedule'):
    prune.magnitude_pruner(None)
  with pytest.raises(DnnrError, match="'row'"):
    prune.magnitude_pruner(lambda count: 0.5, scope='row')
  with pytest.raises(DnnrError, match="'taylor'"):
    prune.nm_pruner(2, 4, score='taylor')
  with pytest.raises(DnnrError, match='4:4'):
    prune.nm_pruner(4, 4)
  with pytest.raises(DnnrError, match='update_every 0'):
    gradual.pruning(adam, prune.magnitude_pruner(lambda count: 0.5), update_every=0)
  nm = gradual.pruning(adam, prune.nm_pruner(2, 8), update_every=1)
  with pytest.raises(DnnrError, match=r'b/kernel has shape \(4, 6\)'):
    nm.init(_toy_params())
  with pytest.raises(DnnrError, match='no PruningState'):
    gradual.final_masks(adam.init(_toy_params()))


@pytest.fixture(scope='module')
def digits():
  dataset = load_dataset(DataConfig(dataset='digits', mean=0.3053, std=0.3760))
  images = dataset.train.images[:1280].reshape(10, 128, -1)
  labels = dataset.train.labels[:1280].reshape(10, 128)
  return images, labels


@pytest.fixture(scope='module')
def model_and_variables():
  model = DynamicMLP(hidden_sizes=(32, 32), deep_size=16)
  init = jax.jit(functools.partial(init_variables, model, num_features=64))
  return model, init(jax.random.PRNGKey(0))


def _trainer(model, thresholds, images, labels):
  def loss_fn(params, batch):
    logits, _ = model.apply({'params': params, 'thresholds': thresholds}, images[batch])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels[batch]).mean()

  @jax.jit
  def train(state, batches):
    def body(state, batch):
      return state.apply_gradients(grads=jax.grad(loss_fn)(state.params, batch)), None
    return jax.lax.scan(body, state, batches)[0]

  return train, jax.jit(lambda params: jnp.mean(jax.vmap(loss_fn, (None, 0))(
      params, jnp.arange(images.shape[0]))))


def _kernel_stats(params, masks):
  zeros = sum(int(np.sum(np.asarray(layer['kernel']) == 0.0)) for layer in params.values())
  pruned = sum(int(np.sum(~np.asarray(layer['kernel']))) for layer in masks.values())
  size = sum(layer['kernel'].size for layer in params.values())
  return zeros, pruned, size


def test_gradual_pruning_trains_the_model_to_exact_sparsity(digits, model_and_variables):
  model, variables = model_and_variables
  schedule = gradual.cubic_sparsity_schedule(0.0, FINAL_SPARSITY, begin_step=20, end_step=200)
  tx = gradual.pruning(optax.adam(3e-3), prune.magnitude_pruner(schedule), update_every=10)
  state = train_state.TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx)
  train, mean_loss = _trainer(model, variables['thresholds'], *digits)
  initial_loss = float(mean_loss(state.params))

  batches = jnp.arange(100) % 10  # One scan length: `train` compiles once.
  for _ in range(3):
    state = train(state, batches)
  masks = gradual.final_masks(state.opt_state)
  zeros, pruned, size = _kernel_stats(state.params, masks)
  assert zeros == pruned == round(FINAL_SPARSITY * size)
  assert float(mean_loss(state.params)) < 0.5 * initial_loss
  for name in TRAINED_LAYERS:
    assert np.all(np.asarray(state.params[name]['bias']) != 0.0)  # trained, never pruned

  # Ten more mask updates at the final sparsity and 100 Adam steps: same masks, same zeros.
  state = train(state, batches)
  later_masks = gradual.final_masks(state.opt_state)
  for name, layer in state.params.items():
    keep = np.asarray(later_masks[name]['kernel'])
    np.testing.assert_array_equal(keep, np.asarray(masks[name]['kernel']))
    assert np.all(np.asarray(layer['kernel'])[~keep] == 0.0)
  assert _kernel_stats(state.params, later_masks)[0] == round(FINAL_SPARSITY * size)


def test_oneshot_then_keep_masked_finetunes_without_resurrection(digits, model_and_variables):
  model, variables = model_and_variables
  params = variables['params']
  masks = prune.magnitude_masks(params, 0.7, scope='layer')
  train, mean_loss = _trainer(model, variables['thresholds'], *digits)
  batches = jnp.arange(60) % 10

  # Unmasked params on purpose: the first update already lands pruned weights on 0.0,
  # and Adam, which sees dense gradients, never moves them off it.
  tx = optax.chain(optax.clip_by_global_norm(10.0), gradual.keep_masked(optax.adam(3e-3), masks))
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  state = train(state, batches)
  zeros, pruned, size = _kernel_stats(state.params, masks)
  assert zeros == pruned == sum(round(0.7 * layer['kernel'].size) for layer in params.values())
  assert float(mean_loss(state.params)) < 0.7 * float(mean_loss(prune.apply_masks(params, masks)))
  for name in TRAINED_LAYERS:
    keep = np.asarray(masks[name]['kernel'])
    before, after = np.asarray(params[name]['kernel']), np.asarray(state.params[name]['kernel'])
    assert np.mean(after[keep] != before[keep]) > 0.5
  for name, keep in gradual.final_masks(state.opt_state).items():
    assert keep['bias'] is None
    np.testing.assert_array_equal(np.asarray(keep['kernel']), np.asarray(masks[name]['kernel']))
