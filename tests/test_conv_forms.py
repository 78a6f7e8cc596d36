"""scripts/conv_forms.py: every int8 convolution form computes the CNN it is timed as."""

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
  # what compress.static_conv computes (tests/test_static_conv.py: its export equals JAX).
  script = load_script('conv_forms')
  images = np.random.default_rng(2).random((8, 28, 28, 1), dtype=np.float32)
  assert script.qlinear_exact(script.weights(), images)
