"""Several processes: a 2-process `dnnr train` on localhost (gloo CPU collectives)
against the 1-process run, and an unreachable coordinator."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dnnr_jax.config import load_config
from dnnr_jax.io import checkpoint
from dnnr_jax.jobs import train as jobs
from tests.cli_helpers import TIMEOUT_S, assert_one_line_error, one_json, run
from tests.conftest import ROOT, SMOKE_CONFIG

SETTINGS = ['training.epochs=1']
# The 2-process gradient mean is summed in another order: a few float32 ulps.
PARAM_TOLERANCE = 1e-5


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    return probe.getsockname()[1]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The same training as 2 processes of one CPU device each, and as this one process."""
  models = tmp_path_factory.mktemp('two_processes')
  port = _free_port()
  processes = [subprocess.Popen(
      [sys.executable, '-m', 'dnnr_jax', 'train', '--config', str(SMOKE_CONFIG),
       '--set', *SETTINGS, '--models-dir', str(models), '--json',
       '--coordinator', f'localhost:{port}', '--num-processes', '2', '--process-id', str(rank)],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=os.environ.copy()) for rank in (0, 1)]
  reference, _ = jobs.train_and_save(load_config(SMOKE_CONFIG, SETTINGS),
                                     models_dir=tmp_path_factory.mktemp('one_process'))
  outputs = []
  for process in processes:
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, stderr[-3000:]
    # gloo's C++ side prints a '[Gloo] Rank ... connected' line to stdout first.
    lines = [line for line in stdout.splitlines() if not line.startswith('[Gloo]')]
    outputs.append(one_json(subprocess.CompletedProcess(
        process.args, process.returncode, '\n'.join(lines), stderr)))
  return models, outputs, reference


def test_two_processes_train_what_one_process_trains(runs):
  models, outputs, reference = runs
  # Both processes report the same run and the one checkpoint.
  assert outputs[0] == {**outputs[1], 'seconds': outputs[0]['seconds'],
                        'train_seconds': outputs[0]['train_seconds']}
  path = models / 'final' / 'model_v1.0_final'
  assert outputs[0]['model'] == str(path)
  two, one = checkpoint.load_model(path), checkpoint.load_model(reference)
  assert two.metadata['metrics']['test'] == pytest.approx(
      one.metadata['metrics']['test'], abs=2 / 360)
  for left, right in zip(jax.tree.leaves(two.variables), jax.tree.leaves(one.variables),
                         strict=True):
    np.testing.assert_allclose(np.asarray(left), np.asarray(right), rtol=0,
                               atol=PARAM_TOLERANCE)
  assert not (models / 'checkpoints' / path.name).exists()


def test_an_unreachable_coordinator_is_one_sentence(tmp_path):
  models = tmp_path / 'models'
  result = run(sys.executable, '-m', 'dnnr_jax', 'train', '--config', SMOKE_CONFIG,
               '--models-dir', models, '--coordinator', f'localhost:{_free_port()}',
               '--num-processes', '2', '--process-id', '1', '--distributed-timeout', '2')
  assert_one_line_error(result, ['could not reach the coordinator', 'within 2 s'])
  assert not models.exists()
