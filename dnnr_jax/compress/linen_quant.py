"""Quantized execution of any Linen model, by method interception (as qwix does).

The user's module code is untouched: `flax.linen.intercept_methods` routes the
`__call__` of every `nn.Dense`, `nn.DenseGeneral`, `nn.Conv` and `nn.Einsum`
whose module path a rule matches through `compress.layers.forward` (Einsum:
`compress.einsum.forward`), with the kernel
read from the params as it is (a QArray, or a float kernel for QAT). Every
other call, unmatched layers included, runs Flax's own code, so their
outputs are bit-identical to the float model's.

Example:
  >>> rules = [compress.Rule('.*', mode='dynamic')]
  >>> qparams = compress.quantize_linen(model, params, rules, x)
  >>> apply = jax.jit(compress.quantized_apply(model, rules))
  >>> logits = apply({'params': qparams}, x)

QAT uses the same apply with `mode='qat'` rules and float params, inside the
user's own jitted train step; `quantize_linen` with the same rules in
`mode='dynamic'` then gives the integer params.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dnnr_jax.compress import einsum, layers, quantize, static_conv
from dnnr_jax.compress import rules as rules_lib
from dnnr_jax.compress.rules import Rule
from dnnr_jax.errors import QuantizationError


def linen_layers(model: nn.Module, params: Any, *args, collections: Mapping | None = None,
                 method: str | Callable | None = None) -> dict[str, str]:
  """{module path: class name} of every module that owns a 'kernel' param and that
  `model.apply(..., method=method)` calls."""
  found: dict[str, str] = {}

  def record(next_fun, call_args, kwargs, context):
    module = context.module
    if context.method_name == '__call__' and module.has_variable('params', 'kernel'):
      found['/'.join(module.scope.path)] = type(module).__name__
    return next_fun(*call_args, **kwargs)

  def run(float_params):
    with nn.intercept_methods(record):
      return model.apply({**(collections or {}), 'params': float_params}, *args, method=method)

  jax.eval_shape(run, quantize.dequantize_params(params))
  return found


def check_params(model: nn.Module, params: Any, *args) -> None:
  """Raises QuantizationError naming the first path where `params` and the model differ."""
  expected = jax.eval_shape(model.init, jax.random.key(0), *args)['params']
  given = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_qarray)[0]
  wanted = jax.tree_util.tree_flatten_with_path(expected)[0]
  given_shapes = {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in given}
  wanted_shapes = {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in wanted}
  for path in sorted(set(given_shapes) | set(wanted_shapes)):
    if given_shapes.get(path) != wanted_shapes.get(path):
      raise QuantizationError(
          f'params do not match the model at {path} (given shape {given_shapes.get(path)}, the '
          f'model expects {wanted_shapes.get(path)}); pass the params model.init returned for '
          'inputs like these.')


def quantize_linen(model: nn.Module, params: Any, rules: Sequence[Rule], *args,
                   collections: Mapping | None = None,
                   method: str | Callable | None = None) -> Any:
  """The params with the kernels of rule-matched layers as QArrays.

  Args:
    model: the user's Linen module.
    params: its float params (the 'params' collection).
    rules: see `compress.rules`; 'qat' rules leave their kernels float.
    *args: example inputs, used only for their shapes.
    collections: the model's other variable collections, if its apply reads
      any (e.g. {'batch_stats': ...}).
    method: the method to call instead of `__call__`; the layers it calls
      are the ones quantized, so choose one that runs every layer.

  Raises:
    QuantizationError: a bad rule, a pattern that matches no layer, a matched
      layer of an unsupported kind, or params that do not fit the model.
  """
  rules = rules_lib.check_rules(rules)
  check_params(model, params, *args)
  found = linen_layers(model, params, *args, collections=collections, method=method)
  rules_lib.check_coverage(rules, found, layers.LINEN_KINDS, 'nn')
  params = jax.tree.map(lambda leaf: leaf, params, is_leaf=_is_qarray)  # A copy to edit.
  for path in found:
    rule = rules_lib.rule_for(rules, path)
    if rule is None or rule.mode == 'qat':
      continue
    layer = _subtree(params, path)
    if not _is_qarray(layer['kernel']):
      layer['kernel'] = rules_lib.quantize_kernel(layer['kernel'], rule)
  return params


def quantized_apply(model: nn.Module, rules: Sequence[Rule],
                    activation_scales: dict[str, jax.Array] | None = None) -> Callable:
  """`model.apply` with the rule-matched layers computed as their rules say.

  Args:
    model: the user's Linen module.
    rules: see `compress.rules`.
    activation_scales: {module path: scalar scale} from `calibrate_linen`,
      needed by 'static' rules.

  Returns:
    `apply(variables, *args, **kwargs)`, jittable; the interception happens
    inside it, so a jitted copy traces it correctly.
  """
  rules = rules_lib.check_rules(rules)

  def apply(variables, *args, **kwargs):
    with intercept(rules, activation_scales):
      return model.apply(variables, *args, **kwargs)

  return apply


@contextlib.contextmanager
def intercept(rules: Sequence[Rule], activation_scales=None, record: dict | None = None):
  """The interception itself, as a context manager around `model.apply`."""
  rules = rules_lib.check_rules(rules)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not module.has_variable('params', 'kernel'):
      return next_fun(*args, **kwargs)
    path = '/'.join(module.scope.path)
    rule = rules_lib.rule_for(rules, path)
    kernel = module.get_variable('params', 'kernel')
    if rule is None:
      if _is_qarray(kernel):
        raise QuantizationError(f'layer {path!r} has a QArray kernel but no rule matches it; '
                                'add a rule for it or leave its kernel float.')
      return next_fun(*args, **kwargs)
    kind = type(module).__name__
    if kind not in layers.LINEN_KINDS:
      raise QuantizationError(
          f'layer {path!r} is a nn.{kind}, which the quantizer does not support; narrow rule '
          f'pattern {rule.pattern!r} to exclude it.')
    inputs = jnp.asarray(args[0])
    spec = _spec(module, path, args, kwargs)
    if record is not None:
      record[path] = inputs
      outputs = next_fun(*args, **kwargs)
      if rule.mode == 'static' and kind == 'Conv':
        record[path + static_conv.OUTPUT] = outputs
      return outputs
    _check_kernel(spec, module, inputs, kernel, rule, path)
    bias = module.get_variable('params', 'bias') if module.use_bias else None
    scale = None
    if rule.mode == 'qat':
      kernel = rules_lib.fake_quantize_kernel(kernel, rule)
    elif rule.mode == 'static':
      if not activation_scales or path not in activation_scales:
        raise QuantizationError(f'layer {path!r} has a static rule but no activation scale; '
                                'pass activation_scales from calibrate_linen.')
      scale = activation_scales[path]
    forward = einsum.forward if kind == 'Einsum' else layers.forward
    return forward(spec, rule.mode, kernel, bias, inputs, scale, rule.activations)

  with nn.intercept_methods(interceptor):
    yield


def calibrate_linen(model: nn.Module, params: Any, rules: Sequence[Rule],
                    batches: Iterable[Any], **calibration) -> dict[str, jax.Array]:
  """{module path: static int8 activation scale} of each rule-matched layer's input;
  for a Conv under a 'static' rule its `static_conv.StaticConv` instead (its input
  and output ranges calibrated, its constants computed from `params`).

  Runs the float model (`params` may already hold QArrays: they are
  dequantized) on `batches` and reuses `quantize.calibrate` (its `method`
  and `percentile` pass through `calibration`); `collections` and
  `apply_method` are as `quantize_linen`'s `collections` and `method`.
  """
  batches = list(batches)
  ranges = calibrate_ranges_linen(model, params, rules, batches, **calibration)
  convs = {}
  for path in ranges:
    if path + static_conv.OUTPUT in ranges:
      layer = _subtree(params, path)
      kernel = layer['kernel']
      if not _is_qarray(kernel):
        kernel = rules_lib.quantize_kernel(kernel, rules_lib.rule_for(rules, path))
      convs[path] = (kernel, layer.get('bias'))
  record = jax.jit(_recorder(model, params, rules, calibration.get('collections'),
                             calibration.get('apply_method')))(batches[0]) if convs else {}
  scales = {path: value.scale() for path, value in ranges.items()
            if not path.endswith(static_conv.OUTPUT) and path not in convs}
  return {**scales, **static_conv.calibrated(ranges, record, convs)}


def calibrate_ranges_linen(model: nn.Module, params: Any, rules: Sequence[Rule],
                           batches: Iterable[Any], *, collections: Mapping | None = None,
                           apply_method: str | Callable | None = None,
                           **calibration) -> dict[str, quantize.ActivationRange]:
  """`calibrate_linen`'s ranges, {module path: ActivationRange}, before they become scales."""
  return quantize.calibrate(_recorder(model, params, rules, collections, apply_method),
                            batches, **calibration)


