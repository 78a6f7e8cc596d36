"""Quantized execution of any NNX model, by swapping its layers (NNX model surgery).

NNX has no method interception: a model is a graph of mutable Python objects,
and replacing a sub-module by another is the edit NNX is built for (Flax's
"model surgery" guide). `quantize_nnx` returns a copy of the user's model in
which every `nnx.Linear`, `nnx.LinearGeneral` and `nnx.Conv` that a rule
matches is a `QuantizedLayer`: the same bias, the kernel as a QArray (or,
for 'qat', the float kernel as a trainable `nnx.Param`), and the arithmetic
of `compress.layers.forward`, which the Linen path shares. The user's
classes are untouched, and unmatched layers are the very same objects.

Example:
  >>> qmodel = compress.quantize_nnx(model, [compress.Rule('.*', mode='dynamic')])
  >>> logits = nnx.jit(lambda m, x: m(x))(qmodel, x)
"""

from __future__ import annotations

import contextvars
from typing import Any, Iterable, Sequence

import jax
from flax import nnx

from dnnr_jax.compress import layers, quantize, static_conv
from dnnr_jax.compress import rules as rules_lib
from dnnr_jax.compress.rules import Rule
from dnnr_jax.errors import QuantizationError

_RECORDING: contextvars.ContextVar[dict | None] = contextvars.ContextVar('recording', default=None)


def _value(variable: nnx.Variable) -> Any:
  """What `variable` holds: an array or a `QArray`.

  Recent Flax deprecates `.value` for `get_value()` (`variable[...]` would
  index a `QArray`); earlier versions have `.value` only.
  """
  get_value = getattr(variable, 'get_value', None)
  return get_value() if get_value is not None else variable.value


class QuantizedLayer(nnx.Module):
  """A Linear or Conv computed as `rule.mode` says; its attributes are the layer's."""

  def __init__(self, layer: nnx.Module, rule: Rule, path: str, activation_scale=None):
    self.spec = layers.spec_of(layer, path)
    self.path, self.rule = path, rule
    kernel = _value(layer.kernel)
    if rule.mode == 'qat':
      self.kernel = nnx.Param(kernel)
    else:
      self.kernel = nnx.Variable(kernel if isinstance(kernel, quantize.QArray)
                                 else rules_lib.quantize_kernel(kernel, rule))
    self.bias = layer.bias
    if activation_scale is not None and not isinstance(activation_scale,
                                                       static_conv.StaticConv):
      activation_scale = jax.numpy.asarray(activation_scale)
    self.activation_scale = (None if activation_scale is None
                             else nnx.Variable(activation_scale))

  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel = _value(self.kernel)
    if self.rule.mode == 'qat':
      kernel = rules_lib.fake_quantize_kernel(kernel, self.rule)
    scale = None if self.activation_scale is None else _value(self.activation_scale)
    bias = None if self.bias is None else _value(self.bias)
    return layers.forward(self.spec, self.rule.mode, kernel, bias, inputs, scale,
                          self.rule.activations)


class _InputRecorder(nnx.Module):
  """The layer unchanged, its input noted for calibration."""

  def __init__(self, layer: nnx.Module, path: str, outputs_too: bool):
    self.layer, self.path, self.outputs_too = layer, path, outputs_too

  def __call__(self, inputs):
    record = _RECORDING.get()
    outputs = self.layer(inputs)
    if record is not None:
      record[self.path] = inputs
      if self.outputs_too:
        record[self.path + static_conv.OUTPUT] = outputs
    return outputs


def nnx_layers(model: nnx.Module) -> dict[str, str]:
  """{module path: class name} of every sub-module with a `kernel` attribute."""
  return {_path_name(path): type(node).__name__ for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module) and path and hasattr(node, 'kernel')}


def quantize_nnx(model: nnx.Module, rules: Sequence[Rule],
                 activation_scales: dict[str, jax.Array] | None = None) -> nnx.Module:
  """A copy of `model` with each rule-matched layer a `QuantizedLayer`.

  Args:
    model: the user's NNX module (left unchanged).
    rules: see `compress.rules`.
    activation_scales: {module path: scale} from `calibrate_nnx`, for
      'static' rules.

  Raises:
    QuantizationError: a bad rule, a pattern that matches no layer, a matched
      layer of an unsupported kind, or a static rule without its scale.
  """
  model, matched = _matched_layers(model, rules)
  for path, name, node, rule in matched:
    scale = None
    if rule.mode == 'static':
      if not activation_scales or name not in activation_scales:
        raise QuantizationError(f'layer {name!r} has a static rule but no activation scale; '
                                'pass activation_scales from calibrate_nnx.')
      scale = activation_scales[name]
    _replace(model, path, QuantizedLayer(node, rule, name, scale))
  return model


def calibrate_nnx(model: nnx.Module, rules: Sequence[Rule], batches: Iterable[Any],
                  **calibration) -> dict[str, jax.Array]:
  """{module path: static int8 activation scale} of each rule-matched layer's input;
  for an `nnx.Conv` under a 'static' rule its `static_conv.StaticConv` instead (input
  and output ranges calibrated, constants computed from its kernel and bias).

  Runs the float `model` on `batches` through `quantize.calibrate` (its
  `method` and `percentile` pass through `calibration`).
  """
  recording, matched = _matched_layers(model, rules)
  static_convs = {}
  for path, name, node, rule in matched:
    if rule.mode == 'static' and type(node).__name__ == 'Conv':
      static_convs[name] = (node, rule)
    _replace(recording, path, _InputRecorder(node, name, name in static_convs))

  def inputs_of(batch):
    record: dict[str, jax.Array] = {}
    token = _RECORDING.set(record)
    try:
      recording(batch)
    finally:
      _RECORDING.reset(token)
    return record

  batches = list(batches)
  ranges = quantize.calibrate(inputs_of, batches, **calibration)
  scales = {path: value.scale() for path, value in ranges.items()
            if not path.endswith(static_conv.OUTPUT) and path not in static_convs}
  convs = {}
  for name, (node, rule) in static_convs.items():
    kernel = _value(node.kernel)
    if not isinstance(kernel, quantize.QArray):
      kernel = rules_lib.quantize_kernel(kernel, rule)
    convs[name] = (kernel, None if node.bias is None else _value(node.bias))
  record = inputs_of(batches[0]) if convs else {}
  return {**scales, **static_conv.calibrated(ranges, record, convs)}


def _matched_layers(model: nnx.Module, rules: Sequence[Rule]) -> tuple[nnx.Module, list]:
  """A clone of `model` and its (path, name, layer, rule) for each rule-matched layer.

  Raises:
    QuantizationError: a bad rule, a pattern that matches no layer, or a
      matched layer of an unsupported kind.
  """
  rules = rules_lib.check_rules(rules)
  found = nnx_layers(model)
  rules_lib.check_coverage(rules, found, layers.NNX_KINDS, 'nnx')
  model = nnx.clone(model)
  matched = []
  for path, node in list(nnx.iter_graph(model)):
    name = _path_name(path)
    rule = rules_lib.rule_for(rules, name) if name in found else None
    if rule is not None and not isinstance(node, QuantizedLayer):
      matched.append((path, name, node, rule))
  return model, matched


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def _path_name(path: tuple) -> str:
  return '/'.join(str(key) for key in path)
