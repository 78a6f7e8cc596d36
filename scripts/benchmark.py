"""Measures training throughput (and optionally accuracy) and prints a table.

  python scripts/benchmark.py --config configs/default.yaml --data-dir D \
      [--batch-sizes 64 128 1024] [--repeats 5] [--routing per_sample deep] \
      [--accuracy] [--output results.json]
"""

import argparse
import dataclasses
import json
import sys

from dnnr_jax import benchmark
from dnnr_jax.config import RoutingConfig, load_config
from dnnr_jax.data import load_dataset
from dnnr_jax.errors import DnnrError


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/default.yaml')
  parser.add_argument('--data-dir')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
  parser.add_argument('--batch-sizes', type=int, nargs='+', default=[64, 128, 1024])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--routing', nargs='+', default=None,
                      help='routing modes to time (default: the config\'s)')
  parser.add_argument('--accuracy', action='store_true',
                      help='also train the config from scratch and report test accuracy')
  parser.add_argument('--output', help='write the results as JSON here')
  args = parser.parse_args()
  try:
    config = load_config(args.config, args.set)
    dataset = load_dataset(config.data, args.data_dir)
  except DnnrError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  results = {'machine': benchmark.machine(), 'config': args.config,
             'dataset': dataset.name, 'throughput': []}
  for mode in args.routing or [config.routing.mode]:
    routed = dataclasses.replace(config, routing=RoutingConfig(mode=mode))
    results['throughput'] += benchmark.training_throughput(
        routed, dataset, args.batch_sizes, args.repeats)
  print(f"{results['machine']['cpu']} ({results['machine']['cpu_count']} cores, "
        f"{results['machine']['backend']}, jax {results['machine']['jax']})")
  print(f"{'routing':>10} {'batch':>6} {'samples/s':>12} {'min':>10} {'max':>10} "
        f"{'compile s':>10}")
  for row in results['throughput']:
    print(f"{row['routing']:>10} {row['batch_size']:>6} "
          f"{row['samples_per_second']:>12,.0f} {row['min']:>10,.0f} "
          f"{row['max']:>10,.0f} {row['compile_seconds']:>10.2f}")
  if args.accuracy:
    results['accuracy'] = benchmark.accuracy_run(config, dataset)
    accuracy = results['accuracy']
    print(f"{dataset.name}: test accuracy {accuracy['test_accuracy']:.2%} after "
          f"{accuracy['epochs']} epochs in {accuracy['wall_seconds']:.1f} s "
          f"(deep fraction {accuracy['test_deep_fraction']:.1%})")
  if args.output:
    with open(args.output, 'w') as output:
      json.dump(results, output, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
