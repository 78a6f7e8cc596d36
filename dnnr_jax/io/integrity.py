"""Digests that prove an artifact is the one written: checkpoints and ONNX files.

A checkpoint records, in its metadata under 'integrity', the SHA-256 (its first
`DIGEST_CHARS` hex digits) of every array handed to Orbax (keyed by its path in
that tree, with its dtype and shape) and of the rest of its metadata (config,
thresholds, lineage, layout, metrics). Loading recomputes both and refuses a
mismatch, so a flipped byte, an edited `data.mean` or another run's
`variables/` copied in is one sentence, never a silently wrong model.

An ONNX file carries, in `metadata_props['dnnr_jax.digest']`, the SHA-256 of
its graph (initializers included), opset imports and every other metadata
entry. Plain Orbax and onnxruntime still open both: the digests are ordinary
metadata.

These are checks against damage and careless edits, not signatures: whoever
can rewrite the file can rewrite its digest too.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from dnnr_jax.errors import DnnrError, IntegrityError

ALGORITHM = 'sha256'
KEY = 'integrity'
ONNX_KEY = 'dnnr_jax.digest'
# A checkpoint records the first 16 hex digits (64 bits) of each SHA-256: a
# chance of 2**-64 that a damaged array still matches, at a quarter of the bytes
# (checkpoint format 7; formats 5 and 6 recorded all 64 digits, still checked).
DIGEST_CHARS = 16


def array_digest(array: Any) -> str:
  """SHA-256 of an array's dtype, shape and bytes (C order)."""
  import numpy as np  # Here, so that reading metadata digests (`dnnr models`) needs no NumPy.

  array = np.ascontiguousarray(np.asarray(array))
  digest = hashlib.sha256(f'{array.dtype.str}{list(array.shape)}'.encode())
  digest.update(memoryview(array).cast('B') if array.size else b'')
  return digest.hexdigest()


def tree_digests(tree: Any) -> dict[str, str]:
  """`array_digest` of every leaf of a pytree, keyed by its '/'-joined path."""
  import jax

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path(key_path): array_digest(leaf) for key_path, leaf in leaves}


def json_digest(value: Any) -> str:
  """SHA-256 of a JSON value, independent of key order."""
  text = json.dumps(value, sort_keys=True, separators=(',', ':'), allow_nan=True)
  return hashlib.sha256(text.encode()).hexdigest()


def seal(metadata: dict[str, Any], arrays: Any) -> dict[str, Any]:
  """`metadata` with an 'integrity' entry covering it and the `arrays` tree.

  With `arrays` None the entry covers the metadata alone.

  The metadata digest is taken of its JSON round trip, which is what a later
  load sees (tuples become lists, integer keys strings).
  """
  plain = json.loads(json.dumps({k: v for k, v in metadata.items() if k != KEY}))
  record = {'algorithm': ALGORITHM, 'metadata': json_digest(plain)[:DIGEST_CHARS]}
  if arrays is not None:
    record['arrays'] = {name: digest[:DIGEST_CHARS]
                        for name, digest in tree_digests(arrays).items()}
  return {**plain, KEY: record}


def _matches(recorded: Any, actual: str) -> bool:
  """Whether `recorded` is `actual` or its first `DIGEST_CHARS` or more digits."""
  return (isinstance(recorded, str) and len(recorded) >= DIGEST_CHARS
          and actual.startswith(recorded))


def readable(tree: Any) -> bool:
  """Whether every leaf of `tree` can be read whole by this process."""
  import jax

  return all(getattr(leaf, 'is_fully_addressable', True) for leaf in jax.tree.leaves(tree))


_FIX = 'restore it from a copy or write it again with dnnr'


def verify_metadata(path: os.PathLike | str, metadata: dict[str, Any], fix: str = _FIX) -> None:
  """Raises unless `metadata` still matches the digest recorded beside it."""
  recorded = metadata.get(KEY)
  if recorded is None:
    return
  rest = {key: value for key, value in metadata.items() if key != KEY}
  if not isinstance(recorded, dict) or not _matches(recorded.get('metadata'), json_digest(rest)):
    raise IntegrityError(
        f'{path} is damaged or was edited: its metadata (config, thresholds, lineage) no '
        f'longer matches the digest recorded when it was saved; {fix}.')


def verify_arrays(path: os.PathLike | str, metadata: dict[str, Any], arrays: Any,
                  fix: str = _FIX) -> None:
  """Raises unless every restored array matches the digest recorded for it."""
  recorded = metadata.get(KEY)
  if recorded is None or 'arrays' not in recorded or not readable(arrays):
    return
  actual = tree_digests(arrays)
  expected = recorded.get('arrays', {})
  changed = sorted(name for name in expected.keys() | actual.keys()
                   if name not in actual or not _matches(expected.get(name), actual[name]))
  if changed:
    raise IntegrityError(
        f'{path} is damaged or was edited: its array {changed[0]!r} no longer matches the '
        f'digest recorded when it was saved; {fix}.')


def onnx_digest(onnx_model) -> str:
  """SHA-256 of an ONNX model's graph, opsets and metadata (the digest entry aside)."""
  digest = hashlib.sha256(onnx_model.graph.SerializeToString(deterministic=True))
  opsets = sorted((opset.domain, opset.version) for opset in onnx_model.opset_import)
  props = sorted((prop.key, prop.value) for prop in onnx_model.metadata_props
                 if prop.key != ONNX_KEY)
  digest.update(json.dumps([opsets, props]).encode())
  return f'{ALGORITHM}:{digest.hexdigest()}'


def seal_onnx(onnx_model) -> None:
  """Adds (or replaces) the model's `dnnr_jax.digest` metadata entry, in place."""
  for prop in list(onnx_model.metadata_props):
    if prop.key == ONNX_KEY:
      onnx_model.metadata_props.remove(prop)
  value = onnx_digest(onnx_model)
  prop = onnx_model.metadata_props.add()
  prop.key, prop.value = ONNX_KEY, value


def load_verified_onnx(path: os.PathLike | str) -> tuple[Any, bytes]:
  """Reads an ONNX file written by `dnnr export` and checks its digest.

  Returns:
    The parsed `onnx.ModelProto` and the file's bytes (for an onnxruntime
    session).

  Raises:
    DnnrError: the file is unreadable, not ONNX, or does not match its digest.
  """
  import onnx

  try:
    with open(path, 'rb') as stream:
      data = stream.read()
    onnx_model = onnx.load_model_from_string(data)
  except Exception as error:  # protobuf raises its own types for a bad file.
    raise DnnrError(f'{path} is not a valid ONNX model ({type(error).__name__}); '
                    'pass a file written by dnnr export.') from None
  props = {prop.key: prop.value for prop in onnx_model.metadata_props}
  recorded = props.get(ONNX_KEY)
  if recorded is not None and recorded != onnx_digest(onnx_model):
    raise IntegrityError(
        f'{path} is damaged or was edited: its graph, weights or metadata no longer match '
        'the digest recorded at export; export the checkpoint again with dnnr export.')
  return onnx_model, data


def _path(key_path) -> str:
  return '/'.join(str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))
                  for key in key_path)
