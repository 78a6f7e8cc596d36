"""The prune and quantize jobs end to end on one trained smoke model (digits, offline)."""

import dataclasses
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from dnnr_jax.compress import prune, quantize, structured
from dnnr_jax.compress.rules import Rule
from dnnr_jax.config import PruneConfig, QuantizeConfig, RoutingConfig, load_config
from dnnr_jax.errors import CheckpointError, DnnrError
from dnnr_jax.io import storage
from dnnr_jax.io.checkpoint import load_model
from dnnr_jax.io.data import load_dataset
from dnnr_jax.jobs import compress as compress_jobs
from dnnr_jax.jobs import train as jobs
from dnnr_jax.model import model_from_config
from tests.cli_helpers import snapshot
from tests.conftest import SMOKE_CONFIG

LAYERS = ('trunk_0', 'trunk_1', 'deep', 'shortcut', 'head')
SPARSITY = 0.8
# Accuracy a quantized model may lose against its float source.
ACCURACY_SLACK = 0.02
ONESHOT = PruneConfig(schedule='oneshot', sparsity=SPARSITY, finetune_epochs=1)
GRADUAL = PruneConfig(method='global', schedule='gradual', sparsity=0.9, finetune_epochs=2,
                      learning_rate=0.002)
# Each run writes into its own models folder, so its version is always 1.0.
# By name: (settings, the job's other arguments).
PRUNE_RUNS = {
    'structured': (dataclasses.replace(ONESHOT, method='structured', sparsity=0.5), {}),
    'nm': (dataclasses.replace(ONESHOT, method='nm', n=2, m=4), {}),
    'gradual': (GRADUAL, {}),
    'distilled': (dataclasses.replace(GRADUAL, distill=0.5, distill_temperature=3.0), {}),
    'augmented': (dataclasses.replace(GRADUAL, distill=0.5, distill_temperature=3.0,
                                      augment_shift=1), {}),
    'reseeded': (GRADUAL, {'seed': 7}),
}
QUANTIZE_RUNS = {
    'dynamic': (QuantizeConfig(mode='dynamic', bits=8), {}),
    'weight_only': (QuantizeConfig(mode='weight_only', bits=4), {}),
    'static': (QuantizeConfig(mode='static', bits=8, calibration_batches=4), {}),
    'qat': (QuantizeConfig(mode='qat', bits=8, finetune_epochs=1), {}),
}


def _kernels(variables) -> dict:
  return {name: variables['params'][name]['kernel'] for name in LAYERS}


def _assert_zeros_kept(pruned_path, quantized_path) -> None:
  """Every kernel has pruned zeros, and its codes are zero exactly there."""
  floats = _kernels(load_model(pruned_path).variables)
  codes = _kernels(load_model(quantized_path).variables)
  for name in LAYERS:
    zero = np.asarray(floats[name]) == 0
    assert zero.sum() > 0
    assert np.all(np.asarray(codes[name].value)[zero] == 0), name


def _dense_inputs(model, variables, inputs) -> dict:
  """Each nn.Dense layer's input by name: the calibration's reference, recorded by hand."""
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == '__call__':
      captured[context.module.name] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, inputs)
  return captured


def _array_bytes(variables) -> int:
  arrays, _ = storage.encode_variables(variables)
  return sum(leaf.nbytes for leaf in jax.tree.leaves(arrays))


@pytest.fixture(scope='module')
def root(tmp_path_factory) -> pathlib.Path:
  return tmp_path_factory.mktemp('compress_jobs')


@pytest.fixture(scope='module')
def models_dir(root) -> pathlib.Path:
  return root / 'models'


@pytest.fixture(scope='module')
def final_path(models_dir) -> pathlib.Path:
  """The one trained model every job here starts from."""
  path, _ = jobs.train_and_save(
      load_config(SMOKE_CONFIG, ['training.epochs=3']), models_dir=models_dir)
  return path


