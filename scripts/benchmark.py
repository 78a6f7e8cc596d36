"""Benchmark suite: training throughput, JAX and onnxruntime inference, accuracy.

A thin wrapper over `dnnr benchmark` (see `dnnr benchmark --help`), e.g.

  python scripts/benchmark.py --config configs/default.yaml --data-dir D \
      --models models/final/model_v1.0_final models/quantized/quantized_model_v1.0 \
      --output results.json
"""

import sys

from dnnr_jax.cli import main

if __name__ == '__main__':
  sys.exit(main(['benchmark', *sys.argv[1:]]))
