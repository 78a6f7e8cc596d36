"""What the compression jobs return: typed results, not nested dicts.

`prune_checkpoint` returns a `PruneResult` and `quantize_checkpoint` a
`QuantizeResult`; both hold the new checkpoint's path, its metadata as saved
and its bytes on disk, with the figures callers read as fields and
properties. `to_dict()` is the JSON summary `dnnr prune --json` and
`dnnr quantize --json` print.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, ClassVar

from dnnr_jax.io import storage

__all__ = ['CompressResult', 'Footprint', 'PruneResult', 'QuantizeResult']


@dataclasses.dataclass(frozen=True)
class Footprint:
  """Bytes of a checkpoint directory on disk, as it is and gzip-compressed."""
  raw: int
  gzip: int

  @classmethod
  def of(cls, path: str | os.PathLike) -> Footprint:
    return cls(storage.directory_bytes(path), storage.gzip_bytes(path))


@dataclasses.dataclass(frozen=True)
class CompressResult:
  """What a prune or quantize job wrote and measured.

  Attributes:
    path: the new checkpoint.
    metadata: its metadata as saved: kind, version, config, source, the
      `compression` settings, test (and validation) metrics before and
      after, the `accuracy_guard` (validation drop in percentage points, the
      budget, `over_budget`), routes, array_bytes (JSON-ready).
    size: the new checkpoint's bytes.
    source_size: the source checkpoint's bytes.
    dense_float_path: the final (dense float32) checkpoint at the root of the
      source's lineage.
    dense_float_size: its bytes.
  """
  path: pathlib.Path
  metadata: dict[str, Any]
  size: Footprint
  source_size: Footprint
  dense_float_path: pathlib.Path
  dense_float_size: Footprint

  @property
  def version(self) -> str:
    return self.metadata['version']

  @property
  def accuracy(self) -> float:
    """Test accuracy of the new checkpoint."""
    return self.metadata['metrics']['test']['accuracy']

  @property
  def accuracy_before(self) -> float:
    """Test accuracy of the source checkpoint."""
    return self.metadata['metrics']['test_before']['accuracy']

  @property
  def validation_drop(self) -> float | None:
    """Validation accuracy lost against the source, in percentage points (None: no split)."""
    return self.metadata['accuracy_guard']['drop_pp']

  @property
  def over_budget(self) -> bool:
    """True when the validation drop exceeds the job's `max_drop`."""
    return self.metadata['accuracy_guard']['over_budget']

  @property
  def route_agreement(self) -> float:
    """Share of test inputs that take the route they took in the source."""
    return self.metadata['routes']['route_agreement']

  def to_dict(self) -> dict[str, Any]:
    """The job's JSON summary: the metadata plus path and bytes (`--json` prints it)."""
    return {**self.metadata, 'path': str(self.path), 'bytes': dataclasses.asdict(self.size),
            'source_bytes': dataclasses.asdict(self.source_size),
            'dense_float_bytes': {'path': str(self.dense_float_path),
                                  **dataclasses.asdict(self.dense_float_size)}}


@dataclasses.dataclass(frozen=True)
class PruneResult(CompressResult):
  """`CompressResult` of `prune_checkpoint`.

  Attributes:
    sparsity_report: `prune.sparsity_report` of the pruned params: per
      kernel, 'overall' (the kernels together) and 'all_params'.
  """
  KIND: ClassVar[str] = 'pruned'
  sparsity_report: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

  @property
  def sparsity(self) -> float:
    """The measured fraction of kernel weights that are zero."""
    return self.sparsity_report['overall']['sparsity']

  @property
  def zeros(self) -> int:
    """Kernel weights that are exactly zero."""
    return self.sparsity_report['overall']['zeros']


@dataclasses.dataclass(frozen=True)
class QuantizeResult(CompressResult):
  """`CompressResult` of `quantize_checkpoint`."""
  KIND: ClassVar[str] = 'quantized'

  @property
  def mode(self) -> str:
    return self.metadata['quantization']['mode']

  @property
  def bits(self) -> int:
    return self.metadata['quantization']['bits']
