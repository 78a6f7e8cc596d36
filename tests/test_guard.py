"""The accuracy guard: every prune and quantize reports its validation drop, and warns past it."""

import sys
import warnings

import numpy as np
import pytest

from dnnr_jax.compress import gradual
from dnnr_jax.config import CompressConfig, PruneConfig, QuantizeConfig, load_config
from dnnr_jax.errors import AccuracyWarning, ConfigError, DnnrError
from dnnr_jax.io.checkpoint import load_model, read_metadata
from dnnr_jax.io.data import load_dataset
from dnnr_jax.jobs import compress as compress_jobs
from dnnr_jax.jobs import guard
from dnnr_jax.jobs import train as jobs
from dnnr_jax.train import evaluate
from tests.cli_helpers import assert_one_line_error, one_json, run, run_all
from tests.conftest import ROOT, SMOKE_CONFIG, without_validation

MODULE = (sys.executable, '-m', 'dnnr_jax')
# One-shot, no fine-tuning: a sure loss of validation accuracy, in seconds.
HARSH = PruneConfig(method='global', sparsity=0.97, schedule='oneshot', finetune_epochs=0)


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return tmp_path_factory.mktemp('guard')


@pytest.fixture(scope='module')
def final(root):
  """A smoke model trained with a validation split of 200 digits."""
  path, _ = jobs.train_and_save(
      load_config(SMOKE_CONFIG, ['training.epochs=3', 'data.validation_size=200']),
      models_dir=root / 'models')
  return path


@pytest.fixture(scope='module')
def harsh(root, final):
  with pytest.warns(AccuracyWarning) as caught:
    result = compress_jobs.prune_checkpoint(final, HARSH, models_dir=root / 'harsh', max_drop=0.5)
  return result, [str(warning.message) for warning in caught]


def test_the_drop_is_the_validation_accuracy_lost_in_points(final, harsh):
  result, _ = harsh
  source, pruned = load_model(final), load_model(result.path)
  dataset = load_dataset(source.config.data)
  assert dataset.validation.labels.shape[0] == 200
  before = evaluate(source.model, source.variables, dataset.validation, 100)['accuracy']
  after = evaluate(pruned.model, pruned.variables, dataset.validation, 100)['accuracy']
  assert before - after > 0.005
  assert result.validation_drop == pytest.approx(100 * (before - after))
  assert result.over_budget
  guard = read_metadata(result.path)['accuracy_guard']
  assert guard == {'split': 'validation', 'accuracy_before': before, 'accuracy': after,
                   'drop_pp': result.validation_drop, 'max_drop_pp': 0.5, 'over_budget': True}
  assert result.to_dict()['accuracy_guard'] == guard
  # Test accuracy is reported as before, beside it.
  assert set(result.metadata['metrics']) == {'test', 'test_before', 'validation',
                                             'validation_before'}


def test_over_budget_warns_once_with_the_drop_the_budget_and_the_fix(harsh):
  result, messages = harsh
  assert len(messages) == 1
  assert f'lost {result.validation_drop:.2f} pp' in messages[0]
  assert 'compress.max_drop = 0.5 pp' in messages[0]
  assert 'compress.prune.finetune_epochs' in messages[0]


def test_within_budget_and_quantize_measure_silently(root, final):
  with warnings.catch_warnings():
    warnings.simplefilter('error', AccuracyWarning)
    result = compress_jobs.quantize_checkpoint(
        final, QuantizeConfig(mode='dynamic', bits=8), models_dir=root / 'within', max_drop=100)
  assert not result.over_budget
  assert result.metadata['accuracy_guard']['max_drop_pp'] == 100
  assert abs(result.validation_drop) < 5  # int8 of a float model: close to its source.


def test_no_validation_split_warns_once_and_does_not_fail(root, final):
  path = without_validation(final, root / 'plain')
  with pytest.warns(AccuracyWarning, match='no validation split') as caught:
    result = compress_jobs.prune_checkpoint(path, HARSH, max_drop=0.0)
  assert len(caught) == 1
  assert result.validation_drop is None and not result.over_budget


