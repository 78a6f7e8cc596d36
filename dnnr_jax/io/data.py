"""MNIST and scikit-learn's digits as normalised device arrays.

MNIST is looked up in this order: the `data_dir` argument (the CLI's
`--data-dir`), `$DNNR_DATA_DIR`, the user cache (`default_cache_dir()`), and
finally a download into the cache with MD5 verification. Every file is checked
(gzip stream, IDX header, payload length, record counts, label range) and any
defect raises `DataError` naming the file and the fix.

Example:
  >>> dataset = load_dataset(DataConfig(dataset='digits'))
  >>> dataset.num_features
  64
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.client
import logging
import math
import os
import pathlib
import tempfile
import urllib.request

import jax
import numpy as np

from dnnr_jax.config import PIXEL_MAX, DataConfig
from dnnr_jax.errors import DataError
from dnnr_jax.io.idx import read_idx
from dnnr_jax.io.pixels import normalise_pixels
from dnnr_jax.train import Split

MNIST_FILES = {
    'train_images': 'train-images-idx3-ubyte.gz',
    'train_labels': 'train-labels-idx1-ubyte.gz',
    'test_images': 't10k-images-idx3-ubyte.gz',
    'test_labels': 't10k-labels-idx1-ubyte.gz',
}
# The published checksums; only downloads are verified against them, because
# a user-supplied copy may be a legitimate re-encoding.
MNIST_MD5 = {
    'train-images-idx3-ubyte.gz': 'f68b3c2dcbeaaa9fbdd348bbdeb94873',
    'train-labels-idx1-ubyte.gz': 'd53e105ee54ea40749a09fcbcd1e9432',
    't10k-images-idx3-ubyte.gz': '9fb629c4189551a2d022fa330f9573f3',
    't10k-labels-idx1-ubyte.gz': 'ec29112dd5afa0611ce80d1b7f02629c',
}
MNIST_MIRRORS = (
    'https://ossci-datasets.s3.amazonaws.com/mnist/',
    'https://storage.googleapis.com/cvdf-datasets/mnist/',
    'http://yann.lecun.com/exdb/mnist/',
)
DOWNLOAD_TIMEOUT_S = 30
NUM_CLASSES = 10
DIGITS_SOURCE = 'sklearn.datasets.load_digits'

_FIX = 're-download it or replace it with a good copy'
_CHUNK = 1 << 20

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A data set's splits and the facts the model needs about it.

  Attributes:
    name: 'mnist' or 'digits'.
    train: the training split.
    test: the test split.
    validation: the last `validation_size` examples of the unshuffled training
      data, or None when `validation_size` is 0.
    num_features: input width, read off the data.
    num_classes: number of classes.
    source: the directory the MNIST files came from, or DIGITS_SOURCE.
  """
  name: str
  train: Split
  test: Split
  validation: Split | None
  num_features: int
  num_classes: int
  source: str


def load_dataset(
    config: DataConfig, data_dir: str | os.PathLike | None = None) -> Dataset:
  """Loads, normalises and splits the configured data set onto the device.

  Args:
    config: names the data set, the normalisation and the validation size.
    data_dir: a directory holding the MNIST files; ignored for digits.

  Returns:
    The data set, every array on the default device.

  Raises:
    DataError: the data cannot be found or is malformed, or
      `config.validation_size` leaves no training examples.
  """
  if config.dataset == 'mnist':
    directory = find_mnist(data_dir)
    arrays = load_mnist_arrays(directory)
    source = str(directory)
    train = (arrays['train_images'], arrays['train_labels'])
    test = (arrays['test_images'], arrays['test_labels'])
  elif config.dataset == 'digits':
    source = DIGITS_SOURCE
    train, test = _digits_arrays()
  else:
    raise DataError(
        f'data.dataset = {config.dataset!r} is not one of: mnist, digits.')

  for name, (_, labels) in (('training', train), ('test', test)):
    if len(labels) == 0:
      raise DataError(
          f'the {name} split of {config.dataset} in {source} holds no examples; '
          're-download it or replace it with a good copy.')
  pixel_max = PIXEL_MAX[config.dataset]

  def split(images: np.ndarray, labels: np.ndarray) -> Split:
    pixels = normalise_pixels(images, pixel_max, config.mean, config.std)
    return Split(jax.device_put(pixels), jax.device_put(labels.astype(np.int32)))

  validation = None
  if config.validation_size > 0:
    train_size = len(train[1])
    if config.validation_size >= train_size:
      raise DataError(
          f'data.validation_size = {config.validation_size} leaves no '
          f'training examples: the {config.dataset} training split has only '
          f'{train_size}; choose a value below {train_size}.')
    cut = train_size - config.validation_size
    validation = split(train[0][cut:], train[1][cut:])
    train = (train[0][:cut], train[1][:cut])
  train_split = split(*train)
  return Dataset(
      name=config.dataset,
      train=train_split,
      test=split(*test),
      validation=validation,
      num_features=int(train_split.images.shape[1]),
      num_classes=NUM_CLASSES,
      source=source)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
  """Splits scikit-learn's digits 80/20 the same way on every machine.

  Read once per process (parsing its CSV took 0.3-0.8 s a call) and
  returned read-only, so no caller can change another's copy.
  """
  # Imported here: only digits needs scikit-learn, and it is slow to import.
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  count = len(digits.target)
  # A fixed generator, not the training seed: the test set must not move.
  order = np.random.default_rng(0).permutation(count)
  cut = count - math.ceil(0.2 * count)
  train, test = order[:cut], order[cut:]
  splits = ((digits.data[train], digits.target[train]),
            (digits.data[test], digits.target[test]))
  for array in (array for split in splits for array in split):
    array.setflags(write=False)
  return splits


