"""Sparse encoding round trips exactly and really shrinks."""

import json

import brotli
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnnr_jax.io import layout as layout_lib
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


@pytest.mark.parametrize('bits', [None, 8, 7, 4])
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
  expected = {None: 'sparse', 8: 'sparse', 7: 'sparse', 4: 'sparse'}[bits]
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


def test_a_compressed_model_is_one_coded_leaf_of_all_its_streams():
  from dnnr_jax.compress.quantize import QuantSpec, quantize_params
  from dnnr_jax.io import entropy

  variables = _variables()
  variables['params'] = quantize_params(variables['params'], QuantSpec(bits=4))
  arrays, layout = storage.encode_variables(variables)
  # Format 8: every array of every leaf, thresholds included, in one Brotli stream.
  assert sorted(arrays) == [storage.CODED]
  coded = arrays[storage.CODED]
  assert coded.dtype == np.uint8 and {spec['stream'] for spec in layout.values()} == {coded.size}
  # trunk_0 is 90 % zeros: sparse codes; trunk_1 dense: int4 codes, two per byte.
  assert list(layout['params/trunk_0/kernel']['arrays']) == ['gaps', 'values', 'scale']
  assert list(layout['params/trunk_1/kernel']['arrays']) == ['packed', 'scale']
  assert layout['params/trunk_1/kernel']['arrays']['packed'][0] == [64 * 48 // 2]
  assert layout['params/trunk_1/bias']['arrays']['dense'][1] == 'float16'  # zeros
  # The stream is the arrays' bytes in layout order, and decodes to them exactly.
  entries, _ = storage.encode_leaves(variables)
  raw = b''.join(entropy.stream_bytes(array) for path in layout
                 for array in entries[path].values())
  assert brotli.decompress(coded.tobytes()) == raw
  assert coded.size < len(raw)  # random int4 codes: little to gain, but never more
  from tests.conftest import tree_allclose
  tree_allclose(storage.decode_variables(arrays, layout), variables, rtol=0, atol=0)


def test_a_damaged_stream_is_a_value_error():
  from dnnr_jax.compress.quantize import QuantSpec, quantize_params

  variables = _variables()
  variables['params'] = quantize_params(variables['params'], QuantSpec(bits=4))
  arrays, layout = storage.encode_variables(variables)
  damaged = arrays[storage.CODED].copy()
  damaged[len(damaged) // 2:] ^= 0x5A
  with pytest.raises(ValueError, match='does not decode'):
    storage.decode_variables({storage.CODED: damaged}, layout)
  with pytest.raises(ValueError, match='does not decode'):
    storage.decode_variables({storage.CODED: arrays[storage.CODED][:-3]}, layout)


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
  # Format 8's layout: one string per leaf.
  arrays, layout = storage.encode_variables(variables)
  stored = json.loads(json.dumps(layout_lib.pack_layout(layout)))
  assert layout_lib.unpack_layout(stored) == layout
  tree_allclose(storage.decode_variables(arrays, layout_lib.unpack_layout(stored)), variables,
                rtol=0, atol=0)


@pytest.mark.parametrize('rows', [None, 'layout', [['params/x', 'float32', [2]]],
                                  [['p', 'float32', [2], 'dense', [['dense', 'float32', 2]]]]])
def test_expand_layout_rejects_what_is_not_a_compact_layout(rows):
  with pytest.raises(ValueError, match='not a compact layout'):
    storage.expand_layout(rows)


@pytest.mark.parametrize('stored', [
    None, [], {'leaves': 'x'}, {'leaves': [['p', 'k f4 [2] dense']]},  # no arrays
    {'leaves': [['p', 'k f4 [2] dense dense=f4', 'k f4 [2] dense dense=f4']]},  # twice
    {'leaves': [['p']]}, {'leaves': [['', ' f4 [2] dense dense=f4']]},  # no leaf, no path
    {'leaves': [['p', 'k f4 [2,] dense dense=f4']]}, {'leaves': [['p', 'k f4 [2] rle dense=f4']]},
    {'leaves': [['p', 'k nope [2] dense dense=f4']]}, {'leaves': [['p', 'k f4 [2] dense x']]},
    {'leaves': [[1, 'k f4 [2] dense dense=f4']]},
    {'entropy_coded': -1, 'leaves': [['p', 'k f4 [2] dense dense=f4']]},
], ids=lambda stored: json.dumps(stored)[:40])
def test_unpack_layout_rejects_what_is_not_a_format_8_layout(stored):
  with pytest.raises(ValueError, match='not a format-8 layout'):
    layout_lib.unpack_layout(stored)


def test_the_format_8_layout_keeps_any_path_plain_leaves_and_stream_offsets():
  def dense(shape, stored, offset, **more):
    return {'kind': 'array', 'shape': shape, 'dtype': 'float32', 'encoding': 'dense',
            'arrays': {'dense': [shape, stored, offset]}, **more}

  layout = {
      'a b/c d': dense([2], 'float16', 0, stream=10),  # names with spaces: a row of its own
      'x': dense([], 'float32', 4, stream=10),  # a leaf at the root
      'p/q/': dense([3], 'float32', 0),  # an empty name, stored beside the stream
      'p/q/k': {'kind': 'qarray', 'shape': [4, 2], 'dtype': 'int8', 'encoding': 'int4',
                'arrays': {'packed': [[4], 'int8', 8], 'scale': [[1, 2], 'float16', 12]},
                'bits': 4, 'axis': -1, 'symmetric': False, 'stream': 10},
  }
  stored = json.loads(json.dumps(layout_lib.pack_layout(layout)))
  assert stored['leaves'][-1] == ['p/q', 'k i1 [4,2] int4 q4,-1,a packed=i1[4] scale=f2[1,2]']
  assert ' plain ' in stored['leaves'][2][1]
  assert layout_lib.unpack_layout(stored) == layout


def test_lean_metadata_leaves_out_copies_and_full_puts_them_back():
  from dnnr_jax.io import lean_metadata

  metadata = {
      'config': {'data': {'mean': 0.13, 'std': 0.31}},
      'dataset': {'name': 'mnist', 'normalisation': {'mean': 0.13, 'std': 0.31}},
      'compression': {'mode': 'qat', 'bits': 4, 'per_channel': True},
      'quantization': {'mode': 'qat', 'bits': 4},
      'metrics': {'validation_before': {'accuracy': 0.98}, 'validation': {'accuracy': 0.97}},
      'accuracy_guard': {'split': 'validation', 'accuracy_before': 0.98, 'accuracy': 0.97,
                         'drop_pp': 1.0}}
  lean = lean_metadata.lean(metadata)
  assert 'quantization' not in lean and 'normalisation' not in lean['dataset']
  assert lean['accuracy_guard'] == {'split': 'validation', 'drop_pp': 1.0}
  assert lean_metadata.full(lean) == metadata
  # A copy that differs from its source stays; one absent although derivable is stored as null.
  activations = {**metadata, 'quantization': {'mode': 'qat', 'bits': 4, 'activations': 'x'}}
  assert lean_metadata.lean(activations)['quantization'] == activations['quantization']
  absent = {key: value for key, value in metadata.items() if key != 'quantization'}
  assert lean_metadata.lean(absent)['quantization'] is None
  assert lean_metadata.full(lean_metadata.lean(absent)) == absent
  # A guard without a validation split keeps its nulls.
  unjudged = {'metrics': {}, 'accuracy_guard': {'accuracy_before': None, 'accuracy': None}}
  assert lean_metadata.full(lean_metadata.lean(unjudged)) == unjudged


def _tree(kernel, bias=None):
  return {'layer': {'kernel': kernel, 'bias': np.zeros(3, np.float32) if bias is None else bias}}


def _cases():
  from dnnr_jax.compress import quantize

  rng = np.random.default_rng(3)
  sparse = rng.normal(size=(37, 29)).astype(np.float32)
  sparse[rng.random(sparse.shape) < 0.93] = 0.0
  odd = rng.normal(size=(13, 7)).astype(np.float32)
  return {
      'float32 sparse, odd sizes': _tree(sparse, rng.normal(size=29).astype(np.float32)),
      'all-zero kernel': _tree(np.zeros((300, 5), np.float32)),
      'empty kernel beside a sparse one': {'layer': {
          'kernel': sparse, 'empty': np.zeros((0, 4), np.float32), 'bias': odd[0]}},
      'int4 packed, odd count': _tree(quantize.quantize(odd, bits=4, axis=-1)),
      'int4 sparse': _tree(quantize.quantize(sparse, bits=4, axis=-1)),
      'int8 asymmetric': _tree(quantize.quantize(odd, bits=8, axis=-1, symmetric=False)),
      'all-zero int8': _tree(quantize.quantize(np.zeros((9, 3), np.float32), bits=8)),
  }


@pytest.mark.parametrize('name', list(_cases()))
def test_coded_layers_round_trip_bit_exactly(name):
  import json

  from tests.conftest import tree_allclose

  variables = _cases()[name]
  arrays, layout = storage.encode_variables(variables)
  assert list(arrays) == [storage.CODED]
  stored = json.loads(json.dumps(layout_lib.pack_layout(layout)))
  assert layout_lib.unpack_layout(stored).keys() == layout.keys()
  decoded = storage.decode_variables(arrays, layout_lib.unpack_layout(stored))
  tree_allclose(decoded, variables, rtol=0, atol=0)
  for left, right in zip(jax_leaves(decoded), jax_leaves(variables), strict=True):
    assert left.dtype == right.dtype and left.shape == right.shape
  abstract = storage.abstract_variables(layout_lib.unpack_layout(stored))
  assert abstract[storage.CODED].shape == arrays[storage.CODED].shape


def jax_leaves(tree):
  import jax

  return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


@pytest.mark.parametrize('damage', ['flip', 'truncate', 'swap'])
def test_a_damaged_coded_leaf_does_not_decode(damage):
  variables = _cases()['int4 sparse']
  arrays, layout = storage.encode_variables(variables)
  coded = arrays[storage.CODED].copy()
  assert coded.size < sum(np.prod(shape) * np.dtype(dtype).itemsize for spec in layout.values()
                          for shape, dtype, _ in spec['arrays'].values())  # coded, not raw
  if damage == 'flip':  # inside the stream
    coded[coded.size // 2] ^= 0x5a
  elif damage == 'truncate':  # the stream cut short, the layout told so too
    coded = coded[:-1]
    for spec in layout.values():
      spec['stream'] -= 1
  else:  # the bytes shifted
    coded = np.roll(coded, 7)
  with pytest.raises(ValueError):
    storage.decode_variables({storage.CODED: coded}, layout)


def test_a_layer_whose_names_would_clash_keeps_named_leaves():
  from tests.conftest import tree_allclose

  kernel = np.zeros((30, 30), np.float32)
  kernel[0, 0] = 1.0
  variables = {'layer': {'kernel': kernel}, storage.CODED: {'kernel': kernel}}
  arrays, layout = storage.encode_variables(variables)
  assert sorted(arrays['layer']['kernel']) == ['gaps', 'values']  # format 5's named leaves
  assert sorted(arrays[storage.CODED]['kernel']) == ['gaps', 'values']
  assert not any('stream' in spec for spec in layout.values())
  tree_allclose(storage.decode_variables(arrays, layout), variables, rtol=0, atol=0)


def test_a_large_stream_is_coded_fast_and_round_trips():
  from dnnr_jax.io import entropy

  rng = np.random.default_rng(0)
  large = rng.geometric(0.2, size=entropy.LARGE_STREAM + 1).astype(np.uint8)
  small = large[:1000].astype(np.float32)
  coded, lengths = entropy.encode_frames([large, small])
  assert lengths[0] < 0.6 * large.nbytes
  decoded = entropy.decode_frames(coded, [('uint8', large.shape, lengths[0]),
                                          ('float32', small.shape, lengths[1])])
  np.testing.assert_array_equal(decoded[0], large)
  np.testing.assert_array_equal(decoded[1], small)
  assert decoded[1].dtype == np.float32
