"""The training driver: epochs, evaluation, periodic checkpoints, resume.

`fit` runs the compiled epoch once per epoch and evaluates after each one,
over the mesh `training.mesh` chooses (`dnnr_jax.parallel`): every device
by default.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable

import numpy as np
from jax.sharding import Mesh

from dnnr_jax import parallel
from dnnr_jax.config import Config
from dnnr_jax.errors import DnnrError
from dnnr_jax.io import durable, periodic
from dnnr_jax.io.data import Dataset
from dnnr_jax.model import model_from_config
from dnnr_jax.thresholds import thresholds_to_floats
from dnnr_jax.train import Split, TrainState, create_train_state, evaluate, jit_train_epoch

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
  mesh = parallel.mesh_from_config(training.mesh)
  parallel.check_batch(training.batch_size, mesh)
  state = create_train_state(
      config, dataset.num_features, steps_per_epoch, **state_options)
  state, train, run_epoch = on_mesh(config, mesh, state, dataset.train)
  splits = {name: parallel.shard_rows(split, mesh, pad=False)[0]
            for name, split in (('test', dataset.test), ('validation', dataset.validation))
            if split is not None}
  history: list[dict[str, Any]] = []
  manager = None
  if checkpoint_dir is not None and training.checkpoint_every > 0:
    manager = periodic.manager(checkpoint_dir, training.keep_checkpoints)
    if resume and manager.latest_step() is not None:
      state, history = periodic.restore(manager, state, config)
  model = model_from_config(config)
  # Evaluate what the training step runs (e.g. the fake-quantized model in QAT).
  apply_fn = state_options.get('apply_fn')
  evaluated = _AppliedModel(apply_fn) if apply_fn else model
  epoch_seconds = []
  start = time.perf_counter()
  try:
    for epoch in range(int(state.epoch), training.epochs):
      epoch_start = time.perf_counter()
      state, train_metrics = run_epoch(state, train)
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
          'seconds': epoch_seconds[-1],
      }
      for name, split in splits.items():
        record[name] = evaluate(evaluated, state.variables, split, training.eval_batch_size)
      history.append(record)
      if manager is not None:
        with durable.deferred_interrupt():
          periodic.save(manager, state, history, config, dataset.num_features)
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


def on_mesh(
    config: Config, mesh: Mesh, state: TrainState, train: Split,
) -> tuple[TrainState, Split, Callable]:
  """The state and the training split placed on `mesh`, and the epoch compiled for them.

  Returns:
    (state: replicated, or FSDP-sharded with `training.mesh.shard_params`;
    the split sharded by rows; `run_epoch(state, split) -> (state, metrics)`).
  """
  sharding = parallel.state_shardings(state, mesh, config.training.mesh.shard_params)
  train, num_examples = parallel.shard_rows(train, mesh, pad=True)
  run_epoch = jit_train_epoch(
      config, num_examples=num_examples, state_sharding=sharding,
      batch_sharding=parallel.batch_sharding(mesh) if mesh.size > 1 else None)
  return parallel.put(state, sharding), train, run_epoch


@dataclasses.dataclass(frozen=True)
class _AppliedModel:
  """Stands in for a module in `evaluate`: only `.apply` is used."""
  apply: Callable
