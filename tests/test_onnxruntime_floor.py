"""scripts/onnxruntime_floor.py: its reference graphs compute what they are named for."""

import sys

import numpy as np
import onnx
import onnxruntime
from onnx import numpy_helper

from tests.cli_helpers import load_script, one_json, run


def _floor_module():
  return load_script('onnxruntime_floor')


def test_reference_graphs_match_numpy():
  inputs = np.random.default_rng(0).standard_normal((3, 784)).astype(np.float32)
  for name, serialized in _floor_module().graphs().items():
    weights = {tensor.name: numpy_helper.to_array(tensor)
               for tensor in onnx.load_from_string(serialized).graph.initializer}
    expected = inputs
    for index in range(len(weights) // 2):
      if index:
        expected = np.maximum(expected, 0)
      expected = expected @ weights[f'w{index}'] + weights[f'b{index}']
    session = onnxruntime.InferenceSession(serialized, providers=['CPUExecutionProvider'])
    np.testing.assert_allclose(session.run(None, {'x': inputs})[0], expected,
                               rtol=1e-4, atol=1e-4, err_msg=name)


def test_script_times_every_graph_and_call():
  result = one_json(run(sys.executable, 'scripts/onnxruntime_floor.py', '--seconds', '0.05',
                        '--json'))
  rows = result['floor']
  assert {(row['graph'], row['call']) for row in rows} == {
      (graph, call) for graph in _floor_module().graphs()
      for call in ('session.run', 'io_binding')}
  assert all(0 < row['min_us'] <= row['latency_us'] <= row['max_us'] for row in rows)
