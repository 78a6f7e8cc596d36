"""Structured (neuron) pruning: whole hidden units removed, kernels shrunk.

The result is a smaller dense model that loads and runs as is. Each hidden
layer of the dynamic MLP (family 'original') is a group of units:

* `trunk_i` (i < L): column j of `trunk_i/kernel` and `trunk_i/bias` make the
  unit; row j of the next layer's kernel reads it (for the last trunk layer,
  row j of both `deep/kernel` and `shortcut/kernel`).
* the routed block: column j of `deep` and of `shortcut` (both paths write
  feature j) and row j of `head/kernel`.

In an early-exit MLP (family 'early_exit') the last trunk layer feeds the
head, the trunk layer the exit leaves after also feeds the exit's first
layer, and the exit's hidden layer (`exit_hidden`, when `exit_width` > 0) is
a group read by `exit`.

Input features and classes are never removed. A unit's score is the L2 norm
of every weight that touches it, incoming and outgoing (Li et al. 2017 use
the incoming norm; counting outgoing weights too keeps a unit whose output
the next layer relies on).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from dnnr_jax.config import ModelConfig
from dnnr_jax.errors import DnnrError

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class UnitGroup:
  """One prunable layer of hidden units.

  Attributes:
    name: 'trunk_0', ..., or 'block' for the deep block and shortcut.
    producers: layers whose kernel columns (and biases) are the units.
    consumers: layers whose kernel rows read the units.
  """
  name: str
  producers: tuple[str, ...]
  consumers: tuple[str, ...]


def unit_groups(params: Params, model_config: ModelConfig | None = None) -> list[UnitGroup]:
  """The prunable unit groups of a dynamic MLP's params (early-exit: see the module)."""
  if model_config is not None and model_config.family == 'early_exit':
    return _early_exit_groups(params, model_config)
  depth = sum(1 for name in params if name.startswith('trunk_'))
  expected = {f'trunk_{i}' for i in range(depth)} | {'deep', 'shortcut', 'head'}
  if depth == 0 or set(params) != expected:
    raise DnnrError(
        f'params with layers {sorted(params)} are not a dynamic MLP '
        '(trunk_0.., deep, shortcut, head); prune a dnnr_jax model.')
  groups = [
      UnitGroup(f'trunk_{i}', (f'trunk_{i}',), (f'trunk_{i + 1}',))
      for i in range(depth - 1)
  ]
  groups.append(UnitGroup(f'trunk_{depth - 1}', (f'trunk_{depth - 1}',),
                          ('deep', 'shortcut')))
  groups.append(UnitGroup('block', ('deep', 'shortcut'), ('head',)))
  return groups


def _early_exit_groups(params: Params, model_config: ModelConfig) -> list[UnitGroup]:
  """The unit groups of an early-exit MLP: trunk layers, and the exit's hidden layer."""
  depth = len(model_config.hidden_sizes)
  exit_first = 'exit_hidden' if model_config.exit_width else 'exit'
  expected = {f'trunk_{i}' for i in range(depth)} | {exit_first, 'exit', 'head'}
  if set(params) != expected:
    raise DnnrError(
        f'params with layers {sorted(params)} are not the early-exit MLP its config describes '
        f'({sorted(expected)}); prune the checkpoint with the config it was saved with.')
  groups = []
  for i in range(depth):
    consumers = (f'trunk_{i + 1}',) if i < depth - 1 else ('head',)
    if i == model_config.exit_after - 1:
      consumers += (exit_first,)
    groups.append(UnitGroup(f'trunk_{i}', (f'trunk_{i}',), consumers))
  if model_config.exit_width:
    groups.append(UnitGroup('exit_hidden', ('exit_hidden',), ('exit',)))
  return groups


def unit_scores(params: Params, group: UnitGroup) -> np.ndarray:
  """L2 norm of all incoming and outgoing weights of each unit, [units]."""
  squares = sum(
      np.sum(np.square(np.asarray(params[name]['kernel'])), axis=0)
      for name in group.producers)
  squares = squares + sum(
      np.sum(np.square(np.asarray(params[name]['kernel'])), axis=1)
      for name in group.consumers)
  return np.sqrt(squares)


def kept_units(scores: np.ndarray, sparsity: float) -> np.ndarray:
  """Sorted indices of the units to keep: the highest scores, at least one.

  round(sparsity * units) units go; ties keep the lower index.
  """
  units = scores.shape[0]
  removed = min(int(round(sparsity * units)), units - 1)
  order = np.lexsort((np.arange(units), -scores))  # best first, stable
  return np.sort(order[:units - removed])


def prune_units(
    params: Params,
    model_config: ModelConfig,
    sparsity: float | dict[str, float],
) -> tuple[Params, ModelConfig, dict[str, list[int]]]:
  """Removes the lowest-scoring fraction of units from every hidden layer.

  Args:
    params: the 'params' collection of a dynamic or early-exit MLP.
    model_config: its family and widths.
    sparsity: fraction of units to remove, one value for every group or a
      mapping from group name ('trunk_0', ..., 'block'; early-exit:
      'trunk_0', ..., 'exit_hidden') to a fraction.

  Returns:
    The shrunk params, the model config with the new widths, and the kept
    unit indices of each group.

  Raises:
    DnnrError: a sparsity outside [0, 1), or params that are not the MLP
      `model_config` describes.
  """
  groups = unit_groups(params, model_config)
  fractions = (sparsity if isinstance(sparsity, dict)
               else {group.name: sparsity for group in groups})
  unknown = set(fractions) - {group.name for group in groups}
  if unknown:
    raise DnnrError(
        f'structured sparsity names unknown layers {sorted(unknown)}; use '
        f'{[group.name for group in groups]}.')
  for name, fraction in fractions.items():
    if not 0.0 <= fraction < 1.0:
      raise DnnrError(
          f'structured sparsity {fraction!r} for {name} is not in [0, 1); '
          'choose the fraction of units to remove, e.g. 0.5.')
  shrunk = {name: dict(layer) for name, layer in params.items()}
  kept = {}
  for group in groups:
    indices = kept_units(unit_scores(params, group), fractions.get(group.name, 0.0))
    kept[group.name] = indices.tolist()
    for name in group.producers:
      shrunk[name]['kernel'] = jnp.asarray(shrunk[name]['kernel'])[:, indices]
      shrunk[name]['bias'] = jnp.asarray(shrunk[name]['bias'])[indices]
    for name in group.consumers:
      shrunk[name]['kernel'] = jnp.asarray(shrunk[name]['kernel'])[indices, :]
  depth = sum(1 for name in kept if name.startswith('trunk_'))
  hidden = tuple(len(kept[f'trunk_{i}']) for i in range(depth))
  widths = ({'exit_width': len(kept.get('exit_hidden', ()))}
            if model_config.family == 'early_exit' else {'deep_size': len(kept['block'])})
  new_config = dataclasses.replace(model_config, hidden_sizes=hidden, **widths)
  return shrunk, new_config, kept


def count_parameters(params: Params) -> int:
  return int(sum(np.size(leaf) for layer in params.values() for leaf in layer.values()))
