"""Our models quantized by the jobs compute, store and export what they did before.

`tests/golden/quantized_parity.npz` was recorded with the model-specific
quantized `Dense` our models had before they moved onto `compress.Rule` and
method interception (commit cf6867e): for one untrained smoke model
(digits, deterministic init, thresholds at the test inputs' medians, so both
routes are taken) quantized by `quantize_checkpoint` in every mode and
width, and an early-exit variant:

* the logits and routes on the first test rows;
* a digest of the checkpoint's arrays as they load (codes, scales, zero
  points, biases, thresholds, activation scales) and of their tree;
* the exported ONNX graph's op types with their counts (subgraphs
  included) and onnxruntime's outputs.

Routes, array digests and op counts must be equal exactly. Logits are equal
bit for bit on the recording machine (Intel Xeon, avx512_vnni/amx); the test
allows 1e-6 of the largest |logit| (and 1e-5 for the QAT runs, whose
one-epoch fine-tune sums float gradients) for another CPU whose XLA kernels
may sum a float matmul in another order.

Re-record (only when a change of results is intended):
  PYTHONPATH=$PWD python -m tests.test_quantized_parity --record
"""

import collections
import hashlib
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnnr_jax import complexity as complexity_lib
from dnnr_jax.config import QuantizeConfig, load_config
from dnnr_jax.io import checkpoint as checkpoint_lib
from dnnr_jax.io.data import load_dataset
from dnnr_jax.jobs import compress as compress_jobs
from dnnr_jax.model import init_variables, model_from_config
from tests.conftest import SMOKE_CONFIG

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'quantized_parity.npz'
ROWS = 128
# One export per graph form (each costs seconds): the float Gemm, the dequantized
# weight-only Gemm, MatMulInteger at per-row and at calibrated scales, and the
# early exit's two composed stages. The recording also holds weight_only_8,
# static_4, qat_8, early_exit_static_8 and early_exit_float, which the test no
# longer runs (each quantize job costs seconds; these forms are covered above).
EXPORTED = ('weight_only_4', 'dynamic_8', 'static_8')
# name: (config overrides, settings, exported to ONNX).
RUNS = {
    **{name: ([], QuantizeConfig(mode=name.rsplit('_', 1)[0], bits=int(name.rsplit('_', 1)[1]),
                                 calibration_batches=3, finetune_epochs=1), name in EXPORTED)
       for name in ('weight_only_4', 'dynamic_8', 'dynamic_4', 'static_8', 'qat_4')},
    'early_exit_dynamic_8': (['model.family=early_exit', 'model.exit_after=1'],
                             QuantizeConfig(mode='dynamic', bits=8), True),
}
FLOAT_EXPORTS = ('float',)


def _final(models_dir: pathlib.Path, overrides: list[str]) -> pathlib.Path:
  """An untrained final checkpoint (threefry init: the same on every machine)."""
  config = load_config(SMOKE_CONFIG, overrides)
  dataset = load_dataset(config.data)
  metrics = complexity_lib.batch_complexity(jnp.asarray(dataset.test.images))
  thresholds = {name: jnp.median(values) for name, values in metrics.items()}
  model = model_from_config(config)
  if config.model.family == 'early_exit':
    thresholds['confidence'] = jnp.float32(0.5)
  variables = init_variables(model, jax.random.PRNGKey(0), dataset.num_features, thresholds)
  path = checkpoint_lib.checkpoint_path(models_dir, 'final', '1.0').absolute()
  metadata = {'kind': 'final', 'version': '1.0', 'config': config.to_dict(),
              'num_features': dataset.num_features,
              'thresholds': {name: float(value) for name, value in thresholds.items()},
              'dataset': {'name': dataset.name}}
  return checkpoint_lib.save_checkpoint(path, variables, metadata)


def _digest(variables) -> str:
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  digest = hashlib.sha256(str(jax.tree.structure(variables)).encode())
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    array = np.asarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def _onnx(path: pathlib.Path, images: np.ndarray) -> tuple[dict[str, int], np.ndarray]:
  import onnx
  import onnxruntime

  from dnnr_jax.io.export import export_onnx

  output, _ = export_onnx(path, output=path.parent / f'{path.name}.onnx', check_inputs=images)
  graph = onnx.load(output)
  counts = collections.Counter()

  def count(nodes):
    for node in nodes:
      counts[node.op_type] += 1
      for attribute in node.attribute:
        if attribute.g.node:
          count(attribute.g.node)

  count(graph.graph.node)
  session = onnxruntime.InferenceSession(str(output), providers=['CPUExecutionProvider'])
  outputs = session.run(None, {session.get_inputs()[0].name: images})[0]
  return dict(sorted(counts.items())), np.asarray(outputs)


