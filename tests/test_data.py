"""Tests for dnnr_jax.io.data: IDX reading, validation, lookup and download."""

import gzip
import hashlib
import io
import os
import pathlib
import struct
import urllib.error
import urllib.request

import numpy as np
import pytest

from dnnr_jax.config import DataConfig
from dnnr_jax.errors import DataError
from dnnr_jax.io import data

NAMES = data.MNIST_FILES


def _idx(array, magic=None):
  """IDX bytes for a uint8 array: magic, big-endian dims, payload."""
  if magic is None:
    magic = 0x0800 | array.ndim
  header = struct.pack('>I', magic) + struct.pack(
      f'>{array.ndim}I', *array.shape)
  return header + array.astype(np.uint8).tobytes()


def _arrays(n_train=20, n_test=10, seed=0):
  rng = np.random.default_rng(seed)
  return {
      'train_images': rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      'train_labels': rng.integers(0, 10, n_train, dtype=np.uint8),
      'test_images': rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      'test_labels': rng.integers(0, 10, n_test, dtype=np.uint8),
  }


def _write_mnist(directory, arrays=None, *, gz=True, raw=None):
  """Writes the four files; `raw` maps a key to bytes written instead."""
  arrays = _arrays() if arrays is None else arrays
  raw = raw or {}
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  for key, name in NAMES.items():
    payload = raw.get(key, _idx(arrays[key]) if key in arrays else None)
    if payload is None:
      continue
    if gz:
      (directory / name).write_bytes(gzip.compress(payload))
    else:
      (directory / name.removesuffix('.gz')).write_bytes(payload)
  return arrays


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Any download attempt fails unless a test installs its own urlopen."""
  calls = []

  def refuse(url, *args, **kwargs):
    calls.append(url)
    raise urllib.error.URLError('network disabled in tests')

  monkeypatch.setattr(urllib.request, 'urlopen', refuse)
  return calls


@pytest.fixture
def isolated(monkeypatch, tmp_path):
  """No DNNR_DATA_DIR and a cache under tmp_path; returns the cache dir."""
  monkeypatch.delenv('DNNR_DATA_DIR', raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  cache = data.default_cache_dir()
  assert cache == tmp_path / 'xdg' / 'dnnr_jax' / 'mnist'
  return cache


def test_default_cache_dir_falls_back_to_home(monkeypatch, tmp_path):
  monkeypatch.delenv('XDG_CACHE_HOME', raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))
  assert data.default_cache_dir() == tmp_path / '.cache' / 'dnnr_jax' / 'mnist'


@pytest.mark.parametrize('gz', [True, False])
def test_read_idx_round_trip(tmp_path, gz):
  arrays = _write_mnist(tmp_path, gz=gz)
  suffix = '.gz' if gz else ''
  images = data.read_idx(
      tmp_path / f'train-images-idx3-ubyte{suffix}', kind='images')
  labels = data.read_idx(
      tmp_path / f't10k-labels-idx1-ubyte{suffix}', kind='labels')
  assert images.dtype == np.uint8 and images.shape == (20, 28, 28)
  np.testing.assert_array_equal(images, arrays['train_images'])
  np.testing.assert_array_equal(labels, arrays['test_labels'])


def test_load_mnist_arrays_accepts_ungzipped_files(tmp_path):
  arrays = _write_mnist(tmp_path, gz=False)
  loaded = data.load_mnist_arrays(tmp_path)
  assert set(loaded) == set(NAMES)
  for key, array in arrays.items():
    np.testing.assert_array_equal(loaded[key], array)


def test_load_dataset_normalises_like_numpy(tmp_path):
  arrays = _write_mnist(tmp_path)
  config = DataConfig(dataset='mnist', mean=0.2, std=0.5)
  dataset = data.load_dataset(config, data_dir=tmp_path)
  assert dataset.name == 'mnist'
  assert dataset.num_features == 784 and dataset.num_classes == 10
  assert dataset.source == str(tmp_path)
  assert dataset.validation is None
  for split, prefix in ((dataset.train, 'train'), (dataset.test, 'test')):
    pixels = arrays[f'{prefix}_images'].reshape(-1, 784).astype(np.float64)
    expected = (pixels / 255.0 - 0.2) / 0.5
    assert split.images.dtype == np.float32
    assert split.labels.dtype == np.int32
    assert split.images.shape == expected.shape
    np.testing.assert_allclose(np.asarray(split.images), expected, atol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(split.labels), arrays[f'{prefix}_labels'])


def test_validation_split_is_the_tail_of_training(tmp_path):
  arrays = _write_mnist(tmp_path)
  config = DataConfig(validation_size=5)
  dataset = data.load_dataset(config, data_dir=tmp_path)
  assert dataset.train.images.shape == (15, 784)
  assert dataset.validation.images.shape == (5, 784)
  assert dataset.test.images.shape == (10, 784)
  np.testing.assert_array_equal(
      np.asarray(dataset.validation.labels), arrays['train_labels'][15:])
  np.testing.assert_array_equal(
      np.asarray(dataset.train.labels), arrays['train_labels'][:15])
  expected = (arrays['train_images'][15:].reshape(5, 784) / 255.0
              - config.mean) / config.std
  np.testing.assert_allclose(
      np.asarray(dataset.validation.images), expected, atol=1e-5)


@pytest.mark.parametrize('size', [20, 25])
def test_validation_size_too_large(tmp_path, size):
  _write_mnist(tmp_path)
  with pytest.raises(DataError, match=r'data\.validation_size.*20'):
    data.load_dataset(DataConfig(validation_size=size), data_dir=tmp_path)


@pytest.mark.parametrize('cut, state', [(-7, 'truncated'), (None, 'over-long')])
def test_wrong_payload_length(tmp_path, cut, state):
  arrays = _arrays()
  payload = _idx(arrays['train_images'])
  payload = payload[:cut] if cut else payload + b'\x00' * 3
  _write_mnist(tmp_path, arrays, raw={'train_images': payload})
  with pytest.raises(DataError, match=f'train-images-idx3-ubyte.gz.*{state}'):
    data.load_mnist_arrays(tmp_path)


def test_header_too_short(tmp_path):
  path = tmp_path / 'train-labels-idx1-ubyte.gz'
  path.write_bytes(gzip.compress(b'\x00\x00\x08\x01\x00'))
  with pytest.raises(DataError, match='too short'):
    data.read_idx(path, kind='labels')


@pytest.mark.parametrize('damage', ['flip', 'cut', 'plain'])
def test_corrupt_gzip(tmp_path, damage):
  compressed = gzip.compress(_idx(_arrays()['train_images']))
  if damage == 'flip':
    middle = len(compressed) // 2
    corrupt = (compressed[:middle]
               + bytes(b ^ 0xFF for b in compressed[middle:middle + 64])
               + compressed[middle + 64:])
  elif damage == 'cut':
    corrupt = compressed[:len(compressed) // 2]
  else:
    corrupt = b'this is not a gzip stream at all'
  path = tmp_path / 'train-images-idx3-ubyte.gz'
  path.write_bytes(corrupt)
  with pytest.raises(DataError, match='train-images-idx3-ubyte.gz.*gzip'):
    data.read_idx(path, kind='images')


@pytest.mark.parametrize('magic', [0x00000801, 0x00000B03, 0x12345678])
def test_wrong_magic(tmp_path, magic):
  arrays = _arrays()
  payload = _idx(arrays['train_images'], magic=magic)
  _write_mnist(tmp_path, arrays, raw={'train_images': payload})
  with pytest.raises(DataError, match='train-images-idx3-ubyte.gz.*magic'):
    data.load_mnist_arrays(tmp_path)


def test_label_out_of_range(tmp_path):
  arrays = _arrays()
  arrays['test_labels'][3] = 10
  _write_mnist(tmp_path, arrays)
  with pytest.raises(DataError, match='t10k-labels-idx1-ubyte.gz.*label 10'):
    data.load_mnist_arrays(tmp_path)


def test_mismatched_counts(tmp_path):
  arrays = _arrays()
  arrays['train_labels'] = arrays['train_labels'][:19]
  _write_mnist(tmp_path, arrays)
  with pytest.raises(DataError, match='20 images.*19 labels'):
    data.load_mnist_arrays(tmp_path)


def test_images_not_28x28(tmp_path):
  arrays = _arrays()
  arrays['test_images'] = np.zeros((10, 27, 28), np.uint8)
  _write_mnist(tmp_path, arrays)
  with pytest.raises(DataError, match='t10k-images-idx3-ubyte.gz.*27x28'):
    data.load_mnist_arrays(tmp_path)


def test_lookup_order(isolated, monkeypatch, tmp_path):
  explicit, env = tmp_path / 'explicit', tmp_path / 'env'
  for directory in (explicit, env, isolated):
    _write_mnist(directory)
  monkeypatch.setenv('DNNR_DATA_DIR', str(env))
  assert data.find_mnist(explicit) == explicit
  assert data.find_mnist(str(explicit)) == explicit
  assert data.find_mnist() == env
  monkeypatch.delenv('DNNR_DATA_DIR')
  assert data.find_mnist() == isolated


def test_explicit_dir_missing_files_does_not_fall_back(isolated, tmp_path):
  _write_mnist(isolated)
  partial = tmp_path / 'partial'
  _write_mnist(partial, {'train_images': _arrays()['train_images']})
  with pytest.raises(DataError) as raised:
    data.find_mnist(partial)
  message = str(raised.value)
  assert str(partial) in message
  for name in ('train-labels-idx1-ubyte.gz', 't10k-images-idx3-ubyte.gz',
               't10k-labels-idx1-ubyte.gz'):
    assert name in message
  assert 'train-images' not in message
  with pytest.raises(DataError, match='not a directory'):
    data.find_mnist(tmp_path / 'nowhere')


def test_incomplete_env_dir_is_an_error(isolated, monkeypatch, tmp_path):
  _write_mnist(isolated)
  monkeypatch.setenv('DNNR_DATA_DIR', str(tmp_path / 'empty'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(DataError, match='DNNR_DATA_DIR=.*empty.*lacks'):
    data.find_mnist()


def _assert_names_every_place(message, cache):
  assert 'data_dir=DIR' in message
  assert 'DNNR_DATA_DIR' in message
  assert str(cache) in message


def test_nothing_found_without_download(isolated, no_network):
  with pytest.raises(DataError) as raised:
    data.find_mnist(download=False)
  _assert_names_every_place(str(raised.value), isolated)
  assert not no_network


def test_nothing_found_offline(isolated, no_network):
  with pytest.raises(DataError) as raised:
    data.load_dataset(DataConfig())
  message = str(raised.value)
  _assert_names_every_place(message, isolated)
  assert 'network disabled' in message
  assert no_network == [m + NAMES['train_images'] for m in data.MNIST_MIRRORS]
  assert not any(isolated.iterdir())


def _serve(monkeypatch, files, *, bad_mirrors=(), fail_mid_read=False):
  """Installs a urlopen serving `files` (name -> bytes); returns the log."""
  requested = []

  class Response(io.BytesIO):

    def read(self, size=-1):
      if fail_mid_read and self.tell():
        raise TimeoutError('read timed out')
      return super().read(size)

  def urlopen(url, timeout=None):
    requested.append((url, timeout))
    mirror, name = url.rsplit('/', 1)
    body = files[name]
    if mirror + '/' in bad_mirrors:
      body = body[:-1] + bytes([body[-1] ^ 1])
    return Response(body)

  monkeypatch.setattr(urllib.request, 'urlopen', urlopen)
  return requested


def _published(monkeypatch, arrays):
  """gz bytes for `arrays`, with their MD5s patched in as the published."""
  files = {}
  for key, name in NAMES.items():
    files[name] = gzip.compress(_idx(arrays[key]))
    monkeypatch.setitem(
        data.MNIST_MD5, name, hashlib.md5(files[name]).hexdigest())
  return files


def test_download_lands_in_cache(isolated, monkeypatch):
  arrays = _arrays()
  requested = _serve(monkeypatch, _published(monkeypatch, arrays))
  assert data.find_mnist() == isolated
  assert sorted(p.name for p in isolated.iterdir()) == sorted(NAMES.values())
  assert {url.rsplit('/', 1)[0] + '/' for url, _ in requested} == {
      data.MNIST_MIRRORS[0]}
  assert all(timeout for _, timeout in requested)
  loaded = data.load_mnist_arrays(isolated)
  for key, array in arrays.items():
    np.testing.assert_array_equal(loaded[key], array)
  # A second lookup uses the cache without downloading again.
  requested.clear()
  assert data.find_mnist() == isolated
  assert not requested


def test_bad_md5_tries_next_mirror(isolated, monkeypatch):
  files = _published(monkeypatch, _arrays())
  requested = _serve(monkeypatch, files, bad_mirrors=data.MNIST_MIRRORS[:1])
  assert data.find_mnist() == isolated
  assert len(requested) == 8
  for name, body in files.items():
    assert (isolated / name).read_bytes() == body


def test_bad_md5_everywhere_leaves_no_file(isolated, monkeypatch):
  files = _published(monkeypatch, _arrays())
  _serve(monkeypatch, files, bad_mirrors=data.MNIST_MIRRORS)
  with pytest.raises(DataError, match='MD5') as raised:
    data.find_mnist()
  _assert_names_every_place(str(raised.value), isolated)
  assert not any(isolated.iterdir())


def test_interrupted_download_leaves_no_file(isolated, monkeypatch):
  files = _published(monkeypatch, _arrays())
  _serve(monkeypatch, files, fail_mid_read=True)
  with pytest.raises(DataError, match='timed out'):
    data.find_mnist()
  assert not any(isolated.iterdir())


def test_digits_dataset():
  first = data.load_dataset(DataConfig(dataset='digits'))
  second = data.load_dataset(DataConfig(dataset='digits'))
  assert first.name == 'digits'
  assert first.source == 'sklearn.datasets.load_digits'
  assert first.num_features == 64 and first.num_classes == 10
  assert first.train.images.shape == (1437, 64)
  assert first.test.images.shape == (360, 64)
  assert first.train.images.dtype == np.float32
  assert first.train.labels.dtype == np.int32
  for a, b in zip((first.train, first.test), (second.train, second.test),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    np.testing.assert_array_equal(np.asarray(a.labels), np.asarray(b.labels))
  labels = np.concatenate(
      [np.asarray(first.train.labels), np.asarray(first.test.labels)])
  assert sorted(set(labels.tolist())) == list(range(10))
  # Pixels are 0..16, so the extremes map to (0 - mean) / std and
  # (1 - mean) / std.
  images = np.asarray(first.train.images)
  np.testing.assert_allclose(images.min(), -0.1307 / 0.3081, rtol=1e-6)
  np.testing.assert_allclose(images.max(), (1 - 0.1307) / 0.3081, rtol=1e-6)


def test_digits_validation_split():
  full = data.load_dataset(DataConfig(dataset='digits'))
  held = data.load_dataset(DataConfig(dataset='digits', validation_size=100))
  assert held.train.images.shape == (1337, 64)
  assert held.validation.images.shape == (100, 64)
  np.testing.assert_array_equal(
      np.asarray(held.validation.labels), np.asarray(full.train.labels)[-100:])
  np.testing.assert_array_equal(
      np.asarray(held.test.labels), np.asarray(full.test.labels))


@pytest.fixture
def real_mnist_dir():
  directory = os.environ.get('DNNR_DATA_DIR')
  if not directory:
    pytest.skip('DNNR_DATA_DIR is not set; it names the real MNIST files.')
  if data._missing_files(pathlib.Path(directory)):  # pylint: disable=protected-access
    pytest.skip(f'DNNR_DATA_DIR={directory} does not hold the MNIST files.')
  return directory


def test_real_mnist(real_mnist_dir):
  dataset = data.load_dataset(DataConfig(), data_dir=real_mnist_dir)
  assert dataset.train.images.shape == (60000, 784)
  assert dataset.test.images.shape == (10000, 784)
  assert dataset.train.labels.shape == (60000,)
  assert dataset.num_features == 784
  for split in (dataset.train, dataset.test):
    labels = np.asarray(split.labels)
    assert labels.min() == 0 and labels.max() == 9
  images = np.asarray(dataset.train.images, dtype=np.float64)
  assert abs(images.mean()) < 0.01
  assert abs(images.std() - 1) < 0.02
