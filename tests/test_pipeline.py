"""`dnnr pipeline` end to end through the real CLI: artifacts, report, resume, force."""

import json
import math
import pathlib
import shutil
import sys

import pytest

from dnnr_jax.config import load_config
from dnnr_jax.io.checkpoint import checkpoint_path
from dnnr_jax.jobs import pipeline
from tests.cli_helpers import assert_one_line_error, one_json, run, run_all, snapshot
from tests.conftest import SMOKE_CONFIG

ROW_KEYS = ('artifact', 'format', 'path', 'test_accuracy', 'deep_fraction', 'route_agreement',
            'parameters', 'nonzeros', 'bytes', 'gzip_bytes', 'smaller_than_final')
STAGES = ['train', 'prune', 'quantize', 'export', 'sweep', 'budget']
# The smoke config with a validation split and `dnnr compress`'s search as a stage:
# one rung, 8 bits, a budget any trial meets.
SETTINGS = ('data.validation_size=200', 'compress.budget.in_pipeline=true',
            'compress.budget.max_drop=100', 'compress.budget.sparsities=[0.5]',
            'compress.budget.bits=[8]', 'compress.budget.finetune_epochs=1',
            'compress.budget.quantize_mode=dynamic')


def _pipeline(models, *extra):
  return run(sys.executable, '-m', 'dnnr_jax', 'pipeline', '--config', SMOKE_CONFIG,
             '--models-dir', models, '--json',
             *(item for setting in SETTINGS for item in ('--set', setting)), *extra)


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
  models = tmp_path_factory.mktemp('pipeline') / 'models'
  return models, one_json(_pipeline(models))


