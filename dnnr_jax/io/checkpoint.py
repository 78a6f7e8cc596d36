"""Versioned Orbax checkpoints and `load_model`.

A checkpoint is an Orbax directory with two items: `variables`, the model's
own tree (`{'params': {'trunk_0': {'kernel', 'bias'}, ...}, 'thresholds':
{...}}`; in a compressed model, e.g. sparse or quantized kernels, every
array of every leaf in one Brotli stream, the one uint8 leaf
`entropy_coded`, stored as plain zarr), and `metadata` (compact JSON:
format, kind, version, config, metrics, dataset, library versions,
timestamp, layout; `dnnr_jax.io.lean_metadata` leaves out the copies of
other entries, and `read_metadata` puts them back).
Plain `ocp.StandardCheckpointer().restore(path / 'variables')` shows the
model; `restore_sharded` restores a dense one into any mesh's shardings.
Periodic checkpoints (`--resume`) are the same, with a third item
`train_state`. Directories are named by kind and version:

    <models>/final/model_v1.0_final/
    <models>/pruned/pruned_model_v1.0/
    <models>/quantized/quantized_model_v1.0/
    <models>/calibrated/calibrated_model_v1.0/   (thresholds for a budget)

A checkpoint is written under a hidden temporary name, fsynced and renamed
into place by one writer at a time, so an interrupted save never leaves a
half-written version, and an existing version is replaced only when asked and
never lost (`dnnr_jax.io.durable`). Its metadata records a digest of every
stored array and of itself, checked on every load (`dnnr_jax.io.integrity`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import logging
import math
import os
import pathlib
import platform
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dnnr_jax.compress.quantize import QArray
from dnnr_jax.compress.rules import check_rules
from dnnr_jax.config import Config, config_from_dict
from dnnr_jax.errors import CheckpointError, ConfigError, IntegrityError, QuantizationError
from dnnr_jax.io import durable, integrity, lean_metadata, storage
from dnnr_jax.io import layout as layout_lib
from dnnr_jax.io.json_item import CompactJsonHandler, CompactJsonSave
from dnnr_jax.model import DynamicMLP, init_variables, model_from_config, quantization_rules

FORMAT = 'dnnr_jax'
# 2: arrays packed into one blob per dtype (io.storage); 3: float32 arrays
# that float16 holds exactly may be stored as float16; 4: the layout stored
# compact; 5: the variables saved as the model's own tree, encodings as
# named leaves under each layer, with digests of the arrays and of the
# metadata checked on load; 6: each layer with an encoded leaf stored as one
# uint8 leaf of entropy-coded (Brotli) frames, `params/trunk_0/entropy_coded`;
# 7: in a compressed model every layer and the thresholds coded so, the
# variables stored without OCDBT (plain zarr, one file per array) and the
# digests cut to 64 bits; 8: a compressed model's arrays all in one Brotli
# stream, the one leaf `entropy_coded` (one file and one digest), the layout
# one string per leaf (`io.layout`), the metadata compact JSON without copies
# of other entries (`io.lean_metadata`). 2 to 4 are read as blobs, unchecked;
# 5 to 8 by one decoder.
FORMAT_VERSION = 8
READABLE_FORMAT_VERSIONS = (2, 3, 4, 5, 6, 7, 8)
BLOB_FORMAT_VERSIONS = (2, 3, 4)
KINDS = {
    'final': ('final', 'model_v{version}_final'),
    'pruned': ('pruned', 'pruned_model_v{version}'),
    'quantized': ('quantized', 'quantized_model_v{version}'),
    'calibrated': ('calibrated', 'calibrated_model_v{version}'),
}
_VERSION = re.compile(r'^([0-9]+)\.([0-9]+)$')  # ASCII digits only.
# Layout arrays may exceed their leaf's size (sparse fillers), never by this much.
_LAYOUT_SLACK = 2
MAX_LINEAGE = 64  # prune/quantize steps from a final checkpoint


def checkpoint_path(models_dir: str | os.PathLike, kind: str, version: str) -> pathlib.Path:
  """Where the checkpoint of `kind` and `version` lives under `models_dir`."""
  folder, pattern = KINDS[kind]
  check_version(version)
  return pathlib.Path(models_dir) / folder / pattern.format(version=version)


def check_version(version: str) -> str:
  if not _VERSION.fullmatch(version):
    raise CheckpointError(
        f'version = {version!r} is not of the form MAJOR.MINOR; pass e.g. '
        'version=1.0.')
  return version


def next_version(models_dir: str | os.PathLike, kind: str) -> str:
  """'1.0' if no `kind` checkpoint exists yet, else the highest minor + 1."""
  folder, pattern = KINDS[kind]
  name = re.compile(
      '^' + re.escape(pattern).replace(r'\{version\}', r'([0-9]+)\.([0-9]+)') + '$')
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
        f'{path} already exists; pass overwrite=True to replace it or another '
        'version=MAJOR.MINOR.')


def library_versions() -> dict[str, str]:
  versions = {'python': platform.python_version()}
  for package in ('dnnr_jax', 'jax', 'jaxlib', 'flax', 'optax',
                  'orbax-checkpoint', 'numpy'):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = 'not installed'
  return versions


def checkpoint_items(
    variables: dict[str, Any], metadata: dict[str, Any], *, compact: bool = True,
    train_state: Any = None,
) -> ocp.args.Composite:
  """What a checkpoint directory holds, as Orbax save arguments.

  `variables` become the model's own tree of arrays
  (`storage.encode_variables`); `metadata` gains the format marker, library
  versions, a timestamp, the layout (`layout.pack_layout`) and the digests
  of the metadata and of every array (`integrity.seal`), loses the copies of
  other entries (`lean_metadata.lean`), and is written as compact JSON
  (`json_item`; a periodic checkpoint's with Orbax's own JSON writer).
  Final, pruned, quantized and periodic checkpoints all go through here.

  Args:
    variables: params and thresholds.
    metadata: JSON-ready facts (kind, version, config, ...).
    compact: store each leaf in its smallest encoding; False keeps every
      leaf as it is (periodic checkpoints, restored into sharded states).
    train_state: a periodic checkpoint's further state (step, optimizer
      state, ...), saved as the item 'train_state' and digested with the rest.
  """
  arrays, layout = storage.encode_variables(variables, compact=compact)
  metadata = {
      'format': FORMAT,
      'format_version': FORMAT_VERSION,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(),
      'library_versions': library_versions(),
      **metadata,
      'layout': layout_lib.pack_layout(layout),
  }
  metadata = lean_metadata.lean(json.loads(json.dumps(metadata)))
  digested = arrays if train_state is None else {**arrays, 'train_state': train_state}
  # Arrays sharded over several processes cannot be read whole here: a
  # multi-process run's periodic checkpoints digest their metadata only.
  metadata = integrity.seal(metadata, digested if integrity.readable(digested) else None)
  # A periodic checkpoint's manager reads 'metadata' back with Orbax's JsonRestore between
  # saves, which binds the item to Orbax's JsonCheckpointHandler: it keeps that writer.
  json_save = CompactJsonSave if train_state is None else ocp.args.JsonSave
  items = {'variables': ocp.args.StandardSave(arrays), 'metadata': json_save(metadata)}
  if train_state is not None:
    items['train_state'] = ocp.args.StandardSave(train_state)
  return ocp.args.Composite(**items)


def save_checkpoint(
    path: str | os.PathLike,
    variables: dict[str, Any],
    metadata: dict[str, Any],
    *,
    overwrite: bool = False,
) -> pathlib.Path:
  """Writes `variables` and `metadata` as an Orbax checkpoint at `path`.

  Every leaf is stored in its smallest encoding (`io.storage`: sparse
  kernels as relative indices and values, int4 codes packed two per byte)
  under its own path, described by a 'layout' entry added to the metadata
  with the format marker, library versions, a timestamp and the digests of
  the arrays and the metadata (`checkpoint_items`). The checkpoint is
  written beside `path` under a temporary name, fsynced and renamed into
  place, holding `path`'s writer lock; an existing `path` is replaced only
  with `overwrite`, and only once the new one is complete (see
  `dnnr_jax.io.durable` for the rule).

  Returns:
    The absolute path written.

  Raises:
    CheckpointError: `path` exists and not `overwrite`.
    DnnrError: another process is writing `path`, or its folder is not
      writable.
  """
  path = pathlib.Path(path).absolute()
  # Every process writes its own shards; process 0 alone locks and moves directories.
  primary = jax.process_index() == 0
  with durable.writer_lock(path) if primary else contextlib.nullcontext():
    if primary:
      durable.recover(path)
    ensure_writable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler, items = storage_options(checkpoint_items(variables, metadata))
    staging = durable.staging_path(path)
    _sync(f'dnnr_save_start:{path}')
    with durable.deferred_interrupt(), _no_merge_warning(), ocp.Checkpointer(
        handler) as checkpointer:
      checkpointer.save(staging, args=items)
    if primary:
      durable.replace_directory(staging, path)
    _sync(f'dnnr_save_done:{path}')
  return path


def storage_options(items: ocp.args.Composite
                    ) -> tuple[ocp.CompositeCheckpointHandler, ocp.args.Composite]:
  """How Orbax stores `checkpoint_items`: plain zarr where the layers are entropy-coded.

  A compressed model's variables are saved without OCDBT and without zarr's
  zstd (the frames are Brotli already): beside the arrays, OCDBT's manifests,
  B-trees and zarr metadata cost 2.6 kB in the 97 %-sparse 4-bit MNIST
  model, plain zarr's `.zarray` file 0.15 kB. Plain Orbax restores
  either. A dense model keeps OCDBT and zstd, and
  `restore_sharded` reads it into any mesh's shardings.
  """
  arrays = items['variables'].item
  if not any(path[-1].key == storage.CODED
             for path, _ in jax.tree_util.tree_flatten_with_path(arrays)[0]):
    return ocp.CompositeCheckpointHandler(), items
  handler = ocp.CompositeCheckpointHandler(
      variables=ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=False),
      metadata=CompactJsonHandler())
  return handler, ocp.args.Composite(variables=ocp.args.PyTreeSave(arrays),
                                     metadata=items['metadata'])


@contextlib.contextmanager
def _no_merge_warning():
  """Silences Orbax's warning that a store saved without OCDBT has no OCDBT files to merge."""
  def keep(record: logging.LogRecord) -> bool:
    return 'Skipping merge of OCDBT' not in record.getMessage()

  logger = logging.getLogger('absl')
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


