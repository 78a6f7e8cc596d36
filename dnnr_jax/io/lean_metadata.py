"""Checkpoint metadata without copies: what format 8 leaves out, and how a load puts it back.

Some metadata entries are copies of others, kept because readers (`dnnr
models`, reports, budget search, `load_model`) look them up where they are:

- 'quantization' ({mode, bits}) copies `compression`'s mode and bits;
- 'dataset.normalisation' copies `config.data`'s mean and std, 'dataset.name'
  and '.validation_examples' its `dataset` and `validation_size`;
- 'thresholds' copies `config.thresholds.final` (a compressed model
  fine-tunes with its source's thresholds fixed, as its config's final ones);
- 'array_bytes' (a compression job's stored bytes) copies the layout's
  `entropy_coded` (format 8: the one coded stream's length);
- 'accuracy_guard.accuracy_before' and '.accuracy' copy
  `metrics.validation_before.accuracy` and `metrics.validation.accuracy`.

`lean` drops each copy that equals its source; `full` puts it back, so every
reader sees the same metadata in every format. Where a copy is absent but its
source is there (a checkpoint saved without 'quantization' beside a
`compression` with mode and bits), `lean` writes it as null and `full`
removes it, so the round trip is exact (a copy saved as null where its source
exists reads as absent). Pure JSON: `dnnr models` uses it
without NumPy or JAX.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

_ABSENT = object()


def _get(metadata: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    if not isinstance(metadata, dict) or key not in metadata:
      return _ABSENT
    metadata = metadata[key]
  return metadata


def _quantization(metadata: dict[str, Any]) -> Any:
  compression = _get(metadata, ('compression',))
  if not isinstance(compression, dict) or not {'mode', 'bits'} <= set(compression):
    return _ABSENT
  return {'mode': compression['mode'], 'bits': compression['bits']}


def _normalisation(metadata: dict[str, Any]) -> Any:
  data = _get(metadata, ('config', 'data'))
  if (not isinstance(data, dict) or not {'mean', 'std'} <= set(data)
      or not isinstance(_get(metadata, ('dataset',)), dict)):
    return _ABSENT
  return {'mean': data['mean'], 'std': data['std']}


def _copy_of(owner: str, *path: str) -> Callable[[dict[str, Any]], Any]:
  """The value at `path`, where the metadata has a mapping `owner` to hold the copy."""
  def source(metadata: dict[str, Any]) -> Any:
    if owner and not isinstance(_get(metadata, (owner,)), dict):
      return _ABSENT
    return _get(metadata, path)
  return source


# Each copy's place, and its value from the rest of the metadata (_ABSENT when it has none).
COPIES: tuple[tuple[tuple[str, ...], Callable[[dict[str, Any]], Any]], ...] = (
    (('quantization',), _quantization),
    (('thresholds',), _copy_of('', 'config', 'thresholds', 'final')),
    (('dataset', 'normalisation'), _normalisation),
    (('dataset', 'name'), _copy_of('dataset', 'config', 'data', 'dataset')),
    (('dataset', 'validation_examples'), _copy_of('dataset', 'config', 'data', 'validation_size')),
    (('accuracy_guard', 'accuracy_before'),
     _copy_of('accuracy_guard', 'metrics', 'validation_before', 'accuracy')),
    (('accuracy_guard', 'accuracy'),
     _copy_of('accuracy_guard', 'metrics', 'validation', 'accuracy')),
    (('array_bytes',), _copy_of('', 'layout', 'entropy_coded')),
)


def lean(metadata: dict[str, Any]) -> dict[str, Any]:
  """`metadata` with every copy that `full` restores left out (see the module docstring)."""
  result = copy.deepcopy(metadata)
  for path, source in COPIES:
    *parents, key = path
    value, derived = _get(metadata, path), source(metadata)
    owner = _get(result, tuple(parents))
    if value is _ABSENT and derived is not _ABSENT:
      owner[key] = None  # Absent, although `full` could derive it.
    elif value is not _ABSENT and value == derived:
      del owner[key]
  if full(result) != metadata:  # A null stored where a copy belongs: kept as it is.
    return copy.deepcopy(metadata)
  return result


def full(metadata: dict[str, Any]) -> dict[str, Any]:
  """The metadata `lean` shortened, every copy back in place: its exact inverse."""
  result = copy.deepcopy(metadata)
  for path, source in COPIES:
    *parents, key = path
    owner = _get(result, tuple(parents))
    if not isinstance(owner, dict):
      continue
    derived = source(result)
    if derived is _ABSENT:
      continue
    if key not in owner:
      owner[key] = copy.deepcopy(derived)
    elif owner[key] is None:
      del owner[key]
  return result
