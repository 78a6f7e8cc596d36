"""Compact initializers: exact, standard ONNX, smaller, and folded away by onnxruntime."""

import collections

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from dnnr_jax.io import onnx_storage


def _matmul_model(kernel: np.ndarray) -> onnx.ModelProto:
  """x [B, in] times the kernel [in, out] cast to float, plus a dense bias."""
  columns = kernel.shape[1]
  nodes = [helper.make_node('Cast', ['w'], ['wf'], to=TensorProto.FLOAT),
           helper.make_node('MatMul', ['x', 'wf'], ['xw']),
           helper.make_node('Add', ['xw', 'b'], ['y'])]
  graph = helper.make_graph(
      nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['B', kernel.shape[0]])],
      [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['B', columns])],
      [numpy_helper.from_array(kernel, 'w'),
       numpy_helper.from_array(np.arange(columns, dtype=np.float32), 'b')])
  return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 21)])


def _kernel(dtype, density, largest, rng):
  kernel = np.clip(np.round(rng.normal(size=(300, 40)) * largest), -largest, largest)
  kernel[rng.random(kernel.shape) >= density] = 0
  return kernel.astype(dtype)


@pytest.mark.parametrize('dtype, density, largest, form', [
    (np.float32, 0.05, 50, 'sparse'),
    (np.float32, 0.95, 50, 'dense'),  # values and gaps would outweigh the dense tensor
    (np.int8, 0.05, 127, 'sparse'),
    (np.int8, 0.05, 7, 'sparse'),  # 4-bit codes: INT4 values
    (np.int8, 0.60, 7, 'int4'),  # dense 4-bit codes: two a byte
    (np.int8, 0.80, 127, 'dense'),  # 1.5 bytes per non-zero: more than 1 per weight
    (np.int8, 0.0, 7, 'sparse'),  # nothing left: no values at all
])
def test_compact_storage_is_exact_portable_and_smaller(dtype, density, largest, form, tmp_path):
  rng = np.random.default_rng(0)
  kernel = _kernel(dtype, density, largest, rng)
  model = _matmul_model(kernel)
  compact = onnx_storage.compact_initializers(model)
  onnx.checker.check_model(compact, full_check=True)
  assert [tensor.name for tensor in model.graph.initializer] == ['w', 'b']  # input untouched
  names = {tensor.name for tensor in compact.graph.initializer}
  assert ('w' in names) == (form == 'dense') and 'b' in names
  types = {tensor.name: tensor.data_type for tensor in compact.graph.initializer}
  if form == 'sparse':
    assert types['w_values'] == (TensorProto.INT4 if largest == 7 else
                                 helper.np_dtype_to_tensor_dtype(kernel.dtype))
    assert types['w_gaps'] in (TensorProto.UINT4, TensorProto.UINT8)
  size, dense_size = len(compact.SerializeToString()), len(model.SerializeToString())
  if form == 'sparse':
    value_bytes = 0.5 if largest == 7 else kernel.itemsize
    assert size < dense_size and size < 1200 + np.count_nonzero(kernel) * (value_bytes + 1)
  elif form == 'int4':
    assert types['w_int4'] == TensorProto.INT4 and size < 0.55 * dense_size
  else:
    assert size == dense_size
  x = rng.normal(size=(5, 300)).astype(np.float32)
  expected = x @ kernel.astype(np.float32) + np.arange(40, dtype=np.float32)
  options = onnxruntime.SessionOptions()
  options.optimized_model_filepath = str(tmp_path / 'optimized.onnx')
  session = onnxruntime.InferenceSession(compact.SerializeToString(), options,
                                         providers=['CPUExecutionProvider'])
  (actual,) = session.run(None, {'x': x})
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-3)
  (reference,) = ReferenceEvaluator(compact).run(None, {'x': x})
  np.testing.assert_allclose(reference, actual, rtol=1e-5, atol=1e-3)
  # onnxruntime folds the decoding when the session is created: no cost per call.
  optimized = onnx.load(tmp_path / 'optimized.onnx')
  assert set(collections.Counter(node.op_type for node in optimized.graph.node)) <= {
      'MatMul', 'Add', 'Gemm', 'Cast'}
  folded = [numpy_helper.to_array(tensor) for tensor in optimized.graph.initializer
            if tuple(tensor.dims) == kernel.shape]
  assert any(np.array_equal(array.astype(np.float32), kernel.astype(np.float32))
             for array in folded)


@pytest.mark.parametrize('widest', [15, 255])
def test_gaps_visit_every_position_once_within_the_widest_code(widest):
  positions = np.array([0, 1, 5, 15, 16, 31, 300, 301, 5000])
  gaps = onnx_storage._gaps(positions, widest)
  visited = np.cumsum(gaps)
  assert gaps.min() >= 0 and gaps.max() <= widest
  assert len(set(visited)) == len(visited) and set(positions) <= set(visited)
  # Fillers only where a gap is too wide: one per further `widest` steps.
  expected_fillers = sum(max(gap - 1, 0) // widest for gap in np.diff(positions, prepend=0))
  assert len(gaps) == len(positions) + expected_fillers


def test_kernels_inside_if_branches_are_compacted_there(tmp_path):
  """Batch routing exports each path as an `If` branch holding its own kernel."""
  rng = np.random.default_rng(0)
  kernels = [_kernel(np.int8, 0.05, 7, rng) for _ in range(2)]

  def branch(name, kernel):
    nodes = [helper.make_node('Cast', [f'{name}_w'], [f'{name}_wf'], to=TensorProto.FLOAT),
             helper.make_node('MatMul', ['x', f'{name}_wf'], [f'{name}_y'])]
    return helper.make_graph(
        nodes, name, [], [helper.make_tensor_value_info(f'{name}_y', TensorProto.FLOAT, ['B', 40])],
        [numpy_helper.from_array(kernel, f'{name}_w')])

  graph = helper.make_graph(
      [helper.make_node('If', ['deep'], ['y'], then_branch=branch('then', kernels[0]),
                        else_branch=branch('else', kernels[1]))],
      'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['B', 300]),
            helper.make_tensor_value_info('deep', TensorProto.BOOL, [])],
      [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['B', 40])])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 21)])
  compact = onnx_storage.compact_initializers(model)
  onnx.checker.check_model(compact, full_check=True)
  branches = [attribute.g for attribute in compact.graph.node[0].attribute]
  assert all('ScatterElements' in {node.op_type for node in branch.node} for branch in branches)
  assert len(compact.SerializeToString()) < len(model.SerializeToString()) / 3
  session = onnxruntime.InferenceSession(compact.SerializeToString(),
                                         providers=['CPUExecutionProvider'])
  reference = ReferenceEvaluator(compact)
  x = rng.normal(size=(3, 300)).astype(np.float32)
  for deep, kernel in ((True, kernels[0]), (False, kernels[1])):
    feeds = {'x': x, 'deep': np.array(deep)}
    (actual,) = session.run(None, feeds)
    np.testing.assert_allclose(actual, x @ kernel.astype(np.float32), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(reference.run(None, feeds)[0], actual, rtol=1e-5, atol=1e-4)
