"""How long `dnnr models` takes on a folder of 50 checkpoints (and their 50 ONNX exports).

Builds the folder from one pipeline version (its final, pruned and quantized
checkpoints and exports, e.g. from `dnnr pipeline --config configs/smoke.yaml
--models-dir /tmp/m`): each copy becomes the next version, its metadata's
version and source (and its export's) rewritten as a save of that version
would record them, so the folder holds 17 lineages. Then times, interleaved, wall clock of whole
processes:

- `dnnr models --models-dir DIR` (metadata only, no JAX);
- the same metadata read through Orbax (`checkpoint.read_metadata` of each
  checkpoint, which imports JAX), the way a loader would;
- `python -c pass`, the interpreter's own start.

  python scripts/models_listing_time.py --source /tmp/m [--checkpoints 50] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import onnx

KINDS = {'final': 'model_v{}_final', 'pruned': 'pruned_model_v{}',
         'quantized': 'quantized_model_v{}'}


def build(source: pathlib.Path, target: pathlib.Path, checkpoints: int) -> list[pathlib.Path]:
  """`checkpoints` checkpoints under `target`, copied from `source`'s version 1.0."""
  written, minor = [], 0
  while len(written) < checkpoints:
    parent = None
    for kind, pattern in KINDS.items():
      if len(written) == checkpoints:
        break
      original = source / kind / pattern.format('1.0')
      copy = target / kind / pattern.format(f'1.{minor}')
      shutil.copytree(original, copy)
      _copy_export(pathlib.Path(f'{original}.onnx'), copy, f'1.{minor}')
      metadata_file = copy / 'metadata' / 'metadata'
      metadata = json.loads(metadata_file.read_text())
      metadata['version'] = f'1.{minor}'
      if parent is not None:
        metadata['source'] = {'path': str(parent), 'kind': parent.parent.name,
                              'version': f'1.{minor}'}
      metadata_file.write_text(json.dumps(metadata))
      written.append(copy)
      parent = copy
    minor += 1
  return written


def _copy_export(original: pathlib.Path, checkpoint: pathlib.Path, version: str) -> None:
  """The export beside `checkpoint`, its metadata naming that version and checkpoint."""
  model = onnx.load(original)
  props = {prop.key: prop.value for prop in model.metadata_props}
  props.update({'dnnr_jax.version': version, 'dnnr_jax.source_checkpoint': str(checkpoint)})
  del model.metadata_props[:]
  onnx.helper.set_model_props(model, props)
  onnx.save(model, f'{checkpoint}.onnx')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--source', required=True, type=pathlib.Path,
                      help='a models folder holding a pipeline version 1.0')
  parser.add_argument('--checkpoints', type=int, default=50)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as scratch:
    models = pathlib.Path(scratch) / 'models'
    paths = build(args.source, models, args.checkpoints)
    orbax = ('from dnnr_jax.io import checkpoint; '
             f'[checkpoint.read_metadata(p) for p in {[str(p) for p in paths]!r}]')
    commands = {
        'dnnr models': [sys.executable, '-m', 'dnnr_jax', 'models', '--models-dir', str(models)],
        'orbax read_metadata': [sys.executable, '-c', orbax],
        'python -c pass': [sys.executable, '-c', 'pass'],
    }
    seconds = {name: [] for name in commands}
    for _ in range(args.repeats):
      for name, command in commands.items():
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        seconds[name].append(time.perf_counter() - start)
  medians = {name: statistics.median(values) for name, values in seconds.items()}
  results = {'checkpoints': len(paths), 'onnx_files': len(paths), 'repeats': args.repeats,
             'median_seconds': medians, 'all_seconds': seconds,
             'orbax_over_dnnr_models': medians['orbax read_metadata'] / medians['dnnr models']}
  if args.json:
    print(json.dumps(results))
    return
  print(f'{len(paths)} checkpoints + {len(paths)} ONNX files, median of {args.repeats} '
        'interleaved runs (wall clock of the whole process):')
  for name, value in medians.items():
    print(f'  {name:22s} {value:6.3f} s  ({min(seconds[name]):.3f}-{max(seconds[name]):.3f})')
  print(f"  orbax / dnnr models: {results['orbax_over_dnnr_models']:.1f}x")


if __name__ == '__main__':
  main()
