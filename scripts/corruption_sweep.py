"""Flips bytes all over checkpoints and ONNX files and counts what loading makes of each.

For every file of each checkpoint, `--flips` positions spread evenly over the
file are each XORed with `--mask` in a fresh copy, which is then loaded with
`load_model`. Outcomes: 'digest' (refused: the digest no longer matches),
'refused' (refused for another reason, in one sentence), 'harmless' (loads with
bit-identical arrays and metadata: the byte is one no reader uses) and 'wrong'
(loads with other arrays or metadata: silently wrong). ONNX files go the same
way through `serve.load_onnx`, 'harmless' meaning identical logits on fixed
inputs. Prints one JSON object of counts.

  python scripts/corruption_sweep.py models/final/model_v1.0_final \
      --onnx models/final/model_v1.0_final.onnx --flips 40
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import shutil
import tempfile

import jax
import numpy as np

from dnnr_jax.errors import DnnrError, IntegrityError
from dnnr_jax.io import checkpoint, serve


def _flip(file: pathlib.Path, position: int, mask: int) -> None:
  data = bytearray(file.read_bytes())
  data[position] ^= mask
  file.write_bytes(bytes(data))


def _positions(size: int, flips: int) -> list[int]:
  return sorted({int(size * (index + 0.5) / flips) for index in range(flips)})


def _same(left, right) -> bool:
  return all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree.leaves(left), jax.tree.leaves(right), strict=True))


def sweep_checkpoint(path: pathlib.Path, flips: int, mask: int, scratch: pathlib.Path):
  good = checkpoint.load_model(path)
  counts = collections.Counter()
  for file in sorted(f for f in path.rglob('*') if f.is_file()):
    relative = file.relative_to(path)
    for position in _positions(file.stat().st_size, flips):
      copy = scratch / 'copy'
      shutil.rmtree(copy, ignore_errors=True)
      shutil.copytree(path, copy)
      _flip(copy / relative, position, mask)
      counts[_outcome(checkpoint.load_model, copy, lambda loaded: _same(
          loaded.variables, good.variables) and loaded.metadata == good.metadata)] += 1
  return dict(counts)


def _outcome(load, path: pathlib.Path, unchanged) -> str:
  """'digest' or 'refused' when `load(path)` fails, else 'harmless' or 'wrong'."""
  try:
    loaded = load(path)
  except IntegrityError:
    return 'digest'
  except DnnrError:
    return 'refused'
  return 'harmless' if unchanged(loaded) else 'wrong'


def sweep_onnx(path: pathlib.Path, flips: int, mask: int, scratch: pathlib.Path):
  good = serve.load_onnx(path)
  inputs = np.random.default_rng(0).normal(size=(16, good.session.get_inputs()[0].shape[1]))
  reference = good.predict(inputs)
  counts = collections.Counter()
  for position in _positions(path.stat().st_size, flips):
    copy = scratch / path.name
    shutil.copy(path, copy)
    _flip(copy, position, mask)
    counts[_outcome(serve.load_onnx, copy, lambda model: np.array_equal(
        model.predict(inputs), reference) and model.metadata == good.metadata)] += 1
  return dict(counts)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('checkpoints', nargs='*', type=pathlib.Path)
  parser.add_argument('--onnx', nargs='*', default=[], type=pathlib.Path)
  parser.add_argument('--flips', type=int, default=40, help='positions per file')
  parser.add_argument('--mask', type=lambda text: int(text, 0), default=0x01)
  args = parser.parse_args()
  scratch = pathlib.Path(tempfile.mkdtemp())
  try:
    results = {str(path): sweep_checkpoint(path, args.flips, args.mask, scratch)
               for path in args.checkpoints}
    results.update({str(path): sweep_onnx(path, args.flips, args.mask, scratch)
                    for path in args.onnx})
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  print(json.dumps(results, indent=2))


if __name__ == '__main__':
  main()
