"""ONNX export: onnxruntime agrees with JAX for every kind of checkpoint."""

import collections
import logging
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx.reference import ReferenceEvaluator

from dnnr_jax.config import PruneConfig, QuantizeConfig, load_config
from dnnr_jax.errors import DnnrError
from dnnr_jax.io import export
from dnnr_jax.io.checkpoint import load_model
from dnnr_jax.jobs import compress as compress_jobs
from dnnr_jax.jobs import train as jobs
from tests.cli_helpers import one_json, run
from tests.conftest import SMOKE_CONFIG

logging.getLogger('onnx_ir').setLevel(logging.ERROR)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """A smoke model in per-sample and in batch routing, shrunk, and int8."""
  root = tmp_path_factory.mktemp('export')
  made = {}
  for routing in ('per_sample', 'batch'):
    config = load_config(SMOKE_CONFIG, ['training.epochs=2', f'routing.mode={routing}'])
    made[routing], _ = jobs.train_and_save(config, models_dir=root / routing)
  made['structured'] = compress_jobs.prune_checkpoint(made['per_sample'], PruneConfig(
      method='structured', sparsity=0.5, schedule='oneshot', finetune_epochs=0)).path
  for name, source, mode in (('int8', 'per_sample', 'dynamic'), ('int8_batch', 'batch', 'dynamic'),
                             ('static', 'per_sample', 'static')):
    made[name] = compress_jobs.quantize_checkpoint(made[source], QuantizeConfig(mode=mode)).path
  pruned = compress_jobs.prune_checkpoint(made['per_sample'], PruneConfig(
      method='global', sparsity=0.9, schedule='oneshot', finetune_epochs=0)).path
  made['int4_pruned'] = compress_jobs.quantize_checkpoint(
      pruned, QuantizeConfig(mode='dynamic', bits=4)).path
  return made


def _inputs(path):
  return export.real_check_inputs(path, rows=128)


def _operators(path):
  return collections.Counter(node.op_type for node in onnx.load(path).graph.node)


@pytest.mark.parametrize(
    'name', ['per_sample', 'batch', 'structured', 'int8', 'int8_batch', 'static', 'int4_pruned'])
def test_export_agrees_with_jax(checkpoints, name):
  path = checkpoints[name]
  output, report = export.export_onnx(path, check_inputs=_inputs(path))
  assert output == path.with_name(path.name + '.onnx') and output.is_file()
  model = load_model(path)
  session = onnxruntime.InferenceSession(str(output), providers=['CPUExecutionProvider'])
  inputs = _inputs(path)
  for batch_size in (1, 7, 128):
    logits, deep_path = session.run(['logits', 'deep_path'], {'input': inputs[:batch_size]})
    reference, reference_path = model.predict_with_routes(inputs[:batch_size])
    assert logits.shape == (batch_size, 10)
    np.testing.assert_allclose(logits, reference, atol=report['tolerance'])
    np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(reference, -1))
    np.testing.assert_array_equal(deep_path, reference_path)
  assert set(report['max_abs_logit_difference']) == {1, 7, 128}


def test_routing_lowers_to_where_or_if(checkpoints):
  per_sample, _ = export.export_onnx(checkpoints['per_sample'], output=checkpoints[
      'per_sample'].parent / 'where.onnx', check_inputs=_inputs(checkpoints['per_sample']))
  batch, _ = export.export_onnx(checkpoints['batch'], output=checkpoints[
      'batch'].parent / 'if.onnx', check_inputs=_inputs(checkpoints['batch']))
  assert _operators(per_sample)['If'] == 0 and _operators(per_sample)['Where'] >= 1
  assert _operators(batch)['If'] == 1
  (branch,) = [node for node in onnx.load(batch).graph.node if node.op_type == 'If']
  for attribute in branch.attribute:  # onnxruntime warns of each unused one as it drops it
    used = {name for node in attribute.g.node for name in node.input}
    assert attribute.g.initializer and all(init.name in used for init in attribute.g.initializer)


