"""Graph rewrites keep outputs exact and remove only what is redundant."""

import collections

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from dnnr_jax.io import onnx_passes


def _model(nodes, inputs, outputs, initializers=()):
  graph = helper.make_graph(nodes, 'g', inputs, outputs, list(initializers))
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 21)])
  return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _run(model, **feeds):
  session = onnxruntime.InferenceSession(
      model.SerializeToString(), providers=['CPUExecutionProvider'])
  return session.run(None, feeds)


def _operators(model):
  return collections.Counter(node.op_type for node in model.graph.node)


def _int8_matmul_model(activation_type, max_weight=127, relu=False):
  rng = np.random.default_rng(0)
  weights = rng.integers(-max_weight, max_weight + 1, size=(6, 3)).astype(np.int8)
  weights[:2] = max_weight  # 255 * 127 * 2 saturates int16: AVX2's u8s8 pairs would
  nodes = [
      helper.make_node('Relu' if relu else 'Identity', ['x'], ['source']),
      helper.make_node('Cast', ['source'], ['codes'], to=activation_type),
      helper.make_node('Cast', ['codes'], ['a32'], to=TensorProto.INT32),
      helper.make_node('Cast', ['w'], ['b32'], to=TensorProto.INT32),
      helper.make_node('MatMul', ['a32', 'b32'], ['y']),
  ]
  return _model(
      nodes, [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['B', 6])],
      [helper.make_tensor_value_info('y', TensorProto.INT32, ['B', 3])],
      [numpy_helper.from_array(weights, 'w')])


def _integer_operands(model, feeds):
  """The A and B operands of the model's one MatMulInteger, as the reference evaluator sees them."""
  integer = next(node for node in model.graph.node if node.op_type == 'MatMulInteger')
  probe = onnx.ModelProto.FromString(model.SerializeToString())
  probe.graph.output.extend(helper.make_empty_tensor_value_info(name)
                            for name in integer.input[:2])
  return ReferenceEvaluator(probe).run(list(integer.input[:2]), feeds), integer


@pytest.mark.parametrize('activation_type, max_weight, relu, expected', [
    (TensorProto.INT8, 7, False, 'shifted'),  # 4-bit weights never saturate
    (TensorProto.INT8, 64, False, 'shifted'),
    (TensorProto.INT8, 127, False, 'halves'),  # 8-bit weights: each multiplied in two halves
    (TensorProto.INT8, 127, True, 'unsigned'),  # a ReLU's codes lie in [0, 127]
    (TensorProto.UINT8, 7, False, 'unsigned'),
    (TensorProto.UINT8, 127, False, 'u8u8'),  # wide weights shifted to uint8 + 128
])
def test_integer_matmul_becomes_u8s8_matmul_integer_exact_on_avx2(
    activation_type, max_weight, relu, expected):
  model = _int8_matmul_model(activation_type, max_weight, relu)
  low, high = (-128, 127) if activation_type == TensorProto.INT8 else (0, 255)
  x = np.random.default_rng(1).integers(low, high + 1, size=(9, 6)).astype(np.float32)
  x[0] = low
  x[1] = high  # both ends of the code range survive the uint8 shift
  x[2, :2] = -128 if activation_type == TensorProto.INT8 else 255  # the saturating pair
  optimized = onnx_passes.optimize(model)
  onnx.checker.check_model(optimized, full_check=True)
  operators = _operators(optimized)
  np.testing.assert_array_equal(_run(optimized, x=x)[0], _run(model, x=x)[0])
  np.testing.assert_array_equal(ReferenceEvaluator(optimized).run(None, {'x': x})[0],
                                _run(model, x=x)[0])
  assert operators['MatMulInteger'] == 1 and operators['MatMul'] == 0
  (activations, weights), integer = _integer_operands(optimized, {'x': x})
  assert activations.dtype == np.uint8
  if expected == 'u8u8':  # u8u8 kernels widen to int16 and add in int32: any weights
    assert weights.dtype == np.uint8 and len(integer.input) == 4
  else:
    assert weights.dtype == np.int8  # u8s8, never s8s8
    # AVX2's u8s8 kernel adds pairs of products in int16: they must fit.
    assert 2 * int(activations.max()) * int(np.abs(weights.astype(np.int32)).max()) <= 32767
    assert (len(integer.input) == 3) == (expected in ('shifted', 'halves'))  # zero point 128
  assert (weights.shape[0] == 12) == (expected == 'halves')
  # The weights stay the int8 initializer; no int32 copy is kept.
  assert [t.data_type for t in optimized.graph.initializer
          if t.name == 'w'] == [TensorProto.INT8]


