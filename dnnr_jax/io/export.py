"""ONNX export with jax2onnx, proven equal to JAX in onnxruntime on every write.

The exported graph is the whole inference function: the complexity metrics,
the routing with the checkpoint's thresholds (per-sample routing becomes a
`Where`, batch routing an `If`), both paths and the head; optionally the
normalisation of raw uint8 images too. Input `input` has a dynamic batch
dimension; outputs are `logits` [B, classes] and `deep_path` bool [B]. An
early-exit model routed per sample is exported as two traced stages composed
so that the expensive one runs on the routed rows only (`onnx_routed`).
`routing` overrides the checkpoint's mode, e.g. to export the same model
always-deep for comparison.

The graph is then rewritten for onnxruntime (`dnnr_jax.io.onnx_passes`): int8
dots become u8s8 `MatMulInteger` on the int8 weights, and redundant
broadcasting nodes go. Pruned and 4-bit weights are stored compactly with
standard operators that onnxruntime folds at load (`dnnr_jax.io.onnx_storage`).

Each export is checked before it is kept: `onnx.checker` (full check), then an
onnxruntime session on real batches (sizes 1, 7 and 128) against JAX: logits
within a tolerance, identical argmax and identical routes; then ONNX's own
reference evaluator against onnxruntime on the first rows, so the file is
portable ONNX. A mismatch raises `DnnrError` and leaves no file behind.
and a kept file carries the digest of its graph, weights and metadata
(`dnnr_jax.digest`, see `dnnr_jax.io.integrity`), written whole, fsynced,
or not at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dnnr_jax.compress.quantize import QArray
from dnnr_jax.config import PIXEL_MAX, ROUTING_MODES
from dnnr_jax.errors import DnnrError
from dnnr_jax.io import durable, integrity, onnx_passes, onnx_routed, onnx_storage
from dnnr_jax.io.checkpoint import LoadedModel, load_model
from dnnr_jax.io.pixels import normalise_pixels
from dnnr_jax.model import EarlyExitMLP
from dnnr_jax.train import routed_logits

OPSET = 21
CHECK_BATCH_SIZES = (1, 7, 128)
# Float paths agree to float32 rounding; integer paths may differ by one
# activation code where JAX and onnxruntime round a tie differently.
TOLERANCE = {'float': 1e-4, 'integer': 5e-2}


def inference_function(model: LoadedModel, *, raw_uint8_input: bool = False, method=None):
  """The pure function the export traces: inputs -> (logits, deep_path).

  Args:
    model: a loaded checkpoint.
    raw_uint8_input: take uint8 images [B, side, side] and normalise them in
      the graph, instead of normalised float32 features [B, F].
    method: the module's method to apply instead of `__call__` (a stage).
  """
  def normalised(inputs):
    return model.model.apply(model.variables, inputs, method=method)

  return _from_raw(model, normalised) if raw_uint8_input else normalised


def _from_raw(model: LoadedModel, normalised):
  """`normalised` taking uint8 images [B, side, side], normalised in the graph."""
  data = model.config.data

  def raw(images):
    return normalised(normalise_pixels(images, PIXEL_MAX[data.dataset], data.mean, data.std))

  return raw


def checked_function(model: LoadedModel, *, raw_uint8_input: bool = False):
  """What an export is checked against: `inference_function`, except that an
  early-exit model routed per sample runs its run-everything reference (every
  layer on every row, each row's routed logits kept), which its skipping
  execution in JAX equals (`tests/test_early_exit.py`). One program per batch
  size instead of one expensive stage per bucket size."""
  if not skips_rows(model):
    return inference_function(model, raw_uint8_input=raw_uint8_input)

  def reference(inputs):
    return routed_logits(model.model, model.variables, inputs)

  return _from_raw(model, reference) if raw_uint8_input else reference


def with_routing(model: LoadedModel, routing: str) -> LoadedModel:
  """`model` routed by `routing` ('per_sample', 'batch', 'deep' or 'shallow') instead."""
  if routing not in ROUTING_MODES:
    raise DnnrError(f"routing {routing!r} is not a mode a dnnr_jax model can run; choose one "
                    f"of: {', '.join(ROUTING_MODES)}.")
  config = model.config.replace(
      routing=dataclasses.replace(model.config.routing, mode=routing))
  return dataclasses.replace(model, model=model.model.clone(routing=routing), config=config)


def skips_rows(model: LoadedModel) -> bool:
  """Whether the export runs the expensive stage on the routed rows only."""
  return isinstance(model.model, EarlyExitMLP) and model.model.routing == 'per_sample'


def _routed_graph(model: LoadedModel, raw_uint8_input: bool, input_spec):
  """The per-sample graph of an early-exit model: two traced stages, composed."""
  from jax2onnx import to_onnx

  early_exit = model.model
  hidden_is_input = early_exit.exit_after == 0 and not raw_uint8_input
  cheap_stage = inference_function(model, raw_uint8_input=raw_uint8_input,
                                   method=EarlyExitMLP.cheap)
  cheap_outputs = ['exit_logits', 'deep_path'] + ([] if hidden_is_input else ['hidden'])
  cheap = to_onnx(lambda inputs: cheap_stage(inputs)[:len(cheap_outputs)],
                  inputs=[input_spec], model_name=model.path.name, opset=OPSET,
                  input_names=['input'], output_names=cheap_outputs)
  widths = (model.num_features, *early_exit.hidden_sizes)
  rows = jax.export.symbolic_shape('N')[0]
  expensive = to_onnx(
      lambda hidden: early_exit.apply(model.variables, hidden, method=EarlyExitMLP.expensive),
      inputs=[jax.ShapeDtypeStruct((rows, widths[early_exit.exit_after]), jnp.float32)],
      model_name='expensive_stage', opset=OPSET, input_names=['hidden'],
      output_names=['logits'])
  return onnx_routed.compose_routed(
      onnx_passes.optimize(cheap), onnx_passes.optimize(expensive),
      hidden='input' if hidden_is_input else 'hidden')


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
    routing: str | None = None,
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
    routing: export the model routed in this mode ('per_sample', 'batch',
      'deep', 'shallow') instead of the checkpoint's, e.g. 'deep' for the
      always-deep baseline of the same model.

  Returns:
    The written path and the check's report: max abs logit difference per
    batch size, and the tolerance.

  Raises:
    DnnrError: the checkpoint or output path is bad, or onnxruntime disagrees
      with JAX.
  """
  import onnx
  from jax2onnx import to_onnx

  if routing is not None and routing not in ROUTING_MODES:
    raise DnnrError(f"routing {routing!r} is not a mode a dnnr_jax model can run; choose one "
                    f"of: {', '.join(ROUTING_MODES)}.")
  model = load_model(path)
  if routing is not None:
    model = with_routing(model, routing)
  output = pathlib.Path(output) if output else default_output(model.path)
  if output.suffix != '.onnx':
    raise DnnrError(f'output = {output} does not end in .onnx; name an .onnx file.')
  if output.exists() and not overwrite:
    raise DnnrError(f'{output} already exists; pass overwrite=True or another output=FILE.onnx.')
  durable.check_writable_dir(output.parent, f'ONNX file {output.name}', create=False)
  function = inference_function(model, raw_uint8_input=raw_uint8_input)
  side = math.isqrt(model.num_features)
  if raw_uint8_input and side * side != model.num_features:
    raise DnnrError(f'raw_uint8_input=True needs square images; {model.path.name} takes '
                    f'{model.num_features} features.')
  batch = jax.export.symbolic_shape('B')[0]
  input_spec = (jax.ShapeDtypeStruct((batch, side, side), jnp.uint8) if raw_uint8_input
                else jax.ShapeDtypeStruct((batch, model.num_features), jnp.float32))
  with _jax_plugins_only(), nn.intercept_methods(_float_dense):
    if skips_rows(model):
      onnx_model = _routed_graph(model, raw_uint8_input, input_spec)
    else:
      onnx_model = onnx_passes.optimize(to_onnx(
          function, inputs=[input_spec], model_name=model.path.name, opset=OPSET,
          input_names=['input'], output_names=['logits', 'deep_path']))
  onnx_model = onnx_storage.compact_initializers(onnx_model)
  onnx.checker.check_model(onnx_model, full_check=True)
  integer = _compute_kind(model) == 'integer'
  _set_metadata(onnx_model, model, raw_uint8_input, extra_metadata or {})
  if check_inputs is None:
    check_inputs = _random_inputs(model, raw_uint8_input, side)
  tolerance = TOLERANCE['integer' if integer else 'float']
  report = check_against_jax(
      onnx_model.SerializeToString(), checked_function(model, raw_uint8_input=raw_uint8_input),
      check_inputs, tolerance)
  report['reference_evaluator'] = check_against_reference(onnx_model, check_inputs, tolerance)
  integrity.seal_onnx(onnx_model)
  durable.write_bytes(output, onnx_model.SerializeToString())
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


def _float_dense(next_fun, args, kwargs, context):
  """Computes a float `nn.Dense` from its params as `x @ kernel + bias`, as Flax does.

  Flax's `nn.Dense.__call__` checks its kernel's shape with `jnp.shape(x)`, which
  jax2onnx's JAX plugins turn into a traced value, so it cannot be traced for
  export; the same product, written out, can. Quantized layers (QArray
  kernels) are left to `compress.quantized_apply`'s interception.
  """
  module = context.module
  if (type(module) is not nn.Dense or context.method_name != '__call__'
      or not module.has_variable('params', 'kernel')
      or isinstance(module.get_variable('params', 'kernel'), QArray)):
    return next_fun(*args, **kwargs)
  inputs = args[0]
  outputs = inputs @ module.get_variable('params', 'kernel')
  if module.use_bias:
    bias = module.get_variable('params', 'bias')
    outputs = outputs + bias.reshape((1,) * (outputs.ndim - 1) + (-1,))
  return outputs


@contextlib.contextmanager
def _jax_plugins_only(trees=('jax',)):
  """Lets jax2onnx load only its JAX plugins for one conversion.

  A process's first `to_onnx` imports every plugin jax2onnx ships, and its
  Equinox plugins build and compile example modules as they are imported:
  a fresh `dnnr export` of the smoke model took a median 56 s with them and
  9.3 s without (docs/jax2onnx-plugins.md). The graphs exported here need only
  JAX primitives (and every export is checked in onnxruntime, so a missing
  one would fail loudly). Its Flax plugins are left out too: they replace
  `nn.Dense.__call__` and friends while tracing, which would bypass the
  method interception that runs a quantized model (`compress.quantized_apply`).
  Afterwards jax2onnx is left to import the rest on its next conversion, so
  other users of it in the same process see no difference.

  jax2onnx has no public switch for this (one is worth proposing upstream:
  a list of plugin packages to load), so this sets two of its module
  internals, `plugin_system._import_tree` and `_already_imported_plugins`,
  and is guarded: with a jax2onnx whose loader is not the one this was
  written against (0.17), or if anything here fails, it does nothing and the
  conversion runs through the public `to_onnx` alone, only slower.
  """
  from jax2onnx.plugins import plugin_system

  loader = getattr(plugin_system, '_import_tree', None)
  if loader is None or getattr(plugin_system, '_already_imported_plugins', None) is not False:
    yield
    return
  try:
    root = pathlib.Path(plugin_system.__file__).parent
    for tree in trees:
      loader(root / tree, f'jax2onnx.plugins.{tree}')
    plugin_system._already_imported_plugins = True
  except Exception:  # The public path (every plugin) still converts.
    yield
    return
  try:
    yield
  finally:
    plugin_system._already_imported_plugins = False


def _difference(logits, deep_path, reference_logits, reference_path,
                tolerance: float) -> float | None:
  """The largest logit difference if two runs agree (within `tolerance`, same argmax
  and routes), else None."""
  difference = float(np.max(np.abs(logits - reference_logits)))
  if (difference > tolerance
      or not np.array_equal(np.argmax(logits, -1), np.argmax(reference_logits, -1))
      or not np.array_equal(deep_path, reference_path)):
    return None
  return difference


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
    difference = differences[batch_size] = _difference(
        logits, deep_path, reference_logits, reference_path, tolerance)
    if difference is None:
      difference = float(np.max(np.abs(logits - reference_logits)))
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
      'dnnr_jax.router': model.config.routing.router,
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


# Portability: the file runs in ONNX's reference evaluator, not only in onnxruntime.

REFERENCE_BATCH_SIZES = (1, 7)


def check_against_reference(onnx_model, inputs: np.ndarray, tolerance: float) -> dict[str, Any]:
  """Runs `onnx.reference.ReferenceEvaluator` and onnxruntime on the first rows of `inputs`.

  The reference evaluator is ONNX's executable specification, written in
  NumPy: agreeing with it shows the file uses standard operators only, as
  any conforming runtime reads them.

  Raises:
    DnnrError: the reference evaluator fails or disagrees (logits beyond
      `tolerance`, another argmax or another route).
  """
  import onnxruntime
  from onnx.reference import ReferenceEvaluator

  session = onnxruntime.InferenceSession(onnx_model.SerializeToString(),
                                         providers=['CPUExecutionProvider'])
  try:
    reference = ReferenceEvaluator(onnx_model)
  except Exception as error:  # the evaluator raises many types for what it cannot run
    raise DnnrError(f'ONNX\'s reference evaluator cannot load the export ({error}); '
                    'the export was not written.') from None
  differences = {}
  for batch_size in REFERENCE_BATCH_SIZES:
    batch = inputs[:batch_size]
    logits, deep_path = session.run(['logits', 'deep_path'], {'input': batch})
    reference_logits, reference_path = reference.run(['logits', 'deep_path'], {'input': batch})
    difference = differences[batch_size] = _difference(
        logits, deep_path, reference_logits, reference_path, tolerance)
    if difference is None:
      difference = float(np.max(np.abs(logits - reference_logits)))
      raise DnnrError(
          f'ONNX\'s reference evaluator disagrees with onnxruntime at batch {batch_size} '
          f'(max logit difference {difference:.3g}, tolerance {tolerance}); the export was '
          'not written.')
  return {'max_abs_logit_difference': differences, 'batch_sizes': list(REFERENCE_BATCH_SIZES)}
