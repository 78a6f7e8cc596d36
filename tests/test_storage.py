"""Sparse encoding round trips exactly and really shrinks."""

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnnr_jax.io import storage


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


def _variables():
  import jax

  from dnnr_jax.model import DynamicMLP, init_variables
  model = DynamicMLP(hidden_sizes=(64, 48), deep_size=32, num_classes=10)
  variables = init_variables(model, jax.random.PRNGKey(0), 40)
  kernel = np.asarray(variables['params']['trunk_0']['kernel']).copy()
  kernel[np.random.default_rng(0).random(kernel.shape) < 0.9] = 0.0
  variables['params']['trunk_0']['kernel'] = kernel
  return variables


@pytest.mark.parametrize('bits', [None, 8, 4])
def test_variables_round_trip_through_a_checkpoint(tmp_path, bits):
  import jax

  from dnnr_jax.compress.quantize import QArray, QuantSpec, quantize_params
  from dnnr_jax.config import Config, ModelConfig
  from dnnr_jax.io.checkpoint import load_model, save_checkpoint
  from tests.conftest import tree_allclose

  variables = _variables()
  if bits:
    variables['params'] = quantize_params(variables['params'], QuantSpec(bits=bits))
  config = Config(model=ModelConfig(hidden_sizes=(64, 48), deep_size=32))
  path = save_checkpoint(tmp_path / 'ckpt', variables,
                         {'kind': 'pruned', 'config': config.to_dict(), 'num_features': 40})
  loaded = load_model(path)
  tree_allclose(loaded.variables, variables, rtol=0, atol=0)
  layout = loaded.metadata['layout']
  expected = {None: 'sparse', 8: 'sparse', 4: 'sparse'}[bits]
  assert layout['params/trunk_0/kernel']['encoding'] == expected
  if bits == 4:
    assert layout['params/trunk_1/kernel']['encoding'] == 'int4'
    assert isinstance(loaded.variables['params']['head']['kernel'], QArray)
  inputs = np.random.default_rng(1).normal(size=(5, 40)).astype(np.float32)
  np.testing.assert_array_equal(loaded.predict(inputs),
                                np.asarray(jax.jit(loaded.model.apply)(variables, inputs)[0]))


def test_sparse_int8_checkpoint_is_much_smaller_on_disk(tmp_path):
  import jax

  from dnnr_jax.compress.prune import apply_masks, magnitude_masks
  from dnnr_jax.compress.quantize import QuantSpec, quantize_params
  from dnnr_jax.config import Config
  from dnnr_jax.io.checkpoint import save_checkpoint
  from dnnr_jax.model import DynamicMLP, init_variables

  # The default MNIST widths: fixed Orbax overhead would swamp a toy model.
  variables = init_variables(DynamicMLP(), jax.random.PRNGKey(0), 784)
  metadata = {'kind': 'final', 'config': Config().to_dict(), 'num_features': 784}
  dense = save_checkpoint(tmp_path / 'dense', variables, metadata)
  params = apply_masks(variables['params'], magnitude_masks(variables['params'], 0.9))
  compact = save_checkpoint(tmp_path / 'compact', {
      **variables, 'params': quantize_params(params, QuantSpec(bits=8))}, metadata)
  # 90% sparse int8: ~2 bytes per kept weight against 4 per weight.
  assert storage.directory_bytes(compact) < storage.directory_bytes(dense) / 10
  assert storage.gzip_bytes(compact) < storage.gzip_bytes(dense) / 10


def test_a_fully_pruned_model_round_trips(tmp_path):
  import jax

  from dnnr_jax.config import Config, ModelConfig
  from dnnr_jax.io.checkpoint import load_model, save_checkpoint
  from tests.conftest import tree_allclose

  variables = jax.tree.map(np.zeros_like, _variables())
  config = Config(model=ModelConfig(hidden_sizes=(64, 48), deep_size=32))
  path = save_checkpoint(tmp_path / 'zeros', variables,
                         {'kind': 'pruned', 'config': config.to_dict(), 'num_features': 40})
  tree_allclose(load_model(path).variables, variables, rtol=0, atol=0)


