"""Routing decisions and the model's paths in every mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnnr_jax import routing
from dnnr_jax.complexity import batch_complexity
from dnnr_jax.model import DynamicMLP, init_variables

HALF = {name: jnp.float32(0.5) for name in ('variance', 'entropy', 'sparsity')}


def _metrics(variance, entropy, sparsity):
  return {'variance': jnp.asarray(variance, jnp.float32),
          'entropy': jnp.asarray(entropy, jnp.float32),
          'sparsity': jnp.asarray(sparsity, jnp.float32)}


def test_per_sample_rule_is_the_conjunction():
  metrics = _metrics([0.6, 0.4, 0.6, 0.6, 0.6],
                     [0.6, 0.6, 0.4, 0.6, 0.6],
                     [0.4, 0.4, 0.4, 0.6, 0.5])
  routes = jax.jit(routing.route, static_argnums=2)(metrics, HALF, 'per_sample')
  np.testing.assert_array_equal(routes, [True, False, False, False, False])


@pytest.mark.parametrize('variance,expected', [
    ([0.9, 0.9, 0.0], True),   # mean 0.6 > 0.5 although one example is below
    ([0.9, 0.0, 0.0], False),  # mean 0.3, although one example is above
])
def test_batch_mode_is_the_original_rule(variance, expected):
  """The original: batch means against fixed 0.5 cut-offs, one route per batch."""
  metrics = _metrics(variance, [0.6] * 3, [0.1] * 3)
  routes = routing.route(metrics, HALF, 'batch')
  means = {name: float(np.mean(values)) for name, values in metrics.items()}
  original = (means['variance'] > 0.5 and means['entropy'] > 0.5
              and not means['sparsity'] > 0.5)
  assert original == expected
  np.testing.assert_array_equal(routes, [expected] * 3)


@pytest.mark.parametrize('mode,expected', [('deep', True), ('shallow', False)])
def test_fixed_modes(mode, expected):
  metrics = _metrics([0.0, 9.0], [0.0, 9.0], [1.0, 0.0])
  np.testing.assert_array_equal(routing.route(metrics, HALF, mode), [expected] * 2)


def test_unknown_mode_is_rejected():
  with pytest.raises(ValueError, match='routing mode'):
    routing.route(_metrics([1.0], [1.0], [0.0]), HALF, 'sideways')


def _variables(num_features=20, thresholds=None):
  model = DynamicMLP(hidden_sizes=(16, 12), deep_size=8, num_classes=5)
  return init_variables(model, jax.random.PRNGKey(0), num_features,
                        thresholds or HALF)


def _inputs(batch=32, num_features=20):
  inputs = np.random.default_rng(0).normal(size=(batch, num_features))
  # Spread the variances so that thresholds split the batch.
  inputs *= np.linspace(0.3, 1.5, batch)[:, None]
  return jnp.asarray(inputs, jnp.float32)


def _apply(mode, variables, inputs):
  model = DynamicMLP(hidden_sizes=(16, 12), deep_size=8, num_classes=5, routing=mode)
  return jax.jit(model.apply)(variables, inputs)


def test_per_sample_model_takes_each_examples_own_path():
  thresholds = {**HALF, 'variance': jnp.float32(0.8)}
  variables = _variables(thresholds=thresholds)
  inputs = _inputs()
  logits, routes = _apply('per_sample', variables, inputs)
  deep_logits, _ = _apply('deep', variables, inputs)
  shallow_logits, _ = _apply('shallow', variables, inputs)
  expected_routes = routing.deep_rule(batch_complexity(inputs), thresholds)
  np.testing.assert_array_equal(routes, expected_routes)
  assert 0 < int(routes.sum()) < routes.shape[0]
  expected = np.where(np.asarray(routes)[:, None], deep_logits, shallow_logits)
  np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
  assert not np.allclose(deep_logits, shallow_logits)


@pytest.mark.parametrize('variance_threshold,deep', [(0.1, True), (5.0, False)])
def test_batch_model_runs_the_taken_path(variance_threshold, deep):
  variables = _variables(thresholds={**HALF, 'variance': jnp.float32(variance_threshold)})
  inputs = _inputs()
  logits, routes = _apply('batch', variables, inputs)
  reference, _ = _apply('deep' if deep else 'shallow', variables, inputs)
  np.testing.assert_array_equal(routes, [deep] * inputs.shape[0])
  np.testing.assert_allclose(logits, reference, rtol=1e-6, atol=1e-6)


def test_batch_mode_lowers_to_one_conditional_and_per_sample_to_none():
  variables = _variables()
  inputs = _inputs(batch=4)

  def primitives(mode):
    model = DynamicMLP(hidden_sizes=(16, 12), deep_size=8, num_classes=5, routing=mode)
    jaxpr = jax.make_jaxpr(model.apply)(variables, inputs)
    return [equation.primitive.name for equation in jaxpr.jaxpr.eqns]

  assert primitives('batch').count('cond') == 1
  assert 'cond' not in primitives('per_sample')
  assert primitives('deep').count('dot_general') == 4  # trunk x2, deep, head


def test_thresholds_are_variables_not_params():
  variables = _variables()
  assert set(variables) == {'params', 'thresholds'}
  assert set(variables['params']) == {'trunk_0', 'trunk_1', 'deep', 'shortcut', 'head'}
  assert variables['params']['trunk_0']['kernel'].shape == (20, 16)
  assert variables['params']['head']['kernel'].shape == (8, 5)
