"""Nothing lost, one sentence for every bad input: locks, crashes, early failure, parsing."""

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from dnnr_jax.config import DataConfig, load_config
from dnnr_jax.errors import CheckpointError, ConfigError, DataError, DnnrError
from dnnr_jax.io import checkpoint, durable
from dnnr_jax.io.data import load_dataset
from dnnr_jax.jobs import compress, pipeline
from dnnr_jax.jobs import train as jobs
from tests.cli_helpers import (  # noqa: F401
    assert_one_line_error,
    run,
    run_all,
    write_damaged_frames,
)
from tests.conftest import ROOT, SMOKE_CONFIG, tree_allclose

DNNR = [sys.executable, '-m', 'dnnr_jax']
ONE_EPOCH = ['training.epochs=1', 'training.checkpoint_every=0']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """One 1-epoch smoke model, final v1.0."""
  models_dir = tmp_path_factory.mktemp('reliability')
  path, result = jobs.train_and_save(load_config(SMOKE_CONFIG, ONE_EPOCH), models_dir=models_dir)
  return path, jax.tree.map(np.asarray, result.state.variables)


def _forbid_work(monkeypatch):
  def forbidden(*args, **kwargs):
    raise AssertionError('work started before the output was checked')

  monkeypatch.setattr(jobs, 'fit', forbidden)
  monkeypatch.setattr(jobs, 'load_dataset', forbidden)
  monkeypatch.setattr(compress, 'fit', forbidden)
  monkeypatch.setattr(compress, 'load_dataset', forbidden)


# One writer per version.


@pytest.fixture
def held_lock(tmp_path):
  """Another process holding the writer lock of final v1.0 under tmp_path/models."""
  target = tmp_path / 'models' / 'final' / 'model_v1.0_final'
  code = ('import sys, time; from dnnr_jax.io import durable; '
          f'durable.acquire({str(target)!r}); print("held", flush=True); time.sleep(120)')
  holder = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env=os.environ.copy())
  assert holder.stdout.readline().strip() == 'held'
  yield target, holder
  holder.kill()
  holder.wait()


def test_a_second_writer_is_refused_before_any_work(held_lock, monkeypatch, tmp_path):
  target, holder = held_lock
  _forbid_work(monkeypatch)
  config = load_config(SMOKE_CONFIG, ONE_EPOCH)
  with pytest.raises(DnnrError, match=f'another dnnr run \\(process {holder.pid}\\)'):
    jobs.train_and_save(config, models_dir=tmp_path / 'models', version='1.0')
  with pytest.raises(DnnrError, match='another dnnr run'):
    checkpoint.save_checkpoint(target, {'w': np.zeros(2)}, {'kind': 'final'})
  assert not target.exists()
  # The holder dies without cleaning up: its lock file stays, but no longer blocks.
  holder.kill()
  holder.wait()
  assert (target.parent / '.model_v1.0_final.lock').exists()
  with durable.writer_lock(target):
    pass
  assert not (target.parent / '.model_v1.0_final.lock').exists()


def test_cli_train_on_a_locked_version_is_one_sentence(held_lock, tmp_path):
  result = run(*DNNR, 'train', '--config', SMOKE_CONFIG, '--models-dir', tmp_path / 'models',
               '--version', '1.0')
  assert_one_line_error(result, ['being written by another dnnr run'])


def test_two_runs_on_one_version_one_wins_one_is_refused(tmp_path):
  command = [*DNNR, 'train', '--config', SMOKE_CONFIG, '--set', 'training.epochs=1',
             '--models-dir', tmp_path, '--version', '1.0', '--json']
  results = run_all({'a': command, 'b': command})
  codes = sorted(result.returncode for result in results.values())
  assert codes == [0, 2], {key: result.stderr for key, result in results.items()}
  loser = next(result for result in results.values() if result.returncode == 2)
  assert 'Traceback' not in loser.stderr
  assert 'another dnnr run' in loser.stderr or 'already exists' in loser.stderr
  checkpoint.load_model(tmp_path / 'final' / 'model_v1.0_final')


# Safe replacement: a crash at each step of the swap loses nothing.


class _Crash(BaseException):
  """Stands for the process dying: no handler catches it."""


def _crash_on_rename(monkeypatch, crash_before: str):
  """The process dies just before the first rename whose source name ends in `crash_before`."""
  real = os.rename

  def rename(source, target):
    if str(source).endswith(crash_before):
      raise _Crash
    real(source, target)

  monkeypatch.setattr(durable.os, 'rename', rename)


