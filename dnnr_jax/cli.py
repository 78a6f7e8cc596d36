"""The `dnnr` command: argument parsing over `dnnr_jax.jobs`.

Progress goes to stderr, results to stdout (`--json` prints one object).
A bad input is one sentence on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import warnings
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dnnr_jax.config import (
  BUDGET_METHODS,
  CALIBRATION_METHODS,
  PRUNE_METHODS,
  PRUNE_SCHEDULES,
  QUANTIZE_ACTIVATIONS,
  QUANTIZE_BITS,
  QUANTIZE_MODES,
  ROUTERS,
  ROUTING_MODES,
  BudgetConfig,
  CompressConfig,
  PruneConfig,
  QuantizeConfig,
  check_calibration,
)
from dnnr_jax.errors import AccuracyWarning, DnnrError
from dnnr_jax.io import durable

# The library names its own arguments (`version = 'one'`, `overwrite=True`) and the
# config keys its settings come from; the CLI says them as the flags that set them.
ARGUMENT_FLAGS = {name: '--' + name.replace('_', '-') for name in (
    'batch_size', 'data_dir', 'force', 'max_drop', 'models_dir', 'output', 'overwrite',
    'primary_timeout', 'raw_uint8_input',
    'seed', 'version')}
SETTING_FLAGS = {
    'prune': {f'compress.prune.{key}': '--' + key.replace('_', '-') for key in (
        'method', 'sparsity', 'schedule', 'finetune_epochs', 'learning_rate', 'distill',
        'augment_shift', 'n', 'm')} | {'compress.prune.distill_temperature': '--temperature'},
    'quantize': {f'compress.quantize.{key}': '--' + key.replace('_', '-') for key in (
        'mode', 'bits', 'activations', 'calibration_batches', 'calibration_method',
        'finetune_epochs', 'learning_rate', 'distill', 'augment_shift')} | {
            'compress.quantize.distill_temperature': '--temperature'},
}
for _flags in SETTING_FLAGS.values():
  _flags['compress.max_drop'] = '--max-drop'
SETTING_FLAGS['compress'] = {f'compress.budget.{key}': '--' + key.replace('_', '-') for key in (
    'max_drop', 'method', 'sparsities', 'bits', 'finetune_epochs', 'quantize_mode',
    'quantize_epochs', 'activations')}
_PRUNE = PruneConfig()
_QUANTIZE = QuantizeConfig()
_MAX_DROP = CompressConfig().max_drop
_BUDGET = BudgetConfig()

_stdout = Console(highlight=False)
_stderr = Console(stderr=True, highlight=False)


def _train(args: argparse.Namespace) -> int:
  from dnnr_jax.config import load_config

  config = load_config(args.config, args.set + _device_overrides(args))
  _join(args)
  from dnnr_jax.jobs import train as jobs  # JAX, after a bad config failed fast.

  with _EpochProgress(config.training.epochs) as progress:
    path, result = jobs.train_and_save(
        config, data_dir=args.data_dir, models_dir=args.models_dir,
        version=args.version, overwrite=args.overwrite, resume=args.resume,
        on_epoch=progress.update)
  final = result.final_metrics
  if args.json:
    print(json.dumps({'model': str(path), **final,
                      'train_seconds': result.train_seconds,
                      'samples_per_second': result.samples_per_second}))
    return 0
  table = Table(title=f'Trained {path}')
  for column in ('split', 'loss', 'accuracy', 'deep fraction'):
    table.add_column(column, justify='right')
  for split in jobs.SPLITS:
    if split in final:
      metrics = final[split]
      table.add_row(split, f"{metrics['loss']:.4f}", f"{metrics['accuracy']:.2%}",
                    f"{metrics['deep_fraction']:.2%}")
  _stdout.print(table)
  thresholds = ', '.join(f'{k} {v:.4g}' for k, v in final['thresholds'].items())
  speed = (f', {result.samples_per_second:,.0f} samples/s after compilation'
           if result.samples_per_second else '')
  _stdout.print(f'{len(result.history)} epochs in {result.train_seconds:.1f} s'
                f'{speed}; thresholds: {thresholds}')
  return 0


def _evaluate(args: argparse.Namespace) -> int:
  from dnnr_jax.jobs import train as jobs

  metrics = jobs.evaluate_checkpoint(
      args.model_path, data_dir=args.data_dir, split=args.split, devices=args.devices)
  if args.json:
    print(json.dumps(metrics))
    return 0
  table = Table(title=f"{metrics['model']} on {metrics['dataset']} {args.split}")
  for column in ('n', 'loss', 'accuracy', 'deep fraction'):
    table.add_column(column, justify='right')
  table.add_row(str(metrics['n']), f"{metrics['loss']:.4f}",
                f"{metrics['accuracy']:.2%}", f"{metrics['deep_fraction']:.2%}")
  _stdout.print(table)
  return 0


def _prune(args: argparse.Namespace) -> int:
  settings = PruneConfig(
      method=args.method, sparsity=args.sparsity, schedule=args.schedule,
      finetune_epochs=args.finetune_epochs, learning_rate=args.learning_rate,
      distill=args.distill, distill_temperature=args.temperature,
      augment_shift=args.augment_shift, n=args.n, m=args.m)
  _check_settings(settings, args.max_drop)
  from dnnr_jax.jobs import compress as jobs  # JAX, after bad settings failed fast.

  with _EpochProgress(args.finetune_epochs, label='fine-tune') as progress:
    result = jobs.prune_checkpoint(args.model_path, settings, on_epoch=progress.update,
                                   max_drop=args.max_drop, **_output_options(args))
  return _print_compression(result, args.json)


def _quantize(args: argparse.Namespace) -> int:
  settings = QuantizeConfig(
      mode=args.mode, bits=args.bits, per_channel=not args.per_tensor,
      activations=args.activations, calibration_batches=args.calibration_batches,
      calibration_method=args.calibration_method, finetune_epochs=args.finetune_epochs,
      learning_rate=args.learning_rate, distill=args.distill,
      distill_temperature=args.temperature, augment_shift=args.augment_shift)
  _check_settings(settings, args.max_drop)
  from dnnr_jax.jobs import compress as jobs  # JAX, after bad settings failed fast.

  epochs = args.finetune_epochs if args.mode == 'qat' else 0
  with _EpochProgress(epochs, label='QAT') as progress:
    result = jobs.quantize_checkpoint(args.model_path, settings, on_epoch=progress.update,
                                      max_drop=args.max_drop, **_output_options(args))
  return _print_compression(result, args.json)


def _check_settings(settings: PruneConfig | QuantizeConfig | BudgetConfig,
                    max_drop: float | None = None) -> None:
  """The jobs' own first checks, run before they import JAX (seconds) so a bad flag fails
  at once."""
  from dnnr_jax.jobs import guard

  settings.validate()
  guard.check(max_drop)


def _output_options(args: argparse.Namespace) -> dict[str, Any]:
  """The job arguments `_add_output_arguments` adds, besides the settings."""
  return {'seed': args.seed, 'data_dir': args.data_dir, 'models_dir': args.models_dir,
          'version': args.version, 'overwrite': args.overwrite}


def _compress(args: argparse.Namespace) -> int:
  settings = BudgetConfig(
      max_drop=args.max_drop, method=args.method, sparsities=tuple(args.sparsities),
      bits=tuple(args.bits), finetune_epochs=args.finetune_epochs,
      quantize_mode=args.quantize_mode, quantize_epochs=args.quantize_epochs,
      activations=args.activations)
  _check_settings(settings)
  from dnnr_jax.jobs import budget as jobs  # JAX, after bad settings failed fast.

  def progress(trial, reused):
    _stderr.print(f"{'reused' if reused else 'trial'}: {trial.label}: {trial.bytes:,} bytes, "
                  f'validation {trial.validation_accuracy:.2%} ({trial.drop_pp:+.2f} pp drop)')

  result = jobs.compress_to_budget(args.model_path, settings, on_trial=progress,
                                   **_output_options(args))
  if args.json:
    print(json.dumps(result.to_dict()))
    return 0
  table = Table(title=f'{result.source_path} within {args.max_drop:g} pp: {result.path}')
  for column in ('sparsity', 'bits', 'bytes', 'validation', 'drop pp', ''):
    table.add_column(column, justify='right')
  for trial in result.trials:
    mark = ('chosen' if trial == result.chosen else '' if trial.bits not in settings.bits
            else 'within' if trial.within(args.max_drop) else 'over')
    table.add_row(f'{trial.sparsity:.1%}', str(trial.bits or 'float'), f'{trial.bytes:,}',
                  f'{trial.validation_accuracy:.2%}', f'{trial.drop_pp:.2f}', mark)
  _stdout.print(table)
  _stdout.print(
      f'{result.smaller_than_dense:.1f}x fewer bytes than the dense float32 checkpoint; test '
      f'accuracy {result.test_accuracy:.2%} (source {result.source_test_accuracy:.2%}); '
      f'{result.ran} trials run, {result.reused} reused; report: {result.report_dir}/report.md')
  return 0


def _calibrate(args: argparse.Namespace) -> int:
  # The job's first check, before the seconds of importing JAX (None: the model's router).
  check_calibration(args.budget, args.router or ROUTERS[0], args.target)
  from dnnr_jax.jobs import calibrate as jobs

  result = jobs.calibrate_checkpoint(
      args.model_path, budget=args.budget, router=args.router, target=args.target,
      data_dir=args.data_dir, models_dir=args.models_dir, version=args.version,
      overwrite=args.overwrite)
  if args.json:
    print(json.dumps(result.to_dict()))
    return 0
  calibration, validation = result.calibration, result.validation
  compute = ('' if validation['compute_fraction'] is None
             else f"{validation['compute_fraction']:.1%} of always-deep multiply-adds, ")
  _stdout.print(
      f"wrote {result.path}: router {calibration['router']}, budget {args.budget} "
      f"({'of always-deep compute' if args.target == 'compute' else 'deep fraction'}); on "
      f"validation: {compute}{validation['deep_fraction']:.1%} deep, accuracy "
      f"{validation['accuracy']:.2%} (always deep {validation['always_deep_accuracy']:.2%})")
  return 0


def _export(args: argparse.Namespace) -> int:
  from dnnr_jax.io import export

  _quiet_onnx_ir()
  check_inputs = None
  if not args.raw_uint8_input:
    check_inputs = export.real_check_inputs(args.model_path, data_dir=args.data_dir)
  output, report = export.export_onnx(
      args.model_path, output=args.output, raw_uint8_input=args.raw_uint8_input,
      check_inputs=check_inputs, overwrite=args.overwrite, routing=args.routing)
  if args.json:
    print(json.dumps({'path': str(output), **report}))
    return 0
  differences = ', '.join(f'batch {size}: {value:.2g}'
                          for size, value in report['max_abs_logit_difference'].items())
  _stdout.print(f'wrote {output}; onnxruntime matches JAX (max |logit difference| '
                f'{differences}; tolerance {report["tolerance"]}; argmax and routes equal)')
  return 0


def _predict(args: argparse.Namespace) -> int:
  from dnnr_jax.io import serve

  result = serve.predict_onnx(args.model_path, args.images, args.labels,
                              batch_size=args.batch_size)
  if args.json:
    print(json.dumps({key: value for key, value in result.items() if key != 'predictions'}))
    return 0
  accuracy = f"accuracy {result['accuracy']:.2%}, " if 'accuracy' in result else ''
  print(f"{result['n']} images: {accuracy}deep path {result['deep_fraction']:.1%}, "
        f"{result['samples_per_second']:,.0f} samples/s at batch {result['batch_size']} "
        '(onnxruntime)')
  return 0


def _pipeline(args: argparse.Namespace) -> int:
  from dnnr_jax.config import load_config

  config = load_config(args.config, args.set + _device_overrides(args))
  _join(args)
  from dnnr_jax.jobs import pipeline  # JAX, after a bad config failed fast.

  _quiet_onnx_ir()
  with _StageProgress(config) as progress:
    result = pipeline.run_pipeline(
        config, data_dir=args.data_dir, models_dir=args.models_dir, version=args.version,
        force=args.force, on_stage=progress.stage, on_epoch=progress.epoch)
  report_json = result.report_dir / 'report.json'
  if args.json:
    print(json.dumps({'report': str(report_json), 'ran': result.ran, 'skipped': result.skipped,
                      'rows': result.report['rows']}))
    return 0
  table = Table(title=f'dnnr pipeline v{args.version}: {result.report_dir}/report.md')
  table.add_column('artifact', no_wrap=True)
  for column in ('accuracy', 'nnz', 'bytes', '× smaller', 'µs b=1', 'k/s b=256'):
    table.add_column(column, justify='right')
  for row in result.report['rows']:
    engine = 'jax' if row['format'] == 'orbax' else 'onnxruntime'
    table.add_row(row['artifact'], f"{row['test_accuracy']:.2%}", f"{row['nonzeros']:,}",
                  f"{row['bytes']:,}", f"{row['smaller_than_final']:.1f}",
                  f"{row[engine + '_latency_us']:.0f}",
                  f"{row[engine + '_throughput'] / 1000:,.0f}")
  _stdout.print(table)
  if result.skipped:
    _stdout.print(f"reused: {', '.join(result.skipped)} (pass --force to rebuild)")
  return 0


def _benchmark(args: argparse.Namespace) -> int:
  from dnnr_jax.config import load_config

  config = load_config(args.config, args.set)
  output = _checked_output(args.output, args.overwrite)
  plot = _checked_output(args.plot, args.overwrite, '--plot')
  if plot and not args.dynamic:
    raise DnnrError('--plot draws the accuracy against compute of --dynamic MODEL; pass both.')
  from dnnr_jax.io.data import load_dataset  # JAX, after bad settings failed fast.
  from dnnr_jax.jobs import benchmark

  dataset = load_dataset(config.data, args.data_dir)
  results = benchmark.run_suite(
      config, dataset, batch_sizes=args.batch_sizes, repeats=args.repeats,
      routing_modes=args.routing, models=args.models, accuracy=args.accuracy,
      training=not args.no_training, seconds=args.seconds, device_counts=args.devices or (),
      dynamic=args.dynamic)
  dynamic = results.get('dynamic')
  if plot and dynamic['curve']:
    from dnnr_jax.jobs.dynamic import write_plot

    write_plot(dynamic['curve'], plot)
  if output:
    durable.write_bytes(output, json.dumps(results, indent=2).encode())
  if args.json:
    print(json.dumps(results))
    return 0
  machine = results['machine']
  _stdout.print(f"{machine['cpu']} ({machine['cpu_count']} cores), JAX {machine['jax']} on "
                f"{machine['backend']}: {', '.join(machine['devices'])}")
  if results['training']:
    table = Table(title='Training throughput (samples/s after compilation, median)')
    # 'spread': (max - min) / median over the timed epochs; MFLOP per example.
    for column in ('routing', 'batch', 'samples/s', 'spread', 'MFLOP', 'GFLOP/s', 'compile s'):
      table.add_column(column, justify='right')
    for row in results['training']:
      spread = (row['max'] - row['min']) / row['samples_per_second']
      table.add_row(row['routing'], str(row['batch_size']), f"{row['samples_per_second']:,.0f}",
                    f'{spread:.0%}', f"{row['flops_per_sample'] / 1e6:.2f}",
                    f"{row['gflops']:.1f}", f"{row['compile_seconds']:.2f}")
    _stdout.print(table)
    peak = machine['matmul_gflops']
    fastest = min(row['flops_per_sample'] for row in results['training'])
    _stdout.print(f'float32 matmul on this device: {peak:.1f} GFLOP/s, so at most '
                  f'{peak * 1e9 / fastest:,.0f} training samples/s at '
                  f'{fastest / 1e6:.2f} MFLOP per sample')
  if 'scaling' in results:
    scaling = results['scaling']
    table = Table(title=f"Data-parallel training, batch {scaling['batch_size']} over the mesh "
                        f"({scaling['backend']})")
    for column in ('devices', 'samples/s', 'speedup', 'efficiency'):
      table.add_column(column, justify='right')
    for row in scaling['rows']:
      table.add_row(str(row['devices']), f"{row['samples_per_second']:,.0f}",
                    f"{row['speedup']:.2f}x", f"{row['efficiency']:.0%}")
    _stdout.print(table)
    if scaling['note']:
      _stdout.print(f"note: {scaling['note']}.")
  if results['inference']:
    table = Table(title='Inference (median; latency at batch 1, throughput at batch 256)')
    for column in ('model', 'engine', 'latency µs', 'samples/s'):
      table.add_column(column, justify='right')
    for row in results['inference']:
      table.add_row(row['model'], row['engine'], f"{row['latency_us']:.1f}",
                    f"{row['throughput']:,.0f}")
    _stdout.print(table)
  if dynamic:
    _stdout.print(f"Dynamic inference of {dynamic['timing']['model']} (thresholds per budget "
                  'chosen on validation; test figures):')
    print(dynamic['markdown'])
  if 'accuracy' in results:
    accuracy = results['accuracy']
    _stdout.print(f"{dataset.name}: test accuracy {accuracy['test_accuracy']:.2%} after "
                  f"{accuracy['epochs']} epochs in {accuracy['wall_seconds']:.1f} s "
                  f"(deep fraction {accuracy['test_deep_fraction']:.1%})")
  return 0


def _device_overrides(args: argparse.Namespace) -> list[str]:
  """`--devices` as a config override."""
  return [] if args.devices is None else [f'training.mesh.devices={args.devices}']


def _join(args: argparse.Namespace) -> None:
  """Joins a multi-process run if asked, before anything else touches JAX."""
  if args.coordinator or args.distributed:
    from dnnr_jax.io import distributed

    distributed.initialize(distributed.ProcessGroup(
        coordinator=args.coordinator, num_processes=args.num_processes,
        process_id=args.process_id, timeout_s=args.distributed_timeout,
        primary_timeout=args.primary_timeout))


def _add_mesh_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--devices', type=int, metavar='N',
                      help='devices of the data-parallel mesh, across all processes '
                           '(default: training.mesh.devices; 0 is every device)')
  parser.add_argument('--coordinator', metavar='HOST:PORT',
                      help="process 0's address, to run as one of --num-processes processes")
  parser.add_argument('--num-processes', type=int, metavar='N')
  parser.add_argument('--process-id', type=int, metavar='I', help='0 .. N-1')
  parser.add_argument('--distributed', action='store_true',
                      help='join a multi-process run detected from the environment '
                           '(SLURM, Open MPI, TPU, GKE)')
  parser.add_argument('--distributed-timeout', type=int, default=120, metavar='S',
                      help='seconds to wait for every process to join (default: %(default)s)')
  parser.add_argument('--primary-timeout', type=int, default=3600, metavar='S',
                      help="seconds the other processes wait for process 0's own stages "
                           '(ONNX export, report) before stopping (default: %(default)s)')


def _checked_output(output: str | None, overwrite: bool, flag: str = '--output'):
  """`flag`'s path, refused before any work if it exists or cannot be written."""
  if not output:
    return None
  path = pathlib.Path(output)
  if path.exists() and not overwrite:
    raise DnnrError(f'{path} already exists; pass --overwrite or another {flag}.')
  durable.check_writable_dir(path.parent, path.name, create=False)
  return path


