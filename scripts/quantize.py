"""Thin wrapper: `python scripts/quantize.py ...` is `dnnr quantize ...`."""

import sys

from dnnr_jax.cli import main

if __name__ == '__main__':
  sys.exit(main(['quantize', *sys.argv[1:]]))
