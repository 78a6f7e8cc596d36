"""The pipeline's report: one measured row per artifact, as JSON, Markdown and plots.

`build_report` loads the three checkpoints and runs their ONNX files in
onnxruntime on the test split (accuracy, routes and each route's accuracy,
sizes, latency and throughput); for an early-exit model it adds what the
dynamic inference saves (`jobs.dynamic`: accuracy against compute per router
and budget, wall time against the same model always-deep). `write_report`
writes `report.json`, `report.md` and the PNG plots, each whole or not at
all.
"""

from __future__ import annotations

import gzip
import json
import pathlib
from typing import Any

import numpy as np

from dnnr_jax.config import Config
from dnnr_jax.io import checkpoint as checkpoint_lib
from dnnr_jax.io import durable
from dnnr_jax.jobs import timing

ARTIFACTS = ('final', 'pruned', 'quantized')
# Batch-1 latency of the dynamic section: the first this many test images.
DYNAMIC_LATENCY_ROWS = 1000


def build_report(config: Config, paths, onnx_paths, dataset, report_dir, hashes) -> dict[str, Any]:
  """One row per artifact (three checkpoints, three ONNX files), measured now."""
  from dnnr_jax.io import storage
  from dnnr_jax.train import evaluate

  images, labels = (np.asarray(value) for value in dataset.test)
  seconds = config.pipeline.benchmark_seconds
  models = {kind: checkpoint_lib.load_model(paths[kind]) for kind in ARTIFACTS}
  _, final_routes = models['final'].predict_with_routes(images)
  final_bytes = storage.directory_bytes(paths['final'])
  runners = {kind: timing.jax_runner(models[kind]) for kind in ARTIFACTS}
  runners.update({f'{kind} onnx': timing.onnx_runner(onnx_paths[kind]) for kind in ARTIFACTS})
  speeds = timing.compare_inference(runners, images[:timing.THROUGHPUT_BATCH], seconds)
  rows = []
  for kind in ARTIFACTS:
    model = models[kind]
    # What `dnnr evaluate` computes, on the test split already loaded.
    evaluation = evaluate(model.model, model.variables, dataset.test,
                          model.config.training.eval_batch_size)
    logits, routes = model.predict_with_routes(images)
    counts = _parameter_counts(model.variables['params'])
    raw, packed = storage.directory_bytes(paths[kind]), storage.gzip_bytes(paths[kind])
    rows.append({
        'artifact': kind, 'format': 'orbax', 'path': str(paths[kind]),
        'test_accuracy': evaluation['accuracy'], 'deep_fraction': evaluation['deep_fraction'],
        'route_agreement': float(np.mean(routes == final_routes)),
        **route_accuracy(logits, routes, labels),
        **counts, 'bytes': raw, 'gzip_bytes': packed,
        'smaller_than_final': final_bytes / raw,
        'validation_drop_pp': model.metadata.get('accuracy_guard', {}).get('drop_pp'),
        'over_budget': model.metadata.get('accuracy_guard', {}).get('over_budget', False),
        **_prefix('jax', speeds[kind]),
    })
  rows += [_onnx_row(onnx_paths[kind], kind, (images, labels), final_routes, final_bytes,
                     rows[ARTIFACTS.index(kind)], speeds[f'{kind} onnx']) for kind in ARTIFACTS]
  final_metadata = models['final'].metadata
  pruned_metadata = models['pruned'].metadata
  sweep = json.loads((report_dir / 'sweep.json').read_text())['results'] if (
      report_dir / 'sweep.json').is_file() else []
  budget = json.loads((report_dir / 'budget.json').read_text())['result'] if (
      config.compress.budget.in_pipeline and (report_dir / 'budget.json').is_file()) else None
  return {
      'version': final_metadata['version'],
      'dataset': dataset.name,
      'machine': timing.machine(),
      'config': config.to_dict(),
      'hashes': hashes,
      'rows': rows,
      'history': final_metadata.get('history', []),
      'sparsity_report': pruned_metadata['compression'].get('sparsity_report'),
      'compression': {'pruned': pruned_metadata['compression'],
                      'quantized': models['quantized'].metadata['compression']},
      'sweep': sweep,
      'budget': budget,
      'final_test_accuracy': rows[0]['test_accuracy'],
      'dynamic': dynamic_section(config, paths['final'], dataset),
  }