def _quiet_onnx_ir() -> None:
  import logging

  # onnx_ir warns about untyped shape constants it skips; nothing a user can act on.
  logging.getLogger('onnx_ir').setLevel(logging.ERROR)


def _print_compression(result: Any, as_json: bool) -> int:
  """The before/after table of a prune or quantize job's `CompressResult`."""
  if as_json:
    print(json.dumps(result.to_dict()))
    return 0
  metrics, guard = result.metadata['metrics'], result.metadata['accuracy_guard']
  before, after = metrics['test_before'], metrics['test']
  sparsity = f'{result.sparsity:.2%}' if hasattr(result, 'sparsity') else ''
  table = Table(title=f"{result.metadata['source']['path']} -> {result.path}")
  for column in ('', 'test accuracy', 'validation', 'deep fraction', 'sparsity', 'bytes',
                 'gzip bytes'):
    table.add_column(column, justify='right')
  validation = ('', '') if guard['split'] is None else (
      f"{guard['accuracy_before']:.2%}", f"{guard['accuracy']:.2%}")
  table.add_row('before', f"{before['accuracy']:.2%}", validation[0],
                f"{before['deep_fraction']:.2%}", '', f'{result.source_size.raw:,}',
                f'{result.source_size.gzip:,}')
  table.add_row('after', f"{after['accuracy']:.2%}", validation[1],
                f"{after['deep_fraction']:.2%}", sparsity, f'{result.size.raw:,}',
                f'{result.size.gzip:,}')
  _stdout.print(table)
  _stdout.print(_guard_line(guard))
  dense, size = result.dense_float_size, result.size
  routes = result.metadata['routes']
  per_route = ', '.join(f'{name} route {routes[key]:.2%}' for name, key in (
      ('deep', 'deep_accuracy'), ('shallow', 'shallow_accuracy')) if routes[key] is not None)
  _stdout.print(
      f'route agreement {result.route_agreement:.2%} (accuracy: {per_route}); against the '
      f'dense float32 checkpoint {result.dense_float_path}: {dense.raw / size.raw:.1f}x fewer '
      f'bytes, {dense.gzip / size.gzip:.1f}x fewer gzip bytes')
  return 0


