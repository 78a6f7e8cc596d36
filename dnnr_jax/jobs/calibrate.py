"""The `dnnr calibrate` job: thresholds that meet a compute budget, chosen on validation.

As MSDNet's budgeted classification: the router's score is computed for every
validation example, and the threshold is the quantile of the scores that
sends the wanted fraction deep. The budget is a target mean compute per
sample, as a fraction of the same model run always-deep (`--target compute`,
the default), or a target fraction of samples on the deep route
(`--target deep_fraction`). Test data is never read.

The confidence router's score is the exit's largest softmax probability
(deep iff below the threshold). The complexity router keeps its entropy and
sparsity thresholds and moves the variance threshold (deep iff all three
tests hold), so it can send at most the examples that pass the other two.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dnnr_jax.complexity import batch_complexity
from dnnr_jax.config import ROUTERS, Config, check_calibration
from dnnr_jax.cost import RouteCost, route_cost
from dnnr_jax.errors import DnnrError
from dnnr_jax.io import checkpoint as checkpoint_lib
from dnnr_jax.io.data import load_dataset
from dnnr_jax.model import EarlyExitMLP, model_from_config
from dnnr_jax.routing import confidence
from dnnr_jax.train import evaluate

# The confidence threshold that sends every sample deep (a probability is at most 1).
ALL_DEEP_CONFIDENCE = 2.0
_DROPPED_METADATA = ('format', 'format_version', 'created', 'library_versions', 'layout',
                     'history', 'metrics', 'routes', 'calibration')


@dataclasses.dataclass(frozen=True)
class CalibrateResult:
  """What `calibrate_checkpoint` wrote and measured.

  Attributes:
    path: the calibrated checkpoint.
    metadata: its metadata as saved; 'calibration' holds the budget, target,
      router, chosen thresholds and the validation figures.
  """
  path: pathlib.Path
  metadata: dict[str, Any]

  @property
  def calibration(self) -> dict[str, Any]:
    return self.metadata['calibration']

  @property
  def thresholds(self) -> dict[str, float]:
    """The chosen thresholds, by name."""
    return self.calibration['thresholds']

  @property
  def validation(self) -> dict[str, Any]:
    """Accuracy, deep fraction and compute fraction on validation (`summarise`)."""
    return self.calibration['validation']

  def to_dict(self) -> dict[str, Any]:
    """The job's JSON summary: the metadata plus path (`dnnr calibrate --json` prints it)."""
    return {**self.metadata, 'path': str(self.path)}


@dataclasses.dataclass(frozen=True)
class RouterScores:
  """What the routers see on a split, and what each exit predicts.

  Attributes:
    confidence: float32 [N], the exit's largest softmax probability.
    complexity: float32 [N] per metric ('variance', 'entropy', 'sparsity').
    exit_correct: bool [N], the exit's prediction is right.
    deep_correct: bool [N], the head's prediction is right.
  """
  confidence: np.ndarray
  complexity: dict[str, np.ndarray]
  exit_correct: np.ndarray
  deep_correct: np.ndarray


def router_scores(model: EarlyExitMLP, variables: Any, images, labels,
                  batch_size: int = 1000) -> RouterScores:
  """Both exits and every router score on all of `images` [N, F]."""
  outputs = [_scores(model, variables, images[start:start + batch_size])
             for start in range(0, images.shape[0], batch_size)]
  head, exit_logits, conf, metrics = (
      jax.tree.map(lambda *parts: np.concatenate(parts), *[o[i] for o in outputs])
      for i in range(4))
  labels = np.asarray(labels)
  return RouterScores(conf, metrics, np.argmax(exit_logits, -1) == labels,
                      np.argmax(head, -1) == labels)


@functools.partial(jax.jit, static_argnums=0)
def _scores(model: EarlyExitMLP, variables, images):
  head, _, exit_logits = model.apply(variables, images, method=EarlyExitMLP.joint)
  return head, exit_logits, confidence(exit_logits), batch_complexity(images)


