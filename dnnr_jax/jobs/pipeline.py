"""`dnnr pipeline`: data to served model in one resumable command, with a report.

Stages, each a library job:

1. train    -> `<models>/final/model_v{V}_final`
2. prune    -> `<models>/pruned/pruned_model_v{V}` (config `compress.prune`)
3. quantize -> `<models>/quantized/quantized_model_v{V}` (config
   `compress.quantize`, of the pruned model by default)
4. export   -> the three `.onnx` files beside them, each checked in onnxruntime
5. sweep    -> one pruned, fine-tuned model per `pipeline.sweep_sparsities`,
   for the accuracy-against-sparsity plot (results in the report folder)
6. report   -> `<models>/reports/v{V}/`: report.md, report.json and PNG plots

A training stage that was killed resumes from its own periodic checkpoints.
Every artifact records the hash of the settings that made it (its own and its
inputs'). A rerun skips an artifact whose hash matches and whose inputs were
reused too (a retrained model rebuilds everything made from it), and
refuses, without touching it, an existing artifact made from other settings
unless `force` (which reruns every stage).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import pathlib
import time
from typing import Any, Callable

import numpy as np

from dnnr_jax.config import Config
from dnnr_jax.errors import DnnrError, IntegrityError
from dnnr_jax.io import checkpoint as checkpoint_lib
from dnnr_jax.io import durable

ARTIFACTS = ('final', 'pruned', 'quantized')
TRAINING_SECTIONS = ('data', 'model', 'thresholds', 'routing', 'training')
StageCallback = Callable[[str, str], None]  # (stage, 'start' | 'skip' | 'done')


@dataclasses.dataclass(frozen=True)
class PipelineResult:
  """What `run_pipeline` made.

  Attributes:
    report_dir: `<models>/reports/v{version}`.
    report: the contents of report.json.
    ran: stages that did work; skipped: stages whose artifacts were reused.
  """
  report_dir: pathlib.Path
  report: dict[str, Any]
  ran: list[str]
  skipped: list[str]


def stage_hashes(config: Config) -> dict[str, str]:
  """Hash of the settings behind each artifact, chained through its inputs."""
  plain = config.to_dict()
  training = _digest({name: plain[name] for name in TRAINING_SECTIONS})
  pruned = _digest([training, plain['compress']['prune']])
  quantize = plain['compress']['quantize']
  quantized = _digest([pruned if quantize['source'] == 'pruned' else training, quantize])
  # The sweep takes the prune stage's method, schedule and rate, not its sparsity or epochs.
  sweep_prune = {key: value for key, value in plain['compress']['prune'].items()
                 if key not in ('sparsity', 'finetune_epochs')}
  sweep = _digest([training, sweep_prune, plain['pipeline']['sweep_sparsities'],
                   plain['pipeline']['sweep_finetune_epochs']])
  return {'final': training, 'pruned': pruned, 'quantized': quantized, 'sweep': sweep}


def run_pipeline(
    config: Config,
    *,
    data_dir: str | os.PathLike | None = None,
    models_dir: str | os.PathLike = 'models',
    version: str = '1.0',
    force: bool = False,
    on_stage: StageCallback | None = None,
    on_epoch: Callable[[str, dict[str, Any]], None] | None = None,
) -> PipelineResult:
  """Runs (or resumes) every stage and writes the report.

  Args:
    config: the whole configuration; `compress` and `pipeline` drive the
      stages after training.
    data_dir: where the data set is (see `dnnr_jax.io.data.load_dataset`).
    models_dir: root of final/, pruned/, quantized/ and reports/.
    version: MAJOR.MINOR of every artifact.
    force: rebuild every artifact, replacing existing ones.
    on_stage: called with (stage, 'start' | 'skip' | 'done').
    on_epoch: called with (stage, epoch record) during training stages.

  Raises:
    DnnrError: bad settings or inputs, or an existing artifact made from other
      settings (without `force`).
  """
  from dnnr_jax.io import export
  from dnnr_jax.io.data import load_dataset
  from dnnr_jax.jobs import compress as compress_jobs
  from dnnr_jax.jobs import train as jobs

  checkpoint_lib.check_version(version)
  models_dir = pathlib.Path(models_dir)
  hashes = stage_hashes(config)
  paths = {kind: checkpoint_lib.checkpoint_path(models_dir, kind, version) for kind in ARTIFACTS}
  report_dir = models_dir / 'reports' / f'v{version}'
  on_stage = on_stage or (lambda stage, event: None)
  ran, skipped, seconds = [], [], {}
  dataset = load_dataset(config.data, data_dir)  # Fails early on missing data.
  # Refuse before any work, not after an hour of it. An artifact is reused only
  # when its inputs are too: a retrained final model rebuilds everything after it.
  reuse = {kind: _reusable(paths[kind], hashes[kind], force) for kind in ARTIFACTS}
  reuse['pruned'] = reuse['pruned'] and reuse['final']
  reuse['quantized'] = reuse['quantized'] and reuse[config.compress.quantize.source]
  rebuild = {kind: force or not reuse[kind] for kind in ARTIFACTS}

  def stage(name, reusable, work):
    if reusable:
      on_stage(name, 'skip')
      skipped.append(name)
      return
    on_stage(name, 'start')
    start = time.perf_counter()
    work()
    seconds[name] = time.perf_counter() - start
    ran.append(name)
    on_stage(name, 'done')

  def epochs(name):
    return (lambda record: on_epoch(name, record)) if on_epoch else None

  def pipeline_metadata(kind):
    return {'pipeline': {'hash': hashes[kind], 'version': version}}

  prune, quantize = config.compress.prune, config.compress.quantize
  # A training stage killed part way resumes from its periodic checkpoints
  # (which `fit` refuses if they were written with another config).
  stage('train', reuse['final'], lambda: jobs.train_and_save(
      config, data_dir=data_dir, models_dir=models_dir, version=version,
      overwrite=rebuild['final'], resume=True,
      on_epoch=epochs('train'), extra_metadata=pipeline_metadata('final')))
  stage('prune', reuse['pruned'], lambda: compress_jobs.prune_as_configured(
      paths['final'], prune, data_dir=data_dir, models_dir=models_dir, version=version,
      overwrite=rebuild['pruned'], on_epoch=epochs('prune'),
      extra_metadata=pipeline_metadata('pruned')))
  stage('quantize', reuse['quantized'], lambda: compress_jobs.quantize_as_configured(
      paths[quantize.source], quantize, data_dir=data_dir, models_dir=models_dir,
      version=version, overwrite=rebuild['quantized'], on_epoch=epochs('quantize'),
      extra_metadata=pipeline_metadata('quantized')))

  check_inputs = np.asarray(dataset.test.images[:256])
  onnx_paths = {kind: export.default_output(paths[kind]) for kind in ARTIFACTS}

  stale = [kind for kind in ARTIFACTS
           if rebuild[kind] or not _onnx_matches(onnx_paths[kind], hashes[kind])]

  def export_all():
    for kind in stale:
      export.export_onnx(paths[kind], check_inputs=check_inputs, overwrite=True,
                         extra_metadata={'dnnr_jax.pipeline_hash': hashes[kind]})

  stage('export', not stale, export_all)

  sweep_file = report_dir / 'sweep.json'

  def sweep():
    results = _sweep(config, paths['final'], report_dir, data_dir, epochs('sweep'))
    report_dir.mkdir(parents=True, exist_ok=True)
    _write_json(sweep_file, {'hash': hashes['sweep'], 'results': results})

  stage('sweep', not rebuild['final'] and _json_hash(sweep_file) == hashes['sweep'], sweep)

  on_stage('report', 'start')
  report = build_report(config, paths, onnx_paths, dataset, report_dir, hashes)
  report['stage_seconds'] = seconds
  report['ran'], report['skipped'] = ran, skipped
  write_report(report, report_dir)
  on_stage('report', 'done')
  return PipelineResult(report_dir, report, ran, skipped)


def _reusable(path: pathlib.Path, expected: str, force: bool) -> bool:
  """True when `path` holds the artifact of these settings; raises if it holds another."""
  if force or not (path.exists() or durable.retired_path(path).exists()):
    return False
  with durable.writer_lock(path):
    durable.recover(path)  # A replacement a crash interrupted: the old version returns.
  try:
    recorded = checkpoint_lib.read_metadata(path).get('pipeline', {}).get('hash')
  except IntegrityError:
    raise
  except DnnrError:
    recorded = None
  if recorded != expected:
    raise DnnrError(
        f'{path} exists but was not made by this pipeline config (different settings or '
        'another command); pass --force to rebuild it, or --version for a new one.')
  checkpoint_lib.load_model(path)  # Every array checked against its digest before reuse.
  return True


def _onnx_matches(path: pathlib.Path, expected: str) -> bool:
  """True when `path` is this config's export and matches its digest.

  A damaged, edited, truncated or foreign file is rebuilt from its checkpoint
  (itself checked on load), so nothing is lost by rebuilding it.
  """
  from dnnr_jax.io import integrity

  if not path.is_file():
    return False
  try:
    onnx_model, _ = integrity.load_verified_onnx(path)
  except DnnrError:
    return False
  props = {prop.key: prop.value for prop in onnx_model.metadata_props}
  return props.get('dnnr_jax.pipeline_hash') == expected


def _json_hash(path: pathlib.Path) -> str | None:
  try:
    return json.loads(path.read_text()).get('hash')
  except (OSError, ValueError, AttributeError):
    return None


def _sweep(config: Config, final_path, report_dir, data_dir, on_epoch) -> list[dict[str, Any]]:
  """Accuracy and size of one pruned, fine-tuned model per sweep sparsity."""
  import shutil

  from dnnr_jax.jobs import compress as compress_jobs

  prune = config.compress.prune
  scratch = report_dir / '.sweep'
  shutil.rmtree(scratch, ignore_errors=True)
  results = []
  try:
    for index, sparsity in enumerate(config.pipeline.sweep_sparsities):
      epochs = config.pipeline.sweep_finetune_epochs
      settings = dataclasses.replace(
          prune, sparsity=sparsity, finetune_epochs=epochs,
          schedule=prune.schedule if epochs > 0 else 'oneshot',
          distill=prune.distill if epochs else 0.0)
      path, summary = compress_jobs.prune_as_configured(
          final_path, settings, data_dir=data_dir, models_dir=scratch,
          version=f'1.{index}', on_epoch=on_epoch)
      report = summary['compression']['sparsity_report']['overall']
      results.append({'sparsity': sparsity, 'measured_sparsity': report['sparsity'],
                      'test_accuracy': summary['metrics']['test']['accuracy'],
                      'bytes': summary['bytes']})
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return results


def build_report(config: Config, paths, onnx_paths, dataset, report_dir, hashes) -> dict[str, Any]:
  """One row per artifact (three checkpoints, three ONNX files), measured now."""
  from dnnr_jax.io import storage
  from dnnr_jax.io.serve import load_onnx
  from dnnr_jax.jobs import benchmark
  from dnnr_jax.train import evaluate

  images, labels = (np.asarray(value) for value in dataset.test)
  seconds = config.pipeline.benchmark_seconds
  models = {kind: checkpoint_lib.load_model(paths[kind]) for kind in ARTIFACTS}
  _, final_routes = models['final'].predict_with_routes(images)
  final_bytes = storage.directory_bytes(paths['final'])
  runners = {kind: benchmark.jax_runner(models[kind]) for kind in ARTIFACTS}
  runners.update({f'{kind} onnx': benchmark.onnx_runner(onnx_paths[kind]) for kind in ARTIFACTS})
  speeds = benchmark.compare_inference(runners, images[:benchmark.THROUGHPUT_BATCH], seconds)
  rows = []
  for kind in ARTIFACTS:
    model = models[kind]
    # What `dnnr evaluate` computes, on the test split already loaded.
    evaluation = evaluate(model.model, model.variables, dataset.test,
                          model.config.training.eval_batch_size)
    _, routes = model.predict_with_routes(images)
    counts = _parameter_counts(model.variables['params'])
    raw, packed = storage.directory_bytes(paths[kind]), storage.gzip_bytes(paths[kind])
    rows.append({
        'artifact': kind, 'format': 'orbax', 'path': str(paths[kind]),
        'test_accuracy': evaluation['accuracy'], 'deep_fraction': evaluation['deep_fraction'],
        'route_agreement': float(np.mean(routes == final_routes)),
        **counts, 'bytes': raw, 'gzip_bytes': packed,
        'smaller_than_final': final_bytes / raw,
        **_prefix('jax', speeds[kind]),
    })
  for kind in ARTIFACTS:
    session = load_onnx(onnx_paths[kind]).session
    logits, routes = [], []
    for first in range(0, images.shape[0], 1000):
      batch_logits, batch_routes = session.run(['logits', 'deep_path'],
                                               {'input': images[first:first + 1000]})
      logits.append(batch_logits)
      routes.append(batch_routes)
    logits, routes = np.concatenate(logits), np.concatenate(routes)
    data = onnx_paths[kind].read_bytes()
    source_row = rows[ARTIFACTS.index(kind)]
    rows.append({
        'artifact': f'{kind} onnx', 'format': 'onnx', 'path': str(onnx_paths[kind]),
        'test_accuracy': float(np.mean(np.argmax(logits, -1) == labels)),
        'deep_fraction': float(np.mean(routes)),
        'route_agreement': float(np.mean(routes == final_routes)),
        'parameters': source_row['parameters'], 'nonzeros': source_row['nonzeros'],
        'bytes': len(data), 'gzip_bytes': len(gzip.compress(data, 9, mtime=0)),
        'smaller_than_final': final_bytes / len(data),
        **_prefix('onnxruntime', speeds[f'{kind} onnx']),
    })
  final_metadata = models['final'].metadata
  pruned_metadata = models['pruned'].metadata
  sweep = json.loads((report_dir / 'sweep.json').read_text())['results'] if (
      report_dir / 'sweep.json').is_file() else []
  return {
      'version': final_metadata['version'],
      'dataset': dataset.name,
      'machine': benchmark.machine(),
      'config': config.to_dict(),
      'hashes': hashes,
      'rows': rows,
      'history': final_metadata.get('history', []),
      'sparsity_report': pruned_metadata['compression'].get('sparsity_report'),
      'compression': {'pruned': pruned_metadata['compression'],
                      'quantized': models['quantized'].metadata['compression']},
      'sweep': sweep,
      'final_test_accuracy': rows[0]['test_accuracy'],
  }


def write_report(report: dict[str, Any], report_dir: pathlib.Path) -> None:
  """report.json, report.md and the plots, each written whole or not at all."""
  from dnnr_jax.io import plots

  report_dir.mkdir(parents=True, exist_ok=True)
  report['plots'] = plots.write_all(report, report_dir)
  _write_json(report_dir / 'report.json', report)
  _write_text(report_dir / 'report.md', markdown(report))


def markdown(report: dict[str, Any]) -> str:
  """The report as Markdown: the artifact table, settings, plots."""
  machine = report['machine']
  lines = [
      f"# dnnr_jax pipeline report, version {report['version']} ({report['dataset']})",
      '',
      f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, JAX {machine['jax']} "
      f"({machine['backend']}). Latency: median per call at batch 1; throughput: "
      'samples/s at batch 256 (see `dnnr_jax.jobs.benchmark`).',
      '',
      '| artifact | test accuracy | deep path | route agreement | parameters | non-zeros '
      '| bytes | gzip bytes | x smaller | latency µs (b=1) | samples/s (b=256) |',
      '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for row in report['rows']:
    engine = 'jax' if row['format'] == 'orbax' else 'onnxruntime'
    lines.append(
        f"| {row['artifact']} | {row['test_accuracy']:.2%} | {row['deep_fraction']:.1%} "
        f"| {row['route_agreement']:.2%} | {row['parameters']:,} | {row['nonzeros']:,} "
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
  lines += ['', '## Plots', '']
  lines += [f'![{name}]({file})' for name, file in report['plots'].items()]
  return '\n'.join(lines) + '\n'


def _settings(settings: dict[str, Any]) -> str:
  return ', '.join(f'{key} {value}' for key, value in settings.items()
                   if not isinstance(value, dict))


def _parameter_counts(params: Any) -> dict[str, int]:
  import jax

  from dnnr_jax.compress.quantize import QArray

  leaves = jax.tree.leaves(params, is_leaf=lambda leaf: isinstance(leaf, QArray))
  arrays = [np.asarray(leaf.value if isinstance(leaf, QArray) else leaf) for leaf in leaves]
  return {'parameters': int(sum(array.size for array in arrays)),
          'nonzeros': int(sum(np.count_nonzero(array) for array in arrays))}


def _prefix(engine: str, speed: dict[str, float]) -> dict[str, float]:
  return {f'{engine}_{key}': value for key, value in speed.items()}


def _digest(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _write_json(path: pathlib.Path, value: Any) -> None:
  _write_text(path, json.dumps(value, indent=2) + '\n')


def _write_text(path: pathlib.Path, text: str) -> None:
  durable.write_bytes(path, text.encode())