def _sync(name: str) -> None:
  """Waits for every process of a multi-process run (nothing to wait for alone)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _local_reader() -> ocp.Checkpointer:
  """A Checkpointer for reads into this process alone.

  Orbax ends every restore with a barrier over all processes (a collective);
  a read onto this process's own device needs none, and process 0 reads
  alone while the others wait (`distributed.on_primary`).
  """
  here = jax.process_index()
  return ocp.Checkpointer(
      ocp.CompositeCheckpointHandler(), multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=here, active_processes={here}))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The metadata of a dnnr_jax checkpoint, checked to be ours."""
  path = _existing_checkpoint_dir(path)
  try:
    with _local_reader() as checkpointer:
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
  if metadata['format_version'] >= 5 and integrity.KEY not in metadata:
    raise IntegrityError(
        f'{path} is damaged or was edited: its metadata lost the digests recorded when it '
        'was saved; restore it from a copy or write it again with dnnr.')
  integrity.verify_metadata(path, metadata)
  if metadata['format_version'] >= 8:
    metadata = lean_metadata.full(metadata)
  if metadata['format_version'] >= 4:  # Earlier formats stored the layout expanded.
    try:
      metadata['layout'] = (layout_lib.unpack_layout if metadata['format_version'] >= 8
                            else storage.expand_layout)(metadata.get('layout'))
    except ValueError as error:
      raise CheckpointError(
          f'{path} has a damaged layout in its metadata ({error}); write it again '
          'with dnnr.') from None
  return metadata


