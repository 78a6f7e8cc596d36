"""The early-exit family: stages, routers, execution that skips, joint training, cost."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from dnnr_jax import routing
from dnnr_jax.config import load_config
from dnnr_jax.cost import XLA_TOLERANCE, RouteCost, route_cost, xla_check
from dnnr_jax.errors import ConfigError
from dnnr_jax.model import EarlyExitMLP, init_variables, model_from_config
from dnnr_jax.train import create_train_state, evaluate, jit_train_epoch
from tests.conftest import SMOKE_CONFIG

FEATURES, BATCH = 40, 64


def _model(**kwargs):
  settings = dict(hidden_sizes=(48, 32), num_classes=10, exit_after=1, exit_width=16,
                  router='confidence')
  return EarlyExitMLP(**{**settings, **kwargs})


@pytest.fixture(scope='module')
def setup():
  variables = init_variables(_model(), jax.random.PRNGKey(0), FEATURES)
  inputs = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, FEATURES)), jnp.float32)
  return variables, inputs


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, inputs):
  """The jitted `model.apply`, compiled once per module and shape."""
  return model.apply(variables, inputs)


@functools.partial(jax.jit, static_argnums=0)
def _reference(model, variables, inputs):
  """Run everything, keep the head's rows where routed: what skipping must equal."""
  head, deep_path, exit_logits = model.apply(variables, inputs, method=EarlyExitMLP.joint)
  return jnp.where(deep_path[:, None], head, exit_logits), deep_path


def _with_deep_count(model, variables, inputs, count):
  """Variables whose confidence threshold sends exactly `count` rows deep."""
  exit_logits = model.apply(variables, inputs, method=EarlyExitMLP.cheap)[0]
  ordered = np.sort(np.asarray(routing.confidence(exit_logits)))
  threshold = 2.0 if count == len(ordered) else ordered[count]
  return {**variables, 'thresholds': {**variables['thresholds'],
                                      'confidence': jnp.float32(threshold)}}


def _assert_same_result(logits, reference):
  """Equal up to float32 rounding (XLA's matmul kernels differ by row count), same argmax."""
  np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(reference, -1))


def test_bucket_sizes():
  assert routing.bucket_sizes(256) == (8, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256)
  assert routing.bucket_sizes(64) == (2, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64)
  assert routing.bucket_sizes(7) == (1, 2, 3, 4, 5, 6, 7)
  assert routing.bucket_sizes(1) == (1,)


# 0 and 64: none and all deep; 2 fills the smallest bucket; 3 overflows it into
# the next; 13 overflows 12 into 16; 49 overflows 3B/4 into the whole batch.
@pytest.mark.parametrize('count', [0, 1, 2, 3, 13, 17, 33, 49, 64])
def test_per_sample_equals_the_run_everything_reference(setup, count):
  variables, inputs = setup
  model = _model()
  variables = _with_deep_count(model, variables, inputs, count)
  logits, deep_path = _apply(model, variables, inputs)
  reference, reference_path = _reference(model, variables, inputs)
  assert int(np.sum(deep_path)) == count
  np.testing.assert_array_equal(deep_path, reference_path)
  _assert_same_result(logits, reference)


@pytest.mark.parametrize('count, bucket', [
    (0, None), (1, 2), (2, 2), (3, 4), (9, 10), (13, 16), (40, 40), (41, 48), (64, 64)])
def test_the_expensive_stage_runs_on_one_bucket_of_routed_rows(count, bucket):
  rows_seen = []
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)

  def stage(rows):
    jax.debug.callback(lambda n: rows_seen.append(int(n)), rows.shape[0])
    return rows @ weights

  deep_path = jnp.arange(BATCH) % 7 < 7 * count / BATCH  # `count` rows spread out
  deep_path = jnp.zeros(BATCH, bool).at[jnp.nonzero(deep_path, size=count)[0]].set(True)
  hidden = jnp.asarray(np.random.default_rng(2).normal(size=(BATCH, 5)), jnp.float32)
  shallow = jnp.full((BATCH, 3), -1.0)
  out = jax.jit(lambda *args: routing.run_on_routed(stage, *args))(deep_path, hidden, shallow)
  jax.effects_barrier()
  assert rows_seen == ([] if bucket is None else [bucket])
  expected = np.where(np.asarray(deep_path)[:, None], np.asarray(hidden @ weights), -1.0)
  np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize('router, mode', [
    ('confidence', 'per_sample'), ('complexity', 'per_sample'), ('confidence', 'batch'),
    ('confidence', 'deep'), ('confidence', 'shallow')])
