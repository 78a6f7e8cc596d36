"""Accuracy against compute and wall time of an early-exit checkpoint.

See docs/dynamic_inference.md for the figures and how they are measured.

It ends with the three wall-time ratios the early exit is held to, each per
sample over the same model always-deep: JAX throughput at batch 256 (at least
2×), onnxruntime throughput at batch 256 and onnxruntime batch-1 median
latency over the test set (at least 2.5× each). `--exit-alone` also times the
model with `routing: shallow` (the exit alone, as if no input went deep): how
far always-deep is from the cheapest call the model has on each engine.

Usage:
  python scripts/dynamic_inference.py MODEL [--data-dir DIR] [--output JSON] [--plot PNG]
      [--no-timing] [--exit-alone]
"""

import argparse
import json
import sys

from dnnr_jax.errors import DnnrError
from dnnr_jax.jobs import dynamic


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('model_path')
  parser.add_argument('--data-dir')
  parser.add_argument('--output', help='also write the figures as JSON here')
  parser.add_argument('--plot', help='also draw accuracy against compute to this PNG')
  parser.add_argument('--no-timing', action='store_true', help='only accuracy against compute')
  parser.add_argument('--exit-alone', action='store_true',
                      help='also time the exit alone (routing: shallow) against always-deep')
  args = parser.parse_args()
  try:
    report = dynamic.run_report(args.model_path, data_dir=args.data_dir,
                                timing=not args.no_timing, exit_alone=args.exit_alone)
  except DnnrError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  if args.output:
    with open(args.output, 'w') as output:
      json.dump({key: report[key] for key in ('curve', 'timing')}, output, indent=2)
  if args.plot and report['curve']:
    dynamic.write_plot(report['curve'], args.plot)
  print(report['markdown'])
  if report['timing']:
    print(targets(report['timing']['ratios']))
  return 0


# The wall-time targets: (engine, figure, label, at least).
TARGETS = (
    ('jax on device', 'throughput_batch_256', 'JAX throughput at batch 256, inputs on the device',
     2.0),
    ('jax', 'throughput_batch_256', 'JAX throughput at batch 256, NumPy in and out', 2.0),
    ('onnxruntime', 'throughput_batch_256', 'onnxruntime throughput at batch 256', 2.5),
    ('onnxruntime', 'latency_us_all', 'onnxruntime batch-1 median latency, all test images', 2.5),
)


def targets(ratios: dict[str, dict[str, float]]) -> str:
  """The three wall-time ratios the early exit is held to, per sample over always-deep."""
  lines = ['Per sample over always-deep, against the targets (default session; one thread):']
  for engine, key, label, least in TARGETS:
    measured = ratios[engine][key]
    one_thread = ratios.get(f'{engine} 1 thread', {}).get(key)
    extra = '' if one_thread is None else f' (one thread {one_thread:.2f}×)'
    lines.append(f'- {label}: {measured:.2f}×{extra}, target ≥ {least:g}×')
  return '\n'.join(lines)


if __name__ == '__main__':
  sys.exit(main())
