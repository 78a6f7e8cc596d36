"""Quantized execution of Linen nn.Einsum layers, through the same rules as Dense and Conv."""

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest

import dnnr_jax
from dnnr_jax import compress
from dnnr_jax.errors import QuantizationError


class Heads(nn.Module):
  """A projection to heads, an Einsum whose output letters are reordered, a Dense head."""

  @nn.compact
  def __call__(self, x):  # x: [b, t, 6]
    y = nn.relu(nn.Einsum((6, 2, 3), 'btd,dhk->bthk')(x))
    y = y.reshape(*x.shape[:2], 6)
    y = nn.Einsum((6, 4), use_bias=False)(y, 'btd,dk->bkt')
    return nn.Dense(5)(y.reshape(x.shape[0], -1))


@pytest.fixture(scope='module')
def heads():
  model = Heads()
  inputs = jax.random.normal(jax.random.key(1), (3, 4, 6))
  return model, model.init(jax.random.key(0), inputs)['params'], inputs


def test_int8_einsum_equals_numpy_integers():
  """Dynamic int8: one input scale per row of contracted values, int32 sums, scales per k."""
  rng = np.random.default_rng(0)
  inputs = rng.normal(size=(2, 3, 5)).astype(np.float32)
  inputs[1] *= 10  # other rows' ranges must not change this row's codes
  model = nn.Einsum((5, 2, 4), 'btd,dhk->bthk')
  params = {'kernel': rng.normal(size=(5, 2, 4)).astype(np.float32),
            'bias': rng.normal(size=(2, 4)).astype(np.float32)}
  rules = [compress.Rule('.*', mode='dynamic')]
  quantized = compress.quantize_linen(model, params, rules, inputs)
  ours = jax.jit(compress.quantized_apply(model, rules))({'params': quantized}, inputs)
  q = quantized['kernel']
  weight_codes, weight_scale = np.asarray(q.value, np.int64), np.asarray(q.scale)
  assert weight_scale.shape == (1, 1, 4) and np.all(np.abs(weight_codes) <= 127)
  row_scale = np.float32(np.abs(inputs).max(-1, keepdims=True) * np.float32(1 / 127))
  input_codes = np.clip(np.round(inputs * (1 / row_scale)), -127, 127).astype(np.int64)
  accumulator = np.einsum('btd,dhk->bthk', input_codes, weight_codes)  # exact integers
  expected = (accumulator.astype(np.float32) * row_scale[..., None] * weight_scale
              + params['bias'])
  assert ours.shape == (2, 3, 2, 4)
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize('mode', ['weight_only', 'static'])
def test_weight_only_and_static_equal_float_on_dequantized_kernels(heads, mode):
  model, params, inputs = heads
  rules = [compress.Rule('Einsum_.*', mode=mode)]
  quantized = compress.quantize_linen(model, params, rules, inputs)
  assert isinstance(quantized['Einsum_1']['kernel'], compress.QArray)
  assert not isinstance(quantized['Dense_0']['kernel'], compress.QArray)
  scales = compress.calibrate_linen(model, quantized, rules, [inputs]) if mode == 'static' else None
  ours = jax.jit(compress.quantized_apply(model, rules, scales))({'params': quantized}, inputs)
  reference = model.apply({'params': compress.dequantize_params(quantized)}, inputs)
  assert ours.shape == (3, 5)
  if mode == 'weight_only':
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
  else:  # int8 activations too: close, not equal
    assert set(scales) == {'Einsum_0', 'Einsum_1'}
    error = float(jnp.max(jnp.abs(ours - reference)))
    assert 0 < error < 0.05 * float(jnp.max(jnp.abs(reference)))


def test_unmatched_layers_are_bit_identical(heads):
  model, params, inputs = heads
  rules = [compress.Rule('Einsum_1', mode='dynamic')]
  quantized = compress.quantize_linen(model, params, rules, inputs)

  def first(apply, variables):  # Einsum_0's output, which no rule touches.
    return jax.jit(lambda v: apply(v, inputs, capture_intermediates=True, mutable=[
        'intermediates'])[1]['intermediates']['Einsum_0']['__call__'][0])(variables)

  np.testing.assert_array_equal(first(compress.quantized_apply(model, rules),
                                      {'params': quantized}),
                                first(model.apply, {'params': params}))


def test_qat_gradients_flow_straight_through(heads):
  model, params, inputs = heads
  apply = compress.quantized_apply(model, [compress.Rule('Einsum_.*', mode='qat', bits=4)])
  ours = jax.jit(jax.grad(lambda p: jnp.sum(apply({'params': p}, inputs) ** 2)))(params)
  # STE: the gradient is that of the float model evaluated at the fake-quantized kernels.
  fake = compress.dequantize_params(compress.quantize_linen(
      model, params, [compress.Rule('Einsum_.*', mode='weight_only', bits=4)], inputs))
  expected = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, inputs) ** 2))(fake)
  for path in ('Einsum_0', 'Einsum_1'):
    assert float(jnp.sum(jnp.abs(ours[path]['kernel']))) > 0
    np.testing.assert_allclose(ours[path]['kernel'], expected[path]['kernel'], rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize('equation', ['bhd,hdk->bhk', 'btd,kd->btk', 'b...d,dk->b...k'])
def test_unsupported_equation_names_module_and_fix(equation):
  shape = (2, 3, 4) if equation.startswith('bhd') else ((4, 3) if 'kd' in equation else (3, 4))
  model = nn.Einsum(shape, equation)
  inputs = jnp.ones((1, 2, 3))
  params = model.init(jax.random.key(0), inputs)['params']
  rules = [compress.Rule('.*', mode='weight_only')]
  quantized = compress.quantize_linen(model, params, rules, inputs)
  with pytest.raises(QuantizationError, match=r"layer '' \(Einsum\).*exclude it from the rules"):
    compress.quantized_apply(model, rules)({'params': quantized}, inputs)


def test_int8_einsum_exports_as_integer_matmuls(heads, tmp_path):
  """Both Einsums and the Dense run as MatMulInteger in onnxruntime, equal to JAX."""
  model, params, inputs = heads
  rules = [compress.Rule('.*', mode='dynamic')]
  quantized = compress.quantize_linen(model, params, rules, inputs)
  apply = compress.quantized_apply(model, rules)
  path, report = dnnr_jax.export_onnx_function(
      tmp_path / 'heads.onnx', lambda p, x: apply({'params': p}, x), quantized,
      np.asarray(inputs))
  assert report['argmax_agreement'] == 1.0 and report['max_abs_difference'] < 1e-4
  ops = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
  assert ops['MatMulInteger'] == 3
