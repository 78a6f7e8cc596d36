"""The `dnnr prune` and `dnnr quantize` jobs: checkpoint in, smaller checkpoint out.

Each job loads a dnnr_jax checkpoint, transforms its params pytree, fine-tunes
where asked (with the checkpoint's thresholds held fixed), evaluates before and
after on the test split, and writes a versioned Orbax checkpoint under
`<models>/pruned/` or `<models>/quantized/` whose metadata records the source,
the settings, sparsity per layer, bits, calibration, accuracy before and after,
route agreement and bytes.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dnnr_jax.compress import gradual, prune, qat, quantize, structured
from dnnr_jax.config import (
  PRUNE_METHODS,
  PRUNE_SCHEDULES,
  QUANTIZE_MODES,
  Config,
  PruneConfig,
  QuantizeConfig,
  ThresholdsConfig,
  ThresholdValues,
)
from dnnr_jax.errors import DnnrError
from dnnr_jax.io import checkpoint as checkpoint_lib
from dnnr_jax.io import storage
from dnnr_jax.io.data import Dataset, load_dataset
from dnnr_jax.jobs.fit import EpochCallback, fit
from dnnr_jax.model import Dense, model_from_config
from dnnr_jax.train import Teacher, evaluate


def prune_checkpoint(
    path: str | os.PathLike, *, method: str = 'global', sparsity: float = 0.9,
    schedule: str = 'oneshot', finetune_epochs: int = 2, n: int = 2, m: int = 4,
    learning_rate: float | None = None, distill: float = 0.0, temperature: float = 4.0,
    seed: int | None = None, data_dir=None, models_dir=None, version: str | None = None,
    overwrite: bool = False, on_epoch: EpochCallback | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> tuple[pathlib.Path, dict[str, Any]]:
  """Prunes a checkpoint and writes `<models>/pruned/pruned_model_v{version}`.

  Args:
    path: the source checkpoint (final or another pruned one).
    method: 'global' or 'layer' magnitude, 'structured' (whole units), or
      'nm' (n:m semi-structured; `sparsity` is then n/m's complement).
    sparsity: fraction of the selected kernels' weights (units for
      'structured') to remove, in [0, 1).
    schedule: 'oneshot' (prune, then fine-tune with the mask fixed) or
      'gradual' (cubic schedule during fine-tuning; global/layer only).
    finetune_epochs: Adam epochs after (or during) pruning; 0 for none.
    n, m: the N:M pattern.
    learning_rate: fine-tuning's peak learning rate; None keeps the source's.
    distill: while fine-tuning, this share of the loss distils the source
      model's outputs softened at `temperature` (see `train.Teacher`); 0 for
      plain fine-tuning on the labels.
    temperature: the distillation temperature.
    seed: fine-tuning's shuffling seed; None keeps the source's training.seed.
    data_dir, models_dir, version, overwrite, on_epoch, extra_metadata: as
      for training.

  Returns:
    The new checkpoint's path and a summary (what the metadata records, plus
    bytes on disk).
  """
  _check_choice('--method', method, PRUNE_METHODS)
  _check_choice('--schedule', schedule, PRUNE_SCHEDULES)
  prune.check_sparsity(sparsity)
  if finetune_epochs < 0:
    raise DnnrError(f'--finetune-epochs {finetune_epochs} is negative; pass 0 for none.')
  if not 0 <= distill <= 1:
    raise DnnrError(f'--distill {distill} is not a share of the loss in [0, 1]; pass e.g. 0.5.')
  if distill and finetune_epochs < 1:
    raise DnnrError('--distill acts while fine-tuning: pass --finetune-epochs of at least 1.')
  if not temperature > 0:
    raise DnnrError(f'--temperature {temperature} must be a positive number, e.g. 4.')
  if schedule == 'gradual' and (method not in ('global', 'layer') or finetune_epochs < 1):
    raise DnnrError(
        'a gradual schedule prunes during fine-tuning: use --method global or layer '
        'with --finetune-epochs of at least 1.')
  source, out_path, version = _prepare(path, 'pruned', models_dir, version, overwrite)
  if _is_quantized(source):
    raise DnnrError(f'{source.path} is quantized; prune a final or pruned model, '
                    'then quantize the result.')
  params = source.variables['params']
  config = _finetune_config(source, finetune_epochs, learning_rate, seed)
  dataset = load_dataset(source.config.data, data_dir)  # After every cheap check.
  state_options: dict[str, Any] = {}
  settings = {'method': method, 'sparsity': sparsity, 'schedule': schedule,
              'finetune_epochs': finetune_epochs,
              'learning_rate': config.training.learning_rate}
  if distill:
    # The source model as it is (dense, float) teaches the pruned one.
    state_options['teacher'] = Teacher(source.variables, source.model.apply, distill, temperature)
    settings.update(distill=distill, temperature=temperature)
  if method == 'structured':
    params, model_config, kept = structured.prune_units(params, config.model, sparsity)
    config = config.replace(model=model_config)
    settings['kept_units'] = {name: len(units) for name, units in kept.items()}
  elif schedule == 'gradual':
    steps = finetune_epochs * (dataset.train.labels.shape[0] // config.training.batch_size)
    sparsity_schedule = gradual.cubic_sparsity_schedule(
        0.0, sparsity, begin_step=0, end_step=max(1, int(0.75 * steps)))
    state_options['wrap_optimizer'] = lambda tx: gradual.pruning(
        tx, sparsity_schedule=sparsity_schedule, update_every=max(1, steps // 100),
        scope=method)
  else:
    if method == 'nm':
      masks = prune.nm_masks(params, n, m)
      settings.update(n=n, m=m)
    else:
      masks = prune.magnitude_masks(params, sparsity, scope=method)
    params = prune.apply_masks(params, masks)
    state_options['wrap_optimizer'] = lambda tx: gradual.keep_masked(tx, masks)
  if finetune_epochs > 0:
    params = fit(config, dataset, on_epoch=on_epoch, params=params,
                 **state_options).state.params
  variables = {**source.variables, 'params': params}
  report = prune.sparsity_report(params)
  settings['sparsity_report'] = report
  return _finish(source, out_path, 'pruned', version, config, variables, dataset,
                 settings, overwrite=overwrite, extra_metadata=extra_metadata)


def quantize_checkpoint(
    path: str | os.PathLike, *, mode: str = 'dynamic', bits: int = 8,
    per_channel: bool = True, calibration_batches: int = 10,
    calibration_method: str = 'minmax', finetune_epochs: int = 2,
    learning_rate: float | None = None, seed: int | None = None, data_dir=None,
    models_dir=None, version: str | None = None,
    overwrite: bool = False, on_epoch: EpochCallback | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> tuple[pathlib.Path, dict[str, Any]]:
  """Quantizes a checkpoint's kernels; writes `<models>/quantized/quantized_model_v{version}`.

  The weight scales and the biases are rounded to float16 values (the scales
  upwards), so each is stored in two bytes, exactly.

  Args:
    path: the source checkpoint (final or pruned; pruned zeros stay zero).
    mode: 'weight_only' (integer weights, float compute), 'dynamic' (integer
      matmuls with per-row activation scales), 'static' (integer matmuls at
      activation scales calibrated on `calibration_batches` training batches)
      or 'qat' (fine-tune with fake quantization, then convert; dynamic compute).
    bits: 8 or 4.
    per_channel: one scale per output channel, else per tensor.
    calibration_batches: for 'static'.
    calibration_method: 'minmax' or 'percentile', for 'static'.
    finetune_epochs: for 'qat'.
    learning_rate: QAT's peak learning rate; None keeps the source's.
    seed: QAT's shuffling seed; None keeps the source's training.seed.
    data_dir, models_dir, version, overwrite, on_epoch, extra_metadata: as
      for training.
  """
  _check_choice('--mode', mode, QUANTIZE_MODES)
  if bits not in quantize.BITS:
    raise DnnrError(f'--bits {bits} is not supported; choose 8 or 4.')
  if calibration_batches < 1:
    raise DnnrError(f'--calibration-batches {calibration_batches} must be at least 1.')
  if mode == 'qat' and finetune_epochs < 1:
    raise DnnrError(f'--mode qat fine-tunes with fake quantization: --finetune-epochs '
                    f'{finetune_epochs} must be at least 1.')
  source, out_path, version = _prepare(path, 'quantized', models_dir, version, overwrite)
  if _is_quantized(source):
    raise DnnrError(f'{source.path} is already quantized; quantize a final or pruned model.')
  config = _finetune_config(source, finetune_epochs, learning_rate, seed)
  dataset = load_dataset(source.config.data, data_dir)  # After every cheap check.
  params = source.variables['params']
  settings: dict[str, Any] = {'mode': mode, 'bits': bits, 'per_channel': per_channel}
  variables = dict(source.variables)
  if mode == 'qat':
    model = model_from_config(config)

    def fake_quantized_apply(variables, inputs):
      return model.apply({**variables, 'params': qat.fake_quantize_params(
          variables['params'], bits=bits, per_channel=per_channel)}, inputs)

    # A pruned source keeps its zeros: its exact zeros are its mask.
    zeros = prune.zero_masks(params)
    wrap = (lambda tx: gradual.keep_masked(tx, zeros)) if zeros is not None else None
    params = fit(config, dataset, on_epoch=on_epoch, params=params,
                 apply_fn=fake_quantized_apply, wrap_optimizer=wrap).state.params
    settings['finetune_epochs'] = finetune_epochs
  if mode == 'static':
    batch_size = config.training.batch_size
    available = dataset.train.labels.shape[0] // batch_size
    if calibration_batches > available:
      raise DnnrError(
          f'--calibration-batches {calibration_batches} exceeds the {available} training '
          f'batches of {batch_size} in {dataset.name}; choose at most {available}.')
    batches = [dataset.train.images[i * batch_size:(i + 1) * batch_size]
               for i in range(calibration_batches)]
    ranges = quantize.calibrate(
        lambda batch: dense_inputs(model_from_config(config.replace(
            routing=dataclasses.replace(config.routing, mode='per_sample'))),
            source.variables, batch),
        batches, method=calibration_method)
    variables['activation_scales'] = {
        name: {'input': value.scale()} for name, value in ranges.items()}
    settings['calibration'] = {
        'batches': calibration_batches, 'batch_size': batch_size,
        'method': calibration_method,
        'ranges': {name: [float(value.minimum), float(value.maximum)]
                   for name, value in ranges.items()}}
  # For QAT, `convert` is this call: the weights land on the trained grid.
  # The biases are rounded to float16 values, as the weight scales are: each
  # is then two bytes on disk, and moves by at most 2**-11 of itself.
  variables['params'] = quantize.float16_round(
      qat.convert(params, bits=bits, per_channel=per_channel))
  settings['bias_precision'] = 'float16'
  return _finish(source, out_path, 'quantized', version, config, variables, dataset,
                 settings, overwrite=overwrite, quantization={'mode': mode, 'bits': bits},
                 extra_metadata=extra_metadata)


def dense_inputs(model: nn.Module, variables: Any, inputs: jax.Array) -> dict[str, jax.Array]:
  """The input of every Dense layer of `model` on `inputs`, by layer name."""
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, Dense) and context.method_name == '__call__':
      captured[context.module.name] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    # An early-exit model runs every layer on every row in `joint`.
    model.apply(variables, inputs, method='joint' if hasattr(model, 'joint') else None)
  return captured


def route_report(source, model: nn.Module, variables: Any, dataset: Dataset) -> dict[str, Any]:
  """Route agreement with the source model and accuracy on each path (test split)."""
  images, labels = dataset.test
  apply = jax.jit(model.apply)
  logits, routes = (np.asarray(value) for value in apply(variables, images))
  _, source_routes = (np.asarray(value) for value in jax.jit(source.model.apply)(
      source.variables, images))
  correct = np.argmax(logits, -1) == np.asarray(labels)

  def accuracy(selected):
    return float(correct[selected].mean()) if selected.any() else None

  return {'route_agreement': float(np.mean(routes == source_routes)),
          'deep_accuracy': accuracy(routes), 'shallow_accuracy': accuracy(~routes)}


def _is_quantized(source) -> bool:
  return any(isinstance(leaf, quantize.QArray) for leaf in jax.tree.leaves(
      source.variables, is_leaf=lambda leaf: isinstance(leaf, quantize.QArray)))


def prune_as_configured(path: str | os.PathLike, settings: PruneConfig, **options):
  """`prune_checkpoint` with a config's `compress.prune` settings.

  `options` are the rest of its arguments (seed, data_dir, models_dir,
  version, ...).
  """
  return prune_checkpoint(
      path, method=settings.method, sparsity=settings.sparsity, schedule=settings.schedule,
      finetune_epochs=settings.finetune_epochs, n=settings.n, m=settings.m,
      learning_rate=settings.learning_rate, distill=settings.distill,
      temperature=settings.distill_temperature, **options)


def quantize_as_configured(path: str | os.PathLike, settings: QuantizeConfig, **options):
  """`quantize_checkpoint` with a config's `compress.quantize` settings (`source` aside)."""
  return quantize_checkpoint(
      path, mode=settings.mode, bits=settings.bits, per_channel=settings.per_channel,
      calibration_batches=settings.calibration_batches,
      calibration_method=settings.calibration_method,
      finetune_epochs=settings.finetune_epochs, learning_rate=settings.learning_rate,
      **options)


