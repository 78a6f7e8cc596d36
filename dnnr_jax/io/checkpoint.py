"""Versioned Orbax checkpoints and `load_model`.

A checkpoint is an Orbax directory with two items: `variables` (params and
thresholds, as arrays) and `metadata` (JSON: format, kind, version, config,
metrics, dataset, library versions, timestamp). Directories are named by
kind and version:

    <models>/final/model_v1.0_final/
    <models>/pruned/pruned_model_v1.0/
    <models>/quantized/quantized_model_v1.0/
    <models>/calibrated/calibrated_model_v1.0/   (thresholds for a budget)

A checkpoint is written under a hidden temporary name and renamed into place,
so an interrupted save never leaves a half-written version, and an existing
version is replaced only when asked.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import os
import pathlib
import platform
import re
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dnnr_jax.config import Config, config_from_dict
from dnnr_jax.errors import CheckpointError, ConfigError
from dnnr_jax.io import storage
from dnnr_jax.model import DynamicMLP, model_from_config

FORMAT = 'dnnr_jax'
# 2: arrays packed into one blob per dtype (compress.storage); 3: float32
# arrays that float16 holds exactly may be stored as float16. Format 2 reads
# the same way, so both are read.
FORMAT_VERSION = 4
READABLE_FORMAT_VERSIONS = (2, 3, 4)
KINDS = {
    'final': ('final', 'model_v{version}_final'),
    'pruned': ('pruned', 'pruned_model_v{version}'),
    'quantized': ('quantized', 'quantized_model_v{version}'),
    'calibrated': ('calibrated', 'calibrated_model_v{version}'),
}
_VERSION = re.compile(r'^(\d+)\.(\d+)$')


def checkpoint_path(models_dir: str | os.PathLike, kind: str, version: str) -> pathlib.Path:
  """Where the checkpoint of `kind` and `version` lives under `models_dir`."""
  folder, pattern = KINDS[kind]
  check_version(version)
  return pathlib.Path(models_dir) / folder / pattern.format(version=version)


def check_version(version: str) -> str:
  if not _VERSION.fullmatch(version):
    raise CheckpointError(
        f'version {version!r} is not of the form MAJOR.MINOR; pass e.g. '
        '--version 1.0.')
  return version


def next_version(models_dir: str | os.PathLike, kind: str) -> str:
  """'1.0' if no `kind` checkpoint exists yet, else the highest minor + 1."""
  folder, pattern = KINDS[kind]
  name = re.compile(
      '^' + re.escape(pattern).replace(r'\{version\}', r'(\d+)\.(\d+)') + '$')
  found = []
  directory = pathlib.Path(models_dir) / folder
  if directory.is_dir():
    for entry in directory.iterdir():
      match = name.match(entry.name)
      if match:
        found.append((int(match[1]), int(match[2])))
  if not found:
    return '1.0'
  major, minor = max(found)
  return f'{major}.{minor + 1}'


def ensure_writable(path: pathlib.Path, overwrite: bool) -> None:
  """Fails before any work if `path` exists and may not be replaced."""
  if path.exists() and not overwrite:
    raise CheckpointError(
        f'{path} already exists; pass --overwrite to replace it or choose '
        'another --version.')


def library_versions() -> dict[str, str]:
  versions = {'python': platform.python_version()}
  for package in ('dnnr_jax', 'jax', 'jaxlib', 'flax', 'optax',
                  'orbax-checkpoint', 'numpy'):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = 'not installed'
  return versions


def save_checkpoint(
    path: str | os.PathLike,
    variables: dict[str, Any],
    metadata: dict[str, Any],
    *,
    overwrite: bool = False,
) -> pathlib.Path:
  """Writes `variables` and `metadata` as an Orbax checkpoint at `path`.

  Every leaf is stored in its smallest encoding (`compress.storage`: sparse
  kernels as relative indices and values, int4 codes packed two per byte),
  described by a 'layout' entry added to the metadata with the format
  marker, library versions and a timestamp. The checkpoint is written beside
  `path` under a temporary name and renamed into place; an existing `path` is replaced only with
  `overwrite`, and only once the new one is complete.

  Returns:
    The absolute path written.
  """
  path = pathlib.Path(path).absolute()
  ensure_writable(path, overwrite)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays, layout = storage.encode_variables(variables)
  metadata = {
      'format': FORMAT,
      'format_version': FORMAT_VERSION,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(),
      'library_versions': library_versions(),
      **metadata,
      'layout': storage.compact_layout(layout),
  }
  staging = path.with_name(f'.{path.name}.partial')
  retired = path.with_name(f'.{path.name}.old')
  for leftover in (staging, retired):
    if leftover.exists():
      shutil.rmtree(leftover)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(
        staging,
        args=ocp.args.Composite(
            variables=ocp.args.StandardSave(arrays),
            metadata=ocp.args.JsonSave(metadata),
        ),
    )
  if path.exists():
    os.rename(path, retired)
    os.rename(staging, path)
    shutil.rmtree(retired)
  else:
    os.rename(staging, path)
  return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The metadata of a dnnr_jax checkpoint, checked to be ours."""
  path = _existing_checkpoint_dir(path)
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      restored = checkpointer.restore(
          path, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    metadata = restored['metadata']
  except Exception as error:  # Orbax raises many types for a bad directory.
    raise CheckpointError(
        f'{path} is not a readable dnnr_jax checkpoint (its metadata could '
        f'not be read: {_short(error)}); pass a directory written by dnnr.'
    ) from None
  if not isinstance(metadata, dict) or metadata.get('format') != FORMAT:
    raise CheckpointError(
        f'{path} is an Orbax checkpoint but not a dnnr_jax model (no '
        f"'format: {FORMAT}' in its metadata); pass a checkpoint written by "
        'dnnr.')
  if metadata.get('format_version') not in READABLE_FORMAT_VERSIONS:
    raise CheckpointError(
        f"{path} has checkpoint format {metadata.get('format_version')}, this dnnr_jax "
        f'reads formats {", ".join(map(str, READABLE_FORMAT_VERSIONS))}; write it again '
        'with this version.')
  if metadata['format_version'] >= 4:  # Earlier formats stored the layout expanded.
    try:
      metadata['layout'] = storage.expand_layout(metadata.get('layout'))
    except ValueError as error:
      raise CheckpointError(
          f'{path} has a damaged layout in its metadata ({error}); write it again '
          'with dnnr.') from None
  return metadata


def restore_variables(path: str | os.PathLike, layout: dict[str, Any]) -> Any:
  """Restores and decodes the `variables` item that `layout` describes."""
  path = _existing_checkpoint_dir(path)
  try:
    abstract = storage.abstract_arrays(layout)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      restored = checkpointer.restore(
          path,
          args=ocp.args.Composite(variables=ocp.args.StandardRestore(abstract)))
    return storage.decode_variables(restored['variables'], layout)
  except Exception as error:  # A truncated file surfaces from TensorStore.
    raise CheckpointError(
        f'{path} is damaged or incomplete (its arrays could not be read: '
        f'{_short(error)}); restore it from a copy or write it again.'
    ) from None


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A checkpoint ready for inference.

  Attributes:
    path: the checkpoint directory.
    model: the Flax module.
    variables: `{'params': ..., 'thresholds': ...}`.
    config: the configuration it was trained with.
    metadata: everything recorded beside the arrays.
  """
  path: pathlib.Path
  model: DynamicMLP
  variables: dict[str, Any]
  config: Config
  metadata: dict[str, Any]

  @property
  def num_features(self) -> int:
    return int(self.metadata['num_features'])

  def predict_with_routes(self, inputs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Logits [B, classes] and routes bool [B] of normalised inputs [B, F]."""
    inputs = self._check_inputs(inputs)
    logits, deep_path = _apply(self.model, self.variables, inputs)
    return np.asarray(logits), np.asarray(deep_path)

  def predict(self, inputs: Any) -> np.ndarray:
    """Logits [B, classes] of normalised inputs [B, F]."""
    return self.predict_with_routes(inputs)[0]

  def _check_inputs(self, inputs: Any) -> np.ndarray:
    inputs = np.asarray(inputs, np.float32)
    if inputs.ndim == 1:
      inputs = inputs[None]
    if inputs.ndim != 2 or inputs.shape[1] != self.num_features:
      raise CheckpointError(
          f'inputs of shape {inputs.shape} do not fit {self.path.name}, which '
          f'takes [batch, {self.num_features}] normalised features; flatten '
          'and normalise them first.')
    if not np.all(np.isfinite(inputs)):
      raise CheckpointError(
          'inputs contain NaN or infinite values; clean them before predict.')
    return inputs


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: DynamicMLP, variables, inputs):
  return model.apply(variables, inputs)


