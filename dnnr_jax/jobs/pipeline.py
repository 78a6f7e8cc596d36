"""`dnnr pipeline`: data to served model in one resumable command, with a report.

Stages, each a library job:

1. train    -> `<models>/final/model_v{V}_final`
2. prune    -> `<models>/pruned/pruned_model_v{V}` (config `compress.prune`)
3. quantize -> `<models>/quantized/quantized_model_v{V}` (config
   `compress.quantize`, of the pruned model by default)
4. export   -> the three `.onnx` files beside them, each checked in onnxruntime
5. sweep    -> one pruned, fine-tuned model per `pipeline.sweep_sparsities`,
   for the accuracy-against-sparsity plot (results in the report folder)
   budget   -> with `compress.budget.in_pipeline`: `dnnr compress`'s search on the
   final model (`dnnr_jax.jobs.budget`), its choice in budget.json
6. report   -> `<models>/reports/v{V}/`: report.md, report.json and PNG plots
   (`dnnr_jax.jobs.report`); and a model card beside each checkpoint
   (`dnnr_jax.io.model_card`)

A training stage that was killed resumes from its own periodic checkpoints.
Every artifact records the hash of the settings that made it (its own and its
inputs'). A rerun skips an artifact whose hash matches and whose inputs were
reused too (a retrained model rebuilds everything made from it), and
refuses, without touching it, an existing artifact made from other settings
unless `force` (which reruns every stage).
"""

from __future__ import annotations

import dataclasses
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
from dnnr_jax.io import distributed, durable, model_card
from dnnr_jax.jobs.report import ARTIFACTS, build_report, write_json, write_report

TRAINING_SECTIONS = ('data', 'model', 'thresholds', 'routing', 'training')
ADDED_PRUNE_SETTINGS = ('gradual_end', 'mask_updates')
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
  """Hash of the settings behind each artifact, chained through its inputs.

  Settings added after version 1.0 of the pipeline count only when they
  differ from their defaults, so artifacts made before they existed (with
  the same behaviour) are still reused.
  """
  plain = config.to_dict()
  defaults = Config().to_dict()['compress']['prune']
  for key in ADDED_PRUNE_SETTINGS:
    if plain['compress']['prune'][key] == defaults[key]:
      del plain['compress']['prune'][key]
  training = _digest({name: plain[name] for name in TRAINING_SECTIONS})
  pruned = _digest([training, plain['compress']['prune']])
  quantize = plain['compress']['quantize']
  quantized = _digest([pruned if quantize['source'] == 'pruned' else training, quantize])
  # The sweep takes the prune stage's method, schedule and rate, not its sparsity or epochs.
  sweep_prune = {key: value for key, value in plain['compress']['prune'].items()
                 if key not in ('sparsity', 'finetune_epochs')}
  sweep = _digest([training, sweep_prune, plain['pipeline']['sweep_sparsities'],
                   plain['pipeline']['sweep_finetune_epochs']])
  # The budget's trials follow the final model's compress.prune and compress.quantize recipes.
  budget = _digest([training, plain['compress']['budget'], plain['compress']['prune'],
                    plain['compress']['quantize']])
  return {'final': training, 'pruned': pruned, 'quantized': quantized, 'sweep': sweep,
          'budget': budget}


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
  stage = _Stages(on_stage or (lambda stage, event: None))
  dataset = load_dataset(config.data, data_dir)  # Fails early on missing data.
  reuse = _reuse_plan(config, paths, hashes, force)  # Refuses before any work.
  rebuild = {kind: force or not reuse[kind] for kind in ARTIFACTS}

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
  stage('prune', reuse['pruned'], lambda: compress_jobs.prune_checkpoint(
      paths['final'], prune, data_dir=data_dir, models_dir=models_dir, version=version,
      overwrite=rebuild['pruned'], on_epoch=epochs('prune'),
      extra_metadata=pipeline_metadata('pruned'), max_drop=config.compress.max_drop))
  stage('quantize', reuse['quantized'], lambda: compress_jobs.quantize_checkpoint(
      paths[quantize.source], quantize, data_dir=data_dir, models_dir=models_dir,
      version=version, overwrite=rebuild['quantized'], on_epoch=epochs('quantize'),
      extra_metadata=pipeline_metadata('quantized'), max_drop=config.compress.max_drop))

  check_inputs = np.asarray(dataset.test.images[:256])
  onnx_paths = {kind: export.default_output(paths[kind]) for kind in ARTIFACTS}

  stale = [kind for kind in ARTIFACTS
           if rebuild[kind] or not _onnx_matches(onnx_paths[kind], hashes[kind])]

  def export_all():
    for kind in stale:
      export.export_onnx(paths[kind], check_inputs=check_inputs, overwrite=True,
                         extra_metadata={'dnnr_jax.pipeline_hash': hashes[kind]})

  # One copy of each file; the other processes wait for it (`distributed.on_primary`).
  stage('export', not stale, lambda: distributed.on_primary('export', export_all))

  sweep_file = report_dir / 'sweep.json'

  def sweep():
    results = _sweep(config, paths['final'], report_dir, data_dir, epochs('sweep'))

    def write():
      report_dir.mkdir(parents=True, exist_ok=True)
      write_json(sweep_file, {'hash': hashes['sweep'], 'results': results})

    distributed.on_primary('sweep', write)

  stage('sweep', not rebuild['final'] and _json_hash(sweep_file) == hashes['sweep'], sweep)

  budget_file = report_dir / 'budget.json'

  def budget():
    from dnnr_jax.jobs import budget as budget_jobs

    result = budget_jobs.compress_to_budget(paths['final'], config.compress.budget,
                                            data_dir=data_dir, models_dir=models_dir)
    distributed.on_primary('budget', lambda: write_json(
        budget_file, {'hash': hashes['budget'], 'result': result.to_dict()}))

  if config.compress.budget.in_pipeline:
    # Its trials resume on their own; the chosen model is written once per settings,
    # and again (from the kept trials) if it was removed.
    stage('budget', not rebuild['final'] and _budget_done(budget_file, hashes['budget']), budget)

  def write_all():
    report = build_report(config, paths, onnx_paths, dataset, report_dir, hashes)
    report.update(stage_seconds=stage.seconds, ran=stage.ran, skipped=stage.skipped)
    write_report(report, report_dir)
    for kind in ARTIFACTS:  # After the report, so each card cites its ONNX accuracy.
      model_card.write_card(models_dir, str(paths[kind]))
    return report

  stage.on_stage('report', 'start')
  # Process 0 writes the report (the others return no rows), and every process ends with it.
  report = distributed.on_primary('report', write_all) or {'rows': []}
  stage.on_stage('report', 'done')
  return PipelineResult(report_dir, report, stage.ran, stage.skipped)