@pytest.mark.parametrize('routing, layers', [
    ('deep', ['Gemm', 'Relu', 'Gemm', 'Relu', 'Gemm', 'Relu', 'Gemm']),
    ('shallow', ['Gemm', 'Relu', 'Gemm', 'Relu', 'Gemm', 'Gemm']),
])
def test_fixed_routing_exports_its_layers_alone(checkpoints, routing, layers):
  path = checkpoints['per_sample']
  output, _ = export.export_onnx(path, output=path.parent / f'{routing}.onnx', routing=routing,
                                 check_inputs=_inputs(path))
  operators = [node.op_type for node in onnx.load(output).graph.node]
  # The routes are the batch size's constant (read from the input), with no complexity metric.
  assert [op for op in operators if op not in ('Shape', 'Expand')] == layers


def test_int8_weights_stay_int8(checkpoints):
  float_file, _ = export.export_onnx(checkpoints['per_sample'], output=checkpoints[
      'per_sample'].parent / 'float.onnx', check_inputs=_inputs(checkpoints['per_sample']))
  int8_file, _ = export.export_onnx(checkpoints['int8'], output=checkpoints[
      'int8'].parent / 'int8.onnx', check_inputs=_inputs(checkpoints['int8']))
  kinds = collections.Counter(tensor.data_type for tensor in onnx.load(int8_file).graph.initializer)
  assert kinds[onnx.TensorProto.INT8] == 5
  # Every int8 dot runs as MatMulInteger on uint8 activations and int8 weights
  # (u8s8: onnxruntime's fast kernels; its s8s8 kernel is slower than float).
  graph = onnx.shape_inference.infer_shapes(onnx.load(int8_file), strict_mode=True).graph
  types = {value.name: value.type.tensor_type.elem_type
           for value in [*graph.value_info, *graph.input]}
  types.update({tensor.name: tensor.data_type for tensor in graph.initializer})
  integer = [node for node in graph.node if node.op_type == 'MatMulInteger']
  assert len(integer) == 5 and _operators(int8_file)['MatMul'] == 0
  assert {types[node.input[0]] for node in integer} == {onnx.TensorProto.UINT8}
  assert {types[node.input[1]] for node in integer} == {onnx.TensorProto.INT8}
  # The quantized activations are shifted to uint8 before their cast, not widened after it.
  assert not [node for node in graph.node if node.op_type == 'Cast'
              and onnx.helper.get_attribute_value(node.attribute[0]) == onnx.TensorProto.INT16]

  def weight_bytes(path):
    return sum(len(tensor.raw_data) for tensor in onnx.load(path).graph.initializer)

  # The weights: a toy model's graph is mostly nodes, so compare what they hold.
  assert weight_bytes(int8_file) < 0.4 * weight_bytes(float_file)


def test_metadata_props(checkpoints):
  output, _ = export.export_onnx(checkpoints['per_sample'], output=checkpoints[
      'per_sample'].parent / 'meta.onnx', check_inputs=_inputs(checkpoints['per_sample']))
  props = {prop.key: prop.value for prop in onnx.load(output).metadata_props}
  model = load_model(checkpoints['per_sample'])
  assert props['dnnr_jax.version'] == '1.0'
  assert props['dnnr_jax.source_checkpoint'] == str(model.path)
  assert props['dnnr_jax.normalisation'] == 'mean=0.3053,std=0.376'
  for name, value in model.variables['thresholds'].items():
    assert f'{name}={float(value):.9g}' in props['dnnr_jax.thresholds']


def test_raw_uint8_input_normalises_inside_the_graph(checkpoints):
  path = checkpoints['per_sample']
  output, _ = export.export_onnx(path, output=path.parent / 'raw.onnx', raw_uint8_input=True)
  graph_input = onnx.load(output).graph.input[0]
  assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
  assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [
      'B', 8, 8]
  images = np.random.default_rng(0).integers(0, 17, size=(5, 8, 8)).astype(np.uint8)
  session = onnxruntime.InferenceSession(str(output), providers=['CPUExecutionProvider'])
  logits, _ = session.run(['logits', 'deep_path'], {'input': images})
  normalised = (images.reshape(5, 64) / 16.0 - 0.3053) / 0.3760
  np.testing.assert_allclose(logits, load_model(path).predict(normalised), atol=1e-4)


def test_a_mismatch_fails_and_writes_nothing(checkpoints, monkeypatch):
  path = checkpoints['per_sample']
  monkeypatch.setitem(export.TOLERANCE, 'float', -1.0)
  with pytest.raises(DnnrError, match='onnxruntime disagrees with JAX'):
    export.export_onnx(path, output=path.parent / 'bad.onnx', check_inputs=_inputs(path))
  assert not list(path.parent.glob('*bad.onnx*'))


