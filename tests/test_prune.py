"""Unstructured pruning: exact counts, N:M groups, idempotent masks, clear errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnnr_jax.compress import prune
from dnnr_jax.errors import DnnrError
from dnnr_jax.model import DynamicMLP, init_variables
from tests.conftest import tree_allclose

FAST = settings(max_examples=15, deadline=None)


def _params(shapes, seed=0, integer=False):
  """{'layer_i': {'kernel': shape, 'bias': [out]}}; integer weights make many ties."""
  rng = np.random.default_rng(seed)
  params = {}
  for index, shape in enumerate(shapes):
    kernel = rng.integers(-3, 4, size=shape) if integer else rng.normal(size=shape)
    params[f'layer_{index}'] = {'kernel': jnp.asarray(kernel, jnp.float32),
                                'bias': jnp.asarray(rng.normal(size=shape[1]), jnp.float32)}
  return params


def assert_masks_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for left, right in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(left), np.asarray(right))


def _kernels(masks):
  return [np.asarray(mask) for mask in jax.tree.leaves(masks)]


# Few distinct dims, so eager ops hit JAX's compile cache and the tests stay fast.
dims = st.sampled_from([1, 2, 5, 8])
shapes_strategy = st.lists(st.tuples(dims, dims), min_size=1, max_size=3)


def _check_lowest_pruned(scores, keep):
  """Every pruned score <= every kept one; at equal scores the lower index went."""
  scores, keep = scores.ravel(), keep.ravel()
  if keep.all() or not keep.any():
    return
  assert scores[~keep].max() <= scores[keep].min()
  boundary = scores[~keep].max()
  tied_pruned = np.flatnonzero(~keep & (scores == boundary))
  tied_kept = np.flatnonzero(keep & (scores == boundary))
  if tied_kept.size:
    assert tied_pruned.max() < tied_kept.min()


@FAST
@given(shapes=shapes_strategy, sparsity=st.floats(0.0, 1.0, exclude_max=True),
       integer=st.booleans(), seed=st.integers(0, 2**16))
def test_global_prunes_exactly_round_s_n_lowest_first(shapes, sparsity, integer, seed):
  params = _params(shapes, seed, integer)
  masks = prune.magnitude_masks(params, sparsity, scope='global')
  keeps = _kernels(masks)
  total = sum(keep.size for keep in keeps)
  assert sum(int((~keep).sum()) for keep in keeps) == round(sparsity * total)
  scores = np.concatenate([np.abs(np.asarray(layer['kernel'])).ravel()
                           for layer in params.values()])
  _check_lowest_pruned(scores, np.concatenate([keep.ravel() for keep in keeps]))


@FAST
@given(shapes=shapes_strategy, sparsity=st.floats(0.0, 1.0, exclude_max=True),
       integer=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_prunes_exactly_round_s_n_per_leaf(shapes, sparsity, integer, seed):
  params = _params(shapes, seed, integer)
  masks = prune.magnitude_masks(params, sparsity, scope='layer')
  for name, layer in params.items():
    keep = np.asarray(masks[name]['kernel'])
    assert int((~keep).sum()) == round(sparsity * keep.size)
    _check_lowest_pruned(np.abs(np.asarray(layer['kernel'])), keep)


TRACES = []


@functools.partial(jax.jit, static_argnames='scope')
def _jitted_masks(params, sparsity, scope):
  TRACES.append(None)
  return prune.magnitude_masks(params, sparsity, scope=scope)


@settings(max_examples=10, deadline=None)
@given(shapes=shapes_strategy, data=st.data(), scope=st.sampled_from(prune.SCOPES))
def test_traced_sparsity_compiles_once_and_counts_exactly(shapes, data, scope):
  params = _params(shapes, integer=True)
  total = sum(layer['kernel'].size for layer in params.values())
  prune_count = data.draw(st.integers(0, total - 1))
  # A quarter away from a rounding boundary, so float32 cannot move the count.
  sparsity = (prune_count + 0.25) / total
  masks = _jitted_masks(params, jnp.float32(sparsity), scope)
  traces = len(TRACES)
  _jitted_masks(params, jnp.float32(0.5), scope)
  assert len(TRACES) == traces
  assert_masks_equal(masks, prune.magnitude_masks(params, sparsity, scope=scope))


@FAST
@given(shapes=shapes_strategy, sparsity=st.floats(0.0, 1.0, exclude_max=True),
       scope=st.sampled_from(prune.SCOPES), integer=st.booleans())
def test_applying_masks_twice_changes_nothing(shapes, sparsity, scope, integer):
  params = _params(shapes, integer=integer)
  masks = prune.magnitude_masks(params, sparsity, scope=scope)
  once = prune.apply_masks(params, masks)
  twice = prune.apply_masks(once, masks)
  tree_allclose(twice, once, rtol=0, atol=0)
  for name in params:
    kernel = np.asarray(once[name]['kernel'])
    assert np.all(kernel[~np.asarray(masks[name]['kernel'])] == 0.0)
    assert not np.any(np.signbit(kernel[kernel == 0.0]))  # +0.0, not -0.0
  # Re-pruning the pruned params at the same sparsity picks the same weights.
  assert_masks_equal(prune.magnitude_masks(once, sparsity, scope=scope), masks)


@FAST
@given(nm=st.sampled_from([(2, 4), (1, 4), (4, 8)]), groups=st.integers(1, 3),
       outputs=st.integers(1, 5), integer=st.booleans(), seed=st.integers(0, 2**16))
def test_nm_keeps_n_largest_of_every_m_inputs(nm, groups, outputs, integer, seed):
  n, m = nm
  params = _params([(groups * m, outputs)], seed, integer)
  keep = np.asarray(prune.nm_masks(params, n, m)['layer_0']['kernel'])
  kernel = np.asarray(prune.apply_masks(params, prune.nm_masks(params, n, m))['layer_0']['kernel'])
  scores = np.abs(np.asarray(params['layer_0']['kernel']))
  for group in range(groups):
    rows = slice(group * m, (group + 1) * m)
    assert np.all(keep[rows].sum(axis=0) == n)
    assert np.all((kernel[rows] == 0).sum(axis=0) >= m - n)
    for column in range(outputs):
      _check_lowest_pruned(scores[rows, column], keep[rows, column])


def test_ties_are_deterministic_across_calls_and_jit():
  params = {'a': {'kernel': jnp.ones((4, 4))}, 'b': {'kernel': jnp.ones((4, 4))}}
  eager = prune.magnitude_masks(params, 0.25)
  jitted = jax.jit(functools.partial(prune.magnitude_masks, sparsity=0.25))(params)
  assert_masks_equal(jitted, eager)
  # All 32 scores tie: the first 8 in flattening order go, 'a's first two rows.
  np.testing.assert_array_equal(np.asarray(eager['a']['kernel']).all(axis=1),
                                [False, False, True, True])
  assert not np.asarray(eager['a']['kernel'])[:2].any()
  assert np.asarray(eager['b']['kernel']).all()
  nm = prune.nm_masks(params, 2, 4)
  np.testing.assert_array_equal(np.asarray(nm['a']['kernel'])[:, 0], [False, False, True, True])


def test_global_prunes_a_small_layer_harder_than_layer_scope():
  rng = np.random.default_rng(0)
  signs = rng.choice([-1.0, 1.0], size=(2, 8, 8))
  params = {'big': {'kernel': jnp.asarray(signs[0] * rng.uniform(1, 2, (8, 8)), jnp.float32)},
            'small': {'kernel': jnp.asarray(signs[1] * rng.uniform(0.01, 0.02, (8, 8)),
                                            jnp.float32)}}
  global_report = prune.sparsity_report(params, prune.magnitude_masks(params, 0.5))
  layer_report = prune.sparsity_report(
      params, prune.magnitude_masks(params, 0.5, scope='layer'))
  assert global_report['small/kernel']['sparsity'] == 1.0
  assert global_report['big/kernel']['sparsity'] == 0.0
  assert layer_report['small/kernel']['sparsity'] == 0.5
  assert layer_report['big/kernel']['sparsity'] == 0.5
  assert global_report['overall']['zeros'] == layer_report['overall']['zeros'] == 64


@pytest.fixture(scope='module')
def model_params():
  model = DynamicMLP(hidden_sizes=(8, 8), deep_size=4, num_classes=3)
  init = jax.jit(functools.partial(init_variables, model, num_features=12))
  return init(jax.random.PRNGKey(0))['params']


def test_default_selection_is_every_kernel_and_no_bias(model_params):
  assert prune.param_paths(model_params) == [
      'deep/bias', 'deep/kernel', 'head/bias', 'head/kernel', 'shortcut/bias',
      'shortcut/kernel', 'trunk_0/bias', 'trunk_0/kernel', 'trunk_1/bias', 'trunk_1/kernel']
  masks = prune.magnitude_masks(model_params, 0.6)
  for name, layer in masks.items():
    assert layer['bias'] is None
    assert layer['kernel'].shape == model_params[name]['kernel'].shape
  pruned = prune.apply_masks(model_params, masks)
  for name, layer in model_params.items():
    np.testing.assert_array_equal(pruned[name]['bias'], layer['bias'])
  only_trunk = prune.select(model_params, [r'trunk_\d/kernel'])
  assert only_trunk['trunk_0']['kernel'] and not only_trunk['deep']['kernel']


def test_sparsity_report_counts_every_leaf(model_params):
  masks = prune.magnitude_masks(model_params, 0.5)
  report = prune.sparsity_report(prune.apply_masks(model_params, masks))
  kernels = 12 * 8 + 8 * 8 + 2 * 8 * 4 + 4 * 3
  biases = 8 + 8 + 4 + 4 + 3
  assert report['overall'] == {'size': kernels, 'zeros': round(0.5 * kernels), 'sparsity':
                               round(0.5 * kernels) / kernels}
  assert report['all_params']['size'] == kernels + biases
  assert report['all_params']['zeros'] == round(0.5 * kernels) + biases  # Dense biases start at 0
  assert 'trunk_0/bias' not in report
  assert prune.sparsity_report(model_params, masks)['overall'] == report['overall']


def test_bad_pattern_names_it_and_the_available_paths(model_params):
  with pytest.raises(DnnrError, match=r"'conv.*/kernel'.*trunk_0/kernel"):
    prune.magnitude_masks(model_params, 0.5, patterns=[r'conv.*/kernel'])
  with pytest.raises(DnnrError, match='regular expression'):
    prune.select(model_params, ['trunk_(0'])


@pytest.mark.parametrize('sparsity', [1.0, -0.1, 1.5, float('nan')])
def test_bad_sparsity_names_the_value(model_params, sparsity):
  with pytest.raises(DnnrError, match=f'sparsity {sparsity!r}'):
    prune.magnitude_masks(model_params, sparsity)


def test_bad_scope_score_and_nm_are_rejected(model_params):
  with pytest.raises(DnnrError, match="'row'"):
    prune.magnitude_masks(model_params, 0.5, scope='row')
  with pytest.raises(DnnrError, match="'taylor'"):
    prune.magnitude_masks(model_params, 0.5, score='taylor')
  with pytest.raises(DnnrError, match='5:4'):
    prune.nm_masks(model_params, 5, 4)


def test_nm_indivisible_input_names_the_path_and_shape(model_params):
  # Every input axis is a multiple of 4; head's (4 wide) is not one of 8.
  prune.nm_masks(model_params, 2, 4)
  with pytest.raises(DnnrError, match=r'head/kernel has shape \(4, 3\)'):
    prune.nm_masks(model_params, 4, 8)


def test_registered_score_changes_which_weights_go():
  params = {'layer': {'kernel': jnp.asarray([[1.0], [-3.0], [2.0], [-0.5]])}}
  prune.register_score('negative_first', lambda weights: weights)
  try:
    masks = prune.magnitude_masks(params, 0.5, score='negative_first')
  finally:
    del prune.SCORES['negative_first']
  np.testing.assert_array_equal(np.asarray(masks['layer']['kernel'])[:, 0],
                                [True, False, True, False])


def test_lamp_scores_match_a_hand_computed_layer():
  # |w| ascending: 0.5, 1, 2, 3 (squares 0.25, 1, 4, 9); each square over the
  # squares at least as large: 0.25/14.25, 1/14, 4/13, 9/9.
  weights = jnp.array([[1.0, -2.0], [3.0, 0.5]])
  expected = np.array([[1 / 14, 4 / 13], [1.0, 0.25 / 14.25]])
  np.testing.assert_allclose(jax.jit(prune.lamp_scores)(weights), expected, rtol=1e-6)


def test_lamp_scores_of_ties_count_every_tied_weight_and_zeros_score_zero():
  # Ties share one score: the denominator holds both (4 + 4 = 8); a zero layer scores 0.
  np.testing.assert_allclose(prune.lamp_scores(jnp.array([2.0, -2.0, 1.0])),
                             [4 / 8, 4 / 8, 1 / 9], rtol=1e-6)
  np.testing.assert_array_equal(prune.lamp_scores(jnp.zeros((2, 3))), np.zeros((2, 3)))


def test_lamp_cut_is_global_on_scores_not_on_magnitudes():
  # Layer a holds small weights, layer b large ones: a global magnitude cut of 4
  # empties layer a; LAMP prunes by scores, so each layer keeps its largest.
  params = {'a': {'kernel': jnp.array([[0.1, 0.2], [0.3, 0.4]])},
            'b': {'kernel': jnp.array([[1.0, 2.0], [3.0, 4.0]])}}
  magnitude = prune.magnitude_masks(params, 0.5)
  assert not np.asarray(magnitude['a']['kernel']).any()
  lamp = prune.magnitude_masks(params, 0.5, score='lamp')
  # Scores in both layers: 1/30, 4/29, 9/25, 1 (the same, scaled away): a tie per
  # rank, broken by flattening order, so a loses its two smallest and b its two.
  np.testing.assert_array_equal(lamp['a']['kernel'], [[False, False], [True, True]])
  np.testing.assert_array_equal(lamp['b']['kernel'], [[False, False], [True, True]])
