"""Calibration to a compute budget, and exports that skip the expensive stage."""

import collections
import functools
import logging
import sys

import jax
import numpy as np
import onnx
import onnxruntime
import pytest

from dnnr_jax.config import PruneConfig, QuantizeConfig, load_config
from dnnr_jax.cost import route_cost
from dnnr_jax.errors import DnnrError
from dnnr_jax.io import checkpoint as checkpoint_lib
from dnnr_jax.io import export
from dnnr_jax.io.data import load_dataset
from dnnr_jax.jobs import calibrate
from dnnr_jax.jobs import train as jobs
from dnnr_jax.model import EarlyExitMLP
from dnnr_jax.train import evaluate
from tests.cli_helpers import assert_one_line_error, one_json, run, run_all, snapshot
from tests.conftest import SMOKE_CONFIG

logging.getLogger('onnx_ir').setLevel(logging.ERROR)

EARLY_EXIT = ['model.family=early_exit', 'model.hidden_sizes=[32, 32]', 'model.exit_width=8',
              'routing.router=confidence', 'data.validation_size=300', 'training.epochs=2']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A small early-exit digits model with a validation split, and its data."""
  root = tmp_path_factory.mktemp('dynamic')
  config = load_config(SMOKE_CONFIG, EARLY_EXIT)
  path, _ = jobs.train_and_save(config, models_dir=root / 'models')
  return path, load_dataset(config.data)


def _scores(confidence, variance=None, entropy=None, sparsity=None):
  size = len(confidence)
  ones = np.ones(size, np.float32)
  return calibrate.RouterScores(
      np.asarray(confidence, np.float32),
      {'variance': np.asarray(variance if variance is not None else ones, np.float32),
       'entropy': np.asarray(entropy if entropy is not None else ones, np.float32),
       'sparsity': np.asarray(sparsity if sparsity is not None else 0 * ones, np.float32)},
      np.zeros(size, bool), np.ones(size, bool))


@pytest.mark.parametrize('fraction', [0.0, 0.1, 0.37, 0.5, 1.0])
def test_the_quantile_sends_the_asked_fraction_deep(fraction):
  rng = np.random.default_rng(0)
  scores = _scores(rng.uniform(0.1, 1.0, 1000), variance=rng.normal(size=1000),
                   entropy=np.tile([0.0, 1.0], 500))  # only odd rows pass the entropy test
  base = {'variance': 0.0, 'entropy': 0.5, 'sparsity': 0.5, 'confidence': 0.9}
  chosen = calibrate.choose_thresholds('confidence', base, scores, fraction)
  assert np.sum(calibrate.routes('confidence', chosen, scores)) == round(fraction * 1000)
  # The complexity router moves only the variance threshold, among the 500 it admits.
  chosen = calibrate.choose_thresholds('complexity', base, scores, fraction / 2)
  assert {name: chosen[name] for name in ('entropy', 'sparsity')} == {
      'entropy': 0.5, 'sparsity': 0.5}
  assert np.sum(calibrate.routes('complexity', chosen, scores)) == round(fraction / 2 * 1000)


def test_calibration_meets_the_budget_on_validation(trained, tmp_path):
  path, dataset = trained
  budget = 0.5
  result = calibrate.calibrate_checkpoint(path, budget=budget, models_dir=tmp_path)
  saved, summary = result.path, result.to_dict()
  assert saved == tmp_path / 'calibrated' / 'calibrated_model_v1.0'
  assert summary['path'] == str(saved) and result.metadata['kind'] == 'calibrated'
  calibration = result.calibration
  assert result.validation == calibration['validation']
  model = checkpoint_lib.load_model(saved)
  cost = route_cost(model.model, model.num_features)
  measured = evaluate(model.model, model.variables, dataset.validation, 1000)
  # Met to one validation example (300 here) of deep fraction.
  one_example = cost.expensive / cost.always_deep / len(dataset.validation.labels)
  assert abs(calibration['validation']['compute_fraction'] - budget) <= one_example
  assert measured['deep_fraction'] == pytest.approx(calibration['validation']['deep_fraction'])
  assert measured['accuracy'] == pytest.approx(calibration['validation']['accuracy'])
  # The loss is a mean over differently shaped matmuls (buckets against one
  # pass); some CPUs' kernels round it apart in the seventh digit.
  recorded = summary['metrics']['validation']
  assert recorded == {**measured, 'loss': pytest.approx(measured['loss'], rel=1e-6)}
  assert calibration['budget'] == budget and calibration['router'] == 'confidence'
  assert float(model.variables['thresholds']['confidence']) == pytest.approx(
      calibration['thresholds']['confidence'])
  assert model.config.thresholds.confidence == pytest.approx(
      calibration['thresholds']['confidence'])


def test_a_budget_below_the_exit_alone_is_refused(trained, tmp_path):
  path, _ = trained
  with pytest.raises(DnnrError, match='below what the exit alone costs'):
    calibrate.calibrate_checkpoint(path, budget=0.01, models_dir=tmp_path)
  assert not (tmp_path / 'calibrated').exists()


@pytest.fixture(scope='module')
def routed_onnx(trained, tmp_path_factory):
  """The model exported per sample (the skipping graph) with routes on both sides."""
  path, dataset = trained
  saved = calibrate.calibrate_checkpoint(
      path, budget=0.5, target='deep_fraction', models_dir=tmp_path_factory.mktemp('cal')).path
  inputs = np.asarray(dataset.test.images)
  output, _ = export.export_onnx(saved, check_inputs=inputs, routing='per_sample')
  return checkpoint_lib.load_model(saved), output, inputs


def test_the_per_sample_graph_gathers_and_scatters_routed_rows(routed_onnx):
  _, output, _ = routed_onnx
  graph = onnx.load(output).graph
  operators = collections.Counter(node.op_type for node in graph.node)
  assert operators['If'] == 1
  assert 'Where' not in operators and 'Gemm' in operators  # the exit
  (branch,) = [node for node in graph.node if node.op_type == 'If']
  branches = {attribute.name: {node.op_type for node in attribute.g.node}
              for attribute in branch.attribute}
  assert {'NonZero', 'GatherND', 'Gemm', 'ScatterND'} <= branches['then_branch']
  assert branches['else_branch'] == {'Identity'}  # no routed row: the exit's logits
  # The condition, any row routed, is one node on the routes.
  (condition,) = [node for node in graph.node if node.output[0] == branch.input[0]]
  assert (condition.op_type, list(condition.input)) == ('ReduceMax', ['deep_path'])
  # The expensive stage's weights are only in the branch that runs on routed rows.
  assert not any(tensor.name.startswith('deep/') for tensor in graph.initializer)


@pytest.mark.parametrize('rows', ['deep', 'shallow', 'mixed', 'one deep', 'one shallow'])
def test_onnxruntime_equals_the_run_everything_reference(routed_onnx, rows):
  model, output, inputs = routed_onnx
  head, deep_path, exit_logits = (np.asarray(value) for value in jax.jit(functools.partial(
      model.model.apply, method=EarlyExitMLP.joint))(model.variables, inputs))
  chosen = {'deep': np.flatnonzero(deep_path)[:50], 'shallow': np.flatnonzero(~deep_path)[:50],
            'mixed': np.arange(64), 'one deep': np.flatnonzero(deep_path)[:1],
            'one shallow': np.flatnonzero(~deep_path)[:1]}[rows]
  assert len(chosen)
  session = onnxruntime.InferenceSession(str(output), providers=['CPUExecutionProvider'])
  logits, routes = session.run(['logits', 'deep_path'], {'input': inputs[chosen]})
  np.testing.assert_array_equal(routes, deep_path[chosen])
  reference = np.where(deep_path[chosen, None], head[chosen], exit_logits[chosen])
  np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)


def test_cli_calibrate_and_export_routing(trained, tmp_path):
  path, _ = trained
  result = run(sys.executable, '-m', 'dnnr_jax', 'calibrate', path, '--budget', '0.6',
               '--models-dir', tmp_path, '--json')
  summary = one_json(result)
  assert summary['calibration']['budget'] == 0.6
  calibrated = summary['path']
  before = snapshot(tmp_path)
  bad = {
      'budget 0': (['--budget', '0'], ['budget', '(0, 1]']),
      'budget 1.5': (['--budget', '1.5'], ['budget', '1.5']),
      'router': (['--budget', '0.5', '--router', 'magic'], ['router', 'magic']),
  }
  commands = {name: (sys.executable, '-m', 'dnnr_jax', 'calibrate', calibrated, *arguments,
                     '--models-dir', tmp_path) for name, (arguments, _) in bad.items()}
  commands['routing'] = (sys.executable, '-m', 'dnnr_jax', 'export', calibrated,
                         '--routing', 'sideways')
  results = run_all(commands)
  for name, (_, words) in bad.items():
    assert_one_line_error(results[name], words)
  assert_one_line_error(results['routing'], ['sideways', 'per_sample'])
  assert snapshot(tmp_path) == before
  exported = one_json(run(sys.executable, '-m', 'dnnr_jax', 'export', calibrated,
                          '--routing', 'deep', '--output', tmp_path / 'deep.onnx', '--json'))
  session = onnxruntime.InferenceSession(exported['path'], providers=['CPUExecutionProvider'])
  metadata = session.get_modelmeta().custom_metadata_map
  assert metadata['dnnr_jax.routing'] == 'deep'
  assert {node.op_type for node in onnx.load(exported['path']).graph.node}.isdisjoint(
      {'If', 'NonZero'})


def test_calibrating_without_a_validation_split_is_refused(trained, tmp_path):
  path, _ = trained
  source = checkpoint_lib.load_model(path)
  config = source.config.to_dict()
  config['data']['validation_size'] = 0
  unvalidated = checkpoint_lib.save_checkpoint(
      tmp_path / 'final' / 'model_v1.0_final', source.variables,
      {**source.metadata, 'config': config})
  before = snapshot(tmp_path)
  assert_one_line_error(run(sys.executable, '-m', 'dnnr_jax', 'calibrate', unvalidated,
                            '--budget', '0.5'), ['validation'])
  assert snapshot(tmp_path) == before


def test_prune_quantize_and_export_keep_working(routed_onnx, tmp_path):
  from dnnr_jax.jobs import compress as compress_jobs

  path = routed_onnx[0].path  # calibrated: half the examples take each route
  pruned = compress_jobs.prune_checkpoint(path, PruneConfig(
      sparsity=0.5, schedule='oneshot', finetune_epochs=1), models_dir=tmp_path)
  # The route report compares routes with the source and scores each route.
  routes = pruned.metadata['routes']
  assert routes['route_agreement'] > 0.6
  assert routes['deep_accuracy'] is not None
  assert routes['shallow_accuracy'] is not None
  quantized = compress_jobs.quantize_checkpoint(
      pruned.path, QuantizeConfig(mode='static'), models_dir=tmp_path)
  assert quantized.metadata['metrics']['test']['accuracy'] > 0.8
  quantized = quantized.path
  output, report = export.export_onnx(quantized, check_inputs=export.real_check_inputs(path))
  graph = onnx.load(output).graph
  (branch,) = [node for node in graph.node if node.op_type == 'If']
  (then,) = [attribute.g for attribute in branch.attribute if attribute.name == 'then_branch']
  operators = {node.op_type for node in graph.node} | {node.op_type for node in then.node}
  assert {'NonZero', 'ScatterND', 'MatMulInteger'} <= operators
  assert report['tolerance'] == export.TOLERANCE['integer']


def test_accuracy_against_compute(trained, tmp_path):
  from dnnr_jax.jobs import dynamic

  path, _ = trained
  curve = dynamic.accuracy_against_compute(path, budgets=(0.01, 0.5, 1.0))
  # 0.01 is below the exit's own cost: no row. The others, once per router.
  assert [(row['router'], row['budget']) for row in curve['rows']] == [
      ('complexity', 0.5), ('complexity', 1.0), ('confidence', 0.5), ('confidence', 1.0)]
  adds = curve['multiply_adds']
  for row in curve['rows']:
    test = row['test']
    assert test['multiply_adds_per_sample'] == pytest.approx(
        adds['exit'] + test['deep_fraction'] * adds['expensive'])
    assert test['compute_fraction'] == pytest.approx(
        test['multiply_adds_per_sample'] / adds['always_deep'])
  check = curve['xla_check']
  assert check['deep']['counted'] == adds['always_deep']
  assert check['shallow']['counted'] == adds['exit']
  text = dynamic.markdown(curve, None)
  assert 'confidence | 0.50' in text and 'deep route' in text
  dynamic.write_plot(curve, tmp_path / 'curve.png')
  assert (tmp_path / 'curve.png').read_bytes()[:4] == b'\x89PNG'


def test_structured_pruning_shrinks_an_early_exit_model(trained, tmp_path):
  from dnnr_jax.jobs import compress as compress_jobs

  path, _ = trained
  pruned = compress_jobs.prune_checkpoint(path, PruneConfig(
      method='structured', sparsity=0.5, schedule='oneshot', finetune_epochs=0),
      models_dir=tmp_path)
  model = checkpoint_lib.load_model(pruned.path)
  assert isinstance(model.model, EarlyExitMLP)
  assert tuple(model.config.model.hidden_sizes) == (16, 16)
  assert model.config.model.exit_width == 4
  assert model.variables['params']['exit_hidden']['kernel'].shape == (64, 4)  # reads the input
  routes = pruned.metadata['routes']
  assert set(routes) == {'route_agreement', 'deep_accuracy', 'shallow_accuracy'}


def test_qat_trains_both_exits_jointly(trained, tmp_path):
  """Every row routed deep: trained on the routed outputs only, the exit would not move."""
  from dnnr_jax.compress import qat, quantize
  from dnnr_jax.jobs import compress as compress_jobs

  path, _ = trained
  all_deep = calibrate.calibrate_checkpoint(path, budget=1.0, target='deep_fraction',
                                            models_dir=tmp_path).path
  settings = QuantizeConfig(mode='qat', finetune_epochs=1)
  trained_qat = compress_jobs.quantize_checkpoint(all_deep, settings, models_dir=tmp_path)
  assert trained_qat.metadata['metrics']['test']['deep_fraction'] == 1.0
  # The source's weights converted as they are: what QAT would give with no gradient.
  untrained = qat.convert(checkpoint_lib.load_model(all_deep).variables['params'],
                          quantize.QuantSpec(bits=settings.bits, per_channel=settings.per_channel))
  params = checkpoint_lib.load_model(trained_qat.path).variables['params']
  for layer in ('exit', 'exit_hidden', 'head'):
    assert not np.array_equal(params[layer]['kernel'].value, untrained[layer]['kernel'].value)


def test_benchmark_compares_routers_budgets_and_wall_time(trained, tmp_path):
  from dnnr_jax.io import plots
  from dnnr_jax.jobs import report

  path, dataset = trained
  benchmark = (sys.executable, '-m', 'dnnr_jax', 'benchmark', '--config', SMOKE_CONFIG,
               '--set', 'data.validation_size=300', '--no-training')
  results = run_all({
      'dynamic': (*benchmark, '--dynamic', path, '--plot', tmp_path / 'compute.png', '--json'),
      'plot alone': (*benchmark, '--plot', tmp_path / 'alone.png')})
  assert_one_line_error(results['plot alone'], ['--plot', '--dynamic'])
  dynamic = one_json(results['dynamic'])['dynamic']
  assert (tmp_path / 'compute.png').read_bytes()[:4] == b'\x89PNG'
  assert not (tmp_path / 'alone.png').exists()
  curve, timing = dynamic['curve'], dynamic['timing']
  assert {row['router'] for row in curve['rows']} == {'complexity', 'confidence'}
  assert set(curve['baselines']) == {'exit_alone', 'always_deep'}
  assert timing['easy_rows'] + timing['hard_rows'] == len(dataset.test.labels)
  figures = timing['figures']
  assert set(figures) == {f'{engine} {mode}' for engine in ('jax', 'jax on device', 'onnxruntime',
                                                            'onnxruntime 1 thread')
                          for mode in ('per_sample', 'deep')}
  _assert_ratios(timing['ratios'], figures, 'per_sample')
  assert 'onnxruntime 1 thread |' in dynamic['markdown']
  # The pipeline report draws the same curve, and adds nothing for an 'original' model.
  assert plots.write_all({'dynamic': dynamic}, tmp_path) == {
      'accuracy against compute': 'compute.png'}
  assert report.dynamic_section(load_config(SMOKE_CONFIG), path, dataset) is None


def _assert_ratios(ratios, figures, routing):
  """Each engine's ratios: always-deep's batch-1 time over `routing`'s, and throughputs inverse."""
  for engine, ratio in ratios.items():
    routed, deep = figures[f'{engine} {routing}'], figures[f'{engine} deep']
    assert ratio['throughput_batch_256'] == pytest.approx(
        routed['throughput_batch_256'] / deep['throughput_batch_256'])
    assert ratio['latency_us_all'] == pytest.approx(
        deep['latency_us_all'] / routed['latency_us_all'])


