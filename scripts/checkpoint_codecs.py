"""Entropy coders compared on a compressed checkpoint's streams.

Loads a checkpoint, encodes its leaves as a compact checkpoint does (sparse
gaps and values, packed int4 codes, scales, biases), and prints the bytes of
the streams of every layer with an encoded leaf under each codec, each stream
compressed on its own and kept raw where the codec does not shrink it, as
format 6 stores them. Also: the order-0 entropy of each stream (a bound for
any coder that codes symbols one at a time), and zstd over each layer's
streams as one frame (mixing them codes worse). Then Brotli 10 over the
streams of every leaf, thresholds included: a frame per array (format 7),
all of them as one frame in layout order (format 8), and one frame per kind
of array (gaps, values, scales, biases, ...). Last, what one more array
costs in an Orbax directory: 1 and 23 arrays of 64 bytes saved by plain
Orbax, the difference in bytes over 22.

  python scripts/checkpoint_codecs.py models/quantized/quantized_model_v1.0
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import pathlib
import tempfile
import time
import zlib

import brotli
import numpy as np
import orbax.checkpoint as ocp
import zstandard

from dnnr_jax.io import checkpoint, entropy, storage


def order0_bytes(raw: bytes) -> float:
  """n · H(bytes) / 8: the order-0 entropy of a stream, in bytes."""
  counts = np.bincount(np.frombuffer(raw, np.uint8), minlength=256)
  counts = counts[counts > 0]
  return -float((counts * np.log2(counts / len(raw))).sum()) / 8 if len(raw) else 0.0


CODECS = {
    'zlib 9': lambda raw: zlib.compress(raw, 9),
    'xz (lzma preset 9e)': lambda raw: lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME),
    'zstd 3': zstandard.ZstdCompressor(level=3).compress,
    'zstd 19': zstandard.ZstdCompressor(level=19).compress,
    'zstd 22': zstandard.ZstdCompressor(level=22).compress,
    'brotli 5': lambda raw: brotli.compress(raw, quality=5),
    'brotli 10': lambda raw: brotli.compress(raw, quality=10),
    'brotli 11': lambda raw: brotli.compress(raw, quality=11),
}


def orbax_bytes_per_array() -> float:
  """Bytes one more 64-byte array adds to a plain Orbax directory (OCDBT, the default)."""
  sizes = []
  with tempfile.TemporaryDirectory() as temporary:
    for count in (1, 23):
      path = pathlib.Path(temporary) / str(count)
      tree = {f'layer_{index}': {'stream': np.arange(64, dtype=np.uint8) * index}
              for index in range(count)}
      with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree)
      sizes.append(storage.directory_bytes(path))
  return (sizes[1] - sizes[0]) / 22


def every_leaf(entries: dict, layout: dict) -> dict[str, int]:
  """Brotli 10 over every leaf's streams: per array, as one frame, and one frame per kind."""
  def coded(raw: bytes) -> int:
    return min(len(brotli.compress(raw, quality=10)), len(raw))

  streams = [(name, entropy.stream_bytes(array)) for path in layout
             for name, array in entries[path].items()]
  kinds: dict[str, list[bytes]] = {}
  for name, raw in streams:
    kinds.setdefault(name, []).append(raw)
  return {
      'every leaf: raw': sum(len(raw) for _, raw in streams),
      'every leaf: brotli 10, a frame per array (format 7)': sum(coded(raw) for _, raw in streams),
      'every leaf: brotli 10, one frame (format 8)': coded(b''.join(raw for _, raw in streams)),
      'every leaf: brotli 10, one frame per kind of array': sum(
          coded(b''.join(raws)) for raws in kinds.values()),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('checkpoint')
  args = parser.parse_args()
  variables = checkpoint.load_model(args.checkpoint).variables
  entries, layout = storage.encode_leaves(variables)
  layers: dict[str, list[bytes]] = {}
  for path, spec in layout.items():
    if '/' in path:
      layers.setdefault(path.rsplit('/', 1)[0], []).append(spec)
  coded = {parent for parent, specs in layers.items()
           if any(spec['encoding'] != 'dense' or spec['kind'] == 'qarray' for spec in specs)}
  streams = [entropy.stream_bytes(array) for path, entry in entries.items()
             if path.rsplit('/', 1)[0] in coded for array in entry.values()]
  by_layer = [b''.join(entropy.stream_bytes(array) for path, entry in entries.items()
                       if path.rsplit('/', 1)[0] == parent for array in entry.values())
              for parent in sorted(coded)]
  rows = {'streams': len(streams), 'raw': sum(map(len, streams)),
          'order-0 entropy bound': math.ceil(sum(map(order0_bytes, streams)))}
  for name, compress in CODECS.items():
    start = time.perf_counter()
    rows[name] = sum(min(len(compress(raw)), len(raw)) for raw in streams)
    rows[f'{name} seconds'] = round(time.perf_counter() - start, 4)
  rows['zstd 19, one frame per layer'] = sum(
      len(CODECS['zstd 19'](raw)) for raw in by_layer)
  rows.update(every_leaf(entries, layout))
  rows['orbax bytes per extra array'] = round(orbax_bytes_per_array())
  print(json.dumps(rows, indent=1))


if __name__ == '__main__':
  main()
