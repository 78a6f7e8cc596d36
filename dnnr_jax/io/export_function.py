"""ONNX export of any jittable function of params and one input, proven in onnxruntime.

`export_onnx_function(output, apply_fn, params, example_input)` traces
`x -> apply_fn(params, x)` with jax2onnx (a dynamic batch axis), rewrites the
graph with `dnnr_jax.io.onnx_passes` (int8 dots become `MatMulInteger` on
int8 initializers; pruned initializers are stored sparse), and keeps the
file only if onnxruntime agrees with JAX on `check_inputs`: equal argmax over
the last axis and outputs within `tolerance`.

jax2onnx 0.17.1 lowers an integer matmul only as `jnp.dot`/`jnp.matmul` with
`preferred_element_type=jnp.int32` (the form `compress.quantize` uses);
anything it cannot lower surfaces as a DnnrError naming the error. Only
jax2onnx's JAX plugins are loaded: its Flax plugins replace `nn.Conv.__call__`
and friends while tracing, which would bypass `compress.quantized_apply`.
Flax's float `nn.Conv` does not trace under the JAX plugins alone; such a
function is exported from its jaxpr instead. Not lowered today: a Linen model
mixing a float `nn.Conv` with int8 layers (the jaxpr route turns the int8 dot
into an integer Gemm, which ONNX lacks); quantize its every Conv, or all of it.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable

import jax
import jax.extend
import numpy as np

from dnnr_jax.errors import DnnrError
from dnnr_jax.io import onnx_passes, onnx_storage
from dnnr_jax.io.export import OPSET, _jax_plugins_only


def export_onnx_function(
    output: str | os.PathLike, apply_fn: Callable[[Any, Any], Any], params: Any,
    example_input: np.ndarray, *, check_inputs: np.ndarray | None = None,
    tolerance: float = 1e-2, overwrite: bool = False,
) -> tuple[pathlib.Path, dict[str, Any]]:
  """Writes `apply_fn(params, input)` as ONNX at `output`, checked against JAX.

  Args:
    output: the .onnx file.
    apply_fn: (params, x) -> one array [B, ...], jittable, e.g.
      `lambda p, x: compress.quantized_apply(model, rules)({'params': p}, x)`.
    params: baked into the graph as initializers.
    example_input: one batch; its dtype and non-batch shape define the input.
    check_inputs: rows to compare on (default: `example_input`).
    tolerance: the largest output difference allowed, relative to the largest
      |output| (at least 1): integer paths may differ by one activation code
      where JAX and onnxruntime round a tie apart, and over many rows that
      happens; the argmax must agree on every row.
    overwrite: replace an existing file.

  Returns:
    The path and {'max_abs_difference', 'argmax_agreement', 'rows'}.
  """
  import onnx

  output = pathlib.Path(output)
  if output.suffix != '.onnx' or (output.exists() and not overwrite):
    raise DnnrError(f'output {output} must be a new .onnx file; rename it or pass overwrite=True.')
  example_input = np.asarray(example_input)
  batch = jax.export.symbolic_shape('B')[0]
  spec = jax.ShapeDtypeStruct((batch, *example_input.shape[1:]), example_input.dtype)

  def function(inputs):
    return apply_fn(params, inputs)

  # JAX plugins only: jax2onnx's Flax plugins replace `nn.Conv.__call__` and
  # friends while it traces, which would bypass `compress.quantized_apply`.
  # Flax's float Conv does not trace under the JAX plugins alone, so a
  # function that fails so is traced to a jaxpr first and exported from that
  # (where, in turn, an int8 `jnp.dot` lowers to an invalid integer Gemm).
  try:
    model = _to_onnx(function, spec, output.stem)
  except Exception:  # jax2onnx raises many types for what it cannot lower.
    try:
      staged = jax.extend.core.jaxpr_as_fun(jax.make_jaxpr(function)(spec))
      model = _to_onnx(lambda inputs: staged(inputs)[0], spec, output.stem)
    except Exception as error:
      raise DnnrError(f'jax2onnx cannot lower apply_fn: {str(error).splitlines()[0][:300]}; '
                      'rewrite that operation with jnp primitives it supports.') from None
  model = onnx_passes.optimize(model)
  onnx.checker.check_model(model, full_check=True)
  model = onnx_storage.compact_initializers(model)
  report = _check(model.SerializeToString(), jax.jit(function),
                  np.asarray(example_input if check_inputs is None else check_inputs), tolerance)
  temporary = output.with_name(f'.{output.name}.partial')
  onnx.save(model, temporary)
  os.replace(temporary, output)
  return output, report


def _to_onnx(function, spec, name):
  from jax2onnx import to_onnx

  with _jax_plugins_only():
    return to_onnx(function, inputs=[spec], model_name=name, opset=OPSET,
                   input_names=['input'], output_names=['output'])


def _check(serialized: bytes, function, inputs: np.ndarray, tolerance: float) -> dict[str, Any]:
  import onnxruntime

  session = onnxruntime.InferenceSession(serialized, providers=['CPUExecutionProvider'])
  ours, reference = [], []
  for start in range(0, len(inputs), 256):
    batch = inputs[start:start + 256]
    ours.append(session.run(['output'], {'input': batch})[0])
    reference.append(np.asarray(function(batch)))
  ours, reference = np.concatenate(ours), np.concatenate(reference)
  difference = float(np.max(np.abs(ours - reference)))
  allowed = tolerance * max(1.0, float(np.max(np.abs(reference))))
  agreement = float(np.mean(np.argmax(ours, -1) == np.argmax(reference, -1)))
  if difference > allowed or agreement < 1.0:
    raise DnnrError(f'onnxruntime disagrees with JAX (max difference {difference:.3g}, allowed '
                    f'{allowed:.3g}, argmax agreement {agreement:.4f}); the export was not '
                    'written.')
  return {'max_abs_difference': difference, 'allowed': allowed, 'argmax_agreement': agreement,
          'rows': len(inputs)}