def _guard_line(guard: dict[str, Any]) -> str:
  """The accuracy guard's verdict, as the line under a compression table."""
  if guard['split'] is None:
    return 'validation drop: not measured (the source has no validation split)'
  budget = ('' if guard['max_drop_pp'] is None else
            f" (budget {guard['max_drop_pp']:g} pp: "
            f"{'OVER BUDGET' if guard['over_budget'] else 'within'})")
  return f"validation drop {guard['drop_pp']:.2f} pp{budget}"


def in_flags(message: str, command: str) -> str:
  """A library error as `command` says it: arguments and settings by their flags.

  `version = 'one'` and `version=1.0` become `--version 'one'` and `--version 1.0`,
  `overwrite=True` becomes `--overwrite`; for prune and quantize,
  `compress.prune.sparsity = 1.5` becomes `--sparsity 1.5`.
  """
  def argument(match: re.Match) -> str:
    flag = ARGUMENT_FLAGS[match['name']]
    return flag if match['value'] == 'True' else f"{flag} {match['value']}"

  names = '|'.join(ARGUMENT_FLAGS)
  message = re.sub(rf'(?<![\w.])(?P<name>{names})(?: = |=)(?P<value>\S*?)(?=[,;.]?(?:\s|$))',
                   argument, message)
  for key, flag in SETTING_FLAGS.get(command, {}).items():
    message = re.sub(rf'(?<![\w.]){re.escape(key)}\b(?: =)?', flag, message)
  return message


