"""The layout as checkpoint format 8 stores it: one short string per leaf.

`storage.encode_variables` describes every leaf by a spec (its dtype, shape,
encoding, the arrays that encoding stores and, for a QArray, bits, axis and
symmetry). Format 8 writes that as

    {"entropy_coded": 14269,
     "leaves": [["params/deep", "bias f4 [128] dense dense=f2",
                 "kernel i1 [256,128] sparse q4,1,s gaps=u1[1764] values=i1[1764] scale=f2[1,128]"],
                ["params/head", ...], ...]}

`entropy_coded` is the length of the one coded stream (absent when nothing is
coded). Each row is a parent path and one string per leaf under it: the
leaf's name, dtype, shape and encoding, `qBITS,AXIS,s|a` for a QArray,
`plain` for a leaf stored as its own Orbax array beside the stream, and its
arrays as `name=dtype[shape]`, the shape left out where it is the leaf's
own. A leaf whose name is not one token (it holds a space) has a row of its
own, its whole path the parent and an empty name. Dtypes are NumPy's short
type codes where they name the same dtype ('f2' for float16), else full
names. The arrays follow one another in the stream in row order, so their
boundaries are the running sum of their sizes: `unpack_layout` records each
array's byte offset in the stream. 794 B against format 7's 1,542 B of
layout rows for the MNIST default's quantized model (docs/checkpoint_format.md).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

STREAM_KEY = 'entropy_coded'
_ARRAY = re.compile(r'^([a-z_]+)=(\w+)(\[[0-9,]*\])?$')
_QUANTIZED = re.compile(r'^q([0-9]+),(-?[0-9]+),([sa])$')
_SHAPE = re.compile(r'^\[([0-9,]*)\]$')


def pack_layout(layout: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """`storage.encode_variables`' layout as format 8 stores it (see the module docstring)."""
  stream = next((spec['stream'] for spec in layout.values() if 'stream' in spec), None)
  rows: list[list[str]] = []
  for path, spec in layout.items():
    tokens = [_dtype_code(spec['dtype']), _shape(spec['shape']), spec['encoding']]
    if spec['kind'] == 'qarray':
      tokens.append(f"q{spec['bits']},{spec['axis']},{'s' if spec['symmetric'] else 'a'}")
    if stream is not None and 'stream' not in spec:
      tokens.append('plain')
    tokens += [f"{name}={_dtype_code(dtype)}{'' if shape == spec['shape'] else _shape(shape)}"
               for name, (shape, dtype, _) in spec['arrays'].items()]
    parent, _, name = path.rpartition('/')
    if not name or name.split() != [name]:  # A name that is not one token: a row of its own.
      parent, name = path, ''
    if not rows or rows[-1][0] != parent or not name:
      rows.append([parent])
    rows[-1].append(' '.join([name, *tokens]))
  packed = {} if stream is None else {STREAM_KEY: stream}
  packed['leaves'] = rows
  return packed


def unpack_layout(packed: Any) -> dict[str, dict[str, Any]]:
  """The layout `pack_layout` stored, each array's byte offset in the stream included.

  Raises:
    ValueError: `packed` is not a format-8 layout.
  """
  try:
    stream = packed.get(STREAM_KEY)
    if stream is not None and (not isinstance(stream, int) or stream < 1):
      raise ValueError(f'stream length {stream!r}')
    layout, offset = {}, 0
    for parent, *leaves in packed['leaves']:
      if not isinstance(parent, str) or not leaves:
        raise ValueError(f'row {parent!r}')
      for text in leaves:
        name, *tokens = text.split(' ')
        path = '/'.join(part for part in (parent, name) if part)
        if not path or path in layout:
          raise ValueError(f'leaf {path!r} of row {parent!r}')
        spec, coded = _spec(tokens)
        if coded and stream is not None:
          spec['stream'] = stream
          for array in spec['arrays'].values():
            array[2] = offset
            offset += math.prod(array[0]) * np.dtype(array[1]).itemsize
        layout[path] = spec
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    raise ValueError(f'not a format-8 layout: {error}') from None
  return layout


def _spec(tokens: list[str]) -> tuple[dict[str, Any], bool]:
  """A leaf's spec from its tokens, and whether it is in the coded stream."""
  dtype, shape, encoding, *rest = tokens
  spec = {'kind': 'array', 'shape': _dims(_SHAPE.match(shape), shape),
          'dtype': _dtype_name(dtype), 'encoding': encoding, 'arrays': {}}
  if rest and _QUANTIZED.match(rest[0]):
    bits, axis, symmetric = _QUANTIZED.match(rest.pop(0)).groups()
    spec.update(kind='qarray', bits=int(bits), axis=int(axis), symmetric=symmetric == 's')
  coded = not (rest and rest[0] == 'plain')
  for token in rest[0 if coded else 1:]:
    match = _ARRAY.match(token)
    if not match or match[1] in spec['arrays']:
      raise ValueError(f'array {token!r}')
    shape = spec['shape'] if match[3] is None else _dims(match, match[3])
    spec['arrays'][match[1]] = [list(shape), _dtype_name(match[2]), 0]
  if encoding not in ('dense', 'sparse', 'int4') or not spec['arrays']:
    raise ValueError(f'leaf {" ".join(tokens)!r}')
  return spec, coded


def _dims(match: Any, text: str) -> list[int]:
  if not match:
    raise ValueError(f'shape {text!r}')
  inner = text.strip('[]')
  return [int(size) for size in inner.split(',')] if inner else []


def _shape(shape: Any) -> str:
  return f"[{','.join(str(int(size)) for size in shape)}]"


def _dtype_code(name: str) -> str:
  """NumPy's short code for a dtype ('f2'), where it names that dtype, else its name."""
  code = np.dtype(name).str[1:]
  return code if np.dtype(code) == np.dtype(name) else np.dtype(name).name


def _dtype_name(code: str) -> str:
  try:
    return np.dtype(code).name
  except TypeError:
    raise ValueError(f'dtype {code!r}') from None
