"""The model runs with quantized kernels through compress rules: integer, static and weight-only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnnr_jax.compress.linen_quant import quantized_apply
from dnnr_jax.compress.quantize import QArray, QuantSpec, dequantize_params, quantize_params
from dnnr_jax.errors import QuantizationError
from dnnr_jax.model import DynamicMLP, init_variables, quantization_rules

HALF = {name: jnp.float32(0.5) for name in ('variance', 'entropy', 'sparsity')}


def _model(mode=None, **kwargs):
  return DynamicMLP(hidden_sizes=(64, 48), deep_size=32, num_classes=10,
                    quantization=quantization_rules(mode), **kwargs)


def _setup():
  variables = init_variables(_model(), jax.random.PRNGKey(0), 40, HALF)
  inputs = jnp.asarray(np.random.default_rng(0).normal(size=(16, 40)), jnp.float32)
  return variables, inputs


@pytest.mark.parametrize('mode', ['dynamic', 'weight_only'])
def test_int8_model_is_close_to_float(mode):
  variables, inputs = _setup()
  float_logits, float_routes = jax.jit(_model().apply)(variables, inputs)
  quantized = {**variables, 'params': quantize_params(variables['params'], QuantSpec(bits=8))}
  assert isinstance(quantized['params']['trunk_0']['kernel'], QArray)
  logits, routes = jax.jit(_model(mode).apply)(quantized, inputs)
  np.testing.assert_array_equal(routes, float_routes)  # routing stays in float
  error = np.max(np.abs(np.asarray(logits) - np.asarray(float_logits)))
  assert error < 0.03 * np.max(np.abs(np.asarray(float_logits)))


def test_weight_only_equals_the_dequantized_float_model():
  variables, inputs = _setup()
  quantized = {**variables, 'params': quantize_params(variables['params'], QuantSpec(bits=4))}
  logits, _ = _model('weight_only').apply(quantized, inputs)
  reference, _ = _model().apply(
      {**variables, 'params': dequantize_params(quantized['params'])}, inputs)
  np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)


def test_integer_path_lowers_to_integer_dots():
  variables, inputs = _setup()
  quantized = {**variables, 'params': quantize_params(variables['params'], QuantSpec(bits=8))}
  jaxpr = jax.make_jaxpr(_model('dynamic').apply)(quantized, inputs)
  dots = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == 'dot_general']
  assert len(dots) == 5
  assert all(eqn.invars[0].aval.dtype == jnp.int8 for eqn in dots)
  assert all(eqn.outvars[0].aval.dtype == jnp.int32 for eqn in dots)


def test_static_scales_are_used_when_present():
  variables, inputs = _setup()
  quantized = {**variables, 'params': quantize_params(variables['params'], QuantSpec(bits=8))}
  dynamic, _ = _model('dynamic').apply(quantized, inputs)
  tiny = {name: {'input': jnp.float32(1e-4)} for name in quantized['params']}
  saturated, _ = _model('static').apply({**quantized, 'activation_scales': tiny}, inputs)
  assert not np.allclose(dynamic, saturated, atol=1e-3)


def test_the_model_runs_the_general_quantized_apply():
  # One path: the model's rules are compress.quantized_apply's, on plain nn.Dense layers.
  variables, inputs = _setup()
  assert set(variables['params']['trunk_0']) == {'kernel', 'bias'}
  quantized = {**variables, 'params': quantize_params(variables['params'], QuantSpec(bits=4))}
  ours = jax.jit(_model('dynamic').apply)(quantized, inputs)
  general = jax.jit(quantized_apply(_model(), quantization_rules('dynamic')))(quantized, inputs)
  for left, right in zip(ours, general, strict=True):
    np.testing.assert_array_equal(left, right)


def test_quantized_params_need_rules_and_static_needs_scales():
  variables, inputs = _setup()
  quantized = {**variables, 'params': quantize_params(variables['params'], QuantSpec(bits=8))}
  with pytest.raises(QuantizationError, match='quantized_apply'):
    _model().apply(quantized, inputs)
  with pytest.raises(QuantizationError, match="'trunk_0' has a static rule but no activation"):
    _model('static').apply(quantized, inputs)


def test_quantization_rules_cover_every_layer_and_deploy_qat_as_dynamic():
  assert quantization_rules(None) == ()
  (rule,) = quantization_rules('qat', 4, per_channel=False)
  assert (rule.pattern, rule.mode, rule.bits, rule.per_channel) == ('.*', 'dynamic', 4, False)
  assert quantization_rules('static')[0].mode == 'static'


@pytest.mark.parametrize('quantization, words', [
    ({'mode': 'dynamic', 'bits': 8}, None),
    ({'mode': 'fast', 'bits': 8}, "has mode 'fast'"),
    ({'bits': 8}, 'KeyError'),
])
def test_a_checkpoint_runs_with_the_rule_its_metadata_records(tmp_path, quantization, words):
  from dnnr_jax.config import Config, ModelConfig
  from dnnr_jax.errors import CheckpointError
  from dnnr_jax.io.checkpoint import load_model, save_checkpoint

  variables, inputs = _setup()
  quantized = {**variables, 'params': quantize_params(variables['params'], QuantSpec(bits=8))}
  config = Config(model=ModelConfig(hidden_sizes=(64, 48), deep_size=32))
  path = save_checkpoint(tmp_path / 'ckpt', quantized, {
      'kind': 'quantized', 'config': config.to_dict(), 'num_features': 40,
      'quantization': quantization})
  if words:
    with pytest.raises(CheckpointError, match=f'malformed quantization metadata.*{words}'):
      load_model(path)
    return
  loaded = load_model(path)
  assert loaded.model.quantization == quantization_rules('dynamic', 8)
  expected, _ = jax.jit(_model('dynamic').apply)(quantized, inputs)
  np.testing.assert_array_equal(loaded.predict(inputs), expected)