@pytest.fixture(scope='module')
def source(final_path):
  return load_model(final_path)


@pytest.fixture(scope='module')
def dataset(source):
  return load_dataset(source.config.data)


@pytest.fixture(scope='module')
def oneshot(final_path):
  """Global then layer one-shot pruning into the source's models folder, by method."""
  return {method: compress_jobs.prune_checkpoint(
      final_path, dataclasses.replace(ONESHOT, method=method)) for method in ('global', 'layer')}


def _cached_runs(final_path, root, kind, runs):
  made = {}

  def make(name):
    if name not in made:
      job = (compress_jobs.prune_checkpoint if kind == 'pruned'
             else compress_jobs.quantize_checkpoint)
      settings, options = runs[name]
      result = job(final_path, settings, models_dir=root / name, **options)
      assert result.path == root / name / kind / f'{kind}_model_v1.0'
      made[name] = result.path, result, load_model(result.path)
    return made[name]

  return make


@pytest.fixture(scope='module')
def pruned(final_path, root):
  """PRUNE_RUNS by name, each run on first use: (path, summary, loaded)."""
  return _cached_runs(final_path, root, 'pruned', PRUNE_RUNS)


@pytest.fixture(scope='module')
def quantized(final_path, root):
  """QUANTIZE_RUNS by name, each run on first use: (path, summary, loaded)."""
  return _cached_runs(final_path, root, 'quantized', QUANTIZE_RUNS)


# Pruning.


def test_oneshot_takes_successive_versions_beside_the_source(models_dir, oneshot):
  assert oneshot['global'].path == models_dir / 'pruned' / 'pruned_model_v1.0'
  assert oneshot['layer'].path == models_dir / 'pruned' / 'pruned_model_v1.1'
  assert oneshot['global'].version == '1.0'
  assert oneshot['layer'].version == '1.1'


@pytest.mark.parametrize('method', ['global', 'layer'])
def test_oneshot_prunes_exactly_and_finetuning_keeps_zeros(source, oneshot, method):
  kernels = _kernels(load_model(oneshot[method].path).variables)
  original = _kernels(source.variables)
  # The zeros are exactly the weights the mask of the source removes: none
  # revived by fine-tuning, none added.
  masks = prune.magnitude_masks(source.variables['params'], SPARSITY, scope=method)
  for name in LAYERS:
    kernel = np.asarray(kernels[name])
    assert not isinstance(kernels[name], quantize.QArray)
    assert kernel.shape == original[name].shape
    np.testing.assert_array_equal(kernel != 0, np.asarray(masks[name]['kernel']))
  counts = {name: int(np.sum(np.asarray(kernels[name]) == 0)) for name in LAYERS}
  sizes = {name: kernels[name].size for name in LAYERS}
  expected = {name: round(SPARSITY * size) for name, size in sizes.items()}
  if method == 'global':
    assert sum(counts.values()) == round(SPARSITY * sum(sizes.values()))
    assert counts != expected  # one cut-off over all kernels, not per kernel
  else:
    assert counts == expected
  # Fine-tuning moved the surviving weights.
  assert any(np.any((np.asarray(kernels[name]) != np.asarray(original[name]))
                    & (np.asarray(kernels[name]) != 0)) for name in LAYERS)