def test_arrays_keep_the_model_tree_with_named_encodings():
  from dnnr_jax.compress.quantize import QuantSpec, quantize_params

  variables = _variables()
  variables['params'] = quantize_params(variables['params'], QuantSpec(bits=4))
  arrays, layout = storage.encode_variables(variables)
  assert sorted(arrays) == ['params', 'thresholds']
  assert arrays['thresholds']['entropy'].shape == ()
  # trunk_0 is 90 % zeros: sparse codes; trunk_1 dense: int4 codes, two per byte.
  assert sorted(arrays['params']['trunk_0']['kernel']) == ['gaps', 'scale', 'values']
  assert sorted(arrays['params']['trunk_1']['kernel']) == ['packed', 'scale']
  assert arrays['params']['trunk_1']['kernel']['packed'].shape == (64 * 48 // 2,)
  assert arrays['params']['trunk_1']['bias'].dtype == np.float16  # zeros
  assert layout['params/trunk_1/kernel']['encoding'] == 'int4'


def test_uncompacted_arrays_are_the_variables_themselves():
  import jax

  variables = _variables()
  arrays, layout = storage.encode_variables(variables, compact=False)
  assert jax.tree.structure(arrays) == jax.tree.structure(variables)
  for leaf, original in zip(jax.tree.leaves(arrays), jax.tree.leaves(variables), strict=True):
    assert leaf is original
  assert {spec['encoding'] for spec in layout.values()} == {'dense'}


def test_blob_formats_pack_one_blob_per_dtype():
  from dnnr_jax.compress.quantize import QuantSpec, quantize_params

  variables = _variables()
  variables['params'] = quantize_params(variables['params'], QuantSpec(bits=8))
  blobs, layout = storage.encode_blobs(variables)
  # The float16-exact scales, zero biases and thresholds share one float16 blob.
  assert sorted(blobs) == ['float16', 'int8', 'uint8']
  assert all(blob.ndim == 1 for blob in blobs.values())
  assert len(layout) == 13  # 5 kernels, 5 biases, 3 thresholds


def test_float32_arrays_float16_holds_are_stored_in_two_bytes_exactly():
  from dnnr_jax.compress.quantize import float16_round

  rng = np.random.default_rng(0)
  # Tiny biases too: rounded into float16's subnormal range, they need no float32.
  biases = rng.normal(size=(16,)).astype(np.float32) * np.logspace(-9, 0, 16, dtype=np.float32)
  variables = {'exact': np.asarray(float16_round(biases)),
               'inexact': (rng.normal(size=(16,)) * np.pi).astype(np.float32),
               'nan': np.array([0.5, np.nan], np.float32)}
  blobs, layout = storage.encode_variables(variables)
  assert layout['exact']['arrays']['dense'][1] == 'float16'
  assert layout['inexact']['arrays']['dense'][1] == 'float32'
  assert layout['nan']['arrays']['dense'][1] == 'float32'
  decoded = storage.decode_variables(blobs, layout)
  for name, array in variables.items():
    assert decoded[name].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(decoded[name]), array)


@pytest.mark.parametrize('bits', [None, 8, 4])
def test_compact_layout_expands_to_the_layout_exactly(bits):
  import json

  from dnnr_jax.compress import quantize
  from dnnr_jax.compress.quantize import QuantSpec, quantize_params
  from tests.conftest import tree_allclose

  variables = _variables()
  if bits:
    variables['params'] = quantize_params(variables['params'], QuantSpec(bits=bits))
    # An asymmetric leaf carries a zero point too.
    variables['params']['head']['kernel'] = quantize.quantize(
        np.asarray(_variables()['params']['head']['kernel']), bits=bits, symmetric=False)
  blobs, layout = storage.encode_blobs(variables)
  rows = json.loads(json.dumps(storage.compact_layout(layout)))
  assert storage.expand_layout(rows) == layout
  tree_allclose(storage.decode_blobs(blobs, storage.expand_layout(rows)), variables,
                rtol=0, atol=0)
  arrays, layout = storage.encode_variables(variables)
  rows = json.loads(json.dumps(storage.compact_layout(layout)))
  tree_allclose(storage.decode_variables(arrays, storage.expand_layout(rows)), variables,
                rtol=0, atol=0)


@pytest.mark.parametrize('rows', [None, 'layout', [['params/x', 'float32', [2]]],
                                  [['p', 'float32', [2], 'dense', [['dense', 'float32', 2]]]]])
def test_expand_layout_rejects_what_is_not_a_compact_layout(rows):
  with pytest.raises(ValueError, match='not a compact layout'):
    storage.expand_layout(rows)
