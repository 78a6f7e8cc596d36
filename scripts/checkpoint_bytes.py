"""Bytes on disk of the MNIST default's final, pruned and quantized checkpoints.

Trains the default config briefly (the sizes depend on the shapes and the
sparsity, not on how long it trained), prunes it one-shot to the default
sparsity, quantizes the pruned model to the default bits, and prints every
checkpoint's bytes (every file counted), per-folder and per-file breakdown
and the ratio to the dense one. With `--checkpoints`, the same for existing
checkpoints, the first one dense.

  DNNR_DATA_DIR=/path/to/mnist python scripts/checkpoint_bytes.py --epochs 1
  python scripts/checkpoint_bytes.py --checkpoints FINAL QUANTIZED ...
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import tempfile

from dnnr_jax.config import load_config
from dnnr_jax.io import checkpoint, storage
from dnnr_jax.jobs import compress, train


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/default.yaml')
  parser.add_argument('--epochs', type=int, default=1)
  parser.add_argument('--models-dir', help='default: a temporary directory')
  parser.add_argument('--checkpoints', nargs='+', type=pathlib.Path,
                      help='existing checkpoints to measure instead, the first one dense')
  args = parser.parse_args()
  if args.checkpoints:
    print(json.dumps(_measure({str(path): path for path in args.checkpoints}), indent=1))
    return
  config = load_config(args.config, [f'training.epochs={args.epochs}',
                                     'training.checkpoint_every=0'])
  with tempfile.TemporaryDirectory() as temporary:
    models_dir = pathlib.Path(args.models_dir or temporary)
    final, _ = train.train_and_save(config, models_dir=models_dir, overwrite=True,
                                    version='1.0')
    prune_settings = dataclasses.replace(
        config.compress.prune, schedule='oneshot', finetune_epochs=0, distill=0.0)
    pruned = compress.prune_checkpoint(
        final, prune_settings, models_dir=models_dir, version='1.0', overwrite=True).path
    quantize_settings = dataclasses.replace(
        config.compress.quantize, mode='dynamic', finetune_epochs=0)
    quantized = compress.quantize_checkpoint(
        pruned, quantize_settings, models_dir=models_dir, version='1.0', overwrite=True).path
    print(json.dumps(_measure({'final': final, 'pruned': pruned, 'quantized': quantized}),
                     indent=1))


def _measure(paths: dict[str, pathlib.Path]) -> dict[str, dict]:
  """Each checkpoint's bytes, by folder and by file, and its ratio to the first one."""
  dense = storage.directory_bytes(next(iter(paths.values())))
  rows = {}
  for name, path in paths.items():
    folders, files = collections.Counter(), {}
    for file in sorted(path.rglob('*')):
      if file.is_file():
        folders[str(file.relative_to(path).parent)] += file.stat().st_size
        files[str(file.relative_to(path))] = file.stat().st_size
    total = storage.directory_bytes(path)
    rows[name] = {'bytes': total, 'smaller_than_first': dense / total,
                  'format_version': checkpoint.read_metadata(path)['format_version'],
                  'by_folder': dict(sorted(folders.items())), 'by_file': files}
  return rows


if __name__ == '__main__':
  main()