@pytest.mark.parametrize('method', ['global', 'layer'])
def test_oneshot_metadata(final_path, source, dataset, oneshot, method):
  summary = oneshot[method]
  path = summary.path
  loaded = load_model(path)
  metadata = loaded.metadata
  assert metadata['kind'] == 'pruned'
  assert metadata['source'] == {'path': str(final_path), 'kind': 'final', 'version': '1.0'}
  settings = metadata['compression']
  assert {key: settings[key] for key in ('method', 'sparsity', 'schedule', 'finetune_epochs')} == {
      'method': method, 'sparsity': SPARSITY, 'schedule': 'oneshot', 'finetune_epochs': 1}
  report = settings['sparsity_report']
  assert report == prune.sparsity_report(loaded.variables['params']) == summary.sparsity_report
  assert report['overall']['zeros'] == sum(
      int(np.sum(np.asarray(kernel) == 0)) for kernel in _kernels(loaded.variables).values())
  # Accuracy before is the source's own, after is what the checkpoint scores.
  before, after = metadata['metrics']['test_before'], metadata['metrics']['test']
  assert before['accuracy'] == source.metadata['metrics']['test']['accuracy']
  evaluated = jobs.evaluate_checkpoint(path)
  for key in ('accuracy', 'loss', 'deep_fraction'):
    assert evaluated[key] == pytest.approx(after[key], abs=1e-6)
  # Thresholds are untouched, so every input takes the route it took before.
  assert metadata['thresholds'] == source.metadata['thresholds']
  for name, value in source.variables['thresholds'].items():
    assert float(loaded.variables['thresholds'][name]) == float(value)
  routes = metadata['routes']
  assert routes['route_agreement'] == 1.0
  logits, deep = loaded.predict_with_routes(dataset.test.images)
  correct = np.argmax(logits, -1) == np.asarray(dataset.test.labels)
  for name, chosen in (('deep_accuracy', deep), ('shallow_accuracy', ~deep)):
    if chosen.any():
      assert routes[name] == pytest.approx(float(correct[chosen].mean()))
    else:
      assert routes[name] is None
  # Bytes: the arrays as encoded (sparse beats dense), and the directory.
  assert metadata['array_bytes'] == _array_bytes(loaded.variables)
  assert metadata['array_bytes'] < _array_bytes(source.variables) / 2
  assert summary.metadata['compression'] == settings
  assert summary.size == compress_jobs.Footprint(
      storage.directory_bytes(path), storage.gzip_bytes(path))
  assert summary.source_size.raw == storage.directory_bytes(final_path)
  assert summary.size.raw < summary.source_size.raw
  assert summary.dense_float_path == final_path
  # The JSON summary `dnnr prune --json` prints.
  plain = summary.to_dict()
  assert plain['path'] == str(path) and plain['kind'] == 'pruned'
  assert plain['bytes'] == {'raw': summary.size.raw, 'gzip': summary.size.gzip}
  assert plain['dense_float_bytes']['path'] == str(final_path)


def test_structured_prune_halves_every_width(source, dataset, pruned):
  _, summary, loaded = pruned('structured')
  old = source.config.model
  assert tuple(old.hidden_sizes) == (32, 32) and old.deep_size == 16
  new = loaded.config.model
  assert tuple(new.hidden_sizes) == (16, 16) and new.deep_size == 8
  assert summary.metadata['compression']['kept_units'] == {
      'trunk_0': 16, 'trunk_1': 16, 'block': 8}
  shapes = {name: kernel.shape for name, kernel in _kernels(loaded.variables).items()}
  assert shapes == {'trunk_0': (64, 16), 'trunk_1': (16, 16), 'deep': (16, 8),
                    'shortcut': (16, 8), 'head': (8, 10)}
  assert tuple(loaded.model.hidden_sizes) == (16, 16) and loaded.model.deep_size == 8
  logits = loaded.predict(dataset.test.images)
  assert logits.shape == (360, 10)
  accuracy = float(np.mean(np.argmax(logits, -1) == np.asarray(dataset.test.labels)))
  assert accuracy == pytest.approx(summary.accuracy)
  old_count = structured.count_parameters(source.variables['params'])
  new_count = structured.count_parameters(loaded.variables['params'])
  assert new_count == sum(
      fan_in * fan_out + fan_out for fan_in, fan_out in shapes.values()) < old_count


