"""Hybrid thresholds: explicit state and the traced annealing schedule.

Thresholds are a pytree `{'variance': [], 'entropy': [], 'sparsity': []}` of
float32 scalars; an early-exit model adds 'confidence' (the confidence
router's threshold, held fixed while training). They live in the model
variables (collection 'thresholds') and in the train state, so they are
saved in every checkpoint and used by evaluation and export.

The schedule is a function of a traced epoch count (optax style): a new epoch
changes a value, never a shape, so nothing recompiles.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from dnnr_jax.complexity import METRICS

Thresholds = dict[str, jax.Array]
ThresholdSchedule = Callable[[jax.Array | int], Thresholds]


def thresholds_from_values(values: Mapping[str, float] | object) -> Thresholds:
  """Builds the thresholds pytree from a mapping or an object with fields."""
  if not isinstance(values, Mapping):
    values = {name: getattr(values, name) for name in METRICS}
  return {name: jnp.asarray(values[name], jnp.float32) for name in METRICS}


def annealing_progress(
    epoch: jax.Array | int, start_epoch: int, total_epochs: int
) -> jax.Array:
  """Fraction of annealing done at `epoch`: 0 until `start_epoch`, 1 from
  `total_epochs` on, linear between.
  """
  epoch = jnp.asarray(epoch, jnp.float32)
  span = max(total_epochs - start_epoch, 0)
  if span == 0:
    return (epoch >= start_epoch).astype(jnp.float32)
  return jnp.clip((epoch - start_epoch) / span, 0.0, 1.0)


def linear_annealing(
    initial: Thresholds,
    final: Thresholds,
    start_epoch: int,
    total_epochs: int,
) -> ThresholdSchedule:
  """The original `HybridThresholds` schedule, generalised to any end point.

  With `final` all zero this is the original's `t * (1 - progress)`,
  progress = (epoch - start) / (total - start).

  Args:
    initial: thresholds before `start_epoch`.
    final: thresholds from `total_epochs` on.
    start_epoch: first epoch whose thresholds move.
    total_epochs: epoch at which `final` is reached.

  Returns:
    `epoch -> thresholds`, traceable under `jax.jit`.
  """
  def schedule(epoch: jax.Array | int) -> Thresholds:
    progress = annealing_progress(epoch, start_epoch, total_epochs)
    return jax.tree.map(
        lambda start, end: start + (end - start) * progress, initial, final)

  return schedule


def schedule_from_config(config) -> ThresholdSchedule:
  """The schedule a `Config` describes (with a fixed 'confidence' for early exits)."""
  initial = thresholds_from_values(config.thresholds.initial)
  final = thresholds_from_values(config.thresholds.final)
  if config.model.family == 'early_exit':
    confidence = jnp.asarray(config.thresholds.confidence, jnp.float32)
    initial, final = {**initial, 'confidence': confidence}, {**final, 'confidence': confidence}
  return linear_annealing(
      initial, final, config.thresholds.annealing_start_epoch, config.annealing_total_epochs)


def thresholds_to_floats(thresholds: Thresholds) -> dict[str, float]:
  """Plain floats, for metadata and reports."""
  return {name: float(value) for name, value in thresholds.items()}
