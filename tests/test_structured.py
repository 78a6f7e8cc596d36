"""Structured pruning shrinks every touching kernel and keeps the model runnable."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnnr_jax.compress import structured
from dnnr_jax.config import Config, ModelConfig, RoutingConfig
from dnnr_jax.errors import DnnrError
from dnnr_jax.model import DynamicMLP, EarlyExitMLP, init_variables, model_from_config

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


EARLY_EXIT = ModelConfig(family='early_exit', hidden_sizes=(16, 12, 10), num_classes=5,
                         exit_after=1, exit_width=6)


def _joint(model_config, variables, inputs):
  """Both exits and the routes of an early-exit model on every row."""
  model = model_from_config(Config(model=model_config).replace(
      routing=RoutingConfig(router='confidence')))
  return jax.jit(functools.partial(model.apply, method=EarlyExitMLP.joint))(variables, inputs)


def test_early_exit_units_go_from_the_trunk_and_the_exit():
  model = model_from_config(Config(model=EARLY_EXIT))
  variables = init_variables(model, jax.random.PRNGKey(1), 20,
                             {**THRESHOLDS, 'confidence': jnp.float32(0.3)})
  params = variables['params']
  groups = {group.name: group for group in structured.unit_groups(params, EARLY_EXIT)}
  # trunk_0 feeds the next trunk layer and the exit, which leaves after it.
  assert groups['trunk_0'].consumers == ('trunk_1', 'exit_hidden')
  assert groups['trunk_2'].consumers == ('head',)
  assert groups['exit_hidden'].consumers == ('exit',)
  params = _silence(params, groups['trunk_0'], [2, 5, 11, 14])
  params = _silence(params, groups['trunk_2'], [0, 9])
  params = _silence(params, groups['exit_hidden'], [1, 3])
  fractions = {'trunk_0': 4 / 16, 'trunk_2': 2 / 10, 'exit_hidden': 2 / 6}
  shrunk, config, kept = structured.prune_units(params, EARLY_EXIT, fractions)
  assert config.hidden_sizes == (12, 12, 8) and config.exit_width == 4
  assert config.exit_after == 1 and config.family == 'early_exit'
  assert 5 not in kept['trunk_0'] and 3 not in kept['exit_hidden']
  assert shrunk['exit_hidden']['kernel'].shape == (12, 4)
  assert shrunk['exit']['kernel'].shape == (4, 5)
  assert shrunk['head']['kernel'].shape == (8, 5)
  inputs = _inputs()
  before = _joint(EARLY_EXIT, {**variables, 'params': params}, inputs)
  after = _joint(config, {**variables, 'params': shrunk}, inputs)
  for new, old in zip(after, before, strict=True):
    np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-6)
  assert 0 < int(after[1].sum()) < inputs.shape[0]  # both routes exercised


def test_early_exit_params_must_match_their_config():
  params = init_variables(model_from_config(Config(model=EARLY_EXIT)), jax.random.PRNGKey(0),
                          20)['params']
  linear_exit = dataclasses.replace(EARLY_EXIT, exit_width=0)
  with pytest.raises(DnnrError, match='early-exit MLP its config describes'):
    structured.prune_units(params, linear_exit, 0.5)