def routes(router: str, thresholds: dict[str, float], scores: RouterScores) -> np.ndarray:
  """The per-sample routes (True = deep) that `thresholds` give, in numpy."""
  if router == 'confidence':
    return scores.confidence < np.float32(thresholds['confidence'])
  metrics = scores.complexity
  return ((metrics['variance'] > np.float32(thresholds['variance']))
          & (metrics['entropy'] > np.float32(thresholds['entropy']))
          & (metrics['sparsity'] < np.float32(thresholds['sparsity'])))


def choose_thresholds(router: str, thresholds: dict[str, float], scores: RouterScores,
                      deep_fraction: float) -> dict[str, float]:
  """Thresholds that send about `deep_fraction` of the scored examples deep.

  The quantile of the router's score: exact up to ties between scores (and,
  for the complexity router, up to the examples the other two tests admit).
  """
  thresholds = dict(thresholds)
  count = int(round(np.clip(deep_fraction, 0.0, 1.0) * scores.confidence.shape[0]))
  if router == 'confidence':
    ordered = np.sort(scores.confidence)
    if count == 0:
      thresholds['confidence'] = 0.0  # A probability is never below 0.
    elif count >= ordered.size:
      thresholds['confidence'] = ALL_DEEP_CONFIDENCE
    else:
      thresholds['confidence'] = _between(ordered, count)
    return thresholds
  metrics = scores.complexity
  eligible = ((metrics['entropy'] > np.float32(thresholds['entropy']))
              & (metrics['sparsity'] < np.float32(thresholds['sparsity'])))
  variance = np.sort(metrics['variance'][eligible])[::-1]
  if count >= variance.size:
    thresholds['variance'] = float(np.min(metrics['variance'])) - 1.0
  elif count == 0:
    thresholds['variance'] = float(np.max(metrics['variance'])) + 1.0
  else:
    thresholds['variance'] = _between(variance, count)
  return thresholds


def _between(ordered: np.ndarray, count: int) -> float:
  """Halfway between `ordered[count - 1]` and `ordered[count]` (count >= 1).

  No example then sits on the threshold, where float rounding in another
  engine (onnxruntime) could route it the other way.
  """
  return float((np.float64(ordered[count - 1]) + np.float64(ordered[count])) / 2)


def summarise(router: str, thresholds: dict[str, float], scores: RouterScores,
              cost: RouteCost | None) -> dict[str, Any]:
  """Deep fraction, compute fraction, accuracy overall and on each route.

  Without a `cost` (an 'original' model, whose routes cost the same) the
  compute entries are None.
  """
  deep = routes(router, thresholds, scores)
  correct = np.where(deep, scores.deep_correct, scores.exit_correct)
  deep_fraction = float(np.mean(deep))
  return {
      'accuracy': float(np.mean(correct)),
      'deep_fraction': deep_fraction,
      'compute_fraction': cost.mean(deep_fraction) / cost.always_deep if cost else None,
      'multiply_adds_per_sample': cost.mean(deep_fraction) if cost else None,
      'deep_accuracy': float(np.mean(correct[deep])) if deep.any() else None,
      'exit_accuracy': float(np.mean(correct[~deep])) if (~deep).any() else None,
      'always_deep_accuracy': float(np.mean(scores.deep_correct)),
  }