def test_matmul_integer_on_computed_weights_stays_s8s8():
  nodes = [helper.make_node('Cast', ['x'], ['a8'], to=TensorProto.INT8),
           helper.make_node('Cast', ['v'], ['b8'], to=TensorProto.INT8),
           helper.make_node('Cast', ['a8'], ['a32'], to=TensorProto.INT32),
           helper.make_node('Cast', ['b8'], ['b32'], to=TensorProto.INT32),
           helper.make_node('MatMul', ['a32', 'b32'], ['y'])]
  model = _model(nodes, [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['B', 4]),
                         helper.make_tensor_value_info('v', TensorProto.FLOAT, [4, 2])],
                 [helper.make_tensor_value_info('y', TensorProto.INT32, ['B', 2])])
  optimized = onnx_passes.optimize(model)
  assert _operators(optimized)['MatMulInteger'] == 1
  x = np.array([[-128, 127, 5, -3]], np.float32)
  v = np.array([[127, -127], [127, 1], [0, 2], [-5, 3]], np.float32)
  np.testing.assert_array_equal(_run(optimized, x=x, v=v)[0], x.astype(np.int32) @ v.astype(
      np.int32))


def _row_quantized_matmul_model(relu: bool):
  """quantize_rows as jax2onnx writes it, then the int8 dot, scaled back to float."""
  tiny = np.finfo(np.float32).tiny
  constants = {'axes': np.array([1], np.int64), 'inverse': np.float32(1 / 127),
               'tiny': np.float32(tiny), 'one': np.float32(1), 'low': np.float32(-127),
               'high': np.float32(127),
               'w': np.random.default_rng(0).integers(-127, 128, (16, 4)).astype(np.int8)}
  nodes = [
      helper.make_node('Relu' if relu else 'Identity', ['x'], ['rows']),
      helper.make_node('Abs', ['rows'], ['magnitudes']),
      helper.make_node('ReduceMax', ['magnitudes', 'axes'], ['largest'], keepdims=1),
      helper.make_node('Mul', ['largest', 'inverse'], ['step']),
      helper.make_node('GreaterOrEqual', ['step', 'tiny'], ['normal']),
      helper.make_node('Where', ['normal', 'step', 'one'], ['scale']),
      helper.make_node('Div', ['one', 'scale'], ['reciprocal']),
      helper.make_node('Mul', ['rows', 'reciprocal'], ['scaled']),
      helper.make_node('Round', ['scaled'], ['rounded']),
      helper.make_node('Clip', ['rounded', 'low', 'high'], ['clipped']),
      helper.make_node('Cast', ['clipped'], ['codes'], to=TensorProto.INT8),
      helper.make_node('Cast', ['codes'], ['a32'], to=TensorProto.INT32),
      helper.make_node('Cast', ['w'], ['b32'], to=TensorProto.INT32),
      helper.make_node('MatMul', ['a32', 'b32'], ['accumulator']),
      helper.make_node('Cast', ['accumulator'], ['float_accumulator'], to=TensorProto.FLOAT),
      helper.make_node('Mul', ['float_accumulator', 'scale'], ['y']),
  ]
  return _model(nodes, [_float_input('B', 16)],
                [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['B', 4])],
                [numpy_helper.from_array(value, name) for name, value in constants.items()])


