"""Training: one train state, a pure jitted step, an epoch as one `lax.scan`.

The whole training split lives on the device; each epoch shuffles it there
(`fold_in(rng, epoch)`) and scans over the batches, so the host only sees one
call per epoch. The thresholds enter as a traced function of the epoch, so
every epoch runs the same compiled program.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from dnnr_jax.augment import Shift, shift_images
from dnnr_jax.config import Config
from dnnr_jax.model import EarlyExitMLP, init_variables, model_from_config
from dnnr_jax.thresholds import ThresholdSchedule, schedule_from_config


class Split(NamedTuple):
  """One split on device.

  Attributes:
    images: float32 [N, F], normalised pixels.
    labels: int32 [N], classes 0..9.
  """
  images: jax.Array
  labels: jax.Array


@flax.struct.dataclass
class Teacher:
  """A fixed model whose softened outputs the student also learns (distillation).

  The loss becomes (1 - weight) * cross-entropy with the labels + weight *
  T^2 * cross-entropy between softmax(student / T) and softmax(teacher / T),
  T the temperature (Hinton et al. 2015); the T^2 keeps the soft term's
  gradient on the scale of the hard one.

  Attributes:
    variables: the teacher's variables (a pytree; not trained).
    apply_fn: the teacher's `model.apply`, returning (logits, routes).
    weight: the soft term's share of the loss, in [0, 1].
    temperature: T > 0.
  """
  variables: Any
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  weight: float = flax.struct.field(pytree_node=False, default=0.5)
  temperature: float = flax.struct.field(pytree_node=False, default=4.0)


# Folded into the state's key to draw the augmentation's keys, apart from the
# shuffling keys (`fold_in(rng, epoch)`).
AUGMENT_STREAM = 2**31 - 1


class TrainState(train_state.TrainState):
  """Params, optimizer state, thresholds, counters and the shuffling key.

  Attributes:
    thresholds: the hybrid thresholds of the current epoch.
    epoch: epochs completed.
    rng: base PRNG key; epoch e shuffles with `fold_in(rng, e)`.
    teacher: a model to distil from while training, or None.
    exit_weight: weight of the cheap exit's cross-entropy when `apply_fn`
      returns the exit's logits too (an early-exit model trained jointly).
    augment: shift every batch at random before the step (`augment.Shift`);
      student and teacher see the same shifted batch. None: no augmentation.
  """
  thresholds: dict[str, jax.Array]
  epoch: jax.Array
  rng: jax.Array
  teacher: Teacher | None = None
  exit_weight: float = flax.struct.field(pytree_node=False, default=0.0)
  augment: Shift | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def variables(self) -> dict[str, Any]:
    """What `model.apply` takes."""
    return {'params': self.params, 'thresholds': self.thresholds}


def make_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam with the configured learning rate and schedule."""
  training = config.training
  learning_rate: float | optax.Schedule = training.learning_rate
  if training.lr_schedule == 'cosine':
    learning_rate = optax.cosine_decay_schedule(
        training.learning_rate, decay_steps=training.epochs * steps_per_epoch)
  return optax.adam(learning_rate)


def create_train_state(
    config: Config,
    num_features: int,
    steps_per_epoch: int,
    *,
    params: Any = None,
    wrap_optimizer: Callable[[optax.GradientTransformation],
                             optax.GradientTransformation] | None = None,
    apply_fn: Callable | None = None,
    teacher: Teacher | None = None,
    augment: Shift | None = None,
) -> TrainState:
  """A train state at epoch 0, seeded by `training.seed`.

  Args:
    config: the run's configuration.
    num_features: input width.
    steps_per_epoch: optimizer steps per epoch (for the learning-rate schedule).
    params: start from these params (fine-tuning) instead of fresh ones.
    wrap_optimizer: wraps the configured Adam, e.g. in a pruning transform.
    apply_fn: replaces `model.apply`, e.g. with fake quantization for QAT.
      By default an early-exit model trains jointly: its `joint` method,
      both exits on every sample.
    teacher: distil from this model (e.g. the dense one, while pruning).
    augment: shift each batch at random (`augment.Shift`); None or a
      max_shift of 0: train on the batches as they are.
  """
  model = model_from_config(config)
  init_key, shuffle_key = jax.random.split(
      jax.random.PRNGKey(config.training.seed))
  thresholds = schedule_from_config(config)(0)
  if params is None:
    params = init_variables(model, init_key, num_features)['params']
  else:
    # A copy: the jitted epoch donates the state's buffers, and the caller
    # may still use its params (a source checkpoint, say).
    params = jax.tree.map(jnp.array, params)
  tx = make_optimizer(config, steps_per_epoch)
  if apply_fn is None and isinstance(model, EarlyExitMLP):
    apply_fn = functools.partial(model.apply, method=EarlyExitMLP.joint)
  state = TrainState.create(
      apply_fn=apply_fn or model.apply,
      exit_weight=config.model.exit_loss_weight,
      augment=augment if augment is not None and augment.max_shift else None,
      params=params,
      tx=wrap_optimizer(tx) if wrap_optimizer else tx,
      thresholds=thresholds,
      epoch=jnp.zeros((), jnp.int32),
      rng=shuffle_key,
      # Copied for the same reason as the params.
      teacher=None if teacher is None else teacher.replace(
          variables=jax.tree.map(jnp.array, teacher.variables)),
  )
  # `create` counts steps with a Python int; an array keeps every epoch's
  # input signature the same, so the epoch compiles once.
  return state.replace(step=jnp.zeros((), jnp.int32))