def _stop(progress: Progress, exc_type: Any) -> None:
  """Ends a progress display; after a bad input only its one-line message stays."""
  if exc_type is not None and issubclass(exc_type, DnnrError):
    # No stale bar, no blank line (`Progress.stop` adds one on non-terminals).
    progress.live.transient = True
    progress.live.stop()
  else:
    progress.stop()


class _EpochProgress:
  """A progress bar over epochs that shows the last epoch's metrics."""

  def __init__(self, epochs: int, label: str = 'train'):
    self._progress = Progress(
        TextColumn(f'[bold]{label}'), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn('{task.fields[metrics]}'),
        console=_stderr)
    self._task = self._progress.add_task('train', total=epochs, metrics='compiling')

  def __enter__(self) -> _EpochProgress:
    if self._progress.tasks[0].total:
      self._progress.start()
    return self

  def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
    _stop(self._progress, exc_type)

  def update(self, record: dict[str, Any]) -> None:
    train, test = record['train'], record['test']
    self._progress.update(
        self._task, completed=record['epoch'],
        metrics=(f"loss {train['loss']:.4f}  acc {train['accuracy']:.2%}  "
                 f"test {test['accuracy']:.2%}  deep {train['deep_fraction']:.0%}"))
    if not self._progress.console.is_terminal:
      self._progress.console.print(
          f"epoch {record['epoch']}: loss {train['loss']:.4f}, "
          f"train acc {train['accuracy']:.2%}, test acc {test['accuracy']:.2%}, "
          f"deep {train['deep_fraction']:.1%}, {record['seconds']:.2f} s")


