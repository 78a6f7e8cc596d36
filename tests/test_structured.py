"""Structured pruning shrinks every touching kernel and keeps the model runnable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnnr_jax.compress import structured
from dnnr_jax.config import ModelConfig
from dnnr_jax.errors import DnnrError
from dnnr_jax.model import DynamicMLP, init_variables

CONFIG = ModelConfig(hidden_sizes=(16, 12), deep_size=8, num_classes=5)
THRESHOLDS = {'variance': jnp.float32(0.8), 'entropy': jnp.float32(0.5),
              'sparsity': jnp.float32(0.5)}


def _variables():
  model = DynamicMLP(hidden_sizes=CONFIG.hidden_sizes, deep_size=CONFIG.deep_size,
                     num_classes=CONFIG.num_classes)
  return init_variables(model, jax.random.PRNGKey(0), 20, THRESHOLDS)


def _inputs():
  inputs = np.random.default_rng(0).normal(size=(32, 20))
  return jnp.asarray(inputs * np.linspace(0.3, 1.5, 32)[:, None], jnp.float32)


def _apply(model_config, variables, inputs):
  model = DynamicMLP(hidden_sizes=model_config.hidden_sizes,
                     deep_size=model_config.deep_size,
                     num_classes=model_config.num_classes)
  return jax.jit(model.apply)(variables, inputs)


def _silence(params, group, units):
  """Zeroes every weight and bias touching `units`, as if already dead."""
  params = jax.tree.map(np.array, params)
  for name in group.producers:
    params[name]['kernel'][:, units] = 0.0
    params[name]['bias'][units] = 0.0
  for name in group.consumers:
    params[name]['kernel'][units, :] = 0.0
  return params


def test_shapes_and_config_shrink():
  params = _variables()['params']
  shrunk, config, kept = structured.prune_units(params, CONFIG, 0.5)
  assert config.hidden_sizes == (8, 6) and config.deep_size == 4
  assert shrunk['trunk_0']['kernel'].shape == (20, 8)
  assert shrunk['trunk_1']['kernel'].shape == (8, 6)
  assert shrunk['deep']['kernel'].shape == (6, 4)
  assert shrunk['shortcut']['kernel'].shape == (6, 4)
  assert shrunk['head']['kernel'].shape == (4, 5)
  assert shrunk['head']['bias'].shape == (5,)
  assert [len(kept[name]) for name in ('trunk_0', 'trunk_1', 'block')] == [8, 6, 4]
  assert structured.count_parameters(shrunk) < structured.count_parameters(params) / 2


def test_removing_dead_units_changes_no_output():
  variables = _variables()
  params = variables['params']
  groups = {group.name: group for group in structured.unit_groups(params)}
  params = _silence(params, groups['trunk_0'], [1, 4, 9, 15])
  params = _silence(params, groups['trunk_1'], [0, 3, 7])
  params = _silence(params, groups['block'], [2, 5])
  fractions = {'trunk_0': 4 / 16, 'trunk_1': 3 / 12, 'block': 2 / 8}
  shrunk, config, kept = structured.prune_units(params, CONFIG, fractions)
  assert 1 not in kept['trunk_0'] and 7 not in kept['trunk_1'] and 5 not in kept['block']
  inputs = _inputs()
  before = _apply(CONFIG, {**variables, 'params': params}, inputs)
  after = _apply(config, {**variables, 'params': shrunk}, inputs)
  np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(after[1], before[1])
  assert 0 < int(after[1].sum()) < inputs.shape[0]  # both paths exercised


def test_lowest_scores_go_first_with_stable_ties():
  scores = np.array([3.0, 1.0, 2.0, 1.0, 5.0])
  np.testing.assert_array_equal(structured.kept_units(scores, 0.4), [0, 2, 4])
  np.testing.assert_array_equal(structured.kept_units(np.ones(4), 0.5), [0, 1])
  assert structured.kept_units(scores, 0.99).tolist() == [4]  # at least one unit


@pytest.mark.parametrize('sparsity', [-0.1, 1.0, {'trunk_9': 0.5}])
def test_bad_settings(sparsity):
  with pytest.raises(DnnrError):
    structured.prune_units(_variables()['params'], CONFIG, sparsity)


def test_not_a_dynamic_mlp():
  with pytest.raises(DnnrError, match='not a dynamic MLP'):
    structured.unit_groups({'dense': {'kernel': np.ones((2, 2)), 'bias': np.ones(2)}})
