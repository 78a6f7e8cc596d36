"""Size, accuracy, portability and speed of ONNX exports, beside onnxruntime's own quantizer.

For a float checkpoint and quantized checkpoints (each exported beside it
with `dnnr export`), this builds `onnxruntime.quantization.quantize_dynamic`
of the float export (int8 weights, its defaults) and reports, for every
file: its bytes, test accuracy in onnxruntime, whether it passes
`onnx.checker.check_model(full_check=True)` and runs in ONNX's reference
evaluator with onnxruntime's outputs, and its batch-1 latency and batch-256
throughput, all models timed side by side (`dnnr_jax.jobs.benchmark`).

  python scripts/onnx_serving.py FLOAT_CHECKPOINT QUANTIZED_CHECKPOINT... \\
      [--data-dir DIR] [--seconds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import numpy as np
import onnx
import onnxruntime

from dnnr_jax.io.checkpoint import load_model
from dnnr_jax.io.data import load_dataset
from dnnr_jax.io.export import default_output
from dnnr_jax.jobs.timing import compare_inference, machine


def portable(path: pathlib.Path, inputs: np.ndarray) -> bool:
  """Full checker passes and the reference evaluator gives onnxruntime's logits."""
  from onnx.reference import ReferenceEvaluator

  model = onnx.load(path)
  try:
    onnx.checker.check_model(model, full_check=True)
    reference = ReferenceEvaluator(model).run(['logits'], {'input': inputs})[0]
  except Exception:  # the checker and the evaluator raise many types
    return False
  session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
  return bool(np.allclose(session.run(['logits'], {'input': inputs})[0], reference, atol=1e-3))


def runner(path: pathlib.Path, threads: int):
  """One onnxruntime CPU session's call on a batch (threads 0: onnxruntime's default)."""
  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = threads
  session = onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
  return lambda batch: session.run(None, {'input': batch})


def accuracy(path: pathlib.Path, images: np.ndarray, labels: np.ndarray) -> float:
  session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
  predictions = [np.argmax(session.run(['logits'], {'input': images[first:first + 1000]})[0], -1)
                 for first in range(0, len(images), 1000)]
  return float(np.mean(np.concatenate(predictions) == labels))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('float_checkpoint')
  parser.add_argument('quantized', nargs='+',
                      help='quantized (or pruned) checkpoints, or further .onnx files')
  parser.add_argument('--data-dir')
  parser.add_argument('--seconds', type=float, default=2.0)
  parser.add_argument('--intra-op-threads', type=int, default=0,
                      help="onnxruntime's threads per call (default 0: one per core)")
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  from onnxruntime.quantization import QuantType, quantize_dynamic

  float_model = load_model(args.float_checkpoint)
  test = load_dataset(float_model.config.data, args.data_dir).test
  images, labels = np.asarray(test.images), np.asarray(test.labels)
  checkpoints = [pathlib.Path(args.float_checkpoint), *map(pathlib.Path, args.quantized)]
  files = {path.name: path if path.suffix == '.onnx' else default_output(path)
           for path in checkpoints}
  checkpoint_accuracy = {path.name: load_model(path).metadata.get('metrics', {}).get(
      'test', {}).get('accuracy') for path in checkpoints if path.suffix != '.onnx'}
  with tempfile.TemporaryDirectory() as scratch:
    ours = files[checkpoints[0].name]
    theirs = pathlib.Path(scratch) / 'quantize_dynamic.onnx'
    quantize_dynamic(ours, theirs, weight_type=QuantType.QInt8)
    files['quantize_dynamic(float export)'] = theirs
    speeds = compare_inference(
        {name: runner(path, args.intra_op_threads) for name, path in files.items()},
        images[:256], args.seconds)
    rows = [{'model': name, 'bytes': path.stat().st_size,
             'onnx_accuracy': accuracy(path, images, labels),
             'checkpoint_accuracy': checkpoint_accuracy.get(name),
             'portable': portable(path, images[:7]), **speeds[name]}
            for name, path in files.items()]
  dense, theirs = rows[0], rows[-1]
  for row in rows:
    row['smaller'] = dense['bytes'] / row['bytes']
    row['throughput_vs_float'] = row['throughput'] / dense['throughput']
    row['latency_vs_float'] = row['latency_us'] / dense['latency_us']
    row['throughput_vs_quantize_dynamic'] = row['throughput'] / theirs['throughput']
    row['latency_vs_quantize_dynamic'] = row['latency_us'] / theirs['latency_us']
  facts = {**machine(), 'onnxruntime': onnxruntime.__version__,
           'intra_op_threads': args.intra_op_threads,
           'cpu_flags': sorted(_flags() & {'avx2', 'avx512f', 'avx512_vnni', 'avx_vnni',
                                           'amx_int8', 'avx_vnni_int8'})}
  if args.json:
    print(json.dumps({'machine': facts, 'models': rows}))
    return
  print(f"{facts['cpu']} ({facts['cpu_count']} cores; {' '.join(facts['cpu_flags'])}), "
        f"onnxruntime {facts['onnxruntime']}, intra-op threads "
        f"{args.intra_op_threads or 'default'}")
  print('| model | bytes | x smaller | accuracy (checkpoint) | portable | batch 1, µs '
        '| batch 256, samples/s | vs float | vs quantize_dynamic |')
  print('| --- | ---: | ---: | ---: | :---: | ---: | ---: | ---: | ---: |')
  for row in rows:
    stored = row['checkpoint_accuracy']
    print(f"| {row['model']} | {row['bytes']:,} | {row['smaller']:.1f} | "
          f"{row['onnx_accuracy']:.2%} ({'-' if stored is None else f'{stored:.2%}'}) | "
          f"{'yes' if row['portable'] else 'no'} | {row['latency_us']:.1f} | "
          f"{row['throughput']:,.0f} | {row['throughput_vs_float']:.2f}x, "
          f"{row['latency_vs_float']:.2f}x latency | {row['throughput_vs_quantize_dynamic']:.2f}x, "
          f"{row['latency_vs_quantize_dynamic']:.2f}x latency |")


def _flags() -> set[str]:
  try:
    with open('/proc/cpuinfo') as cpuinfo:
      for line in cpuinfo:
        if line.startswith('flags'):
          return set(line.split(':', 1)[1].split())
  except OSError:
    pass
  return set()


if __name__ == '__main__':
  main()
