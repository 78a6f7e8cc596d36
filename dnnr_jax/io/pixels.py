"""Raw pixels to the normalised features the models take, with NumPy or JAX.

The one copy of the normalisation that training data (`io.data`), serving
(`io.serve`, NumPy alone) and the raw-uint8 ONNX export (`io.export`, traced)
share, so a served or exported model sees exactly the features it was
trained on.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def normalise_pixels(images: Any, pixel_max: float, mean: float, std: float) -> Any:
  """float32 features [N, F] = (pixels / pixel_max - mean) / std of images [N, ...].

  Args:
    images: raw pixel values, a NumPy array or a (traced) JAX array.
    pixel_max: the data set's largest raw value (`config.PIXEL_MAX`).
    mean, std: the data config's normalisation.

  Returns:
    The same kind of array. A NumPy result is one float32 copy, normalised in
    place (a float32 copy of MNIST's training set is 188 MB).
  """
  pixels = images.reshape(images.shape[0], -1).astype(np.float32)
  if isinstance(pixels, np.ndarray):
    pixels /= pixel_max
    pixels -= mean
    pixels /= std
    return pixels
  return (pixels / pixel_max - mean) / std
