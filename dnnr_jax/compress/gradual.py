"""Pruning during training: the cubic sparsity schedule and optax wrappers.

`pruning(inner, pruner, ...)` is gradual pruning (Zhu & Gupta, 2017) as an
optax `GradientTransformation`: the masks live in its state, are recomputed
by `pruner` (`prune.magnitude_pruner` or `prune.nm_pruner`) inside the jitted
step every `update_every` steps, and every update it returns lands pruned
weights on exactly 0.0. `keep_masked(inner, masks)` is the fine-tuning half
of one-shot pruning: a fixed mask, kept the same way.

Example:
  >>> schedule = cubic_sparsity_schedule(0.0, 0.8, begin_step=100, end_step=1000)
  >>> tx = pruning(optax.adam(1e-3), prune.magnitude_pruner(schedule), update_every=50)
  >>> state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dnnr_jax.compress import prune
from dnnr_jax.compress.paths import DEFAULT_PATTERNS, Patterns, is_none, select
from dnnr_jax.errors import DnnrError


def cubic_sparsity_schedule(
    initial_sparsity: float, final_sparsity: float, begin_step: int, end_step: int,
) -> optax.Schedule:
  """Zhu & Gupta's s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3.

  `optax.polynomial_schedule` of power 3, with t0 = begin_step and n dt =
  end_step - begin_step: s_i until begin_step, s_f from end_step on. Pruning
  fast early, while redundant weights are plentiful, and slowly near the end
  lets the network recover.

  Returns:
    count -> sparsity, traceable (no Python branch on the count).

  Raises:
    DnnrError: sparsities outside [0, 1) or decreasing, or end_step <= begin_step.
  """
  for name, value in (('initial_sparsity', initial_sparsity),
                      ('final_sparsity', final_sparsity)):
    if not 0.0 <= value < 1.0:
      raise DnnrError(f'{name} {value!r} is not in [0, 1); choose a fraction such as 0.8.')
  if initial_sparsity > final_sparsity:
    raise DnnrError(
        f'initial_sparsity {initial_sparsity} exceeds final_sparsity {final_sparsity}; '
        'gradual pruning only removes weights, so swap them.')
  if not 0 <= begin_step < end_step:
    raise DnnrError(
        f'pruning steps begin_step={begin_step}, end_step={end_step} are not '
        '0 <= begin_step < end_step; give the schedule a positive length.')
  return optax.polynomial_schedule(
      init_value=initial_sparsity, end_value=final_sparsity, power=3,
      transition_steps=end_step - begin_step, transition_begin=begin_step)


# Gradual pruning leaves at least this share of the fine-tuning steps, and at
# least one epoch, to recover at the final sparsity (see `pruning_end_step`).
RECOVERY_SHARE = 0.25


def pruning_end_step(total_steps: int, steps_per_epoch: int, gradual_end: float) -> int:
  """The step at which gradual pruning reaches its final sparsity.

  The rule: the cubic schedule ends at min(gradual_end * T, T - R), where T
  is the fine-tuning steps and R = max(one epoch, RECOVERY_SHARE * T) is the
  recovery phase, so every gradual run fine-tunes at least one full epoch at
  the final sparsity. With a single fine-tuning epoch nothing is left to prune
  gradually: the schedule then ends at step 1, i.e. one-shot pruning followed
  by a full epoch of recovery.

  Args:
    total_steps: fine-tuning steps T (epochs times steps per epoch).
    steps_per_epoch: optimizer steps in one epoch.
    gradual_end: the latest end, as a share of T, in (0, 1].

  Returns:
    The end step, at least 1.

  Example:
    >>> pruning_end_step(44, 22, 0.75)  # two epochs: prune in the first
    22
  """
  recovery = max(steps_per_epoch, math.ceil(RECOVERY_SHARE * total_steps))
  return max(1, min(int(gradual_end * total_steps), total_steps - recovery))


class PruningState(NamedTuple):
  """State of `pruning` and `keep_masked`.

  Attributes:
    inner_state: the wrapped transform's state.
    masks: like the params, bool (True = keep) for pruned leaves, None elsewhere.
    count: updates seen, int32.
  """
  inner_state: optax.OptState
  masks: Any
  count: jax.Array


def masked_updates(updates, masks, params):
  """Updates that land pruned weights on exactly 0.0: -param there, the update elsewhere."""
  return jax.tree.map(
      lambda keep, update, param: update if keep is None else jnp.where(keep, update, -param),
      masks, updates, params, is_leaf=is_none)


def _require_params(params) -> None:
  if params is None:
    raise DnnrError('pruning needs the params in tx.update(updates, state, params); pass them.')


def _all_kept(params, patterns):
  return jax.tree.map(lambda keep, leaf: jnp.ones(jnp.shape(leaf), bool) if keep else None,
                      select(params, patterns), params)


def pruning(
    inner: optax.GradientTransformation,
    pruner: prune.Pruner,
    *,
    update_every: int,
    patterns: Patterns = DEFAULT_PATTERNS,
) -> optax.GradientTransformation:
  """Wraps `inner` so the params it trains are pruned on a schedule.

  At every count that is a multiple of `update_every` (count 0 included)
  `pruner` recomputes the masks, inside the same compiled step, from the
  would-be new params `params + inner_updates` and the current masks.

  The inner transform sees dense gradients (its moments are not masked); the
  returned updates are `where(mask, inner_updates, -params)`, so pruned
  weights are exactly 0.0 after `optax.apply_updates` whatever Adam's moments
  hold.

  Args:
    inner: the optimizer to wrap, e.g. `optax.adam(1e-3)`.
    pruner: `prune.magnitude_pruner(schedule, ...)` or `prune.nm_pruner(n, m, ...)`.
    update_every: steps between mask updates.
    patterns: regexes of the leaves to prune (default: Dense kernels).

  Returns:
    A transform whose state is a `PruningState`; it needs `params` in update.
  """
  if not isinstance(update_every, int) or update_every < 1:
    raise DnnrError(f'update_every {update_every!r} is not a positive integer; use e.g. 100.')

  def init_fn(params):
    masks = _all_kept(params, patterns)
    count = jnp.zeros((), jnp.int32)
    jax.eval_shape(pruner, params, masks, count)  # Bad shapes fail here, not mid-training.
    return PruningState(inner.init(params), masks, count)

  def update_fn(updates, state, params=None):
    _require_params(params)
    inner_updates, inner_state = inner.update(updates, state.inner_state, params)
    candidate = optax.apply_updates(params, masked_updates(inner_updates, state.masks, params))
    # lax.cond, not a Python if: the count is traced, one program serves all steps.
    masks = jax.lax.cond(state.count % update_every == 0,
                         lambda: pruner(candidate, state.masks, state.count),
                         lambda: state.masks)
    return masked_updates(inner_updates, masks, params), state._replace(
        inner_state=inner_state, masks=masks, count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def keep_masked(inner: optax.GradientTransformation, masks) -> optax.GradientTransformation:
  """Fine-tunes under fixed `masks`: pruned weights go to and stay at exactly 0.0.

  The masks (e.g. from `prune.magnitude_masks`) live in the state, not in the
  closure, so they are not baked into the compiled step as constants.
  """

  def init_fn(params):
    if jax.tree.structure(masks, is_leaf=is_none) != jax.tree.structure(params):
      raise DnnrError('keep_masked masks do not have the params\' structure; build them '
                      'from these params with prune.magnitude_masks or prune.nm_masks.')
    return PruningState(inner.init(params), masks, jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    _require_params(params)
    inner_updates, inner_state = inner.update(updates, state.inner_state, params)
    return masked_updates(inner_updates, state.masks, params), state._replace(
        inner_state=inner_state, count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def final_masks(opt_state):
  """The masks of the first `PruningState` found in an optax state (e.g. inside a chain).

  Raises:
    DnnrError: the state holds no `PruningState`.
  """
  found = [node for node in jax.tree.leaves(
      opt_state, is_leaf=lambda node: isinstance(node, PruningState))
           if isinstance(node, PruningState)]
  if not found:
    raise DnnrError('optimizer state holds no PruningState; build the optimizer with '
                    'gradual.pruning or gradual.keep_masked.')
  return found[0].masks