@pytest.mark.parametrize('crash_before, survivor', [
    ('.orbax-checkpoint-tmp', 'old'),  # in Orbax's save
    ('/model_v1.0_final', 'old'),  # new version complete, old not yet moved aside
    ('.model_v1.0_final.partial', 'old'),  # old at .old, new not in place: .old comes back
    ('.model_v1.0_final.old', 'new'),  # new in place, old not yet discarded
], ids=['in_save', 'before_swap', 'mid_swap', 'after_swap'])
def test_a_crash_in_the_overwrite_swap_loses_nothing(tmp_path, trained, monkeypatch,
                                                     crash_before, survivor):
  source, old = trained
  path = tmp_path / 'final' / 'model_v1.0_final'
  metadata = checkpoint.read_metadata(source)
  checkpoint.save_checkpoint(path, old, metadata)
  new = jax.tree.map(lambda leaf: leaf + 1, old)
  with monkeypatch.context() as patch:
    _crash_on_rename(patch, crash_before)
    with pytest.raises(_Crash):
      checkpoint.save_checkpoint(path, new, metadata, overwrite=True)
  if crash_before == '.model_v1.0_final.partial':
    assert not path.exists() and durable.retired_path(path).is_dir()
    with pytest.raises(CheckpointError, match='previous version is safe'):
      checkpoint.load_model(path)

  # The next run, without --overwrite: the old version is restored, never deleted.
  with pytest.raises(CheckpointError, match='already exists'):
    jobs.train_and_save(load_config(SMOKE_CONFIG, ONE_EPOCH), models_dir=tmp_path,
                        version='1.0')
  tree_allclose(checkpoint.load_model(path).variables, old if survivor == 'old' else new,
                rtol=0, atol=0)
  assert sorted(entry.name for entry in path.parent.iterdir()) == [path.name]


# Fail before the work.


@pytest.mark.parametrize('models_dir', ['/dev/null', 'a_file', '/proc/dnnr_models'])
def test_an_unwritable_models_dir_fails_before_work(tmp_path, monkeypatch, trained, models_dir):
  _forbid_work(monkeypatch)
  if models_dir == 'a_file':
    models_dir = tmp_path / 'a_file'
    models_dir.write_text('not a folder')
  config = load_config(SMOKE_CONFIG, ['training.checkpoint_every=0'])
  with pytest.raises(DnnrError, match='not a writable directory'):
    jobs.train_and_save(config, models_dir=models_dir)
  with pytest.raises(DnnrError, match='not a writable directory'):
    compress.prune_checkpoint(trained[0], models_dir=models_dir)


def test_an_interrupted_runs_checkpoints_are_not_overwritten_without_resume(tmp_path):
  config = load_config(SMOKE_CONFIG, ['training.epochs=2'])

  def stop(record):
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    jobs.train_and_save(config, models_dir=tmp_path, on_epoch=stop)
  periodic = tmp_path / 'checkpoints' / 'model_v1.0_final'
  with pytest.raises(CheckpointError, match='--resume'):
    jobs.train_and_save(config, models_dir=tmp_path, on_epoch=stop)
  assert sorted(entry.name for entry in periodic.iterdir()) == ['1']


# Bounded and correct parsing.


def test_yaml_reads_exponents_as_numbers(tmp_path):
  config_file = tmp_path / 'config.yaml'
  config_file.write_text('training:\n  learning_rate: 1e-3\n  epochs: 8\ndata:\n  std: 3E-1\n')
  config = load_config(config_file, ['compress.prune.learning_rate=5e-4'])
  assert config.training.learning_rate == 0.001
  assert config.data.std == 0.3
  assert config.compress.prune.learning_rate == 0.0005


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
  lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
  for previous, name in zip('abcdefgh', 'bcdefghi', strict=True):
    lines.append(f'{name}: &{name} [' + ', '.join([f'*{previous}'] * 9) + ']')
  config_file = tmp_path / 'bomb.yaml'
  config_file.write_text('\n'.join(lines) + '\n')
  start = time.perf_counter()
  with pytest.raises(ConfigError, match='expands to more than'):
    load_config(config_file)
  assert time.perf_counter() - start < 10


@pytest.mark.parametrize('override, words', [
    ('training.seed=9223372036854775808', 'training.seed'),
    ('training.epochs=99999999999999999999', 'training.epochs'),
    ('data.std=1e-300', 'data.std'),
])
def test_out_of_range_settings_name_the_key(override, words):
  with pytest.raises(ConfigError, match=words) as raised:
    load_config(SMOKE_CONFIG, [override])
  assert 'learning_rate' not in str(raised.value)


