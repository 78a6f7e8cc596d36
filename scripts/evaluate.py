"""Thin wrapper: `python scripts/evaluate.py ...` is `dnnr evaluate ...`."""

import sys

from dnnr_jax.cli import main

if __name__ == '__main__':
  sys.exit(main(['evaluate', *sys.argv[1:]]))