@pytest.mark.parametrize('relu', [False, True])
def test_row_quantization_becomes_one_quantize_linear(relu):
  model = _row_quantized_matmul_model(relu)
  optimized = onnx_passes.optimize(model)
  onnx.checker.check_model(optimized, full_check=True)
  operators = _operators(optimized)
  assert operators['QuantizeLinear'] == 1 and operators['Max'] == 1
  assert not {'Round', 'Clip', 'Div', 'Where', 'GreaterOrEqual'} & set(operators)
  x = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
  x[1] = 0  # an all-zero row: zero codes, zero output, no NaN
  expected = _run(model, x=x)[0]
  np.testing.assert_array_equal(_run(optimized, x=x)[0], expected)
  np.testing.assert_array_equal(ReferenceEvaluator(optimized).run(None, {'x': x})[0], expected)
  assert not np.any(expected[1])


def test_float_matmul_is_left_alone():
  weights = np.ones((4, 2), np.float32)
  model = _model(
      [helper.make_node('MatMul', ['x', 'w'], ['y'])],
      [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['B', 4])],
      [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['B', 2])],
      [numpy_helper.from_array(weights, 'w')])
  assert _operators(onnx_passes.optimize(model)) == {'MatMul': 1}


def _broadcast_model(consumer):
  """x [B, 4] minus its row sums broadcast by Reshape to [B, 1] and Expand to [B, 4]."""
  nodes = [
      helper.make_node('ReduceSum', ['x', 'axes'], ['sums'], keepdims=0),
      helper.make_node('Shape', ['x'], ['shape']),
      helper.make_node('Gather', ['shape', 'zero'], ['rows']),
      helper.make_node('Concat', ['rows', 'one'], ['column_shape'], axis=0),
      helper.make_node('Reshape', ['sums', 'column_shape'], ['column']),
      helper.make_node('Expand', ['column', 'shape'], ['expanded']),
      consumer,
  ]
  initializers = [numpy_helper.from_array(np.array([1], np.int64), 'axes'),
                  numpy_helper.from_array(np.array([0], np.int64), 'zero'),
                  numpy_helper.from_array(np.array([1], np.int64), 'one')]
  model = _model(
      nodes, [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['B', 4])],
      [helper.make_tensor_value_info('y', TensorProto.FLOAT, None)], initializers)
  # jax2onnx records every intermediate shape; give the test graph the same.
  shapes = {'sums': ['B'], 'column': ['B', 1], 'expanded': ['B', 4]}
  del model.graph.value_info[:]
  model.graph.value_info.extend(
      helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
      for name, shape in shapes.items())
  return model


def test_expand_into_a_broadcasting_op_and_reshape_to_column_are_simplified():
  model = _broadcast_model(helper.make_node('Sub', ['x', 'expanded'], ['y']))
  optimized = onnx_passes.optimize(model)
  onnx.checker.check_model(optimized, full_check=True)
  assert _operators(optimized) == {'ReduceSum': 1, 'Unsqueeze': 1, 'Sub': 1}
  x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  np.testing.assert_array_equal(_run(optimized, x=x)[0], _run(model, x=x)[0])


def test_expand_into_a_reduction_is_kept():
  # ReduceSum does not broadcast: dropping the Expand would change its result.
  model = _broadcast_model(helper.make_node('ReduceSum', ['expanded', 'axes'], ['y']))
  optimized = onnx_passes.optimize(model)
  assert _operators(optimized)['Expand'] == 1
  x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  np.testing.assert_allclose(_run(optimized, x=x)[0], _run(model, x=x)[0])


def _float_input(*shape):
  return helper.make_tensor_value_info('x', TensorProto.FLOAT, list(shape))