@pytest.mark.parametrize('version', ['١.٠', '1.٠', '１.0'])
def test_non_ascii_digits_are_not_a_version(tmp_path, version):
  with pytest.raises(CheckpointError, match='MAJOR.MINOR'):
    checkpoint.checkpoint_path(tmp_path, 'final', version)


def _write_idx(path, array, magic):
  header = np.array([magic, *array.shape], '>u4').tobytes()
  with gzip.open(path, 'wb') as stream:
    stream.write(header + array.astype(np.uint8).tobytes())


def test_a_data_set_with_no_test_records_is_one_sentence(tmp_path):
  _write_idx(tmp_path / 'train-images-idx3-ubyte.gz', np.zeros((5, 28, 28)), 0x803)
  _write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', np.zeros(5), 0x801)
  _write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', np.zeros((0, 28, 28)), 0x803)
  _write_idx(tmp_path / 't10k-labels-idx1-ubyte.gz', np.zeros(0), 0x801)
  with pytest.raises(DataError, match='test split of mnist .* holds no examples'):
    load_dataset(DataConfig(dataset='mnist'), tmp_path)


# The pipeline's training stage resumes.


def test_a_pipeline_killed_in_training_resumes_from_its_periodic_checkpoint(tmp_path):
  config = load_config(SMOKE_CONFIG)  # 3 epochs, a periodic checkpoint after each
  seen = []

  def stop_in_epoch_2(stage, record):
    seen.append(record['epoch'])
    if record['epoch'] == 2:
      raise KeyboardInterrupt

  def stop_after_training(stage, event):
    if stage != 'train' and event == 'start':
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    pipeline.run_pipeline(config, models_dir=tmp_path, on_epoch=stop_in_epoch_2)
  assert seen == [1, 2]
  seen.clear()
  with pytest.raises(KeyboardInterrupt):
    pipeline.run_pipeline(config, models_dir=tmp_path, on_epoch=lambda s, r: seen.append(
        r['epoch']), on_stage=stop_after_training)
  assert seen == [3]
  history = checkpoint.read_metadata(tmp_path / 'final' / 'model_v1.0_final')['history']
  assert [record['epoch'] for record in history] == [1, 2, 3]


# Ctrl-C.


@pytest.fixture
def python_ctrl_c():
  """Python's own Ctrl-C handler, even where the test runner's shell ignores SIGINT."""
  original = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, original)


def test_an_interrupt_during_a_save_waits_for_it(python_ctrl_c):
  finished = []
  with pytest.raises(KeyboardInterrupt):
    with durable.deferred_interrupt():
      # To this thread: a process-wide kill may land on one of JAX's threads, and
      # the main thread then sees it only later.
      signal.pthread_kill(threading.get_ident(), signal.SIGINT)
      time.sleep(0.05)
      finished.append(True)
  assert finished == [True]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_training_is_one_message_without_traceback(tmp_path):
  # Python's own Ctrl-C handler even where the test runner's shell ignores SIGINT.
  code = ('import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); '
          'from dnnr_jax.cli import main; sys.exit(main(sys.argv[1:]))')
  process = subprocess.Popen(
      [sys.executable, '-c', code, 'train', '--config', str(SMOKE_CONFIG), '--set',
       'training.epochs=1000', '--models-dir', str(tmp_path)], cwd=ROOT,
      stderr=subprocess.PIPE, text=True, env=os.environ.copy())
  for line in process.stderr:
    if line.startswith('epoch 2'):
      process.send_signal(signal.SIGINT)  # as a periodic checkpoint is being saved
      break
  rest = process.stderr.read()
  assert process.wait(timeout=120) == 130
  assert 'Traceback' not in rest and 'ERROR' not in rest
  assert rest.strip().splitlines()[-1].startswith('interrupted;')
  assert (tmp_path / 'checkpoints' / 'model_v1.0_final' / '2').is_dir()


# Each traceback case of the CLI: one sentence, exit 2.


