"""Thin wrapper: `python scripts/prune.py ...` is `dnnr prune ...`."""

import sys

from dnnr_jax.cli import main

if __name__ == '__main__':
  sys.exit(main(['prune', *sys.argv[1:]]))
