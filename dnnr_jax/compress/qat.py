"""Quantization-aware training: fake quantization with a straight-through gradient.

Inside a loss, `fake_quantize_params(params, spec)` makes the forward pass see
exactly the weights integer inference will use, while the optimizer keeps
updating the float params:

  def loss_fn(params, batch):
    logits = apply({'params': qat.fake_quantize_params(params, QuantSpec(bits=4))}, batch)
    ...

After training, `convert` turns the float params into QArrays, and
`dequantize_params(convert(p, spec))` equals `fake_quantize_params(p, spec)` bit for bit:
both run the same `quantize` then `dequantize`.

The gradient is the plain straight-through estimator: identity everywhere.
The variant that zeroes the gradient of clipped weights would change nothing
here, because the range comes from the weights themselves (max|w|, or
[min, max]), so no weight is ever clipped. The scale is treated as a constant:
no gradient flows through max|w|.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dnnr_jax.compress import quantize as quantize_lib
from dnnr_jax.compress.quantize import DEFAULT_SPEC, QuantSpec


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _fake_quantize(w: jax.Array, bits: int, axis: int | None, symmetric: bool) -> jax.Array:
  q = quantize_lib.quantize(w, bits=bits, axis=axis, symmetric=symmetric)
  return quantize_lib.dequantize(q)


def _fake_quantize_fwd(w, bits, axis, symmetric):
  return _fake_quantize(w, bits, axis, symmetric), None


def _fake_quantize_bwd(bits, axis, symmetric, residuals, cotangent):
  del bits, axis, symmetric, residuals  # The straight-through gradient needs none.
  return (cotangent,)


_fake_quantize.defvjp(_fake_quantize_fwd, _fake_quantize_bwd)


def fake_quantize(
    w: jax.Array, *, bits: int = 8, axis: int | None = -1, symmetric: bool = True
) -> jax.Array:
  """`dequantize(quantize(w))` forward, identity gradient.

  Args:
    w: the float array.
    bits: 8, 7 or 4.
    axis: the axis with its own scales (-1: per output channel), or None.
    symmetric: see `quantize.quantize`.

  Returns:
    float32, the shape of `w`, on the quantization grid.
  """
  quantize_lib.code_range(bits, symmetric)  # Fails on bad bits before tracing.
  # float32 before the custom rule, so its cotangent matches its input's dtype.
  return _fake_quantize(jnp.asarray(w, jnp.float32), bits, axis, symmetric)


def fake_quantize_params(params: Any, spec: QuantSpec = DEFAULT_SPEC) -> Any:
  """The params with the leaves `spec.patterns` select fake-quantized.

  Args:
    params: a params pytree.
    spec: how the weights will be quantized (the same spec `convert` takes).

  Returns:
    The same structure of float arrays; differentiable with the STE.
  """
  quantize_lib.code_range(spec.bits, spec.symmetric)
  return quantize_lib.map_matching_leaves(
      lambda w: fake_quantize(w, bits=spec.bits, axis=spec.axis, symmetric=spec.symmetric),
      params, spec.patterns)


def convert(params: Any, spec: QuantSpec = DEFAULT_SPEC) -> Any:
  """Real integer weights after QAT: `quantize_params` with the same spec.

  Pass the spec the training used; then `dequantize_params(convert(p, spec))`
  equals `fake_quantize_params(p, spec)` exactly, so the converted model
  computes what the QAT model was trained to compute.

  Returns:
    The params with the selected leaves as QArrays.
  """
  return quantize_lib.quantize_params(params, spec)