def batch_sums(
    apply_fn: Callable, variables: dict, images: jax.Array, labels: jax.Array,
    teacher: Teacher | None = None, exit_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean loss of a batch, and its sums for metrics.

  `apply_fn` returns (logits, routes), or (head logits, routes, exit logits)
  for an early-exit model trained jointly: the loss then adds `exit_weight`
  times the exit's cross-entropy, and the metrics count the routed outputs.

  Returns:
    (mean training loss: cross-entropy, or with a teacher the distillation
    loss; {'loss': sum of cross-entropies, 'correct': count, 'deep': count}).
  """
  logits, deep_path, *exit_logits = apply_fn(variables, images)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  routed = logits
  if exit_logits:
    routed = jnp.where(deep_path[:, None], logits, exit_logits[0])
  sums = {
      'loss': jnp.sum(optax.softmax_cross_entropy_with_integer_labels(routed, labels)),
      'correct': jnp.sum(jnp.argmax(routed, -1) == labels),
      'deep': jnp.sum(deep_path),
  }
  if exit_logits:
    losses = losses + exit_weight * optax.softmax_cross_entropy_with_integer_labels(
        exit_logits[0], labels)
  if teacher is None:
    return jnp.mean(losses), sums
  teacher_logits = jax.lax.stop_gradient(teacher.apply_fn(teacher.variables, images)[0])
  temperature = teacher.temperature
  soft = optax.softmax_cross_entropy(
      logits / temperature, jax.nn.softmax(teacher_logits / temperature))
  mixed = (1 - teacher.weight) * losses + teacher.weight * temperature**2 * soft
  return jnp.mean(mixed), sums


def train_step(
    state: TrainState, batch: tuple[jax.Array, jax.Array]
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step on a batch (images [B, F], labels [B]).

  With `state.augment`, the images are first shifted at random (a key per
  step, `fold_in` of the step count), and the student and the teacher both
  see the shifted batch.

  Returns:
    The new state and the batch's sums ('loss', 'correct', 'deep').
  """
  images, labels = batch
  if state.augment is not None:
    key = jax.random.fold_in(jax.random.fold_in(state.rng, AUGMENT_STREAM), state.step)
    images = shift_images(key, images, state.augment)

  def loss_fn(params):
    variables = {'params': params, 'thresholds': state.thresholds}
    return batch_sums(state.apply_fn, variables, images, labels, state.teacher,
                      state.exit_weight)

  grads, sums = jax.grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads), sums


