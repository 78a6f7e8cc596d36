"""Config loading: every bad key or value fails naming the key."""

import pytest

from dnnr_jax.config import Config, config_from_dict, load_config
from dnnr_jax.errors import ConfigError
from tests.conftest import ROOT


@pytest.mark.parametrize('name', ['default', 'digits', 'smoke', 'early_exit', 'early_exit_wide'])
def test_shipped_configs_load(name):
  config = load_config(ROOT / 'configs' / f'{name}.yaml')
  assert config.training.epochs >= 1
  assert config_from_dict(config.to_dict()) == config


def test_defaults_are_the_original_setup():
  config = load_config()
  assert config == Config()
  assert config.model.hidden_sizes == (256, 256)
  assert config.training.batch_size == 64
  assert config.training.learning_rate == 1e-3
  assert (config.data.mean, config.data.std) == (0.1307, 0.3081)
  assert config.thresholds.final.sparsity == 0.0
  assert config.annealing_total_epochs == config.training.epochs


def test_overrides_are_parsed_as_yaml():
  config = load_config(ROOT / 'configs' / 'smoke.yaml', [
      'training.epochs=1', 'model.hidden_sizes=[8, 4]', 'routing.mode=batch',
      'thresholds.final.variance=0.25', 'thresholds.total_epochs=null'])
  assert config.training.epochs == 1
  assert config.model.hidden_sizes == (8, 4)
  assert config.routing.mode == 'batch'
  assert config.thresholds.final.variance == 0.25
  assert config.thresholds.total_epochs is None


@pytest.mark.parametrize('override,named', [
    ('training.epoch=1', 'training.epoch'),
    ('trainin.epochs=1', 'trainin'),
    ('thresholds.initial.varience=1', 'thresholds.initial.varience'),
    ('training.learning_rate=-0.1', 'training.learning_rate'),
    ('training.learning_rate=0', 'training.learning_rate'),
    ('training.learning_rate=.nan', 'training.learning_rate'),
    ('training.epochs=0', 'training.epochs'),
    ('training.epochs=2.5', 'training.epochs'),
    ('training.epochs=true', 'training.epochs'),
    ('training.batch_size=abc', 'training.batch_size'),
    ('data.std=0', 'data.std'),
    ('data.dataset=cifar', 'data.dataset'),
    ('routing.mode=sideways', 'routing.mode'),
    ('training.lr_schedule=step', 'training.lr_schedule'),
    ('model.hidden_sizes=[]', 'model.hidden_sizes'),
    ('model.hidden_sizes=[8, 0]', 'model.hidden_sizes[1]'),
    ('model.hidden_sizes=8', 'model.hidden_sizes'),
    ('thresholds.final.entropy=.inf', 'thresholds.final.entropy'),
    ('thresholds.annealing_start_epoch=9', 'thresholds.annealing_start_epoch'),
    ('training=5', 'training'),
    ('training.scan_unroll=0', 'training.scan_unroll'),
    ('compress.prune.sparsity=1.0', 'compress.prune.sparsity'),
    ('compress.prune.sparsity=-0.1', 'compress.prune.sparsity'),
    ('compress.prune.method=random', 'compress.prune.method'),
    ('compress.prune.finetune_epochs=0', 'compress.prune.schedule'),
    ('compress.prune.m=2', 'compress.prune.m'),
    ('compress.prune.distill=1.5', 'compress.prune.distill'),
    ('compress.prune.distill_temperature=0', 'compress.prune.distill_temperature'),
    ('compress.prune.spars=0.5', 'compress.prune.spars'),
    ('compress.quantize.bits=3', 'compress.quantize.bits'),
    ('compress.quantize.source=pruned_twice', 'compress.quantize.source'),
    ('compress.quantize.mode=fp8', 'compress.quantize.mode'),
    ('compress.quantize.learning_rate=0', 'compress.quantize.learning_rate'),
    ('pipeline.sweep_sparsities=[0.5, 1.5]', 'pipeline.sweep_sparsities[1]'),
    ('pipeline.benchmark_seconds=0', 'pipeline.benchmark_seconds'),
])
def test_bad_values_name_the_key(override, named):
  with pytest.raises(ConfigError) as error:
    load_config(ROOT / 'configs' / 'smoke.yaml', [override])
  assert named in str(error.value)
  assert str(ROOT / 'configs' / 'smoke.yaml') in str(error.value)


def test_qat_needs_finetuning_epochs():
  with pytest.raises(ConfigError, match='compress.quantize.finetune_epochs'):
    load_config(None, ['compress.quantize.mode=qat', 'compress.quantize.finetune_epochs=0'])


@pytest.mark.parametrize('override', ['training.epochs', '=3', 'training.epochs.x=1'])
def test_malformed_overrides(override):
  with pytest.raises(ConfigError):
    load_config(None, [override])


def test_unknown_section_in_a_file(tmp_path):
  path = tmp_path / 'bad.yaml'
  path.write_text('training:\n  epochs: 2\noptimiser:\n  name: sgd\n')
  with pytest.raises(ConfigError, match="unknown key 'optimiser'"):
    load_config(path)


@pytest.mark.parametrize('text', ['training: [1, 2', '- 1\n- 2\n'])
def test_unreadable_files(tmp_path, text):
  path = tmp_path / 'bad.yaml'
  path.write_text(text)
  with pytest.raises(ConfigError, match='bad.yaml'):
    load_config(path)


def test_missing_file():
  with pytest.raises(ConfigError, match='does not exist'):
    load_config('no/such/config.yaml')
