"""What `dnnr models show` and `dnnr models diff` report, from metadata alone.

`show` follows an entry's lineage back to its final model and gives each
step's settings: training as the keys that differ from `Config()`'s
defaults, then the prune and quantize settings, then the export's. `diff`
flattens two entries' metadata into dotted keys and pairs them, marking what
changed.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Mapping

from dnnr_jax.config import Config
from dnnr_jax.io.registry import Entry, Registry, locate

TRAINING_SECTIONS = ('data', 'model', 'thresholds', 'routing', 'training')
CARD_SUFFIX = '.card.md'  # a checkpoint's model card: `card_path`
# Metadata too long to list or compare key by key, or already shown elsewhere.
LEFT_OUT = ('layout', 'history', 'integrity', 'format', 'library_versions')
EXPORT_SETTINGS = ('dnnr_jax.routing', 'dnnr_jax.input', 'dnnr_jax.normalisation',
                   'dnnr_jax.thresholds')


@dataclasses.dataclass(frozen=True)
class Step:
  """One link of a lineage: an entry and the settings that made it from its parent."""
  entry: Entry
  settings: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Details:
  """Everything `dnnr models show` prints about one entry.

  Attributes:
    entry: the entry shown.
    lineage: its steps, from the final model it started from to itself.
    derived: entries made from it (its exports, pruned or quantized versions).
    metrics: flattened test (and train, validation, before-compression) metrics.
    routes: route agreement with its source and accuracy on each path.
    library_versions: the packages that wrote it.
    files: what belongs to it: its model card, pipeline report and plots.
  """
  entry: Entry
  lineage: tuple[Step, ...]
  derived: tuple[Entry, ...]
  metrics: dict[str, Any]
  routes: dict[str, Any]
  library_versions: dict[str, str]
  files: dict[str, pathlib.Path]


@dataclasses.dataclass(frozen=True)
class DiffRow:
  """One dotted key of two entries' metadata."""
  key: str
  left: Any
  right: Any

  @property
  def changed(self) -> bool:
    return self.left != self.right


@dataclasses.dataclass(frozen=True)
class Diff:
  """Two entries' settings and metrics side by side."""
  left: Entry
  right: Entry
  rows: tuple[DiffRow, ...]


def show(models_dir: str | os.PathLike, ref: str) -> Details:
  """The lineage, settings, metrics and files of the entry `ref` names.

  Raises:
    DnnrError: `models_dir` does not exist, or `ref` names no entry or several.
  """
  registry, entry = locate(models_dir, ref)
  return details(registry, entry)


def details(registry: Registry, entry: Entry) -> Details:
  """`show` for an entry already found."""
  checkpoint = _checkpoint_of(registry, entry)
  metadata = checkpoint.metadata if checkpoint else {}
  return Details(
      entry=entry,
      lineage=tuple(Step(link, step_settings(link)) for link in registry.lineage(entry)),
      derived=registry.children(entry),
      metrics=flatten(metadata.get('metrics', {})),
      routes=dict(metadata.get('routes', {})),
      library_versions=dict(metadata.get('library_versions', {})),
      files=belonging_files(registry, checkpoint) if checkpoint else {})


def step_settings(entry: Entry) -> dict[str, Any]:
  """The settings that made `entry` from its parent, as dotted keys."""
  metadata = entry.metadata
  if entry.format == 'onnx':
    return {key.removeprefix('dnnr_jax.'): metadata[key] for key in EXPORT_SETTINGS
            if key in metadata}
  if entry.kind == 'final':
    return config_changes(metadata.get('config', {}))
  settings = dict(metadata.get('compression', {}))
  report = settings.pop('sparsity_report', None)
  if isinstance(report, Mapping) and 'overall' in report:
    settings['measured_sparsity'] = report['overall'].get('sparsity')
  calibration = settings.pop('calibration', None)
  if isinstance(calibration, Mapping):  # Its per-layer ranges are data, not settings.
    settings['calibration'] = {key: value for key, value in calibration.items()
                               if key != 'ranges'}
  return flatten(settings)


def config_changes(config: Mapping[str, Any]) -> dict[str, Any]:
  """The training sections' keys whose values differ from `Config()`'s defaults."""
  defaults = flatten({name: Config().to_dict()[name] for name in TRAINING_SECTIONS})
  values = flatten({name: config.get(name, {}) for name in TRAINING_SECTIONS})
  return {key: value for key, value in values.items() if defaults.get(key, object()) != value}


def card_path(checkpoint: pathlib.Path) -> pathlib.Path:
  """`models/final/model_v1.0_final.card.md` beside `models/final/model_v1.0_final`."""
  return checkpoint.with_name(checkpoint.name + CARD_SUFFIX)


def belonging_files(registry: Registry, checkpoint: Entry) -> dict[str, pathlib.Path]:
  """The card beside `checkpoint`, and the pipeline report and plots that made it."""
  files = {}
  card = card_path(checkpoint.path)
  if card.is_file():
    files['card'] = card
  pipeline = checkpoint.metadata.get('pipeline')
  if isinstance(pipeline, Mapping) and 'version' in pipeline:
    report_dir = registry.root / 'reports' / f"v{pipeline['version']}"
    if (report_dir / 'report.md').is_file():
      files['report'] = report_dir / 'report.md'
    files.update({f'plot {plot.stem}': plot for plot in sorted(report_dir.glob('*.png'))})
  return files


def diff(models_dir: str | os.PathLike, left: str, right: str) -> Diff:
  """The metadata of the entries `left` and `right` name, key by key.

  Raises:
    DnnrError: `models_dir` does not exist, or a ref names no entry or several.
  """
  _, left_entry = locate(models_dir, left)
  _, right_entry = locate(models_dir, right)
  flat = [_comparable(entry) for entry in (left_entry, right_entry)]
  keys = list(flat[0]) + [key for key in flat[1] if key not in flat[0]]
  return Diff(left_entry, right_entry, tuple(
      DiffRow(key, flat[0].get(key), flat[1].get(key)) for key in keys))


def flatten(value: Any, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists and scalars are leaves."""
  if not isinstance(value, Mapping):
    return {prefix: value} if prefix else {}
  flat = {}
  for key, item in value.items():
    flat.update(flatten(item, f'{prefix}.{key}' if prefix else str(key)))
  return flat


def _comparable(entry: Entry) -> dict[str, Any]:
  summary = {'kind': entry.kind, 'version': entry.version, 'format': entry.format,
             'state': entry.state, 'bytes': entry.bytes,
             'smaller_than_root': entry.smaller_than_root,
             'parent': None if entry.parent is None else str(entry.parent)}
  rest = {key: value for key, value in entry.metadata.items()
          if key not in LEFT_OUT and key not in ('kind', 'version', 'source')}
  if entry.format == 'onnx':
    summary.update(test_accuracy=entry.test_accuracy, deep_fraction=entry.deep_fraction)
  return {**summary, **flatten(rest),
          **flatten({'library_versions': entry.metadata.get('library_versions', {})})}


def _checkpoint_of(registry: Registry, entry: Entry) -> Entry | None:
  """The entry itself if a checkpoint, else the checkpoint it was exported from."""
  if entry.format == 'orbax':
    return entry
  parent = registry.get(entry.parent) if entry.parent else None
  return parent if parent is not None and parent.format == 'orbax' else None