@pytest.mark.parametrize('max_drop, over', [(0.1, False), (0.09, True), (None, False)])
def test_a_drop_equal_to_the_budget_is_within_it(max_drop, over):
  # 98.5 % -> 98.4 % of 5,000 examples: 0.1 pp, 0.10000000000000009 in floats.
  metrics = {'validation_before': {'accuracy': 4925 / 5000},
             'validation': {'accuracy': 4920 / 5000}}
  verdict = guard.accuracy_guard(metrics, max_drop)
  assert verdict['drop_pp'] == pytest.approx(0.1)
  assert verdict['over_budget'] is over


@pytest.mark.parametrize('value', [-0.1, float('nan'), float('inf')])
def test_max_drop_must_be_finite_and_not_negative(root, final, value):
  with pytest.raises(ConfigError, match='compress.max_drop'):
    CompressConfig(max_drop=value).validate()
  with pytest.raises(DnnrError, match='max_drop'):
    compress_jobs.prune_checkpoint(final, HARSH, models_dir=root / 'bad', max_drop=value)
  assert not (root / 'bad').exists()


@pytest.mark.parametrize('steps, per_epoch, end, expected', [
    (44, 22, 0.75, 22),     # two epochs: prune in the first, recover in the second
    (880, 22, 0.75, 660),   # many epochs: gradual_end rules, a quarter recovers
    (8600, 860, 0.5, 4300),
    (22, 22, 0.75, 1),      # one epoch: prune at once, the epoch recovers
])
def test_gradual_pruning_leaves_at_least_an_epoch_and_a_quarter_to_recover(
    steps, per_epoch, end, expected):
  assert gradual.pruning_end_step(steps, per_epoch, end) == expected


def test_cli_prints_the_drop_and_warns_over_budget(root, final):
  runs = run_all({
      'over': (*MODULE, 'prune', final, '--sparsity', '0.97', '--schedule', 'oneshot',
               '--finetune-epochs', '0', '--max-drop', '0', '--models-dir', root / 'cli'),
      'json': (*MODULE, 'prune', final, '--sparsity', '0.97', '--schedule', 'oneshot',
               '--finetune-epochs', '0', '--max-drop', '100', '--json',
               '--models-dir', root / 'cli_json'),
      'negative': (*MODULE, 'prune', final, '--max-drop', '-1', '--models-dir', root / 'neg'),
  })
  over = runs['over']
  assert over.returncode == 0, over.stderr
  assert 'OVER BUDGET' in over.stdout and 'validation drop' in over.stdout
  warning_lines = [line for line in over.stderr.splitlines() if line.startswith('warning: ')]
  assert len(warning_lines) == 1
  assert '--max-drop 0 pp' in warning_lines[0] and '--finetune-epochs' in warning_lines[0]
  guard = one_json(runs['json'])['accuracy_guard']
  assert guard['over_budget'] is False and guard['max_drop_pp'] == 100
  assert guard['drop_pp'] > 0
  assert_one_line_error(runs['negative'], ['--max-drop -1'])
  assert not (root / 'neg').exists()


def test_the_digits_case_recovers_or_warns_why(tmp_path):
  """issue 15's case: global 0.92, gradual, 2 fine-tuning epochs, on configs/digits.yaml."""
  models = tmp_path / 'models'
  final_path, _ = jobs.train_and_save(load_config(ROOT / 'configs' / 'digits.yaml'),
                                      models_dir=models)
  result = run(*MODULE, 'prune', final_path, '--method', 'global', '--sparsity', '0.92',
               '--schedule', 'gradual', '--finetune-epochs', '2')
  assert result.returncode == 0, result.stderr
  metadata = read_metadata(models / 'pruned' / 'pruned_model_v1.0')
  guard, plan = metadata['accuracy_guard'], metadata['compression']
  steps_per_epoch = plan['finetune_steps'] // 2
  assert plan['pruning_end_step'] == steps_per_epoch  # The second epoch recovers.
  if guard['drop_pp'] > 1.0:
    warning = [line for line in result.stderr.splitlines() if line.startswith('warning: ')]
    assert len(warning) == 1
    assert (f"reached its sparsity at step {steps_per_epoch} of {plan['finetune_steps']}, "
            f'leaving {steps_per_epoch} steps') in warning[0]
    assert '--finetune-epochs' in warning[0]
  assert np.isfinite(guard['drop_pp'])
