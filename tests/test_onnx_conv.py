"""Integer convolutions exported as u8s8 GEMMs over gathered windows: exact, portable, AVX2-safe."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from dnnr_jax.io import onnx_passes
from dnnr_jax.io.export_function import _to_onnx


def _int8_conv_model(kernel, strides, padding, dilation):
  """jax2onnx's graph of an int8 x int8 -> int32 convolution, channels last."""
  def conv(codes):
    return jax.lax.conv_general_dilated(
        codes, kernel, strides, padding, rhs_dilation=dilation,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), preferred_element_type=jnp.int32)

  spec = jax.ShapeDtypeStruct((jax.export.symbolic_shape('B')[0], 9, 8, kernel.shape[2]),
                              np.int8)
  return conv, _to_onnx(conv, spec, 'conv')


def _operands(model, feeds):
  """The A and B operands of the model's MatMulInteger, as the reference evaluator computes."""
  integer = next(node for node in model.graph.node if node.op_type == 'MatMulInteger')
  probe = onnx.ModelProto.FromString(model.SerializeToString())
  probe.graph.output.extend(helper.make_empty_tensor_value_info(name)
                            for name in integer.input[:2])
  return ReferenceEvaluator(probe).run(list(integer.input[:2]), feeds)


@pytest.mark.parametrize('channels, widest, strides, padding, dilation, form', [
    (8, 64, (1, 1), 'VALID', (1, 1), 'shifted'),  # |w| <= 64: the shift alone is AVX2-safe
    (8, 127, (2, 2), 'SAME', (1, 1), 'halves'),  # wider weights: each in two halves
    (6, 127, (1, 2), ((2, 0), (1, 1)), (2, 1), 'float'),  # few channels: a float Conv
])
def test_integer_conv_is_exact_portable_and_saturation_free(
    channels, widest, strides, padding, dilation, form):
  rng = np.random.default_rng(0)
  kernel = rng.integers(-widest, widest + 1, size=(3, 2, channels, 5)).astype(np.int8)
  kernel[0, 0, :2, 0] = widest  # with codes 127 + 128 = 255: 2 * 255 * 127 saturates int16
  if form == 'float':
    kernel = np.concatenate([kernel[:, :, :5], kernel[:, :, :1]], axis=2)  # 6 channels
  conv, model = _int8_conv_model(kernel, strides, padding, dilation)
  codes = rng.integers(-128, 128, size=(4, 9, 8, channels)).astype(np.int8)
  codes[0] = 127
  codes[1] = -128  # both ends of the int8 range survive the uint8 shift and the padding
  optimized = onnx_passes.optimize(model)
  onnx.checker.check_model(optimized, full_check=True)
  operators = collections.Counter(node.op_type for node in optimized.graph.node)
  session = onnxruntime.InferenceSession(optimized.SerializeToString(),
                                         providers=['CPUExecutionProvider'])
  ours = session.run(None, {'input': codes})[0]
  expected = np.asarray(conv(codes))
  assert ours.dtype == np.int32
  np.testing.assert_array_equal(ours, expected)  # exact integers, JAX's layout
  np.testing.assert_array_equal(ReferenceEvaluator(optimized).run(None, {'input': codes})[0],
                                expected)
  assert operators['Transpose'] == (2 if form == 'float' else 0)
  if form == 'float':
    assert operators['Conv'] == 1 and operators['MatMulInteger'] == 0
    return
  assert operators['Conv'] == 0 and operators['MatMulInteger'] == 1
  activations, weights = _operands(optimized, {'input': codes})
  assert activations.dtype == np.uint8 and weights.dtype == np.int8  # u8s8, never s8s8
  # AVX2's u8s8 kernel adds pairs of products in int16: they must fit.
  assert 2 * int(activations.max()) * int(np.abs(weights.astype(np.int32)).max()) <= 32767
  taps_times_channels = 3 * 2 * channels
  assert weights.shape == ((2 if form == 'halves' else 1) * taps_times_channels, 5)
  assert activations.max() == 255  # the shifted 127 reached the GEMM


def test_convolution_of_float_inputs_is_left_alone():
  kernel = np.ones((3, 3, 2, 4), np.float32)

  def conv(x):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  spec = jax.ShapeDtypeStruct((jax.export.symbolic_shape('B')[0], 5, 5, 2), np.float32)
  optimized = onnx_passes.optimize(_to_onnx(conv, spec, 'conv'))
  operators = collections.Counter(node.op_type for node in optimized.graph.node)
  assert operators['Conv'] == 1 and operators['MatMulInteger'] == 0 and operators['Gather'] == 0