def test_nm_prune_keeps_two_of_every_four_inputs(source, pruned):
  _, summary, loaded = pruned('nm')
  settings = summary.metadata['compression']
  assert settings['method'] == 'nm' and (settings['n'], settings['m']) == (2, 4)
  masks = prune.nm_masks(source.variables['params'], 2, 4)
  total = 0
  for name, kernel in _kernels(loaded.variables).items():
    kernel = np.asarray(kernel)
    groups = kernel.reshape(kernel.shape[0] // 4, 4, kernel.shape[1])
    assert np.all(np.count_nonzero(groups, axis=1) <= 2), name
    np.testing.assert_array_equal(kernel != 0, np.asarray(masks[name]['kernel']))
    total += kernel.size
  assert summary.zeros == total // 2 and summary.sparsity == 0.5


def test_gradual_prune_reaches_the_final_sparsity_exactly(pruned):
  _, summary, loaded = pruned('gradual')
  assert summary.metadata['compression']['schedule'] == 'gradual'
  kernels = [np.asarray(kernel) for kernel in _kernels(loaded.variables).values()]
  size = sum(kernel.size for kernel in kernels)
  zeros = sum(int(np.sum(kernel == 0)) for kernel in kernels)
  assert zeros == round(0.9 * size)
  assert summary.zeros == zeros
  assert summary.route_agreement == 1.0
  assert summary.metadata['compression']['learning_rate'] == 0.002
  assert summary.metadata['config']['training']['learning_rate'] == 0.002


def test_distilled_prune_records_its_teacher_and_keeps_the_mask(pruned, source):
  _, plain, _ = pruned('gradual')
  _, summary, loaded = pruned('distilled')
  settings = summary.metadata['compression']
  assert (settings['distill'], settings['temperature']) == (0.5, 3.0)
  assert 'distill' not in plain.metadata['compression']
  kernels = [np.asarray(kernel) for kernel in _kernels(loaded.variables).values()]
  assert sum(int(np.sum(kernel == 0)) for kernel in kernels) == round(
      0.9 * sum(kernel.size for kernel in kernels))
  # The soft targets change the weights the labels alone would give.
  assert not np.allclose(_kernels(loaded.variables)['head'],
                         _kernels(load_model(pruned('gradual')[0]).variables)['head'])
  # The teacher is the source itself, untouched by the (donating) training.
  assert np.isfinite(np.asarray(source.variables['params']['head']['kernel'])).all()
  assert summary.accuracy > 0.5


def test_augmented_prune_records_its_shift_and_trains_on_other_images(pruned):
  _, distilled, distilled_model = pruned('distilled')
  _, summary, loaded = pruned('augmented')
  assert summary.metadata['compression']['augment_shift'] == 1
  assert 'augment_shift' not in distilled.metadata['compression']
  assert summary.metadata['config']['compress']['prune']['augment_shift'] == 0  # The source's.
  kernels = [np.asarray(kernel) for kernel in _kernels(loaded.variables).values()]
  assert sum(int(np.sum(kernel == 0)) for kernel in kernels) == round(
      0.9 * sum(kernel.size for kernel in kernels))
  # Same seed, same teacher: only the shifted images make the weights differ.
  assert not np.allclose(_kernels(loaded.variables)['head'],
                         _kernels(distilled_model.variables)['head'])


def test_a_fine_tuning_seed_reshuffles_and_is_recorded(pruned, source):
  _, default, default_model = pruned('gradual')
  _, summary, loaded = pruned('reseeded')
  assert default.metadata['config']['training']['seed'] == source.config.training.seed != 7
  assert summary.metadata['config']['training']['seed'] == 7
  assert not np.allclose(_kernels(loaded.variables)['head'],
                         _kernels(default_model.variables)['head'])


@pytest.mark.parametrize('settings, options, match', [
    (dict(distill=1.5), {}, 'compress.prune.distill = 1.5'),
    ({}, dict(seed=-1), 'seed = -1 is not a non-negative integer'),
    (dict(distill=0.5, finetune_epochs=0), {}, 'compress.prune.distill acts while fine-tuning'),
    (dict(distill=0.5, distill_temperature=0.0), {}, 'compress.prune.distill_temperature = 0.0'),
    (dict(sparsity=1.0), {}, r'compress.prune.sparsity = 1.0 must be in \[0, 1\)'),
    (dict(sparsity=-0.1), {}, 'compress.prune.sparsity = -0.1 must be in'),
    (dict(method='random'), {}, "compress.prune.method = 'random'"),
    (dict(schedule='cubic'), {}, "compress.prune.schedule = 'cubic'"),
    (dict(method='structured', schedule='gradual'), {}, 'gradual prunes during fine-tuning'),
    (dict(schedule='gradual', finetune_epochs=0), {}, 'gradual prunes during fine-tuning'),
    (dict(method='nm', n=4, m=4), {}, 'compress.prune.m = 4 must be larger than'),
    (dict(finetune_epochs=-1), {}, 'compress.prune.finetune_epochs = -1'),
    (dict(learning_rate=-0.01), {}, 'compress.prune.learning_rate = -0.01'),
    ({}, dict(version='1.0'), 'already exists'),
    ({}, dict(version='one'), 'MAJOR.MINOR'),
])
def test_prune_rejects_bad_settings_before_writing(models_dir, final_path, oneshot, settings,
                                                   options, match):
  before = snapshot(models_dir)
  with pytest.raises(DnnrError, match=match):
    compress_jobs.prune_checkpoint(final_path, dataclasses.replace(ONESHOT, **settings),
                                   **options)
  assert snapshot(models_dir) == before


@pytest.mark.parametrize('method', ['global', 'layer', 'structured', 'nm'])
def test_prune_refuses_a_quantized_checkpoint(root, quantized, method):
  path, _, _ = quantized('dynamic')
  before = snapshot(root)
  with pytest.raises(DnnrError, match='is quantized; prune a final or pruned model') as caught:
    compress_jobs.prune_checkpoint(
        path, PruneConfig(method=method, sparsity=0.5, schedule='oneshot', finetune_epochs=0))
  assert str(path) in str(caught.value)
  assert snapshot(root) == before


def test_prune_refuses_a_missing_checkpoint(root):
  with pytest.raises(CheckpointError, match='is not a directory'):
    compress_jobs.prune_checkpoint(root / 'absent')


# Quantization.


def test_dynamic_quantization(final_path, source, quantized):
  path, summary, loaded = quantized('dynamic')
  assert (summary.mode, summary.bits) == ('dynamic', 8)
  assert loaded.metadata['quantization'] == {'mode': 'dynamic', 'bits': 8}
  assert loaded.model.quantization == (Rule('.*', mode='dynamic', bits=8),)
  for name, kernel in _kernels(loaded.variables).items():
    assert isinstance(kernel, quantize.QArray), name
    assert kernel.value.dtype == np.int8 and kernel.bits == 8 and kernel.axis == 1
    original = np.asarray(_kernels(source.variables)[name])
    assert kernel.scale.shape == (1, original.shape[1])
    assert np.all(np.abs(np.asarray(kernel.dequantize()) - original)
                  <= np.asarray(kernel.scale) / 2 + 1e-7)
  after = summary.accuracy
  assert abs(after - source.metadata['metrics']['test']['accuracy']) <= ACCURACY_SLACK
  assert summary.accuracy_before == source.metadata['metrics']['test']['accuracy']
  assert jobs.evaluate_checkpoint(path)['accuracy'] == after
  assert summary.route_agreement == 1.0
  assert summary.metadata['source'] == {'path': str(final_path), 'kind': 'final',
                                        'version': '1.0'}
  assert summary.size.raw == storage.directory_bytes(path)
  assert summary.size.raw < summary.source_size.raw
  # The arrays: int8 codes plus float32 scales and biases against float32 weights.
  assert summary.metadata['array_bytes'] == _array_bytes(loaded.variables)
  assert summary.metadata['array_bytes'] < _array_bytes(source.variables) / 3


def test_weight_only_int4_quantization(source, dataset, quantized):
  _, summary, loaded = quantized('weight_only')
  assert loaded.metadata['quantization'] == {'mode': 'weight_only', 'bits': 4}
  assert loaded.model.quantization == (Rule('.*', mode='weight_only', bits=4),)
  kernels = _kernels(loaded.variables)
  for name, kernel in kernels.items():
    assert isinstance(kernel, quantize.QArray) and kernel.bits == 4, name
    assert np.abs(np.asarray(kernel.value)).max() <= 7
  layout = loaded.metadata['layout']
  assert any(layout[f'params/{name}/kernel']['encoding'] == 'int4' for name in LAYERS)
  assert summary.metadata['array_bytes'] < _array_bytes(source.variables) / 5
  # Weight-only computes in float with the dequantized weights, as evaluated.
  images, labels = dataset.test
  float_params = quantize.dequantize_params(loaded.variables['params'])
  expected, _ = source.model.apply({**loaded.variables, 'params': float_params}, images)
  logits = loaded.predict(images)
  np.testing.assert_allclose(logits, np.asarray(expected), rtol=1e-5, atol=1e-5)
  accuracy = float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))
  assert accuracy == pytest.approx(summary.accuracy)


