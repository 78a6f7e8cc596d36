"""The `dnnr` command end to end, each run a real subprocess."""

import pathlib
import shutil
import sys

import pytest

from tests.cli_helpers import assert_one_line_error, one_json, run, run_all, snapshot
from tests.conftest import ROOT

MODULE = (sys.executable, '-m', 'dnnr_jax')
SMOKE = ('--config', 'configs/smoke.yaml')


def _dnnr_script() -> str:
  """The installed `dnnr` console script beside this interpreter."""
  script = pathlib.Path(sys.executable).parent / 'dnnr'
  if script.is_file():
    return str(script)
  found = shutil.which('dnnr')
  assert found, f'no dnnr console script beside {sys.executable} or on PATH'
  return found




@pytest.fixture(scope='module')
def launched(tmp_path_factory):
  """The first train, every bad-input run and the scripts' help, side by side.

  Returns:
    By name: (result, words its stderr must hold, its models dir).
  """
  tmp = tmp_path_factory.mktemp('cli')
  unknown_section = tmp / 'unknown_section.yaml'
  unknown_section.write_text(
      (ROOT / 'configs' / 'smoke.yaml').read_text()
      + '\noptimizer:\n  momentum: 0.9\n')
  not_checkpoint = tmp / 'not_checkpoint'
  not_checkpoint.mkdir()
  (not_checkpoint / 'notes.txt').write_text('hello')
  empty_data = tmp / 'empty_data'
  empty_data.mkdir()

  def train(name, *args, config=SMOKE):
    return (*MODULE, 'train', *config, '--models-dir', tmp / name / 'models',
            *args)

  cases = {
      'train': (train('train', '--set', 'training.epochs=2', '--json'), []),
      'help_train': ((sys.executable, 'scripts/train.py', '--help'),
                     ['usage: dnnr train', '--config', '--overwrite']),
      'help_evaluate': ((sys.executable, 'scripts/evaluate.py', '--help'),
                        ['usage: dnnr evaluate', 'MODEL_PATH']),
      'unknown_key': (
          train('unknown_key', '--set', 'training.epoch=1'),
          ["'training.epoch'"]),
      'negative_learning_rate': (
          train('negative_learning_rate', '--set', 'training.learning_rate=-1'),
          ['training.learning_rate', '-1']),
      'annealing_after_end': (
          train('annealing_after_end', '--set',
                'thresholds.annealing_start_epoch=50'),
          ['thresholds.annealing_start_epoch', '50']),
      'missing_config': (
          train('missing_config', config=('--config', tmp / 'missing.yaml')),
          [str(tmp / 'missing.yaml')]),
      'unknown_section': (
          train('unknown_section', config=('--config', unknown_section)),
          [str(unknown_section), "'optimizer'"]),
      'evaluate_missing': (
          (*MODULE, 'evaluate', tmp / 'absent'), [str(tmp / 'absent')]),
      'evaluate_not_checkpoint': (
          (*MODULE, 'evaluate', not_checkpoint), [str(not_checkpoint)]),
      'empty_data_dir': (
          train('empty_data_dir', '--data-dir', empty_data,
                config=('--config', 'configs/default.yaml')),
          [str(empty_data), 'data-dir']),
  }
  runs = run_all({name: command for name, (command, _) in cases.items()})
  return {name: (runs[name], words, tmp / name / 'models')
          for name, (_, words) in cases.items()}


# Train, evaluate, versions.


@pytest.fixture(scope='module')
def first_train(launched):
  """`train --json` of the smoke config into a fresh models dir."""
  result, _, models_dir = launched['train']
  return models_dir, result


def test_train_writes_final_checkpoint(first_train):
  models_dir, result = first_train
  summary = one_json(result)
  path = models_dir / 'final' / 'model_v1.0_final'
  assert summary['model'] == str(path)
  assert (path / 'variables').is_dir() and (path / 'metadata').is_dir()
  assert summary['epoch'] == 2
  assert summary['test']['n'] == 360
  assert 0.5 < summary['test']['accuracy'] <= 1
  # Progress goes to stderr, once per epoch; periodic checkpoints are gone.
  assert 'epoch 2:' in result.stderr
  assert not (models_dir / 'checkpoints' / 'model_v1.0_final').exists()


@pytest.fixture(scope='module')
def after_first(first_train):
  """evaluate, a second train and a refused overwrite, side by side."""
  models_dir, result = first_train
  assert result.returncode == 0, result.stderr
  path = models_dir / 'final' / 'model_v1.0_final'
  before = snapshot(path)
  runs = run_all({
      'evaluate': (_dnnr_script(), 'evaluate', path, '--json'),
      'next': (*MODULE, 'train', *SMOKE, '--models-dir', models_dir,
               '--set', 'training.epochs=1', '--json'),
      'refused': (*MODULE, 'train', *SMOKE, '--models-dir', models_dir,
                  '--set', 'training.epochs=2', '--version', '1.0', '--json'),
  })
  return models_dir, path, before, runs


