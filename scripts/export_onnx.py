"""Thin wrapper: `python scripts/export_onnx.py ...` is `dnnr export ...`."""

import sys

from dnnr_jax.cli import main

if __name__ == '__main__':
  sys.exit(main(['export', *sys.argv[1:]]))
