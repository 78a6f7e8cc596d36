"""scripts/compression_study.py: prune + quantize per (sparsity, seed), resumable."""

import json
import statistics

import numpy as np
import pytest

from dnnr_jax.config import PruneConfig, load_config
from dnnr_jax.io import storage
from dnnr_jax.io.checkpoint import load_model, read_metadata
from dnnr_jax.jobs import compress as compress_jobs
from dnnr_jax.jobs import train as jobs
from tests.cli_helpers import load_script, snapshot
from tests.conftest import SMOKE_CONFIG

OPTIONS = ['--config', str(SMOKE_CONFIG), '--set', 'compress.prune.finetune_epochs=1',
           '--set', 'compress.quantize.mode=dynamic', '--set', 'compress.quantize.bits=4',
           '--json']


@pytest.fixture(scope='module')
def study():
  return load_script('compression_study')


@pytest.fixture(scope='module')
def final(tmp_path_factory):
  path, _ = jobs.train_and_save(load_config(SMOKE_CONFIG, ['training.epochs=2']),
                                models_dir=tmp_path_factory.mktemp('study') / 'models')
  return path


def _run(study, capsys, *argv):
  code = study.main([str(arg) for arg in argv])
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_every_run_is_written_summarized_and_resumed(study, final, tmp_path, capsys):
  out = tmp_path / 'study'
  code, stdout, _ = _run(study, capsys, final, '--sparsities', '0.8',
                         '--seeds', '0', '1', '--out', out, *OPTIONS)
  assert code == 0
  result = json.loads(stdout)
  assert [(run['sparsity'], run['seed']) for run in result['runs']] == [(0.8, 0), (0.8, 1)]
  for run in result['runs']:
    folder = out / f"sparsity{run['sparsity']:g}_seed{run['seed']}"
    quantized = read_metadata(folder / 'quantized' / 'quantized_model_v1.0')
    pruned = read_metadata(folder / 'pruned' / 'pruned_model_v1.0')
    assert run['quantized_accuracy'] == quantized['metrics']['test']['accuracy']
    assert run['pruned_accuracy'] == pruned['metrics']['test']['accuracy']
    assert run['bytes'] == storage.directory_bytes(folder / 'quantized' / 'quantized_model_v1.0')
    assert pruned['config']['training']['seed'] == quantized['config']['training']['seed'] == (
        run['seed'])
    assert pruned['compression']['sparsity'] == run['sparsity']
    assert quantized['quantization']['bits'] == 4
  dense = read_metadata(final)['metrics']['test']['accuracy']
  assert result['dense_accuracy'] == dense
  for row in result['summary']:
    accuracies = [run['quantized_accuracy'] for run in result['runs']
                  if run['sparsity'] == row['sparsity']]
    assert row['median_accuracy'] == statistics.median(accuracies)
    assert row['within_margin'] == sum(dense - value <= 0.002 + 1e-12 for value in accuracies)
    assert row['median_drop_pp'] == pytest.approx(100 * (dense - row['median_accuracy']))
  assert [row['sparsity'] for row in result['summary']] == [0.8]
  # The second seed fine-tunes differently.
  first, second = (load_model(out / f'sparsity0.8_seed{seed}' / 'pruned' / 'pruned_model_v1.0')
                   .variables['params']['head']['kernel'] for seed in (0, 1))
  assert not np.allclose(first, second)

  # Rerun: every finished run is read back, nothing is rewritten.
  before = snapshot(out)
  code, again, _ = _run(study, capsys, final, '--sparsities', '0.8',
                        '--seeds', '0', '1', '--out', out, *OPTIONS)
  assert code == 0 and snapshot(out) == before
  assert [{k: v for k, v in run.items() if k != 'seconds'} for run in json.loads(again)['runs']
          ] == [{k: v for k, v in run.items() if k != 'seconds'} for run in result['runs']]


@pytest.mark.parametrize('argv, words', [
    (['--sparsities', '1.5'], ['sparsity = 1.5']),
    (['--sparsities', '0.5', '--set', 'compress.prune.bogus=1'], ['bogus']),
    (['--sparsities', '0.5', '--seeds', '-2'], ['seed = -2']),
])
def test_bad_inputs_fail_with_one_line_and_write_nothing(study, final, tmp_path, capsys, argv,
                                                         words):
  code, stdout, stderr = _run(study, capsys, final, '--out', tmp_path / 'study',
                              '--config', SMOKE_CONFIG, *argv)
  assert code == 2 and stdout == ''
  assert len(stderr.strip().splitlines()) == 1 and stderr.startswith('error: ')
  assert all(word in stderr for word in words)
  assert not list((tmp_path / 'study').rglob('*_model_v*'))


def test_a_compressed_checkpoint_is_refused_as_the_dense_one(study, final, tmp_path, capsys):
  pruned = compress_jobs.prune_checkpoint(
      final, PruneConfig(sparsity=0.5, schedule='oneshot', finetune_epochs=0),
      models_dir=tmp_path / 'a').path
  code, _, stderr = _run(study, capsys, pruned, '--sparsities', '0.5', '--out', tmp_path / 'b',
                         '--config', SMOKE_CONFIG)
  assert code == 2 and 'pass a final one' in stderr
  assert not (tmp_path / 'b').exists()
