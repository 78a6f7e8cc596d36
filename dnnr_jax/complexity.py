"""Per-example input complexity: variance, softmax entropy and sparsity.

Each metric is written for one example (a feature vector [F]) and batched
with `jax.vmap` by `batch_complexity`. The values equal the original
analyzer's on the same (normalised) input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

METRICS = ('variance', 'entropy', 'sparsity')
ENTROPY_EPSILON = 1e-10
SPARSITY_CUTOFF = 0.1


def variance(features: jax.Array) -> jax.Array:
  """Unbiased (ddof=1) variance of one example's features [F] -> []."""
  return jnp.var(features, ddof=1)


def entropy(features: jax.Array) -> jax.Array:
  """Entropy of the softmax over one example's features [F] -> [].

  Computed as -sum(p * log(p + 1e-10)), the original's formula (the epsilon
  changes the value slightly, so it is kept).
  """
  probabilities = jax.nn.softmax(features)
  return -jnp.sum(probabilities * jnp.log(probabilities + ENTROPY_EPSILON))


def sparsity(features: jax.Array) -> jax.Array:
  """Fraction of one example's features with |x| < 0.1, [F] -> []."""
  # A float mean, not a bool one: jax2onnx cannot lower a mean over bools.
  return jnp.mean((jnp.abs(features) < SPARSITY_CUTOFF).astype(features.dtype))


def complexity(features: jax.Array) -> dict[str, jax.Array]:
  """All three metrics of one example [F], keyed as `METRICS`."""
  return {
      'variance': variance(features),
      'entropy': entropy(features),
      'sparsity': sparsity(features),
  }


def batch_complexity(inputs: jax.Array) -> dict[str, jax.Array]:
  """All three metrics of a batch [B, F], each of shape [B]."""
  return jax.vmap(complexity)(inputs)
