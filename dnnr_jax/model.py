"""The dynamic MLP: a trunk, then the deep block or the shortcut, then a head.

`model.apply(variables, x)` is the pure-functional form every later transform
and jax2onnx work with. `variables` holds two collections:

* 'params': `trunk_{i}`, `deep`, `shortcut` and `head`, each a Dense
  `{'kernel': [in, out], 'bias': [out]}`;
* 'thresholds': the hybrid thresholds, float32 scalars keyed by metric.

A kernel may also be a `QArray` (see `dnnr_jax.compress.quantize`): the layer
then multiplies in integers (activations quantized per row, or at the
calibrated scale in the 'activation_scales' collection when one is present),
or with dequantized weights when the model is `weight_only`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dnnr_jax import complexity as complexity_lib
from dnnr_jax import routing as routing_lib
from dnnr_jax.compress.quantize import (
    QArray,
    int8_matmul,
    static_int8_matmul,
    weight_only_matmul,
)


class Dense(nn.Module):
  """`nn.Dense` (same parameters and initialisers) that also takes a QArray kernel.

  Attributes:
    features: output width.
    weight_only: for a QArray kernel, multiply by the dequantized weights
      instead of in integers.
  """
  features: int
  weight_only: bool = False

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel = self.param(
        'kernel', nn.initializers.lecun_normal(), (inputs.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    bias = bias.reshape((1,) * (inputs.ndim - 1) + (-1,))
    if not isinstance(kernel, QArray):
      return inputs @ kernel + bias
    if self.weight_only:
      return weight_only_matmul(inputs, kernel) + bias
    activation_scale = self.get_variable('activation_scales', 'input')
    if activation_scale is not None:
      return static_int8_matmul(inputs, activation_scale, kernel) + bias
    return int8_matmul(inputs, kernel) + bias


class DynamicMLP(nn.Module):
  """Routes each input through the deep block or the shortcut.

  Attributes:
    hidden_sizes: widths of the trunk's Dense+ReLU layers.
    deep_size: width of the deep block (Dense+ReLU) and of the shortcut
      (Dense, no ReLU).
    num_classes: width of the head.
    routing: 'per_sample' (both paths run, each example keeps its own: a
      `Where` in ONNX), 'batch' (one decision per batch, only the taken path
      runs: an `If` in ONNX), 'deep' or 'shallow'.
    weight_only: quantized kernels compute with dequantized weights.
  """
  hidden_sizes: Sequence[int] = (256, 256)
  deep_size: int = 128
  num_classes: int = 10
  routing: str = 'per_sample'
  weight_only: bool = False

  def setup(self):
    def dense(features):
      return Dense(features, weight_only=self.weight_only)

    self.trunk = [dense(size) for size in self.hidden_sizes]
    self.deep = dense(self.deep_size)
    self.shortcut = dense(self.deep_size)
    self.head = dense(self.num_classes)
    self.threshold_variables = {
        name: self.variable(
            'thresholds', name, lambda: jnp.zeros((), jnp.float32))
        for name in complexity_lib.METRICS
    }

  def __call__(self, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits [B, num_classes] and routes bool [B] of normalised inputs [B, F]."""
    thresholds = {
        name: variable.value
        for name, variable in self.threshold_variables.items()
    }
    metrics = complexity_lib.batch_complexity(inputs)
    deep_path = routing_lib.route(metrics, thresholds, self.routing)

    hidden = inputs
    for layer in self.trunk:
      hidden = nn.relu(layer(hidden))

    if self.is_initializing():
      # Create both paths' parameters whatever the mode.
      self.deep(hidden)
      self.shortcut(hidden)

    if self.routing == 'deep':
      features = _deep_block(self, hidden)
    elif self.routing == 'shallow':
      features = _shortcut(self, hidden)
    elif self.routing == 'batch':
      features = nn.cond(deep_path[0], _deep_block, _shortcut, self, hidden)
    else:
      features = jnp.where(
          deep_path[:, None], _deep_block(self, hidden), _shortcut(self, hidden))
    return self.head(features), deep_path


def _deep_block(module: DynamicMLP, hidden: jax.Array) -> jax.Array:
  return nn.relu(module.deep(hidden))


def _shortcut(module: DynamicMLP, hidden: jax.Array) -> jax.Array:
  return module.shortcut(hidden)


def model_from_config(config, *, weight_only: bool = False) -> DynamicMLP:
  """The module a `Config` describes (widths and routing mode)."""
  return DynamicMLP(
      hidden_sizes=tuple(config.model.hidden_sizes),
      deep_size=config.model.deep_size,
      num_classes=config.model.num_classes,
      routing=config.routing.mode,
      weight_only=weight_only,
  )


def init_variables(
    model: DynamicMLP, rng: jax.Array, num_features: int,
    thresholds: dict[str, jax.Array] | None = None,
) -> dict:
  """Fresh variables for inputs of width `num_features`.

  Args:
    model: the module.
    rng: PRNG key for the Dense initialisers.
    num_features: input width.
    thresholds: initial thresholds; zeros when None.

  Returns:
    `{'params': ..., 'thresholds': ...}`.
  """
  variables = dict(_init(model, rng, num_features))
  if thresholds is not None:
    variables['thresholds'] = dict(thresholds)
  return variables


@functools.partial(jax.jit, static_argnames=('model', 'num_features'))
def _init(model: DynamicMLP, rng: jax.Array, num_features: int) -> dict:
  # One compiled program: run eagerly, every initialiser compiles per shape.
  return model.init(rng, jnp.zeros((1, num_features), jnp.float32))
