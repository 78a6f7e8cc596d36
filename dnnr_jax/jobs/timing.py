"""Inference timed as a server calls it, side by side, and the machine it ran on.

Inference is timed host NumPy batch in, host result out, after warm-up (and
compilation). Latency is the median time per call at batch 1; throughput the
samples per second at batch 256 from the median call time. Models compared
are timed side by side (`compare_inference`): each of `REPEATS` rounds runs
every model once, about `seconds / REPEATS` each.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from dnnr_jax.io.checkpoint import LoadedModel


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


REPEATS = 5
LATENCY_BATCH = 1
THROUGHPUT_BATCH = 256
Runner = Callable[[np.ndarray], Any]  # one inference call on a host batch


def jax_runner(model: LoadedModel) -> Runner:
  """`model.predict_with_routes` (quantized checkpoints run their integer path)."""
  return model.predict_with_routes


def onnx_runner(path: str | os.PathLike, intra_op_threads: int = 0) -> Runner:
  """One onnxruntime CPU session: by default on all cores, as `dnnr predict` uses.

  The file is checked against its digest first (`dnnr_jax.io.serve.load_onnx`).
  """
  from dnnr_jax.io.serve import load_onnx

  session = load_onnx(path, intra_op_threads=intra_op_threads).session
  name = session.get_inputs()[0].name
  return lambda batch: session.run(None, {name: batch})


def compare_inference(runners: dict[str, Runner], inputs: np.ndarray,
                      seconds: float = 1.0) -> dict[str, dict[str, float]]:
  """Batch-1 latency (µs) and batch-256 throughput (samples/s) of each runner.

  The runners are timed side by side: each of `REPEATS` rounds times every
  runner once, so a slow spell of a shared machine hits them all alike; each
  figure is the median over the rounds.

  Args:
    runners: name -> one inference call.
    inputs: normalised features [N, F]; rows are reused if N < 256.
    seconds: about how long each runner's figure is timed, per batch size.
  """
  inputs = np.asarray(inputs, np.float32)
  if inputs.shape[0] < THROUGHPUT_BATCH:
    inputs = np.resize(inputs, (THROUGHPUT_BATCH,) + inputs.shape[1:])
  results = {name: {} for name in runners}
  for key, size in (('latency_us', LATENCY_BATCH), ('throughput', THROUGHPUT_BATCH)):
    batch = inputs[:size]
    calls = {name: _calls_per_round(run, batch, seconds) for name, run in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(REPEATS):
      for name, run in runners.items():
        start = time.perf_counter()
        for _ in range(calls[name]):
          run(batch)
        times[name].append((time.perf_counter() - start) / calls[name])
    for name, values in times.items():
      per_call = statistics.median(values)
      results[name][key] = per_call * 1e6 if key == 'latency_us' else size / per_call
  return results


def _calls_per_round(run: Runner, batch: np.ndarray, seconds: float) -> int:
  """Warms `run` up (compiling it) and sizes a round to about seconds / REPEATS."""
  run(batch)
  start = time.perf_counter()
  for _ in range(3):
    run(batch)
  return max(1, int(seconds / REPEATS / ((time.perf_counter() - start) / 3)))
