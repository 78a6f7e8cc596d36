"""`dnnr prune` and `dnnr quantize` end to end, each run a real subprocess."""

import pathlib
import sys

import numpy as np
import pytest

from dnnr_jax.compress import quantize
from dnnr_jax.config import load_config
from dnnr_jax.io import storage
from dnnr_jax.io.checkpoint import load_model
from dnnr_jax.jobs import compress as compress_jobs
from dnnr_jax.jobs import train as jobs
from tests.cli_helpers import assert_one_line_error, one_json, run, run_all, snapshot
from tests.conftest import SMOKE_CONFIG

MODULE = (sys.executable, '-m', 'dnnr_jax')
PRUNE_80 = ('--method', 'global', '--sparsity', '0.8', '--finetune-epochs', '1')




@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """A trained smoke model and, in another models folder, its quantized version."""
  tmp = tmp_path_factory.mktemp('cli_compress')
  final, _ = jobs.train_and_save(
      load_config(SMOKE_CONFIG, ['training.epochs=3']), models_dir=tmp / 'models')
  quantized = compress_jobs.quantize_checkpoint(final, models_dir=tmp / 'quantized_source')
  return tmp, final, quantized.path


@pytest.fixture(scope='module')
def first(sources):
  """The first prune, every bad input that needs no earlier output and the help, side by side.

  Returns:
    By name: (result, words its one stderr line must hold, the models dir it must not create).
  """
  tmp, final, quantized_path = sources
  cases = {
      'prune_json': ((*MODULE, 'prune', final, *PRUNE_80, '--json'), None),
      'sparsity': ((*MODULE, 'prune', final, '--sparsity', '1.5'), ['sparsity 1.5', '[0, 1)']),
      'distill': ((*MODULE, 'prune', final, '--distill', '2'), ['--distill 2.0', '[0, 1]']),
      'augment_shift': ((*MODULE, 'quantize', final, '--mode', 'qat', '--augment-shift', '9'),
                        ['--augment-shift 9', 'from 0 (off) to 7']),
      'bits': ((*MODULE, 'quantize', final, '--bits', '3'), None),
      'per_batch_static': ((*MODULE, 'quantize', final, '--mode', 'static', '--activations',
                            'per_batch'),
                           ['--activations per_batch applies to mode dynamic or qat only',
                            'set it to per_row for --mode static']),
      'missing': ((*MODULE, 'prune', tmp / 'absent'), [str(tmp / 'absent')]),
      'quantized_again': ((*MODULE, 'quantize', quantized_path),
                          [str(quantized_path), 'already quantized']),
      'help_prune': ((sys.executable, 'scripts/prune.py', '--help'),
                     ['usage: dnnr prune', '--method', '--sparsity', '--finetune-epochs',
                      '--augment-shift']),
      'help_quantize': ((sys.executable, 'scripts/quantize.py', '--help'),
                        ['usage: dnnr quantize', '--mode', '--bits', '--calibration-batches']),
  }
  commands = {}
  for name, (command, _) in cases.items():
    if name.startswith(('prune_', 'help_')):
      commands[name] = command
    else:  # A bad input: its own models folder, which must stay absent.
      commands[name] = (*command, '--models-dir', tmp / name / 'models')
  runs = run_all(commands)
  return {name: (runs[name], words, tmp / name / 'models')
          for name, (_, words) in cases.items()}


@pytest.fixture(scope='module')
def second(sources, first):
  """After the first prune: it again as a table, its quantization, a taken --version.

  Returns:
    (the first prune's path, a snapshot of its folder before, runs by name).
  """
  tmp, final, _ = sources
  pruned = pathlib.Path(one_json(first['prune_json'][0])['path'])
  pruned_dir = pruned.parent
  before = snapshot(pruned_dir)
  runs = run_all({
      'prune_table': (*MODULE, 'prune', final, *PRUNE_80, '--models-dir', tmp / 'table'),
      'quantize_json': (*MODULE, 'quantize', pruned, '--bits', '8', '--json'),
      'version_taken': (*MODULE, 'prune', final, '--version', '1.0'),
  })
  return pruned, before, runs


