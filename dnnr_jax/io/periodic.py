"""Periodic checkpoints for `--resume`, in the one checkpoint format.

Each step directory of the Orbax `CheckpointManager` is a dnnr_jax checkpoint
(`checkpoint.checkpoint_items`: the model's own tree under `variables`,
`metadata` with kind 'periodic', the config and the history so far) plus a
`train_state` item (step, optimizer state, epoch, shuffling key), so
`load_model` reads it like any other. Arrays are saved as they lie on the
mesh, each process writing its own shards, and restored straight into the
shardings of the run that resumes, whatever mesh wrote them.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from dnnr_jax.config import Config, MeshConfig, config_from_dict
from dnnr_jax.errors import CheckpointError
from dnnr_jax.io import checkpoint, integrity
from dnnr_jax.train import TrainState

ITEMS = ('variables', 'metadata', 'train_state')


def manager(directory: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
  """The run's checkpoint manager: one step directory per saved epoch."""
  return ocp.CheckpointManager(
      pathlib.Path(directory).absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_names=ITEMS,
  )


def save(manager: ocp.CheckpointManager, state: TrainState, history: list[dict[str, Any]],
         config: Config, num_features: int) -> None:
  """Saves `state` if its epoch is due (every `training.checkpoint_every`, and the last)."""
  epoch = int(state.epoch)
  if epoch % config.training.checkpoint_every and epoch != config.training.epochs:
    return
  metadata = {'kind': 'periodic', 'epoch': epoch, 'config': config.to_dict(),
              'num_features': num_features, 'history': history}
  manager.save(epoch, args=checkpoint.checkpoint_items(
      state.variables, metadata, compact=False, train_state=_train_state(state)))


def restore(manager: ocp.CheckpointManager, state: TrainState,
            config: Config) -> tuple[TrainState, list[dict[str, Any]]]:
  """The latest checkpoint, restored into the shardings of `state`.

  Raises:
    CheckpointError: it was written with another config (the mesh aside),
      or cannot be read.
  """
  step = manager.latest_step()
  where = manager.directory / str(step)
  try:
    metadata = manager.restore(
        step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))['metadata']
    saved_config = config_from_dict(metadata['config'])
  except Exception as error:  # Orbax raises many types for a bad directory.
    raise CheckpointError(
        f'the periodic checkpoint {where} cannot be read ({error}); delete it '
        'to start afresh.') from None
  fix = 'delete it to start afresh'
  integrity.verify_metadata(where, metadata, fix)
  if _without_mesh(saved_config) != _without_mesh(config):
    raise CheckpointError(
        f'the periodic checkpoint {where} was written with another config; '
        'resume with the same config, or delete it to start afresh.')
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          {'variables': state.variables, 'train_state': _train_state(state)})
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(abstract['variables']),
        train_state=ocp.args.StandardRestore(abstract['train_state']),
    ))
  except Exception as error:  # A truncated file surfaces from TensorStore.
    raise CheckpointError(
        f'the periodic checkpoint {where} is damaged ({error}); delete it to '
        'start afresh.') from None
  variables, rest = restored['variables'], restored['train_state']
  integrity.verify_arrays(where, metadata, {**variables, 'train_state': rest}, fix)
  state = state.replace(params=variables['params'], thresholds=variables['thresholds'],
                        **rest)
  return state, list(metadata['history'])


def _train_state(state: TrainState) -> dict[str, Any]:
  """What a periodic checkpoint keeps beside the variables."""
  return {'step': state.step, 'opt_state': state.opt_state, 'epoch': state.epoch,
          'rng': state.rng}


def _without_mesh(config: Config) -> Config:
  """The config with the mesh left out: a run may resume on other devices."""
  return config.replace(training=dataclasses.replace(config.training, mesh=MeshConfig()))