def test_static_quantization_calibrates_every_dense_input(source, dataset, quantized):
  _, summary, loaded = quantized('static')
  scales = loaded.variables['activation_scales']
  assert set(scales) == set(LAYERS)
  calibration = loaded.metadata['compression']['calibration']
  assert {key: calibration[key] for key in ('batches', 'batch_size', 'method')} == {
      'batches': 4, 'batch_size': 32, 'method': 'minmax'}
  model = model_from_config(source.config.replace(routing=RoutingConfig('per_sample')))
  images = np.asarray(dataset.train.images)
  inputs = [_dense_inputs(model, source.variables, images[i * 32:(i + 1) * 32])
            for i in range(4)]
  for name in LAYERS:
    values = np.concatenate([np.asarray(batch[name]) for batch in inputs])
    low, high = calibration['ranges'][name]
    np.testing.assert_allclose([low, high], [values.min(), values.max()], rtol=1e-6, atol=1e-6)
    scale = float(scales[name]['input'])
    assert scale > 0
    assert scale == pytest.approx(max(abs(low), abs(high)) / 127, rel=1e-6)
  assert isinstance(_kernels(loaded.variables)['head'], quantize.QArray)
  after = summary.accuracy
  assert abs(after - source.metadata['metrics']['test']['accuracy']) <= ACCURACY_SLACK


