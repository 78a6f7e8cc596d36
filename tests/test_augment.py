"""Random shifts: exact on hand-made images, one shift for student and teacher, off is off."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dnnr_jax.augment import Shift, sample_offsets, shift_images, translate
from dnnr_jax.config import ConfigError, PruneConfig, load_config
from dnnr_jax.errors import DnnrError
from dnnr_jax.io.checkpoint import load_model
from dnnr_jax.io.data import load_dataset
from dnnr_jax.jobs import train as train_jobs
from dnnr_jax.train import AUGMENT_STREAM, Teacher, batch_sums, create_train_state, train_step
from tests.conftest import SMOKE_CONFIG, tree_allclose

BACKGROUND = -0.5


def _reference(image: np.ndarray, rows: int, columns: int) -> np.ndarray:
  """The image [side, side] moved down by `rows` and right by `columns`, by hand."""
  side = image.shape[0]
  moved = np.full_like(image, BACKGROUND)
  for r in range(side):
    for c in range(side):
      if 0 <= r - rows < side and 0 <= c - columns < side:
        moved[r, c] = image[r - rows, c - columns]
  return moved


def test_a_pixel_moves_by_its_offset_and_the_border_is_background():
  shift = Shift(max_shift=2, side=5, background=BACKGROUND)
  dot = np.full((5, 5), BACKGROUND, np.float32)
  dot[2, 2] = 3.0
  ramp = np.arange(25, dtype=np.float32).reshape(5, 5)
  images = jnp.asarray(np.stack([dot, ramp, ramp]).reshape(3, 25))
  offsets = jnp.asarray([[1, -2], [-2, 1], [0, 0]])
  moved = np.asarray(jax.jit(translate, static_argnums=2)(images, offsets, shift)).reshape(3, 5, 5)
  expected_dot = np.full((5, 5), BACKGROUND, np.float32)
  expected_dot[3, 0] = 3.0  # (2, 2) moved one row down, two columns left.
  np.testing.assert_array_equal(moved[0], expected_dot)
  np.testing.assert_array_equal(moved[1], _reference(ramp, -2, 1))
  np.testing.assert_array_equal(moved[1][3:], BACKGROUND)  # Two rows uncovered at the bottom.
  np.testing.assert_array_equal(moved[1][:, 0], BACKGROUND)  # One column at the left.
  np.testing.assert_array_equal(moved[2], ramp)


def test_random_offsets_cover_the_range_and_match_translate():
  shift = Shift(max_shift=2, side=6, background=BACKGROUND)
  images = jax.random.normal(jax.random.PRNGKey(1), (200, 36))
  key = jax.random.PRNGKey(7)
  shifted = np.asarray(jax.jit(shift_images, static_argnums=2)(key, images, shift))
  offsets = np.asarray(sample_offsets(key, 200, 2))
  assert set(offsets.ravel()) == {-2, -1, 0, 1, 2}
  for index in (0, 1, 99):
    np.testing.assert_array_equal(
        shifted[index].reshape(6, 6),
        _reference(np.asarray(images[index]).reshape(6, 6), *offsets[index]))
  assert len({tuple(row) for row in offsets}) > 10  # Each example draws its own offset.
  unshifted = shift_images(key, images, Shift(max_shift=0, side=6, background=BACKGROUND))
  assert unshifted is images


def test_for_data_checks_the_image_and_takes_the_background_from_the_normalisation():
  shift = Shift.for_data(2, 784, mean=0.1307, std=0.3081)
  assert (shift.side, shift.max_shift) == (28, 2)
  assert shift.background == pytest.approx(-0.1307 / 0.3081)
  with pytest.raises(DnnrError, match='compress.prune.augment_shift needs square images'):
    Shift.for_data(1, 100 + 1, 0.0, 1.0, name='compress.prune.augment_shift')
  with pytest.raises(DnnrError, match=r'max_shift = 8 must be in \[0, 8\)'):
    Shift.for_data(8, 64, 0.0, 1.0)


@pytest.mark.parametrize('value', [-1, 8])
def test_config_rejects_a_bad_shift(value):
  with pytest.raises(ConfigError, match='compress.prune.augment_shift = .* from 0 \\(off\\) to 7'):
    PruneConfig(augment_shift=value).validate()
  with pytest.raises(ConfigError, match='needs compress.prune.finetune_epochs of at least 1'):
    PruneConfig(augment_shift=2, finetune_epochs=0, schedule='oneshot').validate()


@pytest.fixture(scope='module')
def setup():
  config = load_config(SMOKE_CONFIG)
  digits = load_dataset(config.data)
  shift = Shift.for_data(2, digits.num_features, config.data.mean, config.data.std)
  batch = (digits.train.images[:32], digits.train.labels[:32])
  return config, digits, shift, batch


def test_the_step_trains_on_the_shifted_batch_and_off_is_unchanged(setup):
  config, digits, shift, batch = setup
  step = jax.jit(train_step)
  plain = create_train_state(config, digits.num_features, 10)
  state = create_train_state(config, digits.num_features, 10, augment=shift)
  assert create_train_state(config, digits.num_features, 10,
                            augment=Shift(0, shift.side, shift.background)).augment is None
  key = jax.random.fold_in(jax.random.fold_in(state.rng, AUGMENT_STREAM), state.step)
  moved = translate(batch[0], sample_offsets(key, 32, 2), shift)
  assert not np.allclose(moved, batch[0])
  _, shifted_sums = step(state, batch)
  _, plain_sums = step(plain, batch)
  tree_allclose(shifted_sums, batch_sums(state.apply_fn, state.variables, moved, batch[1])[1],
                rtol=1e-6)
  tree_allclose(plain_sums, batch_sums(plain.apply_fn, plain.variables, *batch)[1], rtol=1e-6)


def test_the_teacher_sees_the_students_shift(setup):
  # A student distilling only from itself has (up to rounding) zero gradient iff
  # both see the same images; plain SGD makes the step the gradient itself.
  config, digits, shift, batch = setup
  plain = create_train_state(config, digits.num_features, 10)
  sgd = lambda tx: optax.sgd(1.0)  # noqa: E731
  step = jax.jit(train_step)

  def largest_step(apply_fn, augment):
    teacher = Teacher(plain.variables, apply_fn, weight=1.0, temperature=4.0)
    state = create_train_state(config, digits.num_features, 10, params=plain.params,
                               teacher=teacher, augment=augment, wrap_optimizer=sgd)
    moved = step(state, batch)[0].params
    return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(moved), jax.tree.leaves(plain.params), strict=True))

  assert largest_step(plain.apply_fn, shift) < 1e-5
  # The control: a teacher that sees shifted images while the student sees them as they are.
  def shifted_teacher(variables, images):
    return plain.apply_fn(variables, shift_images(jax.random.PRNGKey(3), images, shift))
  assert largest_step(shifted_teacher, None) > 1e-3


def test_training_from_scratch_shifts_with_training_augment_shift(tmp_path):
  # One epoch on digits twice, alike but for the shift: the job trains on
  # shifted images (different weights) and records the setting it used.
  config = load_config(SMOKE_CONFIG)
  one_epoch = dataclasses.replace(
      config.training, epochs=1, checkpoint_every=0)
  runs = {}
  for shift in (0, 1):
    settings = dataclasses.replace(
        config, training=dataclasses.replace(one_epoch, augment_shift=shift))
    path, _ = train_jobs.train_and_save(settings, models_dir=tmp_path / str(shift))
    runs[shift] = load_model(path)
  assert runs[1].config.training.augment_shift == 1
  assert runs[0].config.training.augment_shift == 0
  kernel = lambda run: np.asarray(run.variables['params']['trunk_0']['kernel'])  # noqa: E731
  assert not np.allclose(kernel(runs[0]), kernel(runs[1]))
  with pytest.raises(ConfigError, match='training.augment_shift'):
    dataclasses.replace(one_epoch, augment_shift=-1).validate()
