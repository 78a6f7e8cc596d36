"""The two model families: the original dynamic MLP and the early-exit MLP.

`DynamicMLP` (model.family 'original') is the paper's: a trunk, then the deep
block or the shortcut, then a head. Both routes cost the same, so routing it
saves no compute; it is the reference whose behaviour the parity tests pin.
`EarlyExitMLP` (model.family 'early_exit') has a cheap exit after
`exit_after` trunk layers; a sample routed to it skips the rest of the trunk
and the head.

`model.apply(variables, x) -> (logits, deep_path)` is the pure-functional
form every later transform and jax2onnx work with. `variables` holds two
collections:

* 'params': Dense layers `{'kernel': [in, out], 'bias': [out]}`: `trunk_{i}`,
  `deep`, `shortcut` and `head` ('original'); `trunk_{i}`, `exit_hidden`
  (when `exit_width` > 0), `exit` and `head` ('early_exit');
* 'thresholds': float32 scalars keyed by metric (and 'confidence').

A quantized checkpoint runs with `quantization` rules (see
`compress.rules`): `apply` then goes through `compress.quantized_apply`,
which intercepts the plain `nn.Dense` layers, so a user's model and ours
share one quantized path. A 'static' model's calibrated input scales travel
in the variables as an 'activation_scales' collection,
`{layer: {'input': scale}}`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dnnr_jax import complexity as complexity_lib
from dnnr_jax import routing as routing_lib
from dnnr_jax.compress.linen_quant import quantized_apply
from dnnr_jax.compress.rules import Rule


class DynamicMLP(nn.Module):
  """Routes each input through the deep block or the shortcut (saves no compute).

  The deep block (Dense+ReLU) and the shortcut (Dense) cost the same, and
  'per_sample' runs both, so this model never costs less than a static one.
  Use `EarlyExitMLP` for inference that spends less on easy inputs.

  Attributes:
    hidden_sizes: widths of the trunk's Dense+ReLU layers.
    deep_size: width of the deep block (Dense+ReLU) and of the shortcut
      (Dense, no ReLU).
    num_classes: width of the head.
    routing: 'per_sample' (both paths run, each example keeps its own: a
      `Where` in ONNX), 'batch' (one decision per batch, only the taken path
      runs: an `If` in ONNX), 'deep' or 'shallow'.
    quantization: rules for a quantized checkpoint's QArray kernels; empty
      for float params.
  """
  hidden_sizes: Sequence[int] = (256, 256)
  deep_size: int = 128
  num_classes: int = 10
  routing: str = 'per_sample'
  quantization: tuple[Rule, ...] = ()

  def setup(self):
    self.trunk = [nn.Dense(size) for size in self.hidden_sizes]
    self.deep = nn.Dense(self.deep_size)
    self.shortcut = nn.Dense(self.deep_size)
    self.head = nn.Dense(self.num_classes)
    self.threshold_variables = {
        name: self.variable(
            'thresholds', name, lambda: jnp.zeros((), jnp.float32))
        for name in complexity_lib.METRICS
    }

  @nn.nowrap
  def apply(self, variables, *args, **kwargs) -> Any:
    """`nn.Module.apply`, through `compress.quantized_apply` with `quantization` rules."""
    return _apply(self, variables, args, kwargs)

  def __call__(self, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits [B, num_classes] and routes bool [B] of normalised inputs [B, F]."""
    thresholds = {
        name: variable.value
        for name, variable in self.threshold_variables.items()
    }
    if self.routing in ('deep', 'shallow'):
      # No metric is computed: an export would otherwise keep one to read the batch size.
      deep_path = routing_lib.fixed_route(self.routing, inputs.shape[0])
    else:
      deep_path = routing_lib.route(
          complexity_lib.batch_complexity(inputs), thresholds, self.routing)

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


