"""The routing decision, and execution that runs the deep stage on routed rows only.

The complexity router sends an input deep iff variance > t_variance, entropy >
t_entropy and sparsity < t_sparsity; the confidence router iff the cheap
exit's largest softmax probability is below t_confidence. Decisions are small
pure functions of the scores and the thresholds, separate from the model.

`run_on_routed` is the per-sample execution of the early-exit model: the
expensive stage runs on a static-size bucket of the routed rows only.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dnnr_jax.config import ROUTING_MODES


def deep_rule(
    complexity: dict[str, jax.Array], thresholds: dict[str, jax.Array]
) -> jax.Array:
  """The original's rule, elementwise over whatever shape the metrics have."""
  return ((complexity['variance'] > thresholds['variance'])
          & (complexity['entropy'] > thresholds['entropy'])
          & (complexity['sparsity'] < thresholds['sparsity']))


def route(
    complexity: dict[str, jax.Array],
    thresholds: dict[str, jax.Array],
    mode: str,
) -> jax.Array:
  """Per-example routes, bool [B] (True = deep block).

  Args:
    complexity: metrics keyed 'variance', 'entropy', 'sparsity', each [B].
    thresholds: scalars under the same keys.
    mode: 'per_sample' (each example by its own metrics), 'batch' (one
      decision from the batch means, as the original), 'deep' or 'shallow'.

  Returns:
    bool [B]; in 'batch' mode every entry is the same.
  """
  batch_size = complexity['variance'].shape[0]
  if mode == 'per_sample':
    return deep_rule(complexity, thresholds)
  if mode == 'batch':
    means = {name: jnp.mean(values) for name, values in complexity.items()}
    return jnp.broadcast_to(deep_rule(means, thresholds), (batch_size,))
  return fixed_route(mode, batch_size)


def confidence(logits: jax.Array) -> jax.Array:
  """Largest softmax probability of each row of logits [B, C] -> [B].

  Written as `softmax` then `max`: one `Softmax` and one `ReduceMax` node in
  ONNX, where the graph's per-node cost dominates on the cheap route.
  """
  return jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)


def confidence_route(exit_logits: jax.Array, threshold: jax.Array, mode: str) -> jax.Array:
  """Per-example routes of the confidence router, bool [B] (True = deep).

  An example goes deep iff the cheap exit's largest softmax probability is
  below `threshold` (BranchyNet's rule, on max softmax rather than entropy);
  in 'batch' mode iff the batch's mean confidence is.
  """
  batch_size = exit_logits.shape[0]
  scores = confidence(exit_logits)
  if mode == 'per_sample':
    return scores < threshold
  if mode == 'batch':
    return jnp.broadcast_to(jnp.mean(scores) < threshold, (batch_size,))
  return fixed_route(mode, batch_size)


# Bucket capacities in 32nds of the batch: every 32nd up to 3/16, then steps of
# at most a quarter, so a batch runs at most a quarter more rows than it routes
# (past B/32) and the expensive stage compiles for 13 sizes, not 32.
BUCKET_32NDS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)


def bucket_sizes(batch_size: int) -> tuple[int, ...]:
  """The static capacities for the routed rows: B/32, 2B/32, ..., 6B/32, 8B/32, ..., B.

  `BUCKET_32NDS` of the batch, rounded up, duplicates dropped; the last is always B.
  """
  return tuple(sorted({-(-batch_size * parts // 32) for parts in BUCKET_32NDS}))


def run_on_routed(
    stage: Callable[..., jax.Array],
    deep_path: jax.Array,
    hidden: jax.Array,
    shallow: jax.Array,
    *,
    switch: Callable[..., jax.Array] = jax.lax.switch,
    context: tuple[Any, ...] = (),
) -> jax.Array:
  """Runs `stage` only on the routed rows, under static shapes.

  The routed rows' indices are packed in order at the front (each goes to
  its rank among the routed rows, a cumulative sum: no sort), gathered into
  the smallest capacity of `bucket_sizes(B)` that holds them all, passed
  through `stage`, and scattered back over `shallow` (a bucket's unused
  slots are scattered out of range and dropped). One `switch` on the routed
  count picks the bucket, so only one bucket runs and no bucket ever
  overflows: a batch with more routed rows than B/32 takes the next bucket,
  and so on up to B. No routed row skips the stage and each row's result is
  the stage's on that row, so the output equals running the stage on every
  row and keeping it where routed (up to the matmul's rounding for a
  different row count). With no routed row the stage does not run at all.

  Args:
    stage: `stage(*context, rows [N, H]) -> [N, C]`, row-wise.
    deep_path: bool [B], the rows to run the stage on.
    hidden: [B, H], the stage's inputs.
    shallow: [B, C], the result of the other rows.
    switch: `jax.lax.switch`, or `flax.linen.switch` with the module in `context`.
    context: leading operands of every branch (the Flax module).

  Returns:
    [B, C]: `stage`'s rows where `deep_path`, `shallow`'s elsewhere.
  """
  batch_size = deep_path.shape[0]
  sizes = bucket_sizes(batch_size)
  rank = jnp.cumsum(deep_path.astype(jnp.int32)) - 1
  count = rank[-1] + 1
  # order[k] is the k-th routed row (0 past the last one).
  order = jnp.zeros((batch_size,), jnp.int32).at[jnp.where(deep_path, rank, batch_size)].set(
      jnp.arange(batch_size, dtype=jnp.int32), mode='drop')

  def bucket(size: int):
    def run(*operands):
      *leading, hidden, order, count, shallow = operands
      rows = order[:size]
      outputs = stage(*leading, hidden[rows])
      targets = jnp.where(jnp.arange(size) < count, rows, batch_size)  # unused: dropped
      return shallow.at[targets].set(outputs, mode='drop')
    return run

  def skip(*operands):
    return operands[-1]

  # Branch 0 skips; branch i > 0 runs bucket sizes[i - 1], the first that holds `count`.
  index = jnp.where(count == 0, 0,
                    1 + jnp.sum(count > jnp.asarray(sizes, jnp.int32), dtype=jnp.int32))
  return switch(index, [skip, *map(bucket, sizes)], *context, hidden, order, count, shallow)


def fixed_route(mode: str, batch_size: int) -> jax.Array:
  """The routes of the modes that ignore the inputs: 'deep' or 'shallow', bool [B]."""
  if mode == 'deep':
    return jnp.ones((batch_size,), bool)
  if mode == 'shallow':
    return jnp.zeros((batch_size,), bool)
  raise ValueError(f'routing mode {mode!r} is not one of {ROUTING_MODES}')
