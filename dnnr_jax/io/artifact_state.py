"""Whether a checkpoint directory or an ONNX file is sound, from its files and metadata.

States: 'ok'; 'incomplete' when a file a finished save writes is missing, or
the path carries the hidden name of a save still running or interrupted
(`.NAME.partial`, `.old`, `.trash`); 'damaged' when the files are there but do
not read as a dnnr_jax model. No arrays are read, so a folder of versions is
checked in milliseconds.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from dnnr_jax.errors import IntegrityError
from dnnr_jax.io import integrity, lean_metadata, onnx_props

FORMAT = 'dnnr_jax'
STATES = ('ok', 'damaged', 'incomplete')
# Files every complete checkpoint has (Orbax writes them last, on commit).
REQUIRED_FILES = ('_CHECKPOINT_METADATA', 'metadata/metadata', 'variables/_METADATA')
# Metadata entries that are mappings when present (whose own values are mappings too).
MAPPINGS = {'config': ('data', 'model', 'thresholds', 'routing', 'training'),
            'metrics': None, 'dataset': (), 'source': (), 'compression': (), 'routes': (),
            'thresholds': (), 'library_versions': (), 'pipeline': (), 'quantization': ()}
# Hidden names a save leaves while it runs or when it is interrupted (see checkpoint.py).
UNFINISHED_SUFFIXES = ('.partial', '.old', '.trash')


def checkpoint_state(path: pathlib.Path, files: set[str]) -> tuple[str, str, dict[str, Any]]:
  """(state, problem, metadata) of the checkpoint directory `path`, holding `files`.

  This is the one place that decides whether a checkpoint is sound: from the
  files present and the metadata JSON, never the arrays.
  """
  if path.name.startswith('.') and path.name.endswith(UNFINISHED_SUFFIXES):
    return 'incomplete', 'an unfinished or interrupted save left it under a hidden name', {}
  missing = [name for name in REQUIRED_FILES if name not in files] + _missing_arrays(files)
  if missing:
    return 'incomplete', f"missing {', '.join(missing)}", {}
  try:
    metadata = json.loads((path / 'metadata' / 'metadata').read_text())
  except (OSError, UnicodeDecodeError, ValueError) as error:
    return 'damaged', f'its metadata is not readable JSON ({type(error).__name__})', {}
  if not isinstance(metadata, dict) or metadata.get('format') != FORMAT:
    return 'damaged', f"its metadata has no 'format: {FORMAT}'", {}
  stored = metadata
  version = metadata.get('format_version')
  if isinstance(version, int) and not isinstance(version, bool) and version >= 8:
    metadata = lean_metadata.full(metadata)  # The copies format 8 leaves out, back in place.
  absent = [key for key in ('format_version', 'kind', 'version', 'config', 'layout')
            if key not in metadata]
  if absent:
    return 'damaged', f"its metadata lacks {', '.join(absent)}", metadata
  malformed = _malformed(metadata)
  if malformed:
    return 'damaged', f'its metadata has {malformed} where a mapping belongs', metadata
  try:  # The digest recorded of the metadata as stored; no array is read.
    integrity.verify_metadata(path, stored)
  except IntegrityError:
    return 'damaged', 'its metadata no longer matches the digest recorded when it was saved', (
        metadata)
  return 'ok', '', metadata


def _missing_arrays(files: set[str]) -> list[str]:
  """The array files `files` lacks: OCDBT's, or plain zarr's (a compressed model, formats 7, 8)."""
  zarr = {name.rsplit('/', 1)[0] for name in files
          if name.startswith('variables/') and name.endswith('/.zarray')}
  if zarr and 'variables/manifest.ocdbt' not in files:
    chunks = {name.rsplit('/', 1)[0] for name in files if not name.endswith('/.zarray')}
    return [f'{folder}/0 (the array data)' for folder in sorted(zarr - chunks)]
  missing = [] if 'variables/manifest.ocdbt' in files else ['variables/manifest.ocdbt']
  if not any(name.startswith('variables/') and '/d/' in f'/{name}' for name in files):
    missing.append('variables/d/ (the array data)')
  return missing


def export_state(path: pathlib.Path) -> tuple[str, str, dict[str, str]]:
  """(state, problem, metadata_props) of the ONNX file `path`."""
  if path.name.startswith('.') and path.name.endswith(UNFINISHED_SUFFIXES):
    return 'incomplete', 'an unfinished or interrupted export left it under a hidden name', {}
  try:
    props = onnx_props.read_metadata_props(path)
  except (OSError, UnicodeDecodeError, ValueError) as error:
    return 'damaged', f'it does not read as ONNX ({error})', {}
  if 'dnnr_jax.kind' not in props:
    return 'damaged', 'it carries no dnnr_jax metadata (not written by dnnr export)', props
  return 'ok', '', props


def _malformed(metadata: dict[str, Any]) -> str | None:
  """The first dotted key holding something other than a mapping, per `MAPPINGS`."""
  for key, inner in MAPPINGS.items():
    value = metadata.get(key, {})
    if not isinstance(value, dict):
      return f"'{key}'"
    names = value if inner is None else inner
    for name in names:
      if name in value and not isinstance(value[name], dict):
        return f"'{key}.{name}'"
  return None