def test_every_mode_equals_its_reference_on_real_inputs(digits_inputs, router, mode):
  model = _model(router=router, routing=mode)
  variables = init_variables(model, jax.random.PRNGKey(3), digits_inputs.shape[1])
  thresholds = {'variance': 0.9, 'entropy': 0.5, 'sparsity': 0.5, 'confidence': 0.13}
  variables['thresholds'] = {name: jnp.float32(value) for name, value in thresholds.items()}
  logits, deep_path = _apply(model, variables, digits_inputs)
  head, per_sample_path, exit_logits = jax.jit(functools.partial(
      model.apply, method=EarlyExitMLP.joint))(variables, digits_inputs)
  if mode == 'per_sample':
    assert 0 < np.sum(deep_path) < len(deep_path)  # both routes taken
    np.testing.assert_array_equal(deep_path, per_sample_path)
    _assert_same_result(logits, np.where(deep_path[:, None], head, exit_logits))
  elif mode == 'batch':
    # The batch's mean confidence decides for all.
    deep = np.mean(np.asarray(routing.confidence(exit_logits))) < 0.13
    np.testing.assert_array_equal(deep_path, np.full(len(deep_path), deep))
    _assert_same_result(logits, head if deep else exit_logits)
  else:
    np.testing.assert_array_equal(deep_path, np.full(len(deep_path), mode == 'deep'))
    _assert_same_result(logits, head if mode == 'deep' else exit_logits)


@pytest.fixture(scope='module')
def digits_inputs():
  from dnnr_jax.io.data import load_dataset
  config = load_config(SMOKE_CONFIG)
  return load_dataset(config.data).test.images[:96]


def test_batch_mode_is_one_conditional_and_per_sample_one_switch(setup):
  variables, inputs = setup

  def branches(mode):
    """The number of branches of each conditional in the model's jaxpr."""
    jaxpr = jax.make_jaxpr(_model(routing=mode).apply)(variables, inputs)
    return [len(eqn.params['branches']) for eqn in _equations(jaxpr.jaxpr)
            if eqn.primitive.name == 'cond']

  assert branches('batch') == [2]
  # One switch: skip when none is routed, else one branch per bucket.
  assert branches('per_sample') == [len(routing.bucket_sizes(BATCH)) + 1]
  assert branches('deep') == branches('shallow') == []


def _equations(jaxpr):
  """Every equation of a jaxpr, inside nested calls but not inside cond branches."""
  for eqn in jaxpr.eqns:
    yield eqn
    if eqn.primitive.name != 'cond':
      for sub in jaxprs_in_params(eqn.params):
        yield from _equations(sub)


def test_deep_mode_never_runs_the_exit(setup):
  variables, inputs = setup
  jaxpr = str(jax.make_jaxpr(_model(routing='deep').apply)(variables, inputs))
  assert jaxpr.count('dot_general') == 3  # trunk_0, trunk_1, head; no exit


def test_route_cost_counts_dense_multiply_adds():
  cost = route_cost(EarlyExitMLP(hidden_sizes=(256, 256, 128), exit_width=32), 784)
  assert cost == RouteCost(stem=0, exit_head=784 * 32 + 32 * 10,
                           expensive=784 * 256 + 256 * 256 + 256 * 128 + 128 * 10)
  shared = route_cost(_model(), FEATURES)
  assert shared.stem == 40 * 48
  assert shared.exit_head == 48 * 16 + 16 * 10
  assert shared.expensive == 48 * 32 + 32 * 10
  assert shared.always_deep == 40 * 48 + 48 * 32 + 32 * 10
  assert shared.mean(0.5) == shared.cheap + 0.5 * shared.expensive
  assert shared.deep_fraction_for(shared.mean(0.3) / shared.always_deep) == pytest.approx(0.3)