def test_qat_quantization_trains_then_converts(source, quantized):
  _, summary, loaded = quantized('qat')
  assert summary.metadata['compression']['finetune_epochs'] == 1
  assert loaded.model.quantization == (Rule('.*', mode='dynamic', bits=8),)  # Deployed.
  kernels = _kernels(loaded.variables)
  direct = _kernels({'params': quantize.quantize_params(source.variables['params'])})
  for kernel in kernels.values():
    assert isinstance(kernel, quantize.QArray) and kernel.value.dtype == np.int8
  # The codes come from fine-tuned weights, not from the source's.
  assert any(np.any(np.asarray(kernels[name].value) != np.asarray(direct[name].value))
             for name in LAYERS)
  # The extra epoch may well gain accuracy; it must not lose more than the slack.
  assert summary.accuracy >= source.metadata['metrics']['test']['accuracy'] - ACCURACY_SLACK
  assert summary.route_agreement == 1.0


def test_quantizing_a_pruned_checkpoint_keeps_its_zeros(final_path, root, oneshot):
  pruned_summary = oneshot['global']
  pruned_path = pruned_summary.path
  summary = compress_jobs.quantize_checkpoint(pruned_path, models_dir=root / 'chain')
  _assert_zeros_kept(pruned_path, summary.path)
  assert summary.metadata['source']['path'] == str(pruned_path)
  assert summary.metadata['source']['kind'] == 'pruned'
  assert summary.source_size == pruned_summary.size
  # Sparse int8 codes (2 bytes a non-zero) against sparse float32 (5 bytes). On
  # disk, Orbax's fixed overhead, which grows with the number of arrays and
  # the length of the paths in the metadata, hides that for a model this small.
  assert summary.metadata['array_bytes'] < pruned_summary.metadata['array_bytes'] * 0.7
  assert summary.dense_float_path == final_path
  assert summary.dense_float_size.raw == storage.directory_bytes(final_path)


