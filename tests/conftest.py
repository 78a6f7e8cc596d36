"""Shared fixtures; strict numerics for every test."""

import os
import pathlib

import jax
import numpy as np
import pytest

jax.config.update('jax_numpy_rank_promotion', 'raise')

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE_CONFIG = ROOT / 'configs' / 'smoke.yaml'


def tree_allclose(actual, expected, **tolerances) -> None:
  """Asserts two pytrees have one structure and close leaves."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for left, right in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(left), np.asarray(right), **tolerances)


@pytest.fixture(scope='session')
def mnist_dir() -> pathlib.Path:
  """The real MNIST directory from $DNNR_DATA_DIR; skips, saying why, without it."""
  value = os.environ.get('DNNR_DATA_DIR')
  if not value:
    pytest.skip('DNNR_DATA_DIR is not set; point it at the MNIST IDX files '
                '(CI sets ../shared/data/mnist)')
  directory = pathlib.Path(value).expanduser()
  if not (directory / 'train-images-idx3-ubyte.gz').exists():
    pytest.skip(f'DNNR_DATA_DIR={value} holds no MNIST files')
  return directory
