"""The least a batch-1 onnxruntime call can cost on this machine.

Times, side by side at batch 1, graphs far simpler than any dnnr_jax export:
an Identity (the cost of `session.run` itself), the first layer alone (one
784x256 MatMul + bias), and a bare four-layer MLP with the default widths
and no routing (784-256-256-128-10, Gemm + Relu). Each is timed through
`session.run` (what `dnnr predict` and most Python servers call) and through
an IOBinding with the input bound once (the cheapest Python call there is).
A latency target below these figures cannot be met by any model on this
machine, whatever its graph.

  python scripts/onnxruntime_floor.py [--seconds 1.0] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from dnnr_jax.jobs.timing import machine

WIDTHS = (784, 256, 256, 128, 10)
REPEATS = 7


def _model(nodes, initializers, output_width: int) -> bytes:
  graph = helper.make_graph(
      nodes, 'floor',
      [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['batch', WIDTHS[0]])],
      [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['batch', output_width])],
      initializers)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)])
  onnx.checker.check_model(model)
  return model.SerializeToString()


def _dense_layers(count: int, rng: np.random.Generator) -> tuple[list, list]:
  nodes, initializers, current = [], [], 'x'
  for index, (fan_in, fan_out) in enumerate(zip(WIDTHS[:count], WIDTHS[1:count + 1], strict=True)):
    kernel = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
    initializers += [numpy_helper.from_array(kernel, f'w{index}'),
                     numpy_helper.from_array(np.zeros(fan_out, np.float32), f'b{index}')]
    last = index == count - 1
    gemm_out = 'y' if last else f'g{index}'
    nodes.append(helper.make_node('Gemm', [current, f'w{index}', f'b{index}'], [gemm_out]))
    if not last:
      nodes.append(helper.make_node('Relu', [gemm_out], [f'h{index}']))
      current = f'h{index}'
  return nodes, initializers


def graphs() -> dict[str, bytes]:
  """The reference graphs, by name."""
  rng = np.random.default_rng(0)
  return {
      'identity (empty graph)': _model(
          [helper.make_node('Identity', ['x'], ['y'])], [], WIDTHS[0]),
      'first layer (784x256 Gemm)': _model(*_dense_layers(1, rng), WIDTHS[1]),
      'bare MLP 784-256-256-128-10': _model(*_dense_layers(4, rng), WIDTHS[-1]),
  }


def callers(serialized: bytes, inputs: np.ndarray) -> dict[str, callable]:
  """`session.run` and a bound-input IOBinding call of one default CPU session."""
  session = onnxruntime.InferenceSession(serialized, providers=['CPUExecutionProvider'])
  binding = session.io_binding()
  binding.bind_ortvalue_input('x', onnxruntime.OrtValue.ortvalue_from_numpy(inputs))
  binding.bind_output('y')
  return {'session.run': lambda: session.run(None, {'x': inputs}),
          'io_binding': lambda: session.run_with_iobinding(binding)}


def measure(seconds: float) -> list[dict]:
  """Median µs per batch-1 call of every graph and caller, timed in interleaved rounds."""
  inputs = np.random.default_rng(1).standard_normal((1, WIDTHS[0])).astype(np.float32)
  calls = {(graph, caller): run
           for graph, serialized in graphs().items()
           for caller, run in callers(serialized, inputs).items()}
  counts = {}
  for key, run in calls.items():
    for _ in range(200):
      run()
    start = time.perf_counter()
    for _ in range(200):
      run()
    counts[key] = max(1, int(seconds / REPEATS / ((time.perf_counter() - start) / 200)))
  times = {key: [] for key in calls}
  for _ in range(REPEATS):
    for key, run in calls.items():
      start = time.perf_counter()
      for _ in range(counts[key]):
        run()
      times[key].append((time.perf_counter() - start) / counts[key] * 1e6)
  return [{'graph': graph, 'call': caller, 'latency_us': statistics.median(values),
           'min_us': min(values), 'max_us': max(values)}
          for (graph, caller), values in times.items()]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--seconds', type=float, default=1.0,
                      help='about how long each figure is timed')
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  args = parser.parse_args()
  rows = measure(args.seconds)
  facts = {**machine(), 'onnxruntime': onnxruntime.__version__}
  if args.json:
    print(json.dumps({'machine': facts, 'floor': rows}))
    return
  print(f"{facts['cpu']} ({facts['cpu_count']} cores), onnxruntime {facts['onnxruntime']}, "
        'batch 1, median µs per call:')
  for row in rows:
    print(f"  {row['graph']:<30} {row['call']:<12} {row['latency_us']:7.1f} "
          f"(min {row['min_us']:.1f}, max {row['max_us']:.1f})")


if __name__ == '__main__':
  main()
