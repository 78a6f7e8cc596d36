"""Random translations of flattened square images, for consistent distillation.

While a compressed student learns a dense teacher's outputs, both can see
the same randomly shifted batch: "function matching" (Beyer et al. 2022,
"Knowledge distillation: a good teacher is patient and consistent"). The
teacher's outputs on the shifted images are new targets every step, so the
student matches the teacher's function on more of its input space than the
training images alone cover. `shift_images` is that augmentation: each
example moves by its own integer offset, the pixels it uncovers take the
background value, and it is pure and traceable (it runs inside the jitted
training step).

Example:
  >>> shift = Shift.for_data(max_shift=2, num_features=784, mean=0.1307, std=0.3081)
  >>> shifted = shift_images(jax.random.PRNGKey(0), images, shift)  # images [B, 784]
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from dnnr_jax.errors import DnnrError


@dataclasses.dataclass(frozen=True)
class Shift:
  """How far, and on which image, `shift_images` moves each example.

  Attributes:
    max_shift: the largest offset in pixels along each axis; offsets are
      drawn uniformly from -max_shift..max_shift, independently per axis and
      per example.
    side: the images are side x side pixels, flattened row by row.
    background: the (normalised) value of an empty pixel, which fills the
      border a shift uncovers.
  """
  max_shift: int
  side: int
  background: float

  @classmethod
  def for_data(cls, max_shift: int, num_features: int, mean: float, std: float, *,
               name: str = 'max_shift') -> Shift:
    """The shift for square images of `num_features` pixels normalised as (x - mean) / std.

    Args:
      max_shift: as the attribute.
      num_features: pixels per example.
      mean, std: the data's normalisation (`DataConfig`).
      name: what errors call `max_shift` (e.g. the config key it came from).

    Raises:
      DnnrError: `num_features` is not a square, or `max_shift` is negative
        or not smaller than the image's side.
    """
    side = math.isqrt(num_features)
    if side * side != num_features:
      raise DnnrError(f'{name} needs square images, but an example has {num_features} '
                      f'features; set {name} to 0 for this data.')
    if not 0 <= max_shift < side:
      raise DnnrError(f'{name} = {max_shift} must be in [0, {side}) for {side}x{side} '
                      'images; choose e.g. 1.')
    return cls(max_shift=max_shift, side=side, background=(0.0 - mean) / std)


def sample_offsets(key: jax.Array, batch_size: int, max_shift: int) -> jax.Array:
  """Integer offsets [B, 2] (rows, columns), each uniform in -max_shift..max_shift."""
  return jax.random.randint(key, (batch_size, 2), -max_shift, max_shift + 1)


def translate(images: jax.Array, offsets: jax.Array, shift: Shift) -> jax.Array:
  """Moves each image [B, side*side] by its offsets [B, 2] (down, right).

  Pixel (r, c) of the result is pixel (r - offsets[0], c - offsets[1]) of
  the image, or `shift.background` where that lies outside it.
  """
  side, pad = shift.side, shift.max_shift
  squares = images.reshape(-1, side, side)
  padded = jnp.pad(squares, ((0, 0), (pad, pad), (pad, pad)),
                   constant_values=jnp.asarray(shift.background, images.dtype))

  def window(image, offset):
    return jax.lax.dynamic_slice(image, (pad - offset[0], pad - offset[1]), (side, side))

  return jax.vmap(window)(padded, offsets).reshape(images.shape)


def shift_images(key: jax.Array, images: jax.Array, shift: Shift) -> jax.Array:
  """Each image [B, side*side] moved by its own random offset (see `Shift`).

  Returns:
    The shifted images, same shape and dtype; unchanged when max_shift is 0.
  """
  if shift.max_shift == 0:
    return images
  return translate(images, sample_offsets(key, images.shape[0], shift.max_shift), shift)