class EarlyExitMLP(nn.Module):
  """A trunk with a cheap exit: samples routed to the exit skip the rest.

  The cheap stage is the first `exit_after` trunk layers (the stem) and the
  exit head; the expensive stage is the remaining trunk layers and the head.
  The router decides per sample (or per batch) whether the expensive stage
  runs: 'complexity' from the input alone, 'confidence' from the exit's own
  prediction. Both exits are trained on every sample (`joint`).

  Attributes:
    hidden_sizes: widths of the trunk's Dense+ReLU layers.
    num_classes: width of both heads.
    exit_after: trunk layers before the exit (0: the exit reads the input).
    exit_width: hidden width of the exit head; 0 makes it linear.
    router: 'complexity' or 'confidence'.
    routing: 'per_sample' (the expensive stage runs on the routed rows only,
      `routing.run_on_routed`), 'batch' (one `cond` per batch), 'deep'
      (the stem, trunk and head only: the static model) or 'shallow' (the
      cheap stage only).
    quantization: as `DynamicMLP`'s.
  """
  hidden_sizes: Sequence[int] = (256, 256)
  num_classes: int = 10
  exit_after: int = 0
  exit_width: int = 0
  router: str = 'complexity'
  routing: str = 'per_sample'
  quantization: tuple[Rule, ...] = ()

  def setup(self):
    self.trunk = [nn.Dense(size) for size in self.hidden_sizes]
    self.exit_hidden = nn.Dense(self.exit_width) if self.exit_width else None
    self.exit = nn.Dense(self.num_classes)
    self.head = nn.Dense(self.num_classes)
    self.threshold_variables = {
        name: self.variable('thresholds', name, lambda: jnp.zeros((), jnp.float32))
        for name in (*complexity_lib.METRICS, 'confidence')
    }

  @nn.nowrap
  def apply(self, variables, *args, **kwargs) -> Any:
    """`nn.Module.apply`, through `compress.quantized_apply` with `quantization` rules."""
    return _apply(self, variables, args, kwargs)

  def stem(self, inputs: jax.Array) -> jax.Array:
    """The trunk layers before the exit: inputs [B, F] -> hidden [B, H]."""
    hidden = inputs
    for layer in self.trunk[:self.exit_after]:
      hidden = nn.relu(layer(hidden))
    return hidden

  def exit_logits(self, hidden: jax.Array) -> jax.Array:
    """The cheap exit's logits [B, num_classes] from the stem's output."""
    if self.exit_hidden is not None:
      hidden = nn.relu(self.exit_hidden(hidden))
    return self.exit(hidden)

  def expensive(self, hidden: jax.Array) -> jax.Array:
    """The expensive stage: the stem's output [N, H] -> logits [N, num_classes]."""
    for layer in self.trunk[self.exit_after:]:
      hidden = nn.relu(layer(hidden))
    return self.head(hidden)

  def cheap(self, inputs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The cheap stage: (exit logits [B, C], routes bool [B], hidden [B, H])."""
    hidden = self.stem(inputs)
    exit_logits = self.exit_logits(hidden)
    thresholds = {name: variable.value for name, variable in self.threshold_variables.items()}
    if self.routing in ('deep', 'shallow'):
      # No router runs: an export would otherwise keep its scores to read the batch size.
      deep_path = routing_lib.fixed_route(self.routing, inputs.shape[0])
    elif self.router == 'confidence':
      deep_path = routing_lib.confidence_route(
          exit_logits, thresholds['confidence'], self.routing)
    else:
      deep_path = routing_lib.route(
          complexity_lib.batch_complexity(inputs), thresholds, self.routing)
    return exit_logits, deep_path, hidden

  def joint(self, inputs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Every layer on every row: (head logits, routes, exit logits).

    What training fits (both exits on every sample) and the run-everything
    reference the skipping execution must equal.
    """
    exit_logits, deep_path, hidden = self.cheap(inputs)
    return self.expensive(hidden), deep_path, exit_logits

  def __call__(self, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits [B, num_classes] and routes bool [B] of normalised inputs [B, F]."""
    if self.is_initializing():
      logits, deep_path, _ = self.joint(inputs)
      return logits, deep_path
    if self.routing == 'deep':
      return self.expensive(self.stem(inputs)), jnp.ones(inputs.shape[:1], bool)
    exit_logits, deep_path, hidden = self.cheap(inputs)
    if self.routing == 'shallow':
      return exit_logits, deep_path
    if self.routing == 'batch':
      logits = nn.cond(deep_path[0], _expensive_rows, _keep_exit, self, hidden, exit_logits)
      return logits, deep_path
    logits = routing_lib.run_on_routed(
        _expensive_only, deep_path, hidden, exit_logits, switch=nn.switch, context=(self,))
    return logits, deep_path


def _expensive_rows(module: EarlyExitMLP, hidden: jax.Array, exit_logits: jax.Array):
  del exit_logits
  return module.expensive(hidden)


def _keep_exit(module: EarlyExitMLP, hidden: jax.Array, exit_logits: jax.Array):
  del module, hidden
  return exit_logits


def _expensive_only(module: EarlyExitMLP, hidden: jax.Array) -> jax.Array:
  return module.expensive(hidden)


def _apply(model: nn.Module, variables, args, kwargs) -> Any:
  if not model.quantization:
    return nn.Module.apply(model, variables, *args, **kwargs)
  scales = {name: layer['input'] for name, layer in variables.get('activation_scales', {}).items()}
  plain = model.clone(quantization=())
  return quantized_apply(plain, model.quantization, scales or None)(variables, *args, **kwargs)


def quantization_rules(mode: str | None, bits: int = 8, per_channel: bool = True,
                       activations: str = 'per_row') -> tuple[Rule, ...]:
  """The rules our models run with once quantized in `mode`: one for every Dense layer.

  'qat' trains with fake quantization and deploys as 'dynamic'; None (a float
  model) gives no rules. `activations` ('per_row' or 'per_batch') is how
  'dynamic' quantizes the inputs of each layer.
  """
  if mode is None:
    return ()
  return (Rule('.*', mode='dynamic' if mode == 'qat' else mode, bits=bits,
               per_channel=per_channel, activations=activations),)


def every_layer(model: nn.Module) -> tuple[nn.Module, str | None]:
  """The model and method whose one call runs every Dense layer on every row.

  `DynamicMLP` routed 'per_sample' (both paths run); `EarlyExitMLP.joint`.
  """
  if isinstance(model, EarlyExitMLP):
    return model, 'joint'
  return model.clone(routing='per_sample'), None


def model_from_config(config, *, quantization: tuple[Rule, ...] = ()) -> nn.Module:
  """The module a `Config` describes (family, widths, router and routing mode)."""
  common = dict(hidden_sizes=tuple(config.model.hidden_sizes),
                num_classes=config.model.num_classes, routing=config.routing.mode,
                quantization=tuple(quantization))
  if config.model.family == 'early_exit':
    return EarlyExitMLP(exit_after=config.model.exit_after, exit_width=config.model.exit_width,
                        router=config.routing.router, **common)
  return DynamicMLP(deep_size=config.model.deep_size, **common)


def init_variables(
    model: nn.Module, rng: jax.Array, num_features: int,
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
def _init(model: nn.Module, rng: jax.Array, num_features: int) -> dict:
  # One compiled program: run eagerly, every initialiser compiles per shape.
  return model.init(rng, jnp.zeros((1, num_features), jnp.float32))
