"""Complexity metrics against NumPy references of the original's formulas."""

import jax
import numpy as np
import pytest

from dnnr_jax import complexity


def _reference(inputs: np.ndarray) -> dict[str, np.ndarray]:
  """The original analyzer, in float64 NumPy, one row per example."""
  shifted = inputs - inputs.max(axis=1, keepdims=True)
  probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
  return {
      'variance': inputs.var(axis=1, ddof=1),
      'entropy': -(probabilities * np.log(probabilities + 1e-10)).sum(axis=1),
      'sparsity': (np.abs(inputs) < 0.1).mean(axis=1),
  }


@pytest.mark.parametrize('batch,features', [(1, 64), (7, 784), (128, 10)])
def test_batch_complexity_matches_reference(batch, features):
  rng = np.random.default_rng(batch)
  inputs = rng.normal(size=(batch, features)).astype(np.float32)
  inputs[:, ::3] *= 0.05  # so sparsity is neither 0 nor 1
  actual = jax.jit(complexity.batch_complexity)(inputs)
  expected = _reference(inputs.astype(np.float64))
  for name in complexity.METRICS:
    assert actual[name].shape == (batch,)
    np.testing.assert_allclose(actual[name], expected[name], rtol=2e-5, atol=1e-6)


def test_hand_computed_values():
  features = np.array([0.0, 0.05, 1.0, -2.0], np.float32)
  # mean -0.2375; squared deviations sum 4.776875; / (n - 1) = 1.5922917
  assert complexity.variance(features) == pytest.approx(1.5922917, rel=1e-6)
  assert complexity.sparsity(features) == pytest.approx(0.5)
  uniform = np.zeros(4, np.float32)
  assert complexity.entropy(uniform) == pytest.approx(np.log(4), rel=1e-6)


def test_variance_is_unbiased():
  features = np.array([1.0, 3.0], np.float32)
  assert complexity.variance(features) == pytest.approx(2.0)  # ddof=0 gives 1.0


def test_sparsity_cutoff_is_strict():
  features = np.array([0.1, -0.1, 0.0999, -0.0999], np.float32)
  assert complexity.sparsity(features) == pytest.approx(0.5)


@pytest.mark.parametrize('peak', [10.0, 25.0, 60.0])
def test_entropy_of_peaked_inputs_matches_the_epsilon_formula(peak):
  # Probabilities near and far below the original's 1e-10 epsilon.
  features = np.zeros((1, 784), np.float32)
  features[0, 3] = peak
  actual = complexity.batch_complexity(features)['entropy']
  expected = _reference(features.astype(np.float64))['entropy']
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