class _StageProgress:
  """One progress bar per pipeline stage, advanced by epochs where it trains."""

  def __init__(self, config):
    prune, quantize, pipeline = config.compress.prune, config.compress.quantize, config.pipeline
    self._totals = {
        'train': config.training.epochs,
        'prune': prune.finetune_epochs,
        'quantize': quantize.finetune_epochs if quantize.mode == 'qat' else None,
        'sweep': len(pipeline.sweep_sparsities) * max(pipeline.sweep_finetune_epochs, 1),
    }
    self._progress = Progress(
        TextColumn('[bold]{task.description:>8}'), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn('{task.fields[status]}'), console=_stderr)
    self._tasks: dict[str, Any] = {}

  def __enter__(self) -> _StageProgress:
    self._progress.start()
    return self

  def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
    _stop(self._progress, exc_type)

  def stage(self, name: str, event: str) -> None:
    if event == 'start':
      self._tasks[name] = self._progress.add_task(
          name, total=self._totals.get(name) or 1, status='running')
    elif event == 'skip':
      self._progress.add_task(name, total=1, completed=1, status='reused', start=False)
    else:
      task = self._tasks[name]
      self._progress.update(task, completed=self._progress.tasks[task].total, status='done')
    if not self._progress.console.is_terminal:
      self._progress.console.print(f'{name}: {event}')

  def epoch(self, name: str, record: dict[str, Any]) -> None:
    task = self._tasks.get(name)
    if task is None:
      return
    self._progress.advance(task)
    self._progress.update(task, status=f"test {record['test']['accuracy']:.2%}")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='dnnr', description='Dynamic Neural Network Refinement in JAX.')
  commands = parser.add_subparsers(dest='command', required=True)

  train = commands.add_parser('train', help='train a model, save the final checkpoint')
  train.add_argument('--config', default='configs/default.yaml',
                     help='YAML config (default: %(default)s)')
  train.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                     help='override a config key, e.g. training.epochs=1')
  train.add_argument('--data-dir', help='directory with the MNIST IDX files')
  train.add_argument('--models-dir', default='models',
                     help='root of final/, pruned/, quantized/ (default: %(default)s)')
  train.add_argument('--version', help='MAJOR.MINOR (default: the next free one)')
  train.add_argument('--overwrite', action='store_true',
                     help='replace an existing version')
  train.add_argument('--resume', action='store_true',
                     help='continue from the last periodic checkpoint')
  train.add_argument('--json', action='store_true', help='print one JSON object')
  _add_mesh_arguments(train)
  train.set_defaults(handler=_train)

  evaluate = commands.add_parser('evaluate', help='evaluate a checkpoint')
  evaluate.add_argument('model_path', metavar='MODEL_PATH')
  evaluate.add_argument('--data-dir', help='directory with the MNIST IDX files')
  evaluate.add_argument('--split', default='test',
                        choices=('train', 'validation', 'test'))
  evaluate.add_argument('--devices', type=int, metavar='N',
                        help="shard the split over N devices (0: all; default: the "
                             "checkpoint's training.mesh)")
  evaluate.add_argument('--json', action='store_true', help='print one JSON object')
  evaluate.set_defaults(handler=_evaluate)

  # Every default is the config's (compress.prune), so `dnnr prune` and the pipeline agree.
  prune = commands.add_parser('prune', help='prune a checkpoint (models/pruned/)')
  prune.add_argument('model_path', metavar='MODEL_PATH')
  prune.add_argument('--method', default=_PRUNE.method, choices=PRUNE_METHODS,
                     help='default: %(default)s')
  prune.add_argument('--sparsity', type=float, default=_PRUNE.sparsity,
                     help='fraction of kernel weights (units for structured) to remove '
                          '(default %(default)s)')
  prune.add_argument('--schedule', default=_PRUNE.schedule, choices=PRUNE_SCHEDULES,
                     help='gradual (global or layer only) prunes during fine-tuning '
                          '(default %(default)s)')
  prune.add_argument('--finetune-epochs', type=int, default=_PRUNE.finetune_epochs,
                     help='default %(default)s')
  prune.add_argument('--n', type=int, default=_PRUNE.n, help='N of N:M (default %(default)s)')
  prune.add_argument('--m', type=int, default=_PRUNE.m, help='M of N:M (default %(default)s)')
  prune.add_argument('--distill', type=float, default=_PRUNE.distill,
                     help='share of the fine-tuning loss that distils the source model '
                          '(default %(default)s: labels only; 0.5 works well)')
  prune.add_argument('--temperature', type=float, default=_PRUNE.distill_temperature,
                     help='distillation temperature (default %(default)s)')
  prune.add_argument('--augment-shift', type=int, default=_PRUNE.augment_shift, metavar='PIXELS',
                     help='while fine-tuning, shift each image at random by up to this many '
                          'pixels, the same for the distilling source (default %(default)s: '
                          'off)')
  _add_output_arguments(prune)
  prune.set_defaults(handler=_prune)

  quantize = commands.add_parser('quantize', help='quantize a checkpoint (models/quantized/)')
  quantize.add_argument('model_path', metavar='MODEL_PATH')
  # Every default is the config's (compress.quantize).
  quantize.add_argument('--mode', default=_QUANTIZE.mode, choices=QUANTIZE_MODES,
                        help='default: %(default)s')
  quantize.add_argument('--bits', type=int, default=_QUANTIZE.bits, choices=QUANTIZE_BITS,
                        help="weight code width; 7 is onnxruntime's reduce_range, exact on "
                             "every CPU's fast int8 kernels (default: %(default)s)")
  quantize.add_argument('--per-tensor', action='store_true',
                        default=not _QUANTIZE.per_channel,
                        help='one scale per kernel instead of per output channel')
  quantize.add_argument('--activations', default=_QUANTIZE.activations,
                        choices=QUANTIZE_ACTIVATIONS,
                        help='per_row: one scale per example; per_batch: one per batch, '
                             "onnxruntime's fastest int8 form, batch-dependent "
                             '(default: %(default)s)')
  quantize.add_argument('--calibration-batches', type=int,
                        default=_QUANTIZE.calibration_batches,
                        help='training batches that calibrate static (default %(default)s)')
  quantize.add_argument('--calibration-method', default=_QUANTIZE.calibration_method,
                        choices=CALIBRATION_METHODS, help='default: %(default)s')
  quantize.add_argument('--finetune-epochs', type=int, default=_QUANTIZE.finetune_epochs,
                        help='QAT epochs (default %(default)s)')
  quantize.add_argument('--distill', type=float, default=_QUANTIZE.distill,
                        help="qat: share of the loss that distils the lineage's dense model "
                             '(default %(default)s: labels only)')
  quantize.add_argument('--temperature', type=float, default=_QUANTIZE.distill_temperature,
                        help='distillation temperature (default %(default)s)')
  quantize.add_argument('--augment-shift', type=int, default=_QUANTIZE.augment_shift,
                        metavar='PIXELS',
                        help='qat: shift each image at random by up to this many pixels '
                             '(default %(default)s: off)')
  _add_output_arguments(quantize)
  quantize.set_defaults(handler=_quantize)

  budget = commands.add_parser(
      'compress', help='the smallest pruned/quantized model within a validation accuracy budget')
  budget.add_argument('model_path', metavar='MODEL_PATH')
  budget.add_argument('--max-drop', type=float, default=_BUDGET.max_drop, metavar='PP',
                      help='validation accuracy the model may lose, in percentage points '
                           '(default %(default)s)')
  budget.add_argument('--method', default=_BUDGET.method, choices=BUDGET_METHODS,
                      help='pruning scores (default %(default)s)')
  budget.add_argument('--sparsities', type=float, nargs='+', default=list(_BUDGET.sparsities),
                      metavar='S', help='the ladder climbed (default %(default)s)')
  budget.add_argument('--bits', type=int, nargs='+', default=list(_BUDGET.bits),
                      metavar='B', help='bit widths tried, 0 for float (default %(default)s)')
  budget.add_argument('--finetune-epochs', type=int, default=_BUDGET.finetune_epochs,
                      help='gradual pruning epochs per sparsity (default %(default)s)')
  budget.add_argument('--quantize-mode', default=_BUDGET.quantize_mode,
                      choices=('weight_only', 'dynamic', 'qat'), help='(default %(default)s)')
  budget.add_argument('--quantize-epochs', type=int, default=_BUDGET.quantize_epochs,
                      help='QAT epochs (default %(default)s)')
  budget.add_argument('--activations', choices=QUANTIZE_ACTIVATIONS,
                      help="the quantized trials' activations (default: the source's "
                           'compress.quantize.activations)')
  _add_output_arguments(budget, job=False)
  budget.set_defaults(handler=_compress)

  calibrate = commands.add_parser(
      'calibrate', help='choose routing thresholds for a compute budget on the validation split')
  calibrate.add_argument('model_path', metavar='MODEL_PATH')
  calibrate.add_argument('--budget', type=float, required=True,
                         help='in (0, 1]: mean multiply-adds per sample as a fraction of '
                              'the same model run always-deep (or, with --target '
                              'deep_fraction, the fraction of samples routed deep)')
  calibrate.add_argument('--router', help="complexity or confidence (default: the model's)")
  calibrate.add_argument('--target', default='compute',
                         help='compute (default) or deep_fraction: what --budget bounds')
  calibrate.add_argument('--data-dir', help='directory with the MNIST IDX files')
  calibrate.add_argument('--models-dir', help="default: the source checkpoint's models folder")
  calibrate.add_argument('--version', help='MAJOR.MINOR (default: the next free one)')
  calibrate.add_argument('--overwrite', action='store_true', help='replace an existing version')
  calibrate.add_argument('--json', action='store_true', help='print one JSON object')
  calibrate.set_defaults(handler=_calibrate)

  export = commands.add_parser('export', help='export a checkpoint to ONNX, checked in onnxruntime')
  export.add_argument('model_path', metavar='MODEL_PATH')
  export.add_argument('--output', help='the .onnx file (default: beside the checkpoint)')
  export.add_argument('--raw-uint8-input', action='store_true',
                      help='take uint8 images [B, side, side]; normalise inside the graph')
  export.add_argument('--data-dir', help='directory with the MNIST IDX files (for the check)')
  export.add_argument('--routing', metavar='MODE',
                      help="per_sample, batch, deep or shallow: export the model routed so "
                           "(default: the checkpoint's mode)")
  export.add_argument('--overwrite', action='store_true', help='replace an existing file')
  export.add_argument('--json', action='store_true', help='print one JSON object')
  export.set_defaults(handler=_export)

  pipeline = commands.add_parser(
      'pipeline', help='train, prune, quantize, export and report, resumably')
  pipeline.add_argument('--config', default='configs/default.yaml',
                        help='YAML config with compress and pipeline sections '
                             '(default: %(default)s)')
  pipeline.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='override a config key, e.g. compress.prune.sparsity=0.8')
  pipeline.add_argument('--data-dir', help='directory with the MNIST IDX files')
  pipeline.add_argument('--models-dir', default='models',
                        help='root of final/, pruned/, quantized/, reports/ (default: %(default)s)')
  pipeline.add_argument('--version', default='1.0', help='MAJOR.MINOR (default: %(default)s)')
  pipeline.add_argument('--force', action='store_true',
                        help='rebuild every artifact, replacing existing ones')
  pipeline.add_argument('--json', action='store_true', help='print one JSON object')
  _add_mesh_arguments(pipeline)
  pipeline.set_defaults(handler=_pipeline)

  bench = commands.add_parser(
      'benchmark', help='training throughput, and inference speed of checkpoints and ONNX files')
  bench.add_argument('--config', default='configs/default.yaml',
                     help='YAML config (default: %(default)s)')
  bench.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
  bench.add_argument('--data-dir', help='directory with the MNIST IDX files')
  bench.add_argument('--batch-sizes', type=int, nargs='+', default=[64, 128, 1024])
  bench.add_argument('--repeats', type=int, default=5, help='timed epochs per batch size')
  bench.add_argument('--routing', nargs='+', choices=ROUTING_MODES,
                     help="routing modes to time (default: the config's)")
  bench.add_argument('--no-training', action='store_true', help='skip training throughput')
  bench.add_argument('--devices', type=int, nargs='+', metavar='N',
                     help='also time data-parallel training on meshes of these many devices '
                          '(e.g. 1 2 4 8) and print the scaling efficiency')
  bench.add_argument('--models', nargs='+', default=[], metavar='PATH',
                     help='checkpoints (JAX, and onnxruntime where PATH.onnx exists) '
                          'or .onnx files to time')
  bench.add_argument('--seconds', type=float, default=2.0,
                     help='about how long each inference figure is timed')
  bench.add_argument('--accuracy', action='store_true',
                     help='also train the config from scratch and report test accuracy')
  bench.add_argument('--dynamic', metavar='MODEL',
                     help='an early-exit checkpoint: accuracy against compute per router and '
                          'budget (thresholds from the validation split), and wall time against '
                          'the same model always-deep, in JAX and onnxruntime')
  bench.add_argument('--plot', help='with --dynamic: draw accuracy against compute to this PNG')
  bench.add_argument('--output', help='also write the results as JSON here')
  bench.add_argument('--overwrite', action='store_true', help='replace an existing --output')
  bench.add_argument('--json', action='store_true', help='print one JSON object')
  bench.set_defaults(handler=_benchmark)

  predict = commands.add_parser('predict', help='serve an exported model with onnxruntime')
  predict.add_argument('model_path', metavar='MODEL.onnx')
  predict.add_argument('--images', required=True, help='IDX images (.gz or not)')
  predict.add_argument('--labels', help='IDX labels, to report accuracy')
  predict.add_argument('--batch-size', type=int, default=256)
  predict.add_argument('--json', action='store_true', help='print one JSON object')
  predict.set_defaults(handler=_predict)

  from dnnr_jax import cli_models  # `dnnr models`: the models folder as a registry.

  cli_models.add_parser(commands)
  return parser


