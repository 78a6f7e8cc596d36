"""Data parallelism over a mesh: 8 simulated CPU devices against 1, and checkpoints across meshes.

One subprocess with 8 devices (`tests/mesh_checks.py`) runs every 8-device
check; this process (one device) writes and reads its side of the
cross-mesh checkpoints.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dnnr_jax import parallel
from dnnr_jax.config import MeshConfig, load_config
from dnnr_jax.errors import CheckpointError
from dnnr_jax.io import checkpoint
from dnnr_jax.io.data import load_dataset
from dnnr_jax.jobs import train as train_jobs
from dnnr_jax.jobs.fit import fit
from tests.cli_helpers import assert_one_line_error, one_json, run
from tests.conftest import ROOT, SMOKE_CONFIG

# Two epochs (88 steps) of Adam: the gradient mean over 8 devices is summed in
# another order, which moves a float32 parameter by a few ulps.
PARAM_TOLERANCE = 1e-5
EIGHT_DEVICES = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}


@pytest.fixture(scope='module')
def checks(tmp_path_factory):
  """The 8-device subprocess's results, after this process saved a checkpoint for it."""
  out = tmp_path_factory.mktemp('mesh')
  config = load_config(SMOKE_CONFIG, ['training.epochs=1'])
  state = fit(config, load_dataset(config.data)).state
  variables = jax.device_get(state.variables)
  checkpoint.save_checkpoint(out / 'saved_on_1', variables, {
      'kind': 'final', 'config': config.to_dict(), 'num_features': 64})
  np.savez(out / 'saved_on_1.npz', *jax.tree.leaves(variables))
  result = subprocess.run(
      [sys.executable, '-m', 'tests.mesh_checks', str(out)], cwd=ROOT, capture_output=True,
      text=True, timeout=900, env={**os.environ, **EIGHT_DEVICES})
  assert result.returncode == 0, result.stderr[-3000:]
  return out, json.loads(result.stdout.strip().splitlines()[-1]), variables


def test_eight_devices_take_the_steps_one_device_takes(checks):
  _, results, _ = checks
  assert results['devices'] == 8
  assert results['eight_param_devices'] == 8
  assert results['eight_shardings'] == ['P()']  # replicated
  assert 0 <= results['eight_max_param_difference'] < PARAM_TOLERANCE
  assert abs(results['eight_test_accuracy'] - results['one_test_accuracy']) <= 1 / 360


def test_fsdp_shards_kernels_and_takes_the_same_steps(checks):
  _, results, _ = checks
  assert results['fsdp_shardings'] == ["P('data',)", 'P()']
  assert 0 <= results['fsdp_max_param_difference'] < PARAM_TOLERANCE


def test_evaluation_over_eight_devices_equals_one_device(checks):
  out, results, _ = checks
  on_8 = results['evaluated_on_8']
  on_1 = train_jobs.evaluate_checkpoint(out / 'saved_on_8', devices=1)
  assert (on_8['devices'], on_1['devices']) == (8, 1)
  assert on_8['n'] == on_1['n'] == 360
  # Counts are exact; the summed loss is reassociated over the shards.
  assert on_8['accuracy'] == on_1['accuracy']
  assert on_8['deep_fraction'] == on_1['deep_fraction']
  assert abs(on_8['loss'] - on_1['loss']) < 1e-5


def test_saved_on_one_device_restores_into_eight_shards(checks):
  _, results, _ = checks
  assert results['restored_on_8_max_difference'] == 0
  assert results['restored_on_8_shardings'] == ["P('data',)", 'P()']
  assert results['restored_on_8_kernel_devices'] == 8


@pytest.mark.parametrize('saved', ['saved_on_8', 'periodic_fsdp/2'])
def test_saved_on_eight_devices_restores_onto_one(checks, saved):
  out, _, variables = checks
  mesh = parallel.mesh_from_config(MeshConfig(devices=1))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(mesh, P())), variables)
  restored = checkpoint.restore_sharded(out / saved, target)
  expected = np.load(out / 'saved_on_8.npz')
  for index, leaf in enumerate(jax.tree.leaves(restored)):
    assert leaf.sharding == NamedSharding(mesh, P())
    np.testing.assert_array_equal(np.asarray(leaf), expected[f'arr_{index}'])


def test_a_checkpoint_does_not_restore_into_another_shape(checks):
  out, _, variables = checks
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
  target['params']['trunk_0']['kernel'] = jax.ShapeDtypeStruct((64, 16), np.float32)
  with pytest.raises(CheckpointError, match=r'trunk_0/kernel is of shape \(64, 32\)'):
    checkpoint.restore_sharded(out / 'saved_on_1', target)


def test_bad_meshes_are_refused_in_one_sentence(checks):
  _, results, _ = checks
  assert 'training.mesh.devices = 16 is more than the 8 cpu devices' in results[
      'too_many_devices']
  assert 'training.batch_size = 30 does not divide evenly over the 8 devices' in results[
      'batch_does_not_divide']


def test_device_scaling_reports_each_mesh_and_says_cpu_devices_are_simulated(checks):
  _, results, _ = checks
  scaling = results['scaling']
  assert [row['devices'] for row in scaling['rows']] == [1, 8]
  one, eight = scaling['rows']
  assert one['speedup'] == one['efficiency'] == 1.0
  assert eight['speedup'] == pytest.approx(
      eight['samples_per_second'] / one['samples_per_second'])
  assert eight['efficiency'] == pytest.approx(eight['speedup'] / 8)
  assert 'not that it is faster' in scaling['note']


def test_cli_refuses_a_mesh_larger_than_the_devices(tmp_path):
  models = tmp_path / 'models'
  result = run(sys.executable, '-m', 'dnnr_jax', 'train', '--config', SMOKE_CONFIG,
               '--models-dir', models, '--devices', '16')
  assert_one_line_error(result, ['training.mesh.devices = 16', 'lower it'])
  assert not models.exists()


def test_resume_after_kill_under_a_mesh(tmp_path, monkeypatch):
  """kill -9 an 8-device run after its first epoch; --resume ends as an uninterrupted run."""
  monkeypatch.setenv('XLA_FLAGS', EIGHT_DEVICES['XLA_FLAGS'])
  command = [sys.executable, '-m', 'dnnr_jax', 'train', '--config', str(SMOKE_CONFIG),
             '--set', 'training.epochs=3', '--devices', '8', '--json', '--models-dir']
  whole = subprocess.Popen([*command, str(tmp_path / 'whole')], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  killed = subprocess.Popen([*command, str(tmp_path / 'killed')], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = tmp_path / 'killed' / 'checkpoints' / 'model_v1.0_final' / '1'
  deadline = time.monotonic() + 600
  while not first.is_dir() and killed.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  assert killed.wait() == -signal.SIGKILL
  # Killed before its final checkpoint (the folder holds at most its writer's lock file).
  assert not (tmp_path / 'killed' / 'final' / 'model_v1.0_final').exists()

  resumed = one_json(run(*command, tmp_path / 'killed', '--resume'))

  assert whole.wait(timeout=600) == 0
  final = 'final/model_v1.0_final'
  assert resumed['model'] == str(tmp_path / 'killed' / final)
  done = checkpoint.load_model(tmp_path / 'whole' / final)
  again = checkpoint.load_model(tmp_path / 'killed' / final)
  assert [r['epoch'] for r in again.metadata['history']] == [1, 2, 3]
  for left, right in zip(jax.tree.leaves(again.variables), jax.tree.leaves(done.variables),
                         strict=True):
    np.testing.assert_array_equal(np.asarray(left), np.asarray(right))
