"""The `dnnr prune` and `dnnr quantize` jobs: checkpoint in, smaller checkpoint out.

Each job loads a dnnr_jax checkpoint, transforms its params pytree as one
settings object says (`PruneConfig`, `QuantizeConfig`: a config's
`compress.prune` and `compress.quantize` sections), fine-tunes where asked
(with the checkpoint's thresholds held fixed), evaluates before and after on
the test and validation splits (the accuracy guard, `jobs.guard`), and
writes a versioned Orbax checkpoint under `<models>/pruned/` or
`<models>/quantized/` whose metadata records the source, the settings,
sparsity per layer, bits, calibration, accuracy before and after, the
validation drop, route agreement and bytes. Each returns a typed result (`PruneResult`,
`QuantizeResult`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dnnr_jax import parallel
from dnnr_jax.augment import Shift
from dnnr_jax.compress import gradual, linen_quant, prune, quantize, structured
from dnnr_jax.compress.rules import Rule
from dnnr_jax.config import (
  CompressConfig,
  Config,
  PruneConfig,
  QuantizeConfig,
  ThresholdsConfig,
  ThresholdValues,
)
from dnnr_jax.errors import DnnrError
from dnnr_jax.io import checkpoint as checkpoint_lib
from dnnr_jax.io import durable, storage
from dnnr_jax.io.data import Dataset, load_dataset
from dnnr_jax.jobs import guard
from dnnr_jax.jobs.fit import EpochCallback, fit
from dnnr_jax.jobs.results import CompressResult as CompressResult  # Re-exported.
from dnnr_jax.jobs.results import Footprint, PruneResult, QuantizeResult
from dnnr_jax.model import EarlyExitMLP, every_layer, model_from_config, quantization_rules
from dnnr_jax.train import Teacher, evaluate, routed_logits

DEFAULT_PRUNE = PruneConfig()
DEFAULT_QUANTIZE = QuantizeConfig()
DEFAULT_MAX_DROP = CompressConfig().max_drop
# Pruning method -> (scope of the cut, score): LAMP is one global cut on per-layer scores.
METHOD_SCORES = {'global': ('global', 'magnitude'), 'layer': ('layer', 'magnitude'),
                 'lamp': ('global', 'lamp')}


@durable.holding_locks
def prune_checkpoint(
    path: str | os.PathLike, settings: PruneConfig = DEFAULT_PRUNE, *,
    seed: int | None = None, data_dir=None, models_dir=None, version: str | None = None,
    overwrite: bool = False, on_epoch: EpochCallback | None = None,
    extra_metadata: dict[str, Any] | None = None, max_drop: float | None = DEFAULT_MAX_DROP,
) -> PruneResult:
  """Prunes a checkpoint and writes `<models>/pruned/pruned_model_v{version}`.

  Args:
    path: the source checkpoint (final or another pruned one).
    settings: method, sparsity, schedule, fine-tuning, distillation and
      augmentation (see `PruneConfig`); checked with `settings.validate()`
      before any work. With `distill`, the source model as it is teaches the
      pruned one (see `train.Teacher`); with `augment_shift`, both see the
      same randomly shifted images (`augment.Shift`).
    seed: fine-tuning's shuffling seed; None keeps the source's training.seed.
    data_dir, models_dir, version, overwrite, on_epoch, extra_metadata: as
      for training.
    max_drop: the accuracy guard (`compress.max_drop`): percentage points
      of validation accuracy the result may lose; more warns
      (`AccuracyWarning`) and records `over_budget`. None: report only.

  Returns:
    The new checkpoint, what its metadata records, and bytes on disk.

  Raises:
    DnnrError: bad settings (`ConfigError`), a quantized or missing source,
      a version that exists without `overwrite`.
  """
  settings.validate()
  guard.check(max_drop)
  source, out_path, version = _prepare(path, 'pruned', models_dir, version, overwrite)
  if _is_quantized(source):
    raise DnnrError(f'{source.path} is quantized; prune a final or pruned model, '
                    'then quantize the result.')
  config = _finetune_config(source, settings.finetune_epochs, settings.learning_rate, seed)
  dataset = load_dataset(source.config.data, data_dir)  # After every cheap check.
  recorded: dict[str, Any] = {
      'method': settings.method, 'sparsity': settings.sparsity, 'schedule': settings.schedule,
      'finetune_epochs': settings.finetune_epochs,
      'learning_rate': config.training.learning_rate}
  state_options: dict[str, Any] = {}
  if settings.distill:
    state_options['teacher'] = Teacher(source.variables, source.model.apply, settings.distill,
                                       settings.distill_temperature)
    recorded.update(distill=settings.distill, temperature=settings.distill_temperature)
  if settings.augment_shift:
    state_options['augment'] = _shift(source, settings.augment_shift,
                                      'compress.prune.augment_shift')
    recorded['augment_shift'] = settings.augment_shift
  params, config, state_options['wrap_optimizer'], plan = _pruning_plan(
      source.variables['params'], settings, config, dataset)
  recorded.update(plan)
  if settings.finetune_epochs > 0:
    params = fit(config, dataset, on_epoch=on_epoch, params=params,
                 **state_options).state.params
  variables = {**source.variables, 'params': params}
  recorded['sparsity_report'] = prune.sparsity_report(params)
  return _finish(PruneResult, source, out_path, version, config, variables, dataset, recorded,
                 overwrite=overwrite, extra_metadata=extra_metadata, max_drop=max_drop,
                 sparsity_report=recorded['sparsity_report'])


def _pruning_plan(
    params: Any, settings: PruneConfig, config: Config, dataset: Dataset,
) -> tuple[Any, Config, Callable[[optax.GradientTransformation], Any] | None, dict[str, Any]]:
  """How `settings` prune `params`: (params to fine-tune, config, optimizer wrapper, record).

  Structured pruning shrinks the model (and its config) once; 'gradual'
  prunes during fine-tuning on Zhu & Gupta's cubic schedule; one-shot
  pruning masks once and fine-tunes with the mask fixed.
  """
  if settings.method == 'structured':
    params, model_config, kept = structured.prune_units(params, config.model, settings.sparsity)
    return (params, config.replace(model=model_config), None,
            {'kept_units': {name: len(units) for name, units in kept.items()}})
  if settings.schedule == 'gradual':
    steps_per_epoch = dataset.train.labels.shape[0] // config.training.batch_size
    steps = settings.finetune_epochs * steps_per_epoch
    end_step = gradual.pruning_end_step(steps, steps_per_epoch, settings.gradual_end)
    if settings.finetune_epochs < 2:
      guard.accuracy_warning(
          f'gradual pruning with compress.prune.finetune_epochs = {settings.finetune_epochs} '
          'prunes at once, since a whole epoch at the final sparsity is kept to recover; '
          'give it at least 2 epochs to prune gradually (more for high sparsities).')
    schedule = gradual.cubic_sparsity_schedule(
        0.0, settings.sparsity, begin_step=0, end_step=end_step)
    scope, score = METHOD_SCORES[settings.method]
    pruner = prune.magnitude_pruner(schedule, scope=scope, score=score)
    update_every = max(1, steps // settings.mask_updates)
    return params, config, lambda tx: gradual.pruning(tx, pruner, update_every=update_every), {
        'pruning_end_step': end_step, 'finetune_steps': steps}
  if settings.method == 'nm':
    masks, plan = prune.nm_masks(params, settings.n, settings.m), {'n': settings.n, 'm': settings.m}
  else:
    scope, score = METHOD_SCORES[settings.method]
    masks, plan = prune.magnitude_masks(params, settings.sparsity, scope=scope, score=score), {}
  return (prune.apply_masks(params, masks), config,
          lambda tx: gradual.keep_masked(tx, masks), plan)


@durable.holding_locks
def quantize_checkpoint(
    path: str | os.PathLike, settings: QuantizeConfig = DEFAULT_QUANTIZE, *,
    seed: int | None = None, data_dir=None, models_dir=None, version: str | None = None,
    overwrite: bool = False, on_epoch: EpochCallback | None = None,
    extra_metadata: dict[str, Any] | None = None, max_drop: float | None = DEFAULT_MAX_DROP,
) -> QuantizeResult:
  """Quantizes a checkpoint's kernels; writes `<models>/quantized/quantized_model_v{version}`.

  The weight scales and the biases are rounded to float16 values (the scales
  upwards), so each is stored in two bytes, exactly.

  Args:
    path: the source checkpoint (final or pruned; pruned zeros stay zero).
    settings: the mode ('weight_only': integer weights, float compute;
      'dynamic': integer matmuls with per-row activation scales; 'static':
      integer matmuls at activation scales calibrated on
      `calibration_batches` training batches; 'qat': fine-tune with fake
      quantization, then convert, dynamic compute), bits, scales, QAT's
      epochs and rate (see `QuantizeConfig`; `source` is the pipeline's and
      is not used here). Checked with `settings.validate()` first.
    seed: QAT's shuffling seed; None keeps the source's training.seed.
    data_dir, models_dir, version, overwrite, on_epoch, extra_metadata,
      max_drop: as for `prune_checkpoint`.

  Returns:
    The new checkpoint, what its metadata records, and bytes on disk.
  """
  settings.validate()
  guard.check(max_drop)
  source, out_path, version = _prepare(path, 'quantized', models_dir, version, overwrite)
  if _is_quantized(source):
    raise DnnrError(f'{source.path} is already quantized; quantize a final or pruned model.')
  config = _finetune_config(source, settings.finetune_epochs, settings.learning_rate, seed)
  dataset = load_dataset(source.config.data, data_dir)  # After every cheap check.
  # One rule for every Dense layer; QAT's deploys as 'dynamic'.
  rules = quantization_rules(settings.mode, settings.bits, settings.per_channel,
                             settings.activations)
  params = source.variables['params']
  recorded: dict[str, Any] = {
      'mode': settings.mode, 'bits': settings.bits, 'per_channel': settings.per_channel}
  variables = dict(source.variables)
  if settings.mode == 'qat':
    params = _quantization_aware_training(config, dataset, source, settings, on_epoch, recorded)
    recorded['finetune_epochs'] = settings.finetune_epochs
  if settings.mode == 'static':
    variables['activation_scales'], recorded['calibration'] = _calibrate(
        source, config, dataset, settings, rules)
  # For QAT this is the conversion: the weights land on the trained grid.
  # The biases are rounded to float16 values, as the weight scales are: each
  # is then two bytes on disk, and moves by at most 2**-11 of itself.
  model, method = every_layer(model_from_config(config))
  variables['params'] = quantize.float16_round(linen_quant.quantize_linen(
      model, params, rules, jnp.zeros((1, source.num_features), jnp.float32),
      collections={'thresholds': variables['thresholds']}, method=method))
  recorded['bias_precision'] = 'float16'
  return _finish(QuantizeResult, source, out_path, version, config, variables, dataset,
                 recorded, overwrite=overwrite, extra_metadata=extra_metadata,
                 max_drop=max_drop, quantization=_quantization_metadata(settings))


def _quantization_metadata(settings: QuantizeConfig) -> dict[str, Any]:
  """The metadata's 'quantization': mode and bits, and the activations when not per row
  (so checkpoints that predate the setting read back alike)."""
  recorded = {'mode': settings.mode, 'bits': settings.bits}
  if settings.activations != 'per_row':
    recorded['activations'] = settings.activations
  return recorded


def _quantization_aware_training(config, dataset, source, settings, on_epoch, recorded):
  """The params fine-tuned under fake quantization (a pruned source keeps its zeros).

  An early-exit model trains both exits jointly, as in training (its `joint`).
  With `settings.distill`, the dense float model at the root of the source's
  lineage teaches; with `settings.augment_shift`, images are shifted at
  random. Both are noted in `recorded`.
  """
  params = source.variables['params']
  state_options: dict[str, Any] = {}
  if settings.distill:
    root = checkpoint_lib.load_model(_dense_float_path(source))
    state_options['teacher'] = Teacher(root.variables, root.model.apply, settings.distill,
                                       settings.distill_temperature)
    recorded.update(distill=settings.distill, temperature=settings.distill_temperature,
                    teacher=str(root.path))
  if settings.augment_shift:
    state_options['augment'] = _shift(source, settings.augment_shift,
                                      'compress.quantize.augment_shift')
    recorded['augment_shift'] = settings.augment_shift
  fake_quantized = model_from_config(config, quantization=(
      Rule('.*', mode='qat', bits=settings.bits, per_channel=settings.per_channel),))
  method = 'joint' if isinstance(fake_quantized, EarlyExitMLP) else None

  def fake_quantized_apply(variables, inputs):
    return fake_quantized.apply(variables, inputs, method=method)

  # A pruned source's exact zeros are its mask.
  zeros = prune.zero_masks(params)
  wrap = (lambda tx: gradual.keep_masked(tx, zeros)) if zeros is not None else None
  return fit(config, dataset, on_epoch=on_epoch, params=params,
             apply_fn=fake_quantized_apply, wrap_optimizer=wrap, **state_options).state.params


def _calibrate(source, config: Config, dataset: Dataset, settings: QuantizeConfig, rules):
  """Static activation scales of every Dense input, and what to record of them."""
  batch_size = config.training.batch_size
  available = dataset.train.labels.shape[0] // batch_size
  if settings.calibration_batches > available:
    raise DnnrError(
        f'compress.quantize.calibration_batches = {settings.calibration_batches} exceeds the '
        f'{available} training batches of {batch_size} in {dataset.name}; choose at most '
        f'{available}.')
  batches = [dataset.train.images[i * batch_size:(i + 1) * batch_size]
             for i in range(settings.calibration_batches)]
  model, method = every_layer(model_from_config(config))
  ranges = linen_quant.calibrate_ranges_linen(
      model, source.variables['params'], rules, batches,
      collections={'thresholds': source.variables['thresholds']}, apply_method=method,
      method=settings.calibration_method)
  scales = {name: {'input': value.scale()} for name, value in ranges.items()}
  return scales, {
      'batches': settings.calibration_batches, 'batch_size': batch_size,
      'method': settings.calibration_method,
      'ranges': {name: [float(value.minimum), float(value.maximum)]
                 for name, value in ranges.items()}}


def route_report(source, model: nn.Module, variables: Any, dataset: Dataset) -> dict[str, Any]:
  """Route agreement with the source model and accuracy on each path (test split)."""
  images, labels = dataset.test
  logits, routes = (np.asarray(value) for value in routed_logits(model, variables, images))
  _, source_routes = (np.asarray(value) for value in routed_logits(
      source.model, source.variables, images))
  correct = np.argmax(logits, -1) == np.asarray(labels)

  def accuracy(selected):
    return float(correct[selected].mean()) if selected.any() else None

  return {'route_agreement': float(np.mean(routes == source_routes)),
          'deep_accuracy': accuracy(routes), 'shallow_accuracy': accuracy(~routes)}


def _shift(source, max_shift: int, key: str) -> Shift:
  """The random shift of fine-tuning's images, for the source's data; `key` names the setting."""
  return Shift.for_data(max_shift, source.num_features, source.config.data.mean,
                        source.config.data.std, name=key)


def _is_quantized(source) -> bool:
  return any(quantize.is_qarray(leaf) for leaf in jax.tree.leaves(
      source.variables, is_leaf=quantize.is_qarray))


def _prepare(path, kind, models_dir, version, overwrite):
  """The source model, and the output path, checked to be free and locked for this job."""
  source = checkpoint_lib.load_model(path)
  models_dir = pathlib.Path(models_dir) if models_dir else source.path.parent.parent
  version = version or checkpoint_lib.next_version(models_dir, kind)
  out_path = checkpoint_lib.checkpoint_path(models_dir, kind, version).absolute()
  if out_path == source.path:
    raise DnnrError(f'{out_path} would replace its own source; write the result under '
                    'another version.')
  durable.acquire(out_path)  # Released when the job returns or raises.
  durable.recover(out_path)
  checkpoint_lib.ensure_writable(out_path, overwrite)
  return source, out_path, version


def _finetune_config(source, epochs: int, learning_rate: float | None = None,
                     seed: int | None = None) -> Config:
  """The source config, trained for `epochs` with its final thresholds fixed."""
  if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
    raise DnnrError(f'seed = {seed!r} is not a non-negative integer; pass e.g. seed=1.')
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
          seed=config.training.seed if seed is None else seed,
          mesh=parallel.within_reach(config.training.mesh)))


def _finish(result_type, source, out_path, version, config, variables, dataset, recorded, *,
            overwrite, max_drop, extra_metadata=None, quantization=None, **fields):
  """Evaluates, saves and measures the new checkpoint; its `result_type`."""
  rules = (quantization_rules(quantization['mode'], quantization['bits'], recorded['per_channel'],
                              quantization.get('activations', 'per_row'))
           if quantization else ())
  model = model_from_config(config, quantization=rules)
  batch_size = config.training.eval_batch_size
  before = evaluate(source.model, source.variables, dataset.test, batch_size)
  after = evaluate(model, variables, dataset.test, batch_size)
  metrics = {'test': after, 'test_before': before}
  if dataset.validation is not None:
    metrics['validation_before'] = evaluate(source.model, source.variables, dataset.validation,
                                            batch_size)
    metrics['validation'] = evaluate(model, variables, dataset.validation, batch_size)
  verdict = guard.accuracy_guard(metrics, max_drop)
  arrays, _ = storage.encode_variables(variables)
  metadata = {
      'kind': result_type.KIND, 'version': version,
      'config': config.to_dict(), 'num_features': source.num_features,
      'thresholds': {name: float(value) for name, value in variables['thresholds'].items()},
      'source': {'path': str(source.path), 'kind': source.metadata.get('kind'),
                 'version': source.metadata.get('version')},
      'compression': recorded,
      'metrics': metrics,
      'accuracy_guard': verdict,
      'routes': route_report(source, model, variables, dataset),
      'array_bytes': int(sum(leaf.nbytes for leaf in jax.tree.leaves(arrays))),
      'dataset': source.metadata.get('dataset'),
  }
  if quantization:
    metadata['quantization'] = quantization
  metadata.update(extra_metadata or {})
  saved = checkpoint_lib.save_checkpoint(out_path, variables, metadata, overwrite=overwrite)
  guard.warn(verdict, saved, result_type.KIND, recorded)
  dense_path = _dense_float_path(source)
  return result_type(path=saved, metadata=metadata, size=Footprint.of(saved),
                     source_size=Footprint.of(source.path), dense_float_path=dense_path,
                     dense_float_size=Footprint.of(dense_path), **fields)


def _dense_float_path(source) -> pathlib.Path:
  """The final (dense float32) checkpoint at the root of `source`'s lineage."""
  return checkpoint_lib.lineage_root(source.path, source.metadata)