def restore_variables(path: str | os.PathLike, layout: dict[str, Any],
                      metadata: dict[str, Any] | None = None) -> Any:
  """Restores and decodes the `variables` item that `layout` describes, on the host.

  With `metadata`, the arrays are checked against its digests first.
  """
  path = _existing_checkpoint_dir(path)
  format_version = FORMAT_VERSION if metadata is None else metadata['format_version']
  blobs = format_version in BLOB_FORMAT_VERSIONS
  abstract = (storage.abstract_blobs if blobs else storage.abstract_variables)(layout)
  try:
    restored = _restore_item(path, abstract)
  except Exception as error:  # A truncated file surfaces from TensorStore.
    raise _unreadable(path, error) from None
  if metadata is not None:
    integrity.verify_arrays(path, metadata, restored)
  try:
    return (storage.decode_blobs if blobs else storage.decode_variables)(restored, layout)
  except Exception as error:  # A truncated file surfaces from TensorStore.
    raise _unreadable(path, error) from None


def restore_sharded(path: str | os.PathLike, target: Any) -> Any:
  """A dense checkpoint's variables restored straight into `target`'s shardings.

  Args:
    path: a checkpoint directory whose leaves are stored dense (a final or
      periodic checkpoint).
    target: the variables as `jax.ShapeDtypeStruct`s carrying shardings (on
      any mesh, whatever mesh saved it), e.g. `jax.tree.map(lambda x:
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=...), variables)`.

  Returns:
    The variables as `jax.Array`s sharded as `target` says.

  Raises:
    CheckpointError: the checkpoint is not dense, or its tree or shapes
      differ from `target`'s.
  """
  path = _existing_checkpoint_dir(path)
  metadata = read_metadata(path)
  layout = metadata['layout']
  if metadata['format_version'] in BLOB_FORMAT_VERSIONS or any(
      spec['encoding'] != 'dense' or spec['kind'] != 'array' or 'frames' in spec
      or 'stream' in spec
      for spec in layout.values()):
    raise CheckpointError(
        f'{path} stores encoded (sparse or quantized) arrays, which cannot be restored '
        'into shardings; use load_model, or pass a dense checkpoint in format 5 or later.')
  wanted = {'/'.join(str(getattr(key, 'key', key)) for key in key_path): leaf
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
  for name in sorted(set(wanted) | set(layout)):
    saved = layout.get(name)
    shape = None if saved is None else tuple(saved['shape'])
    if name not in wanted or shape != tuple(wanted[name].shape):
      has = 'absent' if shape is None else f'of shape {shape}'
      wants = 'absent' if name not in wanted else f'of shape {tuple(wanted[name].shape)}'
      raise CheckpointError(
          f'{path} does not fit the target tree: {name} is {has} in the checkpoint and '
          f'{wants} in the target; restore into the variables of the model it was saved '
          'from.')
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      restored = checkpointer.restore(path, args=ocp.args.Composite(
          variables=ocp.args.StandardRestore(target)))
  except Exception as error:  # A truncated file surfaces from TensorStore.
    raise _unreadable(path, error) from None
  return restored['variables']


def _restore_item(path: pathlib.Path, abstract: Any) -> Any:
  """The `variables` item, however it was sharded when saved, on the default device."""
  with _local_reader() as checkpointer:
    restored = checkpointer.restore(
        path, args=ocp.args.Composite(variables=ocp.args.StandardRestore(abstract)))
  return restored['variables']


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
    logits, deep_path, total = self._predict(self.variables, inputs)
    # A finite sum means every input is finite; an infinite one may also be
    # an overflow of finite inputs, which the full test tells apart.
    if not np.isfinite(total) and not np.all(np.isfinite(inputs)):
      raise CheckpointError(
          'inputs contain NaN or infinite values; clean them before predict.')
    return np.asarray(logits), np.asarray(deep_path)

  @functools.cached_property
  def _predict(self) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    return _predictor(self.model)

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
    return inputs


@functools.lru_cache(maxsize=64)
def _predictor(model: DynamicMLP) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
  """The jitted model, also returning the sum of the inputs.

  Looked up once per loaded model (models equal as modules share one, and
  its compilations), not passed as a static argument, which hashes the
  module on every call; and the finiteness test is the sum computed with
  the model rather than a NumPy pass over the inputs first (XLA's
  `all(isfinite)` took as long as that pass). On the early-exit MNIST model
  this took 4-12 % off a batch-256 call from the host.
  """
  def predict(variables, inputs):
    logits, deep_path = model.apply(variables, inputs)
    return logits, deep_path, jnp.sum(inputs)
  return jax.jit(predict)


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
  _check_layout(path, layout, model_from_config(config), int(metadata['num_features']))
  variables = restore_variables(path, layout, metadata)
  if not {'params', 'thresholds'} <= set(variables):
    raise CheckpointError(
        f'{path} holds no params or thresholds; pass a checkpoint written by dnnr.')
  model = model_from_config(config, quantization=_quantization_rules(path, metadata, variables))
  return LoadedModel(path, model, variables, config, metadata)


def _quantization_rules(path: pathlib.Path, metadata: dict[str, Any], variables) -> tuple:
  """The `compress.Rule`s a quantized checkpoint runs with, from its metadata; () if float.

  QArray kernels without quantization metadata (saved by `save_checkpoint`
  directly) run in integers: 'static' where activation scales are stored,
  else 'dynamic'.
  """
  quantization = metadata.get('quantization')
  if not quantization:
    if not any(isinstance(leaf, QArray) for leaf in jax.tree.leaves(
        variables['params'], is_leaf=lambda leaf: isinstance(leaf, QArray))):
      return ()
    return quantization_rules('static' if 'activation_scales' in variables else 'dynamic')
  try:
    per_channel = metadata.get('compression', {}).get('per_channel', True)
    # Metadata written before bits were recorded: the width the kernels carry.
    bits = quantization.get('bits') or next(
        (leaf.bits for leaf in jax.tree.leaves(
            variables['params'], is_leaf=lambda leaf: isinstance(leaf, QArray))
         if isinstance(leaf, QArray)), 8)
    rules = quantization_rules(str(quantization['mode']), int(bits), bool(per_channel),
                               str(quantization.get('activations', 'per_row')))
    # Only the layers stored quantized run quantized (float layers stay float).
    quantized = sorted(name for name, layer in variables['params'].items()
                       if isinstance(layer, dict) and isinstance(layer.get('kernel'), QArray))
    if quantized and len(quantized) < len(variables['params']):
      pattern = '|'.join(re.escape(name) for name in quantized)
      rules = tuple(dataclasses.replace(rule, pattern=pattern) for rule in rules)
    return check_rules(rules)
  except (KeyError, TypeError, ValueError, AttributeError, QuantizationError) as error:
    raise CheckpointError(
        f'{path} has malformed quantization metadata ({_short(error)}); write it again '
        'with dnnr quantize.') from None


def lineage(path: str | os.PathLike,
            metadata: dict[str, Any] | None = None) -> list[tuple[pathlib.Path, dict[str, Any]]]:
  """A checkpoint and the sources it was made from, newest first.

  Follows each metadata's 'source' path until a final checkpoint, a source
  that no longer exists, or `MAX_LINEAGE` steps.

  Raises:
    CheckpointError: the chain returns to a checkpoint already in it, or is
      longer than `MAX_LINEAGE`.
  """
  path = pathlib.Path(path).absolute()
  metadata = read_metadata(path) if metadata is None else metadata
  chain = [(path, metadata)]
  while metadata.get('kind') != 'final' and isinstance(metadata.get('source'), dict):
    source = pathlib.Path(str(metadata['source'].get('path'))).absolute()
    if any(source == seen for seen, _ in chain):
      raise CheckpointError(
          f'{chain[0][0]} has a lineage that loops back to {source}; its metadata is '
          'damaged or was edited, write it again from a final checkpoint.')
    if len(chain) > MAX_LINEAGE:
      raise CheckpointError(
          f'{chain[0][0]} has a lineage longer than {MAX_LINEAGE} checkpoints; write it '
          'again from a final checkpoint.')
    if not source.is_dir():
      break
    metadata = read_metadata(source)
    chain.append((source, metadata))
  return chain


def lineage_root(path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> pathlib.Path:
  """The oldest checkpoint of `lineage` (the final model, where it still exists)."""
  return lineage(path, metadata)[-1][0]


def _check_layout(path: pathlib.Path, layout: dict[str, Any], model, num_features: int) -> None:
  """Refuses, before anything is allocated, a layout whose shapes the config does not give.

  Every leaf the model initialises must have its shape; other leaves (scales,
  activation ranges) and every stored array may not exceed the largest leaf.
  """
  def refuse(reason: str):
    return CheckpointError(
        f'{path} does not match its own config: {reason}; it is damaged or was edited, '
        'write it again with dnnr.')

  if not 0 < num_features <= 2**24:
    raise refuse(f'num_features = {num_features}')
  expected = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), num_features))
  shapes = {'/'.join(str(getattr(key, 'key', key)) for key in key_path): list(leaf.shape)
            for key_path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]}
  largest = max(math.prod(shape) for shape in shapes.values())
  stream = streamed = 0
  try:
    for name, spec in layout.items():
      shape = [int(size) for size in spec['shape']]
      if name in shapes and shape != shapes[name]:
        raise refuse(f'{name} is stored as {shape}, the config makes it {shapes[name]}')
      size = math.prod(shape)
      if min(shape, default=0) < 0 or size > largest:
        raise refuse(f'{name} is stored as {shape}, larger than any layer of the config')
      for array_name, (array_shape, dtype, _) in spec['arrays'].items():
        stored = math.prod(int(dim) for dim in array_shape)
        if min(array_shape, default=0) < 0 or stored > _LAYOUT_SLACK * size + 16:
          raise refuse(f'{name} stores {list(array_shape)} values for a {shape} array')
        frame = spec.get('frames', {}).get(array_name, 0)
        if frame > stored * np.dtype(dtype).itemsize:
          raise refuse(f'{name} codes {stored} values in a frame of {frame} bytes')
        if 'stream' in spec:
          streamed += stored * np.dtype(dtype).itemsize
      stream = max(stream, int(spec.get('stream', 0)))
    if stream > streamed:
      raise refuse(f'its stream of {stream} bytes codes {streamed} bytes of values')
  except (KeyError, TypeError, ValueError, AttributeError) as error:
    raise refuse(f'its layout is malformed ({_short(error)})') from None


def _existing_checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path).absolute()
  if not path.is_dir() and durable.retired_path(path).is_dir():
    raise CheckpointError(
        f'{path} was being replaced when a run stopped; its previous version is safe in '
        f'{durable.retired_path(path).name}: rerun the command that was writing it, which '
        'restores it first.')
  if not path.is_dir():
    raise CheckpointError(
        f'{path} is not a directory; pass a checkpoint directory such as '
        'models/final/model_v1.0_final.')
  return path


def _unreadable(path: pathlib.Path, error: Exception) -> CheckpointError:
  return CheckpointError(
      f'{path} is damaged or incomplete (its arrays could not be read: '
      f'{_short(error)}); restore it from a copy or write it again.')


def _short(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:200] if text else ""}'
