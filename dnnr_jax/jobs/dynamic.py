"""What dynamic inference saves: accuracy against compute, and wall time against always-deep.

For an early-exit checkpoint with a validation split:

* accuracy against compute: for each router and budget, thresholds chosen
  on validation (`jobs.calibrate`), then test accuracy, deep fraction, each
  route's accuracy and the mean multiply-adds per sample counted from the
  routes taken; with the static baselines (the exit alone, always deep);
* the multiply-add count checked against XLA's cost analysis of each route
  (`cost.xla_check`);
* wall time, side by side with the same model forced always-deep, at the
  checkpoint's own thresholds: batch-1 latency on easy (exit) and hard
  (deep) test inputs and batch-256 throughput over the test set, in JAX
  (host to host, and the jitted model on inputs already on the device)
  and in onnxruntime (default session, and one intra-op thread), both
  exports written and checked by `io.export`; optionally the exit alone
  (`routing: shallow`) beside them, the cheapest call the model has.

Timings alternate the models of one engine and report medians, so a
busy shared machine slows both alike: throughput rounds run each model over
the test set in turn; batch-1 calls run in blocks of `LATENCY_BLOCK` calls
of one model, then the other's. A model serving requests runs call after
call with its own weights and code in the core's cache. Alternating call by
call would make each batch-1 call pay for the other model evicting them
(always-deep's 1.2 MB of weights, say), tens of microseconds against calls of
15 to 40; so the engines, too, are timed one after another, not interleaved. The pipeline report,
`dnnr benchmark --dynamic` and scripts/dynamic_inference.py all call
`run_report`.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from dnnr_jax.config import ROUTERS
from dnnr_jax.cost import XLA_TOLERANCE, route_cost, xla_check
from dnnr_jax.errors import DnnrError
from dnnr_jax.io import checkpoint as checkpoint_lib
from dnnr_jax.io import export
from dnnr_jax.io.data import Dataset, load_dataset
from dnnr_jax.jobs import calibrate
from dnnr_jax.jobs.timing import THROUGHPUT_BATCH, machine, onnx_runner
from dnnr_jax.model import EarlyExitMLP

BUDGETS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.6, 1.0)
ROUNDS = 5
LATENCY_BLOCK = 200  # batch-1 calls of one model before the other's
# 'jax' is host to host (NumPy in, checked, NumPy out: `predict_with_routes`);
# 'jax on device' the jitted model on inputs already on the device.
ENGINES = ('jax', 'jax on device', 'onnxruntime', 'onnxruntime 1 thread')


def accuracy_against_compute(path, *, data_dir=None, dataset: Dataset | None = None,
                             budgets: Sequence[float] = BUDGETS) -> dict[str, Any]:
  """Test accuracy against mean multiply-adds, thresholds chosen on validation.

  Args:
    path: an early-exit checkpoint whose config has a validation split.
    data_dir: where its data set is; or `dataset`, already loaded.
    budgets: target mean multiply-adds as fractions of always-deep; those
      below the exit's own cost are left out.

  Returns:
    {'model', 'multiply_adds' (per stage), 'xla_check' (`cost.xla_check`),
    'baselines' (exit alone, always deep), 'rows' (per router and budget:
    'validation' and 'test' figures, `calibrate.summarise`)}.
  """
  model = _early_exit(path)
  dataset = dataset if dataset is not None else load_dataset(model.config.data, data_dir)
  if dataset.validation is None:
    raise DnnrError(f'{model.path.name} was trained without a validation split; retrain '
                    'with data.validation_size > 0.')
  cost = route_cost(model.model, model.num_features)
  scored = model.model.clone(routing='per_sample')
  validation, test = (calibrate.router_scores(scored, model.variables, split.images,
                                              split.labels)
                      for split in (dataset.validation, dataset.test))
  base = {name: float(value) for name, value in model.variables['thresholds'].items()}
  rows = []
  for router in ROUTERS:
    for budget in budgets:
      fraction = cost.deep_fraction_for(budget)
      if fraction < 0:
        continue
      chosen = calibrate.choose_thresholds(router, base, validation, min(fraction, 1.0))
      rows.append({'router': router, 'budget': budget,
                   'validation': calibrate.summarise(router, chosen, validation, cost),
                   'test': calibrate.summarise(router, chosen, test, cost)})
  return {
      'model': str(model.path),
      'multiply_adds': {'exit': cost.cheap, 'expensive': cost.expensive,
                        'always_deep': cost.always_deep},
      'xla_check': xla_check(model.model, model.variables, model.num_features),
      'baselines': {
          'exit_alone': {'compute_fraction': cost.cheap / cost.always_deep,
                         'test_accuracy': float(np.mean(test.exit_correct))},
          'always_deep': {'compute_fraction': 1.0,
                          'test_accuracy': float(np.mean(test.deep_correct))},
      },
      'rows': rows,
  }


def _early_exit(path) -> checkpoint_lib.LoadedModel:
  model = checkpoint_lib.load_model(path)
  if not isinstance(model.model, EarlyExitMLP):
    raise DnnrError(f'{model.path.name} is not an early-exit model; train one with '
                    'model.family early_exit.')
  return model


def wall_time(path, *, data_dir=None, dataset: Dataset | None = None, onnx_dir=None,
              latency_rows: int | None = None, exit_alone: bool = False) -> dict[str, Any]:
  """The checkpoint (per sample) against itself always-deep, in JAX and onnxruntime.

  Batch-1 latency is the median over the first `latency_rows` test inputs
  (None: all), split into those the router sends to the exit (easy) and deep
  (hard). 'ratios' divides each engine's always-deep time by its per-sample
  time (above 1: the skipping model is faster). With `exit_alone`, the same
  model with `routing: shallow` (the cheap stage alone, as if every input
  left at the exit) is timed beside them, and 'exit_alone_ratios' divides
  always-deep's time by its: the most any router could save on that engine.
  """
  model = _early_exit(path)
  dataset = dataset if dataset is not None else load_dataset(model.config.data, data_dir)
  images = np.asarray(dataset.test.images)
  modes = ('per_sample', 'deep', 'shallow') if exit_alone else ('per_sample', 'deep')
  models = {mode: export.with_routing(model, mode) for mode in modes}
  routes = models['per_sample'].predict_with_routes(images)[1]
  with tempfile.TemporaryDirectory() as scratch:
    directory = pathlib.Path(onnx_dir or scratch)
    runners: dict[str, Callable] = {}
    for mode, routed in models.items():
      runners[f'jax {mode}'] = routed.predict_with_routes
      runners[f'jax on device {mode}'] = _on_device(routed)
      output, _ = export.export_onnx(path, output=directory / f'{mode}.onnx', routing=mode,
                                     check_inputs=images[:256], overwrite=True)
      runners[f'onnxruntime {mode}'] = onnx_runner(output)
      runners[f'onnxruntime 1 thread {mode}'] = onnx_runner(output, intra_op_threads=1)
    batches = [images[start:start + THROUGHPUT_BATCH]
               for start in range(0, len(images) - THROUGHPUT_BATCH + 1, THROUGHPUT_BATCH)]
    rows, taken = images[:latency_rows, None], routes[:latency_rows]
    easy, hard = rows[~taken], rows[taken]
    throughput, latency = {}, {}
    for engine in ENGINES:  # One engine at a time: see the module docstring.
      group = {name: runners[name] for name in (f'{engine} {mode}' for mode in modes)}
      put = jax.device_put if engine == 'jax on device' else list
      throughput.update(_interleaved(group, [put(batches)]))
      latency.update(_interleaved(group, [put(list(easy)), put(list(hard)), put(list(rows))],
                                  per_call=True))
  figures = {}
  for name in runners:
    samples = THROUGHPUT_BATCH * len(batches)
    figures[name] = {
        'throughput_batch_256': samples / throughput[name][0],
        **{f'latency_us_{rows}': None if seconds is None else seconds * 1e6
           for rows, seconds in zip(('easy', 'hard', 'all'), latency[name], strict=True)},
    }
  return {'model': str(model.path), 'machine': machine(),
          'deep_fraction_test': float(np.mean(routes)),
          'easy_rows': int(len(easy)), 'hard_rows': int(len(hard)), 'figures': figures,
          'ratios': speedups(figures),
          **({'exit_alone_ratios': speedups(figures, 'shallow')} if exit_alone else {})}


def _on_device(loaded: checkpoint_lib.LoadedModel) -> Callable:
  """Runs the jitted model on device arrays (no host copies); the caller waits for the outputs."""
  apply = jax.jit(loaded.model.apply)
  return lambda inputs: apply(loaded.variables, inputs)


def speedups(figures: dict[str, dict[str, float]],
             routing: str = 'per_sample') -> dict[str, dict[str, float]]:
  """Per engine, always-deep time over `routing`'s time (throughput: `routing`'s over deep)."""
  ratios = {}
  for name, routed in figures.items():
    if not name.endswith(f' {routing}'):
      continue
    engine = name.removesuffix(f' {routing}')
    deep = figures[f'{engine} deep']
    ratios[engine] = {key: None if routed[key] is None else (
        routed[key] / deep[key] if key.startswith('throughput') else deep[key] / routed[key])
        for key in routed}
  return ratios


def _interleaved(runners: dict[str, Callable], workloads: list[list[np.ndarray]], *,
                 per_call: bool = False) -> dict[str, list[float]]:
  """Median seconds per workload pass (or per call) of each runner, runners interleaved.

  Each workload is a list of batches. Without `per_call`, each of `ROUNDS`
  rounds times a full pass of every runner in turn and the median pass time
  is kept: a pass dispatches every batch and then waits for all the results,
  as a server streaming batches does (JAX overlaps the next dispatch with
  the running computation). With `per_call`, each batch is timed once per
  runner, waiting for its result, runners alternating every `LATENCY_BLOCK`
  batches, and the median call time is kept.
  """
  for run in runners.values():  # Warm up: compile, allocate.
    for workload in workloads:
      for batch in workload[:3]:
        run(batch)
  results: dict[str, list[float]] = {name: [] for name in runners}
  for workload in workloads:
    times: dict[str, list[float]] = {name: [] for name in runners}
    if per_call:
      for first in range(0, len(workload), LATENCY_BLOCK):
        for name, run in runners.items():
          for batch in workload[first:first + LATENCY_BLOCK]:
            start = time.perf_counter()
            jax.block_until_ready(run(batch))
            times[name].append(time.perf_counter() - start)
    else:
      for _ in range(ROUNDS):
        for name, run in runners.items():
          start = time.perf_counter()
          jax.block_until_ready([run(batch) for batch in workload])
          times[name].append(time.perf_counter() - start)
    for name in runners:  # An empty workload (no hard input, say) has no time.
      results[name].append(statistics.median(times[name]) if times[name] else None)
  return results


def markdown(curve: dict[str, Any] | None, timing: dict[str, Any] | None) -> str:
  """The accuracy-against-compute table, the XLA check and the wall-time tables, as Markdown."""
  lines = []
  if curve:
    lines += _curve_lines(curve)
  if timing:
    lines += ['', '| engine, routing | batch-256 samples/s | batch-1 µs easy | batch-1 µs hard | '
              'batch-1 µs all |', '|---|---:|---:|---:|---:|']
    for name, figures in timing['figures'].items():
      lines.append(f"| {name} | {figures['throughput_batch_256']:,.0f} | " + ' | '.join(
          _number(figures[f'latency_us_{rows}'], '.1f') for rows in ('easy', 'hard', 'all'))
          + ' |')
    lines += ['', f"Per sample against always-deep ({timing['easy_rows']} easy and "
              f"{timing['hard_rows']} hard test images; above 1: faster):", '', *_RATIO_HEADER]
    for engine, ratio in timing['ratios'].items():
      lines.append(_ratio_line(engine, ratio))
    if 'exit_alone_ratios' in timing:
      lines += ['', 'The exit alone (`routing: shallow`, every input leaving at the exit) against '
                'always-deep: the most a router could save.', '', *_RATIO_HEADER]
      lines += [_ratio_line(engine, ratio)
                for engine, ratio in timing['exit_alone_ratios'].items()]
  return '\n'.join(lines).lstrip('\n') + '\n'


_RATIO_HEADER = ('| engine | batch-256 throughput | batch-1 latency easy | hard | all |',
                 '|---|---:|---:|---:|---:|')


def _ratio_line(engine: str, ratio: dict[str, float | None]) -> str:
  return f'| {engine} | ' + ' | '.join(_number(ratio[key], '.2f', '×') for key in (
      'throughput_batch_256', 'latency_us_easy', 'latency_us_hard', 'latency_us_all')) + ' |'


def _curve_lines(curve: dict[str, Any]) -> list[str]:
  """The accuracy-against-compute table and the XLA check below it."""
  lines = ['| router | budget | test multiply-adds (of always-deep) | test accuracy | '
           'vs always-deep | deep fraction | exit accuracy | deep-route accuracy |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
  deep_accuracy = curve['baselines']['always_deep']['test_accuracy']
  for row in curve['rows']:
    test = row['test']
    lines.append(
        f"| {row['router']} | {row['budget']:.2f} | {test['compute_fraction']:.1%} | "
        f"{test['accuracy']:.2%} | {100 * (test['accuracy'] - deep_accuracy):+.2f} pp | "
        f"{test['deep_fraction']:.1%} | {_percent(test['exit_accuracy'])} | "
        f"{_percent(test['deep_accuracy'])} |")
  for name, baseline in curve['baselines'].items():
    lines.append(f"| {name.replace('_', ' ')} (static) | | {baseline['compute_fraction']:.1%} | "
                 f"{baseline['test_accuracy']:.2%} | | | | |")
  checks = '; '.join(
      f"{route} route {check['counted']:,.0f} counted, {check['xla_multiply_adds']:,.0f} "
      f"({check['relative_difference']:+.2%})" for route, check in curve['xla_check'].items())
  within = all(abs(check['relative_difference']) <= XLA_TOLERANCE
               for check in curve['xla_check'].values())
  lines += ['', f'Multiply-adds per sample against half of XLA\'s FLOPs at batch 1: {checks}; '
            f"{'within' if within else 'beyond'} ±{XLA_TOLERANCE:.1%} (XLA also counts the "
            'biases, ReLUs and the router, which weigh more beside narrow layers).']
  return lines


def _percent(value: float | None) -> str:
  return '' if value is None else f'{value:.2%}'


def _number(value: float | None, spec: str, unit: str = '') -> str:
  return '–' if value is None else f'{value:{spec}}{unit}'


def run_report(path: str | os.PathLike, *, data_dir=None, dataset: Dataset | None = None,
               timing: bool = True, budgets: Sequence[float] = BUDGETS,
               latency_rows: int | None = None, exit_alone: bool = False) -> dict[str, Any]:
  """Both parts for one checkpoint: {'curve', 'timing', 'markdown'}.

  The curve is None when the checkpoint's config has no validation split
  (thresholds are chosen on validation only); 'timing' is None without
  `timing`; `exit_alone` times the exit alone too (`wall_time`).
  """
  model = _early_exit(path)
  dataset = dataset if dataset is not None else load_dataset(model.config.data, data_dir)
  curve = (accuracy_against_compute(path, dataset=dataset, budgets=budgets)
           if dataset.validation is not None else None)
  timed = (wall_time(path, dataset=dataset, latency_rows=latency_rows, exit_alone=exit_alone)
           if timing else None)
  return {'curve': curve, 'timing': timed, 'markdown': markdown(curve, timed)}


def write_plot(curve: dict[str, Any], path: str | os.PathLike) -> None:
  """The accuracy-against-compute plot of `curve` as a PNG (`io.plots`)."""
  from dnnr_jax.io import plots

  plots.accuracy_against_compute(curve, pathlib.Path(path))