def test_xla_cost_analysis_agrees_with_the_count(setup):
  variables, _ = setup
  model = _model()
  cost = route_cost(model, FEATURES)
  rows = jnp.zeros((1, 48), jnp.float32)
  compiled = jax.jit(functools.partial(model.apply, method=EarlyExitMLP.expensive)).lower(
      variables, rows).compile()
  flops = compiled.cost_analysis()['flops']
  # 2 flops per multiply-add, plus the biases and ReLUs XLA also counts.
  assert 2 * cost.expensive <= flops <= 2 * cost.expensive + 4 * (32 + 10)


@pytest.mark.parametrize('exit_after, exit_width, router', [
    (0, 32, 'confidence'), (1, 16, 'complexity')])
def test_counted_multiply_adds_are_half_of_xla_flops_on_each_route(exit_after, exit_width, router):
  """MNIST's widths: XLA counts 2 FLOPs per multiply-add, and a few for biases, ReLUs, router."""
  model = EarlyExitMLP(hidden_sizes=(256, 256, 128), exit_after=exit_after,
                       exit_width=exit_width, router=router)
  variables = init_variables(model, jax.random.PRNGKey(0), 784)
  checks = xla_check(model, variables, 784)
  exit_input = 784 if exit_after == 0 else 256
  hand = {'deep': 784 * 256 + 256 * 256 + 256 * 128 + 128 * 10,
          'shallow': 784 * 256 * exit_after + exit_input * exit_width + exit_width * 10}
  for route, counted in hand.items():
    check = checks[route]
    assert check['counted'] == counted
    assert check['xla_multiply_adds'] == check['xla_flops'] / 2
    # XLA's extra work is there (biases at least) but within the stated tolerance.
    assert 0 < check['relative_difference'] <= XLA_TOLERANCE


def test_config_checks():
  with pytest.raises(ConfigError, match='model.exit_after'):
    load_config(SMOKE_CONFIG, ['model.family=early_exit', 'model.exit_after=2'])
  with pytest.raises(ConfigError, match='early_exit'):
    load_config(SMOKE_CONFIG, ['routing.router=confidence'])
  with pytest.raises(ConfigError, match='routing.router'):
    load_config(SMOKE_CONFIG, ['model.family=early_exit', 'routing.router=magic'])


def test_joint_training_teaches_both_exits():
  from dnnr_jax.io.data import load_dataset
  from dnnr_jax.train import batch_sums

  config = load_config(SMOKE_CONFIG, [
      'model.family=early_exit', 'model.exit_width=16', 'routing.router=confidence',
      'model.exit_loss_weight=0.5', 'training.epochs=3'])
  dataset = load_dataset(config.data)
  steps = dataset.train.labels.shape[0] // config.training.batch_size
  state = create_train_state(config, dataset.num_features, steps)
  assert state.exit_weight == 0.5
  assert set(state.thresholds) == {'variance', 'entropy', 'sparsity', 'confidence'}
  images, labels = dataset.train.images[:64], dataset.train.labels[:64]

  @jax.jit
  def exit_gradient(weight):
    grads = jax.grad(lambda params: batch_sums(
        state.apply_fn, {**state.variables, 'params': params}, images, labels,
        exit_weight=weight)[0])(state.params)
    return jnp.sum(jnp.abs(grads['exit']['kernel']))

  # The exit learns from its share of the loss, and only from it.
  assert float(exit_gradient(0.0)) == 0.0 < float(exit_gradient(0.5))
  run_epoch = jit_train_epoch(config)
  for _ in range(config.training.epochs):
    state, _ = run_epoch(state, dataset.train)
  model = model_from_config(config)
  for mode in ('shallow', 'deep'):
    accuracy = evaluate(model.clone(routing=mode), state.variables, dataset.test, 100)
    assert accuracy['accuracy'] > 0.85, (mode, accuracy)
