"""What the integrity checks and fsync cost: load and save times with and without them.

Times each check alone (the digests of the arrays and of the metadata, the
layout against the config), loads each checkpoint with every check and with
the checks replaced by no-ops, and saves
it again with and without fsync; the two variants alternate in every round so
that a busy machine slows both alike. Prints one JSON object: per checkpoint,
the median seconds of each variant and their ratio.

  python scripts/reliability_cost.py models/final/model_v1.0_final \
      models/pruned/pruned_model_v1.0 models/quantized/quantized_model_v1.0
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import pathlib
import shutil
import statistics
import tempfile
import time

from dnnr_jax.io import checkpoint, durable, integrity, storage
from dnnr_jax.model import model_from_config


@contextlib.contextmanager
def _without(module, *names):
  saved = {name: getattr(module, name) for name in names}
  for name in names:
    setattr(module, name, lambda *args, **kwargs: None)
  try:
    yield
  finally:
    for name, value in saved.items():
      setattr(module, name, value)


def _unchecked():
  stack = contextlib.ExitStack()
  stack.enter_context(_without(integrity, 'verify_metadata', 'verify_arrays'))
  stack.enter_context(_without(checkpoint, '_check_layout'))
  return stack


def _timed(function) -> float:
  start = time.perf_counter()
  function()
  return time.perf_counter() - start


def measure(path: pathlib.Path, rounds: int, scratch: pathlib.Path) -> dict:
  loaded = checkpoint.load_model(path)  # warm-up: imports, Orbax, eval_shape
  metadata = {key: value for key, value in loaded.metadata.items()
              if key not in ('layout', integrity.KEY, 'format', 'format_version')}
  times = {'load_checked': [], 'load_unchecked': [], 'save_fsync': [], 'save_no_fsync': []}
  for index in range(rounds):
    times['load_checked'].append(_timed(lambda: checkpoint.load_model(path)))
    with _unchecked():
      times['load_unchecked'].append(_timed(lambda: checkpoint.load_model(path)))
    times['save_fsync'].append(_timed(functools.partial(
        checkpoint.save_checkpoint, scratch / f'fsync{index}', loaded.variables, metadata)))
    with _without(durable, 'fsync_tree', 'fsync_dir'):
      times['save_no_fsync'].append(_timed(functools.partial(
          checkpoint.save_checkpoint, scratch / f'plain{index}', loaded.variables, metadata)))
  # Each check alone, which a busy machine blurs less than the whole load.
  blobs, _ = storage.encode_variables(loaded.variables)
  model = model_from_config(loaded.config)
  layout = loaded.metadata['layout']
  rest = {key: value for key, value in loaded.metadata.items() if key != integrity.KEY}
  for name, function in (
      ('digest_arrays', lambda: integrity.tree_digests(blobs)),
      ('digest_metadata', lambda: integrity.json_digest(rest)),
      ('check_layout', lambda: checkpoint._check_layout(path, layout, model,
                                                        loaded.num_features))):
    times[name] = [_timed(function) for _ in range(rounds)]
  medians = {name: statistics.median(values) for name, values in times.items()}
  return {
      'path': str(path),
      'bytes': sum(f.stat().st_size for f in path.rglob('*') if f.is_file()),
      'rounds': rounds,
      **{f'{name}_s': value for name, value in medians.items()},
      'load_ratio': medians['load_checked'] / medians['load_unchecked'],
      'save_ratio': medians['save_fsync'] / medians['save_no_fsync'],
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('checkpoints', nargs='+', type=pathlib.Path)
  parser.add_argument('--rounds', type=int, default=15)
  parser.add_argument('--scratch', type=pathlib.Path,
                      help='folder for the saves (default: a temporary one)')
  args = parser.parse_args()
  scratch = pathlib.Path(tempfile.mkdtemp(dir=args.scratch))
  try:
    results = [measure(path, args.rounds, scratch / path.name) for path in args.checkpoints]
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  print(json.dumps(results, indent=2))


if __name__ == '__main__':
  main()
