"""Accuracy and size of prune + quantize over sparsities and fine-tuning seeds.

One final checkpoint, pruned and quantized the way a config's `compress`
section says, once per (sparsity, seed): how far the accuracy of a
compressed model is from the dense one, and how much that varies with
nothing but the fine-tuning's shuffling seed. Each run writes its own
models folder under --out, so an interrupted study resumes where it
stopped (finished runs are read back, not redone).

  python scripts/compression_study.py models/final/model_v1.0_final \
      --config configs/default.yaml --data-dir ../shared/data/mnist \
      --sparsities 0.94 0.955 --seeds 0 1 2 3 4 5 --out /tmp/study

prints a table per run and per sparsity (median, range, runs within the
accuracy margin of the dense model) and, with --json, one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time

from dnnr_jax.config import load_config
from dnnr_jax.errors import DnnrError
from dnnr_jax.io import storage
from dnnr_jax.io.checkpoint import read_metadata
from dnnr_jax.jobs import compress as jobs


def run_one(final: pathlib.Path, config, sparsity: float, seed: int, folder: pathlib.Path,
            data_dir) -> dict:
  """Prunes then quantizes `final` into `folder`, or reads back what it already holds."""
  quantized = folder / 'quantized' / 'quantized_model_v1.0'
  pruned = folder / 'pruned' / 'pruned_model_v1.0'
  start = time.perf_counter()
  if not quantized.is_dir():
    options = dict(seed=seed, data_dir=data_dir, models_dir=folder, version='1.0')
    if not pruned.is_dir():
      jobs.prune_checkpoint(
          final, dataclasses.replace(config.compress.prune, sparsity=sparsity), **options)
    jobs.quantize_checkpoint(pruned, config.compress.quantize, **options)
  return {
      'sparsity': sparsity, 'seed': seed,
      'pruned_accuracy': _accuracy(pruned), 'quantized_accuracy': _accuracy(quantized),
      'bytes': storage.directory_bytes(quantized), 'gzip_bytes': storage.gzip_bytes(quantized),
      'seconds': time.perf_counter() - start,
  }


def summarize(runs: list[dict], dense_accuracy: float, dense_bytes: int, margin: float) -> list:
  """Per sparsity: median and range of the quantized accuracy, size, runs within `margin`."""
  rows = []
  for sparsity in sorted({run['sparsity'] for run in runs}):
    chosen = [run for run in runs if run['sparsity'] == sparsity]
    accuracies = [run['quantized_accuracy'] for run in chosen]
    median = statistics.median(accuracies)
    rows.append({
        'sparsity': sparsity, 'runs': len(chosen),
        'median_accuracy': median,
        'min_accuracy': min(accuracies), 'max_accuracy': max(accuracies),
        'median_drop_pp': 100 * (dense_accuracy - median),
        'within_margin': sum(dense_accuracy - value <= margin + 1e-12 for value in accuracies),
        'median_times_smaller': dense_bytes / statistics.median(
            run['bytes'] for run in chosen),
    })
  return rows


def _accuracy(path: pathlib.Path) -> float:
  return float(read_metadata(path)['metrics']['test']['accuracy'])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('final', type=pathlib.Path, help='a final (dense) checkpoint')
  parser.add_argument('--config', default='configs/default.yaml',
                      help="its compress section says how to prune and quantize")
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='override a config key, e.g. compress.prune.finetune_epochs=5')
  parser.add_argument('--sparsities', type=float, nargs='+', required=True)
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--margin', type=float, default=0.002,
                      help='accuracy a compressed model may lose (default 0.002: 0.2 pp)')
  parser.add_argument('--data-dir', help='directory with the MNIST IDX files')
  parser.add_argument('--out', type=pathlib.Path, required=True,
                      help='one models folder per run goes here; reruns resume')
  parser.add_argument('--json', action='store_true', help='print one JSON object')
  args = parser.parse_args(argv)
  try:
    config = load_config(args.config, args.set)
    metadata = read_metadata(args.final)
    if metadata.get('kind') != 'final':
      raise DnnrError(f'{args.final} is a {metadata.get("kind")} checkpoint; pass a final one, '
                      'e.g. models/final/model_v1.0_final.')
    dense_accuracy = float(metadata['metrics']['test']['accuracy'])
    dense_bytes = storage.directory_bytes(args.final)
    runs = []
    for sparsity in args.sparsities:
      for seed in args.seeds:
        folder = args.out / f'sparsity{sparsity:g}_seed{seed}'
        runs.append(run_one(args.final.absolute(), config, sparsity, seed, folder,
                            args.data_dir))
        if not args.json:
          run = runs[-1]
          print(f"sparsity {sparsity:.3f} seed {seed}: pruned {run['pruned_accuracy']:.2%}, "
                f"quantized {run['quantized_accuracy']:.2%}, {run['bytes']:,} B "
                f"({dense_bytes / run['bytes']:.1f}x), {run['seconds']:.0f} s", flush=True)
  except DnnrError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  summary = summarize(runs, dense_accuracy, dense_bytes, args.margin)
  if args.json:
    print(json.dumps({'final': str(args.final), 'dense_accuracy': dense_accuracy,
                      'dense_bytes': dense_bytes, 'margin': args.margin,
                      'runs': runs, 'summary': summary}))
    return 0
  print(f'dense: {dense_accuracy:.2%}, {dense_bytes:,} B')
  for row in summary:
    print(f"sparsity {row['sparsity']:.3f}: quantized median {row['median_accuracy']:.2%} "
          f"(range {row['min_accuracy']:.2%}-{row['max_accuracy']:.2%}, "
          f"-{row['median_drop_pp']:.2f} pp), {row['within_margin']}/{row['runs']} within "
          f"{100 * args.margin:.2g} pp, {row['median_times_smaller']:.1f}x smaller")
  return 0


if __name__ == '__main__':
  sys.exit(main())