def test_prune_json(sources, first):
  tmp, final, _ = sources
  result = one_json(first['prune_json'][0])
  path = tmp / 'models' / 'pruned' / 'pruned_model_v1.0'
  assert result['path'] == str(path)
  assert result['source']['path'] == str(final)
  assert set(result['metrics']) == {'test', 'test_before'}
  assert result['metrics']['test']['n'] == 360
  assert result['bytes'] == {'raw': storage.directory_bytes(path),
                             'gzip': storage.gzip_bytes(path)}
  assert result['dense_float_bytes']['path'] == str(final)
  assert result['dense_float_bytes']['raw'] == storage.directory_bytes(final)
  assert result['bytes']['raw'] < result['dense_float_bytes']['raw']
  assert result['routes']['route_agreement'] == 1.0
  report = result['compression']['sparsity_report']['overall']
  assert report['zeros'] == round(0.8 * report['size'])
  kernels = [np.asarray(layer['kernel']) for layer in load_model(path).variables['params'].values()]
  assert sum(int(np.sum(kernel == 0)) for kernel in kernels) == report['zeros']
  assert 'epoch 1:' in first['prune_json'][0].stderr  # progress on stderr


def test_prune_table(sources, second):
  tmp, final, _ = sources
  result = second[2]['prune_table']
  assert result.returncode == 0, result.stderr
  for words in ('before', 'after', 'route agreement', '80.00%'):
    assert words in result.stdout
  assert not result.stdout.lstrip().startswith('{')
  assert (tmp / 'table' / 'pruned' / 'pruned_model_v1.0').is_dir()


def test_quantize_pruned_json(sources, first, second):
  tmp, final, _ = sources
  pruned, _, runs = second
  result = one_json(runs['quantize_json'])
  path = tmp / 'models' / 'quantized' / 'quantized_model_v1.0'
  assert result['path'] == str(path)
  assert result['quantization'] == {'mode': 'dynamic', 'bits': 8}
  assert result['source']['path'] == str(pruned) and result['source']['kind'] == 'pruned'
  assert result['dense_float_bytes']['path'] == str(final)
  assert result['source_bytes'] == one_json(first['prune_json'][0])['bytes']
  assert result['array_bytes'] < one_json(first['prune_json'][0])['array_bytes']
  kernels = load_model(path).variables['params']
  assert all(isinstance(layer['kernel'], quantize.QArray) for layer in kernels.values())


def test_prune_refuses_an_existing_version(second):
  pruned, before, runs = second
  result = runs['version_taken']
  assert result.returncode == 2
  assert result.stdout == '' and 'Traceback' not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('error: ')
  assert str(pruned) in lines[0] and '--overwrite' in lines[0]
  assert snapshot(pruned.parent) == before


@pytest.mark.parametrize('name', ['sparsity', 'distill', 'augment_shift', 'missing',
                                  'quantized_again', 'per_batch_static'])
def test_bad_input(first, name):
  result, words, models_dir = first[name]
  assert_one_line_error(result, words)
  assert not models_dir.exists()


def test_bad_bits_is_an_argparse_error(first):
  result, _, models_dir = first['bits']
  assert result.returncode == 2
  assert result.stdout == ''
  assert 'Traceback' not in result.stderr
  # argparse prints the usage, then one error line.
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('dnnr quantize: error: argument --bits: invalid choice: 3')
  assert not models_dir.exists()


@pytest.mark.parametrize('name', ['help_prune', 'help_quantize'])
def test_script_help(first, name):
  result, words, _ = first[name]
  assert result.returncode == 0, result.stderr
  for word in words:
    assert word in result.stdout


def test_bad_settings_fail_before_jax_is_imported(tmp_path):
  # A flag the job would refuse is refused before the seconds of importing JAX.
  code = '\n'.join([
      'import sys',
      'from dnnr_jax.cli import main',
      f'models = {str(tmp_path / "models")!r}',
      "codes = [main(['prune', models, '--sparsity', '1.5']),",
      "         main(['quantize', models, '--mode', 'static', '--activations', 'per_batch']),",
      "         main(['prune', models, '--max-drop', '-1']),",
      "         main(['compress', models, '--sparsities', '0.9', '0.5']),",
      "         main(['calibrate', models, '--budget', '1.5']),",
      "         main(['calibrate', models, '--budget', '0.5', '--router', 'fast'])]",
      "assert codes == [2] * 6, codes",
      "assert 'jax' not in sys.modules, 'jax imported'",
  ])
  result = run(sys.executable, '-c', code)
  assert result.returncode == 0, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 6 and all(line.startswith('error: ') for line in lines), lines
  assert not (tmp_path / 'models').exists()