def default_cache_dir() -> pathlib.Path:
  """The user cache for downloaded MNIST files (honours XDG_CACHE_HOME)."""
  base = os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
  return pathlib.Path(base) / 'dnnr_jax' / 'mnist'


def find_mnist(
    data_dir: str | os.PathLike | None = None, *,
    download: bool = True) -> pathlib.Path:
  """Finds (or downloads) a directory holding the four MNIST files.

  Args:
    data_dir: a directory the user named; used without fallback.
    download: whether to fetch missing files into the cache.

  Returns:
    The directory holding the four files (.gz or un-gzipped).

  Raises:
    DataError: a named directory lacks files, or MNIST is nowhere to be found
      and cannot be downloaded.
  """
  fix = 'put the four MNIST files there or point it at a directory that does'
  if data_dir is not None:
    directory = pathlib.Path(data_dir).expanduser()
    _require_complete(directory, f'data_dir = {directory}', fix)
    return directory
  env_dir = os.environ.get('DNNR_DATA_DIR')
  if env_dir:
    directory = pathlib.Path(env_dir).expanduser()
    _require_complete(
        directory, f'DNNR_DATA_DIR={directory}', f'{fix}, or unset it')
    return directory
  cache = default_cache_dir()
  missing = _missing_files(cache)
  if not missing:
    return cache
  if download:
    failure = _download(cache, missing)
    if failure is None:
      return cache
    reason = f'downloading into it failed ({failure})'
  else:
    reason = 'downloading was turned off'
  raise DataError(
      'MNIST not found: no data_dir=DIR was given, DNNR_DATA_DIR is not set, '
      f'the cache {cache} lacks {len(missing)} of the four files and '
      f'{reason}; pass data_dir=DIR, set DNNR_DATA_DIR=DIR, or place '
      f'{", ".join(MNIST_FILES.values())} in {cache}.')


def _locate(directory: pathlib.Path, name: str) -> pathlib.Path | None:
  """The file `name` in `directory`, gzipped or not, or None."""
  for candidate in (name, name.removesuffix('.gz')):
    if (directory / candidate).is_file():
      return directory / candidate
  return None


def _missing_files(directory: pathlib.Path) -> list[str]:
  return [name for name in MNIST_FILES.values()
          if _locate(directory, name) is None]


def _require_complete(directory: pathlib.Path, where: str, fix: str) -> None:
  if not directory.is_dir():
    raise DataError(f'{where} is not a directory; {fix}.')
  missing = _missing_files(directory)
  if missing:
    raise DataError(
        f'{where} lacks {", ".join(missing)} (gzipped or not); {fix}.')


def _download(cache: pathlib.Path, names: list[str]) -> str | None:
  """Fetches `names` into `cache`; returns None, or why it failed."""
  try:
    cache.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    return f'cannot create it: {error}'
  for name in names:
    errors = []
    for mirror in MNIST_MIRRORS:
      url = mirror + name
      _log.info('Downloading %s', url)
      error = _fetch(url, cache / name, MNIST_MD5[name])
      if error is None:
        break
      errors.append(f'{url}: {error}')
    else:
      return '; '.join(errors)
  return None


def _fetch(url: str, target: pathlib.Path, md5: str) -> str | None:
  """Downloads `url` to `target` atomically; returns None, or the error."""
  temp = None
  try:
    handle, temp_name = tempfile.mkstemp(
        dir=target.parent, prefix=f'.{target.name}.', suffix='.part')
    temp = pathlib.Path(temp_name)
    digest = hashlib.md5()
    with os.fdopen(handle, 'wb') as out, urllib.request.urlopen(
        url, timeout=DOWNLOAD_TIMEOUT_S) as response:
      while chunk := response.read(_CHUNK):
        digest.update(chunk)
        out.write(chunk)
    if digest.hexdigest() != md5:
      return f'MD5 {digest.hexdigest()} is not the published {md5}'
    os.replace(temp, target)
    return None
  except (OSError, http.client.HTTPException) as error:
    return str(error) or type(error).__name__
  finally:
    # Also runs on KeyboardInterrupt, so no partial file is left behind.
    if temp is not None:
      temp.unlink(missing_ok=True)


def load_mnist_arrays(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads and cross-checks the four MNIST files in `directory`.

  Args:
    directory: holds the four files, gzipped or not.

  Returns:
    uint8 arrays under the keys of MNIST_FILES.

  Raises:
    DataError: a file is missing or malformed, images are not 28x28, counts
      of images and labels differ, or a label is outside 0..9.
  """
  directory = pathlib.Path(directory)
  _require_complete(directory, str(directory), 'add the missing files')
  paths = {key: _locate(directory, name) for key, name in MNIST_FILES.items()}
  arrays = {key: read_idx(path, kind=key.split('_')[1])
            for key, path in paths.items()}
  for split in ('train', 'test'):
    images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
    image_path, label_path = paths[f'{split}_images'], paths[f'{split}_labels']
    if images.shape[1:] != (28, 28):
      raise DataError(
          f'{image_path} holds {images.shape[1]}x{images.shape[2]} images, '
          f'not MNIST\'s 28x28; {_FIX}.')
    if len(images) != len(labels):
      raise DataError(
          f'{image_path} holds {len(images)} images but {label_path} holds '
          f'{len(labels)} labels; re-download or replace both.')
    if labels.size and labels.max() >= NUM_CLASSES:
      index = int(np.argmax(labels >= NUM_CLASSES))
      raise DataError(
          f'{label_path} has label {labels[index]} at record {index}, outside '
          f'0..{NUM_CLASSES - 1}; {_FIX}.')
  return arrays