def _recorder(model, params, rules, collections, apply_method) -> Callable:
  """batch -> {path: input} of the rule-matched layers (and static Convs' outputs)."""
  variables = {**(collections or {}), 'params': quantize.dequantize_params(params)}

  def inputs_of(batch):
    record: dict[str, jax.Array] = {}
    with intercept(rules, record=record):
      model.apply(variables, batch, method=apply_method)
    return record

  return inputs_of


def _spec(module: nn.Module, path: str, args, kwargs) -> Any:
  """The layer's LayerSpec, or EinsumSpec (the equation given to the call wins)."""
  if type(module).__name__ != 'Einsum':
    return layers.spec_of(module, path)
  equation = args[1] if len(args) > 1 else kwargs.get('einsum_str')
  return einsum.spec_of(equation or module.einsum_str, path)


def _check_kernel(spec, module, inputs, kernel, rule, path) -> None:
  if isinstance(spec, einsum.EinsumSpec):
    expected = tuple(module.shape)
  else:
    expected = layers.expected_kernel_shape(spec, module, inputs)
  if tuple(kernel.shape) != tuple(expected):
    raise QuantizationError(
        f'params do not match the model at layer {path!r}: kernel shape {tuple(kernel.shape)}, '
        f'the layer expects {tuple(expected)}; pass the params model.init returned.')
  if (rule.mode == 'qat') == _is_qarray(kernel):
    raise QuantizationError(
        f'layer {path!r} has a {"QArray" if _is_qarray(kernel) else "float"} kernel but a '
        f'{rule.mode!r} rule; quantize the params with quantize_linen for the integer modes, '
        'keep them float for qat.')


def _subtree(params: Any, path: str) -> dict:
  for name in filter(None, path.split('/')):
    params = params[name]
  return params


def _is_qarray(leaf: Any) -> bool:
  return isinstance(leaf, quantize.QArray)
