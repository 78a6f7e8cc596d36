"""The routing decision: which inputs take the deep block.

An input is routed deep iff variance > t_variance, entropy > t_entropy and
sparsity < t_sparsity. The decision is a small pure function of the metrics
and the thresholds, separate from the model, so new modes slot in here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dnnr_jax.config import ROUTING_MODES


def deep_rule(
    complexity: dict[str, jax.Array], thresholds: dict[str, jax.Array]
) -> jax.Array:
  """The original's rule, elementwise over whatever shape the metrics have."""
  return ((complexity['variance'] > thresholds['variance'])
          & (complexity['entropy'] > thresholds['entropy'])
          & (complexity['sparsity'] < thresholds['sparsity']))


def route(
    complexity: dict[str, jax.Array],
    thresholds: dict[str, jax.Array],
    mode: str,
) -> jax.Array:
  """Per-example routes, bool [B] (True = deep block).

  Args:
    complexity: metrics keyed 'variance', 'entropy', 'sparsity', each [B].
    thresholds: scalars under the same keys.
    mode: 'per_sample' (each example by its own metrics), 'batch' (one
      decision from the batch means, as the original), 'deep' or 'shallow'.

  Returns:
    bool [B]; in 'batch' mode every entry is the same.
  """
  batch_size = complexity['variance'].shape[0]
  if mode == 'per_sample':
    return deep_rule(complexity, thresholds)
  if mode == 'batch':
    means = {name: jnp.mean(values) for name, values in complexity.items()}
    return jnp.broadcast_to(deep_rule(means, thresholds), (batch_size,))
  if mode == 'deep':
    return jnp.ones((batch_size,), bool)
  if mode == 'shallow':
    return jnp.zeros((batch_size,), bool)
  raise ValueError(f'routing mode {mode!r} is not one of {ROUTING_MODES}')