def _add_output_arguments(parser: argparse.ArgumentParser, job: bool = True) -> None:
  """Output options; with `job` (prune, quantize) also the guard and the learning rate."""
  if job:
    parser.add_argument('--max-drop', type=float, default=_MAX_DROP, metavar='PP',
                        help='validation accuracy the result may lose, in percentage points; '
                             'more warns (default %(default)s)')
    parser.add_argument('--learning-rate', type=float,
                        help="fine-tuning's peak learning rate (default: the source's)")
  parser.add_argument('--seed', type=int,
                      help="fine-tuning's shuffling seed (default: the source's training.seed)")
  parser.add_argument('--data-dir', help='directory with the MNIST IDX files')
  parser.add_argument('--models-dir', help="default: the source checkpoint's models folder")
  parser.add_argument('--version', help='MAJOR.MINOR (default: the next free one)')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing version')
  parser.add_argument('--json', action='store_true', help='print one JSON object')


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('always', AccuracyWarning)
      warnings.showwarning = _warning_printer(args.command, warnings.showwarning)
      return args.handler(args)
  except DnnrError as error:
    print(f'error: {in_flags(str(error), args.command)}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('interrupted; finished checkpoints are kept (dnnr train --resume, or the same '
          'dnnr pipeline command, continues).', file=sys.stderr)
    return 130


def _warning_printer(command: str, fallback: Callable[..., None]) -> Callable[..., None]:
  """`warnings.showwarning` that prints the project's warnings as `warning: ...` on stderr."""
  def show(message, category, *rest, **options):
    if issubclass(category, AccuracyWarning):
      print(f'warning: {in_flags(str(message), command)}', file=sys.stderr)
    else:
      fallback(message, category, *rest, **options)
  return show


if __name__ == '__main__':
  sys.exit(main())
