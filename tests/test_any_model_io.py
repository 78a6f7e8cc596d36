"""A user's CNN pruned and quantized: N:M on conv kernels, saved compact, exported to ONNX."""

import collections

import flax.linen as nn
import jax
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx.reference import ReferenceEvaluator

import dnnr_jax
from dnnr_jax import compress
from dnnr_jax.errors import CheckpointError, DnnrError


class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope='module')
def compressed():
  model = TinyCNN()
  inputs = jax.random.normal(jax.random.key(1), (64, 8, 8, 1))
  params = model.init(jax.random.key(0), inputs)['params']
  pruned = compress.apply_masks(params, compress.magnitude_masks(params, 0.9))
  rules = [compress.Rule('.*', mode='dynamic')]
  return model, inputs, params, compress.quantize_linen(model, pruned, rules, inputs), rules


def test_nm_groups_conv_kernels_along_input_channels():
  kernel = np.random.default_rng(0).normal(size=(3, 3, 8, 5)).astype(np.float32)
  keep = np.asarray(compress.nm_masks({'conv': {'kernel': kernel}}, 2, 4)['conv']['kernel'])
  groups = keep.reshape(3, 3, 2, 4, 5)  # [kh, kw, in / m, m, out]
  np.testing.assert_array_equal(groups.sum(axis=3), 2)
  best = np.argsort(np.abs(kernel.reshape(3, 3, 2, 4, 5)), axis=3)[:, :, :, 2:]
  np.testing.assert_array_equal(np.take_along_axis(groups, best, axis=3), True)


def test_save_load_round_trip_and_size(compressed, tmp_path):
  _, _, params, quantized, _ = compressed
  report = dnnr_jax.save_params(tmp_path / 'cnn', quantized)
  restored = dnnr_jax.load_params(tmp_path / 'cnn')
  assert jax.tree.structure(restored) == jax.tree.structure(quantized)
  for left, right in zip(jax.tree.leaves(restored), jax.tree.leaves(quantized), strict=True):
    np.testing.assert_array_equal(left, right)
  assert report.dense_bytes == 4 * sum(leaf.size for leaf in jax.tree.leaves(params))
  assert report.ratio == report.dense_bytes / report.bytes_on_disk
  dense = dnnr_jax.save_params(tmp_path / 'dense', params)
  assert report.bytes_on_disk < dense.bytes_on_disk
  with pytest.raises(CheckpointError, match='already exists|overwrite'):
    dnnr_jax.save_params(tmp_path / 'cnn', quantized)


def test_export_int8_equals_jax_in_onnxruntime(compressed, tmp_path):
  model, inputs, _, quantized, rules = compressed
  apply = compress.quantized_apply(model, rules)
  path, report = dnnr_jax.export_onnx_function(
      tmp_path / 'cnn.onnx', lambda p, x: apply({'params': p}, x), quantized,
      np.asarray(inputs))
  assert report['argmax_agreement'] == 1.0 and report['rows'] == 64
  exported = onnx.load(path)
  onnx.checker.check_model(exported, full_check=True)
  ops = collections.Counter(node.op_type for node in exported.graph.node)
  # The one-channel first Conv runs in float on the codes, the second as a u8s8 GEMM
  # over gathered windows, the Dense as a u8s8 MatMulInteger.
  assert ops['MatMulInteger'] == 2 and ops['Conv'] == 1 and ops['Gather'] >= 1
  batch = np.asarray(inputs[:7])
  session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
  np.testing.assert_allclose(ReferenceEvaluator(exported).run(None, {'input': batch})[0],
                             session.run(None, {'input': batch})[0], rtol=1e-6, atol=1e-6)
  with pytest.raises(DnnrError, match='new .onnx file'):
    dnnr_jax.export_onnx_function(path, lambda p, x: apply({'params': p}, x), quantized,
                                  np.asarray(inputs))