def measure(root: pathlib.Path) -> tuple[dict[str, np.ndarray], dict]:
  """Every run's arrays (logits, routes, ONNX outputs) and facts (digest, op counts)."""
  arrays, facts = {}, {}
  sources = {}
  for family, overrides in (('', []), ('early_exit_', RUNS['early_exit_dynamic_8'][0])):
    sources[family] = _final(root / f'{family}models', overrides)
  images = None
  for index, (name, (overrides, settings, exported)) in enumerate(RUNS.items()):
    family = 'early_exit_' if overrides else ''
    source = sources[family]
    result = compress_jobs.quantize_checkpoint(source, settings, version=f'1.{index}')
    loaded = checkpoint_lib.load_model(result.path)
    if images is None:
      images = np.asarray(load_dataset(loaded.config.data).test.images[:ROWS])
    logits, routes = jax.jit(loaded.model.apply)(loaded.variables, images)
    arrays[f'{name}/logits'], arrays[f'{name}/routes'] = np.asarray(logits), np.asarray(routes)
    facts[name] = {'digest': _digest(loaded.variables)}
    if exported:
      facts[name]['ops'], arrays[f'{name}/onnx'] = _onnx(result.path, images)
  for name in FLOAT_EXPORTS:
    family = 'early_exit_' if name.startswith('early_exit') else ''
    facts[name] = {}
    facts[name]['ops'], arrays[f'{name}/onnx'] = _onnx(sources[family], images)
  return arrays, facts


@pytest.fixture(scope='module')
def measured(tmp_path_factory):
  return measure(tmp_path_factory.mktemp('quantized_parity'))


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN, allow_pickle=False) as stored:
    arrays = {name: stored[name] for name in stored.files if name != 'facts'}
    return arrays, json.loads(str(stored['facts']))


def test_the_recording_covers_every_mode_and_width(golden):
  arrays, facts = golden
  assert set(facts) >= {*RUNS, *FLOAT_EXPORTS}
  for name in RUNS:
    routes = arrays[f'{name}/routes']
    assert 0 < routes.mean() < 1, name  # Both routes are taken.


@pytest.mark.parametrize('name', RUNS)
def test_logits_and_routes_are_unchanged(measured, golden, name):
  arrays, _ = measured
  expected, _ = golden
  np.testing.assert_array_equal(arrays[f'{name}/routes'], expected[f'{name}/routes'])
  reference = expected[f'{name}/logits']
  tolerance = (1e-5 if name.startswith('qat') else 1e-6) * np.max(np.abs(reference))
  np.testing.assert_allclose(arrays[f'{name}/logits'], reference, rtol=0, atol=tolerance)


@pytest.mark.parametrize('name', RUNS)
def test_checkpoint_arrays_are_unchanged(measured, golden, name):
  if name.startswith('qat'):
    pytest.skip('QAT codes come from a float fine-tune; its logits are compared instead')
  assert measured[1][name]['digest'] == golden[1][name]['digest']


@pytest.mark.parametrize('name', [*FLOAT_EXPORTS, *(name for name in RUNS if RUNS[name][2])])
def test_onnx_graphs_and_outputs_are_unchanged(measured, golden, name):
  assert measured[1][name]['ops'] == golden[1][name]['ops']
  reference = golden[0][f'{name}/onnx']
  tolerance = (1e-5 if name.startswith('qat') else 1e-6) * np.max(np.abs(reference))
  np.testing.assert_allclose(measured[0][f'{name}/onnx'], reference, rtol=0, atol=tolerance)


def _record() -> None:
  import tempfile

  with tempfile.TemporaryDirectory() as directory:
    arrays, facts = measure(pathlib.Path(directory))
  GOLDEN.parent.mkdir(exist_ok=True)
  np.savez_compressed(GOLDEN, facts=np.asarray(json.dumps(facts, sort_keys=True)), **arrays)
  print(json.dumps(facts, indent=1, sort_keys=True))


if __name__ == '__main__' and sys.argv[1:] == ['--record']:
  _record()