def test_qat_of_a_pruned_checkpoint_trains_only_its_non_zeros(root, final_path, oneshot):
  # Distilled from the dense root of the lineage, on shifted images.
  pruned_path = oneshot['global'].path
  summary = compress_jobs.quantize_checkpoint(
      pruned_path, QuantizeConfig(mode='qat', finetune_epochs=1, distill=0.5, augment_shift=1),
      models_dir=root / 'qat_chain')
  _assert_zeros_kept(pruned_path, summary.path)
  recorded = summary.metadata['compression']
  assert recorded['finetune_epochs'] == 1
  assert (recorded['distill'], recorded['augment_shift']) == (0.5, 1)
  assert recorded['teacher'] == str(final_path)


@pytest.mark.parametrize('settings, options, match', [
    (dict(bits=3), {}, 'compress.quantize.bits = 3'),
    (dict(calibration_batches=0), {}, 'compress.quantize.calibration_batches = 0'),
    (dict(mode='float16'), {}, "compress.quantize.mode = 'float16'"),
    (dict(mode='qat', finetune_epochs=0), {}, 'compress.quantize.finetune_epochs = 0'),
    (dict(mode='dynamic', distill=0.5), {}, 'in compress.quantize.mode = qat only'),
    (dict(mode='qat', augment_shift=-1), {}, 'compress.quantize.augment_shift = -1'),
    (dict(mode='static', calibration_batches=45), {}, 'exceeds the 44 training batches'),
    ({}, dict(version='1.0'), 'already exists'),
])
def test_quantize_rejects_bad_settings_before_writing(root, final_path, quantized, settings,
                                                      options, match):
  quantized('dynamic')  # writes quantized 1.0 in models folder 'dynamic'
  before = snapshot(root)
  with pytest.raises(DnnrError, match=match):
    compress_jobs.quantize_checkpoint(final_path, QuantizeConfig(**settings),
                                      models_dir=root / 'dynamic', **options)
  assert snapshot(root) == before


def test_quantize_refuses_a_quantized_checkpoint(root, quantized):
  path, _, _ = quantized('dynamic')
  before = snapshot(root)
  with pytest.raises(DnnrError, match='is already quantized'):
    compress_jobs.quantize_checkpoint(path, QuantizeConfig(mode='weight_only', bits=4))
  assert snapshot(root) == before


# Calibration inputs.


def test_reference_dense_inputs_are_each_layers_input(source, dataset):
  images = dataset.test.images[:5]
  inputs = _dense_inputs(source.model, source.variables, images)
  assert {name: value.shape for name, value in inputs.items()} == {
      'trunk_0': (5, 64), 'trunk_1': (5, 32), 'deep': (5, 32), 'shortcut': (5, 32),
      'head': (5, 16)}
  params = source.variables['params']

  def dense(name, x):
    return np.asarray(x) @ np.asarray(params[name]['kernel']) + np.asarray(params[name]['bias'])

  np.testing.assert_array_equal(np.asarray(inputs['trunk_0']), np.asarray(images))
  np.testing.assert_allclose(inputs['trunk_1'], np.maximum(dense('trunk_0', images), 0),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(inputs['deep']), np.asarray(inputs['shortcut']))
  np.testing.assert_allclose(inputs['deep'], np.maximum(dense('trunk_1', inputs['trunk_1']), 0),
                             rtol=1e-5, atol=1e-5)
