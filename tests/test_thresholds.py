"""The annealing schedule: values at chosen epochs, no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnnr_jax import thresholds as thresholds_lib
from dnnr_jax.config import Config, ThresholdsConfig, ThresholdValues, TrainingConfig

INITIAL = {'variance': 0.5, 'entropy': 2.0, 'sparsity': 0.4}


def _original(epoch, start, total):
  """HybridThresholds.anneal_thresholds of the original, per metric."""
  if epoch < start:
    return dict(INITIAL)
  progress = (epoch - start) / (total - start)
  return {name: value * (1 - progress) for name, value in INITIAL.items()}


@pytest.mark.parametrize('epoch', [0, 4, 5, 6, 10, 14, 15])
def test_zero_final_reproduces_the_original(epoch):
  schedule = thresholds_lib.linear_annealing(
      thresholds_lib.thresholds_from_values(INITIAL),
      thresholds_lib.thresholds_from_values(dict.fromkeys(INITIAL, 0.0)),
      start_epoch=5, total_epochs=15)
  actual = jax.jit(schedule)(epoch)
  for name, value in _original(epoch, 5, 15).items():
    assert float(actual[name]) == pytest.approx(value, abs=1e-7)


def test_final_values_and_clamping():
  schedule = thresholds_lib.linear_annealing(
      thresholds_lib.thresholds_from_values(INITIAL),
      thresholds_lib.thresholds_from_values(
          {'variance': 1.5, 'entropy': 0.0, 'sparsity': 0.4}),
      start_epoch=2, total_epochs=6)
  middle = schedule(4)
  assert float(middle['variance']) == pytest.approx(1.0)
  assert float(middle['entropy']) == pytest.approx(1.0)
  assert float(middle['sparsity']) == pytest.approx(0.4)
  for epoch in (6, 7, 100):
    assert float(schedule(epoch)['variance']) == pytest.approx(1.5)


def test_start_equal_to_total_is_a_step():
  schedule = thresholds_lib.linear_annealing(
      thresholds_lib.thresholds_from_values(INITIAL),
      thresholds_lib.thresholds_from_values(dict.fromkeys(INITIAL, 0.0)),
      start_epoch=3, total_epochs=3)
  assert float(schedule(2)['entropy']) == pytest.approx(2.0)
  assert float(schedule(3)['entropy']) == 0.0


def test_schedule_does_not_recompile_across_epochs():
  schedule = thresholds_lib.linear_annealing(
      thresholds_lib.thresholds_from_values(INITIAL),
      thresholds_lib.thresholds_from_values(dict.fromkeys(INITIAL, 0.0)),
      start_epoch=1, total_epochs=9)
  traces = []

  @jax.jit
  def step(epoch):
    traces.append(epoch)
    return schedule(epoch)

  values = [float(step(jnp.asarray(epoch, jnp.int32))['variance'])
            for epoch in range(10)]
  assert len(traces) == 1
  assert values[1] == pytest.approx(0.5) and values[9] == 0.0
  assert np.all(np.diff(values) <= 0)


def test_schedule_from_config_defaults_total_to_training_epochs():
  config = Config(
      thresholds=ThresholdsConfig(
          initial=ThresholdValues(1.0, 1.0, 1.0), annealing_start_epoch=0),
      training=TrainingConfig(epochs=4))
  schedule = thresholds_lib.schedule_from_config(config)
  assert float(schedule(2)['sparsity']) == pytest.approx(0.5)
  assert float(schedule(4)['sparsity']) == 0.0