def test_wall_time_can_time_the_exit_alone(trained, tmp_path):
  from dnnr_jax.jobs import dynamic

  path, dataset = trained
  timing = dynamic.wall_time(path, dataset=dataset, onnx_dir=tmp_path, latency_rows=16,
                             exit_alone=True)
  figures, engines = timing['figures'], dynamic.ENGINES
  assert set(figures) == {f'{engine} {mode}' for engine in engines
                          for mode in ('per_sample', 'deep', 'shallow')}
  assert set(timing['exit_alone_ratios']) == set(timing['ratios']) == set(engines)
  _assert_ratios(timing['exit_alone_ratios'], figures, 'shallow')
  # The exit alone never routes deep, and runs no expensive stage and no router: its two
  # layers, then the routes as a constant of the batch size.
  graph = onnx.load(tmp_path / 'shallow.onnx').graph
  assert [node.op_type for node in graph.node] == ['Gemm', 'Relu', 'Gemm', 'Shape', 'Expand']
  session = onnxruntime.InferenceSession(tmp_path / 'shallow.onnx',
                                         providers=['CPUExecutionProvider'])
  _, routes = session.run(None, {'input': np.asarray(dataset.test.images[:16])})
  assert not np.any(routes)
  assert 'The exit alone' in dynamic.markdown(None, timing)


def test_route_accuracy_scores_each_route():
  from dnnr_jax.jobs import report

  logits = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1]]
  routes = np.array([True, True, False, False, False])
  labels = np.array([0, 2, 2, 0, 0])
  assert report.route_accuracy(logits, routes, labels) == {
      'deep_route_accuracy': 0.5, 'shallow_route_accuracy': 2 / 3}
  assert report.route_accuracy(logits, np.ones(5, bool), labels)['shallow_route_accuracy'] is None
