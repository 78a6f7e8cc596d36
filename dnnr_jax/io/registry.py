"""The models folder as a registry: every version, its lineage, state and size.

`scan(models_dir)` lists each checkpoint under final/, pruned/ and quantized/
and each ONNX export beside them as an `Entry`: kind, version, creation
time, lineage parent, data set, test accuracy, deep-path fraction, bytes on
disk, the size ratio against the dense root of its lineage, and a state —
'ok', 'damaged' or 'incomplete' (`dnnr_jax.io.artifact_state`). It reads the
JSON metadata files and the ONNX `metadata_props` only: no JAX, no arrays, so
a folder of fifty checkpoints and their exports lists in under a second
(docs/registry.md).

A REF names an entry: a path, or `kind:version` (`quantized:1.0`) for a
checkpoint and `kind:version.onnx` (`quantized:1.0.onnx`) for its export.

Built on this: `model_details` (show, diff), `model_card` (write_card) and
`model_removal` (plan_rm, plan_gc, remove), behind `dnnr models`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Mapping

from dnnr_jax.errors import DnnrError
from dnnr_jax.io.artifact_state import checkpoint_state, export_state

# Mirrors `checkpoint.KINDS` (which cannot be imported without JAX); a test holds them equal.
KINDS = {
    'final': 'model_v{version}_final',
    'pruned': 'pruned_model_v{version}',
    'quantized': 'quantized_model_v{version}',
    'calibrated': 'calibrated_model_v{version}',
}
_REF = re.compile(r'^(?P<kind>[a-z]+):(?P<version>\d+\.\d+)(?P<onnx>\.onnx)?$')


@dataclasses.dataclass(frozen=True)
class Entry:
  """One version in the models folder: a checkpoint or an ONNX export.

  Attributes:
    path: the checkpoint directory or `.onnx` file (absolute).
    format: 'orbax' or 'onnx'.
    kind, version: from its metadata (from its name where that is unreadable).
    created: ISO time of the save (checkpoints only).
    parent: the checkpoint it was made from (an ONNX file's is its checkpoint).
    dataset: the data set's name.
    test_accuracy, deep_fraction: on the test split, as measured when it was
      written (an export's, from its pipeline report); None if not measured.
    bytes: on disk.
    smaller_than_root: bytes of the final checkpoint its lineage starts from
      over its own; None when that root is not in the folder.
    state: 'ok', 'damaged' or 'incomplete'; `problem` says why when not ok.
    metadata: the checkpoint's metadata, or an export's metadata_props.
  """
  path: pathlib.Path
  format: str
  kind: str | None
  version: str | None
  created: str | None
  parent: pathlib.Path | None
  dataset: str | None
  test_accuracy: float | None
  deep_fraction: float | None
  bytes: int
  smaller_than_root: float | None
  state: str
  problem: str
  metadata: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)

  @property
  def ref(self) -> str:
    """`kind:version` (`.onnx` added for an export), or the path when unnamed."""
    if self.kind is None or self.version is None or self.path.name.startswith('.'):
      return str(self.path)
    return f'{self.kind}:{self.version}' + ('.onnx' if self.format == 'onnx' else '')

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready row (metadata left out)."""
    row = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
           if field.name != 'metadata'}
    row.update(ref=self.ref, path=str(self.path),
               parent=None if self.parent is None else str(self.parent))
    return row


@dataclasses.dataclass(frozen=True)
class Registry:
  """Every entry of one models folder, ordered by kind, version and format."""
  root: pathlib.Path
  entries: tuple[Entry, ...]

  def get(self, path: pathlib.Path) -> Entry | None:
    return next((entry for entry in self.entries if entry.path == path), None)

  def find(self, ref: str) -> Entry:
    """The one entry `ref` names.

    Raises:
      DnnrError: `ref` names no entry, or more than one.
    """
    match = _REF.fullmatch(ref)
    if match:
      fmt = 'onnx' if match['onnx'] else 'orbax'
      found = [entry for entry in self.entries if (entry.kind, entry.version, entry.format)
               == (match['kind'], match['version'], fmt)]
    else:
      path = pathlib.Path(ref).absolute()
      found = [entry for entry in self.entries if entry.path == path]
    if not found:
      raise DnnrError(
          f'{ref!r} names no version in {self.root}; pass a path or kind:version as '
          'dnnr models lists them (e.g. quantized:1.0, or quantized:1.0.onnx for its export).')
    if len(found) > 1:
      raise DnnrError(
          f'{ref!r} names {len(found)} versions in {self.root} '
          f"({', '.join(entry.path.name for entry in found)}); pass one of their paths instead.")
    return found[0]

  def children(self, entry: Entry) -> tuple[Entry, ...]:
    """Entries made from `entry` (its exports and the checkpoints derived from it)."""
    return tuple(child for child in self.entries if child.parent == entry.path)

  def lineage(self, entry: Entry) -> tuple[Entry, ...]:
    """`entry` and its ancestors in this folder, the root (a final model) first."""
    chain = [entry]
    while chain[-1].parent is not None and len(chain) <= len(self.entries):
      parent = self.get(chain[-1].parent)
      if parent is None:
        break
      chain.append(parent)
    return tuple(reversed(chain))


def scan(models_dir: str | os.PathLike) -> Registry:
  """Lists every checkpoint and ONNX export under `models_dir`, metadata only.

  Raises:
    DnnrError: `models_dir` is not a directory.
  """
  root = pathlib.Path(models_dir).absolute()
  if not root.is_dir():
    raise DnnrError(f'models folder {root} does not exist; pass models_dir of a folder '
                    'that dnnr train or dnnr pipeline wrote (e.g. models).')
  reports = _pipeline_reports(root)
  entries = []
  for kind in KINDS:
    folder = root / kind
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
      if path.is_dir():
        entries.append(_read_checkpoint(path, kind))
      elif path.name.endswith(('.onnx', '.onnx.partial')):
        entries.append(_read_export(path, kind, reports))
  by_ref = {(entry.kind, entry.version): entry.path for entry in entries
            if entry.format == 'orbax' and not entry.path.name.startswith('.')}
  paths = {entry.path for entry in entries}
  entries = [dataclasses.replace(entry, parent=_parent(entry, root, paths, by_ref))
             for entry in entries]
  registry = Registry(root, tuple(sorted(entries, key=_order)))
  return dataclasses.replace(registry, entries=tuple(
      dataclasses.replace(entry, smaller_than_root=_smaller_than_root(registry, entry))
      for entry in registry.entries))


def locate(models_dir: str | os.PathLike, ref: str) -> tuple[Registry, Entry]:
  """The registry that holds `ref`, and the entry it names.

  A path outside `models_dir` is looked up in the models folder that holds it
  (two levels up: `<models>/<kind>/<name>`).
  """
  if not _REF.fullmatch(ref):
    path, root = pathlib.Path(ref).absolute(), pathlib.Path(models_dir).absolute()
    if path.exists() and root not in path.parents:
      models_dir = path.parent.parent
  registry = scan(models_dir)
  return registry, registry.find(ref)


def _read_checkpoint(path: pathlib.Path, kind: str) -> Entry:
  files, size = set(), 0
  for folder, _, names in os.walk(path):
    for name in names:
      file = pathlib.Path(folder, name)
      files.add(file.relative_to(path).as_posix())
      size += _size(file)
  state, problem, metadata = checkpoint_state(path, files)
  metrics = _mapping(_mapping(metadata.get('metrics')).get('test'))
  dataset = metadata.get('dataset')
  return Entry(
      path=path, format='orbax', kind=_text(metadata.get('kind')) or kind,
      version=_text(metadata.get('version')) or _version_from_name(path.name, kind),
      created=_text(metadata.get('created')),
      parent=_path_or_none(_mapping(metadata.get('source')).get('path')),
      dataset=_text(_mapping(dataset).get('name') if isinstance(dataset, dict) else dataset),
      test_accuracy=_number(metrics.get('accuracy')),
      deep_fraction=_number(metrics.get('deep_fraction')),
      bytes=size, smaller_than_root=None, state=state, problem=problem, metadata=metadata)


def _read_export(path: pathlib.Path, kind: str, reports: dict[str, Any]) -> Entry:
  state, problem, props = export_state(path)
  checkpoint_name = path.name.removesuffix('.partial').removesuffix('.onnx').lstrip('.')
  version = props.get('dnnr_jax.version') or _version_from_name(checkpoint_name, kind)
  row = reports.get((path.name, props.get('dnnr_jax.pipeline_hash')), {})
  source = props.get('dnnr_jax.source_checkpoint')
  # An export's checkpoint is the directory it was exported from, else the one it sits beside.
  parent = pathlib.Path(source) if source else path.with_name(checkpoint_name)
  return Entry(
      path=path, format='onnx', kind=props.get('dnnr_jax.kind', kind), version=version,
      created=None, parent=parent, dataset=props.get('dnnr_jax.dataset'),
      test_accuracy=_number(row.get('test_accuracy')),
      deep_fraction=_number(row.get('deep_fraction')),
      bytes=_size(path), smaller_than_root=None, state=state, problem=problem, metadata=props)


def _pipeline_reports(root: pathlib.Path) -> dict[tuple[str, str], dict[str, Any]]:
  """Report rows of the ONNX exports, keyed by (file name, pipeline hash)."""
  rows = {}
  for report_file in sorted((root / 'reports').glob('v*/report.json')):
    try:
      report = json.loads(report_file.read_text())
      for row in report['rows']:
        if row.get('format') == 'onnx':
          kind = row['artifact'].split()[0]
          rows[(pathlib.Path(row['path']).name, report['hashes'][kind])] = row
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
      continue  # A report that does not read adds no measurements.
  return rows


def _parent(entry: Entry, root: pathlib.Path, paths: set[pathlib.Path],
            by_ref) -> pathlib.Path | None:
  """The recorded parent, found in this folder when the folder was moved or copied.

  Paths are recorded absolute. A parent recorded outside `root` whose name
  (`<kind>/<name>`) is here is taken to be that one, so a copied folder (a
  backup) keeps its own lineage; a recorded path that no longer exists falls
  back to the same kind:version here (a folder moved and renamed).
  """
  recorded = entry.parent
  if recorded is None or recorded in paths:
    return recorded
  here = root / recorded.parent.name / recorded.name
  if here in paths:
    return here
  if recorded.exists():
    return recorded
  if entry.format == 'onnx':
    beside = entry.path.with_name(entry.path.name[:-len('.onnx')])
    return beside if beside in paths else recorded
  source = _mapping(entry.metadata.get('source'))
  return by_ref.get((source.get('kind'), source.get('version')), recorded)


def _smaller_than_root(registry: Registry, entry: Entry) -> float | None:
  root = registry.lineage(entry)[0]
  if root.kind != 'final' or root.format != 'orbax' or root.state != 'ok' or not entry.bytes:
    return None
  return root.bytes / entry.bytes


def _order(entry: Entry):
  kind = list(KINDS).index(entry.kind) if entry.kind in KINDS else len(KINDS)
  version = tuple(int(part) for part in entry.version.split('.')) if entry.version and all(
      part.isdigit() for part in entry.version.split('.')) else (-1,)
  return kind, version, entry.format == 'onnx', entry.path.name


def _version_from_name(name: str, kind: str) -> str | None:
  pattern = re.escape(KINDS[kind]).replace(r'\{version\}', r'(\d+\.\d+)')
  match = re.search(pattern, name)
  return match[1] if match else None


def _size(path: pathlib.Path) -> int:
  try:
    return path.stat().st_size
  except OSError:  # A dangling link or a file removed meanwhile holds no bytes.
    return 0


def _text(value: Any) -> str | None:
  return value if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
  return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _mapping(value: Any) -> Mapping[str, Any]:
  return value if isinstance(value, Mapping) else {}


def _path_or_none(value: Any) -> pathlib.Path | None:
  return pathlib.Path(value) if isinstance(value, str) and value else None
