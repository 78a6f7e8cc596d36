"""Shared fixtures; strict numerics for every test."""

import atexit
import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np
import pytest

jax.config.update('jax_numpy_rank_promotion', 'raise')

# One persistent compilation cache per test process, inherited by the CLI
# runs it starts: the same train steps and models compile in many modules
# and subprocesses. Removed when the process ends.
_JAX_CACHE = tempfile.mkdtemp(prefix='dnnr_jax_tests_jax_cache_')
atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
for _name, _value in (('jax_compilation_cache_dir', _JAX_CACHE),
                      ('jax_persistent_cache_min_compile_time_secs', 0),
                      ('jax_persistent_cache_min_entry_size_bytes', 0)):
  jax.config.update(_name, _value)
  os.environ[_name.upper()] = str(_value)

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
