"""A quantized Linen `nn.Einsum` as one matrix product, on the kernels of `compress.layers`.

An equation 'btd,dhk->bthk' (input, kernel -> output) names three kinds of
letters: contracted (input and kernel, not output: d), features (kernel and
output: h, k) and batch (input and output: b, t). The input is moved to
[*batch, *contracted] and flattened into rows; the kernel, stored as the
user's module declares it, is moved to [*contracted, *features] and read as
the matrix [prod(contracted), prod(features)], so every mode runs through the
same matmuls as Dense (`layers.matmul`); the product is moved back to the
output's letter order and the bias added as Flax adds it.

The kernel keeps its per-channel scales along its last axis (as any kernel
the rules quantize), so that axis must be a feature. Equations this cannot
write as one matrix product (an ellipsis, a repeated letter, a kernel axis
that is also a batch axis, a letter summed within one operand) are refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from dnnr_jax.compress import layers, quantize
from dnnr_jax.errors import QuantizationError


@dataclasses.dataclass(frozen=True)
class EinsumSpec:
  """The letters of an equation 'inputs,kernel->output'.

  Attributes:
    inputs, kernel, output: the three letter strings.
    batch: the input's letters that reach the output, in input order.
    contracted: the kernel's letters summed with the input's, in kernel order.
    features: the kernel's letters that reach the output, in kernel order.
  """
  inputs: str
  kernel: str
  output: str
  batch: tuple[str, ...]
  contracted: tuple[str, ...]
  features: tuple[str, ...]


def spec_of(equation: str | None, path: str) -> EinsumSpec:
  """The EinsumSpec of `equation`; QuantizationError names `path` if it cannot be one."""
  equation = (equation or '').replace(' ', '')
  operands, _, output = equation.partition('->')
  inputs, _, kernel = operands.partition(',')
  letters = set(inputs) | set(kernel) | set(output)
  batch = tuple(c for c in inputs if c in output)
  contracted = tuple(c for c in kernel if c in inputs and c not in output)
  features = tuple(c for c in kernel if c in output and c not in inputs)
  if ('.' in equation or '->' not in equation or ',' in kernel or not kernel
      or not all(c.isalpha() for c in letters)
      or any(len(set(s)) != len(s) for s in (inputs, kernel, output))
      or set(inputs) != set(batch) | set(contracted)
      or set(kernel) != set(contracted) | set(features)
      or set(output) != set(batch) | set(features) or not features
      or kernel[-1] not in features):
    raise QuantizationError(
        f'layer {path!r} (Einsum) has equation {equation!r}, which the quantizer cannot write as '
        'one matrix product (it needs explicit letters, each kernel axis contracted with the '
        'input or an output feature, the last kernel axis a feature); exclude it from the '
        'rules.')
  return EinsumSpec(inputs, kernel, output, batch, contracted, features)


def forward(spec: EinsumSpec, mode: str, kernel: Any, bias: Any, inputs: jax.Array,
            activation_scale: jax.Array | None = None,
            activations: str = 'per_row') -> jax.Array:
  """The layer's output, with `kernel` (a QArray, or a float one for 'qat') used as `mode`
  says; as `layers.forward`."""
  moved = _move(inputs, spec.inputs, spec.batch + spec.contracted)
  batch_shape = moved.shape[:len(spec.batch)]
  rows = moved.reshape(math.prod(batch_shape), -1)
  matrix_kernel = _move_kernel(kernel, spec.kernel, spec.contracted + spec.features)
  feature_shape = tuple(matrix_kernel.shape[len(spec.contracted):])
  outputs = layers.matmul(mode, rows, matrix_kernel, len(spec.features), activation_scale,
                          activations)
  outputs = _move(outputs.reshape(*batch_shape, *feature_shape), spec.batch + spec.features,
                  tuple(spec.output))
  if bias is None:
    return outputs
  sizes = dict(zip(spec.kernel, kernel.shape, strict=True))
  return outputs + jnp.reshape(bias, [sizes.get(c, 1) for c in spec.output])


def bias_shape(spec: EinsumSpec, kernel_shape) -> tuple[int, ...]:
  """The bias shape Flax gives the layer: the feature sizes, in output order."""
  sizes = dict(zip(spec.kernel, kernel_shape, strict=True))
  return tuple(sizes[c] for c in spec.output if c in sizes)


def _move(x: jax.Array, have: str | tuple[str, ...], want: tuple[str, ...]) -> jax.Array:
  order = tuple(have)
  if order == want:  # No identity transpose: traced for ONNX it would stay in the graph.
    return x
  return jnp.transpose(x, [order.index(c) for c in want])


def _move_kernel(kernel: Any, have: str, want: tuple[str, ...]) -> Any:
  if not isinstance(kernel, quantize.QArray):
    return _move(kernel, have, want)
  if tuple(have) == want:
    return kernel
  perm = [have.index(c) for c in want]

  def move(a):
    return None if a is None else jnp.transpose(a, perm)

  axis = None if kernel.axis is None else perm.index(kernel.axis)
  return quantize.QArray(move(kernel.value), move(kernel.scale), move(kernel.zero_point),
                         bits=kernel.bits, axis=axis, symmetric=kernel.symmetric)