@pytest.fixture(scope='module')
def cli_cases(tmp_path_factory, trained):
  """Every bad-input command, run side by side; results by case name."""
  from dnnr_jax.io import export, integrity

  root = tmp_path_factory.mktemp('cli_cases')
  path, _ = trained
  onnx_file, _ = export.export_onnx(path, output=root / 'model.onnx')
  import onnx

  bad_norm = onnx.load(onnx_file)
  for prop in bad_norm.metadata_props:
    if prop.key == 'dnnr_jax.normalisation':
      prop.value = 'mean=abc,std=0.3'
  integrity.seal_onnx(bad_norm)
  onnx.save(bad_norm, root / 'bad_norm.onnx')
  flipped = bytearray(onnx_file.read_bytes())
  flipped[len(flipped) // 2] ^= 0x7f
  (root / 'flipped.onnx').write_bytes(bytes(flipped))
  _write_idx(root / 'none.gz', np.zeros((0, 8, 8)), 0x803)
  _write_idx(root / 'images.gz', np.zeros((3, 8, 8)), 0x803)
  _write_idx(root / 'labels.gz', np.array([1, 10, 2]), 0x801)
  (root / 'existing.json').write_text('{"keep": true}')
  write_damaged_frames(root / 'damaged_frames', path)
  config = ['--config', SMOKE_CONFIG]
  commands = {
      'zero_records': ['predict', onnx_file, '--images', root / 'none.gz'],
      'label_10': ['predict', onnx_file, '--images', root / 'images.gz',
                   '--labels', root / 'labels.gz'],
      'bad_normalisation': ['predict', root / 'bad_norm.onnx', '--images', root / 'images.gz'],
      'flipped_onnx': ['predict', root / 'flipped.onnx', '--images', root / 'images.gz'],
      'huge_seed': ['train', *config, '--set', 'training.seed=9223372036854775808'],
      'huge_epochs': ['train', *config, '--set', 'training.epochs=99999999999999999999'],
      'tiny_std': ['train', *config, '--set', 'data.std=1e-300'],
      'arabic_version': ['train', *config, '--version', '١.٠', '--models-dir', root / 'm'],
      'export_to_proc': ['export', path, '--output', '/proc/dnnr_x.onnx'],
      'damaged_frames': ['export', root / 'damaged_frames', '--output', root / 'damaged.onnx'],
      'models_dir_dev_null': ['train', *config, '--models-dir', '/dev/null'],
      'benchmark_missing_dir': ['benchmark', *config, '--output', root / 'missing' / 'x.json'],
      'benchmark_existing': ['benchmark', *config, '--output', root / 'existing.json'],
  }
  results = run_all({name: [*DNNR, *args] for name, args in commands.items()})
  return root, results


@pytest.mark.parametrize('case, words', [
    ('zero_records', ['none.gz', 'no images']),
    ('label_10', ['label 10', '10 classes']),
    ('bad_normalisation', ['bad_norm.onnx', 'normalisation']),
    ('flipped_onnx', ['flipped.onnx']),
    ('huge_seed', ['training.seed']),
    ('huge_epochs', ['training.epochs']),
    ('tiny_std', ['data.std']),
    ('arabic_version', ['MAJOR.MINOR']),
    ('export_to_proc', ['/proc', 'not a writable directory']),
    ('damaged_frames', ['damaged_frames', 'does not decode', 'write it again']),
    ('models_dir_dev_null', ['/dev/null', 'not a writable directory']),
    ('benchmark_missing_dir', ['missing', 'not a writable directory']),
    ('benchmark_existing', ['existing.json', '--overwrite']),
])
def test_bad_input_is_one_sentence(cli_cases, case, words):
  root, results = cli_cases
  assert_one_line_error(results[case], words)
  if case == 'benchmark_existing':
    assert json.loads((root / 'existing.json').read_text()) == {'keep': True}
  if case == 'damaged_frames':
    assert not (root / 'damaged.onnx').exists()


def test_damaged_checkpoint_in_the_pipeline_is_refused_not_reused(trained, tmp_path):
  import shutil

  from dnnr_jax.io import integrity

  path = tmp_path / 'final' / 'model_v1.0_final'
  shutil.copytree(trained[0], path)
  target = path / 'metadata' / 'metadata'
  metadata = json.loads(target.read_text())
  metadata['pipeline'] = {'hash': 'h', 'version': '1.0'}
  rest = {key: value for key, value in metadata.items() if key != integrity.KEY}
  metadata[integrity.KEY]['metadata'] = integrity.json_digest(rest)
  target.write_text(json.dumps(metadata))
  assert pipeline._reusable(path, 'h', force=False)
  blob = max((path / 'variables' / 'd').iterdir(), key=lambda f: f.stat().st_size)
  blob.write_bytes(blob.read_bytes()[:-8] + bytes(8))
  with pytest.raises(CheckpointError, match='damaged'):
    pipeline._reusable(path, 'h', force=False)


def test_the_largest_seed_is_accepted():
  config = load_config(SMOKE_CONFIG, [f'training.seed={2**63 - 1}'])
  assert config.training.seed == 2**63 - 1
