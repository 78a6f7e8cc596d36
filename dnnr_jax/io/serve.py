"""Serving an exported model with onnxruntime alone (no JAX import).

`load_onnx` opens a file written by `dnnr export`: its digest is checked
(`dnnr_jax.io.integrity`) and its normalisation metadata validated before a
session is made. `predict_onnx` reads IDX images (and optionally labels),
feeds them in batches, normalising them first unless the export takes raw
uint8 images, and reports accuracy, the deep-path fraction and throughput.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import numpy as np

from dnnr_jax.config import PIXEL_MAX
from dnnr_jax.errors import DnnrError
from dnnr_jax.io import integrity
from dnnr_jax.io.idx import read_idx
from dnnr_jax.io.pixels import normalise_pixels


@dataclasses.dataclass(frozen=True)
class OnnxModel:
  """An exported model in an onnxruntime session, checked on load.

  Attributes:
    path: the .onnx file.
    session: its `onnxruntime.InferenceSession` (CPU).
    metadata: its `dnnr_jax.*` metadata entries.
    mean, std: the normalisation the model was trained with.
    num_classes: width of its logits, None where the graph leaves it open.
  """
  path: str
  session: Any
  metadata: dict[str, str]
  mean: float
  std: float
  num_classes: int | None

  @property
  def raw_uint8_input(self) -> bool:
    return self.metadata.get('dnnr_jax.input') == 'uint8 images'

  def normalise(self, images: np.ndarray) -> np.ndarray:
    """Pixels [N, ...] to the normalised float32 features [N, F], as in training."""
    pixel_max = PIXEL_MAX.get(self.metadata.get('dnnr_jax.dataset', 'mnist'), 255.0)
    return normalise_pixels(images.reshape(images.shape[0], -1), pixel_max, self.mean, self.std)

  def predict_with_routes(self, inputs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Logits [B, classes] and routes bool [B] of inputs in the export's format."""
    inputs = np.asarray(inputs, np.uint8 if self.raw_uint8_input else np.float32)
    if not self.raw_uint8_input and not np.all(np.isfinite(inputs)):
      raise DnnrError(f'inputs to {self.path} contain NaN or infinite values; clean them '
                      'before predict.')
    logits, deep_path = self.session.run(['logits', 'deep_path'], {'input': inputs})
    return logits, deep_path

  def predict(self, inputs: Any) -> np.ndarray:
    return self.predict_with_routes(inputs)[0]


def load_onnx(path: str | os.PathLike, *, intra_op_threads: int = 0) -> OnnxModel:
  """Opens a .onnx file written by `dnnr export`, checked against its digest.

  Args:
    path: the .onnx file.
    intra_op_threads: onnxruntime's threads per node; 0 (its default) uses
      every core, which suits large batches; 1 suits batch-1 serving, where
      handing each small node to a thread pool costs more than the node.

  Raises:
    DnnrError: a missing, damaged, edited or non-dnnr file, or normalisation
      metadata that is not two finite numbers with a positive std.
  """
  import onnxruntime

  if not os.path.isfile(path):
    raise DnnrError(f'{path} is not a file; pass an .onnx file written by dnnr export.')
  onnx_model, data = integrity.load_verified_onnx(path)
  try:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    session = onnxruntime.InferenceSession(data, options, providers=['CPUExecutionProvider'])
  except Exception as error:  # onnxruntime raises its own types for a bad file.
    raise DnnrError(f'{path} is not a valid ONNX model ({error}); '
                    'pass a file written by dnnr export.') from None
  props = dict(session.get_modelmeta().custom_metadata_map)
  if 'dnnr_jax.normalisation' not in props:
    raise DnnrError(f'{path} was not written by dnnr export (no dnnr_jax metadata); '
                    'export the checkpoint with dnnr export.')
  mean, std = _normalisation(path, props['dnnr_jax.normalisation'])
  classes = session.get_outputs()[0].shape[-1]
  return OnnxModel(str(path), session, props, mean, std,
                   classes if isinstance(classes, int) else None)


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
    DnnrError: a missing, damaged or non-dnnr ONNX file, no images or images
      of the wrong shape, labels that do not match the images or the classes,
      a batch size below 1.
  """
  if batch_size < 1:
    raise DnnrError(f'batch_size = {batch_size} must be at least 1.')
  model = load_onnx(model_path)
  images = read_idx(images_path, kind='images')
  if images.shape[0] == 0:
    raise DnnrError(f'{images_path} holds no images; pass an IDX file with at least one.')
  expected = model.session.get_inputs()[0].shape
  inputs = images if model.raw_uint8_input else model.normalise(images)
  if not np.all(np.isfinite(inputs)):
    raise DnnrError(f'{model_path} normalises {images_path} to NaN or infinite values (mean '
                    f'{model.mean}, std {model.std}); export the checkpoint again.')
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
    if model.num_classes is not None and labels.max() >= model.num_classes:
      raise DnnrError(f'{labels_path} holds label {int(labels.max())}, but {model_path} has '
                      f'{model.num_classes} classes (0 to {model.num_classes - 1}); pass the '
                      'labels of the data set it was trained on.')
  start = time.perf_counter()
  logits, routes = run_batches(model.session, inputs, batch_size)
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


def _normalisation(path, text: str) -> tuple[float, float]:
  """(mean, std) of a `dnnr_jax.normalisation` entry, 'mean=M,std=S'."""
  try:
    constants = dict(item.split('=', 1) for item in text.split(','))
    mean, std = float(constants['mean']), float(constants['std'])
  except (ValueError, KeyError):
    mean = std = math.nan
  if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
    raise DnnrError(
        f"{path} has damaged normalisation metadata ({text!r}; expected 'mean=M,std=S' "
        'with finite numbers and S > 0); export the checkpoint again with dnnr export.')
  return mean, std