def load_model(path: str | os.PathLike) -> LoadedModel:
  """Loads a dnnr_jax checkpoint for inference.

  Args:
    path: a checkpoint directory, e.g. 'models/final/model_v1.0_final'.

  Returns:
    A `LoadedModel` with `.predict(x)`, `.variables`, `.config` and
    `.metadata`.

  Raises:
    CheckpointError: the directory is missing, not a dnnr_jax checkpoint, or
      damaged.

  Example:
    >>> model = load_model('models/final/model_v1.0_final')
    >>> logits = model.predict(images)  # [B, 784] normalised
  """
  path = _existing_checkpoint_dir(path)
  metadata = read_metadata(path)
  try:
    config = config_from_dict(metadata['config'], source=f'{path} metadata')
    int(metadata['num_features'])
    layout = dict(metadata['layout'])
  except (KeyError, TypeError, ValueError, ConfigError) as error:
    raise CheckpointError(
        f'{path} has incomplete metadata ({_short(error)}); write it again '
        'with dnnr.') from None
  weight_only = metadata.get('quantization', {}).get('mode') == 'weight_only'
  model = model_from_config(config, weight_only=weight_only)
  variables = restore_variables(path, layout)
  if not {'params', 'thresholds'} <= set(variables):
    raise CheckpointError(
        f'{path} holds no params or thresholds; pass a checkpoint written by dnnr.')
  return LoadedModel(path, model, variables, config, metadata)


def _existing_checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path).absolute()
  if not path.is_dir():
    raise CheckpointError(
        f'{path} is not a directory; pass a checkpoint directory such as '
        'models/final/model_v1.0_final.')
  return path


def _short(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:200] if text else ""}'
