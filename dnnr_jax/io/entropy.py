"""Entropy coding of a model's streams: Deep Compression's last stage, by Brotli.

A compact checkpoint (format 8) stores every array of a compressed model (a
sparse kernel's gaps and values, packed int4 codes, scales, zero points, the
biases, the thresholds) as ONE Brotli stream, their bytes one after another
in layout order (`encode_stream`); the layout's dtypes and shapes give each
array's boundaries. On the MNIST default's 97 %-sparse 4-bit model one
stream is 165 B (1.1 %) smaller than a frame per array (docs/checkpoint_format.md).
Formats 6 and 7 stored each layer as one uint8 array of frames, one per
array (`decode_frames` still reads them), each compressed on its own
with Brotli (Google's `brotli` package) at `QUALITY`, or `LARGE_QUALITY` past
`LARGE_STREAM` bytes; a stream that Brotli does not shrink (a few float16
values) is stored raw. A frame is raw exactly when its length is the
stream's size in bytes, since a coded frame is kept only when it is shorter,
so the layout needs no flag per frame.

Measured on the MNIST default's quantized streams (docs/checkpoint_format.md),
Brotli 10 and 11 are 2.5 % smaller than zstd 19 or 22, 11 % smaller than zstd
3 (Orbax's own compression is zstd) and 14 % smaller than xz, and within 4 % of
the streams' order-0 entropy; 10 is as small as 11 and faster. It codes only
0.2 to 0.5 MB/s, so a larger stream takes quality 5 (over 3 MB/s, 8 to 10 %
larger): a big model saves in seconds, not minutes.
"""

from __future__ import annotations

from collections.abc import Sequence

import brotli
import numpy as np

CODEC = 'brotli'
QUALITY = 10  # Under a second for the MNIST default's layers.
LARGE_STREAM = 1 << 18  # bytes
LARGE_QUALITY = 5


def stream_bytes(array: np.ndarray) -> bytes:
  """An array's values as little-endian bytes in C order (its stream)."""
  array = np.asarray(array)
  return np.ascontiguousarray(array, array.dtype.newbyteorder('<')).tobytes()


def encode_frames(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
  """Each array's stream compressed on its own, concatenated.

  Args:
    arrays: the streams to store, any dtypes and shapes.

  Returns:
    (coded, lengths): a uint8 [sum(lengths)] array, and each frame's length in
    bytes; a frame whose length is its array's `nbytes` holds it raw.
  """
  frames = []
  for array in arrays:
    raw = stream_bytes(array)
    quality = QUALITY if len(raw) <= LARGE_STREAM else LARGE_QUALITY
    packed = brotli.compress(raw, quality=quality)
    frames.append(packed if len(packed) < len(raw) else raw)
  coded = np.frombuffer(b''.join(frames), np.uint8).copy()
  return coded, [len(frame) for frame in frames]


def encode_stream(arrays: Sequence[np.ndarray]) -> np.ndarray:
  """The arrays' streams, concatenated, as one Brotli frame (raw if that is not shorter).

  Returns:
    A uint8 array; it holds the streams raw exactly when its size is their
    total size in bytes.
  """
  coded, _ = encode_frames([np.frombuffer(b''.join(stream_bytes(array) for array in arrays),
                                          np.uint8)])
  return coded


def decode_stream(coded: np.ndarray, specs: Sequence[tuple[str, Sequence[int]]]
                  ) -> list[np.ndarray]:
  """The arrays `encode_stream` coded, from their dtypes and shapes in order.

  Raises:
    ValueError: the stream does not decode to those arrays (a damaged array).
  """
  sizes = [int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
           for dtype, shape in specs]
  coded = np.ascontiguousarray(coded, np.uint8).reshape(-1)
  if coded.size > sum(sizes):
    raise ValueError(f'{coded.size} coded bytes for {sum(sizes)} bytes of values')
  (data,) = decode_frames(coded, [('uint8', [sum(sizes)], coded.size)])
  arrays, start = [], 0
  for (dtype, shape), size in zip(specs, sizes, strict=True):
    arrays.append(np.frombuffer(data[start:start + size].tobytes(),
                                np.dtype(dtype).newbyteorder('<'))
                  .astype(np.dtype(dtype).newbyteorder('=')).reshape(shape))
    start += size
  return arrays


def decode_frames(coded: np.ndarray, specs: Sequence[tuple[str, Sequence[int], int]]
                  ) -> list[np.ndarray]:
  """The arrays `encode_frames` coded, from their dtypes, shapes and frame lengths.

  Args:
    coded: the uint8 array `encode_frames` returned.
    specs: per frame, in order, (dtype name, shape, frame length).

  Raises:
    ValueError: the frames do not decode to those arrays (a damaged array).
  """
  data = memoryview(np.ascontiguousarray(coded, np.uint8)).cast('B')
  if sum(length for _, _, length in specs) != len(data):
    raise ValueError(f'{len(data)} coded bytes, the layout records '
                     f'{sum(length for _, _, length in specs)}')
  arrays, start = [], 0
  for dtype, shape, length in specs:
    dtype = np.dtype(dtype).newbyteorder('<')
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    frame = bytes(data[start:start + length])
    start += length
    if length > size:
      raise ValueError(f'a frame of {length} bytes for {size} bytes of values')
    if length < size:
      frame = _decompressed(frame, size)
    arrays.append(np.frombuffer(frame, dtype).astype(dtype.newbyteorder('=')).reshape(shape))
  return arrays


def _decompressed(frame: bytes, size: int) -> bytes:
  """A Brotli frame's `size` bytes, never more held in memory."""
  decompressor = brotli.Decompressor()
  try:
    values = decompressor.process(frame, output_buffer_limit=size + 1)
  except brotli.error as error:
    raise ValueError(f'a {CODEC} frame does not decode ({error})') from None
  if len(values) != size or not decompressor.is_finished():
    raise ValueError(f'a {CODEC} frame does not decode to {size} bytes')
  return values
