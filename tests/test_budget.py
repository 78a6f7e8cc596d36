"""`dnnr compress`: the smallest model within a validation budget, through the real CLI."""

import json
import sys

import pytest

from dnnr_jax.config import BudgetConfig, load_config
from dnnr_jax.errors import ConfigError
from dnnr_jax.io.checkpoint import load_model, read_metadata
from dnnr_jax.io.data import load_dataset
from dnnr_jax.jobs import budget as budget_jobs
from dnnr_jax.jobs import train as jobs
from dnnr_jax.train import evaluate
from tests.cli_helpers import assert_one_line_error, one_json, run, run_all
from tests.conftest import SMOKE_CONFIG, without_validation

MODULE = (sys.executable, '-m', 'dnnr_jax')
# Two rungs, 8 bits, one fine-tuning epoch each: four trials in seconds.
CHEAP = ('--sparsities', '0.5', '0.9', '--bits', '8', '--finetune-epochs', '1',
         '--quantize-mode', 'dynamic', '--activations', 'per_batch')


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
  """Smoke models with and without a validation split."""
  root = tmp_path_factory.mktemp('budget')
  final, _ = jobs.train_and_save(
      load_config(SMOKE_CONFIG, ['training.epochs=3', 'data.validation_size=200']),
      models_dir=root / 'models')
  plain = without_validation(final, root / 'plain')
  return root, final, plain


@pytest.fixture(scope='module')
def runs(sources):
  """A generous budget, then bad inputs side by side, then the same search again."""
  root, final, plain = sources
  first = run(*MODULE, 'compress', final, '--max-drop', '100', *CHEAP, '--json')
  others = run_all({
      'again': (*MODULE, 'compress', final, '--max-drop', '100', *CHEAP, '--json'),
      'negative': (*MODULE, 'compress', final, '--max-drop', '-0.5', '--models-dir',
                   root / 'negative'),
      'no_validation': (*MODULE, 'compress', plain, *CHEAP),
      'unreachable': (*MODULE, 'compress', final, '--max-drop', '0', '--sparsities', '0.99',
                      '--bits', '4', '--finetune-epochs', '1', '--quantize-mode', 'dynamic',
                      '--models-dir', root / 'unreachable'),
  })
  return first, others


def test_the_smallest_trial_within_the_budget_is_written(sources, runs):
  root, final, _ = sources
  result = one_json(runs[0])
  trials = result['trials']
  # Two rungs: each a pruned float trial and its 8-bit version.
  assert [(trial['sparsity'], trial['bits']) for trial in trials] == [
      (0.5, 0), (0.5, 8), (0.9, 0), (0.9, 8)]
  candidates = [trial for trial in trials if trial['bits'] == 8]
  assert result['chosen'] == min(candidates, key=lambda trial: trial['bytes'])
  path = root / 'models' / 'quantized' / 'quantized_model_v1.0'
  assert result['path'] == str(path)
  metadata = read_metadata(path)
  assert metadata['source']['path'] == str(final)
  assert metadata['budget']['trial'] == result['chosen']
  # --activations overrides the source's compress.quantize.activations (per_row).
  assert load_model(final).config.compress.quantize.activations == 'per_row'
  assert metadata['quantization']['activations'] == 'per_batch'
  # Its validation accuracy and drop, measured again on the written checkpoint.
  model, source = load_model(path), load_model(final)
  dataset = load_dataset(source.config.data)
  after = evaluate(model.model, model.variables, dataset.validation, 100)['accuracy']
  before = evaluate(source.model, source.variables, dataset.validation, 100)['accuracy']
  assert result['chosen']['validation_accuracy'] == pytest.approx(after)
  assert result['chosen']['drop_pp'] == pytest.approx(100 * (before - after))
  assert result['test_accuracy'] == pytest.approx(
      evaluate(model.model, model.variables, dataset.test, 100)['accuracy'])
  assert result['bytes']['raw'] < result['dense_float_bytes']['raw']


def test_the_report_lists_every_trial_with_a_pareto_plot(runs):
  result = one_json(runs[0])
  report_dir = result['report_dir']
  markdown = open(f'{report_dir}/report.md').read()
  for trial in result['trials']:
    assert f"| {trial['sparsity']:.1%} | {trial['bits'] or 'float'} | {trial['bytes']:,} |" in (
        markdown)
  assert open(f'{report_dir}/pareto.png', 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  report = json.loads(open(f'{report_dir}/report.json').read())
  assert report['chosen']['path'] in report['pareto']


def test_a_rerun_reuses_every_trial(runs):
  first, again = one_json(runs[0]), one_json(runs[1]['again'])
  assert (first['ran'], first['reused']) == (4, 0)
  assert (again['ran'], again['reused']) == (0, 4)
  assert again['trials'] == first['trials']
  assert again['path'].endswith('quantized_model_v1.1')  # A new version, same model.


def test_bad_inputs_exit_2_and_write_no_model(sources, runs):
  root, _, plain = sources
  others = runs[1]
  assert_one_line_error(others['negative'], ['--max-drop -0.5', '>= 0'])
  assert not (root / 'negative').exists()
  assert_one_line_error(others['no_validation'], [plain.name, 'validation split'])
  assert not (root / 'plain' / 'budget').exists()
  # After the trials' progress lines, one error naming the closest trial.
  unreachable = others['unreachable']
  assert unreachable.returncode == 2 and unreachable.stdout == ''
  assert 'Traceback' not in unreachable.stderr
  last = unreachable.stderr.strip().splitlines()[-1]
  for words in ('error: no candidate', '--max-drop 0 pp', 'closest (sparsity 99.0%, 4-bit)',
                'bytes'):
    assert words in last
  assert not (root / 'unreachable' / 'quantized').exists()
  assert not (root / 'unreachable' / 'pruned').exists()


def test_settings_are_checked_in_config():
  for bad in ({'max_drop': -1.0}, {'sparsities': (0.9, 0.5)}, {'bits': (3,)}, {'sparsities': ()},
              {'method': 'structured'}, {'activations': 'per_column'},
              {'quantize_mode': 'weight_only', 'activations': 'per_batch'}):
    with pytest.raises(ConfigError, match='compress.budget'):
      BudgetConfig(**bad).validate()
  assert budget_jobs.DEFAULT_BUDGET.method in ('lamp', 'global')
