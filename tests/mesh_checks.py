"""Checks run in a subprocess with 8 simulated CPU devices (tests/test_parallel.py).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.mesh_checks OUT_DIR

Prints one JSON object; the test asserts on it.
"""

import json
import pathlib
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dnnr_jax import parallel
from dnnr_jax.config import load_config
from dnnr_jax.errors import DnnrError
from dnnr_jax.io import checkpoint
from dnnr_jax.io.data import load_dataset
from dnnr_jax.jobs import benchmark
from dnnr_jax.jobs import train as train_jobs
from dnnr_jax.jobs.fit import fit
from tests.conftest import SMOKE_CONFIG

STEPS_CONFIG = ['training.epochs=2', 'training.checkpoint_every=1']


def _max_difference(left, right) -> float:
  return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(left), jax.tree.leaves(right), strict=True))


def _shardings(tree) -> list[str]:
  return sorted({str(leaf.sharding.spec) for leaf in jax.tree.leaves(tree)})


def main(out: pathlib.Path) -> dict:
  results: dict = {'devices': jax.device_count()}
  base = load_config(SMOKE_CONFIG, STEPS_CONFIG)
  digits = load_dataset(base.data)
  runs = {}
  for name, settings in {'one': ['training.mesh.devices=1'],
                         'eight': ['training.mesh.devices=8'],
                         'fsdp': ['training.mesh.devices=8', 'training.mesh.shard_params=true']
                         }.items():
    config = load_config(SMOKE_CONFIG, STEPS_CONFIG + settings)
    runs[name] = fit(config, digits, checkpoint_dir=out / f'periodic_{name}')
  one = runs['one'].state.params
  for name in ('eight', 'fsdp'):
    results[f'{name}_max_param_difference'] = _max_difference(runs[name].state.params, one)
    results[f'{name}_test_accuracy'] = runs[name].final_metrics['test']['accuracy']
    results[f'{name}_shardings'] = _shardings(runs[name].state.params)
  results['one_test_accuracy'] = runs['one'].final_metrics['test']['accuracy']
  results['eight_param_devices'] = len(
      jax.tree.leaves(runs['eight'].state.params)[0].sharding.device_set)
  # A final checkpoint written from the sharded (FSDP) state.
  fsdp = runs['fsdp'].state
  checkpoint.save_checkpoint(out / 'saved_on_8', jax.device_get(fsdp.variables), {
      'kind': 'final', 'config': base.to_dict(), 'num_features': 64})
  np.savez(out / 'saved_on_8.npz', *[np.asarray(x) for x in jax.tree.leaves(fsdp.variables)])
  results['evaluated_on_8'] = train_jobs.evaluate_checkpoint(out / 'saved_on_8', devices=8)
  # The reverse: one saved on 1 device by the parent, restored into 8 shards.
  mesh = parallel.mesh_from_config(load_config(SMOKE_CONFIG).training.mesh)
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
          mesh, P('data') if x.ndim == 2 and x.shape[0] % 8 == 0 else P())),
      fsdp.variables)
  restored = checkpoint.restore_sharded(out / 'saved_on_1', target)
  expected = np.load(out / 'saved_on_1.npz')
  results['restored_on_8_max_difference'] = max(
      float(np.max(np.abs(np.asarray(leaf) - expected[f'arr_{index}'])))
      for index, leaf in enumerate(jax.tree.leaves(restored)))
  results['restored_on_8_shardings'] = _shardings(restored)
  results['restored_on_8_kernel_devices'] = len(
      restored['params']['trunk_0']['kernel'].sharding.device_set)
  scaling = benchmark.device_scaling(base, digits, [1, 8], repeats=1)
  results['scaling'] = scaling
  # Bad input: more devices than there are; a batch that does not divide.
  for name, settings in {'too_many_devices': ['training.mesh.devices=16'],
                         'batch_does_not_divide': ['training.batch_size=30']}.items():
    try:
      fit(load_config(SMOKE_CONFIG, STEPS_CONFIG + settings), digits)
      results[name] = None
    except DnnrError as error:
      results[name] = str(error)
  return results


if __name__ == '__main__':
  print(json.dumps(main(pathlib.Path(sys.argv[1]))))
