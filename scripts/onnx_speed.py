"""Batch-1 latency and batch-256 throughput of ONNX files in onnxruntime, timed side by side.

The inputs are MNIST test images scaled to [0, 1] and shaped as each file's
input wants them (e.g. [B, 28, 28, 1] for `scripts/compress_cnn.py`'s
exports); every round times every file once (`dnnr_jax.jobs.benchmark.
compare_inference`), so a busy spell of a shared machine hits them alike.
Prints one JSON object with the machine and a row per file, ratios against
the first file.

  PYTHONPATH=. python scripts/onnx_speed.py FLOAT.onnx INT8.onnx --data-dir MNIST_DIR
"""

import argparse
import json
import pathlib

import numpy as np
import onnxruntime

from dnnr_jax.io.data import load_mnist_arrays
from dnnr_jax.jobs.timing import compare_inference, machine


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('files', nargs='+', type=pathlib.Path)
  parser.add_argument('--data-dir', required=True)
  parser.add_argument('--seconds', type=float, default=3.0)
  args = parser.parse_args()
  images = load_mnist_arrays(args.data_dir)['test_images'][:256].astype(np.float32) / 255.0
  runners = {}
  for path in args.files:
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    shape = [dim if isinstance(dim, int) else -1 for dim in session.get_inputs()[0].shape]
    batch = images.reshape(shape)
    runners[path.name] = (lambda rows, session=session, batch=batch:
                          session.run(None, {'input': batch[:len(rows)]}))
  speeds = compare_inference(runners, images.reshape(len(images), -1), args.seconds)
  first = speeds[args.files[0].name]
  rows = [{'file': name, **speed, 'throughput_vs_first': speed['throughput'] / first['throughput'],
           'latency_vs_first': speed['latency_us'] / first['latency_us']}
          for name, speed in speeds.items()]
  print(json.dumps({'machine': {**machine(), 'onnxruntime': onnxruntime.__version__},
                    'models': rows}, indent=1))


if __name__ == '__main__':
  main()
