"""Training throughput, inference speed and accuracy, measured the same way every time.

Training throughput is samples per second of the compiled epoch (`lax.scan`
over on-device batches), after one compiling epoch, as the median of
`repeats` timed epochs; each timing waits for the device
(`block_until_ready`).

Inference is timed by `dnnr_jax.jobs.timing` (host NumPy in and out, models
side by side).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import statistics
import time
from typing import Any, Sequence

import jax
import numpy as np

from dnnr_jax import parallel
from dnnr_jax.config import Config, RoutingConfig
from dnnr_jax.errors import DnnrError
from dnnr_jax.io.checkpoint import load_model
from dnnr_jax.io.data import Dataset
from dnnr_jax.jobs import dynamic as dynamic_jobs
from dnnr_jax.jobs.fit import fit, on_mesh
from dnnr_jax.jobs.timing import (
    THROUGHPUT_BATCH,
    compare_inference,
    jax_runner,
    machine,
    onnx_runner,
)
from dnnr_jax.train import create_train_state, train_step


def matmul_gflops(size: int = 1024, seconds: float = 1.0) -> float:
  """The default device's float32 matmul rate, GFLOP/s, on [size, size] operands.

  The best a training step can do is its FLOPs at this rate: it bounds the
  samples/s that any implementation reaches on this machine.
  """
  operands = jax.random.normal(jax.random.PRNGKey(0), (2, size, size), np.float32)
  multiply = jax.jit(lambda pair: pair[0] @ pair[1])
  multiply(operands).block_until_ready()
  calls, start = 0, time.perf_counter()
  while (elapsed := time.perf_counter() - start) < seconds or calls < 3:
    multiply(operands).block_until_ready()
    calls += 1
  return 2 * size**3 * calls / elapsed / 1e9


def step_flops(state, batch_size: int, num_features: int) -> float:
  """FLOPs of one compiled `train_step` at this batch size (XLA's cost analysis)."""
  batch = (jax.ShapeDtypeStruct((batch_size, num_features), np.float32),
           jax.ShapeDtypeStruct((batch_size,), np.int32))
  cost = jax.jit(train_step).lower(state, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', float('nan')))


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
    'epoch_seconds' (median), 'samples_per_epoch', 'flops_per_sample' (of
    one step, per example) and 'gflops' (the rate those FLOPs ran at).
  """
  results = []
  for batch_size in batch_sizes:
    sized = config.replace(training=dataclasses.replace(
        config.training, batch_size=batch_size))
    timed = _timed_epochs(sized, dataset, repeats)
    samples, seconds = timed['samples'], timed['seconds']
    rates = [samples / value for value in seconds]
    flops = step_flops(timed['state'], batch_size, dataset.num_features) / batch_size
    results.append({
        'batch_size': batch_size,
        'samples_per_second': samples / statistics.median(seconds),
        'min': min(rates),
        'max': max(rates),
        'compile_seconds': timed['compile_seconds'],
        'epoch_seconds': statistics.median(seconds),
        'samples_per_epoch': samples,
        'flops_per_sample': flops,
        'gflops': flops * samples / statistics.median(seconds) / 1e9,
        'routing': sized.routing.mode,
    })
  return results


SIMULATED_NOTE = ('simulated CPU devices share the same cores: they prove that the '
                  'mesh computes the right thing, not that it is faster')


def device_scaling(
    config: Config, dataset: Dataset, device_counts: Sequence[int], repeats: int = 5,
) -> dict[str, Any]:
  """Training samples/s on meshes of each device count, and the scaling efficiency.

  Efficiency is (samples/s on n devices) / (n * samples/s on the fewest
  devices measured, scaled to one): 1.0 is perfect linear scaling.

  Returns:
    {'rows': [{'devices', 'samples_per_second', 'speedup', 'efficiency',
    'compile_seconds'}], 'batch_size', 'backend', 'note'}.
  """
  rows = []
  for count in device_counts:
    meshed = config.replace(training=dataclasses.replace(
        config.training, mesh=dataclasses.replace(config.training.mesh, devices=count)))
    timed = _timed_epochs(meshed, dataset, repeats)
    rows.append({'devices': count,
                 'samples_per_second': timed['samples'] / statistics.median(timed['seconds']),
                 'compile_seconds': timed['compile_seconds']})
  base = rows[0]['samples_per_second'] / rows[0]['devices']
  for row in rows:
    row['speedup'] = row['samples_per_second'] / rows[0]['samples_per_second']
    row['efficiency'] = row['samples_per_second'] / (row['devices'] * base)
  backend = jax.default_backend()
  return {'rows': rows, 'batch_size': config.training.batch_size, 'backend': backend,
          'note': SIMULATED_NOTE if backend == 'cpu' else None}


def _timed_epochs(config: Config, dataset: Dataset, repeats: int) -> dict[str, Any]:
  """One compiling epoch, then `repeats` timed ones, on `config`'s mesh."""
  mesh = parallel.mesh_from_config(config.training.mesh)
  parallel.check_batch(config.training.batch_size, mesh)
  steps = dataset.train.labels.shape[0] // config.training.batch_size
  state, train, run_epoch = on_mesh(
      config, mesh, create_train_state(config, dataset.num_features, steps), dataset.train)
  start = time.perf_counter()
  state, metrics = run_epoch(state, train)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - start
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = run_epoch(state, train)
    jax.block_until_ready(metrics)
    seconds.append(time.perf_counter() - start)
  return {'state': state, 'seconds': seconds, 'compile_seconds': compile_seconds,
          'samples': steps * config.training.batch_size}


def run_suite(
    config: Config,
    dataset: Dataset,
    *,
    batch_sizes: Sequence[int] = (64, 128, 1024),
    repeats: int = 5,
    routing_modes: Sequence[str] | None = None,
    models: Sequence[str | os.PathLike] = (),
    accuracy: bool = False,
    training: bool = True,
    seconds: float = 2.0,
    device_counts: Sequence[int] = (),
    dynamic: str | os.PathLike | None = None,
) -> dict[str, Any]:
  """The `dnnr benchmark` suite: one JSON-ready record of everything measured.

  Args:
    config, dataset: what training throughput runs on.
    batch_sizes, repeats: see `training_throughput`.
    routing_modes: modes to time (None: the config's).
    models: checkpoints, timed in JAX and, where `PATH.onnx` exists, in
      onnxruntime; or .onnx files, timed in onnxruntime. Inputs are the first
      test examples of `dataset`.
    accuracy: also train `config` from scratch (see `accuracy_run`).
    training: time training at all.
    seconds: about how long each inference figure is timed.
    device_counts: also time training on meshes of these many devices
      (`device_scaling`), at the config's batch size.
    dynamic: an early-exit checkpoint: what its dynamic inference saves on
      `dataset` (`jobs.dynamic.run_report`: accuracy against compute per
      router and budget, thresholds chosen on the validation split; wall
      time against the same model always-deep, in JAX and onnxruntime).
  """
  results: dict[str, Any] = {'machine': machine(), 'dataset': dataset.name,
                             'training': [], 'inference': []}
  if dynamic is not None:  # First: a checkpoint that is not early-exit fails before any work.
    results['dynamic'] = dynamic_jobs.run_report(dynamic, dataset=dataset)
  if training:
    results['machine']['matmul_gflops'] = matmul_gflops()
    for mode in routing_modes or [config.routing.mode]:
      routed = config.replace(routing=RoutingConfig(mode=mode))
      results['training'] += training_throughput(routed, dataset, batch_sizes, repeats)
  if device_counts:
    results['scaling'] = device_scaling(config, dataset, device_counts, repeats)
  inputs = np.asarray(dataset.test.images[:THROUGHPUT_BATCH])
  runners, engines = {}, {}
  for path in models:
    path = pathlib.Path(path)
    onnx_file = path if path.suffix == '.onnx' else path.with_name(path.name + '.onnx')
    if path.suffix != '.onnx':
      runners[path.name], engines[path.name] = jax_runner(load_model(path)), 'jax'
    elif not path.is_file():
      raise DnnrError(f'{path} is not a file; pass an .onnx file written by dnnr export.')
    if onnx_file.is_file():
      runners[onnx_file.name], engines[onnx_file.name] = onnx_runner(onnx_file), 'onnxruntime'
  if runners:
    speeds = compare_inference(runners, inputs, seconds)
    results['inference'] = [{'model': name, 'engine': engines[name], **speeds[name]}
                            for name in runners]
  if accuracy:
    results['accuracy'] = accuracy_run(config, dataset)
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
