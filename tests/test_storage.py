"""Sparse encoding round trips exactly and really shrinks."""

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnnr_jax.compress import storage


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(
    dtype=st.sampled_from([np.float32, np.int8]),
    shape=hnp.array_shapes(min_dims=1, max_dims=2, max_side=700),
    elements=st.sampled_from([0, 0, 0, 0, 0, 0, 0, 1, -3, 7])))
def test_round_trip_is_exact(array):
  encoded = storage.encode_sparse(array)
  assert encoded['gaps'].dtype == np.uint8
  decoded = storage.decode_sparse(encoded, array.shape)
  np.testing.assert_array_equal(decoded, array)
  assert decoded.dtype == array.dtype
  assert storage.sparse_nbytes(array) == encoded['gaps'].nbytes + encoded['values'].nbytes


@pytest.mark.parametrize('gap', [0, 254, 255, 256, 257, 511, 512, 1000])
def test_long_runs_of_zeros_use_fillers(gap):
  array = np.zeros(gap + 2, np.float32)
  array[0] = 1.0
  array[gap + 1] = 2.0
  encoded = storage.encode_sparse(array)
  assert len(encoded['gaps']) == 2 + gap // 256
  np.testing.assert_array_equal(storage.decode_sparse(encoded, array.shape), array)


def test_all_zero_and_dense_arrays():
  zeros = np.zeros((3, 4), np.float32)
  assert storage.encode_sparse(zeros)['gaps'].size == 0  # trailing zeros cost nothing
  np.testing.assert_array_equal(storage.decode_sparse(storage.encode_sparse(zeros), (3, 4)),
                                zeros)
  dense = np.arange(1, 13, dtype=np.float32).reshape(3, 4)
  encoded = storage.encode_sparse(dense)
  assert np.all(encoded['gaps'] == 0)
  np.testing.assert_array_equal(storage.decode_sparse(encoded, (3, 4)), dense)


def test_ninety_percent_sparse_int8_is_a_fifth_of_dense_int8():
  rng = np.random.default_rng(0)
  weights = rng.integers(-127, 128, size=(784, 256)).astype(np.int8)
  weights[rng.random(weights.shape) < 0.9] = 0
  assert storage.sparse_nbytes(weights) < 0.21 * weights.nbytes
  assert storage.sparse_nbytes(weights) < 0.06 * weights.size * 4  # vs float32


def test_overlong_encoding_is_rejected():
  with pytest.raises(ValueError, match='reaches position'):
    storage.decode_sparse({'gaps': np.array([5], np.uint8),
                           'values': np.array([1.0], np.float32)}, (3,))


def test_directory_sizes(tmp_path):
  (tmp_path / 'a').mkdir()
  (tmp_path / 'a' / 'x.bin').write_bytes(b'\0' * 10000)
  (tmp_path / 'y.bin').write_bytes(bytes(range(256)) * 4)
  assert storage.directory_bytes(tmp_path) == 11024
  assert storage.gzip_bytes(tmp_path) < 11024