def _prepare(path, kind, models_dir, version, overwrite):
  """The source model, and the output path, checked to be free."""
  source = checkpoint_lib.load_model(path)
  models_dir = pathlib.Path(models_dir) if models_dir else source.path.parent.parent
  version = version or checkpoint_lib.next_version(models_dir, kind)
  out_path = checkpoint_lib.checkpoint_path(models_dir, kind, version)
  checkpoint_lib.ensure_writable(out_path, overwrite)
  return source, out_path, version


def _finetune_config(source, epochs: int, learning_rate: float | None = None,
                     seed: int | None = None) -> Config:
  """The source config, trained for `epochs` with its final thresholds fixed."""
  if learning_rate is not None and not learning_rate > 0:
    raise DnnrError(f'--learning-rate {learning_rate} must be a positive number.')
  if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
    raise DnnrError(f'--seed {seed!r} is not a non-negative integer; pass e.g. 1.')
  thresholds = {name: float(value) for name, value in source.variables['thresholds'].items()}
  config = source.config
  # An early-exit model's confidence threshold is held fixed outside the annealed ones.
  confidence = thresholds.pop('confidence', config.thresholds.confidence)
  values = ThresholdValues(**thresholds)
  return config.replace(
      thresholds=ThresholdsConfig(initial=values, final=values, annealing_start_epoch=0,
                                  total_epochs=None, confidence=confidence),
      training=dataclasses.replace(
          config.training, epochs=max(epochs, 1), checkpoint_every=0,
          learning_rate=learning_rate or config.training.learning_rate,
          seed=config.training.seed if seed is None else seed))