def test_log_sum_exp_reuses_the_existing_sum_of_exponentials():
  axes = numpy_helper.from_array(np.array([1], np.int64), 'axes')
  nodes = [
      helper.make_node('Exp', ['x'], ['e']),
      helper.make_node('ReduceSum', ['e', 'axes'], ['total'], keepdims=0),
      helper.make_node('ReduceLogSumExp', ['x', 'axes'], ['log_total'], keepdims=0),
      helper.make_node('Div', ['log_total', 'total'], ['y']),
  ]
  model = _model(nodes, [_float_input('B', 5)],
                 [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['B'])], [axes])
  optimized = onnx_passes.optimize(model)
  assert _operators(optimized) == {'Exp': 1, 'ReduceSum': 1, 'Log': 1, 'Div': 1}
  x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
  np.testing.assert_allclose(_run(optimized, x=x)[0], _run(model, x=x)[0], rtol=1e-6)


@pytest.mark.parametrize('beta', [0.0, 1.0])
def test_bias_add_folds_into_a_zero_bias_gemm(beta):
  rng = np.random.default_rng(0)
  initializers = [
      numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), 'w'),
      numpy_helper.from_array(np.zeros(3, np.float32), 'zero'),
      numpy_helper.from_array(rng.normal(size=3).astype(np.float32), 'b'),
      numpy_helper.from_array(np.array([1, 3], np.int64), 'row'),
  ]
  nodes = [
      # jax2onnx writes beta=0 with a zero C; the fold must make the bias count.
      helper.make_node('Gemm', ['x', 'w', 'zero'], ['product'], beta=beta),
      helper.make_node('Reshape', ['b', 'row'], ['bias']),
      helper.make_node('Add', ['product', 'bias'], ['sum']),
      helper.make_node('Relu', ['sum'], ['y']),
  ]
  model = _model(nodes, [_float_input('B', 4)],
                 [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['B', 3])], initializers)
  optimized = onnx_passes.optimize(model)
  assert _operators(optimized) == {'Gemm': 1, 'Relu': 1}
  x = rng.normal(size=(6, 4)).astype(np.float32)
  np.testing.assert_allclose(_run(optimized, x=x)[0], _run(model, x=x)[0], rtol=1e-6)


def test_abs_of_relu_and_repeated_subexpressions_go():
  nodes = [
      helper.make_node('Relu', ['x'], ['r']),
      helper.make_node('Abs', ['r'], ['a']),
      helper.make_node('ReduceMax', ['a', 'axes_1'], ['m1'], keepdims=1),
      helper.make_node('ReduceMax', ['a', 'axes_2'], ['m2'], keepdims=1),  # equal axes
      helper.make_node('Add', ['m1', 'm2'], ['y']),
  ]
  axes = [numpy_helper.from_array(np.array([1], np.int64), name) for name in ('axes_1', 'axes_2')]
  model = _model(nodes, [_float_input('B', 5)],
                 [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['B', 1])], axes)
  optimized = onnx_passes.optimize(model)
  assert _operators(optimized) == {'Relu': 1, 'ReduceMax': 1, 'Add': 1}
  x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
  np.testing.assert_array_equal(_run(optimized, x=x)[0], _run(model, x=x)[0])


def test_abs_of_anything_else_is_kept():
  model = _model([helper.make_node('Abs', ['x'], ['y'])], [_float_input('B', 2)],
                 [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['B', 2])])
  assert _operators(onnx_passes.optimize(model)) == {'Abs': 1}


@pytest.mark.parametrize('keepdims', [0, 1])
def test_sum_of_squares_becomes_mul_and_reduce_sum(keepdims):
  axes = numpy_helper.from_array(np.array([1], np.int64), 'axes')
  model = _model(
      [helper.make_node('ReduceSumSquare', ['x', 'axes'], ['y'], keepdims=keepdims)],
      [_float_input('B', 5)], [helper.make_tensor_value_info('y', TensorProto.FLOAT, None)],
      [axes])
  optimized = onnx_passes.optimize(model)
  onnx.checker.check_model(optimized, full_check=True)
  assert _operators(optimized) == {'Mul': 1, 'ReduceSum': 1}
  x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
  expected = _run(model, x=x)[0]
  actual = _run(optimized, x=x)[0]
  assert actual.shape == expected.shape
  np.testing.assert_allclose(actual, expected, rtol=1e-6)


