"""ONNX export with jax2onnx, proven equal to JAX in onnxruntime on every write.

The exported graph is the whole inference function: the complexity metrics,
the routing with the checkpoint's thresholds (per-sample routing becomes a
`Where`, batch routing an `If`), both paths and the head; optionally the
normalisation of raw uint8 images too. Input `input` has a dynamic batch
dimension; outputs are `logits` [B, classes] and `deep_path` bool [B].

The graph is then rewritten for onnxruntime (`dnnr_jax.io.onnx_passes`): int8
dots become `MatMulInteger` on the int8 weights, and redundant broadcasting
nodes go.

Each export is checked before it is kept: `onnx.checker` (full check), then an
onnxruntime session on real batches (sizes 1, 7 and 128) against JAX: logits
within a tolerance, identical argmax and identical routes. A mismatch raises
`DnnrError` and leaves no file behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dnnr_jax.config import PIXEL_MAX
from dnnr_jax.errors import DnnrError
from dnnr_jax.io import onnx_passes
from dnnr_jax.io.checkpoint import LoadedModel, load_model

OPSET = 21
CHECK_BATCH_SIZES = (1, 7, 128)
# Float paths agree to float32 rounding; integer paths may differ by one
# activation code where JAX and onnxruntime round a tie differently.
TOLERANCE = {'float': 1e-4, 'integer': 5e-2}


def inference_function(model: LoadedModel, *, raw_uint8_input: bool = False):
  """The pure function the export traces: inputs -> (logits, deep_path).

  Args:
    model: a loaded checkpoint.
    raw_uint8_input: take uint8 images [B, side, side] and normalise them in
      the graph, instead of normalised float32 features [B, F].
  """
  def normalised(inputs):
    return model.model.apply(model.variables, inputs)

  if not raw_uint8_input:
    return normalised
  data = model.config.data
  pixel_max = PIXEL_MAX[data.dataset]

  def raw(images):
    pixels = images.reshape(images.shape[0], -1).astype(jnp.float32)
    return normalised((pixels * np.float32(1 / pixel_max) - data.mean) * np.float32(1 / data.std))

  return raw


def default_output(checkpoint: pathlib.Path) -> pathlib.Path:
  """`models/final/model_v1.0_final.onnx` beside `models/final/model_v1.0_final`."""
  return checkpoint.with_name(checkpoint.name + '.onnx')


def export_onnx(
    path: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    raw_uint8_input: bool = False,
    check_inputs: np.ndarray | None = None,
    overwrite: bool = False,
    extra_metadata: dict[str, str] | None = None,
) -> tuple[pathlib.Path, dict[str, Any]]:
  """Exports a checkpoint to ONNX and proves it in onnxruntime.

  Args:
    path: a final, pruned or quantized checkpoint.
    output: the .onnx file; default beside the checkpoint.
    raw_uint8_input: see `inference_function`.
    check_inputs: real inputs (in the export's input format) to compare JAX
      and onnxruntime on; at least 128 rows. None uses standard-normal
      features (or random images), which exercise both routes less well.
    overwrite: replace an existing file.
    extra_metadata: further `metadata_props` entries.

  Returns:
    The written path and the check's report: max abs logit difference per
    batch size, and the tolerance.

  Raises:
    DnnrError: the checkpoint or output path is bad, or onnxruntime disagrees
      with JAX.
  """
  import onnx
  from jax2onnx import to_onnx

  model = load_model(path)
  output = pathlib.Path(output) if output else default_output(model.path)
  if output.suffix != '.onnx':
    raise DnnrError(f'--output {output} does not end in .onnx; name an .onnx file.')
  if output.exists() and not overwrite:
    raise DnnrError(f'{output} already exists; pass --overwrite or another --output.')
  if not output.parent.is_dir() or not os.access(output.parent, os.W_OK):
    raise DnnrError(f'cannot write {output}: {output.parent} is not a writable directory; '
                    'choose another --output.')
  function = inference_function(model, raw_uint8_input=raw_uint8_input)
  side = math.isqrt(model.num_features)
  if raw_uint8_input and side * side != model.num_features:
    raise DnnrError(f'--raw-uint8-input needs square images; {model.path.name} takes '
                    f'{model.num_features} features.')
  batch = jax.export.symbolic_shape('B')[0]
  input_spec = (jax.ShapeDtypeStruct((batch, side, side), jnp.uint8) if raw_uint8_input
                else jax.ShapeDtypeStruct((batch, model.num_features), jnp.float32))
  with _jax_and_flax_plugins_only():
    onnx_model = to_onnx(function, inputs=[input_spec], model_name=model.path.name,
                         opset=OPSET, input_names=['input'],
                         output_names=['logits', 'deep_path'])
  onnx_model = onnx_passes.optimize(onnx_model)
  onnx.checker.check_model(onnx_model, full_check=True)
  # Checked once more without shape inference, which mistypes a Cast of a
  # sparse initializer; onnxruntime runs it below.
  onnx_model = onnx_passes.sparse_initializers(onnx_model)
  onnx.checker.check_model(onnx_model)
  integer = _compute_kind(model) == 'integer'
  _set_metadata(onnx_model, model, raw_uint8_input, extra_metadata or {})
  if check_inputs is None:
    check_inputs = _random_inputs(model, raw_uint8_input, side)
  report = check_against_jax(onnx_model.SerializeToString(), function, check_inputs,
                             TOLERANCE['integer' if integer else 'float'])
  temporary = output.with_name(f'.{output.name}.partial')
  onnx.save(onnx_model, temporary)
  os.replace(temporary, output)
  return output, report


def real_check_inputs(path: str | os.PathLike, *, data_dir=None, rows: int = 256) -> np.ndarray:
  """The first `rows` test examples of the checkpoint's data set, normalised."""
  from dnnr_jax.io.data import load_dataset

  model = load_model(path)
  return np.asarray(load_dataset(model.config.data, data_dir).test.images[:rows])


def _compute_kind(model: LoadedModel) -> str:
  """'integer' when the quantized kernels multiply in integers, else 'float'."""
  quantization = model.metadata.get('quantization')
  if quantization and quantization.get('mode') != 'weight_only':
    return 'integer'
  return 'float'


@contextlib.contextmanager
def _jax_and_flax_plugins_only(trees=('jax', 'flax')):
  """Lets jax2onnx load only its JAX and Flax plugins for one conversion.

  A process's first `to_onnx` imports every plugin jax2onnx ships, and its
  Equinox plugins build and compile example modules as they are imported:
  about 9 of the 10 s that first call took here. The graphs exported here
  need only JAX and Flax primitives (and every export is checked in
  onnxruntime, so a missing one would fail loudly). Afterwards jax2onnx is
  left to import the rest on its next conversion, so other users of it in
  the same process see no difference. With a jax2onnx whose plugin loader
  is not the one this was written against, it does nothing.
  """
  from jax2onnx.plugins import plugin_system

  loader = getattr(plugin_system, '_import_tree', None)
  if loader is None or getattr(plugin_system, '_already_imported_plugins', None) is not False:
    yield
    return
  root = pathlib.Path(plugin_system.__file__).parent
  for tree in trees:
    loader(root / tree, f'jax2onnx.plugins.{tree}')
  plugin_system._already_imported_plugins = True
  try:
    yield
  finally:
    plugin_system._already_imported_plugins = False


def check_against_jax(serialized: bytes, function, inputs: np.ndarray,
                      tolerance: float) -> dict[str, Any]:
  """Runs onnxruntime and JAX on batches of 1, 7 and 128 rows of `inputs`."""
  import onnxruntime

  session = onnxruntime.InferenceSession(serialized, providers=['CPUExecutionProvider'])
  jitted = jax.jit(function)
  differences = {}
  for batch_size in CHECK_BATCH_SIZES:
    batch = inputs[:batch_size]
    logits, deep_path = session.run(['logits', 'deep_path'], {'input': batch})
    reference_logits, reference_path = (np.asarray(value) for value in jitted(batch))
    difference = float(np.max(np.abs(logits - reference_logits)))
    differences[batch_size] = difference
    if (difference > tolerance
        or not np.array_equal(np.argmax(logits, -1), np.argmax(reference_logits, -1))
        or not np.array_equal(deep_path, reference_path)):
      raise DnnrError(
          f'onnxruntime disagrees with JAX at batch {batch_size} (max logit difference '
          f'{difference:.3g}, tolerance {tolerance}, routes equal: '
          f'{np.array_equal(deep_path, reference_path)}); the export was not written.')
  return {'max_abs_logit_difference': differences, 'tolerance': tolerance,
          'batch_sizes': list(CHECK_BATCH_SIZES)}


def _random_inputs(model: LoadedModel, raw_uint8_input: bool, side: int) -> np.ndarray:
  rng = np.random.default_rng(0)
  rows = max(CHECK_BATCH_SIZES)
  if raw_uint8_input:
    top = int(PIXEL_MAX[model.config.data.dataset])
    return rng.integers(0, top + 1, size=(rows, side, side)).astype(np.uint8)
  return rng.normal(size=(rows, model.num_features)).astype(np.float32)


def _set_metadata(onnx_model, model: LoadedModel, raw_uint8_input: bool,
                  extra: dict[str, str]) -> None:
  data = model.config.data
  entries = {
      'dnnr_jax.kind': model.metadata.get('kind', ''),
      'dnnr_jax.version': model.metadata.get('version', ''),
      'dnnr_jax.source_checkpoint': str(model.path),
      'dnnr_jax.routing': model.config.routing.mode,
      'dnnr_jax.thresholds': ','.join(
          f'{name}={float(value):.9g}' for name, value in model.variables['thresholds'].items()),
      'dnnr_jax.normalisation': f'mean={data.mean},std={data.std}',
      'dnnr_jax.input': 'uint8 images' if raw_uint8_input else 'normalised float32 features',
      'dnnr_jax.dataset': data.dataset,
      **extra,
  }
  del onnx_model.metadata_props[:]
  for key, value in entries.items():
    prop = onnx_model.metadata_props.add()
    prop.key, prop.value = key, str(value)
