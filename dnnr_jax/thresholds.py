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
import optax

from dnnr_jax.complexity import METRICS

Thresholds = dict[str, jax.Array]
ThresholdSchedule = Callable[[jax.Array | int], Thresholds]


def thresholds_from_values(values: Mapping[str, float] | object) -> Thresholds:
  """Builds the thresholds pytree from a mapping or an object with fields."""
  if not isinstance(values, Mapping):
    values = {name: getattr(values, name) for name in METRICS}
  return {name: jnp.asarray(values[name], jnp.float32) for name in METRICS}


def linear_annealing(
    initial: Thresholds,
    final: Thresholds,
    start_epoch: int,
    total_epochs: int,
) -> ThresholdSchedule:
  """The original `HybridThresholds` schedule, generalised to any end point.

  Each threshold follows `optax.linear_schedule` from its `initial` to its
  `final` value over epochs [start_epoch, total_epochs]. With `final` all
  zero this is the original's `t * (1 - progress)`, progress = (epoch -
  start) / (total - start).

  Args:
    initial: thresholds before `start_epoch`.
    final: thresholds from `total_epochs` on.
    start_epoch: first epoch whose thresholds move.
    total_epochs: epoch at which `final` is reached; at or before
      `start_epoch`, the thresholds jump to `final` at `start_epoch`.

  Returns:
    `epoch -> thresholds`, traceable under `jax.jit`.
  """
  span = total_epochs - start_epoch
  if span <= 0:  # optax would hold `initial` forever here; the original jumps.
    def step(epoch: jax.Array | int) -> Thresholds:
      reached = jnp.asarray(epoch) >= start_epoch
      return jax.tree.map(lambda start, end: jnp.where(reached, end, start), initial, final)

    return step
  schedules = jax.tree.map(
      lambda start, end: optax.linear_schedule(start, end, span, start_epoch), initial, final)
  return lambda epoch: jax.tree.map(lambda schedule: schedule(epoch), schedules)


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