@pytest.mark.parametrize('shape', [['B', 6], ['B', 3, 2, 6]])
def test_channel_scale_and_bias_become_one_batch_normalization(shape):
  rng = np.random.default_rng(0)
  constants = [numpy_helper.from_array(rng.random((1,) * (len(shape) - 1) + (6,)).astype(
      np.float32), 'w'), numpy_helper.from_array(rng.normal(size=6).astype(np.float32), 'b')]
  nodes = [helper.make_node('Mul', ['x', 'w'], ['scaled']),
           helper.make_node('Add', ['scaled', 'b'], ['y'])]
  model = _model(nodes, [helper.make_tensor_value_info('x', TensorProto.FLOAT, shape)],
                 [helper.make_tensor_value_info('y', TensorProto.FLOAT, shape)], constants)
  optimized = onnx_passes.optimize(model)
  onnx.checker.check_model(optimized, full_check=True)
  assert _operators(optimized)['BatchNormalization'] == 1
  assert _operators(optimized)['Mul'] == _operators(optimized)['Add'] == 0
  x = (rng.normal(size=[5, *shape[1:]]) * 1e3).astype(np.float32)
  expected = _run(model, x=x)[0]  # x * w, rounded, then + b, rounded
  np.testing.assert_array_equal(_run(optimized, x=x)[0], expected)
  np.testing.assert_array_equal(ReferenceEvaluator(optimized).run(None, {'x': x})[0], expected)


def test_scale_per_row_is_not_a_channel_affine():
  nodes = [helper.make_node('Mul', ['x', 's'], ['scaled']),
           helper.make_node('Add', ['scaled', 'b'], ['y'])]
  model = _model(nodes, [_float_input('B', 4), helper.make_tensor_value_info(
      's', TensorProto.FLOAT, ['B', 1])], [helper.make_tensor_value_info(
          'y', TensorProto.FLOAT, ['B', 4])],
      [numpy_helper.from_array(np.ones(4, np.float32), 'b')])
  assert _operators(onnx_passes.optimize(model)) == {'Mul': 1, 'Add': 1}


def test_batch_size_read_through_gather_and_concat_becomes_one_sliced_shape():
  # jax2onnx's constant routes: ones(batch) as Shape, Gather, Concat, Expand.
  nodes = [
      helper.make_node('Relu', ['x'], ['h']),
      helper.make_node('Shape', ['h'], ['shape']),
      helper.make_node('Gather', ['shape', 'zero'], ['rows']),
      helper.make_node('Concat', ['rows'], ['target'], axis=0),
      helper.make_node('Expand', ['true', 'target'], ['routes']),
  ]
  initializers = [numpy_helper.from_array(np.array([0], np.int64), 'zero'),
                  numpy_helper.from_array(np.array(True), 'true')]
  model = _model(nodes, [_float_input('B', 4)],
                 [helper.make_tensor_value_info('h', TensorProto.FLOAT, ['B', 4]),
                  helper.make_tensor_value_info('routes', TensorProto.BOOL, ['B'])],
                 initializers)
  optimized = onnx_passes.optimize(model)
  onnx.checker.check_model(optimized, full_check=True)
  assert _operators(optimized) == {'Relu': 1, 'Shape': 1, 'Expand': 1}
  for batch in (1, 5):
    x = np.random.default_rng(batch).normal(size=(batch, 4)).astype(np.float32)
    expected = _run(model, x=x)
    for outputs in (_run(optimized, x=x), ReferenceEvaluator(optimized).run(None, {'x': x})):
      for got, want in zip(outputs, expected, strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype and got.shape == want.shape
