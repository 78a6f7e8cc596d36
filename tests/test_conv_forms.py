"""scripts/conv_forms.py: every int8 convolution form computes the CNN it is timed as."""

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime

from tests.cli_helpers import load_script


def _run(model, images):
  session = onnxruntime.InferenceSession(model.SerializeToString(),
                                         providers=['CPUExecutionProvider'])
  return session.run(None, {'input': images})[0]


def test_every_form_computes_the_reference_network():
  script = load_script('conv_forms')
  weights = script.weights()
  images = np.random.default_rng(1).random((16, 28, 28, 1), dtype=np.float32)
  expected = script.reference(weights, images)[2]
  spread = np.abs(expected).max()
  outputs = {name: _run(script.build(nodes, weights), images)
             for name, nodes in script.forms().items()}
  np.testing.assert_allclose(outputs['float'], expected, rtol=1e-4, atol=1e-4 * spread)
  for name, logits in outputs.items():  # 8-bit codes throughout: about 1 % of the range
    assert np.abs(logits - expected).max() < 0.02 * spread, name
    assert np.mean(logits.argmax(-1) == expected.argmax(-1)) >= 0.9, name
  # onnxruntime fuses the QuantizeLinear/DequantizeLinear pairs around Conv into QLinearConv.
  np.testing.assert_array_equal(outputs['qdq'], outputs['qlinear'])


def test_qlinear_conv_requantizes_as_the_numpy_reference():
  # clip(round_half_even(float32(acc + bias) * float32(x_scale * w_scale / y_scale))):
  # what a JAX twin of a QLinearConv export would have to compute, bit for bit.
  script = load_script('conv_forms')
  images = np.random.default_rng(2).random((8, 28, 28, 1), dtype=np.float32)
  assert script.qlinear_exact(script.weights(), images)


def test_a_jax_twin_of_the_qlinear_chain_is_bit_exact():
  # The same two requantized convolutions in jitted JAX (int8 codes, int32 accumulation,
  # jnp.round is half to even) give onnxruntime's codes exactly: a static export as
  # QLinearConv can equal JAX.
  script = load_script('conv_forms')
  w = script.weights()
  images = np.random.default_rng(3).random((8, 28, 28, 1), dtype=np.float32)

  @jax.jit
  def codes(x):
    q = jnp.clip(jnp.round(x / w['sx']), 0, 255)
    outputs = []
    for i, (x_scale, y_scale) in enumerate(((w['sx'], w['sy1']), (w['sy1'], w['sy2'])), 1):
      acc = jax.lax.conv_general_dilated(
          q.astype(jnp.int32), jnp.asarray(w[f'q{i}'], jnp.int32).transpose(2, 3, 1, 0), (2, 2),
          ((0, 1), (0, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          preferred_element_type=jnp.int32) + w[f'bq{i}'].reshape(1, 1, 1, -1)
      multiplier = ((x_scale * w[f's{i}']) / y_scale).reshape(1, 1, 1, -1)
      q = jnp.clip(jnp.round(acc.astype(jnp.float32) * multiplier), 0, 255)
      outputs.append(q.astype(jnp.uint8).transpose(0, 3, 1, 2))
    return outputs

  for ours, theirs in zip(codes(images), script.qlinear_codes(w, images), strict=True):
    np.testing.assert_array_equal(np.asarray(ours), theirs)
