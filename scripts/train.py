"""Thin wrapper: `python scripts/train.py ...` is `dnnr train ...`."""

import sys

from dnnr_jax.cli import main

if __name__ == '__main__':
  sys.exit(main(['train', *sys.argv[1:]]))