def route_accuracy(logits: np.ndarray, routes: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
  """Test accuracy on each route (None for a route no sample took)."""
  correct = np.argmax(np.asarray(logits), -1) == np.asarray(labels)
  routes = np.asarray(routes, bool)
  return {f'{name}_accuracy': float(correct[taken].mean()) if taken.any() else None
          for name, taken in (('deep_route', routes), ('shallow_route', ~routes))}


def dynamic_section(config: Config, final_path, dataset) -> dict[str, Any] | None:
  """`jobs.dynamic.run_report` of an early-exit final model (None for 'original')."""
  if config.model.family != 'early_exit':
    return None
  from dnnr_jax.jobs import dynamic

  return dynamic.run_report(final_path, dataset=dataset, latency_rows=DYNAMIC_LATENCY_ROWS)


def _onnx_row(path: pathlib.Path, kind: str, test: tuple[np.ndarray, np.ndarray],
              final_routes: np.ndarray, final_bytes: int, source_row: dict[str, Any],
              speed: dict[str, float]) -> dict[str, Any]:
  """The report row of one ONNX file, run in onnxruntime on the test split."""
  from dnnr_jax.io.serve import load_onnx, run_batches

  images, labels = test
  session = load_onnx(path).session  # Checked against its digest.
  logits, routes = run_batches(session, images, 1000)
  data = path.read_bytes()
  return {
      'artifact': f'{kind} onnx', 'format': 'onnx', 'path': str(path),
      'test_accuracy': float(np.mean(np.argmax(logits, -1) == labels)),
      'deep_fraction': float(np.mean(routes)),
      'route_agreement': float(np.mean(routes == final_routes)),
      **route_accuracy(logits, routes, labels),
      'parameters': source_row['parameters'], 'nonzeros': source_row['nonzeros'],
      'bytes': len(data), 'gzip_bytes': len(gzip.compress(data, 9, mtime=0)),
      'smaller_than_final': final_bytes / len(data),
      'validation_drop_pp': source_row['validation_drop_pp'],
      'over_budget': source_row['over_budget'],
      **_prefix('onnxruntime', speed),
  }


def write_report(report: dict[str, Any], report_dir: pathlib.Path) -> None:
  """report.json, report.md and the plots, each written whole or not at all."""
  from dnnr_jax.io import plots

  report_dir.mkdir(parents=True, exist_ok=True)
  report['plots'] = plots.write_all(report, report_dir)
  write_json(report_dir / 'report.json', report)
  write_text(report_dir / 'report.md', markdown(report))


def markdown(report: dict[str, Any]) -> str:
  """The report as Markdown: the artifact table, settings, plots."""
  machine = report['machine']
  lines = [
      f"# dnnr_jax pipeline report, version {report['version']} ({report['dataset']})",
      '',
      f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, JAX {machine['jax']} "
      f"({machine['backend']}). Latency: median per call at batch 1; throughput: "
      'samples/s at batch 256 (see `dnnr_jax.jobs.timing`).',
      '',
      'Validation drop: validation accuracy lost against the source model, in percentage '
      'points (the accuracy guard, `compress.max_drop`).',
      '',
      '| artifact | test accuracy | validation drop | deep path | route agreement '
      '| accuracy deep / shallow route | parameters | non-zeros | bytes | gzip bytes | x smaller '
      '| latency µs (b=1) | samples/s (b=256) |',
      '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for row in report['rows']:
    engine = 'jax' if row['format'] == 'orbax' else 'onnxruntime'
    routes = ' / '.join(_percent(row.get(f'{name}_accuracy'))
                        for name in ('deep_route', 'shallow_route'))
    drop = row.get('validation_drop_pp')
    drop = '' if drop is None else f"{drop:.2f} pp{' (over budget)' if row['over_budget'] else ''}"
    lines.append(
        f"| {row['artifact']} | {row['test_accuracy']:.2%} | {drop} | {row['deep_fraction']:.1%} "
        f"| {row['route_agreement']:.2%} | {routes} | {row['parameters']:,} | {row['nonzeros']:,} "
        f"| {row['bytes']:,} | {row['gzip_bytes']:,} | {row['smaller_than_final']:.1f} "
        f"| {row[engine + '_latency_us']:.1f} ({engine}) "
        f"| {row[engine + '_throughput']:,.0f} ({engine}) |")
  compression = report['compression']
  lines += ['', '## Settings', '',
            f"- pruning: {_settings(compression['pruned'])}",
            f"- quantization: {_settings(compression['quantized'])}"]
  if report.get('stage_seconds'):
    lines.append('- stage seconds (this run): ' + ', '.join(
        f'{name} {value:.1f}' for name, value in report['stage_seconds'].items()))
  if report.get('skipped'):
    lines.append(f"- reused from an earlier run: {', '.join(report['skipped'])}")
  if report['sweep']:
    lines += ['', '## Sparsity sweep', '', '| sparsity | test accuracy | bytes |',
              '| ---: | ---: | ---: |']
    lines += [f"| {item['measured_sparsity']:.1%} | {item['test_accuracy']:.2%} "
              f"| {item['bytes']['raw']:,} |" for item in report['sweep']]
  if report.get('dynamic'):
    lines += ['', '## Dynamic inference: the final model against itself always-deep', '',
              'Thresholds for each budget chosen on the validation split, test figures '
              'reported; multiply-adds counted from the routes taken (see '
              '`dnnr_jax.jobs.dynamic`).', '', report['dynamic']['markdown'].rstrip('\n')]
  if report.get('budget'):
    budget = report['budget']
    chosen = budget['chosen']
    lines += ['', '## Smallest model within the accuracy budget', '',
              f"`compress.budget`: {len(budget['trials'])} trials (chosen on validation), "
              f"every one in `{budget['report_dir']}/report.md`. Chosen: sparsity "
              f"{chosen['sparsity']:.1%}, {chosen['bits'] or 'float'} bits, "
              f"{budget['bytes']['raw']:,} bytes ({budget['smaller_than_dense']:.1f}x smaller "
              f"than the dense model), validation drop {chosen['drop_pp']:.2f} pp, test "
              f"accuracy {budget['test_accuracy']:.2%}: `{budget['path']}`."]
  lines += ['', '## Plots', '']
  lines += [f'![{name}]({file})' for name, file in report['plots'].items()]
  return '\n'.join(lines) + '\n'


def _percent(value: float | None) -> str:
  return '–' if value is None else f'{value:.2%}'


def _settings(settings: dict[str, Any]) -> str:
  return ', '.join(f'{key} {value}' for key, value in settings.items()
                   if not isinstance(value, dict))


def _parameter_counts(params: Any) -> dict[str, int]:
  import jax

  from dnnr_jax.compress.quantize import is_qarray

  leaves = jax.tree.leaves(params, is_leaf=is_qarray)
  arrays = [np.asarray(leaf.value if is_qarray(leaf) else leaf) for leaf in leaves]
  return {'parameters': int(sum(array.size for array in arrays)),
          'nonzeros': int(sum(np.count_nonzero(array) for array in arrays))}


def _prefix(engine: str, speed: dict[str, float]) -> dict[str, float]:
  return {f'{engine}_{key}': value for key, value in speed.items()}


def write_json(path: pathlib.Path, value: Any) -> None:
  """`value` as indented JSON, written whole or not at all."""
  write_text(path, json.dumps(value, indent=2) + '\n')


def write_text(path: pathlib.Path, text: str) -> None:
  """`text` as UTF-8, written whole or not at all."""
  durable.write_bytes(path, text.encode())