def _reuse_plan(config: Config, paths, hashes, force: bool) -> dict[str, bool]:
  """Which artifacts to reuse; refuses one made from other settings, before any work.

  An artifact is reused only when its inputs are too: a retrained final model
  rebuilds everything after it.
  """
  reuse = {kind: _reusable(paths[kind], hashes[kind], force) for kind in ARTIFACTS}
  reuse['pruned'] = reuse['pruned'] and reuse['final']
  reuse['quantized'] = reuse['quantized'] and reuse[config.compress.quantize.source]
  return reuse


@dataclasses.dataclass
class _Stages:
  """Runs or skips each stage in turn, telling `on_stage` and timing the work."""
  on_stage: StageCallback
  ran: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)

  def __call__(self, name: str, reusable: bool, work: Callable[[], Any]) -> None:
    if reusable:
      self.on_stage(name, 'skip')
      self.skipped.append(name)
      return
    self.on_stage(name, 'start')
    start = time.perf_counter()
    work()
    self.seconds[name] = time.perf_counter() - start
    self.ran.append(name)
    self.on_stage(name, 'done')


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
        'another command); pass force=True to rebuild it, or another version=MAJOR.MINOR '
        'for a new one.')
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


def _budget_done(path: pathlib.Path, expected: str) -> bool:
  """Whether budget.json records a search with these settings whose chosen model is on disk."""
  try:
    record = json.loads(path.read_text())
    return record['hash'] == expected and pathlib.Path(record['result']['path']).is_dir()
  except (OSError, ValueError, KeyError, TypeError):
    return False


def _sweep(config: Config, final_path, report_dir, data_dir, on_epoch) -> list[dict[str, Any]]:
  """Accuracy and size of one pruned, fine-tuned model per sweep sparsity."""
  import shutil

  from dnnr_jax.jobs import compress as compress_jobs

  prune = config.compress.prune
  scratch = report_dir / '.sweep'
  # A killed run's leftovers, removed before any process writes there.
  distributed.on_primary('sweep', lambda: shutil.rmtree(scratch, ignore_errors=True))
  results = []
  try:
    for index, sparsity in enumerate(config.pipeline.sweep_sparsities):
      epochs = config.pipeline.sweep_finetune_epochs
      settings = dataclasses.replace(
          prune, sparsity=sparsity, finetune_epochs=epochs,
          schedule=prune.schedule if epochs > 0 else 'oneshot',
          distill=prune.distill if epochs else 0.0,
          augment_shift=prune.augment_shift if epochs else 0)
      result = compress_jobs.prune_checkpoint(
          final_path, settings, data_dir=data_dir, models_dir=scratch,
          version=f'1.{index}', on_epoch=on_epoch, max_drop=None)  # A sweep goes past it.
      results.append({'sparsity': sparsity, 'measured_sparsity': result.sparsity,
                      'test_accuracy': result.accuracy,
                      'bytes': dataclasses.asdict(result.size)})
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return results


def _digest(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
