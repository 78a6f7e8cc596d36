"""Whole jobs, one per CLI command: each is a single library call.

The CLI parses arguments and calls one of these; everything a command does,
Python code can do by calling the same function.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
from typing import Any

import jax

from dnnr_jax import parallel
from dnnr_jax.augment import Shift
from dnnr_jax.config import Config
from dnnr_jax.errors import CheckpointError, DnnrError
from dnnr_jax.io import checkpoint as checkpoint_lib
from dnnr_jax.io import distributed, durable
from dnnr_jax.io.data import load_dataset
from dnnr_jax.jobs.fit import EpochCallback, FitResult, fit
from dnnr_jax.thresholds import thresholds_to_floats
from dnnr_jax.train import evaluate

SPLITS = ('train', 'validation', 'test')


def train_and_save(
    config: Config,
    *,
    data_dir: str | os.PathLike | None = None,
    models_dir: str | os.PathLike = 'models',
    version: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> tuple[pathlib.Path, FitResult]:
  """The `dnnr train` job: data, training, final checkpoint.

  The final checkpoint goes to `<models_dir>/final/model_v{version}_final`
  (the next free version when None); periodic checkpoints to
  `<models_dir>/checkpoints/model_v{version}` and are removed once the final
  one is written. Before any work: an existing final version fails unless
  `overwrite`, another run writing the same version fails, periodic
  checkpoints of an interrupted run fail unless `resume` (never silently
  overwritten), and both folders are proven writable. `extra_metadata`
  entries are added to the checkpoint's metadata.

  Returns:
    The checkpoint path and the training result.
  """
  version = version or checkpoint_lib.next_version(models_dir, 'final')
  path = checkpoint_lib.checkpoint_path(models_dir, 'final', version).absolute()
  with durable.writer_lock(path):
    durable.recover(path)
    checkpoint_lib.ensure_writable(path, overwrite)
    periodic_dir = pathlib.Path(models_dir).absolute() / 'checkpoints' / path.name
    if config.training.checkpoint_every > 0:
      durable.check_writable_dir(periodic_dir.parent, 'periodic checkpoints')
    if not resume and periodic_dir.is_dir() and any(periodic_dir.iterdir()):
      raise CheckpointError(
          f'{periodic_dir} holds the periodic checkpoints of an interrupted run; pass '
          '--resume to continue it, or delete that folder to start afresh.')
    return _train_and_save(config, path, version, periodic_dir, data_dir=data_dir,
                           overwrite=overwrite, resume=resume, on_epoch=on_epoch,
                           extra_metadata=extra_metadata)


def _train_and_save(config, path, version, periodic_dir, *, data_dir, overwrite, resume,
                    on_epoch, extra_metadata):
  dataset = load_dataset(config.data, data_dir)
  if dataset.num_classes > config.model.num_classes:
    raise DnnrError(
        f'model.num_classes = {config.model.num_classes} is fewer than the '
        f'{dataset.num_classes} classes of {dataset.name}; raise it.')
  augment = {}
  if config.training.augment_shift:
    augment['augment'] = Shift.for_data(
        config.training.augment_shift, dataset.num_features, config.data.mean,
        config.data.std, name='training.augment_shift')
  result = fit(config, dataset, checkpoint_dir=periodic_dir, resume=resume,
               on_epoch=on_epoch, **augment)
  final = result.final_metrics
  metadata = {
      'kind': 'final',
      'version': version,
      'config': config.to_dict(),
      'num_features': dataset.num_features,
      'thresholds': thresholds_to_floats(result.state.thresholds),
      'metrics': {split: final[split]
                  for split in ('train', 'validation', 'test') if split in final},
      'history': result.history,
      'dataset': {
          'name': dataset.name,
          'source': dataset.source,
          'train_examples': int(dataset.train.labels.shape[0]),
          'test_examples': int(dataset.test.labels.shape[0]),
          'validation_examples': (0 if dataset.validation is None
                                  else int(dataset.validation.labels.shape[0])),
          'normalisation': {'mean': config.data.mean, 'std': config.data.std},
      },
      'training': {
          'epochs': config.training.epochs,
          'seconds': result.train_seconds,
          'samples_per_second': result.samples_per_second,
          'backend': jax.default_backend(),
      },
  }
  metadata.update(extra_metadata or {})
  saved = checkpoint_lib.save_checkpoint(
      path, result.state.variables, metadata, overwrite=overwrite)
  # The others wrote their shards; one removes them while they wait, so all end together.
  distributed.on_primary('clean-up', lambda: shutil.rmtree(periodic_dir, ignore_errors=True))
  return saved, result



def evaluate_checkpoint(
    path: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    split: str = 'test',
    devices: int | None = None,
) -> dict[str, Any]:
  """Loss, accuracy and deep-path fraction of a checkpoint on its data set.

  The data set and normalisation are the ones the checkpoint was trained
  with; `data_dir` only says where to find them. The split is sharded by
  rows over a data-parallel mesh (`parallel.mesh_from_config`) of `devices`
  devices (0: all; None: the checkpoint's `training.mesh`, or every device
  when it asks for more than there are), and the variables replicated on it.

  Returns:
    {'accuracy', 'loss', 'deep_fraction', 'n', 'split', 'dataset', 'model'}.
  """
  model = checkpoint_lib.load_model(path)
  dataset = load_dataset(model.config.data, data_dir)
  chosen = getattr(dataset, split, None)
  if chosen is None:
    raise DnnrError(
        f'split {split!r} is not in {model.path.name}\'s data set; choose one '
        f'of: {", ".join(s for s in SPLITS if getattr(dataset, s) is not None)}.')
  if dataset.num_features != model.num_features:
    raise DnnrError(
        f'{dataset.name} has {dataset.num_features} features but '
        f'{model.path.name} takes {model.num_features}; pass the data it was '
        'trained on.')
  settings = parallel.within_reach(model.config.training.mesh)
  if devices is not None:
    settings = dataclasses.replace(settings, devices=devices)
  mesh = parallel.mesh_from_config(settings)
  variables = model.variables
  if mesh.size > 1:
    chosen = parallel.shard_rows(chosen, mesh, pad=False)[0]
    variables = parallel.put(
        variables, jax.tree.map(lambda _: parallel.replicated(mesh), variables))
  metrics = evaluate(model.model, variables, chosen, model.config.training.eval_batch_size)
  return {**metrics, 'split': split, 'dataset': dataset.name,
          'model': str(model.path), 'devices': mesh.size}
