"""The training driver: epochs, evaluation, periodic checkpoints, resume.

`fit` runs the compiled epoch once per epoch and evaluates after each one.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from dnnr_jax.config import Config, config_from_dict
from dnnr_jax.errors import CheckpointError, DnnrError
from dnnr_jax.io import durable, integrity
from dnnr_jax.io.data import Dataset
from dnnr_jax.model import model_from_config
from dnnr_jax.thresholds import thresholds_to_floats
from dnnr_jax.train import TrainState, create_train_state, evaluate, jit_train_epoch

EpochCallback = Callable[[dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class FitResult:
  """What training produced.

  Attributes:
    state: the final train state.
    history: one record per epoch: 'epoch', 'thresholds', 'train', 'test'
      (and 'validation') metrics, 'seconds'.
    train_seconds: wall time of all epochs run by this call, compilation
      and evaluation included.
    samples_per_second: median training throughput over the epochs after
      the first (compilation excluded), None with a single epoch.
  """
  state: TrainState
  history: list[dict[str, Any]]
  train_seconds: float
  samples_per_second: float | None

  @property
  def final_metrics(self) -> dict[str, Any]:
    return self.history[-1]


def fit(
    config: Config,
    dataset: Dataset,
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
    **state_options: Any,
) -> FitResult:
  """Trains a model on `dataset` as `config` says.

  Args:
    config: the run's configuration.
    dataset: splits on device.
    checkpoint_dir: where periodic checkpoints go (every
      `training.checkpoint_every` epochs); None disables them.
    resume: continue from the latest checkpoint in `checkpoint_dir`, which
      must have been written with the same config.
    on_epoch: called with each epoch's record, e.g. for a progress bar.
    **state_options: `params`, `wrap_optimizer`, `apply_fn` and `teacher`
      for `create_train_state`, to fine-tune (prune, QAT, distil) instead of
      training from scratch.

  Returns:
    The final state, the per-epoch history and timings.

  Raises:
    DnnrError: the loss became NaN, or the checkpoint to resume is not this
      run's.
  """
  training = config.training
  steps_per_epoch = dataset.train.labels.shape[0] // training.batch_size
  if steps_per_epoch == 0:
    raise DnnrError(
        f'training.batch_size = {training.batch_size} is larger than the '
        f'{dataset.train.labels.shape[0]} training examples; lower it.')
  state = create_train_state(
      config, dataset.num_features, steps_per_epoch, **state_options)
  history: list[dict[str, Any]] = []
  manager = None
  if checkpoint_dir is not None and training.checkpoint_every > 0:
    manager = _checkpoint_manager(checkpoint_dir, training.keep_checkpoints)
    if resume and manager.latest_step() is not None:
      state, history = _restore(manager, state, config)
  model = model_from_config(config)
  # Evaluate what the training step runs (e.g. the fake-quantized model in QAT).
  apply_fn = state_options.get('apply_fn')
  evaluated = _AppliedModel(apply_fn) if apply_fn else model
  run_epoch = jit_train_epoch(config)
  epoch_seconds = []
  start = time.perf_counter()
  try:
    for epoch in range(int(state.epoch), training.epochs):
      epoch_start = time.perf_counter()
      state, train_metrics = run_epoch(state, dataset.train)
      train_metrics = {name: float(value) for name, value in train_metrics.items()}
      epoch_seconds.append(time.perf_counter() - epoch_start)
      if not np.isfinite(train_metrics['loss']):
        raise DnnrError(
            f'training diverged in epoch {epoch + 1}: the loss is '
            f"{train_metrics['loss']}; lower training.learning_rate.")
      record = {
          'epoch': epoch + 1,
          'thresholds': thresholds_to_floats(state.thresholds),
          'train': train_metrics,
          'test': evaluate(evaluated, state.variables, dataset.test, training.eval_batch_size),
          'seconds': epoch_seconds[-1],
      }
      if dataset.validation is not None:
        record['validation'] = evaluate(
            evaluated, state.variables, dataset.validation, training.eval_batch_size)
      history.append(record)
      if manager is not None:
        with durable.deferred_interrupt():
          _save_periodic(manager, state, history, config)
      if on_epoch is not None:
        on_epoch(record)
  finally:
    # Also on an interrupt or error: commit the last periodic checkpoint,
    # so that resume finds every finished epoch.
    if manager is not None:
      with durable.deferred_interrupt():
        manager.wait_until_finished()
        manager.close()
  samples = steps_per_epoch * training.batch_size
  throughput = (samples / statistics.median(epoch_seconds[1:])
                if len(epoch_seconds) > 1 else None)
  return FitResult(state, history, time.perf_counter() - start, throughput)


@dataclasses.dataclass(frozen=True)
class _AppliedModel:
  """Stands in for a module in `evaluate`: only `.apply` is used."""
  apply: Callable


def _checkpoint_manager(directory, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      pathlib.Path(directory).absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_names=('state', 'history', 'config', 'integrity'),
  )


def _save_periodic(manager, state: TrainState, history, config: Config) -> None:
  epoch = int(state.epoch)
  if epoch % config.training.checkpoint_every and epoch != config.training.epochs:
    return
  # Digests of what is saved, checked on resume (`dnnr_jax.io.integrity`).
  sealed = integrity.seal({'history': history, 'config': config.to_dict()}, state)
  manager.save(epoch, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      history=ocp.args.JsonSave(history),
      config=ocp.args.JsonSave(config.to_dict()),
      integrity=ocp.args.JsonSave(sealed[integrity.KEY]),
  ))


def _restore(manager, state: TrainState, config: Config):
  step = manager.latest_step()
  where = manager.directory / str(step)
  try:
    saved_config = manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  except Exception as error:  # Orbax raises many types for a bad directory.
    raise CheckpointError(
        f'the periodic checkpoint {where} cannot be read ({error}); delete it '
        'to start afresh.') from None
  if config_from_dict(saved_config) != config:
    raise CheckpointError(
        f'the periodic checkpoint {where} was written with another config; '
        'resume with the same config, or delete it to start afresh.')
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  sealed = (where / integrity.KEY).exists()  # Absent from checkpoints of earlier versions.
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        history=ocp.args.JsonRestore(),
        **({integrity.KEY: ocp.args.JsonRestore()} if sealed else {}),
    ))
  except Exception as error:  # A truncated file surfaces from TensorStore.
    raise CheckpointError(
        f'the periodic checkpoint {where} is damaged ({error}); delete it to '
        'start afresh.') from None
  if sealed:
    record = {'history': restored['history'], 'config': saved_config,
              integrity.KEY: restored[integrity.KEY]}
    fix = 'delete it to start afresh'
    integrity.verify_metadata(where, record, fix)
    integrity.verify_arrays(where, record, restored['state'], fix)
  return restored['state'], list(restored['history'])