def test_evaluate_matches_train(first_train, after_first):
  trained = one_json(first_train[1])
  metrics = one_json(after_first[3]['evaluate'])
  assert {'accuracy', 'loss', 'deep_fraction', 'n'} <= set(metrics)
  assert metrics['n'] == 360
  assert metrics['accuracy'] == trained['test']['accuracy']
  assert metrics['loss'] == pytest.approx(trained['test']['loss'], abs=1e-6)
  assert metrics['deep_fraction'] == trained['test']['deep_fraction']
  assert metrics['model'] == trained['model']


def test_second_train_takes_next_version(after_first):
  models_dir, _, _, runs = after_first
  result = one_json(runs['next'])
  assert result['model'] == str(models_dir / 'final' / 'model_v1.1_final')
  assert result['epoch'] == 1
  assert sorted(p.name for p in (models_dir / 'final').iterdir()) == [
      'model_v1.0_final', 'model_v1.1_final']


def test_train_refuses_to_overwrite(after_first):
  _, path, before, runs = after_first
  result = runs['refused']
  assert result.returncode == 2
  assert result.stdout == ''
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert str(path) in lines[0] and '--overwrite' in lines[0]
  assert snapshot(path) == before


# Bad inputs: exit status 2 and one line naming the input.


@pytest.mark.parametrize('name', [
    'unknown_key', 'negative_learning_rate', 'annealing_after_end',
    'missing_config', 'unknown_section', 'evaluate_missing',
    'evaluate_not_checkpoint', 'empty_data_dir',
])
def test_bad_input(launched, name):
  result, words, models_dir = launched[name]
  assert_one_line_error(result, words)
  assert not models_dir.exists()  # nothing written


@pytest.mark.parametrize('name', ['help_train', 'help_evaluate'])
def test_script_help(launched, name):
  result, words, _ = launched[name]
  assert result.returncode == 0, result.stderr
  for word in words:
    assert word in result.stdout


# The default config on real MNIST.


def test_default_config_on_mnist(tmp_path, mnist_dir):
  models_dir = tmp_path / 'models'
  trained = one_json(run(
      sys.executable, 'scripts/train.py', '--config', 'configs/default.yaml',
      '--set', 'training.epochs=1', '--data-dir', mnist_dir,
      '--models-dir', models_dir, '--json'))
  path = models_dir / 'final' / 'model_v1.0_final'
  assert trained['model'] == str(path)
  assert trained['test']['accuracy'] > 0.9

  metrics = one_json(run(sys.executable, 'scripts/evaluate.py', path,
                       '--data-dir', mnist_dir, '--json'))
  assert metrics['n'] == 10000
  assert metrics['dataset'] == 'mnist'
  assert metrics['accuracy'] > 0.9
  assert metrics['accuracy'] == trained['test']['accuracy']

  # Served from its ONNX export with onnxruntime alone: the same accuracy and routes.
  export = one_json(run(sys.executable, 'scripts/export_onnx.py', path,
                        '--data-dir', mnist_dir, '--json'))
  served = one_json(run(
      sys.executable, '-m', 'dnnr_jax', 'predict', export['path'],
      '--images', mnist_dir / 't10k-images-idx3-ubyte.gz',
      '--labels', mnist_dir / 't10k-labels-idx1-ubyte.gz', '--json'))
  assert served['n'] == 10000
  assert served['accuracy'] == metrics['accuracy']
  assert served['deep_fraction'] == metrics['deep_fraction']


@pytest.mark.parametrize('command, message, said', [
    ('train', "version = 'one' is not of the form MAJOR.MINOR; pass e.g. version=1.0.",
     "--version 'one' is not of the form MAJOR.MINOR; pass e.g. --version 1.0."),
    ('prune', 'm/p already exists; pass overwrite=True to replace it or another '
     'version=MAJOR.MINOR.',
     'm/p already exists; pass --overwrite to replace it or another --version MAJOR.MINOR.'),
    ('prune', 'compress.prune.distill acts while fine-tuning: it needs '
     'compress.prune.finetune_epochs of at least 1.',
     '--distill acts while fine-tuning: it needs --finetune-epochs of at least 1.'),
    ('prune', 'compress.prune.distill_temperature = 0.0 must be a positive number.',
     '--temperature 0.0 must be a positive number.'),
    ('quantize', 'compress.quantize.bits = 3 must be 8, 7 or 4.', '--bits 3 must be 8, 7 or 4.'),
    # The pipeline takes its settings as config keys (--set), so they stay keys.
    ('pipeline', 'compress.prune.sparsity = 1.5 must be in [0, 1).',
     'compress.prune.sparsity = 1.5 must be in [0, 1).'),
    ('train', 'MNIST not found: no data_dir=DIR was given, DNNR_DATA_DIR is not set.',
     'MNIST not found: no --data-dir DIR was given, DNNR_DATA_DIR is not set.'),
    ('predict', 'batch_size = 0 must be at least 1.', '--batch-size 0 must be at least 1.'),
])
def test_library_argument_names_are_said_as_flags(command, message, said):
  from dnnr_jax import cli

  assert cli.in_flags(message, command) == said