def test_every_artifact_and_the_report_are_written(first_run):
  models, summary = first_run
  assert summary['ran'] == STAGES and summary['skipped'] == []
  for path in ('final/model_v1.0_final', 'pruned/pruned_model_v1.0',
               'quantized/quantized_model_v1.0'):
    assert (models / path).is_dir() and (models / f'{path}.onnx').is_file()
  report_dir = models / 'reports' / 'v1.0'
  report = json.loads((report_dir / 'report.json').read_text())
  assert [row['artifact'] for row in report['rows']] == [
      'final', 'pruned', 'quantized', 'final onnx', 'pruned onnx', 'quantized onnx']
  for row in report['rows']:
    engine = 'jax' if row['format'] == 'orbax' else 'onnxruntime'
    for key in ROW_KEYS + (f'{engine}_latency_us', f'{engine}_throughput'):
      assert key in row, (row['artifact'], key)
    assert math.isfinite(row[f'{engine}_latency_us']) and row[f'{engine}_throughput'] > 0
  assert set(report['plots'].values()) == {
      'training.png', 'thresholds.png', 'sparsity.png', 'sweep.png'}
  for name in report['plots'].values():
    assert (report_dir / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert [item['sparsity'] for item in report['sweep']] == [0.5, 0.9]
  markdown = (report_dir / 'report.md').read_text()
  assert '| quantized onnx |' in markdown and '![sparsity per layer](sparsity.png)' in markdown
  # The search's choice takes the next version beside the pipeline's own v1.0.
  budget = json.loads((report_dir / 'budget.json').read_text())['result']
  assert budget['path'] == str(models / 'quantized' / 'quantized_model_v1.1')
  assert f"`{budget['path']}`" in markdown


def test_pruned_and_quantized_are_smaller_and_sparse(first_run):
  models, summary = first_run
  rows = {row['artifact']: row for row in summary['rows']}
  assert rows['pruned']['nonzeros'] < 0.3 * rows['final']['nonzeros']
  # A toy model's checkpoint is mostly metadata; the MNIST figures are in the README.
  assert rows['quantized']['bytes'] < rows['final']['bytes']
  assert rows['pruned']['bytes'] < rows['final']['bytes']
  assert rows['quantized onnx']['bytes'] < rows['final onnx']['bytes']
  # Its pruned kernels are sparse initializers: 0.69x here, a toy graph being mostly nodes.
  assert rows['pruned onnx']['bytes'] < 0.8 * rows['final onnx']['bytes']


def test_every_onnx_agrees_with_its_checkpoint(first_run):
  _, summary = first_run
  rows = {row['artifact']: row for row in summary['rows']}
  for kind in ('final', 'pruned', 'quantized'):
    assert rows[f'{kind} onnx']['test_accuracy'] == rows[kind]['test_accuracy']
    assert rows[f'{kind} onnx']['deep_fraction'] == rows[kind]['deep_fraction']
    assert rows[f'{kind} onnx']['route_agreement'] == 1.0


@pytest.fixture(scope='module')
def evaluated(first_run):
  """`dnnr models` and `dnnr evaluate` of each checkpoint the first run wrote, side by side."""
  models, summary = first_run
  results = run_all({
      'models': (sys.executable, '-m', 'dnnr_jax', 'models', '--models-dir', models, '--json'),
      **{row['artifact']: (sys.executable, '-m', 'dnnr_jax', 'evaluate', row['path'], '--json')
         for row in summary['rows'][:3]}})
  return one_json(results.pop('models'))['entries'], {
      artifact: one_json(result) for artifact, result in results.items()}


def test_report_numbers_equal_dnnr_evaluate(first_run, evaluated):
  _, summary = first_run
  _, metrics = evaluated
  assert list(metrics) == ['final', 'pruned', 'quantized']
  for row in summary['rows'][:3]:
    assert metrics[row['artifact']]['accuracy'] == row['test_accuracy']
    assert metrics[row['artifact']]['deep_fraction'] == row['deep_fraction']


def test_dnnr_models_lists_every_artifact_and_cards_carry_dnnr_evaluate(first_run, evaluated):
  models, summary = first_run
  listed, metrics = evaluated
  parents = {row['ref']: row['parent'] and pathlib.Path(row['parent']).name for row in listed}
  assert parents == {
      'final:1.0': None, 'final:1.0.onnx': 'model_v1.0_final',
      'pruned:1.0': 'model_v1.0_final', 'pruned:1.0.onnx': 'pruned_model_v1.0',
      'quantized:1.0': 'pruned_model_v1.0', 'quantized:1.0.onnx': 'quantized_model_v1.0',
      'quantized:1.1': 'model_v1.0_final'}  # the search's choice, made from the final model
  assert {row['state'] for row in listed} == {'ok'}
  paths = {row['ref']: row['path'] for row in listed}
  # The listed checkpoints are the ones `dnnr evaluate` measured.
  evaluated_paths = {row['artifact']: row['path'] for row in summary['rows'][:3]}
  for artifact in ('final', 'quantized'):
    ref = f'{artifact}:1.0'
    assert pathlib.Path(paths[ref]) == pathlib.Path(evaluated_paths[artifact])
    card = pathlib.Path(paths[ref] + '.card.md').read_text()
    assert card.startswith('---\nlibrary_name: dnnr_jax\n')
    for key in ('accuracy', 'loss', 'deep_fraction'):
      assert f"| test {key.replace('_', ' ')} | {metrics[artifact][key]:.6f} |" in card, (
          ref, key)
    assert f'dnnr evaluate {models.name}/' in card and 'onnxruntime.InferenceSession' in card


def test_rerun_skips_finished_stages_and_rebuilds_only_what_is_missing(first_run):
  models, _ = first_run
  final = models / 'final'
  before = snapshot(final)
  assert one_json(_pipeline(models))['ran'] == []
  assert snapshot(final) == before
  assert not (models / 'quantized' / 'quantized_model_v1.2').exists()
  # The quantized checkpoints, the search's choice among them, are gone: rebuilt, the
  # search from its kept trials.
  shutil.rmtree(models / 'quantized')
  summary = one_json(_pipeline(models))
  assert summary['ran'] == ['quantize', 'export', 'budget'] and snapshot(final) == before
  assert (models / 'quantized' / 'quantized_model_v1.0.onnx').is_file()
  assert (models / 'quantized' / 'quantized_model_v1.1').is_dir()


def test_a_retrained_model_rebuilds_everything_made_from_it(tmp_path, first_run):
  models, _ = first_run
  copy = tmp_path / 'models'
  shutil.copytree(models, copy)
  config = load_config(SMOKE_CONFIG, list(SETTINGS))
  hashes = pipeline.stage_hashes(config)
  paths = {kind: checkpoint_path(copy, kind, '1.0') for kind in ('final', 'pruned', 'quantized')}
  assert pipeline._reuse_plan(config, paths, hashes, force=False) == dict.fromkeys(paths, True)
  shutil.rmtree(paths['final'])
  # The pruned and quantized models on disk came from the deleted model: rebuilt too
  # (a whole run rebuilding every stage is test_other_settings_are_refused_and_force_rebuilds).
  assert pipeline._reuse_plan(config, paths, hashes, force=False) == dict.fromkeys(paths, False)


def test_other_settings_are_refused_and_force_rebuilds(first_run):
  models, _ = first_run
  before = snapshot(models / 'pruned')
  refused = _pipeline(models, '--set', 'compress.prune.sparsity=0.5')
  assert_one_line_error(refused, ['pruned_model_v1.0', '--force'])
  assert snapshot(models / 'pruned') == before
  summary = one_json(_pipeline(models, '--force'))
  assert summary['ran'] == STAGES


def test_stage_hashes_follow_their_inputs():
  base = pipeline.stage_hashes(load_config(SMOKE_CONFIG))

  def changed(*overrides):
    hashes = pipeline.stage_hashes(load_config(SMOKE_CONFIG, overrides))
    return {name for name in base if hashes[name] != base[name]}

  assert changed('training.seed=1') == {'final', 'pruned', 'quantized', 'sweep', 'budget'}
  assert changed('compress.prune.sparsity=0.5') == {'pruned', 'quantized', 'budget'}
  assert changed('compress.quantize.bits=4') == {'quantized', 'budget'}
  assert changed('compress.quantize.source=final') == {'quantized', 'budget'}
  assert changed('compress.budget.max_drop=0.5') == {'budget'}
  assert changed('pipeline.sweep_sparsities=[0.3]') == {'sweep'}
  assert changed('pipeline.benchmark_seconds=2.0') == set()


def test_benchmark_command_times_training_and_every_engine(first_run):
  models, _ = first_run
  final = models / 'final' / 'model_v1.0_final'
  quantized_onnx = models / 'quantized' / 'quantized_model_v1.0.onnx'
  results = one_json(run(
      sys.executable, '-m', 'dnnr_jax', 'benchmark', '--config', SMOKE_CONFIG,
      '--batch-sizes', '32', '--repeats', '1', '--models', final, quantized_onnx,
      '--seconds', '0.05', '--json'))
  assert [row['batch_size'] for row in results['training']] == [32]
  training = results['training'][0]
  assert training['samples_per_second'] > 0
  # XLA's count for one step of the smoke model (64-32-32, 16-wide paths, 10
  # classes), per example: at least the forward matmuls and the weight
  # gradients, 2 x 2 FLOPs per multiply-add.
  macs = 64 * 32 + 32 * 32 + 32 * 16 * 2 + 16 * 10
  assert training['flops_per_sample'] >= 4 * macs
  assert training['gflops'] == pytest.approx(
      training['flops_per_sample'] * training['samples_per_second'] / 1e9)
  assert results['machine']['matmul_gflops'] > 0
  assert [(row['model'], row['engine']) for row in results['inference']] == [
      ('model_v1.0_final', 'jax'), ('model_v1.0_final.onnx', 'onnxruntime'),
      ('quantized_model_v1.0.onnx', 'onnxruntime')]
  assert all(row['latency_us'] > 0 and row['throughput'] > 0 for row in results['inference'])
  missing = run(sys.executable, '-m', 'dnnr_jax', 'benchmark', '--config', SMOKE_CONFIG,
                '--no-training', '--models', models / 'missing.onnx')
  assert_one_line_error(missing, ['missing.onnx'])


@pytest.mark.parametrize('extra, words', [
    (['--version', 'one'], ['version', 'MAJOR.MINOR']),
    (['--set', 'compress.prune.sparsity=1.5'], ['compress.prune.sparsity']),
    (['--set', 'pipeline.sweeps=[0.5]'], ['pipeline.sweeps']),
])
def test_bad_pipeline_inputs_fail_before_any_work(tmp_path, extra, words):
  models = tmp_path / 'models'
  assert_one_line_error(_pipeline(models, *extra), words)
  assert not models.exists()
