"""Several processes: a 2-process `dnnr pipeline` on localhost (gloo CPU collectives)
against the 1-process training, process 0's own stages failing or overrunning, and an
unreachable coordinator."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dnnr_jax.cli import in_flags
from dnnr_jax.config import load_config
from dnnr_jax.io import checkpoint, integrity
from dnnr_jax.jobs import train as jobs
from tests import primary_checks
from tests.cli_helpers import TIMEOUT_S, assert_one_line_error, one_json, run
from tests.conftest import ROOT, SMOKE_CONFIG

SETTINGS = ['training.epochs=1']
# The stages after training, as short as they go: no fine-tuning, no sweep.
PIPELINE_SETTINGS = ['compress.prune.schedule=oneshot', 'compress.prune.finetune_epochs=0',
                     'pipeline.sweep_sparsities=[]']
# The 2-process gradient mean is summed in another order: a few float32 ulps.
PARAM_TOLERANCE = 1e-5


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    return probe.getsockname()[1]


def _start_pair(command: list[str]) -> list[subprocess.Popen]:
  """`command` as processes 0 and 1 of a 2-process run, its last two arguments their ranks."""
  port = str(_free_port())
  return [subprocess.Popen(
      [part.replace('{port}', port).replace('{rank}', str(rank)) for part in command],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=os.environ.copy()) for rank in (0, 1)]


def _outputs(processes: list[subprocess.Popen]) -> list[dict]:
  """The one JSON object each process printed, once both exited 0."""
  outputs = []
  for process in processes:
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    # Only the JSON line: gloo's '[Gloo] Rank ... connected' goes to stderr.
    outputs.append(one_json(subprocess.CompletedProcess(
        process.args, process.returncode, stdout, stderr)))
  return outputs


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """`dnnr pipeline` as 2 processes of one CPU device each; its training as this one process."""
  models = tmp_path_factory.mktemp('two_processes')
  sets = [part for setting in SETTINGS + PIPELINE_SETTINGS for part in ('--set', setting)]
  processes = _start_pair(
      [sys.executable, '-m', 'dnnr_jax', 'pipeline', '--config', str(SMOKE_CONFIG), *sets,
       '--models-dir', str(models), '--json', '--coordinator', 'localhost:{port}',
       '--num-processes', '2', '--process-id', '{rank}'])
  reference, _ = jobs.train_and_save(load_config(SMOKE_CONFIG, SETTINGS),
                                     models_dir=tmp_path_factory.mktemp('one_process'))
  return models, _outputs(processes), reference


def test_two_processes_train_what_one_process_trains(runs):
  models, _, reference = runs
  path = models / 'final' / 'model_v1.0_final'
  two, one = checkpoint.load_model(path), checkpoint.load_model(reference)
  assert two.metadata['metrics']['test'] == pytest.approx(
      one.metadata['metrics']['test'], abs=2 / 360)
  for left, right in zip(jax.tree.leaves(two.variables), jax.tree.leaves(one.variables),
                         strict=True):
    np.testing.assert_allclose(np.asarray(left), np.asarray(right), rtol=0,
                               atol=PARAM_TOLERANCE)
  assert not (models / 'checkpoints' / path.name).exists()


def test_process_0_alone_writes_the_report_and_the_onnx_files(runs):
  models, (first, second), _ = runs
  stages = ['train', 'prune', 'quantize', 'export', 'sweep']
  assert first['ran'] == second['ran'] == stages
  # Process 1 built no report: it waited for process 0's, then ended with it.
  assert second['rows'] == [] and first['report'] == second['report']
  report = json.loads((models / 'reports' / 'v1.0' / 'report.json').read_text())
  assert report['rows'] == first['rows']
  assert [row['artifact'] for row in first['rows']] == [
      'final', 'pruned', 'quantized', 'final onnx', 'pruned onnx', 'quantized onnx']
  for path in ('final/model_v1.0_final', 'pruned/pruned_model_v1.0',
               'quantized/quantized_model_v1.0'):
    onnx_model, _ = integrity.load_verified_onnx(models / f'{path}.onnx')
    assert 'dnnr_jax.pipeline_hash' in {prop.key for prop in onnx_model.metadata_props}
  assert not [path for path in models.rglob('*') if path.name.endswith('.partial')]


def test_a_failing_or_overrunning_stage_of_process_0_stops_the_others():
  first, second = _outputs(_start_pair(
      [sys.executable, '-m', 'tests.primary_checks', '{port}', '{rank}']))
  assert first['passes']['value'] == 'written' and second['passes']['value'] is None
  assert first['fails']['error'] == 'the stage failed on process 0.'
  assert second['fails']['error'].startswith('process 0 failed in its fails stage')
  timeout = f'primary_timeout={primary_checks.PRIMARY_TIMEOUT_S} s'
  assert f'process 0 did not finish its slow stage within {timeout}' in second['slow']['error']
  assert second['slow']['seconds'] < primary_checks.SLOW_STAGE_S  # It did not wait it out.
  assert f'stopped waiting for the slow stage of this process after {timeout}' in (
      first['slow']['error'])


def test_the_timeout_is_named_by_its_flag():
  assert in_flags('within primary_timeout=2 s, so', 'pipeline') == (
      'within --primary-timeout 2 s, so')


def test_an_unreachable_coordinator_is_one_sentence(tmp_path):
  models = tmp_path / 'models'
  result = run(sys.executable, '-m', 'dnnr_jax', 'train', '--config', SMOKE_CONFIG,
               '--models-dir', models, '--coordinator', f'localhost:{_free_port()}',
               '--num-processes', '2', '--process-id', '1', '--distributed-timeout', '2')
  assert_one_line_error(result, ['could not reach the coordinator', 'within 2 s'])
  assert not models.exists()