@pytest.mark.parametrize('output, words', [
    ('model.txt', 'does not end in .onnx'),
    ('missing/dir/model.onnx', 'not a writable directory'),
])
def test_bad_outputs(checkpoints, tmp_path, output, words):
  with pytest.raises(DnnrError, match=words):
    export.export_onnx(checkpoints['per_sample'], output=tmp_path / output)


def test_existing_file_is_kept_without_overwrite(checkpoints, tmp_path):
  target = tmp_path / 'kept.onnx'
  target.write_bytes(b'old')
  with pytest.raises(DnnrError, match='already exists'):
    export.export_onnx(checkpoints['per_sample'], output=target)
  assert target.read_bytes() == b'old'


def test_cli_export(checkpoints, tmp_path):
  output = tmp_path / 'cli.onnx'
  summary = one_json(run(sys.executable, '-m', 'dnnr_jax', 'export', checkpoints['int8'],
                         '--output', output, '--json'))
  assert summary['path'] == str(output) and output.is_file()
  assert summary['tolerance'] == export.TOLERANCE['integer']
  refused = run(sys.executable, '-m', 'dnnr_jax', 'export', checkpoints['int8'],
                '--output', output)
  assert refused.returncode == 2 and 'already exists' in refused.stderr


def test_conversion_imports_only_the_jax_plugins(checkpoints, tmp_path):
  # The Equinox plugins cost most of a first export (docs/jax2onnx-plugins.md),
  # and the Flax ones would replace the nn.Dense calls a quantized model
  # intercepts; every conversion in this process went through export_onnx.
  export.export_onnx(checkpoints['per_sample'], output=tmp_path / 'plugins.onnx')
  loaded = [name for name in sys.modules if name.startswith('jax2onnx.plugins.')]
  assert any(name.startswith('jax2onnx.plugins.jax.') for name in loaded)
  assert not [name for name in loaded if name.startswith(('jax2onnx.plugins.equinox',
                                                          'jax2onnx.plugins.flax.'))]


def test_pruned_4bit_export_is_compact_portable_and_folded_at_load(checkpoints, tmp_path):
  float_file, _ = export.export_onnx(checkpoints['per_sample'], output=tmp_path / 'float.onnx',
                                     check_inputs=_inputs(checkpoints['per_sample']))
  path = checkpoints['int4_pruned']
  output, report = export.export_onnx(path, output=tmp_path / 'int4.onnx',
                                      check_inputs=_inputs(path))
  model = onnx.load(output)
  onnx.checker.check_model(model, full_check=True)
  assert not model.graph.sparse_initializer
  kinds = collections.Counter(tensor.data_type for tensor in model.graph.initializer)
  assert kinds[onnx.TensorProto.INT4] >= 4  # the four larger kernels: values, two a byte
  assert set(report['reference_evaluator']['max_abs_logit_difference']) == {1, 7}
  inputs = _inputs(path)[:16]
  options = onnxruntime.SessionOptions()
  options.optimized_model_filepath = str(tmp_path / 'optimized.onnx')
  session = onnxruntime.InferenceSession(str(output), options,
                                         providers=['CPUExecutionProvider'])
  logits, deep_path = session.run(['logits', 'deep_path'], {'input': inputs})
  reference_logits, reference_path = ReferenceEvaluator(model).run(
      ['logits', 'deep_path'], {'input': inputs})
  np.testing.assert_allclose(reference_logits, logits, atol=1e-5)
  np.testing.assert_array_equal(reference_path, deep_path)
  # onnxruntime decodes the weights once, when the session is created.
  folded = collections.Counter(node.op_type for node in onnx.load(
      tmp_path / 'optimized.onnx').graph.node)
  assert not {'ScatterElements', 'CumSum', 'ConstantOfShape'} & set(folded)

  def weight_bytes(path):
    return sum(len(tensor.raw_data) for tensor in onnx.load(path).graph.initializer)

  # A toy model's float biases and scales weigh as much as its kernels; stored as int8
  # (4 370 bytes) or with int64 positions (about 3 900) the file would miss this.
  assert weight_bytes(output) < weight_bytes(float_file) / 8
