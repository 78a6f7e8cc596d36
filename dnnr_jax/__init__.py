"""dnnr_jax: Dynamic Neural Network Refinement in JAX/Flax.

Names are imported on first use, so that `dnnr predict`, which serves with
onnxruntime alone, never imports JAX.
"""

import importlib

__version__ = '0.1.0'

_EXPORTS = {
    'LoadedModel': 'dnnr_jax.io.checkpoint',
    'load_model': 'dnnr_jax.io.checkpoint',
    'save_checkpoint': 'dnnr_jax.io.checkpoint',
    'restore_sharded': 'dnnr_jax.io.checkpoint',
    'mesh_from_config': 'dnnr_jax.parallel',
    'batch_complexity': 'dnnr_jax.complexity',
    'Config': 'dnnr_jax.config',
    'config_from_dict': 'dnnr_jax.config',
    'load_config': 'dnnr_jax.config',
    'Dataset': 'dnnr_jax.io.data',
    'Split': 'dnnr_jax.train',
    'load_dataset': 'dnnr_jax.io.data',
    'CheckpointError': 'dnnr_jax.errors',
    'ConfigError': 'dnnr_jax.errors',
    'DataError': 'dnnr_jax.errors',
    'DnnrError': 'dnnr_jax.errors',
    'export_onnx': 'dnnr_jax.io.export',
    'compact_initializers': 'dnnr_jax.io.onnx_storage',
    'export_onnx_function': 'dnnr_jax.io.export_function',
    'SavedParams': 'dnnr_jax.io.params_io',
    'save_params': 'dnnr_jax.io.params_io',
    'load_params': 'dnnr_jax.io.params_io',
    'FitResult': 'dnnr_jax.jobs.fit',
    'fit': 'dnnr_jax.jobs.fit',
    'evaluate_checkpoint': 'dnnr_jax.jobs.train',
    'train_and_save': 'dnnr_jax.jobs.train',
    'DynamicMLP': 'dnnr_jax.model',
    'EarlyExitMLP': 'dnnr_jax.model',
    'RouteCost': 'dnnr_jax.cost',
    'route_cost': 'dnnr_jax.cost',
    'run_on_routed': 'dnnr_jax.routing',
    'calibrate_checkpoint': 'dnnr_jax.jobs.calibrate',
    'CalibrateResult': 'dnnr_jax.jobs.calibrate',
    'init_variables': 'dnnr_jax.model',
    'model_from_config': 'dnnr_jax.model',
    'PipelineResult': 'dnnr_jax.jobs.pipeline',
    'PruneConfig': 'dnnr_jax.config',
    'PruneResult': 'dnnr_jax.jobs.results',
    'prune_checkpoint': 'dnnr_jax.jobs.compress',
    'QuantizeConfig': 'dnnr_jax.config',
    'QuantizeResult': 'dnnr_jax.jobs.results',
    'quantize_checkpoint': 'dnnr_jax.jobs.compress',
    'run_pipeline': 'dnnr_jax.jobs.pipeline',
    'route': 'dnnr_jax.routing',
    'predict_onnx': 'dnnr_jax.io.serve',
    'linear_annealing': 'dnnr_jax.thresholds',
    'TrainState': 'dnnr_jax.train',
    'create_train_state': 'dnnr_jax.train',
    'evaluate': 'dnnr_jax.train',
    'train_epoch': 'dnnr_jax.train',
    'train_step': 'dnnr_jax.train',
}

__all__ = sorted(_EXPORTS)


# Public names that differ from the name inside their module.
_RENAMED = {'save_params': 'save', 'load_params': 'load'}


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted([*globals(), *_EXPORTS])
