"""Per-batch activation quantization: ONNX's `DynamicQuantizeLinear` in JAX, exported in
the form onnxruntime fuses (`compress.quantize.quantize_batch`, `io.onnx_batch_quant`)."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from dnnr_jax.compress import layers, quantize
from dnnr_jax.compress.rules import Rule, check_rules
from dnnr_jax.config import QuantizeConfig
from dnnr_jax.errors import ConfigError, QuantizationError
from dnnr_jax.io import checkpoint as checkpoint_lib
from dnnr_jax.io.data import load_dataset
from dnnr_jax.io.export import export_onnx
from dnnr_jax.jobs import compress as compress_jobs
from tests.test_quantized_parity import _final


def _dynamic_quantize_linear():
  """onnxruntime's `DynamicQuantizeLinear` alone, as a function of a float array."""
  graph = helper.make_graph(
      [helper.make_node('DynamicQuantizeLinear', ['x'], ['codes', 'scale', 'zero_point'])],
      'dql', [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['B', 'F'])],
      [helper.make_tensor_value_info('codes', TensorProto.UINT8, None),
       helper.make_tensor_value_info('scale', TensorProto.FLOAT, None),
       helper.make_tensor_value_info('zero_point', TensorProto.UINT8, None)])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 21)])
  model.ir_version = 10
  session = onnxruntime.InferenceSession(model.SerializeToString(),
                                         providers=['CPUExecutionProvider'])
  return lambda x: session.run(None, {'x': x})


def test_quantize_batch_is_dynamic_quantize_linear_bit_for_bit():
  onnx_quantize, jitted = _dynamic_quantize_linear(), jax.jit(quantize.quantize_batch)
  rng = np.random.default_rng(0)
  cases = [np.zeros((3, 5)), -np.ones((2, 4)), np.full((1, 6), 2.5),
           np.array([[-1.0, 0.5, 254.0 / 255 * 3]])]  # zero range, all below 0, all above
  for scale in (1e-3, 1.0, 40.0):
    cases.append(rng.normal(size=(64, 128)) * scale)
    cases.append(np.maximum(rng.normal(size=(7, 256)) * scale, 0))  # a ReLU's outputs
    cases.append(np.round(rng.normal(size=(16, 32)) * 8) / 8 * scale)  # many ties
  for x in cases:
    x = x.astype(np.float32)
    expected = onnx_quantize(x)
    for got in (jitted(x), quantize.quantize_batch(x)):
      for want, value in zip(expected, got, strict=True):
        assert np.asarray(value).dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(value), want)
  codes, scale, zero_point = jitted(np.zeros((2, 3), np.float32))
  assert float(scale) == 1.0 and int(zero_point) == 0 and not np.any(np.asarray(codes))


def test_batch_int8_matmul_is_the_dequantized_product():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(9, 40)).astype(np.float32)
  q = quantize.quantize(rng.normal(size=(40, 6)), bits=8, axis=-1)
  codes, scale, zero_point = quantize.quantize_batch(x)
  centred = np.asarray(codes, np.int64) - int(zero_point)
  expected = (centred @ np.asarray(q.value, np.int64)).astype(np.float32) * (
      np.float32(scale) * np.asarray(q.scale))
  got = jax.jit(quantize.batch_int8_matmul)(x, q)
  np.testing.assert_array_equal(np.asarray(got), expected)
  # One batch, one scale: a row's result depends on the rows beside it.
  alone = np.asarray(quantize.batch_int8_matmul(x[:1], q))
  assert not np.array_equal(alone, np.asarray(got)[:1])