def _finish(source, out_path, kind, version, config, variables, dataset, settings, *,
            overwrite, quantization=None, extra_metadata=None):
  weight_only = bool(quantization) and quantization['mode'] == 'weight_only'
  model = model_from_config(config, weight_only=weight_only)
  batch_size = config.training.eval_batch_size
  before = evaluate(source.model, source.variables, dataset.test, batch_size)
  after = evaluate(model, variables, dataset.test, batch_size)
  arrays, _ = storage.encode_variables(variables)
  metadata = {
      'kind': kind, 'version': version, 'config': config.to_dict(),
      'num_features': source.num_features,
      'thresholds': {name: float(value) for name, value in variables['thresholds'].items()},
      'source': {'path': str(source.path), 'kind': source.metadata.get('kind'),
                 'version': source.metadata.get('version')},
      'compression': settings,
      'metrics': {'test': after, 'test_before': before},
      'routes': route_report(source, model, variables, dataset),
      'array_bytes': int(sum(leaf.nbytes for leaf in jax.tree.leaves(arrays))),
      'dataset': source.metadata.get('dataset'),
  }
  if quantization:
    metadata['quantization'] = quantization
  metadata.update(extra_metadata or {})
  saved = checkpoint_lib.save_checkpoint(out_path, variables, metadata, overwrite=overwrite)
  summary = {**metadata, 'path': str(saved), 'bytes': _bytes(saved),
             'source_bytes': _bytes(source.path), 'dense_float_bytes': _dense_float_bytes(source)}
  return saved, summary


def _dense_float_bytes(source) -> dict[str, Any]:
  """Bytes of the final (dense float32) checkpoint at the root of `source`'s lineage."""
  path, metadata = source.path, source.metadata
  while metadata.get('kind') != 'final' and 'source' in metadata:
    path = pathlib.Path(metadata['source']['path'])
    if not path.is_dir():
      break
    metadata = checkpoint_lib.read_metadata(path)
  return {'path': str(path), **_bytes(path)}


def _bytes(path) -> dict[str, int]:
  return {'raw': storage.directory_bytes(path), 'gzip': storage.gzip_bytes(path)}


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise DnnrError(f'{flag} {value!r} is not one of: {", ".join(choices)}.')