def calibrate_checkpoint(
    path: str | os.PathLike, *, budget: float, router: str | None = None,
    target: str = 'compute', data_dir=None, models_dir=None, version: str | None = None,
    overwrite: bool = False,
) -> CalibrateResult:
  """Chooses thresholds for `budget` on the validation split; writes a calibrated version.

  Args:
    path: an early-exit checkpoint (final, pruned or quantized); an 'original'
      one only with target 'deep_fraction' and the complexity router.
    budget: in (0, 1]: the target mean multiply-adds per sample as a fraction
      of always-deep ('compute'), or the target deep fraction.
    router: 'complexity' or 'confidence'; None keeps the checkpoint's.
    target: 'compute' or 'deep_fraction'.
    data_dir, models_dir, version, overwrite: as for the compress jobs; the
      new version goes to `<models>/calibrated/calibrated_model_v{version}`.

  Returns:
    The written checkpoint and its metadata (with 'calibration': budget,
    chosen thresholds, and on validation the compute, deep fraction and
    accuracy).
  """
  check_calibration(budget, router or ROUTERS[0], target)  # Before any loading.
  source = checkpoint_lib.load_model(path)
  router = source.config.routing.router if router is None else router
  config = _calibrated_config(source.config, router, target)
  models_dir = pathlib.Path(models_dir) if models_dir else source.path.parent.parent
  version = version or checkpoint_lib.next_version(models_dir, 'calibrated')
  out_path = checkpoint_lib.checkpoint_path(models_dir, 'calibrated', version)
  checkpoint_lib.ensure_writable(out_path, overwrite)
  model = model_from_config(config, quantization=source.model.quantization)
  dataset = load_dataset(config.data, data_dir)
  validation = dataset.validation
  # Both routes of the original cost the same: it has no compute to budget.
  cost = route_cost(model, source.num_features) if isinstance(model, EarlyExitMLP) else None
  deep_fraction = budget if target == 'deep_fraction' else cost.deep_fraction_for(budget)
  if deep_fraction < 0:
    raise DnnrError(
        f'budget {budget} is below what the exit alone costs ({cost.cheap / cost.always_deep:.3f}'
        ' of always-deep); pass a larger budget.')
  early_exit = model.clone(routing='per_sample', router=router) if isinstance(
      model, EarlyExitMLP) else None
  thresholds = {name: float(value) for name, value in source.variables['thresholds'].items()}
  if early_exit is not None:
    scores = router_scores(early_exit, source.variables, validation.images, validation.labels)
  else:
    scores = _original_scores(source, validation)
  chosen = choose_thresholds(router, thresholds, scores, min(deep_fraction, 1.0))
  variables = {**source.variables,
               'thresholds': {name: jnp.float32(value) for name, value in chosen.items()}}
  measured = evaluate(model, variables, validation, config.training.eval_batch_size)
  if 'confidence' in chosen:
    config = config.replace(thresholds=dataclasses.replace(
        config.thresholds, confidence=chosen['confidence']))
  calibration = {
      'budget': budget, 'target': target, 'router': router,
      'target_deep_fraction': min(max(deep_fraction, 0.0), 1.0),
      'thresholds': chosen,
      'multiply_adds': (dataclasses.asdict(cost) | {'always_deep': cost.always_deep}
                        if cost else None),
      'validation': summarise(router, chosen, scores, cost),
  }
  metadata = {key: value for key, value in source.metadata.items()
              if key not in _DROPPED_METADATA}
  metadata.update({
      'kind': 'calibrated', 'version': version, 'config': config.to_dict(),
      'thresholds': chosen, 'calibration': calibration,
      'metrics': {'validation': measured},
      'source': {'path': str(source.path), 'kind': source.metadata.get('kind'),
                 'version': source.metadata.get('version')},
  })
  saved = checkpoint_lib.save_checkpoint(out_path, variables, metadata, overwrite=overwrite)
  return CalibrateResult(saved, metadata)


def _calibrated_config(config: Config, router: str, target: str) -> Config:
  """The source config with `router`, after the checks that need no data."""
  if config.data.validation_size == 0:
    raise DnnrError(
        'the model was trained without a validation split (data.validation_size = 0), and '
        'thresholds are chosen on validation only; retrain with data.validation_size > 0.')
  if config.model.family != 'early_exit' and (router != 'complexity' or target != 'deep_fraction'):
    raise DnnrError(
        "a model of family 'original' costs the same on both routes; calibrate it with router "
        "'complexity' and target 'deep_fraction', or train model.family 'early_exit'.")
  return config.replace(routing=dataclasses.replace(config.routing, router=router,
                                                    mode='per_sample'))


def _original_scores(source, split) -> RouterScores:
  """Complexity scores of an 'original' model (its routes differ only in accuracy)."""
  deep_model = source.model.clone(routing='deep')
  shallow_model = source.model.clone(routing='shallow')
  labels = np.asarray(split.labels)
  deep = np.argmax(np.asarray(jax.jit(deep_model.apply)(source.variables, split.images)[0]), -1)
  shallow = np.argmax(np.asarray(
      jax.jit(shallow_model.apply)(source.variables, split.images)[0]), -1)
  metrics = jax.tree.map(np.asarray, jax.jit(batch_complexity)(split.images))
  return RouterScores(np.zeros(labels.shape, np.float32), metrics, shallow == labels,
                      deep == labels)