def test_per_batch_is_a_dynamic_setting_with_one_sentence_errors():
  assert check_rules([Rule(activations='per_batch'), Rule(mode='qat', activations='per_batch')])
  with pytest.raises(QuantizationError, match="activations 'per_tensor'; pass one of"):
    check_rules([Rule(activations='per_tensor')])
  with pytest.raises(QuantizationError, match='only modes dynamic and qat use'):
    check_rules([Rule(mode='static', activations='per_batch')])
  QuantizeConfig(mode='qat', activations='per_batch').validate()
  with pytest.raises(ConfigError, match='compress.quantize.activations'):
    QuantizeConfig(activations='per_example').validate()
  with pytest.raises(ConfigError, match='set it to per_row'):
    QuantizeConfig(mode='weight_only', activations='per_batch').validate()
  conv = layers.LayerSpec('conv', kernel_size=(3, 3), strides=(1, 1), dilation=(1, 1))
  kernel = quantize.quantize(jnp.ones((3, 3, 2, 4)), bits=8, axis=-1)
  with pytest.raises(QuantizationError, match='Dense layers only'):
    layers.forward(conv, 'dynamic', kernel, None, jnp.ones((1, 5, 5, 2)),
                   activations='per_batch')


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """A smoke model quantized four ways, each exported: 8- and 7-bit dynamic and 4-bit QAT per
  batch, and 7-bit dynamic per row."""
  root = tmp_path_factory.mktemp('batch_quant')
  source = _final(root / 'models', [])
  loaded = checkpoint_lib.load_model(source)
  images = np.asarray(load_dataset(loaded.config.data).test.images[:64])
  runs = {}
  for index, (name, settings) in enumerate({
      'dynamic': QuantizeConfig(mode='dynamic', bits=8, activations='per_batch'),
      'qat': QuantizeConfig(mode='qat', bits=4, activations='per_batch', finetune_epochs=1),
      'dynamic_7': QuantizeConfig(mode='dynamic', bits=7, activations='per_batch'),
      'per_row_7': QuantizeConfig(mode='dynamic', bits=7, activations='per_row')}.items()):
    result = compress_jobs.quantize_checkpoint(source, settings, version=f'1.{index}')
    output, report = export_onnx(result.path, output=root / f'{index}.onnx',
                                 check_inputs=images)
    runs[name] = result.path, output, report
  return runs, images


@pytest.mark.parametrize('mode', ['dynamic', 'qat', 'dynamic_7'])
def test_the_export_is_quantize_dynamics_form_and_equals_jax(exported, mode, tmp_path):
  runs, images = exported
  path, output, report = runs[mode]
  loaded = checkpoint_lib.load_model(path)
  assert loaded.metadata['quantization']['activations'] == 'per_batch'
  assert {rule.activations for rule in loaded.model.quantization} == {'per_batch'}
  model = onnx.load(output)
  onnx.checker.check_model(model, full_check=True)
  ops = collections.Counter(node.op_type for node in model.graph.node)
  # Trunk 2, deep + shortcut (one input: one quantization), head; no traced min/max.
  assert ops['DynamicQuantizeLinear'] == 4 and ops['MatMulInteger'] == 5
  assert 'ReduceMin' not in ops and all(not node.domain for node in model.graph.node)
  assert report['reference_evaluator']
  options = onnxruntime.SessionOptions()
  options.optimized_model_filepath = str(tmp_path / 'optimized.onnx')
  session = onnxruntime.InferenceSession(str(output), options,
                                         providers=['CPUExecutionProvider'])
  fused = collections.Counter(node.op_type for node in onnx.load(
      options.optimized_model_filepath).graph.node)
  # onnxruntime fuses each layer into one of its int8 kernels, as quantize_dynamic's.
  assert fused['DynamicQuantizeMatMul'] + fused['MatMulIntegerToFloat'] == 5
  assert 'MatMulInteger' not in fused
  for rows in (1, 7, 64):
    logits, routes = jax.jit(loaded.model.apply)(loaded.variables, images[:rows])
    onnx_logits, onnx_routes = session.run(None, {'input': images[:rows]})
    np.testing.assert_array_equal(onnx_routes, np.asarray(routes))
    np.testing.assert_allclose(onnx_logits, np.asarray(logits), rtol=0,
                               atol=1e-5 * np.max(np.abs(logits)))


def test_wide_weights_go_in_unsigned_so_no_cpu_saturates(exported):
  """8-bit weights are u8u8 (w + 128, zero point 128); 7- and 4-bit ones u8s8 within AVX2's
  int16 pairs, per batch and per row (signed codes + 128 against one kernel, no halves)."""
  runs, images = exported
  for name, unsigned_layers in (('dynamic', 5), ('qat', 0), ('dynamic_7', 0), ('per_row_7', 0)):
    model = onnx.load(runs[name][1])
    assert not any(node.op_type == 'Concat' and 'activations_twice' in node.name
                   for node in model.graph.node)
    integers = [node for node in model.graph.node if node.op_type == 'MatMulInteger']
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.extend(helper.make_empty_tensor_value_info(node.input[1])
                              for node in integers)
    weights = ReferenceEvaluator(probe).run([node.input[1] for node in integers],
                                            {'input': images[:1]})
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    assert sum(value.dtype == np.uint8 for value in weights) == unsigned_layers
    for node, value in zip(integers, weights, strict=True):
      if value.dtype == np.uint8:  # u8u8: x86 kernels add its products in int32
        assert len(node.input) == 4 and int(constants[node.input[3]]) == 128
        assert np.max(np.abs(value.astype(np.int32) - 128)) > 64
      else:  # u8s8: AVX2 adds pairs of uint8 x int8 products in int16, which must fit
        assert value.dtype == np.int8 and len(node.input) <= 3  # no weight zero point
        assert 2 * 255 * int(np.max(np.abs(value.astype(np.int32)))) <= 32767
