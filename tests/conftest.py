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

# One persistent compilation cache for the whole session: made by the first
# process (pytest itself, or its xdist controller), inherited through the
# environment by the xdist workers and by every CLI run they start, so a
# train step or model compiled in one of them loads in all the others.
# Removed when the process that made it ends.
_CACHE_VARIABLE = 'DNNR_TESTS_JAX_CACHE'
_JAX_CACHE = os.environ.get(_CACHE_VARIABLE)
if not _JAX_CACHE:
  _JAX_CACHE = os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix='dnnr_jax_tests_jax_cache_')
  atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
for _name, _value in (('jax_compilation_cache_dir', _JAX_CACHE),
                      ('jax_persistent_cache_min_compile_time_secs', 0),
                      ('jax_persistent_cache_min_entry_size_bytes', 0)):
  jax.config.update(_name, _value)
  os.environ[_name.upper()] = str(_value)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE_CONFIG = ROOT / 'configs' / 'smoke.yaml'


def without_validation(path: pathlib.Path, models_dir: pathlib.Path) -> pathlib.Path:
  """`path`'s weights saved as final v1.0 under `models_dir` with data.validation_size = 0:
  a model trained without a validation split, for the checks that refuse or warn on one."""
  from dnnr_jax.io import checkpoint

  source = checkpoint.load_model(path)
  config = source.config.to_dict()
  config['data']['validation_size'] = 0
  return checkpoint.save_checkpoint(
      checkpoint.checkpoint_path(models_dir, 'final', '1.0').absolute(), source.variables,
      {**source.metadata, 'config': config})


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
