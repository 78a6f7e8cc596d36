"""Training throughput and accuracy, measured the same way every time.

Throughput is samples per second of the compiled epoch (`lax.scan` over
on-device batches), after one compiling epoch, as the median of `repeats`
timed epochs; each timing waits for the device (`block_until_ready`).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Any, Sequence

import jax
import numpy as np

from dnnr_jax.config import Config
from dnnr_jax.data import Dataset
from dnnr_jax.fit import fit
from dnnr_jax.train import create_train_state, jit_train_epoch


def machine() -> dict[str, Any]:
  """The facts a reader needs to compare two benchmark runs."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as cpuinfo:
      for line in cpuinfo:
        if line.startswith('model name'):
          cpu = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  return {
      'backend': jax.default_backend(),
      'devices': [str(device) for device in jax.devices()],
      'cpu': cpu,
      'cpu_count': os.cpu_count(),
      'jax': jax.__version__,
  }


def training_throughput(
    config: Config,
    dataset: Dataset,
    batch_sizes: Sequence[int] = (64, 128, 1024),
    repeats: int = 5,
) -> list[dict[str, Any]]:
  """Samples/s of the jitted epoch at each batch size, after compilation.

  Args:
    config: model, routing and optimiser settings; its batch size is
      replaced by each of `batch_sizes`.
    dataset: the training split is what each epoch runs over.
    batch_sizes: batch sizes to measure.
    repeats: timed epochs per batch size; the median is reported.

  Returns:
    One record per batch size: 'batch_size', 'samples_per_second' (median),
    'min', 'max', 'compile_seconds' (the first epoch, compilation included),
    'epoch_seconds' (median), 'samples_per_epoch'.
  """
  results = []
  for batch_size in batch_sizes:
    sized = config.replace(training=dataclasses.replace(
        config.training, batch_size=batch_size))
    steps = dataset.train.labels.shape[0] // batch_size
    state = create_train_state(sized, dataset.num_features, steps)
    run_epoch = jit_train_epoch(sized)
    start = time.perf_counter()
    state, metrics = run_epoch(state, dataset.train)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
      start = time.perf_counter()
      state, metrics = run_epoch(state, dataset.train)
      jax.block_until_ready(metrics)
      seconds.append(time.perf_counter() - start)
    samples = steps * batch_size
    rates = [samples / value for value in seconds]
    results.append({
        'batch_size': batch_size,
        'samples_per_second': samples / statistics.median(seconds),
        'min': min(rates),
        'max': max(rates),
        'compile_seconds': compile_seconds,
        'epoch_seconds': statistics.median(seconds),
        'samples_per_epoch': samples,
        'routing': sized.routing.mode,
    })
  return results


def accuracy_run(config: Config, dataset: Dataset) -> dict[str, Any]:
  """Trains `config` from scratch and reports the final test metrics and
  the wall time (compilation and per-epoch evaluation included)."""
  start = time.perf_counter()
  result = fit(config, dataset)
  wall = time.perf_counter() - start
  final = result.final_metrics
  return {
      'epochs': config.training.epochs,
      'test_accuracy': final['test']['accuracy'],
      'test_loss': final['test']['loss'],
      'test_deep_fraction': final['test']['deep_fraction'],
      'train_accuracy': final['train']['accuracy'],
      'wall_seconds': wall,
      'samples_per_second': result.samples_per_second,
      'best_test_accuracy': float(np.max(
          [record['test']['accuracy'] for record in result.history])),
  }
