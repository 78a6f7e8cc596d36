"""Static int8 convolutions: uint8 codes in and out, exported as QLinearConv, equal to JAX."""

import flax.linen as nn
import jax
import numpy as np
import onnx
import onnxruntime
import pytest
from flax import nnx
from onnx import numpy_helper

import dnnr_jax
from dnnr_jax import compress
from dnnr_jax.compress import static_conv

# Two convolutions, no dense head: the dense layers' dynamic export (x / scale in
# QuantizeLinear, x · (1 / scale) in JAX) may round a tie apart; these must not.
RULES = [compress.Rule('Conv_.*', mode='static')]


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(8, (3, 3), padding=2, kernel_dilation=2)(x))
    return x.reshape(x.shape[0], -1)


class NnxCNN(nnx.Module):
  def __init__(self, rngs):
    self.Conv_0 = nnx.Conv(2, 4, (3, 3), strides=2, rngs=rngs)
    self.Conv_1 = nnx.Conv(4, 8, (3, 3), padding=2, kernel_dilation=2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.Conv_1(nnx.relu(self.Conv_0(x))))
    return x.reshape(x.shape[0], -1)


@pytest.fixture(scope='module')
def linen():
  """The model, float params, int8 params, calibration and the jitted static apply."""
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(64, 12, 12, 2)).astype(np.float32)  # signed: input zero point > 0
  model = LinenCNN()
  params = model.init(jax.random.key(0), inputs)['params']
  quantized = compress.quantize_linen(model, params, RULES, inputs)
  scales = compress.calibrate_linen(model, params, RULES, [inputs[:32], inputs[32:]])
  apply = compress.quantized_apply(model, RULES, scales)
  return model, params, quantized, scales, apply, inputs


def test_static_conv_equals_numpy_integers(linen):
  """The first convolution: uint8 codes, int32 sums and requantization as NumPy does them."""
  _, params, quantized, scales, _, inputs = linen
  conv = scales['Conv_0']
  assert isinstance(conv, static_conv.StaticConv) and 0 < float(conv.input_zero) < 255
  second = scales['Conv_1']  # its input is ReLU(Conv_0): Conv_0's output grid, shared
  assert float(second.input_zero) == float(conv.output_zero) > 0
  assert np.float32(second.input_inverse) == np.float32(1) / np.float32(conv.output_scale)
  kernel = quantized['Conv_0']['kernel']
  spec = compress.layers.LayerSpec('conv', kernel_size=(3, 3), strides=(2, 2),
                                   dilation=(1, 1), padding='SAME')
  ours = jax.jit(lambda x: static_conv.forward(spec, kernel, conv, x))(inputs)
  codes = np.clip(np.round(inputs * np.float32(conv.input_inverse)) + conv.input_zero, 0, 255)
  centered = np.pad((codes - conv.input_zero).astype(np.int64), ((0, 0), (0, 1), (0, 1), (0, 0)))
  windows = np.stack([centered[:, i:i + 12:2, j:j + 12:2] for i in range(3) for j in range(3)], 3)
  weights = np.asarray(kernel.value, np.int64).reshape(9, 2, 4)
  accumulator = np.einsum('bhwtc,tco->bhwo', windows, weights) + np.asarray(conv.bias_codes)
  assert np.abs(accumulator).max() < 2 ** 24  # float32(acc) exact, as onnxruntime's
  requantized = np.clip(np.round(accumulator.astype(np.float32) * np.asarray(conv.multiplier))
                        + conv.output_zero, 0, 255)
  expected = (requantized - conv.output_zero) * np.float32(conv.output_scale)
  np.testing.assert_array_equal(np.asarray(ours), expected.astype(np.float32))
  # The int32 bias is the float bias on the accumulator's grid.
  step = np.asarray(kernel.scale).reshape(-1) / np.float32(conv.input_inverse)
  np.testing.assert_allclose(np.asarray(conv.bias_codes) * step, params['Conv_0']['bias'],
                             atol=float(step.max()))


def test_export_is_qlinear_conv_and_equals_jax(linen, tmp_path):
  model, params, quantized, _, apply, inputs = linen
  path, check = dnnr_jax.export_onnx_function(
      tmp_path / 'static.onnx', lambda p, x: apply({'params': p}, x), quantized, inputs[:8],
      check_inputs=inputs)
  graph = onnx.load(path)
  onnx.checker.check_model(graph, full_check=True)
  ops = [node.op_type for node in graph.graph.node]
  assert ops.count('QLinearConv') == 2 and 'Conv' not in ops and 'ConvInteger' not in ops
  # The second convolution reads the first one's codes floored at their zero point (one
  # Clip: it shares that grid, its input being their ReLU); the first quantizes the input,
  # the second's output is dequantized (then the model's last ReLU).
  assert ops.count('QuantizeLinear') == ops.count('DequantizeLinear') == 1
  assert ops.count('Clip') == ops.count('Relu') == 1
  # 8-bit kernels go in as uint8 w + 128, zero point 128: AVX2's uint8 x int8 kernel adds
  # pairs of products in int16 (2 * 255 * 127 saturates), its uint8 x uint8 one in int32.
  initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.graph.initializer}
  for conv in (node for node in graph.graph.node if node.op_type == 'QLinearConv'):
    assert initializers[conv.input[5]].dtype == np.uint8
    assert np.all(initializers[conv.input[5]] == 128)
    shifted = next(node for node in graph.graph.node if node.output[0] == conv.input[3])
    assert shifted.op_type == 'Cast' and shifted.attribute[0].i == onnx.TensorProto.UINT8
  session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
  ours = jax.jit(lambda x: apply({'params': quantized}, x))(inputs)
  # Exact: the same codes at every layer, the same float32 operations after them.
  np.testing.assert_array_equal(session.run(None, {'input': inputs})[0], np.asarray(ours))
  assert check['max_abs_difference'] == 0.0
  reference = model.apply({'params': params}, inputs)
  assert 0 < float(np.abs(ours - reference).max()) < 0.05 * float(np.abs(reference).max())


def test_nnx_static_conv_equals_linen(linen, tmp_path):
  _, params, linen_params, scales, apply, inputs = linen
  model = NnxCNN(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, params)
  model = nnx.merge(graphdef, state)
  nnx_scales = compress.calibrate_nnx(model, RULES, [inputs[:32], inputs[32:]])
  assert isinstance(nnx_scales['Conv_1'], static_conv.StaticConv)
  for name in ('Conv_0', 'Conv_1'):
    for ours, theirs in zip(jax.tree.leaves(nnx_scales[name]), jax.tree.leaves(scales[name]),
                            strict=True):
      np.testing.assert_array_equal(ours, theirs)
  quantized = compress.quantize_nnx(model, RULES, nnx_scales)
  linen_out = jax.jit(lambda x: apply({'params': linen_params}, x))(inputs)
  np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(quantized, inputs)),
                                np.asarray(linen_out))
  graph, state = nnx.split(quantized)
  path, _ = dnnr_jax.export_onnx_function(  # its ReLU is lowered as Max(x, 0): the same Clip
      tmp_path / 'nnx.onnx', lambda s, x: nnx.merge(graph, s)(x), state, inputs[:8])
  ops = [node.op_type for node in onnx.load(path).graph.node]
  assert ops.count('QLinearConv') == 2 and ops.count('Clip') == ops.count('QuantizeLinear') == 1
  session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
  np.testing.assert_array_equal(session.run(None, {'input': inputs})[0], np.asarray(linen_out))