def train_epoch(
    state: TrainState,
    train: Split,
    *,
    batch_size: int,
    schedule: ThresholdSchedule,
    unroll: int = 1,
    num_examples: int | None = None,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One pass over the shuffled training split, as one `lax.scan`.

  Sets the thresholds for `state.epoch` from `schedule`, shuffles on device,
  drops the last partial batch (a different one every epoch) and counts the
  epoch. `unroll` steps run per loop iteration (`lax.scan`'s unroll): fewer
  iterations help where each costs a launch, as on a GPU.

  Args:
    state: the train state.
    train: the training split; rows past `num_examples` are padding.
    batch_size: examples per step.
    schedule: the thresholds as a function of the epoch.
    unroll: steps per loop iteration.
    num_examples: the real rows of `train` (None: all of them).
    batch_sharding: over a mesh, how [steps, batch, ...] arrays are laid
      out (`parallel.batch_sharding`): the epoch's shuffled batches are then
      gathered once, each device receiving its part of every batch.

  Returns:
    The new state and the epoch's running means: 'loss', 'accuracy',
    'deep_fraction'.
  """
  num_examples = num_examples or train.labels.shape[0]
  steps = num_examples // batch_size
  state = state.replace(thresholds=schedule(state.epoch))
  order = jax.random.permutation(
      jax.random.fold_in(state.rng, state.epoch), num_examples)
  batches = order[:steps * batch_size].reshape(steps, batch_size)

  def body(state, indices):
    return train_step(state, (train.images[indices], train.labels[indices]))

  if batch_sharding is None:
    state, sums = jax.lax.scan(body, state, batches, unroll=unroll)
  else:
    shuffled = jax.lax.with_sharding_constraint(
        (train.images[batches], train.labels[batches]), batch_sharding)
    state, sums = jax.lax.scan(train_step, state, shuffled, unroll=unroll)
  seen = steps * batch_size
  metrics = {
      'loss': jnp.sum(sums['loss']) / seen,
      'accuracy': jnp.sum(sums['correct']) / seen,
      'deep_fraction': jnp.sum(sums['deep']) / seen,
  }
  return state.replace(epoch=state.epoch + 1), metrics


def jit_train_epoch(
    config: Config,
    *,
    num_examples: int | None = None,
    state_sharding: Any = None,
    batch_sharding: jax.sharding.NamedSharding | None = None,
) -> Callable:
  """`train_epoch` compiled once for this config; donates the old state.

  Args:
    config: the run's configuration.
    num_examples: the training split's real rows (None: all).
    state_sharding: over a mesh, the state's shardings (`parallel.state_shardings`),
      kept from epoch to epoch so that every epoch runs one program.
    batch_sharding: over a mesh of several devices, the batches' layout.
  """
  out_shardings = None
  if state_sharding is not None:
    metrics_sharding = jax.sharding.NamedSharding(
        jax.tree.leaves(state_sharding)[0].mesh, jax.sharding.PartitionSpec())
    out_shardings = (state_sharding, metrics_sharding)
  return jax.jit(
      functools.partial(
          train_epoch,
          batch_size=config.training.batch_size,
          schedule=schedule_from_config(config),
          unroll=config.training.scan_unroll,
          num_examples=num_examples,
          batch_sharding=batch_sharding,
      ),
      donate_argnums=0,
      out_shardings=out_shardings,
  )


def evaluation_apply(model: nn.Module) -> Callable:
  """`model.apply` as evaluation runs it: (logits, routes[, exit logits]).

  An early-exit model routed per sample runs every layer on every row
  (`joint`) and `batch_sums` keeps each row's routed logits: the run-everything
  reference that its skipping execution equals (`tests/test_early_exit.py`).
  That is one program to compile, where the skipping one compiles the
  expensive stage once per bucket size (13 at batch 100: XLA took 2.7 s
  instead of 0.3 s on the smoke model).
  """
  if isinstance(model, EarlyExitMLP) and model.routing == 'per_sample':
    return functools.partial(model.apply, method=EarlyExitMLP.joint)
  return model.apply


@functools.partial(jax.jit, static_argnames='model')
def routed_logits(model: nn.Module, variables, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(logits [B, C], routes bool [B]) of `images` as evaluation computes them:
  `evaluation_apply`, each row's logits from the route it took."""
  logits, deep_path, *exit_logits = evaluation_apply(model)(variables, images)
  if exit_logits:
    logits = jnp.where(deep_path[:, None], logits, exit_logits[0])
  return logits, deep_path


@functools.partial(jax.jit, static_argnames=('model', 'batch_size'))
def _evaluate_sums(model: nn.Module, variables, images, labels, batch_size: int):
  """Sums over [B, F] batches and one remainder batch; each is one routing batch."""
  apply_fn = evaluation_apply(model)

  def chunk_sums(chunk):
    return batch_sums(apply_fn, variables, *chunk)[1]

  num_examples = labels.shape[0]
  full = num_examples // batch_size * batch_size
  sums = jax.lax.map(chunk_sums, (
      images[:full].reshape(-1, batch_size, images.shape[1]),
      labels[:full].reshape(-1, batch_size)))
  totals = jax.tree.map(jnp.sum, sums)
  if full < num_examples:
    rest = chunk_sums((images[full:], labels[full:]))
    totals = jax.tree.map(jnp.add, totals, rest)
  return totals


def evaluate(
    model: nn.Module, variables: dict, split: Split, batch_size: int
) -> dict[str, float]:
  """Loss, accuracy and deep-path fraction of `variables` on a split.

  The split is cut into batches of `batch_size` (and one remainder batch);
  in 'batch' routing mode each batch takes one route. An early-exit model
  routed per sample is evaluated on its run-everything reference
  (`evaluation_apply`). Over a mesh, the variables and the split are used
  where they lie (`parallel.shard_rows`).

  Returns:
    {'loss', 'accuracy', 'deep_fraction', 'n'}.
  """
  num_examples = int(split.labels.shape[0])
  batch_size = min(batch_size, num_examples)
  sums = _evaluate_sums(model, variables, split.images, split.labels, batch_size)
  return {
      'loss': float(sums['loss']) / num_examples,
      'accuracy': int(sums['correct']) / num_examples,
      'deep_fraction': int(sums['deep']) / num_examples,
      'n': num_examples,
  }
