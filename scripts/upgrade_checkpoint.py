"""Writes a checkpoint again in the current format, checked bit-exact, with both sizes.

Any readable format (2 and later) is loaded, saved to OUTPUT with the same
metadata (config, metrics, lineage, compression settings; the format
marker, layout, digests and timestamp are made anew, and 'array_bytes',
where recorded, measured again), loaded back and compared leaf by leaf.
Prints both directories' bytes, every file counted.

  python scripts/upgrade_checkpoint.py models/quantized/quantized_model_v1.0 /tmp/v8
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from dnnr_jax.io import checkpoint, storage

MADE_ANEW = ('format', 'format_version', 'created', 'library_versions', 'layout', 'integrity')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('source')
  parser.add_argument('output')
  parser.add_argument('--overwrite', action='store_true')
  args = parser.parse_args()
  source = checkpoint.load_model(args.source)
  kept = {key: value for key, value in source.metadata.items() if key not in MADE_ANEW}
  if 'array_bytes' in kept:  # What the compression job records: the stored arrays' bytes.
    arrays, _ = storage.encode_variables(source.variables)
    kept['array_bytes'] = int(sum(leaf.nbytes for leaf in jax.tree.leaves(arrays)))
  written = checkpoint.save_checkpoint(args.output, source.variables, kept,
                                       overwrite=args.overwrite)
  again = checkpoint.load_model(written)
  before, after = jax.tree.leaves(source.variables), jax.tree.leaves(again.variables)
  assert jax.tree.structure(source.variables) == jax.tree.structure(again.variables)
  for left, right in zip(before, after, strict=True):
    assert np.asarray(left).dtype == np.asarray(right).dtype
    assert np.array_equal(np.asarray(left), np.asarray(right))
  print(json.dumps({
      'source': {'path': str(source.path), 'format_version': source.metadata['format_version'],
                 'bytes': storage.directory_bytes(source.path)},
      'output': {'path': str(written), 'format_version': again.metadata['format_version'],
                 'bytes': storage.directory_bytes(written)},
      'leaves_equal': len(before)}))


if __name__ == '__main__':
  main()
