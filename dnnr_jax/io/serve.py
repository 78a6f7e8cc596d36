"""Serving an exported model with onnxruntime alone (no JAX import).

`predict_onnx` reads IDX images (and optionally labels), feeds them to the
ONNX file in batches, normalising them first unless the export takes raw
uint8 images, and reports accuracy, the deep-path fraction and throughput.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from dnnr_jax.config import PIXEL_MAX
from dnnr_jax.errors import DnnrError
from dnnr_jax.io.idx import read_idx
from dnnr_jax.io.pixels import normalise_pixels


def predict_onnx(
    model_path: str | os.PathLike,
    images_path: str | os.PathLike,
    labels_path: str | os.PathLike | None = None,
    *,
    batch_size: int = 256,
) -> dict[str, Any]:
  """Runs an exported dnnr_jax model on IDX images.

  Args:
    model_path: a .onnx file written by `dnnr export`.
    images_path: IDX images [N, rows, cols] (.gz or not).
    labels_path: IDX labels [N]; with them, accuracy is reported.
    batch_size: examples per onnxruntime call.

  Returns:
    {'n', 'deep_fraction', 'samples_per_second', 'accuracy' (with labels),
    'predictions' (argmax per image)}.

  Raises:
    DnnrError: a missing or non-dnnr ONNX file, images of the wrong shape,
      labels that do not match the images, a batch size below 1.
  """
  import onnxruntime

  if batch_size < 1:
    raise DnnrError(f'batch_size = {batch_size} must be at least 1.')
  if not os.path.isfile(model_path):
    raise DnnrError(f'{model_path} is not a file; pass an .onnx file written by dnnr export.')
  try:
    session = onnxruntime.InferenceSession(str(model_path), providers=['CPUExecutionProvider'])
  except Exception as error:  # onnxruntime raises its own types for a bad file.
    raise DnnrError(f'{model_path} is not a valid ONNX model ({error}); '
                    'pass a file written by dnnr export.') from None
  props = session.get_modelmeta().custom_metadata_map
  if 'dnnr_jax.normalisation' not in props:
    raise DnnrError(f'{model_path} was not written by dnnr export (no dnnr_jax metadata); '
                    'export the checkpoint with dnnr export.')
  images = read_idx(images_path, kind='images')
  expected = session.get_inputs()[0].shape
  raw = props.get('dnnr_jax.input') == 'uint8 images'
  inputs = images if raw else _normalise(images, props)
  if list(inputs.shape[1:]) != list(expected[1:]):
    raise DnnrError(
        f'{images_path} holds images of shape {list(images.shape[1:])}, but {model_path} '
        f'takes {expected[1:]} per example; pass images of the data set it was trained on.')
  labels = None
  if labels_path is not None:
    labels = read_idx(labels_path, kind='labels')
    if labels.shape[0] != images.shape[0]:
      raise DnnrError(f'{labels_path} has {labels.shape[0]} labels for {images.shape[0]} '
                      f'images in {images_path}; pass the matching labels file.')
  start = time.perf_counter()
  logits, routes = run_batches(session, inputs, batch_size)
  seconds = time.perf_counter() - start
  predictions = np.argmax(logits, -1)
  result = {
      'n': int(images.shape[0]),
      'deep_fraction': float(np.mean(routes)),
      'samples_per_second': images.shape[0] / seconds,
      'batch_size': batch_size,
      'predictions': predictions.tolist(),
  }
  if labels is not None:
    result['accuracy'] = float(np.mean(predictions == labels))
  return result


def run_batches(session: Any, inputs: np.ndarray,
                batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(logits [N, classes], deep_path bool [N]) of an exported model's onnxruntime
  `session` on `inputs`, `batch_size` rows per call."""
  logits, routes = [], []
  for first in range(0, inputs.shape[0], batch_size):
    batch_logits, batch_routes = session.run(['logits', 'deep_path'],
                                             {'input': inputs[first:first + batch_size]})
    logits.append(batch_logits)
    routes.append(batch_routes)
  return np.concatenate(logits), np.concatenate(routes)


def _normalise(images: np.ndarray, props: dict[str, str]) -> np.ndarray:
  """Pixels to the normalised float32 features the export takes, as in training."""
  constants = dict(item.split('=') for item in props['dnnr_jax.normalisation'].split(','))
  pixel_max = PIXEL_MAX.get(props.get('dnnr_jax.dataset', 'mnist'), 255.0)
  return normalise_pixels(images, pixel_max, float(constants['mean']), float(constants['std']))
