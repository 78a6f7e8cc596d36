"""Unstructured pruning: masks shaped like the params, from a score registry.

A mask pytree has the params' structure, `None` for leaves that are not
pruned and a bool array (True = keep) for those that are. Pruning methods
differ only in their score function (`SCORES`) and in how scores become a
mask: the k lowest scores over a scope (`masks_from_scores`), or the n best of
every m along the input axis (`nm_masks_from_scores`).

Example:
  >>> masks = magnitude_masks(params, 0.8)  # every Dense kernel, globally
  >>> params = apply_masks(params, masks)
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dnnr_jax.compress.paths import DEFAULT_PATTERNS, is_none, param_paths, path_name, select
from dnnr_jax.errors import DnnrError

Params = Any
Masks = Any
ScoreFn = Callable[[jax.Array], jax.Array]
# (candidate params, current masks, step count) -> new masks; traceable.
Pruner = Callable[[Params, Masks, jax.Array], Masks]

SCOPES = ('global', 'layer')



def lamp_scores(weights: jax.Array) -> jax.Array:
  """LAMP scores of one layer (Lee et al. 2021): w^2 / sum of w'^2 over |w'| >= |w|.

  The sum runs over the weights of the same layer at least as large as w
  (w itself and its ties included), so the layer's largest weight scores 1
  and every score is in [0, 1]. One global cut on these scores gives each
  layer its own sparsity, chosen so that the model's output changes least
  (the paper's distortion bound), without any tuning. A layer of zeros scores
  0 everywhere.

  Example:
    >>> lamp_scores(jnp.array([1.0, -2.0, 3.0, 0.5]))  # squares 1, 4, 9, 0.25
    # [1/14, 4/13, 9/9, 0.25/14.25]
  """
  squares = jnp.square(weights).ravel()
  ascending = jnp.sort(squares)
  # suffix[i]: the sum of ascending[i:], the squares at least ascending[i].
  suffix = jnp.cumsum(ascending[::-1])[::-1]
  larger_or_equal = suffix[jnp.searchsorted(ascending, squares, side='left')]
  scores = jnp.where(larger_or_equal > 0, squares / jnp.where(larger_or_equal > 0,
                                                              larger_or_equal, 1.0), 0.0)
  return scores.reshape(jnp.shape(weights))


# Higher means more important; the lowest scores are pruned first.
SCORES: dict[str, ScoreFn] = {
    'magnitude': jnp.abs,
    'lamp': lamp_scores,
}


def register_score(name: str, score_fn: ScoreFn) -> None:
  """Adds `score_fn` (array -> same-shaped scores) to `SCORES` under `name`."""
  SCORES[name] = score_fn


def check_score(score: str) -> ScoreFn:
  """The registered score function called `score`."""
  if score not in SCORES:
    raise DnnrError(f'unknown pruning score {score!r}; use one of {sorted(SCORES)}.')
  return SCORES[score]


def selected_scores(
    params: Params, patterns: str | Sequence[str] = DEFAULT_PATTERNS,
    score: str = 'magnitude',
) -> Masks:
  """Scores of the selected leaves (float arrays) and `None` elsewhere."""
  score_fn = check_score(score)
  return jax.tree.map(lambda keep, leaf: score_fn(leaf) if keep else None,
                      select(params, patterns), params)


def _prune_count(sparsity, size: int) -> int | jax.Array:
  """round(sparsity * size): exact for a Python number, float32 when traced."""
  if isinstance(sparsity, numbers.Real) or (
      isinstance(sparsity, np.ndarray) and sparsity.ndim == 0):
    return int(round(float(sparsity) * size))
  sparsity = jnp.clip(jnp.asarray(sparsity, jnp.float32), 0.0, 1.0)
  return jnp.round(sparsity * size).astype(jnp.int32)


def check_scope(scope: str) -> None:
  if scope not in SCOPES:
    raise DnnrError(f'pruning scope {scope!r} is unknown; use one of {SCOPES}.')


def check_sparsity(sparsity) -> None:
  """Rejects a concrete sparsity outside [0, 1); traced values are clipped instead."""
  if isinstance(sparsity, (numbers.Real, np.ndarray)) and not 0.0 <= float(sparsity) < 1.0:
    raise DnnrError(
        f'sparsity {sparsity!r} is not in [0, 1); choose the fraction of weights '
        'to prune, e.g. 0.8.')


@jax.jit
def _keep_top(scores: jax.Array, prune_count) -> jax.Array:
  """False at the `prune_count` lowest of 1-D `scores`; ties prune the lower index."""
  # Ranks rather than a top-k so the count may be traced: one compiled
  # program serves every sparsity of a schedule (and, jitted, every Python
  # count of a shape).
  order = jnp.argsort(scores, stable=True)
  ranks = jnp.zeros_like(order).at[order].set(jnp.arange(scores.size, dtype=order.dtype))
  return ranks >= prune_count


def masks_from_scores(scores: Masks, sparsity, *, scope: str = 'global') -> Masks:
  """Prunes exactly round(sparsity * n) of the lowest-scoring weights.

  Args:
    scores: a pytree like the params, a score array for each selected leaf and
      `None` elsewhere.
    sparsity: fraction in [0, 1) to prune; a Python number or a traced scalar
      (then rounded in float32 and clipped to [0, 1]).
    scope: 'global' ranks all selected weights together (n = their total, as
      torch's `global_unstructured`); 'layer' prunes round(sparsity * n_l) of
      each leaf.

  Returns:
    Bool masks (True = keep) with `None` where `scores` has `None`. Ties are
    broken by flattening order: of equal scores the earlier weight goes first.
  """
  check_sparsity(sparsity)
  check_scope(scope)
  leaves, treedef = jax.tree.flatten(scores)
  if scope == 'layer':
    kept = [_keep_top(leaf.ravel(), _prune_count(sparsity, leaf.size)).reshape(leaf.shape)
            for leaf in leaves]
    return jax.tree.unflatten(treedef, kept)
  if not leaves:
    return scores
  total = sum(leaf.size for leaf in leaves)
  return jax.tree.unflatten(treedef, _keep_top_global(leaves, _prune_count(sparsity, total)))


@jax.jit
def _keep_top_global(leaves: list[jax.Array], prune_count) -> list[jax.Array]:
  """`_keep_top` over the leaves' weights together, split back into their shapes."""
  keep = _keep_top(jnp.concatenate([leaf.ravel() for leaf in leaves]), prune_count)
  offsets = np.cumsum([leaf.size for leaf in leaves])[:-1]
  return [part.reshape(leaf.shape)
          for part, leaf in zip(jnp.split(keep, offsets), leaves, strict=True)]


def magnitude_masks(
    params: Params,
    sparsity,
    *,
    scope: str = 'global',
    patterns: str | Sequence[str] = DEFAULT_PATTERNS,
    score: str = 'magnitude',
) -> Masks:
  """Masks that prune exactly round(sparsity * n) of the selected weights.

  Args:
    params: a params pytree.
    sparsity: fraction in [0, 1) to prune (see `masks_from_scores`).
    scope: 'global' or 'layer'.
    patterns: regexes fullmatched against 'layer/leaf' paths; default every
      Dense kernel (biases are kept).
    score: a name in `SCORES`.

  Returns:
    The params' structure, `None` for unselected leaves, bool arrays (True =
    keep) for selected ones.

  Raises:
    DnnrError: a bad sparsity, scope, score or pattern.
  """
  check_sparsity(sparsity)
  return masks_from_scores(selected_scores(params, patterns, score), sparsity, scope=scope)


def check_nm(n: int, m: int) -> None:
  """Rejects an N:M pattern that is not 1 <= n < m (n = m would prune nothing)."""
  if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
    raise DnnrError(f'N:M sparsity {n}:{m} is impossible; choose integers 1 <= n < m, e.g. 2:4.')


def nm_masks_from_scores(scores: Masks, n: int = 2, m: int = 4) -> Masks:
  """Keeps the n best scores of every m consecutive weights along the input axis.

  The input axis is the one before the last: axis 0 of a Dense kernel [in, out],
  the input channels of a Conv kernel [kh, kw, in, out] (so each output
  channel keeps n of every m input channels at each kernel position, the
  layout sparse tensor cores and `nm_masks` users expect). Of equal scores in
  a group the earlier weight is pruned first.

  Raises:
    DnnrError: a leaf whose axis 0 is not a multiple of m.
  """
  check_nm(n, m)

  def keep_group_best(key_path, score):
    if score.ndim == 0 or score.shape[max(score.ndim - 2, 0)] % m:
      raise DnnrError(
          f'{path_name(key_path)} has shape {score.shape}, whose input axis is not a '
          f'multiple of m={m}; exclude it with `patterns` or choose another m.')
    return _keep_group_best(score, n, m)

  return jax.tree_util.tree_map_with_path(keep_group_best, scores)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _keep_group_best(score: jax.Array, n: int, m: int) -> jax.Array:
  input_axis = max(score.ndim - 2, 0)
  moved = jnp.moveaxis(score, input_axis, 0)
  grouped = moved.reshape((moved.shape[0] // m, m) + moved.shape[1:])
  ranks = jnp.argsort(jnp.argsort(grouped, axis=1, stable=True), axis=1, stable=True)
  return jnp.moveaxis((ranks >= m - n).reshape(moved.shape), 0, input_axis)


def nm_masks(
    params: Params, n: int = 2, m: int = 4, *,
    patterns: str | Sequence[str] = DEFAULT_PATTERNS, score: str = 'magnitude',
) -> Masks:
  """Semi-structured N:M masks: n kept of every m inputs, for each output unit.

  Raises:
    DnnrError: bad n, m, score or pattern, or a selected leaf whose input
      dimension is not a multiple of m.
  """
  check_nm(n, m)
  return nm_masks_from_scores(selected_scores(params, patterns, score), n, m)


def magnitude_pruner(
    sparsity_schedule: Callable[[jax.Array], jax.Array], *, scope: str = 'global',
    score: str = 'magnitude',
) -> Pruner:
  """Masks that prune exactly round(s * n) weights, s = `sparsity_schedule(count)`.

  Weights the current masks already prune rank below every other, so with a
  non-decreasing schedule a pruned weight is never revived.

  Args:
    sparsity_schedule: count -> sparsity, e.g. `gradual.cubic_sparsity_schedule`.
    scope: 'global' or 'layer' (see `masks_from_scores`).
    score: a name in `SCORES`.

  Returns:
    A `Pruner` for `gradual.pruning`.
  """
  if sparsity_schedule is None:
    raise DnnrError('magnitude pruning needs a sparsity_schedule, e.g. '
                    'gradual.cubic_sparsity_schedule.')
  check_scope(scope)
  score_fn = check_score(score)

  def new_masks(candidate: Params, masks: Masks, count: jax.Array) -> Masks:
    scores = jax.tree.map(
        lambda keep, leaf: None if keep is None else jnp.where(keep, score_fn(leaf), -jnp.inf),
        masks, candidate, is_leaf=is_none)
    return masks_from_scores(scores, sparsity_schedule(count), scope=scope)

  return new_masks


def nm_pruner(
    n: int = 2, m: int = 4, *, sparsity_schedule: Callable[[jax.Array], jax.Array] | None = None,
    score: str = 'magnitude',
) -> Pruner:
  """Masks that keep the n best of every m weights along the input axis.

  The schedule, if given, only gates the pattern: every weight is kept while
  it is 0, so the pattern is picked from trained weights at the first count
  where it is positive. Later updates keep that pattern, since a pruned
  weight, held at zero, loses to every nonzero one in its group.

  Args:
    n, m: the N:M pattern, 1 <= n < m.
    sparsity_schedule: count -> sparsity, or None to prune from count 0.
    score: a name in `SCORES`.

  Returns:
    A `Pruner` for `gradual.pruning`.
  """
  check_nm(n, m)
  score_fn = check_score(score)

  def new_masks(candidate: Params, masks: Masks, count: jax.Array) -> Masks:
    scores = jax.tree.map(lambda keep, leaf: None if keep is None else score_fn(leaf),
                          masks, candidate, is_leaf=is_none)
    kept = nm_masks_from_scores(scores, n, m)
    if sparsity_schedule is None:
      return kept
    inactive = sparsity_schedule(count) <= 0.0
    return jax.tree.map(lambda keep: keep | inactive, kept)

  return new_masks


def zero_masks(params: Params, patterns: str | Sequence[str] = DEFAULT_PATTERNS) -> Masks | None:
  """Masks that keep the non-zeros of the selected leaves of already pruned params.

  A leaf without exact zeros gets None (nothing to keep at zero); None when
  no selected leaf has any, i.e. the params are not pruned.
  """
  chosen = select(params, patterns)
  masks = jax.tree.map(
      lambda leaf, keep: (leaf != 0) if keep and not bool(jnp.all(leaf != 0)) else None,
      params, chosen)
  return None if all(mask is None for mask in jax.tree.leaves(masks, is_leaf=is_none)) else masks


def apply_masks(params: Params, masks: Masks) -> Params:
  """Zeroes (exactly +0.0) the pruned weights; leaves under a `None` mask are untouched."""
  return jax.tree.map(
      lambda keep, leaf: leaf if keep is None else jnp.where(keep, leaf, jnp.zeros_like(leaf)),
      masks, params, is_leaf=is_none)


def _counts(leaf) -> dict[str, float]:
  size = int(np.size(leaf))
  zeros = int(np.sum(np.asarray(leaf) == 0))
  return {'size': size, 'zeros': zeros, 'sparsity': zeros / size if size else 0.0}


def sparsity_report(
    params: Params, masks: Masks | None = None, *,
    patterns: str | Sequence[str] = DEFAULT_PATTERNS,
) -> dict[str, dict[str, float]]:
  """Exact-zero counts of the (masked) params.

  Args:
    params: a params pytree.
    masks: when given, counts zeros of `apply_masks(params, masks)` and
      reports its non-`None` leaves; otherwise counts zeros of `params` in the
      leaves `patterns` selects.
    patterns: used only without `masks`.

  Returns:
    {path: {'size', 'zeros', 'sparsity'}} for each reported leaf, plus
    'overall' (those leaves together) and 'all_params' (every leaf, biases
    included).
  """
  if masks is None:
    chosen = select(params, patterns)
  else:
    chosen = jax.tree.map(lambda keep, _: keep is not None, masks, params, is_leaf=is_none)
    params = apply_masks(params, masks)
  paths = param_paths(params)
  report = {}
  totals = {'overall': [0, 0], 'all_params': [0, 0]}
  for path, leaf, keep in zip(paths, jax.tree.leaves(params), jax.tree.leaves(chosen),
                              strict=True):
    counts = _counts(leaf)
    names = ('overall', 'all_params') if keep else ('all_params',)
    if keep:
      report[path] = counts
    for name in names:
      totals[name][0] += counts['size']
      totals[name][1] += counts['zeros']
  for name, (size, zeros) in totals.items():
    report[name] = {'size': size, 'zeros': zeros, 'sparsity': zeros / size if size else 0.0}
  return report
