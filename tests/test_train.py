"""The jitted step and epoch, evaluation, and a short real-MNIST run."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnnr_jax.config import Config, ModelConfig, RoutingConfig, TrainingConfig, load_config
from dnnr_jax.errors import DnnrError
from dnnr_jax.io.data import Dataset, Split, load_dataset
from dnnr_jax.jobs.fit import fit
from dnnr_jax.model import model_from_config
from dnnr_jax.thresholds import schedule_from_config
from dnnr_jax.train import (
  Teacher,
  batch_sums,
  create_train_state,
  evaluate,
  jit_train_epoch,
  train_step,
)
from tests.conftest import SMOKE_CONFIG, tree_allclose

# jax.monitoring's event for each function traced for jit (a cache miss, then a compile).
TRACE_EVENT = '/jax/core/compile/jaxpr_trace_duration'


@pytest.fixture(scope='module')
def config():
  return load_config(SMOKE_CONFIG)


@pytest.fixture(scope='module')
def digits(config):
  return load_dataset(config.data)


def test_loss_falls_in_a_few_steps(config, digits):
  state = create_train_state(config, digits.num_features, steps_per_epoch=10)
  batch = (digits.train.images[:64], digits.train.labels[:64])
  step = jax.jit(train_step)
  losses = []
  for _ in range(25):
    state, sums = step(state, batch)
    losses.append(float(sums['loss']) / 64)
  assert losses[-1] < 0.5 * losses[0]
  assert int(state.step) == 25


@contextlib.contextmanager
def _counting_traces():
  """Counts the functions JAX traces for jit inside the block (each then compiles)."""
  events = []

  def listener(event, duration, **kwargs):
    if event == TRACE_EVENT:
      events.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield lambda: len(events)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_epoch_compiles_once_and_follows_the_schedule(config, digits):
  steps = digits.train.labels.shape[0] // config.training.batch_size
  state = create_train_state(config, digits.num_features, steps)
  run_epoch = jit_train_epoch(config)
  schedule = schedule_from_config(config)
  traces = []
  for epoch in range(3):
    with _counting_traces() as count:
      state, metrics = run_epoch(state, digits.train)
    traces.append(count())
    tree_allclose(state.thresholds, schedule(epoch), rtol=0, atol=0)
    assert 0 <= float(metrics['deep_fraction']) <= 1
  # Traced (so compiled) in the first epoch only: the epoch count is traced.
  assert traces[0] >= 1 and traces[1:] == [0, 0]
  assert int(state.epoch) == 3 and int(state.step) == 3 * steps


def test_epochs_are_deterministic_and_seeded(config, digits):
  steps = digits.train.labels.shape[0] // config.training.batch_size

  def one_epoch(seed):
    seeded = config.replace(training=dataclasses.replace(config.training, seed=seed))
    state = create_train_state(seeded, digits.num_features, steps)
    return jit_train_epoch(seeded)(state, digits.train)[0].params

  first, again, other = one_epoch(0), one_epoch(0), one_epoch(1)
  tree_allclose(first, again, rtol=0, atol=0)
  assert not np.allclose(first['head']['kernel'], other['head']['kernel'])


def test_unrolled_epoch_takes_the_same_steps(config, digits):
  steps = digits.train.labels.shape[0] // config.training.batch_size

  def one_epoch(unroll):
    unrolled = config.replace(training=dataclasses.replace(config.training, scan_unroll=unroll))
    state = create_train_state(unrolled, digits.num_features, steps)
    state, metrics = jit_train_epoch(unrolled)(state, digits.train)
    return state, metrics

  # 3 does not divide the epoch's steps: the remainder runs too.
  assert steps % 3
  (plain, plain_metrics), (unrolled, unrolled_metrics) = one_epoch(1), one_epoch(3)
  assert int(unrolled.step) == int(plain.step) == steps
  tree_allclose(unrolled.params, plain.params, rtol=1e-5, atol=1e-6)
  tree_allclose(unrolled_metrics, plain_metrics, rtol=1e-5, atol=1e-6)


def test_evaluate_matches_a_direct_computation(config, digits):
  state = create_train_state(config, digits.num_features, 10)
  model = model_from_config(config)
  split = Split(digits.test.images[:250], digits.test.labels[:250])
  metrics = evaluate(model, state.variables, split, batch_size=100)  # 2 full + 50
  logits, routes = model.apply(state.variables, split.images)
  log_probs = jax.nn.log_softmax(logits)
  loss = -np.mean(np.take_along_axis(np.asarray(log_probs),
                                     np.asarray(split.labels)[:, None], 1))
  assert metrics['n'] == 250
  assert metrics['loss'] == pytest.approx(loss, rel=1e-5)
  assert metrics['accuracy'] == pytest.approx(
      np.mean(np.argmax(logits, -1) == np.asarray(split.labels)))
  assert metrics['deep_fraction'] == pytest.approx(float(np.mean(routes)))


def test_batch_mode_evaluation_routes_each_batch(config, digits):
  batch_config = config.replace(routing=RoutingConfig(mode='batch'))
  model = model_from_config(batch_config)
  state = create_train_state(batch_config, digits.num_features, 10)
  inputs = np.asarray(digits.test.images[:100]).copy()
  inputs[50:] *= 0.01  # the second batch has near-zero variance: shortcut
  split = Split(jnp.asarray(inputs), digits.test.labels[:100])
  metrics = evaluate(model, state.variables, split, batch_size=50)
  assert metrics['deep_fraction'] == pytest.approx(0.5)


def test_nan_loss_stops_training_with_a_clear_error(config, digits):
  images = np.asarray(digits.train.images).copy()
  images[:] = np.nan
  poisoned = dataclasses.replace(
      digits, train=Split(jnp.asarray(images), digits.train.labels))
  with pytest.raises(DnnrError, match='diverged in epoch 1'):
    fit(config.replace(training=dataclasses.replace(config.training, epochs=1)),
        poisoned)


def test_batch_larger_than_the_data_is_rejected(config, digits):
  tiny = dataclasses.replace(
      digits, train=Split(digits.train.images[:10], digits.train.labels[:10]))
  with pytest.raises(DnnrError, match='training.batch_size'):
    fit(config, tiny)


def test_short_real_mnist_run_learns(mnist_dir):
  config = Config(
      model=ModelConfig(hidden_sizes=(128, 128), deep_size=64),
      training=TrainingConfig(epochs=1, batch_size=128, checkpoint_every=0))
  dataset = load_dataset(config.data, mnist_dir)
  subset = Dataset(
      name=dataset.name, train=Split(dataset.train.images[:20000],
                                     dataset.train.labels[:20000]),
      test=dataset.test, validation=None, num_features=dataset.num_features,
      num_classes=dataset.num_classes, source=dataset.source)
  result = fit(config, subset)
  final = result.final_metrics
  assert final['test']['n'] == 10000
  assert final['test']['accuracy'] > 0.92
  assert final['train']['loss'] < 0.5


def test_distillation_loss(config, digits):
  state = create_train_state(config, digits.num_features, 10)
  model = model_from_config(config)
  images, labels = digits.train.images[:32], digits.train.labels[:32]
  variables = state.variables
  plain, plain_sums = batch_sums(model.apply, variables, images, labels)
  # Weight 0: the labels alone, whatever the teacher says.
  other = jax.tree.map(lambda leaf: leaf * 0.5, variables)
  mute = Teacher(other, model.apply, weight=0.0, temperature=2.0)
  unweighted, sums = batch_sums(model.apply, variables, images, labels, mute)
  np.testing.assert_allclose(unweighted, plain, rtol=1e-6)
  tree_allclose(sums, plain_sums, rtol=0, atol=0)  # metrics stay the hard ones

  # Weight 1 with the student as its own teacher: the soft loss is at its
  # minimum, so its gradient vanishes.
  def soft_loss(params, teacher):
    return batch_sums(model.apply, {**variables, 'params': params}, images, labels, teacher)[0]

  itself = Teacher(variables, model.apply, weight=1.0, temperature=3.0)
  gradients = jax.grad(soft_loss)(variables['params'], itself)
  assert max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(gradients)) < 1e-5
  # Against another teacher it pulls the student towards it.
  elsewhere = Teacher(other, model.apply, weight=1.0, temperature=3.0)
  gradients = jax.grad(soft_loss)(variables['params'], elsewhere)
  assert max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(gradients)) > 1e-3
