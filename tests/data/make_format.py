"""Writes tests/data/formatN: a real format-N checkpoint, and the variables it must load as.

N is the format of the `dnnr_jax` it runs with. Run once per format with its
writer: format 5 with commit cf6867e, format 6 with commit b265141, format 7 with
commit 080decd; the test
that reads them (tests/test_checkpoint.py) needs only the written files.
Every encoding occurs: a float sparse kernel, int4 codes sparse and packed,
int8 codes dense and asymmetric with a zero point, float16-narrowed and
float32 biases, and an all-zero kernel.

  PYTHONPATH=/path/to/that/checkout python tests/data/make_format.py
"""

import pathlib
import shutil

import jax
import numpy as np

from dnnr_jax.compress import quantize
from dnnr_jax.compress.paths import path_name
from dnnr_jax.compress.prune import apply_masks, magnitude_masks
from dnnr_jax.config import load_config
from dnnr_jax.io.checkpoint import FORMAT_VERSION, save_checkpoint
from dnnr_jax.model import init_variables, model_from_config

HERE = pathlib.Path(__file__).resolve().parent


def variables() -> dict:
  config = load_config(HERE.parents[1] / 'configs' / 'smoke.yaml')
  values = init_variables(model_from_config(config), jax.random.PRNGKey(5), 64)
  values = jax.tree.map(np.asarray, values)
  params = apply_masks(values['params'], magnitude_masks(values['params'], 0.85))
  rng = np.random.default_rng(5)
  params['trunk_1']['bias'] = rng.normal(size=32).astype(np.float32)
  params['trunk_0'] = {'kernel': quantize.quantize(params['trunk_0']['kernel'], bits=4, axis=-1),
                       'bias': np.asarray(quantize.float16_round(params['trunk_0']['bias']))}
  params['shortcut']['kernel'] = quantize.quantize(
      values['params']['shortcut']['kernel'], bits=4, axis=-1)
  params['deep']['kernel'] = quantize.quantize(
      values['params']['deep']['kernel'], bits=8, axis=-1, symmetric=False)
  params['head']['kernel'] = np.zeros_like(params['head']['kernel'])
  return config, {**values, 'params': params}


def main() -> None:
  config, tree = variables()
  target = HERE / f'format{FORMAT_VERSION}'
  shutil.rmtree(target, ignore_errors=True)
  save_checkpoint(target / 'checkpoint', tree, {
      'kind': 'quantized', 'version': '1.0', 'config': config.to_dict(), 'num_features': 64,
      'quantization': {'mode': 'weight_only'}})
  leaves = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=quantize.is_qarray)[0]:
    name = path_name(key_path)
    if quantize.is_qarray(leaf):
      leaves[name + '/codes'] = np.asarray(leaf.value)
      leaves[name + '/scale'] = np.asarray(leaf.scale)
      if leaf.zero_point is not None:
        leaves[name + '/zero_point'] = np.asarray(leaf.zero_point)
    else:
      leaves[name] = np.asarray(leaf)
  np.savez_compressed(target / 'expected.npz', **leaves)


if __name__ == '__main__':
  main()
