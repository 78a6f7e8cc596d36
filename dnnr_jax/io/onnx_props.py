"""The `metadata_props` of an ONNX file, read without parsing its graph.

An ONNX file is one `ModelProto` in protobuf's wire format. Its metadata
entries are top-level field 14 (`StringStringEntryProto`: key 1, value 2);
the graph, with every weight, is field 7. Walking the top-level fields and
seeking past all others reads a few hundred bytes of a file of any size, and
needs neither `onnx` nor a parse of the initializers, so listing a folder of
exports stays fast.
"""

from __future__ import annotations

import os
from typing import BinaryIO

METADATA_PROPS_FIELD = 14
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def read_metadata_props(path: str | os.PathLike) -> dict[str, str]:
  """Key -> value of the model's `metadata_props`, as `onnx.load` would give.

  Raises:
    ValueError: the file is not a well-formed protobuf message (truncated,
      or not ONNX).
    OSError: the file cannot be read.
  """
  props = {}
  with open(path, 'rb') as stream:
    size = os.fstat(stream.fileno()).st_size
    while stream.tell() < size:
      field, wire_type = _split_key(_varint(stream))
      if wire_type == _VARINT:
        _varint(stream)
      elif wire_type in (_FIXED64, _FIXED32):
        stream.seek(8 if wire_type == _FIXED64 else 4, os.SEEK_CUR)
      elif wire_type == _LENGTH_DELIMITED:
        length = _varint(stream)
        if field == METADATA_PROPS_FIELD:
          key, value = _entry(_read_exactly(stream, length))
          props[key] = value
        else:
          stream.seek(length, os.SEEK_CUR)
      else:
        raise ValueError(f'wire type {wire_type} of field {field} is not one ONNX uses')
      if stream.tell() > size:
        raise ValueError(f'field {field} runs past the end of the file (truncated)')
  return props


def _entry(message: bytes) -> tuple[str, str]:
  """(key, value) of one serialized `StringStringEntryProto`."""
  import io

  stream, parts = io.BytesIO(message), {1: b'', 2: b''}
  while stream.tell() < len(message):
    field, wire_type = _split_key(_varint(stream))
    if wire_type != _LENGTH_DELIMITED:
      raise ValueError(f'metadata entry field {field} is not a string')
    parts[field] = _read_exactly(stream, _varint(stream))
  return parts[1].decode(), parts[2].decode()


def _split_key(key: int) -> tuple[int, int]:
  if key >> 3 == 0:
    raise ValueError('field number 0 is not valid protobuf')
  return key >> 3, key & 7


def _varint(stream: BinaryIO) -> int:
  value = shift = 0
  while True:
    byte = stream.read(1)
    if not byte:
      raise ValueError('a varint runs past the end of the data (truncated)')
    value |= (byte[0] & 0x7F) << shift
    if byte[0] < 0x80:
      return value
    shift += 7
    if shift > 63:
      raise ValueError('a varint is longer than 10 bytes')


def _read_exactly(stream: BinaryIO, length: int) -> bytes:
  data = stream.read(length)
  if len(data) != length:
    raise ValueError('a string runs past the end of the data (truncated)')
  return data
