"""Accuracy against compute and wall time of an early-exit checkpoint.

See docs/dynamic_inference.md for the figures and how they are measured.

Usage:
  python scripts/dynamic_inference.py MODEL [--data-dir DIR] [--output JSON] [--plot PNG]
      [--no-timing]
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
  args = parser.parse_args()
  try:
    report = dynamic.run_report(args.model_path, data_dir=args.data_dir,
                                timing=not args.no_timing)
  except DnnrError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  if args.output:
    with open(args.output, 'w') as output:
      json.dump({key: report[key] for key in ('curve', 'timing')}, output, indent=2)
  if args.plot and report['curve']:
    dynamic.write_plot(report['curve'], args.plot)
  print(report['markdown'])
  return 0


if __name__ == '__main__':
  sys.exit(main())
